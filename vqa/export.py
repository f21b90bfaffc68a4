"""A trained run's image encoder as a plain timm checkpoint: adapters merged, unfrozen blocks included.

    python -m vqa.export --run RUN_DIR --out encoder.safetensors

The file loads with timm alone, no code of this project, strictly (every weight present, no other):
``timm.create_model(NAME, num_classes=0, img_size=N, checkpoint_path=OUT)``, with the run's ``vision_kwargs``
too (the command prints the exact call), and it serves as ``--checkpoint_path`` of a new run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors import safe_open

import lora

from .cli import run_tool, user_path
from .errors import VQAError

__all__ = ["export_encoder"]


PROG = "python -m vqa.export"


def export_encoder(run_dir: Path, out: Path, which: str = "best", checkpoint_path: Path | None = None,
                   overwrite: bool = False) -> str:
    """Writes the run's encoder to ``out``; returns the timm call that loads it. ``checkpoint_path``: a local
    copy of the weights the run started from (``load_run``). An existing ``out`` is replaced only with
    ``overwrite``: a run that started from it records its SHA-256 and would refuse the new bytes."""
    from .run_files import RUN_FILES, load_run, vision_kwargs_record, weights_file

    if out.suffix != ".safetensors":
        raise VQAError(f"--out '{out}' must end in .safetensors: timm picks its loader by the extension")
    if out.exists() and not out.is_file():  # a folder, a pipe: the rename would be refused (a ValueError) or worse
        raise VQAError(f"--out '{out}' exists and is not a file (a folder?); give the .safetensors file to write")
    if out.resolve() in {(run_dir / name).resolve() for name in RUN_FILES}:
        raise VQAError(f"--out '{out}' is a file of the run itself; write the export beside it, e.g. "
                       f"--out {run_dir / 'encoder.safetensors'}")
    model, _, _, cfg = load_run(run_dir, "cpu", which, checkpoint_path, PROG)
    for base in (cfg.model.checkpoint_path, checkpoint_path):
        if base and Path(base).resolve() == out.resolve():
            raise VQAError(f"--out '{out}' is the checkpoint this run started from (checkpoint_path): written over, "
                           f"the run's base weights would hold its adapters, which it would then add a second time; "
                           f"write the export to another file")
    if out.exists() and not overwrite:
        raise VQAError(f"--out '{out}' exists; pass --overwrite to replace it (a run started from it, "
                       f"--checkpoint_path, would then refuse it: it records the file's SHA-256), or write to "
                       f"another file")
    weights = weights_file(run_dir, which)  # the file load_run took, for the record
    with safe_open(str(weights), framework="pt") as f:
        trained = f.metadata() or {}
    name, size, extra = cfg.model.vision_model, cfg.model.img_size, cfg.model.vision_kwargs
    metadata = {"architecture": name, "img_size": str(size), "run": str(run_dir.resolve()), "weights": weights.name,
                **({"vision_kwargs": vision_kwargs_record(extra)} if extra else {}),
                **{k: trained[k] for k in ("epoch", "val_accuracy") if k in trained}}
    try:
        lora.save_merged(model.backbone, out, metadata)
    except OSError as e:
        raise VQAError(f"cannot write --out '{out}': {e}") from None
    arguments = "".join(f", {k}={v!r}" for k, v in extra.items())  # the model's shape, as the run built it
    path = str(out.resolve())
    return f"timm.create_model({name!r}, num_classes=0, img_size={size}{arguments}, checkpoint_path={path!r})"


def main(argv: list[str] | None = None) -> int:
    from .run_files import CHECKPOINT_HELP

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=user_path, help="run folder written by train.py")
    parser.add_argument("--out", required=True, type=user_path, help="the .safetensors file to write")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="the run's weights to export")
    parser.add_argument("--checkpoint_path", "--checkpoint-path", type=user_path, metavar="PATH", help=CHECKPOINT_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace --out where it exists")
    args = parser.parse_args(argv)
    try:
        call = export_encoder(args.run, args.out, args.which, args.checkpoint_path, args.overwrite)
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}; load it with timm alone:\n  {call}")
    return 0


if __name__ == "__main__":
    run_tool(main)
