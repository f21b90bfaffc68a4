"""Fine-tune the VQA model with LoRA on its DINOv2 image encoder.

    python train.py --config configs/demo.yaml [--key value ...]
    python train.py --resume runs/demo            # continue a run after a crash or Ctrl-C
    python train.py --config configs/demo.yaml --overwrite   # start over where a run is (deletes it)
    torchrun --nproc_per_node 4 train.py --config configs/dinov2_base_vqa.yaml   # 4 GPUs, DDP

Any config key can be overridden on the command line (``--vision_lora_r 4``, ``--lr 3e-4``); ``--help`` lists them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import lora
from vqa import distributed
from vqa.answer_weights import load_answer_weights
from vqa.cli import run_tool, user_path
from vqa.config import RunConfig, key_help, load_config
from vqa.data import VQADataset, build_transform, chunks
from vqa.errors import VQAError, preview, unreachable
from vqa.evaluate import autocast, autocast_dtype, evaluate, make_loader, pick_device
from vqa.metrics import format_accuracy_table
from vqa.model import answer_loss, answer_loss_total
from vqa.resume import (check_answers_known, check_inputs_found, check_resumable, check_same_images,
                        check_same_processes, check_started_here, rng_state, saved_rngs, set_rng_state)
from vqa.run_data import prepare_data
from vqa.run_files import (build_model, check_base_file, check_base_weights, copy_weights, file_sha256,
                           load_checkpoint, load_vocabularies, missing_backbone, never_checkpointed, random_backbone,
                           read_history, remove_run, restore_best, save_checkpoint, train_command, trained_files,
                           vision_kwargs_record, weights_sha256, write_text)
from vqa.run_lock import RunLock
from vqa.text import AnswerVocab, Tokenizer


def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled batches, a pure function of (seed, epoch) so a resumed run sees the same order."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return chunks(order, batch_size)


def run_precision(device: torch.device, precision: str, procs: distributed.Processes) -> str:
    """The precision every process runs, bf16, fp16 or fp32: a named one as named, ``auto`` as ``autocast_dtype``
    resolves it on this process's device, but fp16 in all of them where any process's GPU takes fp16 (a V100 beside
    an A100): a process that scales its loss and one that does not would average unlike gradients."""
    dtype = autocast_dtype(device, precision)
    if precision == "auto" and distributed.max_over_ranks([int(dtype == torch.float16)], procs, device)[0]:
        dtype = torch.float16
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def stalled(epochs_done: int, best_epoch: int, patience: int) -> bool:
    """Whether early stopping ends a run after ``epochs_done`` epochs: its validation accuracy, best at epoch
    ``best_epoch``, has not risen in the ``patience`` epochs since (0: never stops early)."""
    return patience > 0 and epochs_done - best_epoch >= patience


def groups_of(batches, size: int):
    """``batches`` (any iterable) in lists of ``size``, the last one perhaps shorter."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def loss_shares(group: list[dict], weight: torch.Tensor | None) -> list[tuple[float, float]]:
    """Each batch's share of its step's answer loss and question-type loss. Both losses are means over a batch
    (the answer loss weighted), so the step scales each batch's by its part of the step's divisor: the weight of its
    answers (``answer_loss_total``), and its questions. The gradients summed are then those of one batch of all the
    step's questions. One batch a step: exactly (1.0, 1.0)."""
    answers = [float(answer_loss_total(batch, weight)) for batch in group]
    questions = [len(batch["question_type"]) for batch in group]
    return [(a / sum(answers), q / sum(questions)) for a, q in zip(answers, questions)]


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return factor


def param_groups(model, cfg: RunConfig) -> list[dict]:
    """Adapters and unfrozen blocks at lr_encoder, the decoder at lr; no weight decay on vectors."""
    groups = {}
    for module, lr in [(model.backbone, cfg.train.lr_encoder)] + [(m, cfg.train.lr) for m in model.decoder_modules()]:
        for p in module.parameters():
            if p.requires_grad:
                decay = cfg.train.weight_decay if p.ndim >= 2 else 0.0
                groups.setdefault((lr, decay), []).append(p)
    for p in (model.image_pos, model.word_pos):  # position tables: decoder lr, no decay
        if p.requires_grad:
            groups.setdefault((cfg.train.lr, 0.0), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def make_optimizer(model, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, with torch's fused kernel where every parameter lives on the CPU or a CUDA
    GPU: one pass over each tensor where the default makes a dozen (in a ViT-S/14 full fine-tuning step on
    this project's 2-core CPU, 13 ms against 31 ms)."""
    groups = param_groups(model, cfg)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused or None)


class _Stopped(Exception):
    """A stop every process agreed on during validation, carrying the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def questions_per_second(seen: int, seconds: float, procs: distributed.Processes) -> float:
    """The run's training rate for the progress bar, from this process's ``seen`` questions: each process takes an
    equal share of the batches, in step with the others (a collective every step), so the run's is N times this
    process's (its own alone would read 1/N of the run's under torchrun)."""
    return seen * procs.world_size / seconds


def main(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Trains the run ``cfg`` describes (or continues it: ``resume``); returns the last validation metrics."""
    procs, device = distributed.setup(pick_device(cfg.train.device, source="config key 'device'"))
    lock = RunLock(Path(cfg.train.output_dir))
    try:
        return run_training(cfg, procs, device, resume, overwrite, lock)
    finally:
        lock.release()
        # Also after an error before training (bad data, say): otherwise NCCL adds a warning that
        # destroy_process_group() was not called under the error message, once per process.
        distributed.teardown(procs)  # the one place: run_training frees its DDP wrapper first


def take_run_lock(lock: RunLock, run: Path, procs: distributed.Processes, device: torch.device) -> None:
    """Takes the run folder's lock in the main process (where the folder exists); every process refuses alike
    where another train.py holds it."""
    held_elsewhere = 0 if not procs.is_main or lock.take() else 1
    if distributed.max_over_ranks([held_elsewhere], procs, device)[0]:
        raise VQAError(f"another train.py is training the run in {run} (it holds the folder's lock): two would "
                       f"write the same files; wait for it to end, or stop it (Ctrl-C saves a checkpoint), then run "
                       f"this again")


def run_training(cfg: RunConfig, procs: distributed.Processes, device: torch.device, resume: bool,
                 overwrite: bool, lock: RunLock) -> dict:
    t = cfg.train
    log = print if procs.is_main else lambda *args, **kwargs: None  # one process speaks and writes files
    run = Path(t.output_dir)
    if run.exists() and not run.is_dir():
        raise VQAError(f"output_dir '{run}' is a file, not a folder; choose another --output_dir")
    take_run_lock(lock, run, procs, device)
    saved = load_config(run / "config.yaml", []) if resume else None  # the run's settings before this resume
    if resume:
        check_resumable(cfg, saved, run / "config.yaml")
        check_started_here(cfg, saved, run / "config.yaml")
        check_inputs_found(cfg, run / "config.yaml")
        if not (run / "checkpoint.pt").is_file():
            raise VQAError(never_checkpointed(run, procs.world_size, overwrite=bool(trained_files(run))))
    state = load_checkpoint(run / "checkpoint.pt") if resume else {}
    if resume:  # first: no other check (one that counts the processes' batches, say) may hide this one
        check_same_processes(state, run, procs.world_size)
        done, begun = state["epoch"], state["batch"]
        if t.epochs < done + (begun > 0):  # a position inside an epoch: that epoch has begun; said before any work
            inside = f" and {begun} batch(es) of epoch {done + 1}" if begun else ""
            raise VQAError(f"{run} has trained {done} epoch{'s' * (done != 1)}{inside} already; --epochs cannot be "
                           f"fewer than {done + (begun > 0)}")
    history = read_history(run / "metrics.jsonl") if resume else []  # one record per epoch, rewritten after each
    step_log = read_history(run / "steps.jsonl", "step") if resume else []  # a record per log_every steps, appended
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)

    # Every process looks before prepare_data's barrier and the main one deletes only after it, so all of
    # them see the same folder (one shared by every machine, as the README asks).
    replaced = [] if resume else trained_files(run)
    if replaced and not overwrite:
        raise VQAError(f"{run} holds a run already ({', '.join(replaced)}); continue it with --resume {run}, "
                       f"replace it with --overwrite, or choose another --output_dir")
    # Data first: a bad row or image stops the run before any training time is spent.
    train_data, val_data = prepare_data(cfg, procs, state.get("train_images"), saved)
    for split, data in (("train_csv", train_data), ("val_csv", val_data)):
        if data.skipped:  # said now, not only at the end, which a stopped run never reaches
            log(f"{split}: {data.skipped_note()}")
    if resume:
        tokenizer, answers = load_vocabularies(run)
        check_answers_known(train_data.rows, answers, run, cfg.data.min_answer_count)
    else:
        tokenizer = Tokenizer.build((r.question for r in train_data.rows), max_length=cfg.data.max_question_length)
        # Every person's answer counts.
        answers = AnswerVocab.build((a for r in train_data.rows for a in r.all_answers), cfg.data.min_answer_count)
    trained_rows = [r for r in train_data.rows if any(answers.id(a) >= 0 for a in r.all_answers)]
    if not trained_rows:
        raise VQAError(f"no answer of train_csv is given min_answer_count ({cfg.data.min_answer_count}) times, so "
                       f"there is no answer class to train; lower --min_answer_count")
    if len(trained_rows) < len(train_data.rows):
        log(f"train_csv: {len(train_data.rows) - len(trained_rows)} of {len(train_data.rows)} questions have no "
            f"answer given min_answer_count ({cfg.data.min_answer_count}) times; they are left out of training")
    train_data.rows = trained_rows

    class_weights = None  # read before the model is built: a bad file costs no time
    if cfg.data.answer_weights:
        table = load_answer_weights(cfg.data.answer_weights)
        if not any(a in table for a in answers.itos):
            raise VQAError(f"answer weights file '{cfg.data.answer_weights}' weighs none of the run's "
                           f"{len(answers)} answers (it has e.g. {preview(table)}, the run {preview(answers.itos)}); "
                           f"make it from this training CSV with python -m vqa.answer_weights")
        class_weights = torch.tensor([table.get(a, 1.0) for a in answers.itos], device=device)
    cpu_weights = class_weights.cpu() if class_weights is not None else None  # for the batches' loss shares

    backbone_file = run / "backbone.safetensors"
    from_random = random_backbone(cfg)
    if resume and from_random and not backbone_file.is_file():
        raise VQAError(missing_backbone(backbone_file))
    offline = ("on a machine without network, resume with --checkpoint_path PATH, a local copy of the hub's weights "
               "of this model, or fill the Hugging Face cache (HF_HOME) where there is network") if resume else None
    model = build_model(cfg, len(tokenizer), len(answers), str(backbone_file) if resume and from_random else None,
                        offline=offline)
    # The base weights' fingerprints: resume and prediction refuse a checkpoint_path since replaced or written over,
    # and weights other than those the run started from, wherever they come from (the hub's may change).
    base_sha256 = file_sha256(cfg.model.checkpoint_path) if cfg.model.checkpoint_path else None
    base_weights_sha256 = None if from_random else weights_sha256(model.backbone)  # before any training
    depth = len(model.backbone.blocks)
    if cfg.model.unfreeze_encoder_layers > depth:
        raise VQAError(f"config key 'unfreeze_encoder_layers' is {cfg.model.unfreeze_encoder_layers}, but "
                       f"{cfg.model.vision_model} has {depth} block{'s' if depth != 1 else ''}; give at most {depth}")
    model.freeze_pretrained(unfreeze_encoder_layers=cfg.model.unfreeze_encoder_layers)
    model.backbone.set_grad_checkpointing(cfg.model.grad_checkpointing)
    model.to(device)
    has_lora = any(True for _ in lora.lora_layers(model))
    if procs.is_main:
        lora.print_trainable_parameters(model, "LoRA" if has_lora else "no LoRA")
    # What the training step calls; evaluation and saving use the model itself. Under torchrun every
    # process starts from the main one's weights (DDP broadcasts them) and draws its own dropout masks.
    net = distributed.wrap(model, procs, device, unused=[] if t.use_type_loss else [model.type_head])
    if procs.enabled:
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(t.seed + 1_000_003 * procs.rank)

    transform = build_transform(model.backbone, cfg.model.img_size)
    train_set = VQADataset(train_data.rows, transform, tokenizer, answers)
    val_set = VQADataset(val_data.rows, transform, tokenizer, answers)
    if resume:
        check_same_images(len(train_set), state.get("train_images"), train_data, run, procs.world_size, cfg, saved)
    all_val_batches = chunks(list(range(len(val_set))), t.batch_size)
    val_batches = all_val_batches[procs.rank::procs.world_size]  # counts summed below
    val_rounds = math.ceil(len(all_val_batches) / procs.world_size)  # the most batches any process validates
    pin = device.type == "cuda"  # page-locked batches: host-to-GPU copies overlap with the GPU's work
    val_loader = make_loader(val_set, val_batches, t.num_workers, pin)

    optimizer = make_optimizer(model, cfg)
    # fp16's 5 exponent bits underflow small gradients: the loss is scaled up for backward, and the gradients down
    # before clipping; a step whose gradients overflowed is skipped (the fused AdamW kernel reads the verdict) and
    # the scale lowered. Disabled (bf16, fp32), the scaler passes everything through unchanged.
    precision = run_precision(device, t.precision, procs)
    if device.type == "cpu" and precision != "fp32":
        log(f"note: precision {precision} on the CPU runs far slower than fp32 where the CPU has no {precision} matrix "
            f"units (AMX; AVX-512 FP16): 30 times slower on a 2-core test machine; precision auto is fp32 there")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batches_per_epoch = len(distributed.shard(epoch_batches(len(train_set), t.batch_size, t.seed, 0), procs))
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum_steps)  # the last step may have fewer batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.epochs * steps_per_epoch, t.warmup_ratio))
    if not resume:
        if procs.is_main:
            run.mkdir(parents=True, exist_ok=True)  # the folder may not have existed at the start: lock it now
        take_run_lock(lock, run, procs, device)  # before deleting or writing anything: another new run may hold it
        # Looked at again under the lock: a run started here after the look above (the folder did not exist yet,
        # so nothing was locked) may have trained, and ended, while this one read its data.
        # --overwrite replaces the run it found at the start (``replaced``), not one that arrived since.
        arrived = [name for name in trained_files(run) if name not in replaced] if procs.is_main else []
        if distributed.max_over_ranks([int(bool(arrived))], procs, device)[0]:
            raise VQAError(f"{run} holds a run already ({', '.join(arrived) or 'trained files'}), one that another "
                           f"train.py trained there while this one read its data; continue it with --resume {run}, "
                           f"replace it with --overwrite, or choose another --output_dir")
    if not resume and procs.is_main:
        # Only now, with the data and every setting checked, so that a mistake leaves an earlier run as it was.
        # Nothing of one stays beside the new run: resume and predict would load its backbone or checkpoint.
        if replaced:
            print(f"note: replacing the run in {run} (--overwrite)")
        inputs = [cfg.model.checkpoint_path, cfg.data.answer_weights, cfg.data.train_csv, cfg.data.val_csv]
        remove_run(run, keep=inputs)  # an input may be an earlier run's file: it stays
        write_text(run / "config.yaml", cfg.with_absolute_paths().to_yaml())  # the same files from any folder
        write_text(run / "tokenizer.json", tokenizer.to_json())
        write_text(run / "answers.json", answers.to_json())
        if from_random:  # predict and resume rebuild this exact backbone from it
            lora.save_safetensors({k: v for k, v in model.backbone.state_dict().items() if "lora_" not in k},
                                  backbone_file)
    start_epoch, start_batch, best, step = 0, 0, -1.0, 0
    best_epoch = 0  # the epoch that reached ``best``
    ended_early = False  # a resumed run that early stopping had ended: nothing to train
    if resume:
        copy_weights(model, state["model"], run / "checkpoint.pt")
        if base_sha256 is not None:
            check_base_file(cfg.model.checkpoint_path, state.get("base_sha256"), run / "checkpoint.pt", base_sha256)
        if base_weights_sha256 is not None:
            check_base_weights(base_weights_sha256, state.get("base_weights_sha256"), run / "checkpoint.pt",
                               "resume with --checkpoint_path PATH")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # lr set equal to lr_encoder in config.yaml merges their groups, say
            raise VQAError(f"{run / 'checkpoint.pt'}: its optimizer state does not fit the parameter groups the run's "
                           f"config.yaml gives ({e}); was config.yaml edited? put its settings back") from None
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):  # an fp16 run's scale (none from a run in another precision)
            scaler.load_state_dict(state["scaler"])
        # Before 2026-11-29 a run trained in bf16 on any GPU.
        trained_in = state.get("precision", "bf16" if device.type == "cuda" else "fp32")
        if t.precision == "auto" and precision != trained_in:
            log(f"note: precision auto is {precision} here, and the run trained in {trained_in} until now; "
                f"--precision {trained_in} keeps that")
        # The optimizer kept the old schedule's last rate (0 once a run has finished); with --epochs the
        # schedule is another, so the next step takes the rate this one gives it.
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        set_rng_state(saved_rngs(state)[procs.rank])
        start_epoch, start_batch, best, step = state["epoch"], state["batch"], state["best"], state["step"]
        # A checkpoint from before 2026-11-29 has no best_epoch: the first logged epoch that reached the best.
        best_epoch = state["best_epoch"] if "best_epoch" in state else next(
            (record["epoch"] for record in history if record.get("accuracy") == best), start_epoch)
        if procs.is_main and best_epoch == start_epoch and restore_best(run, best_epoch):
            log(f"note: model_best.safetensors did not hold epoch {best_epoch}, the run's best (it was stopped before "
                f"writing it), so it is copied from model_last.safetensors, which does")
        if start_epoch == t.epochs:
            log(f"{run} has finished its {t.epochs} epoch{'s' * (t.epochs != 1)}, so there is nothing to train; to "
                f"train longer, add --epochs N with N > {t.epochs}")
        elif ended_early := not start_batch and stalled(start_epoch, best_epoch, t.early_stopping_patience):
            log(f"{run}'s validation accuracy has not risen above epoch {best_epoch}'s in the "
                f"{start_epoch - best_epoch} epochs since (early_stopping_patience {t.early_stopping_patience}), so "
                f"there is nothing to train; to train on, add --early_stopping_patience N with N > "
                f"{start_epoch - best_epoch}, or 0 to train every epoch")
        else:
            log(f"resuming {run} at epoch {start_epoch + 1}, batch {start_batch} (step {step})")
        if procs.is_main and (run / "steps.jsonl").exists():
            # Lines of steps after the checkpoint's (a run killed between a line and its checkpoint) are logged again.
            write_text(run / "steps.jsonl", "".join(json.dumps(r) + "\n" for r in step_log if r["step"] <= step))
        resolved = cfg.with_absolute_paths().with_paths_spelt_as(saved)
        if procs.is_main and resolved != saved:
            write_text(run / "config.yaml", resolved.to_yaml())  # the settings resumed with (--epochs, say) are its own

    # The current epoch's training seconds: those before a resume (or the epoch's end), and since when they
    # count on (None: stopped, for validation).
    clock: list = [0.0, None]
    # This process's sum of its steps' losses in the current epoch, and their number (those before a resume too).
    losses: list = [0.0, 0]
    # This process's sum of its steps' losses since the step log's last line, and their number (checkpointed too;
    # a checkpoint from before 2026-11-29 has none, so the first line after its resume covers the steps since).
    window: list = list(state.get("log_window_per_process", [[0.0, 0]] * procs.world_size)[procs.rank])

    def epoch_seconds() -> float:
        return clock[0] + (time.perf_counter() - clock[1] if clock[1] is not None else 0.0)

    def checkpoint(epoch: int, batch: int) -> None:
        # Every process's generators, epoch losses and losses since the step log's last line, in rank order.
        rngs, tallies, windows = zip(*distributed.gather((rng_state(), list(losses), list(window)), procs))
        if procs.is_main:
            save_checkpoint({
                "model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "precision": precision,
                "rng_per_process": list(rngs),
                "epoch": epoch, "batch": batch, "step": step, "best": best, "best_epoch": best_epoch,
                "base_sha256": base_sha256,
                "base_weights_sha256": base_weights_sha256,
                "train_images": len(train_set),  # resume refuses another count: the schedule and order hold it
                # The epoch's training so far, for its log: seconds, and each process's loss tally.
                "epoch_seconds": epoch_seconds() if batch else 0.0,
                "epoch_losses_per_process": list(tallies) if batch else [[0.0, 0]] * procs.world_size,
                "log_window_per_process": list(windows),
            }, run / "checkpoint.pt")
        distributed.barrier(procs)  # no process leaves (a stop) before the file is complete

    stop_signal: list[int] = []  # the signal this process got
    stopping: list[int] = []  # the signal every process stops on, once agreed

    def on_signal(signum, frame):
        if stop_signal and signum == signal.SIGINT:  # Ctrl-C after a signal: stop now (the last checkpoint is intact)
            raise KeyboardInterrupt
        if not stop_signal:  # a repeated SIGTERM (a scheduler and torchrun both passing it on) changes nothing
            stop_signal.append(signum)

    def signal_got() -> int:
        return stop_signal[0] if stop_signal else 0

    def agreed_signal() -> int:
        """The signal any process got (0: none), in every process."""
        return distributed.max_over_ranks([signal_got()], procs, device)[0]

    def batch_check(loss_value: float, epoch: int) -> int:
        """The batch's one collective: every process stops on a loss that is not finite anywhere, now, and learns of
        a signal that reached any of them, to stop on after this step; returns that signal (0: none)."""
        finite = math.isfinite(loss_value)
        not_finite_anywhere, signum = distributed.max_over_ranks([not finite, signal_got()], procs, device)
        if not_finite_anywhere:
            loss_text = "not finite in another process" if finite else loss_value
            fp16 = precision == "fp16"  # it holds no value above 65,504: activations beyond turn to inf, then NaN
            if (run / "checkpoint.pt").is_file():
                kept = f"{run / 'checkpoint.pt'} still holds the last good state"
                advice = "check the data, or start over with a lower --lr (--overwrite)"
                if fp16:
                    advice = (f"resume with --precision bf16 (on GPUs from Ampere on) or fp32, fp16 overflowing above "
                              f"65,504; or {advice}")
            else:
                kept = "no checkpoint had been written yet"
                advice = "check the data, or start again with --overwrite and a lower --lr" + (
                    " or --precision bf16 (on GPUs from Ampere on) or fp32" if fp16 else "")
            raise VQAError(f"loss is {loss_text} at epoch {epoch + 1}, step {step + 1}; stopped without saving, so "
                           f"{kept}. To go on: {advice}")
        return signum

    def log_steps(epoch: int, lr_factor: float) -> None:
        """A line of steps.jsonl: the mean loss of every process's steps since the last line (their tallies summed, in
        one small all-reduce that every process makes at the same step), and the learning rates the step took."""
        total, count = distributed.sum_over_ranks(torch.tensor(window, dtype=torch.float64), procs, device).tolist()
        window[:] = [0.0, 0]
        if procs.is_main:  # appended; a resume cuts a line a kill cut short, and lines after its checkpoint
            record = {"step": step, "epoch": epoch + 1, "loss": total / count, "lr": t.lr * lr_factor,
                      "lr_encoder": t.lr_encoder * lr_factor}
            with open(run / "steps.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def stop_on(signum: int, epoch: int, batch: int) -> None:
        """Checkpoints and exits on ``signum`` (0: goes on), a value every process holds: all processes stop at
        the same step, whichever of them got the signal."""
        if signum:
            # From here a SIGTERM (a repeat, or torchrun's to the processes still running) must not kill the
            # process, during the save or the exit (Python resets its own handlers then): ignored at the OS
            # level, it cannot.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stopping.append(signum)
            checkpoint(epoch, batch)
            log(f"\n{signal.Signals(signum).name}: checkpoint saved at step {step}; "
                f"continue with: {train_command('--resume', str(run), processes=procs.world_size)}")
            sys.exit(128 + signum)

    def stoppable(loader):
        """The validation batches, with a training step's stop check after each: a long validation must not
        outlast the grace a launcher gives after its SIGTERM (torchrun's --shutdown_timeout, 30 s by default)
        before it sends SIGKILL. Every process checks ``val_rounds`` times, so the collectives pair up."""
        batches = iter(loader)
        for _ in range(val_rounds):
            batch = next(batches, None)  # None: this process has fewer batches, but answers the others' checks
            if batch is not None:
                yield batch
            if signum := agreed_signal():
                raise _Stopped(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics = {}
    try:
        for epoch in range(start_epoch, start_epoch if ended_early else t.epochs):
            model.train()
            batches = distributed.shard(epoch_batches(len(train_set), t.batch_size, t.seed, epoch), procs)
            done = start_batch if epoch == start_epoch else 0
            loader = make_loader(train_set, batches[done:], t.num_workers, pin)
            # A step is grad_accum_steps batches (a resume starts at a step's first). The bar counts steps, each once it
            # is taken, so that the line a stop prints shows the step it saved.
            bar = tqdm(total=math.ceil(len(batches) / t.grad_accum_steps), initial=math.ceil(done / t.grad_accum_steps),
                       desc=f"epoch {epoch + 1}/{t.epochs}", disable=not t.progress or not procs.is_main,
                       dynamic_ncols=True)
            tic, seen = time.perf_counter(), 0
            clock[:] = [state.get("epoch_seconds", 0.0) if resume and epoch == start_epoch else 0.0, tic]
            # A run checkpointed before the tally was kept (2026-11-29) logs the loss of the steps since its resume.
            before = state.get("epoch_losses_per_process") if resume and epoch == start_epoch else None
            losses[:] = before[procs.rank] if before else [0.0, 0]
            i = done  # the epoch's batches trained so far
            for group in groups_of(loader, t.grad_accum_steps):
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for batch, (answer_share, type_share) in zip(group, loss_shares(group, cpu_weights)):
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    with autocast(device, precision):
                        out = net(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                  batch["image_index"])
                        loss = answer_share * answer_loss(out.logits, batch, class_weights)
                        if t.use_type_loss:
                            type_loss = F.cross_entropy(out.type_logits.float(), batch["question_type"])
                            loss = loss + t.type_loss_weight * type_share * type_loss
                    loss_value = loss.item()  # the batch's one wait for the GPU; backward and the update queue behind it
                    signum = batch_check(loss_value, epoch)
                    # Under DDP every batch's backward averages the gradients over the processes, onto what the
                    # step's batches before it left: the sum is the same, and no_sync, which would save those
                    # all-reduces, breaks with static_graph (pytorch#187732).
                    scaler.scale(loss).backward()
                    step_loss += loss_value
                    seen += len(batch["answer"])
                if t.grad_clip:
                    scaler.unscale_(optimizer)  # clip the true gradients
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                lr_factor = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]  # the step's
                scheduler.step()
                step += 1
                i += len(group)
                losses[0] += step_loss
                losses[1] += 1
                if t.log_every:  # a log turned on at a resume starts from there
                    window[0] += step_loss
                    window[1] += 1
                rate = questions_per_second(seen, time.perf_counter() - tic, procs)
                bar.set_postfix(loss=f"{step_loss:.3f}", q_per_s=f"{rate:.0f}", refresh=False)
                bar.update()
                if t.log_every and step % t.log_every == 0:
                    log_steps(epoch, lr_factor)
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    checkpoint(epoch, i)
                stop_on(signum, epoch, i)
            bar.close()
            seconds = epoch_seconds()  # with the part trained before a resume
            clock[:] = [seconds, None]
            # A signal that came during the epoch's last update stops here, not after the whole validation.
            stop_on(agreed_signal(), epoch, len(batches))
            # Each process evaluates its share of the validation batches, with the main process's BatchNorm
            # statistics (the ones saved); the counts are summed over all.
            distributed.sync_buffers(model, procs)
            try:
                metrics = evaluate(model, stoppable(val_loader), device,
                                   lambda n: distributed.sum_over_ranks(n, procs, device), losses=True,
                                   class_weights=class_weights, precision=precision)
            except _Stopped as stop:  # the epoch's training is saved; resume validates it again
                stop_on(stop.signum, epoch, len(batches))
            total, count = distributed.sum_over_ranks(torch.tensor(losses, dtype=torch.float64), procs, device).tolist()
            # The mean of every process's step losses (each the loss a step optimised, with the type loss).
            # Left out where a checkpoint from before the tally (2026-11-29) resumed at the epoch's end: no step of
            # it ran here, and the ones before were not counted.
            logged = {"train_loss": total / count} if count else {}
            # The loss training optimises, over the validation set as one batch (none where it has no known answer).
            val_loss, type_loss = metrics.pop("answer_loss", None), metrics.pop("type_loss", None)
            if val_loss is not None:
                val_loss += t.type_loss_weight * type_loss if t.use_type_loss else 0.0
                logged.update({"val_loss": val_loss} if math.isfinite(val_loss) else {})  # JSON has no NaN
            metrics.update(epoch=epoch + 1, step=step, **logged, train_seconds=round(seconds, 2))
            is_best = metrics["accuracy"] > best
            if is_best:
                best, best_epoch = metrics["accuracy"], epoch + 1
            if procs.is_main:
                # A run killed after this write and before its checkpoint repeats the epoch: one line per epoch.
                history = [record for record in history if record["epoch"] <= epoch] + [metrics]
                write_text(run / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))
                meta = {"epoch": str(epoch + 1), "val_accuracy": f"{metrics['accuracy']:.6f}",
                        **({"base_sha256": base_sha256} if base_sha256 else {}),
                        **({"base_weights_sha256": base_weights_sha256} if base_weights_sha256 else {})}
                weights = model.trainable_state_dict()

                def save_weights(tag: str) -> None:
                    lora.save_safetensors(weights, run / f"model_{tag}.safetensors", meta)
                    if has_lora:
                        # Keyed as the timm backbone, so that lora.load_adapter fits it to timm.create_model(...).
                        lora.save_adapter(model.backbone, run / f"adapter_{tag}.safetensors",
                                          {**meta, "model": cfg.model.vision_model, "img_size": str(cfg.model.img_size),
                                           "vision_kwargs": vision_kwargs_record(cfg.model.vision_kwargs)})
                save_weights("last")
            checkpoint(epoch + 1, 0)
            if procs.is_main and is_best:
                # After the checkpoint that makes this epoch the best: written before it, a kill between the two left
                # model_best holding an epoch the resume trains again, perhaps to another accuracy. A kill here leaves
                # model_last holding it, which the resume copies (restore_best).
                save_weights("best")
            if procs.is_main:  # said once saved: a stdout that is gone (`| head`, a closed terminal) loses nothing
                said = "".join(f"{name.replace('_', ' ')} {logged[name]:.4f}, " for name in ("train_loss", "val_loss")
                               if name in logged)
                print(f"epoch {epoch + 1}: {said}val accuracy {100 * metrics['accuracy']:.2f}% ({seconds:.0f} s "
                      f"training)")
            stop_on(agreed_signal(), epoch + 1, 0)
            if epoch + 1 < t.epochs and stalled(epoch + 1, best_epoch, t.early_stopping_patience):
                # Every process holds the same accuracies (their counts summed), so all of them stop here.
                log(f"early stopping: validation accuracy has not risen above epoch {best_epoch}'s "
                    f"{100 * best:.2f}% in {epoch + 1 - best_epoch} epochs (early_stopping_patience "
                    f"{t.early_stopping_patience}); model_best.safetensors holds epoch {best_epoch}")
                break
    finally:
        for s, handler in previous.items():
            if not (stopping and s == signal.SIGTERM):  # stopping on a signal leaves SIGTERM ignored (above)
                signal.signal(s, handler)
        # Free the DDP wrapper before main tears down its process group: the other order can deadlock (torch
        # 2.11, gloo).
        del net

    skipped = len(train_data.skipped) + len(val_data.skipped)
    if skipped:
        log(f"skipped {skipped} bad row(s) (--skip_bad_rows)")
    if metrics:
        # The last epoch's table; the tools load the best epoch's weights by default.
        last = metrics["epoch"]
        which = ("the best" if best_epoch == last
                 else f"the last; model_best holds epoch {best_epoch}'s, {100 * best:.2f}%")
        log(f"\nvalidation accuracy of epoch {last} ({which}):")
        log(format_accuracy_table(metrics))
        log(next_steps(run, cfg.data.val_csv))
    return metrics


def next_steps(run: Path, val_csv: str) -> str:
    """The tools that read a finished run, as commands to copy."""
    commands = [["evaluate", "--csv", val_csv], ["predict", "--image", "IMAGE", "--question", "QUESTION"],
                ["export", "--out", str(run / "encoder.safetensors")]]
    return f"\nthe run is in {run}; next:" + "".join(
        f"\n  {shlex.join(['python', '-m', f'vqa.{tool}', '--run', str(run), *args])}" for tool, *args in commands)


def check_config_outside_run(config: Path | None, run: Path) -> None:
    """Refuses a hand-written ``--config`` kept where the run writes its own config.yaml, which would replace it.
    A run's own file (its text the config it resolves to, as train.py writes it: the restart advice's --config
    RUN/config.yaml) may be given, also one a version with fewer keys wrote."""
    written = run / "config.yaml"
    if config is None or written.resolve() != config.resolve():
        return
    text = config.read_text(encoding="utf-8")
    resolved, given = load_config(config, []).to_dict(), yaml.safe_load(text) or {}
    # The resolved config cut to the keys the file holds, in the order train.py writes them: the file again, only
    # where train.py wrote it (no comments, no other order or spelling).
    kept = {section: {k: v for k, v in values.items() if k in given[section]}
            for section, values in resolved.items() if isinstance(given.get(section), dict)}
    if text == yaml.safe_dump(kept, sort_keys=False):
        return  # a run's own config.yaml, written by train.py: rewriting it changes nothing the user wrote
    raise VQAError(f"--config '{config}' is where the run in output_dir '{run}' writes its own config.yaml, which "
                   f"would replace yours (comments and all); keep your config outside the run folder, e.g. "
                   f"configs/, or choose another --output_dir")


def config_keys_help() -> str:
    """The config keys, laid out as argparse lays out options, for the end of ``--help``: train.py parses them itself
    (``load_config``), so they are listed by a parser of their own that never parses."""
    listing = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    for section, keys in key_help().items():
        group = listing.add_argument_group(f"config keys, section {section}")
        for name, metavar, text in keys:
            group.add_argument(f"--{name}", metavar=metavar, help=text.replace("%", "%%"))  # argparse's % formatting
    intro = ("Each config key below overrides the config file's value: --key VALUE, --key=VALUE or --section.key "
             "VALUE (a true/false key alone means true). A default holds where neither sets the key.")
    return help_paragraph(intro) + "\n\n" + listing.format_help()


def help_paragraph(text: str) -> str:
    """``text`` wrapped to the terminal's width as argparse wraps its help (11 columns at the least)."""
    return textwrap.fill(text, max(shutil.get_terminal_size().columns - 2, 11))


class _HelpWithKeys(argparse.Action):
    """``-h``/``--help``: argparse's help, ending with the config keys, read only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.epilog = config_keys_help()
        parser.print_help()
        parser.exit()


def cli(argv: list[str] | None = None) -> int:
    # Raw: the keys' listing is laid out already; the texts are wrapped as argparse wraps its own.
    parser = argparse.ArgumentParser(description=help_paragraph(__doc__.splitlines()[0]), add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action=_HelpWithKeys, help="show this help message, then the config keys, "
                                                                    "and exit")
    parser.add_argument("--config", type=user_path, help="YAML config, e.g. configs/demo.yaml")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", type=user_path, metavar="RUN_DIR", help="continue the run in this folder")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run even where output_dir holds one, deleting that run's files")
    parser.add_argument("--print_config", "--print-config", action="store_true",
                        help="print the config this command would train with (the file, or the run's, and the "
                             "overrides, checked) as YAML, a file for --config, and exit")
    args, overrides = parser.parse_known_args(argv)
    if not (args.config or args.resume or overrides):
        # Nothing asked for: the defaults alone would start a 10-epoch ViT-S run at 224 px in runs/demo.
        parser.error("nothing to train: give --config (the demo: python train.py --config configs/demo.yaml), "
                     "--resume RUN_DIR, or --key value settings to apply to the defaults")
    if args.resume and args.config:
        parser.error("--resume continues with the run's own config.yaml, so --config cannot be given with it; "
                     "override single settings instead (e.g. --epochs 20)")
    keys = [w[2:].split("=")[0].rpartition(".")[2].replace("-", "_") for w in overrides if w.startswith("--")]
    if args.resume and "output_dir" in keys:  # any spelling: the --output_dir appended below would win
        parser.error(f"--resume continues the run in {args.resume}, so --output_dir cannot be given with it; to "
                     f"continue a copy elsewhere, copy the folder and resume the copy")
    cfg = None
    try:
        if args.resume:
            if not (args.resume / "config.yaml").is_file():
                raise VQAError(f"'{args.resume}' is not a run folder (it has no config.yaml); --resume takes the "
                               f"output_dir of a run train.py started")
            cfg = load_config(args.resume / "config.yaml", overrides + ["--output_dir", str(args.resume)])
            if args.print_config:  # as the resume would refuse it (main checks this and more before training)
                check_resumable(cfg, load_config(args.resume / "config.yaml", []), args.resume / "config.yaml")
        else:
            cfg = load_config(args.config, overrides)
            if not args.print_config:  # printing writes nothing: no config.yaml of yours can be replaced
                check_config_outside_run(args.config, Path(cfg.train.output_dir))
        if args.print_config:
            if os.environ.get("RANK", "0") == "0":  # one copy, not one per torchrun process
                print(cfg.to_yaml(), end="")
            return 0
        main(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except KeyboardInterrupt:  # a Ctrl-C after a first signal (which would stop at a checkpoint), or before training
        message = "error: interrupted, so stopped at once"
        state = Path(cfg.train.output_dir) / "checkpoint.pt" if cfg else None
        if state and state.is_file():
            resume = train_command("--resume", cfg.train.output_dir, processes=int(os.environ.get("WORLD_SIZE", 1)))
            message += f"; {state} holds the last checkpoint: continue with {resume}"
        if os.environ.get("RANK", "0") == "0":  # one line, not one per torchrun process
            print(message, file=sys.stderr)
        return 128 + signal.SIGINT
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # Under torchrun, an error only one process meets (the main process alone writes the run folder; an image
        # may turn unreadable mid-run) ends that process, and every other then fails in its next collective.
        broke = distributed.lost_contact(e) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None
        if broke is None:
            raise  # this process's own fault: its traceback says where
        print(f"error: training process {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']} lost contact "
              f"with another, which most likely failed or was killed ({broke}); that process's error says why "
              f"(torchrun's report lists the processes that failed)", file=sys.stderr)
        return 2
    except OSError as e:
        folders = [] if cfg is None else [Path(cfg.train.output_dir)] + (
            [Path(cfg.data.train_csv).parent] if cfg.data.synthetic else [])
        if not e.filename or not any(Path(e.filename).resolve().is_relative_to(f.resolve()) for f in folders):
            if (message := unreachable(e)) is None:
                raise  # no file named, or one read elsewhere: its own error says what it is
            print(f"error: {message}", file=sys.stderr)  # a path given, inside a folder closed to the user
            return 2
        # A folder the run writes that cannot be made or written to (read-only, under a file), a full disk. The
        # files read there raise their own errors; one that exists may still be a read this did not foresee.
        verb = "read or write" if os.path.exists(e.filename) else "write"
        print(f"error: cannot {verb} '{e.filename}': {e.strerror or e}; check that output_dir (and, with synthetic "
              f"on, the data folder) can be made and written to, or choose other ones", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_tool(cli)
