"""Exact LoRA parameter counts for the DINOv2 family, counted on real modules built on the meta device.

    python bench/param_count.py [--json OUT]

Two layouts per rank: separate q/k/v adapters on the fused qkv (``splits=3``, this project's default)
and one adapter over the whole fused qkv (``splits=1``). Meta tensors have shapes but no storage, so
even ViT-g builds in well under a second.
"""
from __future__ import annotations

import argparse
import json

import timm
import torch

import lora
from vqa.cli import user_path
from vqa.run_files import write_text

MODELS = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2", "vit_giant_patch14_dinov2")
RANKS = (4, 8, 16)


def count(name: str, r: int, splits: int) -> tuple[int, int]:
    """Returns (LoRA parameters, total parameters) of ``name`` with adapters on every qkv."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=0)
    lora.inject_lora(model, targets=("qkv",), r=r, splits=splits)
    lora.mark_only_lora_as_trainable(model)
    return lora.count_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=user_path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    header = f"{'model':<28}{'r':>4}  {'q/k/v adapters':>15}  {'fused adapter':>14}  {'total (q/k/v)':>15}  {'share':>7}"
    print(header)
    print("-" * len(header))
    for name in MODELS:
        for r in RANKS:
            qkv, total = count(name, r, splits=3)
            fused, _ = count(name, r, splits=1)
            rows.append(dict(model=name, r=r, qkv_adapters=qkv, fused_adapter=fused, total=total))
            print(f"{name:<28}{r:>4}  {qkv:>15,}  {fused:>14,}  {total:>15,}  {100 * qkv / total:>6.2f}%")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
