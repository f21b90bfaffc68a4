"""Module surgery: put LoRALinear layers into a model (and take them out) by replacing child modules.

Layers are swapped with ``setattr`` on their parent module; no ``forward`` is ever rebound, so the
adapters are part of the module tree, show up in ``named_modules()``, and cannot be skipped.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

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


def _adapted(model: nn.Module, call: str) -> list[tuple[str, LoRALinear]]:
    """``model``'s LoRA layers; none is an error: merging, removing or exporting adapters a model does not have
    would leave it as it was, silently, and the caller believing it adapted (an export of the base model, say)."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{call}: {type(model).__name__} has no LoRA layers, so there is nothing to do; add adapters "
                         f"first (inject_lora(model, ...), or load_adapter(model, path)), or check that this is the "
                         f"model they were added to")
    return layers


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s and DDP's wrappers, whose layer names carry no ``_orig_mod.`` or
    ``module.`` prefix: the names adapter files and exported state dicts use."""
    while True:
        if type(model).__name__ == "OptimizedModule" and type(model).__module__.startswith("torch._dynamo"):
            model = model._orig_mod  # torch.compile's wrapper (named, not imported: importing dynamo is slow)
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


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
    weights; returns the replaced names. ``splits=None`` gives timm's fused qkv three adapters, one each for
    q, k and v, and any other layer one (see ``_default_splits``).
    """
    if isinstance(model, nn.Linear):
        raise ValueError(f"inject_lora replaces layers inside a model, and this is a single {type(model).__name__}; "
                         f"use LoRALinear.from_linear(layer, r=...) for one layer")
    _refuse_ddp(model)
    single = isinstance(targets, (str, re.Pattern)) or not _iterable(targets)
    targets = [targets] if single else list(targets)
    if not targets:
        raise ValueError("inject_lora needs at least one target, e.g. targets=('qkv',)")
    for target in targets:
        if not isinstance(target, (str, re.Pattern)):
            raise TypeError(f"inject_lora targets are layer names (str) or compiled regexes (re.compile(...)), "
                            f"got {target!r} of type {type(target).__name__}")
    names = []
    slots = _slots(model)
    owners = _parameter_owners(model)
    matched = set()
    # Every path: a layer in a parent shared under two names (timm's CoaT: mlp2 = mlp3) matches under either.
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or module in matched or not _matches(name, targets):
            continue
        matched.add(module)
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"layer '{name}' already has a LoRA adapter; call remove_lora(model) first or "
                f"load the adapter into the existing layers with load_lora_state_dict"
            )
        if isinstance(module, nn.Linear):
            _check_replaceable(model, name, module)
            if len(slots[module]) > 1:
                raise ValueError(
                    f"layer '{name}' is one module held in several places ({', '.join(slots[module])}): an adapter "
                    f"replaces it in one of them only, and the others would run it without the adapter; give each "
                    f"place a layer of its own, or target a layer that is not shared"
                )
            holders = owners[module.weight]
            if len(holders) > 1:
                raise ValueError(
                    f"layer '{name}' has a weight tied to other parameters ({', '.join(holders)}): merging its adapter "
                    f"(merged(), merge_lora, remove_lora(merge=True)) would change the weight there too, and two "
                    f"adapters on one weight would not unmerge to it; untie the weight, or target a layer that does "
                    f"not share it"
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
        layer_splits = _default_splits(model, name, linear) if splits is None else splits
        try:
            layers[name] = LoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, splits=layer_splits)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e}") from None
    for name, layer in layers.items():
        _replace(model, name, layer)
    return names


def _default_splits(model: nn.Module, name: str, linear: nn.Linear) -> int:
    """3 for timm's fused q/k/v projection: a layer named ``qkv`` whose out is three times its in, or three times
    the width its sibling ``proj`` takes in (MViTv2 and Hiera widen in a stage's first block: 96 in, 3 x 192 out).
    1 for any other layer, whatever its shape: an MLP's ``fc1`` at mlp_ratio 3 (VOLO, GC ViT) is one projection,
    and GC ViT's global-attention ``qkv`` holds only k and v (out = 2 x in)."""
    parent_name, _, child = name.rpartition(".")
    if child != "qkv":
        return 1
    proj = getattr(model.get_submodule(parent_name), "proj", None)
    widths = {linear.in_features} | ({proj.in_features} if isinstance(proj, nn.Linear) else set())
    return 3 if linear.out_features in {3 * w for w in widths} else 1


def _refuse_ddp(model: nn.Module) -> None:
    """DistributedDataParallel fixes the parameters it synchronises when it is built: adapters added to a model it
    wraps would get no all-reduce and train apart on every process (or make its reducer fail, misleadingly)."""
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        raise ValueError(
            "the model is wrapped in DistributedDataParallel, which synchronises only the parameters it had when it "
            "was built: adapters injected now would train apart on every process; inject LoRA (inject_lora, or "
            "load_adapter into the plain model) before wrapping the model in DistributedDataParallel"
        )


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _slots(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every module's places in ``model``: the attributes of parent modules that hold it, as ``parent.attr``.
    A module with two places is replaced in one only; one place in a parent shared under two names (timm's
    CoaT: ``mlp2 = mlp3 = mlp4``) is one place, and replacing it there changes every path."""
    first_name = {module: name for name, module in model.named_modules()}
    slots: dict[nn.Module, list[str]] = {}
    for parent in first_name:
        for attr, child in parent._modules.items():
            if child is not None:
                slots.setdefault(child, []).append(f"{first_name[parent]}.{attr}".lstrip("."))
    return slots


def _parameter_owners(model: nn.Module) -> dict[nn.Parameter, list[str]]:
    """Every parameter's names in ``model``, one per module holding it: a tied weight (an output layer sharing its
    embedding's, two layers sharing one) has two. A module in a parent shared under two names holds it once."""
    owners: dict[nn.Parameter, list[str]] = {}
    for name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(param, []).append(f"{name}.{attr}".lstrip("."))
    return owners


# nn.Module's hook registries: a layer with any hook in them is not swapped (see registered_hooks).
_HOOK_REGISTRIES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                    "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")


def registered_hooks(module: nn.Module) -> list[str]:
    """The kinds of hook registered on ``module`` itself (``forward_pre_hooks``, ...): a module swapped for
    another would leave them behind, and moving them is not safe (some hold a reference to their module)."""
    return [registry.lstrip("_") for registry in _HOOK_REGISTRIES if getattr(module, registry, None)]


def _check_replaceable(model: nn.Module, name: str, linear: nn.Linear) -> None:
    """Refuses a layer whose adapter would never run (its parent reads its weight without calling it), one with
    a parametrized weight, hooks or its own ``forward``, which a LoRALinear would silently drop, and one not yet
    built."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(
            f"layer '{name}' belongs to an nn.MultiheadAttention, whose forward reads its weight directly "
            f"(F.multi_head_attention_forward) without calling it: an adapter there would never be used; "
            f"adapt a model whose attention calls its projections (timm's Attention does)"
        )
    if _bypassed(parent, child):
        raise ValueError(
            f"layer '{name}': the forward of its parent, {type(parent).__name__}, reads self.{child}.weight "
            f"directly (as in F.linear(x, self.{child}.weight, bias)) instead of calling the layer: an adapter there "
            f"would not be used; adapt a model whose attention calls its projections (timm's Attention, as in the "
            f"DINOv2 ViTs, does; timm's EVA, BEiT and Swin V2 attention with q/v biases do not)"
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
    hooks = registered_hooks(linear)
    if hooks:
        raise ValueError(
            f"layer '{name}' has hooks registered on it ({', '.join(hooks)}; old-style weight_norm and "
            f"spectral_norm are such hooks), which would not move to the LoRALinear that replaces it; remove them "
            f"(handle.remove()) and register them again after inject_lora"
        )
    # State of its own besides weight and bias (a buffer, a parameter or a module registered on the layer): the
    # LoRALinear takes over weight and bias only, so the rest would vanish from the model and its state dict.
    extras = ([f"parameter '{n}'" for n, p in linear._parameters.items()
               if p is not None and n not in ("weight", "bias")]
              + [f"buffer '{n}'" for n, b in linear._buffers.items() if b is not None]
              + [f"module '{n}'" for n, m in linear._modules.items() if m is not None])
    if extras:
        raise ValueError(
            f"layer '{name}' holds {', '.join(extras)} besides its weight and bias, which the LoRALinear replacing it "
            f"would drop (from the model and its state dict); move it to the parent module, or adapt plain nn.Linear "
            f"layers only"
        )
    # A forward set on the instance (a patch, as accelerate's hooks install): the class's is not what runs.
    if "forward" in vars(linear):
        raise ValueError(
            f"layer '{name}' has a forward of its own set on the instance, which a LoRALinear would replace; "
            f"adapt plain nn.Linear layers only (set the forward again after inject_lora)"
        )
    if type(linear).forward is not nn.Linear.forward:
        raise ValueError(
            f"layer '{name}' is a {type(linear).__name__} with its own forward, which a LoRALinear would "
            f"replace; adapt plain nn.Linear layers only"
        )


def _bypassed(parent: nn.Module, child: str) -> bool:
    """Whether ``parent``'s forward would skip its layer ``child``, read from the source of its class: it reads
    ``self.<child>.weight`` (for more than its dtype, device or shape) and never calls ``self.<child>(...)``,
    or does both, in branches, and takes timm's q/v-bias branch, which reads the weight: a ``q_bias`` set and
    not ``qkv_bias_separate`` (timm's EVA, BEiT and Swin V2; DINOv3, without the biases, calls the layer).
    Other forwards that do both pass (the source cannot say which branch runs), as do a forward that hands
    the layer to a helper and a class whose source cannot be read."""
    reads, calls = _uses_in_forward(type(parent), child)
    if not reads:
        return False
    if not calls:
        return True
    return getattr(parent, "q_bias", None) is not None and not getattr(parent, "qkv_bias_separate", False)


# Per class: (the forward read, {child: (reads, calls)}). Weak: classes made per instance or per trace go.
_FORWARD_USES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _uses_in_forward(cls: type, child: str) -> tuple[bool, bool]:
    """Whether the source of ``cls.forward`` reads ``self.<child>.weight`` and whether it calls ``self.<child>``;
    read once per class and forward (a forward patched later is read again)."""
    forward, uses = _FORWARD_USES.get(cls, (None, {}))
    if forward is not cls.forward:
        forward, uses = cls.forward, {}
        _FORWARD_USES[cls] = (forward, uses)
    if child not in uses:
        try:
            source = inspect.getsource(forward)
        except (OSError, TypeError):
            uses[child] = (False, False)
            return uses[child]
        code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())  # comments do not count
        attr = rf"self\.{re.escape(child)}"
        metadata = r"(?!\s*\.\s*(?:dtype|device|shape|size|ndim|is_cuda|requires_grad)\b)"
        reads = re.search(rf"{attr}\.weight\b{metadata}", code) is not None
        uses[child] = (reads, re.search(rf"{attr}\s*\(", code) is not None)
    return uses[child]


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict as ``remove_lora(model, merge=True)`` would leave it, with ``model`` left as it
    is: each adapter folded into its weight by ``merge``'s own arithmetic (the same bits), and no
    ``lora_`` keys. It loads into the plain model (timm's) with ``strict=True``. Costs one new tensor per
    adapted weight; every other entry is the model's own. A compiled or DDP-wrapped model gives its inner
    model's names."""
    model = unwrapped(model)
    _adapted(model, "merged_state_dict")
    state = model.state_dict()
    folded: dict[LoRALinear, Tensor] = {}
    # Every path, as state_dict() has: a layer in a parent shared under two names (timm's CoaT) has keys under each.
    for name, layer in model.named_modules(remove_duplicate=False):
        if not isinstance(layer, LoRALinear):
            continue
        prefix = f"{name}." if name else ""
        del state[prefix + "lora_A"], state[prefix + "lora_B"]
        if layer not in folded:
            weight = layer.weight.detach()
            if layer.merged:  # merge's result already (its state dict holds the unmerged weight)
                folded[layer] = weight
            else:
                folded[layer] = torch.empty_like(weight)
                layer._accumulate_delta(folded[layer], weight)
        state[prefix + "weight"] = folded[layer]
    return state


@torch.no_grad()
def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Puts plain ``nn.Linear`` layers back (adapter folded in when ``merge``, else dropped); the result
    needs no code of this library. Returns the names of the restored layers."""
    if isinstance(model, LoRALinear):
        raise ValueError("remove_lora replaces layers inside a model, and this is a single LoRALinear; for one "
                         "layer: nn.Linear(...).load_state_dict(lora.merged_state_dict(layer))")
    names = []
    for name, layer in _adapted(model, "remove_lora"):
        hooks = registered_hooks(layer)
        if hooks:  # checked for every layer before any is replaced
            raise ValueError(f"layer '{name}' has hooks registered on it ({', '.join(hooks)}), which the plain "
                             f"nn.Linear replacing it would not have; remove them (handle.remove()) first")
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
    for name, layer in _adapted(model, "merge_lora"):
        if not layer.merged:
            layer.merge(keep_unmerged=keep_unmerged)
            names.append(name)
    return names


def unmerge_lora(model: nn.Module, keep_buffer: bool = True) -> list[str]:
    """Takes every adapter back out of its layer's weight; returns the layers unmerged now.
    ``keep_buffer=False`` also frees the memory each layer keeps for its next merge."""
    names = []
    for name, layer in _adapted(model, "unmerge_lora"):
        if layer.merged:
            names.append(name)
        layer.unmerge(keep_buffer=keep_buffer)
    return names


@contextlib.contextmanager
def merged(model: nn.Module, keep_buffer: bool = True) -> Iterator[nn.Module]:
    """Runs the block with adapters merged (inference at base-model speed); unmerges exactly on exit.
    Holds one extra copy of each adapted weight while inside, and after it unless ``keep_buffer=False``
    (the copy makes the next merge faster: see ``LoRALinear.unmerge``). A model without LoRA layers runs the
    block as it is: the outputs are the same either way (an evaluation loop shared with full fine-tuning)."""
    names = set()
    try:  # a merge that fails part of the way (out of memory, a Ctrl-C) takes back the layers merged before it
        for name, layer in lora_layers(model):
            if not layer.merged:
                layer.merge()
                names.add(name)
        yield model
    finally:
        for name, layer in lora_layers(model):
            if name in names:
                layer.unmerge(keep_buffer=keep_buffer)
