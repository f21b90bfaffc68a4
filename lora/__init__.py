"""A from-scratch LoRA library for PyTorch (Hu et al. 2021): layers, module surgery, merging, adapter files,
export to the plain model."""
from .adapter_io import (
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    read_adapter_config,
    save_adapter,
    save_merged,
)
from .atomic import atomic_path, atomic_write, save_safetensors
from .layer import LoRADropout, LoRALinear
from .surgery import inject_lora, lora_layers, merge_lora, merged, merged_state_dict, remove_lora, unmerge_lora
from .trainable import (
    count_parameters,
    format_trainable_parameters,
    mark_only_lora_as_trainable,
    print_trainable_parameters,
)

__all__ = [
    "LoRALinear",
    "LoRADropout",
    "inject_lora",
    "remove_lora",
    "merged_state_dict",
    "save_merged",
    "merge_lora",
    "unmerge_lora",
    "merged",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "count_parameters",
    "format_trainable_parameters",
    "print_trainable_parameters",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "atomic_path",
    "atomic_write",
    "save_safetensors",
]
