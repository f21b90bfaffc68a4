import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRADropout, LoRALinear


def reference(layer: LoRALinear, x: torch.Tensor, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """base(x) + scaling * B(A(dropout(x))), one adapter per output slice, written the plain way."""
    dropped = x if dropped is None else dropped
    s, r, o = layer.splits, layer.r, layer.out_features // layer.splits
    parts = [
        dropped @ layer.lora_A[i * r:(i + 1) * r].T @ layer.lora_B[i * o:(i + 1) * o].T for i in range(s)
    ]
    return F.linear(x, layer.weight, layer.bias) + layer.scaling * torch.cat(parts, dim=-1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: bf16 keeps about 3 significant digits, so an element near zero can be off
    by far more than its own size while the whole tensor is right to ~0.4 %; a wrong formula is off by ~100 %."""
    return float((got - want).detach().norm() / want.detach().norm())


def make_layer(splits=1, bias=True, r=4, alpha=8.0, dropout=0.0, dtype=torch.float32, in_features=12):
    layer = LoRALinear(in_features, 3 * in_features, bias, r=r, alpha=alpha, dropout=dropout, splits=splits)
    nn.init.normal_(layer.lora_B, std=0.5)  # a trained-looking adapter: B = 0 would hide mistakes
    return layer.to(dtype)


def test_fresh_layer_is_bit_identical_to_its_base():
    base = nn.Linear(16, 48)
    layer = LoRALinear.from_linear(base, r=4, splits=3)
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("rows", [16, 400])  # 400 rows: the forward without autograd folds
def test_fresh_layer_is_bit_identical_to_its_base_on_an_input_that_is_not_contiguous(autocast, rows):
    torch.manual_seed(0)
    base = nn.Linear(384, 384)
    layer = LoRALinear.from_linear(base, r=4)
    x = torch.randn(2, 384, rows).transpose(1, 2)  # (2, rows, 384), as an attention's transposed heads come
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(layer(x), base(x))
        with torch.no_grad():
            assert torch.equal(layer(x), base(x))


def test_from_linear_shares_the_base_parameters():
    base = nn.Linear(16, 48)
    layer = LoRALinear.from_linear(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_attributes_and_shapes():
    layer = LoRALinear(8, 24, r=4, alpha=6.0, splits=3)
    assert (layer.r, layer.alpha, layer.scaling, layer.splits, layer.merged) == (4, 6.0, 1.5, 3, False)
    assert layer.lora_A.shape == (12, 8) and layer.lora_B.shape == (24, 4)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12), (12,)])
def test_forward_and_grads_match_reference_fp32(splits, bias, shape):
    layer = make_layer(splits, bias)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, reference(layer, x))
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B, layer.weight], grad_out)
    want = torch.autograd.grad(reference(layer, x), [x, layer.lora_A, layer.lora_B, layer.weight], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("splits", [1, 3])
def test_forward_and_grads_match_reference_bf16(splits):
    layer = make_layer(splits, dtype=torch.bfloat16, in_features=32)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    # Reference in fp32 from the same bf16 values: the fast path may only differ by bf16 rounding.
    ref_layer = make_layer(splits, in_features=32)
    ref_layer.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    xf = x.detach().float().requires_grad_()
    ref = reference(ref_layer, xf)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)
    out.float().sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(layer.lora_B.grad.float(), ref_layer.lora_B.grad, atol=0.2, rtol=0.03)
    torch.testing.assert_close(x.grad.float(), xf.grad, atol=0.1, rtol=0.03)


@pytest.mark.parametrize("splits", [1, 3])
def test_dropout_feeds_the_adapter_and_only_the_adapter(splits):
    layer = make_layer(splits, dropout=0.5).train()
    x = torch.randn(6, 12, requires_grad=True)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = layer.lora_dropout(x)  # the same draw: the layer's dropout is its first use of the RNG
    assert 0 < torch.count_nonzero(dropped) < dropped.numel()
    torch.testing.assert_close(out, reference(layer, x, dropped))  # base(x) sees the undropped input
    assert not torch.allclose(out, reference(layer, x))
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x))  # no dropout at inference


def check_dropout_keeps_the_right_share_and_is_unbiased(p, device):
    drop = LoRADropout(p).train()
    # The scale is 1 / the exact keep probability of the 16-bit draw, within 1/65,536 of 1 / (1 - p).
    keep_probability = (32768 - drop.threshold) / 65536
    assert abs(keep_probability - (1 - p)) <= 1 / 65536 and drop.scale == 1 / keep_probability
    x = torch.ones(400_003, device=device)  # not a multiple of 4: on the CPU the last 64-bit draw is partly used
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], drop.scale))
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout: the expectation is unchanged
    x.requires_grad_(True)
    drop(x).sum().backward()
    assert set(x.grad.unique().tolist()) == {0.0, torch.tensor(drop.scale).item()}


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lora_dropout_keeps_the_right_share_and_is_unbiased(p):
    check_dropout_keeps_the_right_share_and_is_unbiased(p, "cpu")


def test_lora_dropout_near_one_still_keeps_something_and_stays_unbiased():
    drop = LoRADropout(0.9999999).train()
    assert drop.threshold == 32767  # one int16 value of 65,536 keeps
    y = drop(torch.ones(4_000_000))
    assert 0 < torch.count_nonzero(y) < 200 and drop.scale == 65536


@pytest.mark.parametrize("p", [-0.5, 1.0, 1.5, True, "0.1"])
def test_lora_dropout_refuses_a_probability_outside_zero_to_one(p):
    with pytest.raises(ValueError, match=r"LoRADropout p must be a number in \[0, 1\)"):
        LoRADropout(p)
    drop = LoRADropout(0.1)
    with pytest.raises(ValueError, match=r"LoRADropout p must be a number in \[0, 1\)"):
        drop.p = p
    assert drop.p == 0.1 and drop.scale == LoRADropout(0.1).scale


def test_a_dropout_probability_set_later_is_the_one_the_mask_takes():
    """As with nn.Dropout (a dropout schedule sets p): the mask's threshold and scale follow the new p."""
    drop = LoRADropout(0.1).train()
    drop.p = 0.5
    y = drop(torch.ones(400_000))
    assert repr(drop) == "LoRADropout(p=0.5)" and abs((y == 0).float().mean().item() - 0.5) < 0.005
    assert set(y.unique().tolist()) == {0.0, 2.0}
    drop.p = 0
    assert torch.equal(drop(torch.ones(1000)), torch.ones(1000))


def test_an_alpha_set_later_is_the_one_the_forward_uses_and_rank_and_splits_stay_fixed():
    layer = make_layer(3)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)
    layer.alpha = 2.0
    assert layer.scaling == 2.0 / 4 and "alpha=2," in repr(layer)
    blocks = [layer.lora_B[i * 12:(i + 1) * 12] @ layer.lora_A[i * 4:(i + 1) * 4] for i in range(3)]
    want = F.linear(x, layer.weight, layer.bias) + 2.0 / 4 * x @ torch.cat(blocks).t()  # alpha 2 / r 4, written out
    torch.testing.assert_close(layer(x), want)
    for bad in (0, -1.0, float("inf"), "2"):
        with pytest.raises(ValueError, match="lora alpha must be a finite number > 0"):
            layer.alpha = bad
    assert layer.alpha == 2.0
    for name in ("r", "splits", "scaling"):
        with pytest.raises(AttributeError, match="has no setter"):
            setattr(layer, name, 1)
    layer.merge(keep_unmerged=False)  # the weight holds alpha 2's update, which unmerge takes out again
    with pytest.raises(RuntimeError, match="setting alpha on a merged LoRA layer would leave the old adapter"):
        layer.alpha = 8.0
    assert layer.alpha == 2.0


@pytest.mark.parametrize("shape", [(4, 6), (0, 6), (6,), (2, 12, 1)])
def test_an_input_of_the_wrong_width_names_both_widths(shape):
    with pytest.raises(ValueError, match=rf"LoRALinear\(12 -> 36\) got an input of shape {re.escape(str(shape))}.*must be 12"):
        make_layer(3)(torch.randn(shape))


@pytest.mark.parametrize("in_features, out_features, splits, bound",
                         [(4, 12, 1, 4), (16, 12, 3, 4), (16, 12, 1, 12)])
def test_an_r_beyond_what_the_layer_can_use_is_warned_of_where_the_layer_is_made(in_features, out_features, splits,
                                                                                  bound):
    message = rf"lora r={bound + 1} is more than this layer can use: .* = {bound}, so the other 1 add parameters"
    with pytest.warns(UserWarning, match=message) as built:
        LoRALinear(in_features, out_features, r=bound + 1, splits=splits)
        LoRALinear.from_linear(nn.Linear(in_features, out_features), r=bound + 1, splits=splits)
    assert [w.filename for w in built] == [__file__] * 2  # the caller's line, not the library's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRALinear(in_features, out_features, r=bound, splits=splits)
        LoRALinear.from_linear(nn.Linear(in_features, out_features), r=bound, splits=splits)


def test_reset_parameters_resets_the_adapter_too():
    layer = make_layer(3)  # B nonzero
    weight, lora_A = layer.weight.detach().clone(), layer.lora_A.detach().clone()
    layer.reset_parameters()  # what a module built on the meta device gets after to_empty()
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not torch.equal(layer.weight, weight) and not torch.equal(layer.lora_A, lora_A)


def test_cpu_masks_follow_torch_manual_seed_and_differ_between_draws():
    drop, x = LoRADropout(0.5).train(), torch.ones(64, 64)
    torch.manual_seed(7)
    first, second = drop.keep_mask(x), drop.keep_mask(x)
    torch.manual_seed(7)
    assert torch.equal(drop.keep_mask(x), first) and torch.equal(drop.keep_mask(x), second)
    assert not torch.equal(first, second)  # each layer of a step gets its own mask
    torch.manual_seed(8)
    assert not torch.equal(drop.keep_mask(x), first)


def check_dropout_under_vmap_keeps_torchs_randomness_rules(device):
    layer = make_layer(3, dropout=0.5).to(device).train()
    xs = torch.randn(1, 3, 12, device=device).expand(4, 3, 12)  # four equal samples
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(layer)(xs)  # randomness="error", vmap's default, as for nn.Dropout
    outs = torch.func.vmap(layer, randomness="different")(xs)
    assert not torch.allclose(outs[0], outs[1])
    outs = torch.func.vmap(layer, randomness="same")(xs)
    torch.testing.assert_close(outs[0], outs[3])
    drop = LoRADropout(0.1).train()  # the same keep probability and scale as outside vmap
    ys = torch.func.vmap(drop, randomness="different")(torch.ones(2, 200_000, device=device))
    kept = ys != 0
    assert abs(kept.float().mean().item() - drop.keep_probability) < 0.005
    torch.testing.assert_close(ys[kept], torch.full_like(ys[kept], drop.scale))


def test_dropout_under_vmap_keeps_torchs_randomness_rules():
    check_dropout_under_vmap_keeps_torchs_randomness_rules("cpu")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("rows, folds", [(18, False), (48, True)])  # a fold from 4*12*36/48 = 36 rows on
def test_inference_path_matches_reference(splits, rows, folds):
    layer = make_layer(splits).eval()
    x = torch.randn(2, rows // 2, 12)
    with torch.no_grad():
        assert layer._folds(x.view(-1, 12)) == folds  # the path this case is meant to cover
        torch.testing.assert_close(layer(x), reference(layer, x))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference(layer, x))
    assert layer._folds(x.view(-1, 12)) is False  # autograd on: never folds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_folded_forward_computes_what_merge_would_and_leaves_the_layer_unmerged(dtype, bias):
    layer = make_layer(3, bias=bias, dtype=dtype).eval()
    x = torch.randn(60, 12, dtype=dtype)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        assert layer._folds(x)
        folded = layer(x)
        assert not layer.merged and layer._merge_buffer is None
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), k
        want = reference(layer, x)
        folded_weight = layer._folded_weight()
        layer.merge()
        merged = layer(x)
    assert folded_weight.dtype == dtype
    if dtype == torch.bfloat16:  # both sum in fp32 and round once; the GEMMs differ (one vs one per split)
        off = (folded_weight.float() - layer.weight.float()).abs()
        assert (off <= torch.finfo(dtype).eps * layer.weight.float().abs()).all()  # at most one bf16 step
        assert relative_error(folded.float(), want.float()) < 1e-2
    else:
        torch.testing.assert_close(folded, merged, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(folded, want, rtol=1e-6, atol=1e-6)


def test_vmap_over_adapters_of_a_low_precision_layer_folds_out_of_place():
    layer = make_layer(3, dtype=torch.bfloat16).eval()
    x = torch.randn(60, 12, dtype=torch.bfloat16)
    stacked = torch.stack([layer.lora_B.detach(), 2 * layer.lora_B.detach()])
    with torch.no_grad():
        assert layer._folds(x)
        outs = torch.func.vmap(lambda b: torch.func.functional_call(layer, {"lora_B": b}, (x,)))(stacked)
        for b, out in zip(stacked, outs):  # vmap's batched GEMM may round bf16 differently
            assert relative_error(out.float(), torch.func.functional_call(layer, {"lora_B": b}, (x,)).float()) < 1e-2


def test_a_low_precision_layer_on_the_meta_device_still_merges():
    layer = LoRALinear(12, 36, r=4, splits=3, device="meta").to(torch.bfloat16)
    layer.merge()  # torch.autocast("meta", ...) would raise
    assert layer.merged and layer.weight.is_meta and layer.weight.dtype == torch.bfloat16


def test_a_folded_forward_under_autocast_sums_the_weight_in_fp32():
    layer = make_layer(3).eval()
    x = torch.randn(60, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._folds(x)
        weight = layer._folded_weight()
        folded = layer(x)
    # Autocast would run the sum in bf16, rounding W before the small delta is added; F.linear rounds the
    # fp32 sum instead, as it rounds a merged weight.
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, layer.weight + layer.delta_weight(), rtol=1e-6, atol=1e-6)
    assert folded.dtype == torch.bfloat16
    assert relative_error(folded.float(), reference(layer, x)) < 1e-2


@pytest.mark.parametrize("monte_carlo", [False, True])
def test_dropout_that_draws_a_mask_is_never_folded_away(monte_carlo):
    layer = make_layer(3, dropout=0.5).train()
    if monte_carlo:  # the dropout module alone in training mode, the rest of the model in eval
        layer.eval()
        layer.lora_dropout.train()
    x = torch.randn(60, 12)
    with torch.no_grad():
        assert not layer._folds(x)
        first, second = layer(x), layer(x)
        layer.eval()
        assert layer._folds(x)
        plain = layer(x)
    assert not torch.equal(first, second)  # a new mask per call
    assert not torch.allclose(first, plain, atol=1e-3)  # half the adapter's input was dropped


@pytest.mark.parametrize("splits", [1, 3])
def test_delta_weight_is_block_wise_b_times_a(splits):
    layer = make_layer(splits)
    s, r, o = splits, layer.r, layer.out_features // splits
    blocks = [layer.lora_B[i * o:(i + 1) * o] @ layer.lora_A[i * r:(i + 1) * r] for i in range(s)]
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * torch.cat(blocks, dim=0))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("keep_unmerged", [True, False])
def test_merged_output_equals_unmerged(splits, keep_unmerged):
    layer = make_layer(splits).eval()
    x = torch.randn(9, 12)
    w0 = layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge(keep_unmerged=keep_unmerged)
    assert layer.merged and not torch.equal(layer.weight, w0)
    merged = layer(x)  # the adapter path is skipped: it would add the delta a second time
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_and_unmerge_are_idempotent():
    layer = make_layer(3).eval()
    w0 = layer.weight.detach().clone()
    layer.merge()
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once)  # the delta was not added twice
    assert not torch.equal(once, w0)
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_thousand_merge_unmerge_cycles_leave_weights_bit_identical():
    layer = make_layer(3, in_features=64)
    w0 = layer.weight.detach().clone()
    param = layer.weight
    for _ in range(1000):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.weight, w0)
    assert layer.weight is param  # same Parameter object, so an optimizer still holds it


def test_unmerge_without_kept_weight_subtracts_the_delta():
    layer = make_layer(3)
    w0 = layer.weight.detach().clone()
    layer.merge(keep_unmerged=False)
    assert layer._unmerged_weight is None  # nothing extra held
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-6, rtol=1e-6)


def test_autocast_runs_float32_in_bf16_and_leaves_float64_alone():
    layer = make_layer(3, in_features=32)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    want = reference(layer, x)
    assert relative_error(low.float(), want) < 1e-2
    layer, x = layer.double(), x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float64  # autocast does not touch float64, and neither does the layer
    torch.testing.assert_close(out, reference(layer, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep_unmerged", [True, False])
def test_low_precision_merge_sums_in_fp32_and_rounds_once(dtype, keep_unmerged):
    layer = make_layer(3, dtype=dtype, in_features=300)  # 900 rows: several merge chunks
    w0 = layer.weight.detach().clone()
    s, r, o = 3, layer.r, layer.out_features // 3
    delta = torch.cat(
        [layer.lora_B[i * o:(i + 1) * o].float() @ layer.lora_A[i * r:(i + 1) * r].float() for i in range(s)]
    ) * layer.scaling
    expected = (w0.float() + delta).to(dtype)
    layer.merge(keep_unmerged=keep_unmerged)
    assert layer.weight.dtype == dtype
    assert torch.equal(layer.weight, expected)


def test_a_merge_under_autocast_still_sums_in_fp32():
    layer = make_layer(3, dtype=torch.float16, in_features=32)
    plain = copy.deepcopy(layer)
    plain.merge()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 sum would lose 3 of fp16's bits
        layer.merge()
    assert torch.equal(layer.weight, plain.weight)


def test_delta_weight_and_an_unmerge_without_the_kept_weight_under_autocast_stay_in_the_weights_precision():
    # unmerge() of a layer merged for good, and its state_dict(), subtract delta_weight(): under an enclosing
    # autocast a bf16 bmm would take the update to bf16's 3 digits, fp32 weights included.
    layer = make_layer(3, in_features=32)
    weight = layer.weight.detach().clone()
    s, r, o = layer.splits, layer.r, layer.out_features // layer.splits
    plain = layer.scaling * torch.cat([layer.lora_B[i * o:(i + 1) * o] @ layer.lora_A[i * r:(i + 1) * r]
                                       for i in range(s)]).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = layer.delta_weight()
        layer.merge(keep_unmerged=False)
        saved = layer.state_dict()["weight"]
        layer.unmerge()
    torch.testing.assert_close(delta, plain)
    torch.testing.assert_close(saved, weight)
    torch.testing.assert_close(layer.weight.detach(), weight)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(r=0), "r"),
        (dict(r=-2), "r"),
        (dict(r=2.5), "r"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(splits=5), "splits"),
        (dict(splits=0), "splits"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LoRALinear(8, 24, **kwargs)
    with pytest.raises(ValueError, match=word):
        LoRALinear.from_linear(nn.Linear(8, 24), **kwargs)


def test_numpy_scalars_are_lora_arguments_and_other_types_are_named():
    layer = LoRALinear(8, 24, r=np.int64(2), alpha=np.float32(4.0), dropout=np.float64(0.25), splits=np.int32(3))
    assert (layer.r, layer.alpha, layer.splits, layer.lora_dropout.p) == (2, 4.0, 3, 0.25)
    assert type(layer.r) is int and type(layer.splits) is int and layer.lora_A.shape == (6, 8)
    with pytest.raises(ValueError, match=r"lora dropout must be a number in \[0, 1\), got '0\.1' of type str"):
        LoRALinear(8, 24, dropout="0.1")
    with pytest.raises(ValueError, match=r"lora r must be a positive integer, got True of type bool"):
        LoRALinear(8, 24, r=True)
    with pytest.raises(ValueError, match=r"lora alpha must be a finite number > 0, got 1000"):
        LoRALinear(8, 24, alpha=10**400)  # too large for a float: an error of its own, not an OverflowError


@pytest.mark.parametrize("trainable", ["lora_A", "lora_B"])
def test_training_through_a_merged_layer_is_an_error(trainable):
    layer = make_layer(3).train()
    layer.merge()
    other = "lora_B" if trainable == "lora_A" else "lora_A"
    getattr(layer, other).requires_grad_(False)  # LoRA-FA trains B alone: the guard must see either
    with pytest.raises(RuntimeError, match="merged, so its adapters would get no gradient"):
        layer(torch.randn(2, 12))
    with torch.no_grad():
        layer(torch.randn(2, 12))  # inference through a merged layer is what merging is for
    layer.eval()
    layer(torch.randn(2, 12))


def test_training_the_weight_of_a_merged_layer_that_would_unmerge_to_its_old_weight_is_an_error():
    layer = make_layer(3).train()
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)  # the adapter fixed, the weight trained: unmerge would swap the step out
    layer.merge()
    with pytest.raises(RuntimeError, match="a training step on its weight would be lost at unmerge"):
        layer(torch.randn(2, 12))
    layer.unmerge()
    layer.merge(keep_unmerged=False)  # merged for good: unmerge subtracts the delta, so the step is kept
    layer(torch.randn(2, 12)).sum().backward()
    assert layer.weight.grad is not None


def test_a_merged_layer_with_nothing_trainable_runs_a_training_forward():
    """A frozen, merged backbone under a head that trains: no step of its own can be lost, so nothing is refused."""
    layer = make_layer(3).train()
    layer.requires_grad_(False)
    layer.merge()
    x = torch.randn(2, 12, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_a_later_merge_reuses_the_last_merged_weights_memory_with_new_values():
    layer = make_layer(3, in_features=64).eval()
    w0 = layer.weight.detach().clone()
    layer.merge()
    first = layer.weight.data_ptr()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    with torch.no_grad():
        layer.lora_B.mul_(-2.0)  # a training step changed the adapter since the last merge
    layer.merge()
    assert layer.weight.data_ptr() == first  # written into the kept memory, not a new allocation
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.delta_weight(), rtol=0, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_unmerge_can_free_the_merge_buffer():
    layer = make_layer(3)
    layer.merge()
    layer.unmerge(keep_buffer=False)
    assert layer._merge_buffer is None and layer._unmerged_weight is None
    layer.merge()
    layer.unmerge()
    assert layer._merge_buffer is not None
    layer.unmerge(keep_buffer=False)  # already unmerged: still frees
    assert layer._merge_buffer is None


def test_a_kept_buffer_of_another_dtype_is_not_reused():
    layer = make_layer(3)
    layer.merge()
    layer.unmerge()
    layer.double()  # the kept float32 buffer no longer fits the weight
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.delta_weight(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grads_with_dropout_match_reference_on_the_same_mask(splits, dtype, mask_kind):
    layer = make_layer(splits, dropout=0.3, dtype=dtype, in_features=32).train()
    x = torch.randn(2, 7, 32, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    # The same draw, taken as the mask itself: reading it off the dropped input would count an x that is
    # exactly 0 (bf16 randn makes some) as dropped.
    keep = layer.lora_dropout.keep_mask(x)
    assert keep.dtype == (torch.bool if mask_kind == "bool mask" else dtype)
    keep = keep.float() * layer.lora_dropout.scale
    # The reference in fp32 from the same values (for bf16: the fast path may differ by bf16 rounding).
    ref_layer = make_layer(splits, dropout=0.3, in_features=32)
    ref_layer.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    xf = x.detach().float().requires_grad_()
    want = reference(ref_layer, xf, xf * keep)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(out.float(), want, **tol)
    grad_out = torch.randn_like(want)
    got = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B], grad_out.to(dtype))
    ref = torch.autograd.grad(want, [xf, ref_layer.lora_A, ref_layer.lora_B], grad_out)
    # fp32: the sums run in another order (one 16-thread machine was 1.2e-5 off); a wrong formula is off by O(1).
    tol = dict(atol=5e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.2, rtol=0.03)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g.float(), w, **tol)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_hand_written_backward_passes_gradcheck(splits, dropout):
    layer = make_layer(splits, dropout=dropout, r=2, in_features=6).double().train()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, lora_A, lora_B):
        torch.manual_seed(0)  # one mask for every evaluation gradcheck makes
        return torch.func.functional_call(layer, {"lora_A": lora_A, "lora_B": lora_B}, (x,))

    assert torch.autograd.gradcheck(f, (x, layer.lora_A.detach().clone().requires_grad_(),
                                        layer.lora_B.detach().clone().requires_grad_()))


def test_a_frozen_base_and_an_input_without_grad_still_train_the_adapter():
    layer = make_layer(3).train()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 12)  # e.g. the first block of a frozen backbone: no gradient wanted for x
    grad_out = torch.randn(4, 36)
    got = torch.autograd.grad(layer(x), [layer.lora_A, layer.lora_B], grad_out)
    want = torch.autograd.grad(reference(layer, x), [layer.lora_A, layer.lora_B], grad_out)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_double_backward_matches_reference(splits, dropout, mask_kind):
    """A gradient penalty differentiates the backward itself; the adapter must take part in it."""
    layer = make_layer(splits, dropout=dropout).train()
    layer.weight.requires_grad_(False)
    pre = nn.Linear(12, 12)  # the loss below is linear in the output, so grad_out carries no history
    x = torch.randn(5, 12, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B]

    def penalty(forward):
        torch.manual_seed(3)  # the same dropout mask in both runs
        grad_x, = torch.autograd.grad(forward(torch.tanh(pre(x))).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), params)

    def plain(h):
        if not dropout:
            return reference(layer, h, h)
        keep = layer.lora_dropout.keep_mask(h)  # the same draw, applied as a plain product
        return reference(layer, h, h * keep.to(h.dtype) * layer.lora_dropout.scale)

    got, want = penalty(layer), penalty(plain)
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_dropout_adds_only_its_mask_to_what_backward_keeps(splits, mask_kind):
    """The masked input takes the input's place among the tensors kept for backward: dropout adds its mask
    (one byte an element as bool) and no second input-sized tensor."""
    def kept_bytes(dropout):
        layer = make_layer(splits, dropout=dropout, in_features=32).train()
        layer.weight.requires_grad_(False)
        x = torch.randn(64, 32, requires_grad=True)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(storages.values())

    mask_bytes = 64 * 32 * (1 if mask_kind == "bool mask" else 4)
    assert kept_bytes(0.3) - kept_bytes(0.0) == mask_bytes


def test_forward_ad_through_dropout_matches_reference_on_the_same_mask(mask_kind):
    layer = make_layer(3, dropout=0.3).train()
    x, tangent = torch.randn(5, 12), torch.randn(5, 12)
    torch.manual_seed(4)
    out, out_tangent = torch.func.jvp(layer, (x,), (tangent,))
    torch.manual_seed(4)
    keep = layer.lora_dropout.keep_mask(x).float() * layer.lora_dropout.scale
    want, want_tangent = torch.func.jvp(lambda h: reference(layer, h, h * keep), (x,), (tangent,))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out_tangent, want_tangent)


def test_torch_func_grad_vmap_and_forward_ad_match_reference():
    layer = make_layer(3).eval()
    params = {"lora_A": layer.lora_A.detach(), "lora_B": layer.lora_B.detach()}
    xs = torch.randn(4, 2, 12)

    def loss(p, x, forward):
        return torch.func.functional_call(layer, p, (x,)).square().sum() if forward is None else \
            forward(x, p).square().sum()

    def plain(x, p):  # reference() with the adapter weights taken from p
        r, o = layer.r, 12
        parts = [x @ p["lora_A"][i * r:(i + 1) * r].T @ p["lora_B"][i * o:(i + 1) * o].T for i in range(3)]
        return F.linear(x, layer.weight, layer.bias) + layer.scaling * torch.cat(parts, dim=-1)

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(params, xs, None)
    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(params, xs, plain)
    for k in params:
        torch.testing.assert_close(per_sample[k], want[k])
    tangent = torch.randn_like(xs[0])
    _, jvp_out = torch.func.jvp(lambda x: layer(x), (xs[0],), (tangent,))
    _, jvp_want = torch.func.jvp(lambda x: reference(layer, x), (xs[0],), (tangent,))
    torch.testing.assert_close(jvp_out, jvp_want)


def test_a_folded_forward_under_vmap_and_forward_ad_matches_reference():
    layer = make_layer(3).eval()
    xs, tangent = torch.randn(2, 40, 12), torch.randn(40, 12)
    with torch.no_grad():  # torch.func and forward-mode AD still run in here, through the folded weight
        assert layer._folds(xs[0])
        torch.testing.assert_close(torch.func.vmap(layer)(xs), reference(layer, xs))
        out, jvp_out = torch.func.jvp(layer, (xs[0],), (tangent,))
        torch.testing.assert_close(out, reference(layer, xs[0]))
        torch.testing.assert_close(jvp_out, tangent @ (layer.weight + layer.delta_weight()).T)
        with torch.autograd.forward_ad.dual_level():
            dual_B = torch.autograd.forward_ad.make_dual(layer.lora_B.detach(), torch.ones_like(layer.lora_B))
            out = torch.func.functional_call(layer, {"lora_B": dual_B}, (xs[0],))
            tangent_out = torch.autograd.forward_ad.unpack_dual(out).tangent
        with_B_plus_1 = torch.func.functional_call(layer, {"lora_B": layer.lora_B + 1}, (xs[0],))
    torch.testing.assert_close(tangent_out, with_B_plus_1 - reference(layer, xs[0]))  # the output is linear in B


def test_a_merge_never_overwrites_a_merged_weight_someone_still_holds():
    layer = make_layer(3).eval()
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 12, requires_grad=True)
    layer.merge()
    out = layer(x)  # the graph saves the merged weight
    snapshot = layer.weight.detach()  # someone keeps the merged weight: live, not copied
    first = snapshot.clone()
    layer.unmerge()
    with torch.no_grad():
        layer.lora_B.mul_(1.5)
    layer.merge()  # must not write the new merge into memory the graph or the snapshot still use
    assert layer.weight.data_ptr() != snapshot.data_ptr()
    assert torch.equal(snapshot, first)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 36) @ first)
    layer.unmerge()
    del out, snapshot
    buffer = layer._merge_buffer.data_ptr()
    layer.merge()  # nothing holds the buffer any more: reused
    assert layer.weight.data_ptr() == buffer


def test_a_merge_under_inference_mode_does_not_break_later_merges():
    layer = make_layer(3).eval()
    w0 = layer.weight.detach().clone()
    with torch.inference_mode():
        layer.merge()
        layer.unmerge()
    with torch.no_grad():
        layer.merge()  # the kept buffer is an inference tensor: not writable out here, so not reused
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.delta_weight(), rtol=0, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("reset", ["reset_lora_parameters", "reset_parameters"])
@pytest.mark.parametrize("keep_unmerged", [True, False])
def test_resetting_a_merged_layer_is_refused_and_changes_nothing(reset, keep_unmerged):
    layer = make_layer(3)
    nn.init.normal_(layer.lora_B)
    layer.merge(keep_unmerged=keep_unmerged)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"{reset}\(\) on a merged LoRA layer.*call unmerge\(\)"):
        getattr(layer, reset)()
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_an_assigned_state_dict_is_not_written_into_by_a_merged_layer():
    layer = make_layer(3).eval()
    nn.init.normal_(layer.lora_B)
    layer.merge(keep_unmerged=False)
    source = make_layer(3)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    values = {k: v.clone() for k, v in state.items()}
    layer.load_state_dict(state, assign=True)
    assert all(torch.equal(v, values[k]) for k, v in state.items())  # the caller's tensors: unchanged
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(source, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("assign", [False, True])
def test_a_state_dict_loaded_into_a_layer_merged_for_good_leaves_it_merged_for_good(assign):
    layer = make_layer(3).eval()
    layer.merge(keep_unmerged=False)  # deployment: no copy of the old weight held
    source = make_layer(3)
    layer.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()}, assign=assign)
    assert layer.merged and layer._unmerged_weight is None  # the load did not start holding a second weight
    torch.testing.assert_close(layer.weight.detach(), source.weight + source.delta_weight(), rtol=1e-6, atol=1e-6)


def test_converting_a_layer_frees_the_memory_kept_for_the_next_merge():
    layer = make_layer(3)
    layer.merge()
    layer.unmerge()
    assert layer._merge_buffer is not None
    layer.to(torch.bfloat16)  # the float32 buffer can never be reused now: keeping it would only hold memory
    assert layer._merge_buffer is None


def test_a_kept_buffer_is_not_reused_for_a_weight_of_another_dtype_loaded_by_assignment():
    layer = make_layer(3)
    layer.merge()
    layer.unmerge()  # keeps a float32 buffer
    layer.load_state_dict({k: v.detach().double() for k, v in layer.state_dict().items()}, assign=True)  # no _apply
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.delta_weight(), rtol=0, atol=1e-12)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_layer_merged_for_good_saves_its_weight_in_its_own_dtype(dtype):
    layer = make_layer(3, dtype=dtype)
    assert layer.delta_weight().dtype == dtype
    w0 = layer.weight.detach().clone()
    layer.merge(keep_unmerged=False)
    saved = layer.state_dict()["weight"]  # the delta subtracted again: a float32 delta would promote it
    assert saved.dtype == dtype
    assert relative_error(saved.float(), w0.float()) < 1e-2


@pytest.mark.parametrize("splits", [1, 3])
def test_a_penalty_on_the_adapters_own_gradient_reaches_its_input_and_a(splits):
    """B's gradient is A(x) times the output gradient: a penalty on it must differentiate through A(x), so the
    backward recomputes A(x) with history rather than reusing forward's, which has none."""
    layer = make_layer(splits).train()
    layer.weight.requires_grad_(False)
    pre = nn.Linear(12, 12)
    x = torch.randn(5, 12, requires_grad=True)

    def penalty(forward):
        grad_b, = torch.autograd.grad(forward(torch.tanh(pre(x))).sum(), layer.lora_B, create_graph=True)
        return torch.autograd.grad(grad_b.square().sum(), [x, layer.lora_A])

    got, want = penalty(layer), penalty(lambda h: reference(layer, h))
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_lora_dropout_on_its_own_passes_the_gradient_through_its_mask_times_its_scale(mask_kind):
    """Used alone (not inside LoRALinear), LoRADropout's backward is x's: the kept entries' gradient is scaled by
    1/(1-p) as their values are, for the bool mask CUDA draws as for the CPU's."""
    drop = LoRADropout(0.5).train()
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    torch.manual_seed(1)
    keep = drop.keep_mask(x.detach()).to(x.dtype)  # the same draw
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(y, x.detach() * keep * drop.scale)
    torch.testing.assert_close(x.grad, grad_out * keep * drop.scale)


def test_layer_defaults_are_the_documented_ones():
    """LoRALinear(in, out) and from_linear(linear) default to r=8, alpha=16 (scaling alpha/r = 2), no dropout and
    one split, as the README's API table says: a model built with the defaults must adapt as documented."""
    for layer in (LoRALinear(16, 48), LoRALinear.from_linear(nn.Linear(16, 48))):
        assert (layer.r, layer.alpha, layer.scaling, layer.splits) == (8, 16.0, 16.0 / 8, 1)
        assert isinstance(layer.lora_dropout, nn.Identity)
        assert layer.lora_A.shape == (8, 16) and layer.lora_B.shape == (48, 8)


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_either_adapter_matrix_trains_alone_when_the_other_is_frozen(frozen):
    """Freezing A (as LoRA-FA does) or B leaves the other matrix the gradient the plain formula gives: the backward
    decides per matrix which gradient is asked for, so B is not left without one when only A is frozen."""
    layer = make_layer(3).train()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    getattr(layer, frozen).requires_grad_(False)
    trained = layer.lora_B if frozen == "lora_A" else layer.lora_A
    x = torch.randn(4, 12)
    grad_out = torch.randn(4, 36)
    got, = torch.autograd.grad(layer(x), [trained], grad_out)
    want, = torch.autograd.grad(reference(layer, x), [trained], grad_out)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)


def test_forward_mode_ad_outside_torch_func_with_autograd_on_matches_reference():
    """``torch.autograd.forward_ad`` on its own (no torch.func transform), in training with autograd on: the layer
    takes the plain out-of-place update, whose tangent is the formula's (the in-place update has no forward formula)."""
    layer = make_layer(3).train()
    x, tangent = torch.randn(5, 12), torch.randn(5, 12)
    with torch.autograd.forward_ad.dual_level():
        out = torch.autograd.forward_ad.unpack_dual(layer(torch.autograd.forward_ad.make_dual(x, tangent)))
        want = torch.autograd.forward_ad.unpack_dual(reference(layer, torch.autograd.forward_ad.make_dual(x, tangent)))
    torch.testing.assert_close(out.primal, want.primal)
    torch.testing.assert_close(out.tangent, want.tangent)
