"""torch.compile: the LoRA layer traces into one graph, and compiled results equal eager ones."""
import shutil

import pytest
import torch
from torch import nn

from lora import LoRALinear


# The CPU and CUDA draw their dropout masks differently (see LoRADropout); CI has no CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def trained_layer(splits=3, dropout=0.0, device="cpu"):
    layer = LoRALinear(16, 48, r=4, splits=splits, dropout=dropout, device=device)
    nn.init.normal_(layer.lora_B, std=0.5)
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_graph_breaks_in_the_lora_layer(splits, dropout, device):
    torch._dynamo.reset()
    layer = trained_layer(splits, dropout, device).train()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 5, 16, device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_a_folded_forward_compiles_without_graph_breaks_and_equals_eager():
    torch._dynamo.reset()
    layer = trained_layer(3).eval()
    x = torch.randn(64, 16)  # 64 * (16 + 48) >= 4 * 16 * 48: the forward folds
    with torch.no_grad():
        assert layer._folds(x)
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_forward_and_backward_equal_eager(splits, dropout, device, mask_kind):
    torch._dynamo.reset()
    layer = trained_layer(splits, dropout, device).train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # functionalises the in-place update
    x = torch.randn(3, 7, 16, device=device, requires_grad=True)
    torch.manual_seed(1)  # the same dropout mask in both
    eager_out = layer(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, layer.lora_A, layer.lora_B])
    torch.manual_seed(1)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, layer.lora_A, layer.lora_B])
    torch.testing.assert_close(out, eager_out)
    # Compiled B is block-diagonal, eager B per split: another fp32 sum order, whose rounding depends on the
    # thread count (3.7e-5 on a gradient of 1.1 with 16 threads, torch 2.11); a wrong formula is off by O(1).
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_inductor_forward_equals_eager():
    torch._dynamo.reset()
    layer = trained_layer(3).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)
