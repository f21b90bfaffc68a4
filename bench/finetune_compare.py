"""Frozen encoder vs LoRA r=8 vs last 3 blocks unfrozen, trained with the same budget on the demo data.

    python bench/finetune_compare.py [--config configs/demo.yaml] [--out runs/compare] [--seeds 0 1 2] [--json OUT]

Runs ``train.py`` once per variant and seed (one after another: they must not share the CPU) and prints a
table of trainable parameters, validation accuracy overall and per question type (last epoch), and
seconds of training per epoch. Several seeds show how much the result depends on the random draw
(initialisation, data order, dropout masks).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from vqa.cli import user_path
from vqa.run_files import write_text

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "frozen encoder": ["--use_vision_lora", "false", "--unfreeze_encoder_layers", "0"],
    "LoRA r=8": ["--use_vision_lora", "true", "--vision_lora_r", "8"],
    "last 3 blocks unfrozen": ["--use_vision_lora", "false", "--unfreeze_encoder_layers", "3"],
}
TYPES = ("color", "shape", "location", "count", "yes/no")


def run_variant(config: Path, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--output_dir", str(out),
           "--progress", "false", "--overwrite", *args]  # a rerun replaces this benchmark's own runs
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: train.py exited {result.returncode} for {out.name}:\n{result.stderr[-3000:]}")
    text = result.stdout
    trainable = int(re.search(r"Trainable: ([\d,]+)", text).group(1).replace(",", ""))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = epochs[-1]
    return {
        "trainable": trainable,
        "accuracy": last["accuracy"],
        "per_type": {t: last["per_type"][t]["accuracy"] for t in TYPES if t in last["per_type"]},
        "seconds_per_epoch": statistics.median(e["train_seconds"] for e in epochs),
        "epochs": len(epochs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=user_path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--out", type=user_path, default=ROOT / "runs" / "compare")
    parser.add_argument("--only", action="append", choices=list(VARIANTS))
    parser.add_argument("--json", type=user_path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per variant and seed")
    args = parser.parse_args()
    # train.py runs in the project's folder: paths given relative to the caller's must reach it whole.
    args.config, args.out = args.config.resolve(), args.out.resolve()
    results = {}
    for name in args.only or VARIANTS:
        for seed in args.seeds:
            out = args.out / (re.sub(r"\W+", "_", name) + f"_seed{seed}")
            results.setdefault(name, {})[seed] = run_variant(args.config, out, [*VARIANTS[name], "--seed", str(seed)])
            print(f"done: {name}, seed {seed}", file=sys.stderr)
    header = f"| variant | seed | trainable | overall | {' | '.join(TYPES)} | s/epoch |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for name, by_seed in results.items():
        for seed, r in by_seed.items():
            cells = " | ".join(f"{100 * r['per_type'].get(t, float('nan')):.1f}%" for t in TYPES)
            print(f"| {name} | {seed} | {r['trainable']:,} | {100 * r['accuracy']:.1f}% | {cells} | "
                  f"{r['seconds_per_epoch']:.0f} |")
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
