"""timm DINOv2 backbones with LoRA on every block's qkv (and, if asked, its other linear layers)."""
from .backbone import (LORA_TARGETS, PretrainedWeightsUnavailable, add_lora, create_backbone, freeze_backbone,
                       load_backbone_checkpoint, torch_load_failure)

__all__ = ["create_backbone", "load_backbone_checkpoint", "add_lora", "LORA_TARGETS", "freeze_backbone",
           "torch_load_failure", "PretrainedWeightsUnavailable"]
