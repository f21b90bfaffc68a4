"""Adapter-only state dicts and safetensors files (LoRA weights plus the config needed to rebuild them).

Files are safetensors, which hold tensors and string metadata only: loading one cannot run code.
Metadata keys: ``lora_version``, and JSON under ``targets`` (layer names), ``r``, ``alpha`` and
``splits`` (each a ``{layer name: value}`` object).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .atomic import save_safetensors
from .layer import LoRADropout, _finite, _is_integer, _is_number
from .surgery import _refuse_ddp, _replace, inject_lora, lora_layers, merged_state_dict, unwrapped

__all__ = ["lora_state_dict", "load_lora_state_dict", "save_adapter", "load_adapter", "read_adapter_config",
           "save_merged"]

_VERSION = "1"
_PARAMS = ("lora_A", "lora_B")


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` for every LoRALinear, detached (no base weights); the names of
    a compiled or DDP-wrapped model's inner model."""
    state = {}
    for name, layer in lora_layers(unwrapped(model)):
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True) -> list[str]:
    """Copies adapter weights into the model's LoRALinear layers; returns the layers loaded.

    ``strict`` makes a layer the state dict lacks, or one the model lacks, an error. A shape that does
    not fit is always an error naming the layer and both shapes.
    """
    model = unwrapped(model)
    layers = dict(lora_layers(model))
    state_dict = _inner_names(state_dict, set(layers))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers to load into; call inject_lora(model, ...) "
            f"first, or use load_adapter(model, path), which injects from the file's config"
        )
    seen: dict[str, set[str]] = {}
    for key in state_dict:
        name, _, param = key.rpartition(".")
        if param not in _PARAMS:
            raise ValueError(f"'{key}' is not a LoRA weight: adapter keys end in .lora_A or .lora_B")
        if name not in layers:
            if strict:
                raise ValueError(
                    f"adapter weight '{key}' is for layer '{name}', which has no LoRA adapter in the model "
                    f"(model LoRA layers: {_preview(layers)}); pass strict=False to ignore it"
                )
            continue
        seen.setdefault(name, set()).add(param)
    if strict:
        for name in layers:
            missing = [p for p in _PARAMS if p not in seen.get(name, ())]
            if missing:
                raise ValueError(
                    f"adapter has no '{name}.{missing[0]}' for the model's LoRA layer '{name}'; "
                    f"the adapter was saved from a different model or target list (pass strict=False to allow)"
                )
    # Every layer is checked before any is written: an adapter that does not fit leaves the model as it was.
    for name in seen:
        layer = layers[name]
        if layer.merged:
            raise RuntimeError(f"layer '{name}' is merged; call unmerge_lora(model) before loading adapter weights")
        for param in (p for p in _PARAMS if p in seen[name]):  # A first: its shape names the width
            value, target = state_dict[f"{name}.{param}"], getattr(layer, param)
            if value.shape != target.shape:
                raise ValueError(
                    f"layer '{name}': {param} has shape {tuple(value.shape)} in the adapter but "
                    f"{tuple(target.shape)} in the model (r={layer.r}, splits={layer.splits}); "
                    f"build the model with the adapter's r and target layers"
                )
    for name, params in seen.items():
        for param in params:
            getattr(layers[name], param).copy_(state_dict[f"{name}.{param}"])
    return [name for name in layers if name in seen]  # in the model's order: blocks.2 before blocks.10


def _preview(names, limit: int = 4) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes only the adapters (and their r, alpha, splits, target layers) to a safetensors file, atomically."""
    model = unwrapped(model)
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save; call inject_lora(model, ...) first")
    meta = dict(metadata or {})
    meta.update(
        lora_version=_VERSION,
        targets=json.dumps(list(layers)),
        r=json.dumps({n: m.r for n, m in layers.items()}),
        alpha=json.dumps({n: m.alpha for n, m in layers.items()}),
        splits=json.dumps({n: m.splits for n, m in layers.items()}),
    )
    save_safetensors(lora_state_dict(model), path, meta)


def save_merged(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes ``merged_state_dict(model)`` to a safetensors file, atomically: the whole model with its
    adapters folded in, as the plain model (timm's) loads it. ``model`` itself is left as it is. Tied
    weights (one tensor under two names) are not supported: safetensors refuses them."""
    save_safetensors(merged_state_dict(model), path, dict(metadata or {}))


def read_adapter_config(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Returns ``({layer: {"r", "alpha", "splits"}}, raw metadata)`` from an adapter file, without its tensors."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a folder, not an adapter file; give the file inside it "
                                f"(a training run's is RUN/adapter_best.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file '{path}' does not exist; save one with lora.save_adapter(model, path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"'{path}' is not a readable safetensors adapter file: {e}") from None
    if meta.get("lora_version") != _VERSION:
        raise ValueError(f"'{path}' is a safetensors file but not a LoRA adapter written by lora.save_adapter")
    try:
        targets = json.loads(meta["targets"])
        if not (isinstance(targets, list) and all(isinstance(n, str) for n in targets)):
            raise TypeError(f"targets must be a list of layer names, got {meta['targets'][:80]}")
        r, alpha, splits = (json.loads(meta[k]) for k in ("r", "alpha", "splits"))
        config = {n: {"r": r[n], "alpha": alpha[n], "splits": splits[n]} for n in targets}
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise ValueError(f"adapter file '{path}' has damaged metadata ({e!r}); save it again") from None
    for name, cfg in config.items():
        for key, value in cfg.items():
            number = _is_integer(value) if key != "alpha" else _is_number(value) and _finite(value)
            if not number or value <= 0:
                kind = "a finite number > 0" if key == "alpha" else "a positive integer"
                raise ValueError(f"adapter file '{path}' has damaged metadata: layer '{name}' has {key}={value!r}, "
                                 f"which must be {kind}; save it again")
        cfg["alpha"] = float(cfg["alpha"])
    return config, meta


def _inner_names(entries: dict, layers: set[str]) -> dict:
    """``entries`` (keyed by layer name, or ``<layer>.lora_A``/``.lora_B``) with the ``_orig_mod.`` taken off that
    torch.compile's wrapper put in front of the names in files saved from a compiled model before ``save_adapter``
    unwrapped it: only where the name without it is one of ``layers`` and the name with it is not."""
    renamed = {}
    for key, value in entries.items():
        name, dot, param = key.rpartition(".") if key.endswith(_PARAMS) else (key, "", "")
        inner = re.sub(r"^(_orig_mod\.)+", "", name)
        if name not in layers and inner in layers and f"{inner}{dot}{param}" not in entries:
            key = f"{inner}{dot}{param}"
        renamed[key] = value
    return renamed


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = True, dropout: float = 0.0) -> list[str]:
    """Loads an adapter file into ``model``, injecting LoRA from the file's config if the model has none, with
    ``dropout`` (files do not record it: it is a training setting); a model with adapters already keeps theirs,
    and a nonzero ``dropout`` other than theirs is an error.

    Returns the layers loaded. A file whose layers, r, alpha, splits or widths do not fit the model is an
    error that names the first layer that does not fit, and leaves the model as it was; with ``strict=False``
    the file's layers the model lacks are skipped, whether the model has adapters yet or not (a file with none
    of them is still an error).
    """
    wrapper, model = model, unwrapped(model)
    config, _ = read_adapter_config(path)
    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    modules = {name for name, _ in model.named_modules()}
    config, tensors = _inner_names(config, modules), _inner_names(tensors, modules)
    _check_shapes(path, config, tensors, strict)
    config = {name: cfg for name, cfg in config.items() if any(f"{name}.{p}" in tensors for p in _PARAMS)}
    if not config:
        raise ValueError(f"adapter '{path}' holds no tensors for the layers it lists: it is damaged; save it again")
    layers = dict(lora_layers(model))
    injected = not layers
    if injected:
        _refuse_ddp(wrapper)
        for name in list(config):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear) and not strict:
                # as for a model with adapters: a layer it lacks (no module there, or no nn.Linear, such as the
                # nn.Identity head of a timm model made with num_classes=0) is skipped
                del config[name]
                continue
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"adapter '{path}' targets layer '{name}', which is not an nn.Linear in "
                    f"{type(model).__name__}; the adapter was trained on a different architecture"
                )
        if not config:
            raise ValueError(f"adapter '{path}' targets no layer {type(model).__name__} has; the adapter was trained "
                             f"on a different architecture")
    elif dropout:  # for the adapters this call injects: one the model's own adapters lack would go unnoticed
        differs = [n for n in config if n in layers and _dropout_p(layers[n]) != dropout]
        if differs:
            raise ValueError(
                f"load_adapter's dropout={dropout!r} applies to the adapters it injects, and {type(model).__name__} "
                f"has its adapters already (layer '{differs[0]}' with dropout {_dropout_p(layers[differs[0]])}, set by "
                f"inject_lora); load into a model without LoRA, or inject with the dropout wanted and leave it out here"
            )
    originals = {name: model.get_submodule(name) for name in config} if injected else {}
    try:
        if injected:
            for name, cfg in config.items():  # the whole name: a bare target would also match 'sub.<name>'
                inject_lora(model, [re.compile(re.escape(name))], r=cfg["r"], alpha=cfg["alpha"],
                            dropout=dropout, splits=cfg["splits"])
            layers = dict(lora_layers(model))
        return _load_checked(model, path, config, layers, tensors, strict)
    except BaseException:
        for name, linear in originals.items():  # the very layers this call replaced, and only those: a
            if name and model.get_submodule(name) is not linear:  # model that is itself a layer ('') stays itself
                _replace(model, name, linear)
        raise


def _dropout_p(layer: nn.Module) -> float:
    """The dropout probability of a LoRALinear's adapter (0 where it has none)."""
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, LoRADropout) else 0.0


def _check_shapes(path, config: dict[str, dict], tensors: dict[str, Tensor], strict: bool) -> None:
    """The file's tensors against its own metadata, before anything is built from either: A is (splits * r, in),
    B is (out, r) with out a multiple of splits, both floating point; with ``strict``, every layer listed has both."""
    for name, cfg in config.items():
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        missing = [f"{name}.{p}" for p, t in zip(_PARAMS, (a, b)) if t is None]
        if strict and missing:
            raise ValueError(f"adapter '{path}' lists layer '{name}' but has no '{missing[0]}': it is damaged (save "
                             f"it again); strict=False loads what it has")
        for p, t in zip(_PARAMS, (a, b)):  # copied into a float parameter, an int8 or complex one loads silently
            if t is not None and not t.is_floating_point():
                raise ValueError(f"adapter '{path}' is damaged: '{name}.{p}' holds {t.dtype}, not floating-point "
                                 f"numbers; save it again")
        fits = ((a is None or (a.dim() == 2 and a.shape[0] == cfg["splits"] * cfg["r"]))
                and (b is None or (b.dim() == 2 and b.shape[1] == cfg["r"] and b.shape[0] % cfg["splits"] == 0)))
        if not fits:
            shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in (("lora_A", a), ("lora_B", b)) if t is not None)
            raise ValueError(f"adapter '{path}' is damaged: layer '{name}' has r={cfg['r']}, splits={cfg['splits']} "
                             f"in its metadata but {shapes} (A is (splits * r, in), B is (out, r)); save it again")


def _load_checked(model: nn.Module, path, config: dict[str, dict], layers: dict[str, nn.Module],
                  tensors: dict[str, Tensor], strict: bool) -> list[str]:
    for name, cfg in config.items():
        layer = layers.get(name)
        if layer is None:
            if strict:
                raise ValueError(f"adapter '{path}' has layer '{name}', which has no LoRA adapter in the model")
            continue
        for key in ("r", "alpha", "splits"):
            if getattr(layer, key) != cfg[key]:
                raise ValueError(
                    f"layer '{name}': adapter '{path}' has {key}={cfg[key]} but the model has "
                    f"{key}={getattr(layer, key)}; build the model with the adapter's LoRA settings"
                )
        _check_width(path, name, layer, tensors)
    if not any(name in layers for name in config):  # strict=False: a load of nothing would pass for a load
        raise ValueError(f"adapter '{path}' has none of the model's LoRA layers (it has e.g. '{next(iter(config))}'); "
                         f"the adapter was trained on a different architecture")
    return load_lora_state_dict(model, tensors, strict=strict)


def _check_width(path, name: str, layer: nn.Linear, tensors: dict[str, Tensor]) -> None:
    """A layer of another width than the adapter's (A is (r, in), B is (out, r)) means another model size."""
    a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")  # matrices: see _check_shapes
    have = (a.shape[-1] if a is not None else layer.in_features, b.shape[0] if b is not None else layer.out_features)
    if have != (layer.in_features, layer.out_features):
        raise ValueError(
            f"layer '{name}' maps {layer.in_features} -> {layer.out_features} features in the model but "
            f"{have[0]} -> {have[1]} in adapter '{path}': the adapter was trained on another model size"
        )
