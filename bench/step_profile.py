"""Where a training step's time goes: wall time against the time the GPU is busy, per training variant.

    python bench/step_profile.py [--model vit_base_patch14_dinov2] [--img-size 224] [--batch-size 64]
                                 [--rounds 16] [--steps 5] [--device auto] [--table 25]

Times the variants of ``bench/throughput.py`` (frozen floor, LoRA with and without dropout, full
fine-tuning) interleaved, then profiles a few steps of each with ``torch.profiler``. On CUDA it prints,
per step, the wall time, the summed kernel time, and their difference: time the GPU waited for the
CPU to issue work (Python, autograd, kernel launches). With ``--table N``, the N operators and kernels
that took the most time. On the CPU, where nothing runs asynchronously, only the wall time and the table.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from throughput import build, device_arg, interleaved, sync, train_step, training_setup
from vqa.evaluate import at_least

VARIANTS = ("frozen_floor", "lora_r8_dropout0.1", "lora_r8_dropout0", "full_finetune")


def gpu_busy_ms(events, steps: int) -> float:
    """Milliseconds per step the GPU ran kernels (and copies): the self time of the events on the device.

    A user annotation on the device (``Optimizer.step#AdamW.step``) spans kernels already counted, so it is
    left out, as the profiler's own table leaves it out of its total."""
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
    return busy / (steps * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch14_dinov2")
    parser.add_argument("--img-size", type=at_least(1), default=224)
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--rounds", type=at_least(1), default=16, help="interleaved timing rounds (a multiple of 4)")
    parser.add_argument("--steps", type=at_least(1), default=5, help="steps profiled per variant")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--table", type=at_least(0), default=0, help="rows of the profiler's table per variant")
    args = parser.parse_args()
    device = device_arg(parser, args.device)
    base = build(args.model, args.img_size, device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    setups = {v: training_setup(base, v) for v in VARIANTS}

    def step(variant: str) -> None:
        train_step(*setups[variant], x)  # autocast (precision auto) around the forward, as train.py runs it

    for v in VARIANTS:  # warm-up: allocator, kernels' first calls, optimizer state
        for _ in range(3):
            step(v)
    times = interleaved({v: (lambda v=v: step(v)) for v in VARIANTS}, args.rounds, device)
    print(f"{args.model} @ {args.img_size}px, batch {args.batch_size}, {device}, {args.rounds} rounds, "
          f"{args.steps} steps profiled")
    cuda = device.type == "cuda"
    for v in VARIANTS:
        wall = statistics.median(times[v]) * 1e3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step(v)
            sync(device)
        events = prof.key_averages()
        line = f"  {v:<20} wall {wall:7.2f} ms/step"
        if cuda:
            busy = gpu_busy_ms(events, args.steps)
            line += f"   GPU busy {busy:7.2f} ms   GPU waiting {wall - busy:6.2f} ms ({1 - busy / wall:.0%})"
        print(line)
        if args.table:
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            print(events.table(sort_by=key, row_limit=args.table, max_name_column_width=60))


if __name__ == "__main__":
    main()
