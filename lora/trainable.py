"""Choosing and counting trainable parameters, by module type (never by matching parameter names)."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .layer import LoRALinear

__all__ = ["mark_only_lora_as_trainable", "count_parameters", "print_trainable_parameters"]


def mark_only_lora_as_trainable(model: nn.Module, extra: nn.Module | Iterable[nn.Module] = ()) -> None:
    """Freezes everything except ``lora_A``/``lora_B`` of each LoRALinear and all parameters of ``extra`` (a
    module or several)."""
    extra = [extra] if isinstance(extra, nn.Module) else list(extra)
    for module in extra:
        if not isinstance(module, nn.Module):
            raise TypeError(f"mark_only_lora_as_trainable: extra holds modules to train in full, and got "
                            f"{module!r} of type {type(module).__name__}; pass e.g. extra=[model.head]")
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    for module in extra:
        module.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns ``(trainable, total)`` element counts; a shared Parameter counts once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def format_trainable_parameters(model: nn.Module, tag: str = "LoRA") -> str:
    trainable, total = count_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"[{tag}] Trainable: {trainable:,} ({share:.2f}%) | Total: {total:,}"


def print_trainable_parameters(model: nn.Module, tag: str = "LoRA") -> None:
    """Prints ``[LoRA] Trainable: 442,368 (0.51%) | Total: 87,022,080``."""
    print(format_trainable_parameters(model, tag))
