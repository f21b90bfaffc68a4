"""Host time of a tiny LoRA layer's call against a tiny ``nn.Linear``'s: the layer's Python and dispatch.

    python bench/layer_host_time.py [--rounds 24] [--reps 500]

The tensors are so small (4 or 64 rows of 16 features) that the arithmetic costs next to nothing, so the
difference is what the adapter adds to every call whatever its size: the time the host needs to issue it.
On a GPU that time runs beside the kernels, and where a forward issues its kernels about as fast as the
GPU runs them, it is what the GPU waits for (README, "On a GPU"). Per path (the update, the fold without
and under bf16 autocast, a training forward and backward with dropout 0 and 0.1, base weights frozen as in
a LoRA step), the two layers run interleaved, each round in the next of ``balanced_orders``; printed: the
median over rounds of the LoRA layer's time per call, the plain layer's, and of their per-round
difference, with that difference's interquartile range. The CPU only, one thread.
"""
from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch
from torch import nn

import lora
from throughput import interleaved, summary
from vqa.evaluate import at_least

IN, OUT, R = 16, 48, 2  # a qkv of width 16: out = 3 x in, three adapters of rank 2


def layers() -> tuple[nn.Linear, dict[float, lora.LoRALinear]]:
    """The plain layer and a LoRA layer per dropout, their base weights frozen, as in a LoRA step and in the
    frozen floor it is compared with (README): the gradient goes to the input (and the adapters) only."""
    torch.manual_seed(0)
    plain = nn.Linear(IN, OUT).requires_grad_(False)
    adapted = {p: lora.LoRALinear.from_linear(nn.Linear(IN, OUT), r=R, alpha=2 * R, splits=3, dropout=p)
               for p in (0.0, 0.1)}
    for layer in adapted.values():
        lora.mark_only_lora_as_trainable(layer)
        nn.init.normal_(layer.lora_B)  # a trained adapter
    return plain, adapted


def paths(reps: int, built: tuple | None = None) -> dict[str, tuple]:
    """Per path: the LoRA layer's and the plain layer's call, each ``reps`` times over (on ``layers()``, or on
    ``built``, layers made by it)."""
    plain, adapted = built or layers()
    small, large = torch.randn(4, IN), torch.randn(64, IN)  # the update's rows; the fold's (above its threshold)
    grad_in = torch.randn(4, IN, requires_grad=True)

    def inference(layer, x, context):
        def call():
            layer.eval()
            with torch.inference_mode(), context():
                for _ in range(reps):
                    layer(x)
        return call

    def training(layer):
        def call():
            layer.train()
            for _ in range(reps):
                layer(grad_in).sum().backward()
        return call

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    lora0 = adapted[0.0]
    with torch.no_grad():
        assert not lora0._folds(small) and lora0._folds(large), "the rows no longer pick the two paths"
    return {
        "update (inference)": (inference(lora0, small, nullcontext), inference(plain, small, nullcontext)),
        "fold (inference)": (inference(lora0, large, nullcontext), inference(plain, large, nullcontext)),
        "fold, bf16 autocast": (inference(lora0, large, bf16), inference(plain, large, bf16)),
        "forward + backward, dropout 0": (training(lora0), training(plain)),
        "forward + backward, dropout 0.1": (training(adapted[0.1]), training(plain)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=at_least(1), default=24, help="rounds per path (even: balances the order)")
    parser.add_argument("--reps", type=at_least(1), default=500, help="calls timed together in one round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    print(f"a LoRA layer {IN} -> {OUT} (r={R} per split, 3 splits) against nn.Linear, 1 thread, "
          f"{args.rounds} rounds of {args.reps} calls; microseconds per call")
    for name, (adapted, plain) in paths(args.reps).items():
        fns = {"lora": adapted, "linear": plain}
        interleaved(fns, 2, device)  # warm-up
        times = interleaved(fns, args.rounds, device)
        per_call = {k: [t / args.reps * 1e6 for t in v] for k, v in times.items()}
        extra = summary([a - b for a, b in zip(per_call["lora"], per_call["linear"])])
        print(f"  {name:<32} LoRA {statistics.median(per_call['lora']):6.1f}   nn.Linear "
              f"{statistics.median(per_call['linear']):6.1f}   added {extra['median']:6.1f} "
              f"(IQR {extra['iqr'][0]:.1f} to {extra['iqr'][1]:.1f})")


if __name__ == "__main__":
    main()
