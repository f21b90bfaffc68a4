"""Module surgery: put LoRALinear layers into a model (and take them out) by replacing child modules.

Layers are swapped with ``setattr`` on their parent module; no ``forward`` is ever rebound, so the
adapters are part of the module tree, show up in ``named_modules()``, and cannot be skipped.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .layer import LoRALinear

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
    targets = [targets] if isinstance(targets, (str, re.Pattern)) else list(targets)
    if not targets:
        raise ValueError("inject_lora needs at least one target, e.g. targets=('qkv',)")
    names = []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"layer '{name}' already has a LoRA adapter; call remove_lora(model) first or "
                f"load the adapter into the existing layers with load_lora_state_dict"
            )
        if isinstance(module, nn.Linear):
            _check_replaceable(model, name, module)
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


def _check_replaceable(model: nn.Module, name: str, linear: nn.Linear) -> None:
    """Refuses a layer whose adapter would never run: one whose parent reads its weight without calling it,
    or one with its own ``forward``, which a LoRALinear would silently replace."""
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(
            f"layer '{name}' belongs to an nn.MultiheadAttention, whose forward reads its weight directly "
            f"(F.multi_head_attention_forward) without calling it: an adapter there would never be used; "
            f"adapt a model whose attention calls its projections (timm's Attention does)"
        )
    if type(linear).forward is not nn.Linear.forward:
        raise ValueError(
            f"layer '{name}' is a {type(linear).__name__} with its own forward, which a LoRALinear would "
            f"replace; adapt plain nn.Linear layers only"
        )


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict as ``remove_lora(model, merge=True)`` would leave it, with ``model`` left as it
    is: each adapter folded into its weight by ``merge``'s own arithmetic (the same bits), and no
    ``lora_`` keys. It loads into the plain model (timm's) with ``strict=True``. Costs one new tensor per
    adapted weight; every other entry is the model's own."""
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
