import copy
import os
import pickle
import shlex
import warnings

import pytest
import torch
from conftest import offline_hub, serving_hub
from safetensors.torch import load_file, save_file
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


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_a_model_that_is_no_vit_is_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"'{name}' is a \w+, not a ViT with a patch embedding"):
        vit.create_backbone(name)


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


def test_a_model_loaded_from_a_checkpoint_skips_the_random_initialisation_it_would_overwrite(tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_file(tiny_backbone().state_dict(), str(path))
    state = torch.get_rng_state()
    loaded = tiny_backbone(checkpoint_path=path)
    assert torch.equal(torch.get_rng_state(), state)  # nothing was drawn
    for key, value in load_file(str(path)).items():
        assert torch.equal(loaded.state_dict()[key], value), key
    tiny_backbone()
    assert not torch.equal(torch.get_rng_state(), state)  # as a model initialised at random draws


def test_buffers_a_checkpoint_leaves_out_are_computed_as_in_a_model_built_at_random(tmp_path):
    """An EVA's RoPE tables are not in its state dict: loading a file must not leave them as empty memory."""
    args = dict(img_size=28, embed_dim=32, depth=2, num_heads=2)
    source = vit.create_backbone("eva02_tiny_patch14_224", **args).eval()
    path = tmp_path / "eva.safetensors"
    save_file(source.state_dict(), str(path))
    assert "rope.pos_embed" not in load_file(str(path))  # what makes this case
    loaded = vit.create_backbone("eva02_tiny_patch14_224", checkpoint_path=path, **args).eval()
    buffers = dict(loaded.named_buffers())
    for name, value in source.named_buffers():
        assert torch.equal(buffers[name], value), name
    images = torch.randn(2, 3, 28, 28)
    assert torch.equal(loaded(images), source(images))


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
    ("encoder", r"'module\.patch_embed\.proj\.weight' \(in the file's \['encoder'\]\)"),  # IJEPA's, unwrapped
    ("model.model", "has no weight for layer"),  # nested deeper than timm unwraps: not loaded at all
    ("state_dict.model", "has no weight for layer"),
], ids=lambda v: v if "'" not in v and " " not in v else "")
def test_a_checkpoint_of_another_patch_size_is_refused_not_resampled(layout, named, tmp_path):
    """In every layout timm's filter unwraps: the kernel is found wherever the filter would resample it."""
    source = vit.create_backbone("vit_small_patch14_dinov2", img_size=32, patch_size=16, **TINY)
    state = source.state_dict()
    if layout == "visual.trunk.":
        state = {f"visual.trunk.{k}": v for k, v in state.items()}
    elif layout == "encoder":
        state = {"encoder": {f"module.{k}": v for k, v in state.items()}}
    elif layout != "flat":
        for wrapper in reversed(layout.split(".")):
            state = {wrapper: state}
    path = tmp_path / "patch16.pth"
    torch.save(state, path)
    refused = named if named.startswith("has no") else (rf"layer {named} has shape \(32, 3, 16, 16\), the model "
                                                         r"expects \(32, 3, 14, 14\)")
    with pytest.raises(ValueError, match=refused):
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


@pytest.mark.parametrize("freeze", ["vit.freeze_backbone", "lora.mark_only_lora_as_trainable"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_lora_gets_gradients_under_gradient_checkpointing(reentrant, freeze):
    """add_lora itself makes the blocks' input require grad: the adapters train however the rest is frozen."""
    model = tiny_backbone()
    vit.add_lora(model, r=4)
    (vit.freeze_backbone if freeze == "vit.freeze_backbone" else lora.mark_only_lora_as_trainable)(model)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    backward_under_checkpointing(model, reentrant)
    for name, layer in lora.lora_layers(model):
        assert layer.lora_A.grad is not None and torch.count_nonzero(layer.lora_A.grad) > 0, name
        assert layer.lora_B.grad is not None and torch.count_nonzero(layer.lora_B.grad) > 0, name


@pytest.mark.parametrize("hooked", [False, True])
def test_lora_alone_under_reentrant_checkpointing_needs_the_readme_s_hook_on_the_embedding(hooked):
    """The README's note for users of ``lora`` without ``vit.add_lora``: the trap is real, and its hook mends it."""
    model = tiny_backbone()
    lora.inject_lora(model, r=4)
    lora.mark_only_lora_as_trainable(model, extra=model.norm)  # a trained norm after the blocks: the loss has a grad
    if hooked:
        model.patch_embed.register_forward_hook(lambda m, args, out: out.requires_grad_())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "none of the inputs have requires_grad" when unhooked
        backward_under_checkpointing(model, reentrant=True)
    grads = [layer.lora_B.grad for _, layer in lora.lora_layers(model)]
    assert all(g is not None for g in grads) if hooked else all(g is None for g in grads)


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


def test_without_checkpointing_the_blocks_input_is_left_as_it_is():
    """Adapters train, but with checkpointing off nothing needs the gradient of the patch embedding's output."""
    model = tiny_backbone().train()
    vit.add_lora(model, r=4)
    vit.freeze_backbone(model)
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].requires_grad))
    model(torch.randn(2, 3, 28, 28)).sum().backward()
    assert seen == [False]
    assert all(layer.lora_A.grad is not None for _, layer in lora.lora_layers(model))


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


@pytest.mark.parametrize("unfreeze_last", [3, -1, True, 1.0])
def test_freeze_backbone_rejects_too_many_blocks(unfreeze_last):
    with pytest.raises(ValueError, match=rf"unfreeze_last must be an integer in \[0, 2\] .*got {unfreeze_last!r}"):
        vit.freeze_backbone(tiny_backbone(), unfreeze_last=unfreeze_last)


def test_a_misspelt_model_name_suggests_each_close_name_once():
    with pytest.raises(ValueError, match="unknown timm model 'vit_smal_patch14_dinov2'; did you mean ") as err:
        vit.create_backbone("vit_smal_patch14_dinov2")
    close = str(err.value).split("did you mean ")[1].rstrip("?").split(", ")
    assert close[0] == "vit_small_patch14_dinov2" and len(close) == len(set(close))


@pytest.mark.parametrize("img_size", [0, -14, True, 28.0])
def test_img_size_must_be_a_positive_integer(img_size):
    with pytest.raises(ValueError, match=rf"img_size must be a positive integer, got {img_size!r}$"):
        vit.create_backbone("vit_small_patch14_dinov2", img_size=img_size, **TINY)


def test_an_img_size_below_one_patch_suggests_a_size_of_at_least_one_patch():
    with pytest.raises(ValueError, match=r"img_size=10 is not divisible .* patch size 14; use 14$"):
        vit.create_backbone("vit_small_patch14_dinov2", img_size=10, **TINY)  # not "use 0 or 14", nor "14 or 14"
    with pytest.raises(ValueError, match=r"img_size=30 is not divisible .* patch size 14; use 28 or 42$"):
        vit.create_backbone("vit_small_patch14_dinov2", img_size=30, **TINY)


def test_a_local_checkpoint_replaces_the_download_of_pretrained_weights(tmp_path, monkeypatch):
    offline_hub(monkeypatch)  # asking timm for pretrained weights would fail: the file must be used instead
    source = tiny_backbone()
    path = tmp_path / "b.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = tiny_backbone(pretrained=True, checkpoint_path=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_checkpoint_holding_no_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError, match=r"list\.pth' holds a list, not a state dict"):
        tiny_backbone(checkpoint_path=path)


def test_an_unreadable_safetensors_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    """Permission denied (simulated: as root every file is readable) is our ValueError, not a traceback."""
    path = tmp_path / "backbone.safetensors"
    save_file(tiny_backbone().state_dict(), str(path))

    def refusing(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr("vit.backbone.load_file", refusing)
    with pytest.raises(ValueError, match=r"backbone\.safetensors' is not a readable safetensors file.*Permission denied"):
        tiny_backbone(checkpoint_path=path)


def test_an_openai_clip_kernel_of_another_patch_size_is_refused(tmp_path):
    """OpenAI CLIP names its patch kernel visual.conv1.weight; timm's filter would resample it too."""
    path = tmp_path / "clip.pth"
    torch.save({"visual.class_embedding": torch.zeros(32), "visual.conv1.weight": torch.zeros(32, 3, 16, 16)}, path)
    with pytest.raises(ValueError, match=r"layer 'visual\.conv1\.weight' has shape \(32, 3, 16, 16\), the model "
                                         r"expects \(32, 3, 14, 14\)"):
        tiny_backbone(checkpoint_path=path)


def test_a_classifier_head_in_the_checkpoint_is_dropped_or_loaded_as_the_model_has_one(tmp_path):
    """A timm checkpoint with its ImageNet head loads into the headless backbone, and into one with a head."""
    source = tiny_backbone(num_classes=10)
    path = tmp_path / "classifier.safetensors"
    save_file(source.state_dict(), str(path))
    headless = tiny_backbone(checkpoint_path=path)
    assert torch.equal(headless.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    headed = tiny_backbone(num_classes=10, checkpoint_path=path)
    assert torch.equal(headed.head.weight, source.head.weight) and torch.equal(headed.head.bias, source.head.bias)


def test_a_checkpoint_missing_a_weight_names_it(tmp_path):
    state = dict(tiny_backbone().state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"has no weight for layer 'blocks\.1\.mlp\.fc2\.bias' of VisionTransformer"):
        tiny_backbone(checkpoint_path=path)


@pytest.mark.parametrize("merged", [False, True])
def test_base_weights_load_into_an_adapted_backbone_and_keep_its_adapters(tmp_path, merged):
    """LoRALinear keeps nn.Linear's keys, so a base checkpoint loads after add_lora as before it."""
    source = tiny_backbone()
    path = tmp_path / "base.safetensors"
    save_file(source.state_dict(), str(path))
    model = tiny_backbone()
    vit.add_lora(model, r=4)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    adapters = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    if merged:
        lora.merge_lora(model)
    vit.load_backbone_checkpoint(model, path)
    lora.unmerge_lora(model)
    assert all(torch.equal(v, lora.lora_state_dict(model)[k]) for k, v in adapters.items())
    expected = tiny_backbone(checkpoint_path=path)  # loaded first, then adapted with these adapters
    vit.add_lora(expected, r=4)
    lora.load_lora_state_dict(expected, adapters)
    assert model.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # A base weight the file lacks is still an error, adapters or not.
    state = dict(source.state_dict())
    del state["blocks.0.attn.qkv.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"has no weight for layer 'blocks\.0\.attn\.qkv\.weight'"):
        vit.load_backbone_checkpoint(model, tmp_path / "missing.safetensors")
    # So is an adapter a file with adapters lacks (the model's own would stay beside the file's others).
    state = dict(model.state_dict())
    del state["blocks.0.attn.qkv.lora_B"]
    save_file(state, str(tmp_path / "adapter_missing.safetensors"))
    with pytest.raises(ValueError, match=r"has no weight for layer 'blocks\.0\.attn\.qkv\.lora_B'"):
        vit.load_backbone_checkpoint(model, tmp_path / "adapter_missing.safetensors")


def test_a_checkpoint_whose_inner_layer_does_not_fit_names_it_and_both_shapes(tmp_path):
    """The same width and patch size, another MLP width: not the patch kernel, a block's layer is named."""
    path = tmp_path / "mlp2.safetensors"
    save_file(tiny_backbone(mlp_ratio=2).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.mlp\.fc1\.weight' has shape \(64, 32\), the model "
                                         r"expects \(128, 32\)"):
        tiny_backbone(checkpoint_path=path)


@pytest.mark.parametrize("layout", ["beside the weights", "beside a state_dict"])
def test_a_model_entry_that_holds_no_weights_is_passed_over(tmp_path, layout):
    """Some trainers save the model's name under "model"; timm's filter would take it for the weights and fail."""
    source = tiny_backbone()
    state = dict(source.state_dict())
    saved = {"model": "vit_small_patch14_dinov2", **state} if layout == "beside the weights" else \
        {"model": "vit_small_patch14_dinov2", "state_dict": state}
    path = tmp_path / "named.pth"
    torch.save(saved, path)
    loaded = tiny_backbone(checkpoint_path=path)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_a_model_that_is_no_vit_is_a_clear_error_with_img_size_too(name):
    # train.py always passes img_size, which a ResNet's constructor refuses with a TypeError of its own.
    with pytest.raises(ValueError, match=rf"'{name}' is a \w+, not a ViT with a patch embedding"):
        vit.create_backbone(name, img_size=56)


def test_checkpoint_path_that_is_a_folder_is_called_a_folder(tmp_path):
    # It exists: "does not exist" sent the user looking for a file that is there.
    with pytest.raises(IsADirectoryError, match="is a folder; give the .safetensors or .pth file itself"):
        tiny_backbone(checkpoint_path=tmp_path)


def test_add_lora_defaults_are_the_documented_ones():
    """add_lora(backbone) gives every block's qkv q/k/v adapters with r=8, alpha=16 and no dropout, the settings
    the README's DINOv2 recipe and its parameter count rest on."""
    model = tiny_backbone()
    assert vit.add_lora(model) == [f"blocks.{i}.attn.qkv" for i in range(TINY["depth"])]
    for _, layer in lora.lora_layers(model):
        assert (layer.r, layer.alpha, layer.scaling, layer.splits) == (8, 16.0, 16.0 / 8, 3)
        assert isinstance(layer.lora_dropout, torch.nn.Identity)


def test_add_lora_on_every_linear_layer_of_a_dinov2_base_block_counts_what_each_layer_s_shape_gives():
    """qkv keeps its three adapters; proj, fc1 and fc2 get one each. r = 8 on DINOv2-base: per block
    3 (768 r + r 768) + (768 r + r 768) + (768 r + r 3072) + (3072 r + r 768), the qkv's 442,368 among them."""
    import timm

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch14_dinov2", num_classes=0)
    names = vit.add_lora(model, targets=("fc2", "qkv", "fc1", "proj"))
    assert names == [f"blocks.{i}.{layer}" for i in range(12) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert {n: l.splits for n, l in lora.lora_layers(model) if n.startswith("blocks.0.")} == {
        "blocks.0.attn.qkv": 3, "blocks.0.attn.proj": 1, "blocks.0.mlp.fc1": 1, "blocks.0.mlp.fc2": 1}
    lora.mark_only_lora_as_trainable(model)
    per_block = 3 * (768 * 8 + 8 * 768) + (768 * 8 + 8 * 768) + 2 * (768 * 8 + 8 * 3072)
    assert lora.count_parameters(model)[0] == 12 * per_block == 442_368 + 884_736


@pytest.mark.parametrize("targets", ["qkv", (), ("qkv", "mlp")])
def test_add_lora_targets_are_a_tuple_of_the_layer_names_it_knows(targets):
    with pytest.raises(ValueError, match="add_lora targets are some of qkv, proj, fc1, fc2"):
        vit.add_lora(tiny_backbone(), targets=targets)


def test_add_lora_targets_only_the_blocks_and_refuses_a_layer_a_block_lacks_before_adapting_any():
    """An attention-pool head (global_pool='map', SigLIP's default) has an mlp.fc1 and fc2 of its own, outside the
    blocks and outside forward_features: no adapter goes there. A model whose blocks lack a target (a SwiGLU MLP
    with fc1_g and fc1_x) is refused with no layer adapted."""
    model = tiny_backbone(global_pool="map")
    assert hasattr(model.attn_pool.mlp, "fc1")
    assert vit.add_lora(model, targets=("fc1", "fc2")) == [f"blocks.{i}.mlp.{fc}" for i in range(TINY["depth"])
                                                           for fc in ("fc1", "fc2")]
    swiglu = tiny_backbone()
    for block in swiglu.blocks:
        block.mlp.fc1_g, block.mlp.fc1_x = block.mlp.fc1, torch.nn.Linear(32, 128)
        del block.mlp.fc1
    with pytest.raises(ValueError, match="add_lora target 'fc1': block 0 of this model has no linear layer mlp.fc1"):
        vit.add_lora(swiglu, targets=("qkv", "fc1"))
    assert list(lora.lora_layers(swiglu)) == []


def test_the_config_s_lora_targets_are_vit_s():
    from vqa.config import LORA_TARGETS

    assert LORA_TARGETS == tuple(vit.LORA_TARGETS)


def test_a_checkpoint_with_a_flattened_patch_kernel_loads_as_timm_loads_it(tmp_path):
    """Old timm checkpoints hold the patch embedding as a linear layer's (embed_dim, 3 * p * p) matrix, which timm's
    filter reshapes to the conv kernel: only a 4-D kernel is compared with the model's, so such a file still loads."""
    source = tiny_backbone()
    state = source.state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].flatten(1)  # (32, 3 * 14 * 14)
    path = tmp_path / "backbone.safetensors"
    save_file(state, str(path))
    loaded = tiny_backbone(checkpoint_path=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("kwargs, problem", [
    (dict(drop_path=0.1), "with drop_path=0.1: TypeError: VisionTransformer.__init__() got an unexpected keyword "
                          "argument 'drop_path'"),
    (dict(depth="two"), "with depth='two': TypeError"),
    (dict(embed_dim=33), "with embed_dim=33: AssertionError: dim should be divisible by num_heads"),
    (dict(act_layer="gelu_fast"), "with act_layer='gelu_fast': KeyError: 'gelu_fast'"),
    (dict(num_heads=0), "with num_heads=0: ZeroDivisionError"),
    (dict(name="x"), "with name='x': TypeError"),  # timm's to refuse: no argument of create_backbone's own
])
def test_arguments_timm_cannot_build_with_are_named_with_timm_s_reason(kwargs, problem):
    with pytest.raises(ValueError) as e:
        vit.create_backbone("vit_small_patch14_dinov2", img_size=28, **kwargs)
    assert str(e.value).startswith(f"timm cannot build 'vit_small_patch14_dinov2' {problem}")


def test_pretrained_weights_that_do_not_fit_the_shape_the_arguments_build_are_a_clear_error(monkeypatch):
    """timm loads the hub's weights for the model as named, strictly: into one block fewer they do not fit, and
    the error quotes torch's first reason (cut short: it lists every key) rather than its heading."""
    serving_hub(monkeypatch, tiny_backbone().state_dict())  # TINY's two blocks
    assert len(tiny_backbone(pretrained=True).blocks) == TINY["depth"]  # as named, the weights load
    with pytest.raises(ValueError, match=r"the pretrained weights of 'vit_small_patch14_dinov2' do not fit the model "
                                         r"embed_dim=32, depth=1, num_heads=2, init_values=0.5 builds \(Unexpected "
                                         r"key\(s\) in state_dict: \"blocks\.1\.norm1\.weight\", .*\.\.\.\); build it "
                                         r"as pretrained, without those arguments, or give weights of that shape as "
                                         r"checkpoint_path$"):
        vit.create_backbone("vit_small_patch14_dinov2", img_size=28, pretrained=True, **{**TINY, "depth": 1})


@pytest.mark.parametrize("message", ["PytorchStreamReader failed reading zip archive: failed finding central directory",
                                     ""])
def test_another_failure_of_a_pretrained_load_is_not_blamed_on_the_arguments(monkeypatch, message):
    """A damaged file in the hub's cache, say: timm's own error, as without arguments, not a shape that does not fit."""
    import timm

    build = timm.create_model

    def damaged(name, pretrained=False, **kwargs):
        model = build(name, **kwargs)
        if pretrained:
            raise RuntimeError(message)
        return model

    monkeypatch.setattr(timm, "create_model", damaged)
    with pytest.raises(RuntimeError) as e:
        tiny_backbone(pretrained=True, drop_path_rate=0.1)
    assert str(e.value) == message
