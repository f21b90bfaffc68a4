"""One layer's dropout mask on the CPU, three ways, interleaved: what ``LoRADropout`` draws against two others.

    python bench/dropout_mask.py [--rows 800] [--width 384] [--p 0.1] [--rounds 24] [--reps 20]

The defaults are a ViT-S/14 qkv input at 98 px, batch 16. The variants, each giving the same float 0/1
mask of the input's shape:

- ``LoRADropout``: four 16-bit decisions per 64-bit draw, each draw as the generator gives it (``random_``
  over the whole int64 range);
- ``randint``: the same packing with the draws from ``torch.randint`` over that range, which takes each
  draw modulo the range: what the layer did before 2026-11-27, and what it traces under ``torch.compile``;
- ``bernoulli``: one draw per element, as ``nn.Dropout`` draws its mask.

Printed: microseconds per mask (the median over rounds) and each variant's speed relative to
``LoRADropout``'s (the median of per-round ratios, with their interquartile range).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from lora import LoRADropout
from throughput import interleaved, shown, summary
from vqa.evaluate import at_least


def masks(rows: int, width: int, p: float) -> dict[str, callable]:
    """Per variant, a call that returns one mask for a ``(rows, width)`` input."""
    x = torch.randn(rows, width)
    drop = LoRADropout(p).train()
    n = x.numel()

    def layer():
        return drop.keep_mask(x)

    def randint():
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        return torch.ge(bits.view(torch.int16)[:n].view(x.shape), drop.threshold, out=torch.empty_like(x))

    def bernoulli():
        return torch.empty_like(x).bernoulli_(drop.keep_probability)

    return {"LoRADropout": layer, "randint": randint, "bernoulli": bernoulli}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=at_least(1), default=800, help="rows of the layer's input (batch x tokens)")
    parser.add_argument("--width", type=at_least(1), default=384)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--rounds", type=at_least(1), default=24,
                        help="a multiple of 6 balances the orders of 3 variants")
    parser.add_argument("--reps", type=at_least(1), default=20, help="masks drawn together in one round")
    args = parser.parse_args()
    device = torch.device("cpu")
    variants = masks(args.rows, args.width, args.p)

    def repeated(draw):
        def call():
            for _ in range(args.reps):
                draw()
        return call

    fns = {name: repeated(draw) for name, draw in variants.items()}
    interleaved(fns, 2, device)  # warm-up
    times = interleaved(fns, args.rounds, device)
    print(f"dropout mask p={args.p} for a {args.rows} x {args.width} input, cpu, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.reps} masks")
    for name, ts in times.items():
        speed = summary([ref / t for ref, t in zip(times["LoRADropout"], ts)])
        print(f"  {name:<12} {statistics.median(ts) / args.reps * 1e6:7.1f} us   "
              f"x{shown(speed['median'], speed['iqr'])} of LoRADropout's speed")


if __name__ == "__main__":
    main()
