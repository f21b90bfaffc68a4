"""The CUDA paths: bf16 autocast through the LoRA layer, merging on the GPU, a training step and train.py.

Skipped where torch sees no CUDA device (CI has none); on a GPU machine the README's ``pytest -q`` runs them.
"""
import json

import pytest
import torch
from torch import nn

import lora
from conftest import tiny_vit
from test_lora_layer import (check_dropout_keeps_the_right_share_and_is_unbiased,
                             check_dropout_under_vmap_keeps_torchs_randomness_rules, make_layer, reference,
                             relative_error)
from test_train import cli, tiny_config
from vqa import DeterministicVQA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_autocast_matches_the_fp32_formula_and_keeps_fp32_gradients(splits, dropout):
    layer = make_layer(splits, dropout=dropout, in_features=64).to(CUDA).train()
    x = torch.randn(4, 9, 64, device=CUDA, requires_grad=True)
    torch.manual_seed(3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.manual_seed(3)  # the same draw as the forward's mask
    keep = layer.lora_dropout.keep_mask(x) * layer.lora_dropout.scale if dropout else torch.ones_like(x)
    want = reference(layer, x, x * keep)
    assert relative_error(out.float(), want) < 1e-2
    grad_out = torch.randn_like(want)
    params = [x, layer.lora_A, layer.lora_B]
    got = torch.autograd.grad(out, params, grad_out.bfloat16())
    ref = torch.autograd.grad(want, params, grad_out)
    for g, w in zip(got, ref):
        assert g.dtype == torch.float32  # the optimizer sees fp32 gradients for fp32 parameters
        assert relative_error(g, w) < 1e-2


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gpu_dropout_mask_is_one_byte_an_element_with_the_right_share(p):
    assert lora.LoRADropout(p).train().keep_mask(torch.ones(8, device=CUDA, dtype=torch.bfloat16)).dtype == torch.bool
    check_dropout_keeps_the_right_share_and_is_unbiased(p, CUDA)


def test_gpu_dropout_under_vmap_keeps_torchs_randomness_rules():
    check_dropout_under_vmap_keeps_torchs_randomness_rules(CUDA)


@pytest.mark.parametrize("rows", [16, 4096])  # the update added to the output, then the fold (from 192 rows)
def test_bf16_inference_on_the_gpu_matches_the_fp32_formula(rows):
    layer = make_layer(3, in_features=64).to(CUDA).eval()
    x = torch.randn(rows, 64, device=CUDA)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer._folds(x) == (rows >= 192)
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), reference(layer, x)) < 1e-2


def test_merge_on_the_gpu_equals_the_unmerged_model_and_unmerges_bit_exactly():
    model = tiny_vit().to(CUDA).eval()
    lora.inject_lora(model, r=4)
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 28, 28, device=CUDA)
    with torch.no_grad():
        unmerged = model(x)
        for _ in range(3):  # the second and third merge write into the kept buffer
            with lora.merged(model):
                merged = model(x)
            torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_training_step_on_the_gpu_reaches_every_adapter_and_no_frozen_weight():
    torch.manual_seed(0)
    model = DeterministicVQA(vision_model="vit_small_patch14_dinov2", img_size=28, vocab_size=20, num_answers=5,
                             hidden_dim=32, num_heads=2, question_layers=1, vision_lora_r=4,
                             backbone_kwargs=dict(depth=2)).to(CUDA).train()
    model.freeze_pretrained()
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.1)
    pixels = torch.randn(4, 3, 28, 28, device=CUDA)
    ids = torch.randint(3, 20, (4, 6), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(pixels, ids, None, torch.arange(4, device=CUDA))
        loss = nn.functional.cross_entropy(out.logits.float(), torch.randint(0, 5, (4,), device=CUDA))
    loss.backward()
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert len(adapters) == 2 * 2  # two blocks, A and B each
    for name, p in adapters.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(f"backbone.{n}").grad is None for n in frozen)


def test_train_py_on_cuda_trains_evaluates_and_resumes(tmp_path):
    cli("train.py", "--config", str(tiny_config(tmp_path, device="cuda")))
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["count"] == 4 * 5
    result = cli("train.py", "--resume", str(run), "--epochs", "3")
    assert "resuming" in result.stdout and "epoch 3:" in result.stdout
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert "cuda" in state["rng_per_process"][0]  # the GPU's generator is part of the saved random state


def test_predict_runs_the_model_under_the_autocast_evaluation_uses(tmp_path):
    """On CUDA evaluation runs the model under bf16 autocast; predict does too, so the two give the same answers."""
    from vqa.data import build_transform
    from vqa.predict import predict
    from vqa.run_files import load_run

    cli("train.py", "--config", str(tiny_config(tmp_path)), "--epochs", "1")
    model, tokenizer, answers, cfg = load_run(tmp_path / "run", CUDA)
    seen = []
    model.backbone.patch_embed.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cuda")))
    image = sorted((tmp_path / "data" / "images").glob("val_*.png"))[0]
    predict(model, tokenizer, answers, build_transform(model.backbone, cfg.model.img_size), image, "How many circles?")
    assert seen == [True]
