"""One adapted qkv layer without autograd: the plain layer, the adapter update and the fold, interleaved.

    python bench/layer_paths.py [--width 384] [--rows 800 1152 2056 4112] [--rounds 24] [--device auto]

For each row count, prints the speed of each way to run the layer as a ratio to the plain ``nn.Linear``
(the median of per-round ratios, with their interquartile range) and the way ``LoRALinear`` picks by
itself: the measurements behind the fold threshold (``lora.layer._FOLD_MIN_ACTIVATIONS_PER_WEIGHT``) on
the machine at hand. CUDA runs under bf16 autocast, as ``bench/throughput.py`` does.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import lora.layer
from throughput import device_arg, interleaved, shown, summary
from vqa.evaluate import at_least, autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=at_least(1), default=384, help="in_features; the qkv output is 3 x this")
    parser.add_argument("--rows", type=at_least(1), nargs="+", default=[800, 1152, 2056, 4112])
    parser.add_argument("--rounds", type=at_least(1), default=24,
                        help="a multiple of 6 balances the orders of 3 variants")
    parser.add_argument("--reps", type=at_least(1), default=10, help="calls timed together in one round")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = device_arg(parser, args.device)
    torch.manual_seed(0)
    layer = lora.LoRALinear(args.width, 3 * args.width, r=8, splits=3, device=device).eval()
    nn.init.normal_(layer.lora_B, std=0.01)  # a trained adapter
    print(f"qkv {args.width} -> {3 * args.width}, r=8, {device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.reps} calls (ratios to the plain layer)")
    default = lora.layer._FOLD_MIN_ACTIVATIONS_PER_WEIGHT
    for rows in args.rows:
        x = torch.randn(rows, args.width, device=device)

        def timed(forward, threshold: float):
            """``args.reps`` calls of ``forward`` with the fold threshold set to ``threshold`` meanwhile."""
            def call():
                lora.layer._FOLD_MIN_ACTIVATIONS_PER_WEIGHT = threshold
                try:
                    with torch.inference_mode(), autocast(device):
                        for _ in range(args.reps):
                            forward(x)
                finally:
                    lora.layer._FOLD_MIN_ACTIVATIONS_PER_WEIGHT = default
            return call

        def plain(x):
            return F.linear(x, layer.weight, layer.bias)

        fns = {"plain": timed(plain, default), "update": timed(layer, float("inf")), "fold": timed(layer, 0)}
        interleaved(fns, 2, device)  # warm-up
        times = interleaved(fns, args.rounds, device)
        with torch.no_grad():
            picked = "fold" if layer._folds(x) else "update"
        cells = []
        for name in ("update", "fold"):
            ratio = summary([p / t for p, t in zip(times["plain"], times[name])])
            cells.append(f"{name} x{shown(ratio['median'], ratio['iqr'])}")
        print(f"  {rows:6d} rows: " + "   ".join(cells) + f"   (picks {picked})", flush=True)


if __name__ == "__main__":
    main()
