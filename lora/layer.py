"""LoRALinear: an ``nn.Linear`` with a trainable low-rank update.

Implements LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
``y = x W^T + b + scaling * B(A(dropout(x)))`` with ``scaling = alpha / r``, ``A`` initialised
Kaiming-uniform and ``B`` to zero, so a freshly adapted layer computes exactly what the base did.

With ``splits = s > 1`` the output is treated as ``s`` equal slices (timm's fused ``qkv``: q, k, v),
each with its own rank-``r`` adapter. The ``s`` adapters share one GEMM for ``A`` (``lora_A`` holds
the ``s`` down-projections stacked, ``(s * r, in)``) and one batched GEMM for ``B`` that accumulates
straight into the base output, so no copy of the base output is ever made.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRALinear", "LoRADropout"]

# Rows of a low-precision weight merged per step: bounds the fp32 temporary to rows x in_features.
_MERGE_CHUNK_ROWS = 256


def check_lora_args(r: int, alpha: float, dropout: float, splits: int, out_features: int) -> None:
    """Raises ValueError naming the bad LoRA argument and how to fix it."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits <= 0:
        raise ValueError(f"lora splits must be a positive integer, got {splits!r}")
    if out_features % splits:
        raise ValueError(
            f"lora splits={splits} must divide out_features={out_features}; use splits=1 "
            f"for a layer that is not a fused projection"
        )


class LoRADropout(nn.Module):
    """Inverted dropout with half the random-number work of ``nn.Dropout``.

    Each 32-bit random draw gives two 16-bit keep decisions, so ``p`` holds to within 1/65,536
    (0.1 becomes 6,554/65,536 = 0.100006). On the adapter input the mask generation is most of the
    cost of dropout, so halving it matters (``bench/throughput.py`` measures it).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # keep where a uniform int16 is >= this
        self.scale = 1.0 / (1.0 - p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        n = x.numel()
        bits = torch.randint(-(2**31), 2**31 - 1, ((n + 1) // 2,), dtype=torch.int32, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep * self.scale


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus ``splits`` rank-``r`` adapters; keeps the ``weight``/``bias`` keys of the base."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        splits: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_lora_args(r, alpha, dropout, splits, out_features)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._add_adapter(r, alpha, dropout, splits)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, splits: int = 1
    ) -> "LoRALinear":
        """Wraps ``linear``'s own ``weight`` and ``bias`` Parameters (no copy) in a LoRALinear."""
        check_lora_args(r, alpha, dropout, splits, linear.out_features)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        layer.train(linear.training)
        layer._add_adapter(r, alpha, dropout, splits)
        return layer

    def _add_adapter(self, r: int, alpha: float, dropout: float, splits: int) -> None:
        self.r, self.alpha, self.splits = r, float(alpha), splits
        self.scaling = self.alpha / r
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(splits * r, self.in_features, **factory))  # s stacked (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))  # s stacked (out / s, r)
        # Disabled dropout is an Identity so forward has no branch on it.
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._unmerged_weight: Tensor | None = None  # the pre-merge weight, kept for an exact unmerge
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform as ``nn.Linear`` does (fan-in = in_features); B: zero, so the delta starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, splits={self.splits}, "
            f"merged={self.merged}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                # The silent failure this library exists to prevent: adapters that train without being used.
                raise RuntimeError("LoRA layer is merged, so its adapters would get no gradient; "
                                   "call unmerge_lora(model) (or leave lora.merged(...)) before training")
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (M, in)
        # A 2-D output of its own, not a view: F.linear does not save it for backward, so the adapter
        # can accumulate into it in place instead of allocating a second output-sized tensor.
        y = F.linear(x, self.weight, self.bias)  # (M, out)
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (M, s * r): every split's A in one GEMM
        lora_B = self.lora_B.to(y.dtype)  # autocast does not reach in-place ops
        s, o, r = self.splits, self.out_features // self.splits, self.r
        if s == 1:
            y.addmm_(h, lora_B.t(), alpha=self.scaling)
        elif torch.is_grad_enabled() or torch.compiler.is_compiling():
            # B as one block-diagonal (out, s * r) matrix: an update through a transposed view of y would
            # make autograd copy the whole output gradient in backward, and compilers cannot replay it.
            y.addmm_(h, torch.block_diag(*lora_B.view(s, o, r)).t(), alpha=self.scaling)
        else:
            # (s, M, o) += (s, M, r) @ (s, r, o): one batched GEMM writing into each slice of y, only
            # the FLOPs of the three blocks (inference, where no autograd graph is kept).
            y.view(-1, s, o).transpose(0, 1).baddbmm_(
                h.view(-1, s, r).transpose(0, 1), lora_B.view(s, o, r).transpose(1, 2), alpha=self.scaling
            )
        return y.view(*lead, self.out_features)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The ``(out, in)`` update ``scaling * B @ A`` (block-wise per split), in the weight's dtype."""
        s, o = self.splits, self.out_features // self.splits
        lora_A = self.lora_A.float().view(s, self.r, self.in_features)
        lora_B = self.lora_B.float().view(s, o, self.r)
        delta = torch.bmm(lora_B, lora_A).mul_(self.scaling)  # (s, o, in), fp32
        return delta.view(self.out_features, self.in_features).to(self.weight.dtype)

    @torch.no_grad()
    def _accumulate_delta(self, out: Tensor, base: Tensor) -> None:
        """``out = base + delta`` with one fused GEMM-accumulate; low precision is summed in fp32, rounded once."""
        s, o, r = self.splits, self.out_features // self.splits, self.r
        lora_A = self.lora_A.view(s, r, self.in_features)
        lora_B = self.lora_B.view(s, o, r)
        if base.dtype in (torch.float32, torch.float64):
            base3, lora_A, lora_B = base.view(s, o, self.in_features), lora_A.to(base.dtype), lora_B.to(base.dtype)
            if out is base:
                base3.baddbmm_(lora_B, lora_A, alpha=self.scaling)
            else:
                torch.baddbmm(base3, lora_B, lora_A, alpha=self.scaling, out=out.view(s, o, self.in_features))
            return
        lora_A, lora_B = lora_A.float(), lora_B.float()
        for i in range(s):
            for start in range(0, o, _MERGE_CHUNK_ROWS):
                rows = slice(i * o + start, i * o + min(o, start + _MERGE_CHUNK_ROWS))
                acc = torch.addmm(base[rows].float(), lora_B[i, start:start + _MERGE_CHUNK_ROWS], lora_A[i],
                                  alpha=self.scaling)
                out[rows].copy_(acc)

    @torch.no_grad()
    def merge(self, keep_unmerged: bool = True) -> None:
        """Folds the adapter into ``weight``; idempotent. ``keep_unmerged`` holds the old weight (one extra
        copy of the layer's weight) so ``unmerge`` restores it bit-exactly; ``False`` frees it (deployment)."""
        if self.merged:
            return
        base = self.weight.data
        if keep_unmerged:
            merged = torch.empty_like(base)
            self._accumulate_delta(merged, base)
            self._unmerged_weight = base
            self.weight.data = merged  # same Parameter object: optimizers and hooks keep working
        else:
            self._accumulate_delta(base, base)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the adapter out of ``weight``; idempotent. Bit-exact when the merge kept the old weight,
        otherwise the delta is subtracted (exact up to rounding)."""
        if not self.merged:
            return
        if self._unmerged_weight is not None:
            self.weight.data = self._unmerged_weight
            self._unmerged_weight = None
        else:
            self.weight.data.sub_(self.delta_weight())
        self.merged = False
