"""Module surgery: put LoRALinear layers into a model (and take them out) by replacing child modules.

Layers are swapped with ``setattr`` on their parent module; no ``forward`` is ever rebound, so the
adapters are part of the module tree, show up in ``named_modules()``, and cannot be skipped.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layer import LoRALinear, take_hooks

__all__ = [
    "inject_lora",
    "remove_lora",
    "merged_state_dict",
    "merge_lora",
    "unmerge_lora",
    "merged",
    "lora_layers",
]

Target = str | re.Pattern


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yields ``(qualified_name, layer)`` for every LoRALinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s and DDP's wrappers, whose layer names carry no ``_orig_mod.`` or
    ``module.`` prefix: the names adapter files and exported state dicts use."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _matches(name: str, targets: Sequence[Target]) -> bool:
    for target in targets:
        if isinstance(target, re.Pattern):
            if target.fullmatch(name):
                return True
        elif name == target or name.endswith("." + target):
            return True
    return False


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def inject_lora(
    model: nn.Module,
    targets: Iterable[Target] = ("qkv",),
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    splits: int | None = None,
) -> list[str]:
    """Replaces every ``nn.Linear`` whose qualified name ends with a target (a string, matched on a
    ``.`` boundary, or a compiled regex matched against the whole name) by a LoRALinear sharing its
    weights; returns the replaced names. ``splits=None`` gives a fused qkv (out = 3 x in) three adapters.
    """
    if isinstance(model, nn.Linear):
        raise ValueError(f"inject_lora replaces layers inside a model, and this is a single {type(model).__name__}; "
                         f"use LoRALinear.from_linear(layer, r=...) for one layer")
    single = isinstance(targets, (str, re.Pattern)) or not _iterable(targets)
    targets = [targets] if single else list(targets)
    if not targets:
        raise ValueError("inject_lora needs at least one target, e.g. targets=('qkv',)")
    for target in targets:
        if not isinstance(target, (str, re.Pattern)):
            raise TypeError(f"inject_lora targets are layer names (str) or compiled regexes (re.compile(...)), "
                            f"got {target!r} of type {type(target).__name__}")
    names = []
    shared = _shared_modules(model)
    for name, module in model.named_modules(remove_duplicate=False):  # every name: a shared layer's second too
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"layer '{name}' already has a LoRA adapter; call remove_lora(model) first or "
                f"load the adapter into the existing layers with load_lora_state_dict"
            )
        if isinstance(module, nn.Linear):
            _check_replaceable(model, name, module)
            if module in shared:
                raise ValueError(
                    f"layer '{name}' is one module registered under several names ({', '.join(shared[module])}): "
                    f"an adapter replaces it under one name only, and the others would run it without the adapter; "
                    f"give each place a layer of its own, or target a layer that is not shared"
                )
            names.append(name)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"no nn.Linear in {type(model).__name__} matches targets {targets}; "
            f"its linear layers include {linears[:6]}"
        )
    # Every layer is built before any is swapped in: a bad argument for one leaves the model untouched.
    layers = {}
    for name in names:
        linear = model.get_submodule(name)
        layer_splits = splits
        if layer_splits is None:
            layer_splits = 3 if linear.out_features == 3 * linear.in_features else 1
        try:
            layers[name] = LoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, splits=layer_splits)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e}") from None
    for name, layer in layers.items():
        _replace(model, name, layer)
    return names


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _shared_modules(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Modules registered under more than one name in ``model``, with all their names."""
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, []).append(name)
    return {module: found for module, found in names.items() if len(found) > 1}


def _check_replaceable(model: nn.Module, name: str, linear: nn.Linear) -> None:
    """Refuses a layer whose adapter would never run (its parent reads its weight without calling it), one with
    its own ``forward`` or a parametrized weight, which a LoRALinear would silently replace, and one not yet built."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(
            f"layer '{name}' belongs to an nn.MultiheadAttention, whose forward reads its weight directly "
            f"(F.multi_head_attention_forward) without calling it: an adapter there would never be used; "
            f"adapt a model whose attention calls its projections (timm's Attention does)"
        )
    if _reads_weight(parent, child):
        raise ValueError(
            f"layer '{name}': the forward of its parent, {type(parent).__name__}, reads self.{child}.weight "
            f"directly (as in F.linear(x, self.{child}.weight, bias)), at least in some configurations, instead of "
            f"calling the layer: an adapter there would not be used; adapt a model whose attention calls its "
            f"projections (timm's Attention, as in the DINOv2 ViTs, does; timm's EVA, BEiT and Swin V2 "
            f"attention with q/v biases do not)"
        )
    if parametrize.is_parametrized(linear):
        raise ValueError(
            f"layer '{name}' has a parametrized weight ({type(linear).__name__}, e.g. from weight_norm or "
            f"spectral_norm), which a LoRALinear would replace by its current value; remove the "
            f"parametrization first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"layer '{name}' is an nn.LazyLinear whose size is not known yet; run one forward pass through "
            f"the model before inject_lora"
        )
    if type(linear).forward is not nn.Linear.forward:
        raise ValueError(
            f"layer '{name}' is a {type(linear).__name__} with its own forward, which a LoRALinear would "
            f"replace; adapt plain nn.Linear layers only"
        )


def _reads_weight(parent: nn.Module, child: str) -> bool:
    """Whether ``parent``'s forward source reads ``self.<child>.weight`` for more than its dtype, device or shape
    (timm's EVA attention: ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)``). A class whose source
    cannot be read is not refused."""
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return False
    metadata = r"(?!\s*\.\s*(?:dtype|device|shape|size|ndim|is_cuda|requires_grad)\b)"
    return re.search(rf"self\.{re.escape(child)}\.weight\b{metadata}", source) is not None


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict as ``remove_lora(model, merge=True)`` would leave it, with ``model`` left as it
    is: each adapter folded into its weight by ``merge``'s own arithmetic (the same bits), and no
    ``lora_`` keys. It loads into the plain model (timm's) with ``strict=True``. Costs one new tensor per
    adapted weight; every other entry is the model's own. A compiled or DDP-wrapped model gives its inner
    model's names."""
    model = unwrapped(model)
    state = model.state_dict()
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        del state[prefix + "lora_A"], state[prefix + "lora_B"]
        weight = layer.weight.detach()
        if layer.merged:  # merge's result already (its state dict holds the unmerged weight)
            state[prefix + "weight"] = weight
        else:
            state[prefix + "weight"] = folded = torch.empty_like(weight)
            layer._accumulate_delta(folded, weight)
    return state


@torch.no_grad()
def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Puts plain ``nn.Linear`` layers back (adapter folded in when ``merge``, else dropped); the result
    needs no code of this library. Returns the names of the restored layers."""
    if isinstance(model, LoRALinear):
        raise ValueError("remove_lora replaces layers inside a model, and this is a single LoRALinear; for one "
                         "layer: nn.Linear(...).load_state_dict(lora.merged_state_dict(layer))")
    names = []
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge(keep_unmerged=False)  # final weights: no copy of the old ones is kept
        else:
            layer.unmerge()
        with torch.device("meta"):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = layer.weight
        linear.register_parameter("bias", layer.bias)
        linear.train(layer.training)
        take_hooks(linear, layer)
        _replace(model, name, linear)
        names.append(name)
    return names


def merge_lora(model: nn.Module, keep_unmerged: bool = True) -> list[str]:
    """Merges every adapter into its layer's weight (see ``LoRALinear.merge``); returns the layers merged now."""
    names = []
    for name, layer in lora_layers(model):
        if not layer.merged:
            layer.merge(keep_unmerged=keep_unmerged)
            names.append(name)
    return names


def unmerge_lora(model: nn.Module, keep_buffer: bool = True) -> list[str]:
    """Takes every adapter back out of its layer's weight; returns the layers unmerged now.
    ``keep_buffer=False`` also frees the memory each layer keeps for its next merge."""
    names = []
    for name, layer in lora_layers(model):
        if layer.merged:
            names.append(name)
        layer.unmerge(keep_buffer=keep_buffer)
    return names


@contextlib.contextmanager
def merged(model: nn.Module, keep_buffer: bool = True) -> Iterator[nn.Module]:
    """Runs the block with adapters merged (inference at base-model speed); unmerges exactly on exit.
    Holds one extra copy of each adapted weight while inside, and after it unless ``keep_buffer=False``
    (the copy makes the next merge faster: see ``LoRALinear.unmerge``)."""
    names = set(merge_lora(model))
    try:
        yield model
    finally:
        for name, layer in lora_layers(model):
            if name in names:
                layer.unmerge(keep_buffer=keep_buffer)
