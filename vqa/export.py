"""A trained run's image encoder as a plain timm checkpoint: adapters merged, unfrozen blocks included.

    python -m vqa.export --run RUN_DIR --out encoder.safetensors

The file loads with timm alone, no code of this project:
``timm.create_model(NAME, num_classes=0, img_size=N, pretrained=True, pretrained_cfg_overlay=dict(file=OUT))``
(the command prints the exact call), or as ``--checkpoint_path`` of a new run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lora

from .errors import VQAError

__all__ = ["export_encoder"]


def export_encoder(run_dir: Path, out: Path, which: str = "best") -> str:
    """Writes the run's encoder to ``out``; returns the timm call that loads it."""
    from .run_files import load_run

    if out.suffix != ".safetensors":
        raise VQAError(f"--out '{out}' must end in .safetensors: timm picks its loader by the extension")
    model, _, _, cfg = load_run(run_dir, "cpu", which)
    name, size = cfg.model.vision_model, cfg.model.img_size
    lora.save_merged(model.backbone, out, {"architecture": name, "img_size": str(size), "run": str(run_dir),
                                           "weights": which})
    return (f"timm.create_model({name!r}, num_classes=0, img_size={size}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(out)!r}))")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="run folder written by train.py")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="the run's weights to export")
    args = parser.parse_args(argv)
    try:
        call = export_encoder(args.run, args.out, args.which)
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}; load it with timm alone:\n  {call}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
