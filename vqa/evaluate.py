"""Accuracy of a trained run on a CSV, overall and per question type.

    python -m vqa.evaluate --run RUN_DIR --csv data/synth/val.csv
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import lora

from .data import VQADataset, build_transform, chunks, collate, read_split
from .errors import VQAError
from .metrics import TypeAccuracy, format_accuracy_table

__all__ = ["evaluate", "make_loader"]


def make_loader(dataset: VQADataset, batches: list[list[int]], num_workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A loader over explicit batches of image indices (the caller owns the order); ``pin_memory`` for
    copies to a GPU that overlap with its work."""
    # A generator of its own: an iterator otherwise draws its seed from the global RNG, so creating
    # one mid-epoch (on resume) would shift every dropout mask after it.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                                       worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the training process. A terminal's Ctrl-C, and torchrun
    or a cluster scheduler forwarding SIGTERM, signal the whole process group: a worker killed by it
    would make the loader raise before train.py could save its checkpoint and stop cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def pick_device(name: str, source: str = "--device") -> torch.device:
    """``auto`` (CUDA when present, else CPU) or a named device that exists here; ``source`` names the
    setting in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VQAError(f"{source} has unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VQAError(f"{source} asks for '{name}' but CUDA is not available here; use cpu or auto")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Runs the model with its adapters merged (base-model speed) and returns per-type accuracy.

    ``reduce`` combines the hit and question counts of processes that each evaluated a share (a sum
    over ranks), so every process returns the accuracy over all of them."""
    was_training = model.training
    model.eval()
    meter = TypeAccuracy()
    with lora.merged(model, keep_buffer=False):  # during training, hold no extra copy between evaluations
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device):
                out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_index"])
            meter.update(out.logits.argmax(-1), batch["answer"], batch["question_type"])
    model.train(was_training)
    if reduce is not None:
        meter.correct, meter.total = reduce(meter.correct), reduce(meter.total)
    return meter.compute()


def main(argv: list[str] | None = None) -> int:
    from .run_files import load_run

    parser = argparse.ArgumentParser(description="Per-question-type accuracy of a trained run on a CSV.")
    parser.add_argument("--run", required=True, type=Path, help="run folder written by train.py")
    parser.add_argument("--csv", required=True, type=Path, help="CSV with image, question, answer columns")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true")
    parser.add_argument("--which", choices=("best", "last"), default="best")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        model, tokenizer, answers, cfg = load_run(args.run, device, args.which)
        data = read_split(args.csv, skip_bad_rows=args.skip_bad_rows, allow_outside_paths=cfg.data.allow_outside_paths)
        dataset = VQADataset(data.rows, build_transform(model.backbone, cfg.model.img_size), tokenizer, answers)
        loader = make_loader(dataset, chunks(list(range(len(dataset))), args.batch_size))
        metrics = evaluate(model, loader, device)
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_accuracy_table(metrics))
    if data.skipped:
        print(f"skipped {len(data.skipped)} bad row(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
