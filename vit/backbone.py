"""DINOv2 ViT backbones from timm (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
Supervision"), with LoRA on every block's fused qkv projection."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

import lora

__all__ = ["create_backbone", "load_backbone_checkpoint", "add_lora", "LORA_TARGETS", "freeze_backbone",
           "torch_load_failure", "PretrainedWeightsUnavailable"]


class PretrainedWeightsUnavailable(FileNotFoundError):
    """timm could not download ``model_name``'s pretrained weights (no network and nothing cached, say): ``reason``.
    ``problem`` says so without the advice, for callers that advise otherwise."""

    def __init__(self, model_name: str, reason: str) -> None:
        self.problem = f"cannot get the pretrained weights of '{model_name}' through timm's download ({reason})"
        super().__init__(
            f"{self.problem}; on a machine without network, give checkpoint_path (a local .safetensors or .pth of "
            f"this model), or fill the Hugging Face cache (HF_HOME) where there is network; pretrained: false "
            f"builds random weights"
        )


def create_backbone(
    name: str = "vit_base_patch14_dinov2",
    /,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    img_size: int | None = None,
    **kwargs,
) -> VisionTransformer:
    """Builds a timm ViT without classifier head (``num_classes=0``).

    ``pretrained=True`` downloads through timm's hub loading (needs internet); ``checkpoint_path`` loads
    a local ``.safetensors`` or ``.pth`` file instead (never unpickling code). ``img_size`` must be a
    multiple of the patch size; position embeddings of a checkpoint are resampled to it. Other keyword
    arguments go to ``timm.create_model`` (``drop_path_rate=0.1``, ``depth=2``); one timm cannot build with
    is a ValueError quoting timm's reason, as are pretrained weights that do not fit the shape they build.
    """
    if not timm.is_model(name):
        names = list(dict.fromkeys(timm.list_models("*dinov2*") + timm.list_models("vit_*")))  # each once
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm model '{name}'{hint}")
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
        kwargs["img_size"] = img_size
    kwargs.setdefault("num_classes", 0)
    if checkpoint_path is not None:
        pretrained = False  # the local file replaces the download
    # Arguments of the caller's own (a smaller depth, a drop_path_rate): a failure is told as theirs.
    extra = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("img_size", "num_classes"))
    with torch.device("meta"):  # the patch size is known before any weights are allocated
        try:
            try:
                probe, built_as_asked = timm.create_model(name, **kwargs), True
            except TypeError:  # a model that takes no img_size (a ResNet): refused below, by its type
                kwargs_but_size = {k: v for k, v in kwargs.items() if k != "img_size"}
                probe, built_as_asked = timm.create_model(name, **kwargs_but_size), False
        except Exception as e:  # an argument it does not take, or a value it refuses, in whatever way it refuses it
            if not extra:
                raise
            raise ValueError(f"timm cannot build '{name}' with {extra}: {type(e).__name__}: {e}") from None
    if not hasattr(getattr(probe, "patch_embed", None), "patch_size"):
        raise ValueError(f"'{name}' is a {type(probe).__name__}, not a ViT with a patch embedding; create_backbone "
                         f"builds ViTs such as vit_small_patch14_dinov2 (use timm.create_model for other models)")
    patch = probe.patch_embed.patch_size[0]
    if img_size is not None and img_size % patch:
        lo, hi = img_size // patch * patch, (img_size // patch + 1) * patch
        sizes = f"{lo} or {hi}" if lo else f"{hi}"  # at least one patch
        raise ValueError(f"img_size={img_size} is not divisible by {name}'s patch size {patch}; use {sizes}")
    if checkpoint_path is not None and built_as_asked and not _has_non_persistent_buffers(probe):
        # Every tensor comes from the file (the load is strict): no random initialisation to write over, which
        # costs more than the load (ViT-B: 1.3 to 1.7 s on 2 CPU cores). Memory is allocated empty, the load fills it.
        model = probe.to_empty(device=torch.get_default_device())
        load_backbone_checkpoint(model, checkpoint_path)
        return model
    del probe
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:  # the hub download: no network and nothing cached, a proxy, a cache not writable
        if not pretrained:
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PretrainedWeightsUnavailable(name, reason) from None
    except RuntimeError as e:  # the strict load of weights made for the model as named, into another shape
        lines = str(e).strip().splitlines()
        if not (pretrained and extra and len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict")):
            raise
        first = lines[1].strip()  # "size mismatch for pos_embed: ...", "Unexpected key(s) in state_dict: ..."
        first = first if len(first) <= 160 else first[:157] + "..."
        raise ValueError(f"the pretrained weights of '{name}' do not fit the model {extra} builds ({first}); build "
                         f"it as pretrained, without those arguments, or give weights of that shape as "
                         f"checkpoint_path") from None
    if checkpoint_path is not None:
        load_backbone_checkpoint(model, checkpoint_path)
    return model


def _has_non_persistent_buffers(model: nn.Module) -> bool:
    """Whether the model has buffers a state dict leaves out (timm's RoPE tables, say): computed at build time,
    never loaded."""
    return any(m._non_persistent_buffers_set for m in model.modules())


def torch_load_failure(e: Exception) -> str:
    """What ``torch.load(weights_only=True)`` found wrong, without its advice to load with
    ``weights_only=False``, which would run whatever code the file holds: the first paragraph of torch's
    message that is not that advice (e.g. "Trying to load unsupported GLOBAL posix.system ..."), else the
    error's type."""
    message = str(e)
    if "WeightsUnpickler error:" in message:
        message = message.partition("WeightsUnpickler error:")[2]
    boilerplate = ("weights_only", "Weights only load failed", "Check the documentation")
    for paragraph in re.split(r"\n\s*\n", message):
        paragraph = paragraph.strip()
        if paragraph and not any(b in paragraph for b in boilerplate):
            return paragraph.splitlines()[0].split(". ")[0]  # not the advice after it (to allowlist the global)
    return type(e).__name__


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint file '{path}' is a folder; give the .safetensors or .pth file itself "
                                f"(check checkpoint_path)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist; check checkpoint_path")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint '{path}' is not a readable safetensors file ({e}); it is damaged or "
                             f"incomplete: copy or save it again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
    except Exception as e:
        raise ValueError(
            f"cannot load checkpoint '{path}' safely ({torch_load_failure(e)}): it is damaged, or holds objects "
            f"other than tensors, which are refused (loading them could run code); convert it to .safetensors"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict")
    return state


def _weights_within(state: dict) -> dict:
    """``state`` less any ``model`` or ``state_dict`` entry that holds no dict (the model's name, say), at the levels
    timm's filter unwraps (``model``, then ``state_dict`` within it): the filter would take that entry for the
    weights and fail with an AttributeError. The unwrapping itself is left to the filter, once."""
    state = _without_entry(state, "model")
    if isinstance(state.get("model"), dict):
        return {**state, "model": _without_entry(state["model"], "state_dict")}
    return _without_entry(state, "state_dict")


def _without_entry(state: dict, key: str) -> dict:
    """``state`` without ``key`` where that holds no dict."""
    return {k: v for k, v in state.items() if k != key} if key in state and not isinstance(state[key], dict) else state


def _patch_kernels(state: dict):
    """``(key, tensor, within)`` for each patch-embedding kernel of the dict timm's filter loads from ``state``,
    found as the filter finds it: ``model``, then ``state_dict``, then an IJEPA ``encoder`` unwrapped (``within``
    names them), any key holding ``patch_embed.proj.weight`` (prefixes such as ``visual.trunk.`` included) and
    OpenAI CLIP's ``visual.conv1.weight``. Other entries (a distillation teacher, say) are not loaded."""
    within = ""
    for wrapper in ("model", "state_dict", "encoder"):
        if isinstance(state.get(wrapper), dict):
            state, within = state[wrapper], f"{within}['{wrapper}']"
    for key, value in state.items():
        if isinstance(value, Tensor) and ("patch_embed.proj.weight" in key or key.endswith("visual.conv1.weight")):
            yield key, value, within


def load_backbone_checkpoint(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Loads a timm- or DINOv2-format state dict into ``model`` (strict), resampling position embeddings.

    A key or shape that does not fit is an error naming the first such layer and both shapes. Into a model with
    LoRA adapters, the base weights load and the adapters are kept (unless the file holds them too).
    """
    path = Path(path)
    raw = _read_state_dict(path)
    want = model.patch_embed.proj.weight
    for key, kernel, within in _patch_kernels(raw):
        if kernel.ndim == 4 and kernel.shape != want.shape:  # timm's filter would resample it silently
            where = f" (in the file's {within})" if within else ""
            raise ValueError(
                f"checkpoint '{path}': layer '{key}'{where} has shape {tuple(kernel.shape)}, the model expects "
                f"{tuple(want.shape)}; the checkpoint is for another patch size or width"
            )
    state = checkpoint_filter_fn(_weights_within(raw), model)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head.") or k in expected}
    # Base weights load before or after add_lora: a model's adapters, which a base checkpoint lacks, stay as they are.
    adapters = {f"{name}.{p}" for name, _ in lora.lora_layers(model) for p in ("lora_A", "lora_B")}
    if adapters & state.keys():  # a file with adapters holds every one, as every other weight: none is skipped
        adapters = set()
    for key, value in expected.items():
        if key not in state:
            if key in adapters:
                continue
            raise ValueError(f"checkpoint '{path}' has no weight for layer '{key}' of {type(model).__name__}")
        if state[key].shape != value.shape:
            raise ValueError(
                f"checkpoint '{path}': layer '{key}' has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(value.shape)}; is the checkpoint for a different model size?"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"checkpoint '{path}' has weights the model lacks, e.g. '{extra[0]}' ({len(extra)} in all)")
    model.load_state_dict(state, strict=not adapters)  # every other key was checked above


# The block layers add_lora adapts, by the names it takes: the fused q/k/v projection (three adapters), the attention
# output and the MLP's two layers.
LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def add_lora(backbone: VisionTransformer, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] = ("qkv",)) -> list[str]:
    """Injects LoRA adapters into every block's ``targets`` (of ``LORA_TARGETS``; by default the fused ``qkv``, with
    separate q/k/v adapters); returns the layer names, block by block.

    Also makes the block input require grad while gradient checkpointing is on: with reentrant
    checkpointing, a segment whose inputs need no grad would otherwise give its LoRA weights no gradient.
    """
    if isinstance(targets, str) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise ValueError(f"add_lora targets are some of {', '.join(LORA_TARGETS)} (a tuple), got {targets!r}")
    targets = tuple(dict.fromkeys(targets))
    for i, block in enumerate(backbone.blocks):  # all checked before any is adapted
        for target in targets:
            layer = _submodule(block, LORA_TARGETS[target])
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"add_lora target '{target}': block {i} of this model has no linear layer "
                                 f"{LORA_TARGETS[target]} (its MLP may be another kind, e.g. a SwiGLU with fc1_g and "
                                 f"fc1_x); leave '{target}' out of the targets")
    names = []
    for target in targets:  # inside the blocks only: an attention-pool head (global_pool='map') has an mlp.fc1 too
        inside = re.compile(rf"blocks\.\d+\.{re.escape(LORA_TARGETS[target])}")
        names += lora.inject_lora(backbone, targets=(inside,), r=r, alpha=alpha, dropout=dropout,
                                  splits=3 if target == "qkv" else 1)
    _force_grad_into_blocks(backbone)
    order = {name: i for i, (name, _) in enumerate(backbone.named_modules())}
    return sorted(names, key=order.__getitem__)


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    """``module``'s submodule at the dotted ``path``, or None."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _force_grad_into_blocks(backbone: VisionTransformer) -> None:
    """Makes the blocks' input require grad while gradient checkpointing is on and some block weight trains:
    with reentrant checkpointing, a segment whose inputs need no grad gives its weights (LoRA adapters,
    unfrozen blocks) no gradient at all. Registered once per backbone."""
    embed = backbone.patch_embed
    if "_grad_owner" in vars(embed):
        return
    # A plain attribute, not a submodule, and no closure: a deepcopy's hook then reads the copy's backbone.
    object.__setattr__(embed, "_grad_owner", backbone)
    embed.register_forward_hook(_grad_into_blocks)


def _grad_into_blocks(embed: nn.Module, args, output: Tensor) -> Tensor:
    backbone = embed._grad_owner
    if (backbone.grad_checkpointing and torch.is_grad_enabled() and not output.requires_grad
            and any(p.requires_grad for p in backbone.blocks.parameters())):
        return output.requires_grad_()
    return output


def freeze_backbone(backbone: VisionTransformer, unfreeze_last: int = 0) -> None:
    """Freezes the backbone except its LoRA adapters and, when ``unfreeze_last > 0``, its last N blocks
    and final norm (the partial fine-tuning baseline)."""
    depth = len(backbone.blocks)
    if isinstance(unfreeze_last, bool) or not isinstance(unfreeze_last, int) or not 0 <= unfreeze_last <= depth:
        raise ValueError(f"unfreeze_last must be an integer in [0, {depth}] for this backbone, got {unfreeze_last!r}")
    extra = list(backbone.blocks[depth - unfreeze_last:]) if unfreeze_last else []
    if unfreeze_last:
        extra.append(backbone.norm)
    lora.mark_only_lora_as_trainable(backbone, extra=extra)
    _force_grad_into_blocks(backbone)  # unfrozen blocks need it under reentrant checkpointing, as LoRA does
