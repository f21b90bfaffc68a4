"""Accuracy of a trained run on a CSV, overall and per question type.

    python -m vqa.evaluate --run RUN_DIR --csv data/synth/val.csv
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import lora

from .cli import at_least, run_tool, user_path
from .data import VQADataset, build_transform, chunks, collate, read_split
from .errors import VQAError
from .metrics import TypeAccuracy, format_accuracy_table
from .model import answer_loss_sum, answer_loss_total
from .predictions import check_out, predictions_table, write_predictions

__all__ = ["evaluate", "make_loader"]


def make_loader(dataset: VQADataset, batches: list[list[int]], num_workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A loader over explicit batches of image indices (the caller owns the order); ``pin_memory`` for
    copies to a GPU that overlap with its work."""
    # A generator of its own: an iterator otherwise draws its seed from the global RNG, so creating
    # one mid-epoch (on resume) would shift every dropout mask after it.
    return _Loader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
                   generator=torch.Generator().manual_seed(0), worker_init_fn=_leave_process_group,
                   multiprocessing_context=_worker_start_method() if num_workers else None)


def _worker_start_method() -> str | None:
    """``fork`` where the platform has it, macOS aside (fork is unsafe there; it keeps its default, spawn).

    The signal handling below needs workers forked from this process: they inherit its blocked mask.
    Started by ``spawn`` or ``forkserver`` (Python 3.14's default on Linux), they start with the stop
    signals unblocked, since starting multiprocessing's resource tracker unblocks them in this process,
    and a signal to the group kills a worker before it can leave the group. Under ``forkserver`` the
    server is in the group too; a SIGTERM ends it, and with it every worker, as each takes its parent's
    exit for the trainer's. Forked workers also start at once, where spawned ones import torch anew."""
    if sys.platform == "darwin" or "fork" not in multiprocessing.get_all_start_methods():
        return None  # the platform's default
    return "fork"


# Ctrl-C and SIGTERM are for the training process, not its loader workers. A terminal's Ctrl-C, and
# torchrun or a cluster scheduler passing SIGTERM on, signal the whole process group: a worker killed by
# one would make the loader raise before train.py could save its checkpoint and stop cleanly.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_POSIX = hasattr(signal, "pthread_sigmask") and hasattr(os, "setpgid")


class _Loader(torch.utils.data.DataLoader):
    """Starts its workers with the stop signals blocked, so that one sent to the process group before a
    worker has left it waits and is dropped instead of killing the worker (see ``_leave_process_group``).
    The caller's own mask is restored at once: a signal it got meanwhile is delivered then."""

    def __iter__(self):
        if self.num_workers == 0 or not _POSIX:
            return super().__iter__()
        _join_ending_queue_threads()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()  # forks the workers, which inherit the blocked mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _join_ending_queue_threads(timeout: float = 1.0) -> None:
    """Waits for the threads that fed an earlier loader's queues (multiprocessing's ``QueueFeederThread``), which a
    loader's shutdown tells to end but does not join, before this process forks workers again. Python before 3.12
    can deadlock a child forked while another thread is ending (CPython gh-112275: the child waits for the
    interpreter's thread-list lock, which the ending thread held at the fork): a validation's loader worker, forked
    just after the epoch's training loader shut down, hung so in one of this project's test runs, and the loader
    waited on it for ever. Joined, such a thread has let go of the lock before this thread runs again."""
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread":  # only earlier loaders' here: a loader starts its own after its forks
            thread.join(timeout)


def _leave_process_group(worker_id: int) -> None:
    """In each worker: a process group of its own, out of reach of signals sent to the trainer's group.
    A SIGTERM sent by PID, as the loader's own shutdown does to a stuck worker, still ends it: ignoring
    SIGTERM instead would make an unfinished loader hang the interpreter's exit, which terminates and
    then joins its workers."""
    if not _POSIX:
        return
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drops one that reached the group while this worker started
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def pick_device(name: str, source: str = "--device") -> torch.device:
    """``auto`` (CUDA when present, else CPU) or a named device that exists here; ``source`` names the
    setting in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VQAError(f"{source} has unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps...: the model and its data pipeline run on these two
        raise VQAError(f"{source} is '{name}', a device this project does not run on; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VQAError(f"{source} asks for '{name}' but CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VQAError(f"{source} asks for '{name}' but this machine has {torch.cuda.device_count()} CUDA "
                       f"device(s), numbered from 0")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype a run's ``precision`` (a config key) runs the model in on ``device``; None: fp32, no autocast.
    ``auto`` is bf16 on a GPU with bf16 tensor cores (compute capability 8.0, Ampere, and later), fp16 on an
    older one (a V100 or T4 runs bf16 at fp32's speed or slower), and fp32 on the CPU (where bf16 is slower than
    fp32 on most CPUs)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, precision: str = "auto"):
    """Autocast to ``autocast_dtype(device, precision)``, or nothing for fp32."""
    dtype = autocast_dtype(device, precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             predictions: list[tuple[torch.Tensor, torch.Tensor]] | None = None, losses: bool = False,
             class_weights: torch.Tensor | None = None, precision: str = "auto") -> dict:
    """Runs the model with its adapters merged (base-model speed) and returns per-type accuracy.

    ``reduce`` combines the hit and question counts of processes that each evaluated a share (a sum
    over ranks), so every process returns the accuracy over all of them. ``predictions``, where given, gets
    each batch's predicted classes and their probabilities (on the CPU), in the loader's order. With
    ``losses``, the result also has the training losses, each over all the questions as one batch:
    ``answer_loss`` (with ``class_weights``; left out where no answer is a class) and ``type_loss``. The model
    runs under ``autocast(device, precision)``, as the run trained."""
    was_training = model.training
    model.eval()
    meter = TypeAccuracy()
    # The answer loss's and the type loss's sums over the batches (row 0) and divisors (row 1), on the device.
    sums = torch.zeros(2, 2, dtype=torch.float64, device=device)
    with lora.merged(model, keep_buffer=False):  # during training, hold no extra copy between evaluations
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, precision):
                out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_index"])
            predicted = out.logits.argmax(-1)
            if losses:
                type_loss = F.cross_entropy(out.type_logits.float(), batch["question_type"], reduction="sum")
                sums += torch.stack([torch.stack([answer_loss_sum(out.logits, batch, class_weights), type_loss]),
                                     torch.stack([answer_loss_total(batch, class_weights).to(device),
                                                  torch.tensor(float(len(batch["question_type"])), device=device)])])
            meter.update(predicted, batch["answer"], batch["question_type"], batch.get("answer_ids"),
                         batch.get("answer_counts"))
            if predictions is not None:
                probability = out.logits.float().softmax(-1).gather(-1, predicted[:, None])[:, 0]
                predictions.append((predicted.cpu(), probability.cpu()))
    model.train(was_training)
    if reduce is not None:
        meter.correct, meter.total = reduce(meter.correct), reduce(meter.total)
        sums = reduce(sums) if losses else sums  # a process with no batch adds zeros
    metrics = meter.compute()
    if losses:
        for name, total, count in zip(("answer_loss", "type_loss"), sums[0].tolist(), sums[1].tolist()):
            if count > 0:
                metrics[name] = total / count
    return metrics


def main(argv: list[str] | None = None) -> int:
    from .run_files import CHECKPOINT_HELP, load_run

    parser = argparse.ArgumentParser(prog="python -m vqa.evaluate",
                                     description="Per-question-type accuracy of a trained run on a CSV.")
    parser.add_argument("--run", required=True, type=user_path, help="run folder written by train.py")
    parser.add_argument("--csv", required=True, type=user_path,
                        help="CSV with image, question, answer (or answers: several, as a|b|c) columns")
    parser.add_argument("--batch_size", "--batch-size", type=at_least(1), default=32, help="images per batch")
    parser.add_argument("--num_workers", "--num-workers", type=at_least(0), default=0,
                        help="loader processes decoding images (default 0: in this process)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true",
                        help="leave out rows with a missing or unreadable image, or a bad field, and count them")
    parser.add_argument("--allow_outside_paths", "--allow-outside-paths", action="store_true",
                        help="let image paths leave the CSV's folder (absolute or ../); also on where the run "
                             "trained with it")
    parser.add_argument("--which", choices=("best", "last"), default="best",
                        help="the weights of the best validation epoch (default) or of the last one")
    parser.add_argument("--checkpoint_path", "--checkpoint-path", type=user_path, metavar="PATH", help=CHECKPOINT_HELP)
    parser.add_argument("--predictions", type=user_path, metavar="OUT",
                        help="also write every question's answer, prediction, its probability and whether they match "
                             "to this CSV (replacing only an earlier such file)")
    args = parser.parse_args(argv)
    try:
        if args.predictions:
            check_out(args.predictions, "--predictions", args.csv)
        device = pick_device(args.device)
        model, tokenizer, answers, cfg = load_run(args.run, device, args.which, args.checkpoint_path, parser.prog)
        data = read_split(args.csv, skip_bad_rows=args.skip_bad_rows,
                          allow_outside_paths=args.allow_outside_paths or cfg.data.allow_outside_paths)
        if data.skipped:
            print(data.skipped_note())  # now: the evaluation may take a while
        dataset = VQADataset(data.rows, build_transform(model.backbone, cfg.model.img_size), tokenizer, answers)
        batches = chunks(list(range(len(dataset))), args.batch_size)
        loader = make_loader(dataset, batches, args.num_workers, pin_memory=device.type == "cuda")
        collected = [] if args.predictions else None
        metrics = evaluate(model, loader, device, predictions=collected, precision=cfg.train.precision)
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_accuracy_table(metrics))
    unseen = sum(all(answers.id(a) < 0 for a in row.all_answers) for row in data.rows)
    if unseen:  # a low score this explains: no prediction can be right for them
        print(f"{unseen} of {len(data.rows)} question(s) ({100 * unseen / len(data.rows):.1f}%) have "
              f"{'no answer the run' if any(row.answers for row in data.rows) else 'an answer the run never'} "
              f"trained on, which counts as wrong")
    few = sum(1 < len(row.answers) < 4 for row in data.rows)
    if few:  # VQA accuracy is made for ten answers
        print(f"{few} question(s) have 2 or 3 answers, where VQA accuracy gives a prediction all of them share 1/3 "
              f"or 2/3 (made for ten answers, it gives 1 from four)")
    if data.skipped:
        print(f"skipped {len(data.skipped)} bad row(s) (--skip_bad_rows)")  # again, under the table
    if args.predictions:  # after the table, which a file that cannot be written (a full disk) then does not cost
        try:
            write_predictions(args.predictions, predictions_table(data, dataset, collected, answers, with_answers=True),
                              "--predictions")
        except VQAError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote the {len(data.rows)} predictions to {args.predictions}")
    return 0


if __name__ == "__main__":
    run_tool(main)
