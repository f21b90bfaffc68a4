"""LoRALinear: an ``nn.Linear`` with a trainable low-rank update.

Implements LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
``y = x W^T + b + scaling * B(A(dropout(x)))`` with ``scaling = alpha / r``, ``A`` initialised
Kaiming-uniform and ``B`` to zero, so a freshly adapted layer computes exactly what the base did.

With ``splits = s > 1`` the output is treated as ``s`` equal slices (timm's fused ``qkv``: q, k, v),
each with its own rank-``r`` adapter. The ``s`` adapters share one GEMM for ``A`` (``lora_A`` holds
the ``s`` down-projections stacked, ``(s * r, in)``) and one batched GEMM for ``B`` that accumulates
straight into the base output, so no copy of the base output is ever made. In training, a
hand-written backward (``_LoRAUpdate``) keeps it that way: the output gradient passes through
untouched and each split's B costs only its own block's GEMMs. Under ``torch.compile`` the same sum
is written in plain autograd ops that compilers, ``torch.func`` and forward-mode AD can trace.

Without autograd (evaluation under ``no_grad``/``inference_mode``), with no dropout mask to draw and for a
large input, the layer instead multiplies by ``W + scaling * B A``, formed for the call: a pass over the
weight where the update makes a pass over the whole output. The layer stays unmerged; the result is what a merged layer computes.
In fp32 the two paths agree to rounding (about 1e-6); in bf16, which rounds the folded weight where the
update rounds two products, to bf16 precision only, so a bf16 output may change in its last bits with
the batch size that decides between them.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRALinear", "LoRADropout"]

# The input dtypes autocast casts (it leaves float64 alone).
_AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
_WIDE_FLOATS = (torch.float32, torch.float64)  # what promote_types(dtype, float32) leaves as it is
# Rows of a low-precision weight merged per step: bounds the fp32 temporary to rows x in_features.
_MERGE_CHUNK_ROWS = 256
# A forward without autograd folds the adapter into a weight made for the call once the input and output
# it would otherwise pass over hold this many times the weight's elements: rows * (in + out) >= 4 * in * out
# (rows >= 3 * width for a qkv layer). Below that, adding B(A(x)) to the output is cheaper.
_FOLD_MIN_ACTIVATIONS_PER_WEIGHT = 4


def _is_integer(value) -> bool:
    """An int, numpy's integers included, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A real number, numpy's scalars included, and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _shown(value) -> str:
    """``value`` for an error message, with its type where the type is what is wrong."""
    return repr(value) if _is_number(value) else f"{value!r} of type {type(value).__name__}"


def check_lora_args(r: int, alpha: float, dropout: float, splits: int, out_features: int) -> None:
    """Raises ValueError naming the bad LoRA argument and how to fix it."""
    if not _is_integer(r) or r <= 0:
        raise ValueError(f"lora r must be a positive integer, got {_shown(r)}")
    if not _is_number(alpha) or not _finite(alpha) or alpha <= 0:
        raise ValueError(f"lora alpha must be a finite number > 0, got {_shown(alpha)}")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be a number in [0, 1), got {_shown(dropout)}")
    if not _is_integer(splits) or splits <= 0:
        raise ValueError(f"lora splits must be a positive integer, got {_shown(splits)}")
    if out_features % splits:
        raise ValueError(
            f"lora splits={splits} must divide out_features={out_features}; use splits=1 "
            f"for a layer that is not a fused projection"
        )


class LoRADropout(nn.Module):
    """Inverted dropout with a cheaper mask than ``nn.Dropout``'s.

    ``p`` is rounded to a multiple of 1/65,536 (0.1 becomes 6,554/65,536 = 0.100006) on every device. On
    the CPU, where drawing random numbers is most of the cost of dropout (``bench/throughput.py``
    measures it), each 64-bit draw gives four 16-bit keep decisions: a quarter of the draws of
    ``nn.Dropout``. On CUDA the mask is bool, one byte an element, drawn by one ``bernoulli_`` kernel.
    ``LoRALinear`` applies the mask itself and folds the ``1 / (1 - p)`` scale into the adapter's
    scaling, so only the mask touches every element.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, p: float) -> None:
        """Settable, as ``nn.Dropout.p`` is (a dropout schedule): the mask's threshold and scale follow it."""
        if not _is_number(p) or not 0.0 <= p < 1.0:
            raise ValueError(f"LoRADropout p must be a number in [0, 1), got {_shown(p)}")
        self._p = p = float(p)
        dropped = min(round(p * 65536), 65535)  # of 65,536 equally likely int16 values; one is always kept
        self.threshold = dropped - 32768  # keep where a uniform int16 is >= this
        self.keep_probability = (65536 - dropped) / 65536  # exact in float32
        self.scale = 1 / self.keep_probability  # unbiased

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def keep_mask(self, x: Tensor) -> Tensor | None:
        """A 0/1 mask shaped like ``x``: bool on CUDA, ``x``'s dtype elsewhere (``None`` when nothing is dropped:
        eval, or p = 0)."""
        if not self.training or self.p == 0:
            return None
        if x.device.type == "cuda":
            # One kernel writing one byte an element, where the 16-bit draws take a kernel to draw, another to
            # compare, and a mask as wide as x: under half the time, and a smaller mask kept for backward.
            return torch.empty_like(x, dtype=torch.bool).bernoulli_(self.keep_probability)
        if _under_vmap():
            # vmap batches torch's own draws (its ``randomness`` argument), not the packed draw below.
            return torch.randint_like(x, -32768, 32768, dtype=torch.int32).ge(self.threshold).to(x.dtype)
        n = x.numel()
        words = (n + 3) // 4
        if torch.compiler.is_compiling():
            # Dynamo cannot trace random_. randint over the whole range takes the same draws minus 2**63 (one value
            # of 2**64 excepted): the xor gives them back, so a graph that runs torch's own random numbers (aot_eager;
            # inductor with fallback_random) draws the mask eager mode draws.
            bits = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=x.device) ^ -(2**63)
        else:
            # Each 64-bit draw as it comes: randint takes every draw modulo its range, a 64-bit division that
            # costs 15 % of the draw here (bench/dropout_mask.py).
            bits = torch.empty(words, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        halves = bits.view(torch.int16)[:n].view(x.shape)
        # The comparison writes the float mask directly: a bool mask times x would take a slow casting loop.
        return torch.ge(halves, self.threshold, out=torch.empty_like(x))

    def forward(self, x: Tensor) -> Tensor:
        keep = self.keep_mask(x)
        return _dropped(x, keep, self.scale)


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is running (perhaps under other transforms)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def no_autocast(device: torch.device):
    """Autocast switched off on ``device``: the ops inside run in the dtypes given (the fold's sum here, the VQA
    model's heads). A no-op where autocast is off already (entering ``torch.autocast`` costs microseconds of
    host time per layer) and on the meta device, which has no autocast (``torch.autocast`` would raise; ``torch.amp.is_autocast_available``
    would say so, but torch 2.11's compiler cannot trace it)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call where ``t`` has that dtype already (``to`` would return ``t`` itself):
    the layer runs once per block, and on a GPU its host time can decide the speed (README)."""
    return t if t.dtype == dtype else t.to(dtype)


def _dropped(x: Tensor, keep: Tensor | None, scale: float = 1.0) -> Tensor:
    """``x * keep * scale``: ``x`` with the dropout mask applied. The adapter passes no scale: its 1/(1-p) is in
    the adapter's alpha."""
    if keep is None:
        return x
    if keep.dtype == torch.bool and not _plain_autograd_only():
        # One pass that reads the mask as bool: x * keep would take CUDA's slow mixed-dtype path (a cast per
        # element). Forward-mode AD has no formula for this kernel; compilers fuse the plain product anyway.
        return _BoolMasked.apply(x, keep, scale)
    if scale != 1.0:
        keep = keep * scale  # a scalar times a bool mask gives floats
    return x * keep


class _BoolMasked(torch.autograd.Function):
    """``x * keep * scale`` for a bool ``keep``, through the kernel that reads the mask as bool
    (``native_dropout_backward``). Autograd's own node for that kernel would also keep ``x`` for backward,
    a second input-sized tensor beside the masked one the adapter keeps; this one keeps only the mask."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        # The same kernel; under create_graph autograd records it, so the backward is differentiable too.
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


def _lora_update_(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, alpha: float, splits: int) -> Tensor:
    """``y += alpha * B(A(x))`` in place, split by split; returns ``A(x)``."""
    s, m, o, r = splits, y.shape[0], y.shape[1] // splits, lora_A.shape[0] // splits
    h = x @ lora_A.t()  # (M, s * r): every split's A in one GEMM
    # (s, M, o) += (s, M, r) @ (s, r, o): one batched GEMM writing into each split's columns of y.
    y.view(m, s, o).transpose(0, 1).baddbmm_(h.view(m, s, r).transpose(0, 1),
                                             lora_B.view(s, o, r).transpose(1, 2), alpha=alpha)
    return h


def _plain_autograd_only() -> bool:
    """True under ``torch.compile``, ``torch.func`` transforms (grad, vmap, jacrev) and forward-mode AD,
    which cannot run ``_LoRAUpdate`` (an in-place custom Function)."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0)


class _LoRAUpdate(torch.autograd.Function):
    """``y += alpha * B(A(x))`` in place, with a hand-written backward.

    Autograd, left to itself, cannot accumulate the ``splits`` adapters into strided slices of ``y``
    without copying the whole output gradient, so the backward is written out: the output gradient
    passes through untouched and each split's B gets only its own block's GEMMs.
    """

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, alpha: float, splits: int) -> Tensor:
        h = _lora_update_(y, x, lora_A, lora_B, alpha, splits)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, lora_A, lora_B)
        ctx.alpha, ctx.splits = alpha, splits
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, h, lora_A, lora_B = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A gradient penalty, say: this backward must itself be differentiable, and h, computed
            # inside forward, has no history. Recompute it with one.
            h = x @ lora_A.t()
        s, alpha = ctx.splits, ctx.alpha
        m, o, r = grad_y.shape[0], grad_y.shape[1] // s, lora_A.shape[0] // s
        # Each GEMM is laid out so that its small (r-sized) side is the output's rows: with the long M side
        # as the output, MKL runs these skinny strided products several times slower.
        grad_y3 = grad_y.view(m, s, o).transpose(0, 1)  # (s, M, o), a view
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[3]:
            h3 = h.view(m, s, r).permute(1, 2, 0)  # (s, r, M)
            grad_B = torch.bmm(h3, grad_y3).mul_(alpha).transpose(1, 2).reshape(s * o, r)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_h = torch.bmm(lora_B.view(s, o, r).transpose(1, 2), grad_y3.transpose(1, 2))  # (s, r, M)
            grad_h = grad_h.mul_(alpha).view(s * r, m)  # the transpose of dL/dh
            if ctx.needs_input_grad[2]:
                grad_A = grad_h @ x
            if ctx.needs_input_grad[1]:
                grad_x = grad_h.t() @ lora_A
        return grad_y, grad_x, grad_A, grad_B, None, None


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, strided: bool) -> Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x`` as ``nn.Linear`` computes the input it was reshaped from: for a
    ``strided`` one (3 or more dimensions, not contiguous, with a bias) torch's linear takes a product and then adds
    the bias (cast as autocast casts it), where for a 2-D input it fuses the bias into one addmm."""
    if not strided:
        return F.linear(x, weight, bias)
    y = torch.mm(x, weight.t())
    return y + _cast(bias, y.dtype)  # out of place: under vmap the bias may be batched where y is not


def _reusable(buffer: Tensor, base: Tensor) -> bool:
    """Whether ``merge`` may overwrite ``buffer``: it fits ``base`` and no other tensor shares its memory
    (a tensor taken from ``weight`` while merged, a graph that saved the merged weight, a view)."""
    if (buffer.shape, buffer.dtype, buffer.device) != (base.shape, base.dtype, base.device):
        return False
    if buffer.is_inference() and not torch.is_inference_mode_enabled():
        return False  # made under inference_mode: writable only there
    # References to the storage: ``buffer`` itself and the temporary storage object made to ask. The
    # count is a private torch function; without it, never reuse.
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(buffer.untyped_storage()._cdata) == 2


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
        layer._add_adapter(r, alpha, dropout, splits)
        return layer.train(linear.training)  # after the adapter: its dropout takes the mode too

    def _add_adapter(self, r: int, alpha: float, dropout: float, splits: int) -> None:
        self._r, self._splits = int(r), int(splits)
        self.merged = False
        self.alpha = alpha
        bound = min(self.in_features, self.out_features // self.splits)
        if self.r > bound:  # legal, and trains, but most likely an r meant for a wider layer
            warnings.warn(f"lora r={self.r} is more than this layer can use: each B A has rank at most "
                          f"min(in_features, out_features / splits) = {bound}, so the other {self.r - bound} add "
                          f"parameters and no capacity; r={bound} or less reaches the same updates", stacklevel=3)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.splits * self.r, self.in_features, **factory))  # s stacked (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **factory))  # s stacked (out / s, r)
        # Disabled dropout is an Identity so forward has no branch on it.
        self.lora_dropout = LoRADropout(float(dropout)) if dropout > 0 else nn.Identity()
        self._unmerged_weight: Tensor | None = None  # the pre-merge weight, kept for an exact unmerge
        self._merge_buffer: Tensor | None = None  # the last merged weight's memory, reused by the next merge
        self.reset_lora_parameters()

    @property
    def r(self) -> int:
        """Each adapter's rank: fixed, as the shapes of ``lora_A`` and ``lora_B`` are."""
        return self._r

    @property
    def splits(self) -> int:
        """The adapters over the output's equal slices (3 on a fused qkv): fixed, as ``lora_B``'s shape is."""
        return self._splits

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, alpha: float) -> None:
        """Settable (an unmerged layer only): the scaling the forward uses follows it, as does an adapter file."""
        if not _is_number(alpha) or not _finite(alpha) or alpha <= 0:
            raise ValueError(f"lora alpha must be a finite number > 0, got {_shown(alpha)}")
        self._refuse_if_merged("setting alpha")
        self._alpha = float(alpha)
        self._scaling = self._alpha / self._r

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor of ``B A``; set ``alpha`` to change it."""
        return self._scaling

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of ``weight`` and ``bias``, and the adapter's (B = 0): the whole layer,
        as after ``to_empty()`` on a model built on the meta device."""
        if "lora_A" not in self._parameters:  # nn.Linear.__init__ calls this before the adapter exists
            return super().reset_parameters()
        self._refuse_if_merged("reset_parameters()")
        super().reset_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform as ``nn.Linear`` does (fan-in = in_features); B: zero, so the delta starts at 0."""
        self._refuse_if_merged("reset_lora_parameters()")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _refuse_if_merged(self, what: str) -> None:
        if self.merged:  # the weight holds the old delta, which unmerge could no longer take out
            raise RuntimeError(f"{what} on a merged LoRA layer would leave the old adapter in its weight; "
                               f"call unmerge() (or unmerge_lora(model)) first")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, splits={self.splits}, "
            f"merged={self.merged}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled():
                if self.lora_A.requires_grad or self.lora_B.requires_grad:
                    # The silent failure this library exists to prevent: adapters that train without being used.
                    raise RuntimeError("LoRA layer is merged, so its adapters would get no gradient; "
                                       "call unmerge_lora(model) (or leave lora.merged(...)) before training")
                if self.weight.requires_grad and self._unmerged_weight is not None:
                    # A step would change the merged copy, which unmerge swaps out and state_dict() never shows.
                    raise RuntimeError("LoRA layer is merged, so a training step on its weight would be lost at "
                                       "unmerge; call unmerge_lora(model) (or leave lora.merged(...)) before training")
            return F.linear(x, self.weight, self.bias)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"LoRALinear({self.in_features} -> {self.out_features}) got an input of shape "
                             f"{tuple(x.shape)}; its last dimension must be {self.in_features}")
        lead = x.shape[:-1]
        # nn.Linear computes such an input (3 or more dimensions, not contiguous) as a product, then adds the bias:
        # other roundings than F.linear's one addmm on the 2-D x below, which a fresh layer must not change.
        strided = len(lead) > 1 and self.bias is not None and not x.is_contiguous()
        x = x.reshape(-1, self.in_features)  # (M, in)
        if x.dtype in _AUTOCAST_INPUTS and torch.is_autocast_enabled(x.device.type):
            # Cast the input once, here, rather than once inside F.linear and again for the adapter.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self._folds(x):
            return _linear(x, self._folded_weight(), self.bias, strided).view(*lead, self.out_features)
        # A 2-D output of its own, not a view: F.linear does not save it for backward, so the adapter
        # can accumulate into it in place instead of allocating a second output-sized tensor.
        y = _linear(x, self.weight, self.bias, strided)  # (M, out)
        # Autocast does not reach in-place ops or custom functions: the adapter runs in y's dtype.
        x, lora_A, lora_B = _cast(x, y.dtype), _cast(self.lora_A, y.dtype), _cast(self.lora_B, y.dtype)
        keep = self.lora_dropout.keep_mask(x) if isinstance(self.lora_dropout, LoRADropout) else None
        alpha = self.scaling * (1.0 if keep is None else self.lora_dropout.scale)  # dropout's 1/(1-p) too
        # The masked input, once: autograd's product saves only the mask, and the adapter saves this input
        # for its own backward, so neither pass recomputes it.
        x = _dropped(x, keep)
        if _plain_autograd_only():
            y = self._traceable_update(y, x, lora_A, lora_B, alpha)
        elif torch.is_grad_enabled():
            y = _LoRAUpdate.apply(y, x, lora_A, lora_B, alpha, self.splits)
        else:  # nothing to differentiate: the same arithmetic without an autograd node
            _lora_update_(y, x, lora_A, lora_B, alpha, self.splits)
        return y.view(*lead, self.out_features)

    def _folds(self, x: Tensor) -> bool:
        """Whether this forward multiplies by ``weight + scaling * B A``, made for the call, instead of adding
        ``B(A(x))`` to the output: when autograd is off, no dropout is drawn, and ``x`` is large next to the
        weight. It is what ``merge`` would compute, with the layer left unmerged. Plain out-of-place ops:
        compilers, ``torch.func`` and forward-mode AD (which ``no_grad`` does not stop) run it as they are."""
        if torch.is_grad_enabled():
            return False
        if isinstance(self.lora_dropout, LoRADropout) and self.lora_dropout.training:
            return False  # a mask will be drawn (the dropout module's own mode: MC dropout turns on only it)
        activations = x.shape[0] * (self.in_features + self.out_features)
        return activations >= _FOLD_MIN_ACTIVATIONS_PER_WEIGHT * self.in_features * self.out_features

    def _folded_weight(self) -> Tensor:
        """``weight + scaling * B A`` as a new tensor in the weight's dtype: one out-of-place GEMM-accumulate for
        all splits (on a GPU, where this runs per call, one kernel rather than one per split), in fp32 for a
        low-precision weight, rounded once. Autocast is kept out of the sum: it would round the weight to
        bf16 before the small delta is added. ``F.linear`` then rounds the sum as it rounds a merged weight."""
        w = self.weight
        # bf16/fp16 summed in fp32, fp64 stays fp64 (promote_types is a dispatched call: skipped where it is known)
        dtype = w.dtype if w.dtype in _WIDE_FLOATS else torch.promote_types(w.dtype, torch.float32)
        s, o, r = self.splits, self.out_features // self.splits, self.r
        with no_autocast(w.device):
            folded = torch.baddbmm(_cast(w, dtype).view(s, o, self.in_features), _cast(self.lora_B, dtype).view(s, o, r),
                                   _cast(self.lora_A, dtype).view(s, r, self.in_features), alpha=self.scaling)
        return _cast(folded.view(self.out_features, self.in_features), w.dtype)

    def _traceable_update(self, y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, alpha: float) -> Tensor:
        """The update in plain out-of-place autograd ops, for compilers (which cannot replay an in-place
        update through a transposed view of y), ``torch.func`` (vmap has no batching rule for an in-place
        addmm) and forward-mode AD: B as one block-diagonal (out, s * r) matrix, s times the FLOPs of B."""
        h = F.linear(x, lora_A)
        s, o, r = self.splits, self.out_features // self.splits, self.r
        return torch.addmm(y, h, torch.block_diag(*lora_B.view(s, o, r)).t(), alpha=alpha)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The ``(out, in)`` update ``scaling * B @ A`` (block-wise per split), in the weight's dtype."""
        s, o = self.splits, self.out_features // self.splits
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # bf16/fp16 in fp32, fp64 stays fp64
        lora_A = self.lora_A.to(dtype).view(s, self.r, self.in_features)
        lora_B = self.lora_B.to(dtype).view(s, o, self.r)
        with no_autocast(self.weight.device):  # an enclosing autocast would run bmm in bf16/fp16
            delta = torch.bmm(lora_B, lora_A).mul_(self.scaling)  # (s, o, in)
        return delta.view(self.out_features, self.in_features).to(self.weight.dtype)

    @torch.no_grad()
    def _accumulate_delta(self, out: Tensor, base: Tensor) -> None:
        """``out = base + delta`` with one fused GEMM-accumulate; low precision is summed in fp32, rounded once."""
        s, o, r = self.splits, self.out_features // self.splits, self.r
        lora_A = self.lora_A.view(s, r, self.in_features)
        lora_B = self.lora_B.view(s, o, r)
        if base.dtype in (torch.float32, torch.float64):
            # One addmm per split: with K = r the GEMM is bound by the weight's memory traffic, and
            # baddbmm's out= variant first copies base into out, an extra pass over the whole weight.
            lora_A, lora_B = lora_A.to(base.dtype), lora_B.to(base.dtype)
            for i in range(s):
                rows = slice(i * o, (i + 1) * o)
                torch.addmm(base[rows], lora_B[i], lora_A[i], alpha=self.scaling, out=out[rows])
            return
        lora_A, lora_B = lora_A.float(), lora_B.float()
        # An out-of-place addmm is what autocast casts (out= calls it leaves alone): under bf16 autocast, an
        # fp16 weight would be summed in bf16, with 3 fewer bits than fp16 itself.
        with no_autocast(base.device):
            for i in range(s):
                for start in range(0, o, _MERGE_CHUNK_ROWS):
                    rows = slice(i * o + start, i * o + min(o, start + _MERGE_CHUNK_ROWS))
                    acc = torch.addmm(base[rows].float(), lora_B[i, start:start + _MERGE_CHUNK_ROWS], lora_A[i],
                                      alpha=self.scaling)
                    out[rows].copy_(acc)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """A merged layer saves its unmerged weight: a state dict means the same taken inside ``merged()`` or
        out of it, so loading one into an unmerged model cannot add the update twice."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            if self._unmerged_weight is not None:
                destination[prefix + "weight"] = self._unmerged_weight
            else:  # merged for good: the delta subtracted, as unmerge would (exact up to rounding)
                destination[prefix + "weight"] = self.weight.detach() - self.delta_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """Into a merged layer, the weight loads as its unmerged weight and the layer is merged again: a
        later ``unmerge`` then gives the loaded weight, not the one from before the load."""
        if not self.merged:
            return super()._load_from_state_dict(state_dict, prefix, *args)
        kept = self._unmerged_weight is not None
        self.unmerge(keep_buffer=False)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            if not kept and args[0].get("assign_to_params_buffers", False):
                # assign=True made the weight the caller's tensor: merge into a copy, not into it
                self.weight.data = self.weight.data.clone()
            self.merge(keep_unmerged=kept)

    def _apply(self, fn, recurse: bool = True):
        """``to``, ``double``, ``cuda``...: the kept pre-merge weight follows the weight, so ``unmerge`` after a
        conversion gives back the converted weight; the merge buffer is dropped (the next merge allocates)."""
        super()._apply(fn, recurse)
        if self._unmerged_weight is not None:
            self._unmerged_weight = fn(self._unmerged_weight)
        self._merge_buffer = None
        return self

    @torch.no_grad()
    def merge(self, keep_unmerged: bool = True) -> None:
        """Folds the adapter into ``weight``; idempotent. ``keep_unmerged`` holds the old weight (one extra
        copy of the layer's weight) so ``unmerge`` restores it bit-exactly; ``False`` frees it (deployment).

        The merged weight is written into the memory the previous merge used when ``unmerge`` kept it
        and nothing else still refers to it: memory the process has already touched, so a merge/unmerge
        cycle costs one pass of arithmetic over the weight and no page faults."""
        if self.merged:
            return
        base = self.weight.data
        buffer, self._merge_buffer = self._merge_buffer, None
        if not keep_unmerged:
            self._accumulate_delta(base, base)
        elif buffer is not None and _reusable(buffer, base):
            self._accumulate_delta(buffer, base)
            self._unmerged_weight, self.weight.data = base, buffer  # same Parameter: optimizers, hooks stay
        else:
            # New memory: a copy touches its pages in order, far faster than a GEMM's scattered first writes.
            merged = base.clone()
            self._accumulate_delta(merged, merged)
            self._unmerged_weight, self.weight.data = base, merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self, keep_buffer: bool = True) -> None:
        """Takes the adapter out of ``weight``; idempotent. Bit-exact when the merge kept the old weight,
        otherwise the delta is subtracted (exact up to rounding).

        ``keep_buffer`` keeps the merged weight's memory for the next ``merge`` (the layer then holds as
        much memory as while merged); ``False`` frees it. A merge reuses it only when nothing else refers
        to it: a tensor taken from ``weight`` while merged, or an autograd graph that saved the merged weight,
        keeps its values, and that merge allocates anew."""
        if not self.merged:
            if not keep_buffer:
                self._merge_buffer = None
            return
        if self._unmerged_weight is not None:
            merged = self.weight.data
            self.weight.data, self._unmerged_weight = self._unmerged_weight, None
            self._merge_buffer = merged if keep_buffer else None
        else:
            self.weight.data.sub_(self.delta_weight())
        self.merged = False
