"""timm DINOv2 backbones with LoRA on every block's qkv."""
from .backbone import (PretrainedWeightsUnavailable, add_lora, create_backbone, freeze_backbone,
                       load_backbone_checkpoint, torch_load_failure)

__all__ = ["create_backbone", "load_backbone_checkpoint", "add_lora", "freeze_backbone", "torch_load_failure",
           "PretrainedWeightsUnavailable"]
