import copy
import os
import pickle
import shlex

import pytest
import torch
from conftest import offline_hub
from safetensors.torch import save_file
from timm.layers import set_reentrant_ckpt

import lora
import vit

TINY = dict(embed_dim=32, depth=2, num_heads=2, init_values=0.5)


def tiny_backbone(**kwargs):
    return vit.create_backbone("vit_small_patch14_dinov2", img_size=28, **TINY, **kwargs)


def test_backbone_has_no_head_and_expected_width():
    model = tiny_backbone()
    assert model.num_classes == 0
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 32)


def test_unknown_model_suggests_a_name():
    with pytest.raises(ValueError, match="unknown timm model 'vit_small_patch14_dinov3'.*vit_small_patch14_dinov2"):
        vit.create_backbone("vit_small_patch14_dinov3")


def test_img_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="img_size=30 is not divisible by .* patch size 14; use 28 or 42"):
        vit.create_backbone("vit_small_patch14_dinov2", img_size=30, **TINY)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_loads_exactly(tmp_path, suffix):
    source = tiny_backbone()
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": source.state_dict()}, path)
    loaded = tiny_backbone(checkpoint_path=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_position_embeddings_are_resampled(tmp_path):
    source = vit.create_backbone("vit_small_patch14_dinov2", img_size=56, **TINY)
    path = tmp_path / "b.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = tiny_backbone(checkpoint_path=path)  # 28 px: 2x2 patches instead of 4x4
    assert loaded.pos_embed.shape == (1, 5, 32)
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_checkpoint_that_does_not_fit_names_the_layer(tmp_path):
    path = tmp_path / "b.safetensors"
    save_file(vit.create_backbone("vit_small_patch14_dinov2", img_size=28, **{**TINY, "embed_dim": 64}).state_dict(),
              str(path))
    with pytest.raises(ValueError, match=r"layer '.*' has shape \(.*64.*\), the model expects \(.*32.*\)"):
        tiny_backbone(checkpoint_path=path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_backbone(checkpoint_path=tmp_path / "none.pth")


def test_pretrained_weights_out_of_reach_is_a_clear_error(monkeypatch):
    offline_hub(monkeypatch)
    with pytest.raises(FileNotFoundError, match="pretrained weights of 'vit_small_patch14_dinov2'.*checkpoint_path"):
        tiny_backbone(pretrained=True)


class Payload:
    """Unpickling this would create a marker file: the attack a weights file must not be able to make."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class ShellPayload(Payload):
    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))  # torch names its module blocked


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "torch.save, a shell command"])
def test_pickle_payload_in_checkpoint_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"model": Payload(str(marker))}, f)
    else:
        torch.save({"model": (ShellPayload if "shell" in writer else Payload)(str(marker))}, path)
    with pytest.raises(ValueError, match="safely") as refused:
        tiny_backbone(checkpoint_path=path)
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # torch's advice to load it unsafely is not passed on
    if writer != "pickle":  # torch's diagnosis names the function the file would have called
        assert "GLOBAL" in str(refused.value) and "allowlist" not in str(refused.value)


@pytest.mark.parametrize("layout, named", [
    ("flat", "'patch_embed.proj.weight'"),
    ("model", r"'patch_embed\.proj\.weight' \(in the file's \['model'\]\)"),
    ("state_dict", r"'patch_embed\.proj\.weight' \(in the file's \['state_dict'\]\)"),
    ("model.state_dict", r"'patch_embed\.proj\.weight' \(in the file's \['model'\]\['state_dict'\]\)"),
    ("visual.trunk.", r"'visual\.trunk\.patch_embed\.proj\.weight'"),  # OpenCLIP's prefix, which timm strips
], ids=lambda v: v if "'" not in v else "")
def test_a_checkpoint_of_another_patch_size_is_refused_not_resampled(layout, named, tmp_path):
    """In every layout timm's filter unwraps: the kernel is found wherever the filter would resample it."""
    source = vit.create_backbone("vit_small_patch14_dinov2", img_size=32, patch_size=16, **TINY)
    state = source.state_dict()
    if layout == "visual.trunk.":
        state = {f"visual.trunk.{k}": v for k, v in state.items()}
    elif layout != "flat":
        for wrapper in reversed(layout.split(".")):
            state = {wrapper: state}
    path = tmp_path / "patch16.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"layer {named} has shape \(32, 3, 16, 16\), the model "
                                         r"expects \(32, 3, 14, 14\)"):
        tiny_backbone(checkpoint_path=path)  # timm's filter would resample the kernel: other features


def test_only_the_weights_timm_loads_are_checked_for_their_patch_size(tmp_path):
    """A distillation checkpoint: the student under 'model', a teacher of another patch size beside it."""
    teacher = vit.create_backbone("vit_small_patch14_dinov2", img_size=32, patch_size=16, **TINY)
    student = tiny_backbone()
    path = tmp_path / "distilled.pth"
    torch.save({"model": student.state_dict(), "teacher": teacher.state_dict()}, path)
    loaded = tiny_backbone(checkpoint_path=path)
    assert torch.equal(loaded.patch_embed.proj.weight, student.patch_embed.proj.weight)


def test_a_checkpoint_with_weights_the_model_lacks_names_one(tmp_path):
    state = dict(tiny_backbone().state_dict())
    state["blocks.9.extra"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match=r"has weights the model lacks, e\.g\. 'blocks\.9\.extra' \(1 in all\)"):
        tiny_backbone(checkpoint_path=path)


def test_a_damaged_safetensors_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 32)}, path)
    path.write_bytes(path.read_bytes()[:-20])  # cut short, as by a full disk or an interrupted copy
    with pytest.raises(ValueError, match=r"backbone\.safetensors' is not a readable safetensors file.*save it again"):
        tiny_backbone(checkpoint_path=path)


def backward_under_checkpointing(model, reentrant: bool) -> None:
    """One training backward with timm's gradient checkpointing on, reentrant or not."""
    model.set_grad_checkpointing(True)
    model.train()
    set_reentrant_ckpt(reentrant)
    try:
        model(torch.randn(2, 3, 28, 28)).pow(2).sum().backward()
    finally:
        set_reentrant_ckpt(False)


@pytest.mark.parametrize("reentrant", [False, True])
def test_lora_gets_gradients_under_gradient_checkpointing(reentrant):
    model = tiny_backbone()
    vit.add_lora(model, r=4)
    vit.freeze_backbone(model)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    backward_under_checkpointing(model, reentrant)
    for name, layer in lora.lora_layers(model):
        assert layer.lora_A.grad is not None and torch.count_nonzero(layer.lora_A.grad) > 0, name
        assert layer.lora_B.grad is not None and torch.count_nonzero(layer.lora_B.grad) > 0, name


@pytest.mark.parametrize("copied", [False, True])
def test_unfrozen_blocks_without_lora_get_gradients_under_reentrant_checkpointing(copied):
    model = tiny_backbone()
    vit.freeze_backbone(model, unfreeze_last=1)  # the partial fine-tuning baseline: no adapter at all
    if copied:  # a copy's hook must read the copy's settings, not the original's
        model = copy.deepcopy(model)
    backward_under_checkpointing(model, reentrant=True)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) > 2 and any(n.startswith("blocks.1.") for n, _ in trained)
    for name, p in trained:
        assert p.grad is not None, name


def test_a_frozen_backbone_is_not_back_propagated_through_under_checkpointing():
    model = tiny_backbone()
    vit.freeze_backbone(model)  # nothing in the blocks trains: forcing a gradient through them would be waste
    model.set_grad_checkpointing(True)
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].requires_grad))
    model(torch.randn(2, 3, 28, 28))
    assert seen == [False]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointed_gradients_equal_plain_gradients(reentrant, dropout):
    model = tiny_backbone().train()
    vit.add_lora(model, r=4, dropout=dropout)
    vit.freeze_backbone(model)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        set_reentrant_ckpt(reentrant)
        torch.manual_seed(7)  # checkpointing replays the RNG, so the recomputed dropout masks match too
        try:
            model(x).pow(2).sum().backward()
        finally:
            set_reentrant_ckpt(False)
        grads.append([g.grad.clone() for _, layer in lora.lora_layers(model) for g in (layer.lora_A, layer.lora_B)])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain)


@pytest.mark.parametrize("unfreeze_last", [0, 1, 2])
def test_freeze_backbone_keeps_lora_and_last_blocks_trainable(unfreeze_last):
    model = tiny_backbone()
    vit.add_lora(model, r=4)
    vit.freeze_backbone(model, unfreeze_last=unfreeze_last)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB"}
    for i in range(2 - unfreeze_last, 2):
        expected |= {n for n, _ in model.named_parameters() if n.startswith(f"blocks.{i}.")}
    if unfreeze_last:
        expected |= {"norm.weight", "norm.bias"}
    assert trainable == expected


def test_freeze_backbone_rejects_too_many_blocks():
    with pytest.raises(ValueError, match=r"unfreeze_last must be an integer in \[0, 2\]"):
        vit.freeze_backbone(tiny_backbone(), unfreeze_last=3)


def test_a_misspelt_model_name_suggests_each_close_name_once():
    with pytest.raises(ValueError, match="unknown timm model 'vit_smal_patch14_dinov2'; did you mean ") as err:
        vit.create_backbone("vit_smal_patch14_dinov2")
    close = str(err.value).split("did you mean ")[1].rstrip("?").split(", ")
    assert close[0] == "vit_small_patch14_dinov2" and len(close) == len(set(close))
