"""Inference and training throughput of LoRA variants against their references, measured in one process.

    python bench/throughput.py [--model vit_small_patch14_dinov2] [--img-size 98] [--batch-size 16]
                               [--rounds 24] [--device auto] [--json OUT]

Variants run interleaved, each round in another order, so drift of the machine (heat, other load) hits
them alike, and each variant runs after every other equally often (``balanced_orders``); each number is
the median over rounds of a per-round ratio, printed with the interquartile range of those ratios (how far the machine's noise reaches within the run). References: inference against the
base timm model, training steps (forward + backward + AdamW) against full fine-tuning, with a frozen
model's backward pass through every block (``frozen_floor``) as the floor adapters could reach. Every
variant uses torch's default AdamW but ``full_finetune_fused``: full fine-tuning with
``AdamW(fused=True)``, the kernel ``train.py`` uses, which makes one pass over each weight instead of a
dozen and so shrinks the optimizer's share of the reference step. Peak
training memory is measured fairly per device: CUDA's max_memory_allocated, or on CPU, for each variant
in a subprocess of its own, its peak RSS (VmHWM, reset after the model is built) minus its RSS before
the first step. Merge and unmerge are timed over all adapters of ViT-B/14.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import timm
import torch
from torch import nn

import lora
from vqa.cli import user_path
from vqa.errors import VQAError
from vqa.evaluate import at_least, autocast, pick_device  # precision auto, as the trainer runs (no loss scaling here)
from vqa.run_files import write_text

INFERENCE = ("base", "lora_unmerged", "lora_merged", "lora_removed")
TRAINING = ("lora_r8_dropout0.1", "lora_r8_dropout0", "last3_unfrozen", "full_finetune", "full_finetune_fused",
            "frozen_floor")
MEMORY = tuple(v for v in TRAINING if v != "full_finetune_fused")  # the fused kernel keeps the same state


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, img_size: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=0, img_size=img_size).to(device)


def adapted(base: nn.Module, r: int = 8, dropout: float = 0.0, copy_base: bool = True) -> nn.Module:
    model = copy.deepcopy(base) if copy_base else base
    lora.inject_lora(model, r=r, dropout=dropout)
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.01)  # a trained adapter: B = 0 would make the branch trivially cheap
    return model


def inference_models(base: nn.Module) -> dict[str, nn.Module]:
    merged = adapted(base)
    lora.merge_lora(merged)
    removed = adapted(base)
    lora.remove_lora(removed, merge=True)
    return {"base": base, "lora_unmerged": adapted(base), "lora_merged": merged, "lora_removed": removed}


def training_setup(base: nn.Module, variant: str, copy_base: bool = True):
    """Returns (model, optimizer) for one training variant, built on a copy of ``base`` (or on ``base``).

    ``frozen_floor`` is no variant anyone trains: every weight frozen and no adapter, with the gradient
    forced through all blocks from the patch embedding. It is the least a step that back-propagates
    through every block can cost, the floor for any adapter method (its optimizer is None).
    ``full_finetune_fused`` is ``full_finetune`` with torch's fused AdamW kernel."""
    if variant not in TRAINING:  # a misspelt name would otherwise measure full fine-tuning under it
        raise ValueError(f"unknown training variant {variant!r}; the variants are {', '.join(TRAINING)}")
    if variant == "frozen_floor":
        model = (copy.deepcopy(base) if copy_base else base).requires_grad_(False).train()
        model.patch_embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return model, None
    if variant.startswith("lora"):
        model = adapted(base, dropout=0.1 if variant.endswith("0.1") else 0.0, copy_base=copy_base)
        lora.mark_only_lora_as_trainable(model)
    else:
        model = copy.deepcopy(base) if copy_base else base
        if variant == "last3_unfrozen":
            model.requires_grad_(False)
            for block in list(model.blocks[-3:]) + [model.norm]:
                block.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=variant == "full_finetune_fused" or None)


def train_step(model: nn.Module, optimizer, x: torch.Tensor) -> None:
    with autocast(x.device):  # forward and loss in precision auto, as train.py runs them; backward and step outside
        loss = model(x).float().pow(2).mean()
    if optimizer is None:  # frozen_floor: the backward pass alone
        loss.backward()
        return
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` variants in which each follows every other equally often (a Williams design: the
    first order 0, 1, n-1, 2, n-2, ..., then its rotations, and for odd ``n`` their reverses too). A plain
    rotation keeps one cyclic order, so each variant always runs right after the same one; on this CPU a
    step runs slower just after some others (after a large GEMM), which would tilt that variant's ratio."""
    # Balanced within rounds; the junction between two rounds (one round's last, the next one's first) adds
    # one pair a round, for even n the same n pairs every n rounds (a carry-over 1/n of the rotation's); for
    # odd n the cycle is 2n rounds and a junction may repeat a variant.
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low if len(first) % 2 else high)
        low, high = (low + 1, high) if len(first) % 2 == 0 else (low, high - 1)
    orders = [[(v + shift) % n for v in first] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


def interleaved(fns: dict[str, callable], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, per round, each round in the next of ``balanced_orders`` (balanced
    over every ``len(balanced_orders(len(fns)))`` rounds)."""
    names = list(fns)
    orders = balanced_orders(len(names))
    times = {n: [] for n in names}
    for r in range(rounds):
        for i in orders[r % len(orders)]:
            sync(device)
            t0 = time.perf_counter()
            fns[names[i]]()
            sync(device)
            times[names[i]].append(time.perf_counter() - t0)
    return times


def ratios(times: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Per variant, the median over rounds of (reference time / variant time), > 1 meaning faster than the
    reference, and the interquartile range of those per-round ratios: how far one run's noise reaches."""
    return {n: summary([r / t for r, t in zip(times[reference], ts)]) for n, ts in times.items()}


def summary(values: list[float]) -> dict:
    """The median of ``values`` and their interquartile range (25th to 75th percentile)."""
    # "inclusive" interpolates between the values themselves; the default ("exclusive") extrapolates
    # past the smallest and largest of a few rounds (2 rounds: a quarter of their gap beyond each).
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "iqr": [q1, q3]}


def shown(median: float, iqr: list[float], fmt: str = ".3f", unit: str = "") -> str:
    """A ratio with its spread: ``0.974 (IQR 0.968 to 0.981)``."""
    return f"{median:{fmt}}{unit} (IQR {iqr[0]:{fmt}}{unit} to {iqr[1]:{fmt}}{unit})"


def bench_inference(args, device) -> dict:
    base = build(args.model, args.img_size, device).eval()
    models = inference_models(base)
    x = torch.randn(args.infer_batch_size, 3, args.img_size, args.img_size, device=device)

    def run(model):
        def call():
            with torch.inference_mode(), autocast(device):
                model(x)
        return call

    fns = {n: run(m) for n, m in models.items()}
    interleaved(fns, args.warmup, device)
    times = interleaved(fns, args.rounds, device)
    rel = ratios(times, "base")
    return {n: {"images_per_s": args.infer_batch_size / statistics.median(times[n]),
                "ratio_to_base": rel[n]["median"], "ratio_iqr": rel[n]["iqr"], "round_seconds": times[n]}
            for n in models}


def bench_training(args, device) -> dict:
    base = build(args.model, args.img_size, device)
    setups = {v: training_setup(base, v) for v in TRAINING}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    fns = {v: (lambda v=v: train_step(*setups[v], x)) for v in TRAINING}
    interleaved(fns, args.warmup, device)
    times = interleaved(fns, args.rounds, device)
    rel = ratios(times, "full_finetune")
    # Dropout's cost: step time with dropout over step time without, per round.
    dropout = summary([a / b - 1 for a, b in zip(times["lora_r8_dropout0.1"], times["lora_r8_dropout0"])])
    result = {v: {"images_per_s": args.batch_size / statistics.median(times[v]),
                  "ratio_to_full": rel[v]["median"], "ratio_iqr": rel[v]["iqr"], "round_seconds": times[v]}
              for v in TRAINING}
    result["dropout_cost"], result["dropout_cost_iqr"] = dropout["median"], dropout["iqr"]
    fused = ratios(times, "full_finetune_fused")  # the reference as train.py would run it
    result["ratio_to_fused_full"] = {v: fused[v] for v in ("lora_r8_dropout0.1", "lora_r8_dropout0", "frozen_floor")}
    return result


def memory_growth(args, variant: str, device: torch.device) -> float:
    """Bytes the first training steps add on top of the built model (in this process)."""
    # No copy of the model: a copy would set a max-RSS high-water mark before training starts.
    model, optimizer = training_setup(build(args.model, args.img_size, device), variant, copy_base=False)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        # Reset the kernel's peak-RSS mark (VmHWM): otherwise the import of torch's libraries, not
        # training, may hold the peak.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _status_bytes("VmRSS")
    for _ in range(3):
        train_step(model, optimizer, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - start)
    return float(_status_bytes("VmHWM") - start)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def bench_memory(args, device) -> dict:
    growth = {}
    for variant in MEMORY:
        if device.type == "cuda":
            growth[variant] = memory_growth(args, variant, device)
            torch.cuda.empty_cache()
        else:  # a fresh process per variant: max RSS never goes down within one
            cmd = [sys.executable, __file__, "--memory-child", variant, "--model", args.model,
                   "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--device", "cpu"]
            child = subprocess.run(cmd, capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"error: the memory measurement of {variant} failed (exit {child.returncode}):\n"
                         f"{child.stderr[-3000:]}")
            growth[variant] = float(child.stdout.split()[-1])
    full = growth["full_finetune"]
    return {v: {"growth_mib": g / 2**20, "ratio_to_full": g / full if full > 0 else float("nan")}
            for v, g in growth.items()}


def bench_merge(args, device) -> dict:
    """Merge and unmerge of every adapter in ViT-B/14 (12 fused qkv layers, q/k/v adapters each)."""
    base = build("vit_base_patch14_dinov2", 224, device)
    model = adapted(base)
    del base
    fns = {"merge": lambda: lora.merge_lora(model), "unmerge": lambda: lora.unmerge_lora(model)}
    times = {"merge": [], "unmerge": []}
    for _ in range(args.warmup + args.rounds):
        for n in ("merge", "unmerge"):  # alternate: each merge needs the unmerge before it
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(ts[args.warmup:]) * 1e3 for n, ts in times.items()}
    # The first merge allocates the merged weights; later ones reuse that memory (see LoRALinear.merge).
    return {"merge_ms": med["merge"], "unmerge_ms": med["unmerge"], "total_ms": med["merge"] + med["unmerge"],
            "first_merge_ms": times["merge"][0] * 1e3}


def device_arg(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as ``pick_device`` reads it; a bad one is a usage error (exit 2), as in the project's tools."""
    try:
        return pick_device(name)
    except VQAError as e:
        parser.error(str(e))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=at_least(1), default=98)
    parser.add_argument("--batch-size", type=at_least(1), default=16, help="training batch")
    parser.add_argument("--infer-batch-size", type=at_least(1), default=None, help="default: the training batch")
    parser.add_argument("--rounds", type=at_least(1), default=24,
                        help="timed rounds; a multiple of 12 balances the orders of every section")
    parser.add_argument("--warmup", type=at_least(1), default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=("inference", "training", "memory", "merge"), action="append")
    parser.add_argument("--json", type=user_path)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.infer_batch_size is None:
        args.infer_batch_size = args.batch_size
    device = device_arg(parser, args.device)
    if args.memory_child:
        print(memory_growth(args, args.memory_child, device))
        return
    sections = args.only or ["inference", "training", "memory", "merge"]
    report = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
              "infer_batch_size": args.infer_batch_size, "device": str(device), "device_name": device_name(device),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "warmup": args.warmup,
              "torch": torch.__version__}
    infer = f" (inference {args.infer_batch_size})" if args.infer_batch_size != args.batch_size else ""
    print(f"{args.model} @ {args.img_size}px, batch {args.batch_size}{infer}, {device} ({report['device_name']}), "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians of per-round ratios)")
    if "inference" in sections:
        report["inference"] = bench_inference(args, device)
        for n, r in report["inference"].items():
            ratio = shown(r["ratio_to_base"], r["ratio_iqr"])
            print(f"  inference {n:<22}{r['images_per_s']:>9.1f} img/s   x{ratio} of base")
    if "training" in sections:
        report["training"] = bench_training(args, device)
        for n in TRAINING:
            r = report["training"][n]
            ratio = shown(r["ratio_to_full"], r["ratio_iqr"])
            print(f"  train     {n:<22}{r['images_per_s']:>9.1f} img/s   x{ratio} of full fine-tuning")
        t = report["training"]
        cost = shown(100 * t["dropout_cost"], [100 * q for q in t["dropout_cost_iqr"]], "+.1f", "%")
        print(f"  dropout 0.1 adds {cost} to the LoRA step time")
        for n, r in t["ratio_to_fused_full"].items():
            print(f"  against full fine-tuning with fused AdamW: {n:<19}x{shown(r['median'], r['iqr'])}")
    if "memory" in sections:
        report["memory"] = bench_memory(args, device)
        for n, r in report["memory"].items():
            print(f"  memory    {n:<22}{r['growth_mib']:>9.1f} MiB   x{r['ratio_to_full']:.3f} of full fine-tuning")
    if "merge" in sections:
        report["merge"] = bench_merge(args, device)
        m = report["merge"]
        print(f"  ViT-B/14 merge {m['merge_ms']:.2f} ms + unmerge {m['unmerge_ms']:.2f} ms = {m['total_ms']:.2f} ms "
              f"(first merge, allocating: {m['first_merge_ms']:.2f} ms)")
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")


def device_name(device: torch.device) -> str:
    """What ran the benchmark, for the report: the GPU's name, or the CPU's core count and architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {platform.machine()} CPU"


if __name__ == "__main__":
    main()
