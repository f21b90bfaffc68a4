import copy
import re

import pytest
import timm
import torch
from conftest import tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file
import torch.nn.functional as F
from torch import nn

import lora
from lora import LoRALinear


def randomise_adapters(model, std=0.2):
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=std)


def test_inject_replaces_every_qkv_and_returns_names(vit):
    names = lora.inject_lora(vit, r=4)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    for i, block in enumerate(vit.blocks):
        assert isinstance(block.attn.qkv, LoRALinear) and block.attn.qkv.splits == 3
        assert type(block.attn.proj) is nn.Linear  # untouched


def test_outputs_are_identical_right_after_injection(vit):
    x = torch.randn(2, 3, 28, 28)
    before = vit(x)
    lora.inject_lora(vit, r=4, dropout=0.1)
    assert torch.equal(vit(x), before)


@pytest.mark.parametrize("training", [False, True])
def test_the_adapters_dropout_takes_the_mode_of_the_layer_it_replaces(vit, training):
    vit.train(training)
    lora.inject_lora(vit, r=4, dropout=0.5)
    randomise_adapters(vit)  # with B = 0 dropout would change nothing
    for _, layer in lora.lora_layers(vit):
        assert layer.training == layer.lora_dropout.training == training
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(vit(x), vit(x)) != training  # evaluation is deterministic, training draws masks


def test_inject_refuses_layers_whose_adapter_would_never_run():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    encoder = nn.TransformerEncoderLayer(16, 2, 32)  # MultiheadAttention reads out_proj.weight directly
    with pytest.raises(ValueError, match=r"'self_attn\.out_proj'.*MultiheadAttention.*never be used"):
        lora.inject_lora(encoder, targets=("out_proj", "linear1"))
    model = nn.Sequential(nn.Linear(4, 4), Doubled(4, 4))
    with pytest.raises(ValueError, match=r"'1' is a Doubled with its own forward"):
        lora.inject_lora(model, targets=("0", "1"))
    assert not list(lora.lora_layers(encoder)) and not list(lora.lora_layers(model))  # nothing replaced


class _DirectQKV(nn.Module):
    """An attention-like module whose forward uses its qkv's weight without calling qkv, as timm's EVA does."""

    def __init__(self, width=8):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.q_bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return F.linear(x, self.qkv.weight, torch.cat([self.q_bias, self.qkv.bias[8:]]))


class _CastsForQKV(nn.Module):
    """Reads only its qkv weight's dtype, then calls qkv: nothing to refuse."""

    def __init__(self, width=8):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        return self.qkv(x.to(self.qkv.weight.dtype))


def test_inject_refuses_a_layer_whose_parent_uses_its_weight_without_calling_it():
    eva = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=1, embed_dim=32, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv': the forward of its parent, EvaAttention, reads "
                                         r"self\.qkv\.weight directly"):
        lora.inject_lora(eva)
    beit = timm.create_model("beit_base_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv': the forward of its parent, Attention, reads"):
        lora.inject_lora(beit)  # with its default q/v biases, BEiT reads the weight
    model = nn.Sequential(_DirectQKV())
    with pytest.raises(ValueError, match=r"'0\.qkv': the forward of its parent, _DirectQKV, reads self\.qkv\.weight"):
        lora.inject_lora(model)
    assert not any(list(lora.lora_layers(m)) for m in (eva, beit, model))


def test_the_bypass_check_reads_code_not_comments_and_a_forward_patched_later():
    class Commented(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            qkv = self.qkv  # called below, not read as in F.linear(x, self.qkv.weight)
            return qkv(x)

    assert lora.inject_lora(nn.Sequential(Commented()), r=2) == ["0.qkv"]
    Commented.forward = _DirectQKV.forward  # the class changed after a first check: read again
    with pytest.raises(ValueError, match=r"'0\.qkv': the forward of its parent, Commented, reads self\.qkv\.weight"):
        lora.inject_lora(nn.Sequential(Commented()), r=2)


def test_a_parent_that_calls_the_layer_in_the_configuration_built_is_adapted():
    # DINOv3 is timm's EVA attention without q/v biases, whose forward takes the branch that calls qkv.
    dinov3 = timm.create_model("vit_small_patch16_dinov3", img_size=32, depth=1, embed_dim=32, num_heads=2,
                               num_classes=0).eval()
    assert lora.inject_lora(dinov3) == ["blocks.0.attn.qkv"]
    x = torch.randn(1, 3, 32, 32)
    before = dinov3(x)
    nn.init.normal_(dinov3.blocks[0].attn.qkv.lora_B)
    assert not torch.allclose(dinov3(x), before)  # the adapter runs
    model = nn.Sequential(_CastsForQKV())
    assert lora.inject_lora(model, r=2) == ["0.qkv"]
    nn.init.normal_(model[0].qkv.lora_B)
    x = torch.randn(3, 8)
    assert not torch.allclose(model(x), F.linear(x, model[0].qkv.weight, model[0].qkv.bias))  # the adapter runs


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # still in use
def test_inject_refuses_layers_it_would_silently_change():
    weight_normed = nn.Sequential(nn.Linear(8, 8))
    torch.nn.utils.parametrizations.weight_norm(weight_normed[0])
    with pytest.raises(ValueError, match=r"layer '0' has a parametrized weight.*remove_parametrizations"):
        lora.inject_lora(weight_normed, targets="0")
    lazy = nn.Sequential(nn.LazyLinear(8))
    with pytest.raises(ValueError, match=r"layer '0' is an nn\.LazyLinear.*run one forward pass"):
        lora.inject_lora(lazy, targets="0")
    old_style = nn.Sequential(nn.Linear(8, 8))
    torch.nn.utils.weight_norm(old_style[0])  # a forward pre-hook computing weight from weight_g and weight_v
    with pytest.raises(ValueError, match=r"layer '0' has hooks registered on it \(forward_pre_hooks.*weight_norm"):
        lora.inject_lora(old_style, targets="0")
    shared = nn.Linear(8, 8)
    tied = nn.ModuleDict({"a": shared, "b": shared})
    with pytest.raises(ValueError, match=r"layer 'a' is one module held in several places \(a, b\)"):
        lora.inject_lora(tied, targets=("a", "b"))
    for model in (weight_normed, lazy, old_style, tied):
        assert not list(lora.lora_layers(model))


@pytest.mark.parametrize("kind", ["buffer", "parameter", "module"])
def test_inject_refuses_a_layer_with_state_of_its_own_it_would_drop(kind):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    extra = {"buffer": lambda m: m.register_buffer("mask", torch.ones(8, 8)),
             "parameter": lambda m: m.register_parameter("scale", nn.Parameter(torch.ones(8))),
             "module": lambda m: m.add_module("act", nn.ReLU())}[kind]
    extra(model[1])
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=rf"layer '1' holds {kind} '\w+' besides its weight and bias.*would drop"):
        lora.inject_lora(model, targets=("0", "1"), r=2)
    assert not list(lora.lora_layers(model)) and list(model.state_dict()) == keys  # layer '0' untouched too


def test_a_layer_in_a_parent_shared_under_two_names_is_adapted_on_every_path():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    model = nn.ModuleDict({"first": mlp, "second": mlp})  # as timm's CoaT: mlp2 = mlp3 = mlp4
    assert lora.inject_lora(model, targets="0", r=2) == ["first.0"]
    assert isinstance(model["second"][0], LoRALinear)  # one attribute of one parent: both paths see it


@pytest.mark.parametrize("targets", [None, [1], ("qkv", 3.0)])
def test_targets_that_are_no_names_are_a_clear_error(vit, targets):
    with pytest.raises(TypeError, match=r"targets are layer names \(str\) or compiled regexes"):
        lora.inject_lora(vit, targets=targets)


def test_hooks_on_a_layer_to_replace_are_a_clear_error_both_ways(vit):
    handle = vit.blocks[1].attn.qkv.register_forward_hook(lambda module, args, out: None)
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.attn\.qkv' has hooks registered on it \(forward_hooks"):
        lora.inject_lora(vit)  # the swap would leave the hook on a module no longer in the model
    assert not list(lora.lora_layers(vit))
    handle.remove()
    lora.inject_lora(vit)
    handle = vit.blocks[1].attn.qkv.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.attn\.qkv' has hooks registered on it \(forward_pre"):
        lora.remove_lora(vit)
    assert len(list(lora.lora_layers(vit))) == 2  # none removed, block 0's neither
    handle.remove()
    assert lora.remove_lora(vit) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_mark_only_lora_as_trainable_takes_one_module_or_says_what_it_wants(vit):
    lora.inject_lora(vit, r=2)
    lora.mark_only_lora_as_trainable(vit, extra=vit.norm)
    assert vit.norm.weight.requires_grad and not vit.blocks[0].attn.qkv.weight.requires_grad
    with pytest.raises(TypeError, match=r"extra holds modules to train in full, and got 'norm' of type str"):
        lora.mark_only_lora_as_trainable(vit, extra=["norm"])
    assert vit.norm.weight.requires_grad and vit.blocks[0].attn.qkv.lora_A.requires_grad  # refused: nothing changed


def test_a_failed_inject_leaves_the_model_untouched():
    model = nn.ModuleDict({"a": nn.Linear(4, 12), "b": nn.Linear(4, 8)})
    with pytest.raises(ValueError, match=r"layer 'b': lora splits=3 must divide out_features=8"):
        lora.inject_lora(model, targets=("a", "b"), r=2, splits=3)
    assert not list(lora.lora_layers(model))
    assert lora.inject_lora(model, targets=("a", "b"), r=2, splits=1) == ["a", "b"]  # a retry is not "already adapted"


def test_no_instance_level_forward_after_surgery(vit):
    lora.inject_lora(vit, targets=("qkv", "fc1"), r=2)
    for name, module in vit.named_modules():
        assert "forward" not in vars(module), f"{name} has an instance-level forward"
        if isinstance(module, LoRALinear):
            assert type(module).forward is LoRALinear.forward


def test_gradients_reach_every_adapter_and_no_frozen_parameter(vit):
    lora.inject_lora(vit, r=4)
    lora.mark_only_lora_as_trainable(vit)
    randomise_adapters(vit)  # with B = 0 the gradient of A is exactly zero by construction
    vit.train()
    vit(torch.randn(2, 3, 28, 28)).pow(2).sum().backward()
    for name, layer in lora.lora_layers(vit):
        for p in (layer.lora_A, layer.lora_B):
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    for name, p in vit.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name


def test_an_optimizer_step_changes_the_output(vit):
    """The failure this project exists to prevent: adapters that train but never touch the forward pass."""
    lora.inject_lora(vit, r=4)
    lora.mark_only_lora_as_trainable(vit)
    x = torch.randn(2, 3, 28, 28)
    before = vit(x).detach()
    opt = torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # step 1 moves B off zero, step 2 moves A too
        opt.zero_grad()
        vit(x).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(vit(x), before)


def test_injecting_twice_is_a_clear_error(vit):
    lora.inject_lora(vit, r=4)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.inject_lora(vit, r=4)


def test_a_single_layer_is_a_clear_error_with_its_own_way():
    with pytest.raises(ValueError, match="LoRALinear.from_linear"):
        lora.inject_lora(nn.Linear(4, 12))
    layer = LoRALinear(4, 12, r=2)
    nn.init.normal_(layer.lora_B)
    with pytest.raises(ValueError, match=r"merged_state_dict\(layer\)"):
        lora.remove_lora(layer)
    assert dict(layer.named_children()).keys() == {"lora_dropout"}  # left as it was
    plain = nn.Linear(4, 12)
    plain.load_state_dict(lora.merged_state_dict(layer))  # the way the message gives
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), layer(x))


def test_no_match_is_a_clear_error(vit):
    with pytest.raises(ValueError, match="matches targets"):
        lora.inject_lora(vit, targets=("not_a_layer",))


def test_splits_default_to_three_for_fused_qkv_only(vit):
    lora.inject_lora(vit, targets=("qkv", "proj", "fc1"), r=2)
    block = vit.blocks[0]
    assert (block.attn.qkv.splits, block.attn.proj.splits, block.mlp.fc1.splits) == (3, 1, 1)


def test_regex_targets_match_the_whole_name(vit):
    names = lora.inject_lora(vit, targets=(re.compile(r"blocks\.1\.attn\.(qkv|proj)"),), r=2)
    assert names == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]


def test_suffix_matches_on_dot_boundary_only(vit):
    # "kv" must not match "qkv": a target names whole path components.
    with pytest.raises(ValueError):
        lora.inject_lora(vit, targets=("kv",))


@pytest.mark.parametrize("merge", [True, False])
def test_remove_lora_gives_plain_linear_loadable_into_fresh_timm_model(vit, merge):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        adapted, base = vit(x), vit.blocks[0].attn.qkv.weight.detach().clone()
    names = lora.remove_lora(vit, merge=merge)
    assert len(names) == len(vit.blocks)
    assert not any(isinstance(m, LoRALinear) for m in vit.modules())
    assert all(type(b.attn.qkv) is nn.Linear for b in vit.blocks)
    fresh = tiny_vit().eval()
    fresh.load_state_dict(vit.state_dict(), strict=True)
    with torch.no_grad():
        out = fresh(x)
    if merge:
        torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(fresh.blocks[0].attn.qkv.weight, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_state_dict_is_what_remove_lora_leaves_and_changes_nothing(vit, dtype):
    vit.to(dtype)
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    lora.merge_lora(vit.blocks[1])  # a layer merged already gives its weight as it is
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    exported = lora.merged_state_dict(vit)
    assert {k: v for k, v in vit.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())  # the model is untouched
    assert not vit.blocks[0].attn.qkv.merged and vit.blocks[1].attn.qkv.merged
    lora.remove_lora(vit, merge=True)
    plain = vit.state_dict()
    assert exported.keys() == plain.keys() and not any("lora_" in k for k in exported)
    for key, value in plain.items():
        assert value.dtype == exported[key].dtype and torch.equal(exported[key], value), key  # merge's own bits


def test_save_merged_writes_a_file_plain_timm_loads(vit, tmp_path):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        adapted = vit(x)
    lora.save_merged(vit, tmp_path / "plain.safetensors", {"note": "kept"})
    fresh = tiny_vit().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "plain.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-5)
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:
        assert f.metadata() == {"note": "kept"}


def test_merged_context_manager_matches_and_restores(vit):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit, std=2.0)
    weights = {n: l.weight.detach().clone() for n, l in lora.lora_layers(vit)}
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        unmerged = vit(x)
        with lora.merged(vit) as m:
            assert all(l.merged for _, l in lora.lora_layers(m))
            merged = vit(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for n, l in lora.lora_layers(vit):
        assert not l.merged and torch.equal(l.weight, weights[n])
        assert l._merge_buffer is not None  # kept for the next merge
    with lora.merged(vit, keep_buffer=False):
        pass
    assert all(l._merge_buffer is None for _, l in lora.lora_layers(vit))


def test_a_state_dict_means_the_same_taken_inside_merged_or_out_of_it(vit):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    outside = {k: v.clone() for k, v in vit.state_dict().items()}
    x = torch.randn(2, 3, 28, 28)
    want = vit(x)
    with lora.merged(vit):
        inside = vit.state_dict()
    assert inside.keys() == outside.keys() and all(torch.equal(inside[k], outside[k]) for k in outside)
    fresh = tiny_vit().eval()  # unmerged: a merged weight here would add the update twice
    lora.inject_lora(fresh, r=4)
    fresh.load_state_dict(inside)
    torch.testing.assert_close(fresh(x), want)
    lora.merge_lora(vit, keep_unmerged=False)  # merged for good: the delta comes back out by subtraction
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(v, outside[k], atol=1e-6, rtol=1e-5)


def test_loading_into_a_merged_model_survives_the_unmerge(vit):
    source, target = copy.deepcopy(vit), vit
    for model in (source, target):
        lora.inject_lora(model, r=4)
    randomise_adapters(source)
    for p in source.parameters():
        p.data.add_(0.01)  # other base weights too
    x = torch.randn(2, 3, 28, 28)
    want = source(x)
    lora.merge_lora(target)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), want)  # still merged, with the loaded adapter folded in
    lora.unmerge_lora(target)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    torch.testing.assert_close(target(x), want)


def test_converting_a_merged_model_converts_the_weight_it_unmerges_to(vit):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    want = copy.deepcopy(vit).double()(x)
    lora.merge_lora(vit)
    vit.double()
    lora.unmerge_lora(vit)
    for _, layer in lora.lora_layers(vit):
        assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(vit(x), want)


def test_merge_lora_and_unmerge_lora_report_what_changed(vit):
    lora.inject_lora(vit, r=2)
    assert len(lora.merge_lora(vit)) == 2
    assert lora.merge_lora(vit) == []
    assert len(lora.unmerge_lora(vit)) == 2
    assert lora.unmerge_lora(vit) == []
    assert all(l._merge_buffer is not None for _, l in lora.lora_layers(vit))  # kept for the next merge
    assert lora.unmerge_lora(vit, keep_buffer=False) == []
    assert all(l._merge_buffer is None for _, l in lora.lora_layers(vit))


def test_dinov2_base_r8_has_exactly_442368_adapter_parameters():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch14_dinov2", num_classes=0)
    lora.inject_lora(model, r=8)
    lora.mark_only_lora_as_trainable(model)
    trainable, total = lora.count_parameters(model)
    assert trainable == 442_368 == 12 * 3 * (768 * 8 + 8 * 768)
    assert total == 86_579_712 + 442_368


def test_mark_only_lora_as_trainable_with_extra_modules(vit):
    lora.inject_lora(vit, r=2)
    lora.mark_only_lora_as_trainable(vit, extra=[vit.norm])
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB"} | {"norm.weight", "norm.bias"}
    assert trainable == expected


def test_print_trainable_parameters_format(capsys):
    model = nn.Sequential(nn.Linear(1000, 1000))
    lora.inject_lora(model, targets=("0",), r=4)
    lora.mark_only_lora_as_trainable(model)
    lora.print_trainable_parameters(model)
    assert capsys.readouterr().out == "[LoRA] Trainable: 8,000 (0.79%) | Total: 1,009,000\n"


def test_count_parameters_counts_a_shared_parameter_once_and_a_model_without_any_as_none_trainable(capsys):
    layer = nn.Linear(4, 4)
    tied = nn.Sequential(layer, nn.ReLU(), layer)
    assert lora.count_parameters(tied) == lora.count_parameters(layer) == (20, 20)
    lora.print_trainable_parameters(nn.ReLU(), "no LoRA")
    assert capsys.readouterr().out == "[no LoRA] Trainable: 0 (0.00%) | Total: 0\n"


def test_merge_states_combine_with_remove_and_the_context_manager(vit):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    base = {name: layer.weight.detach().clone() for name, layer in lora.lora_layers(vit)}
    lora.merge_lora(vit)
    with lora.merged(vit):  # already merged: the context manager must not unmerge on exit
        pass
    assert all(layer.merged for _, layer in lora.lora_layers(vit))
    vit.eval()
    lora.remove_lora(vit, merge=False)  # dropping merged adapters gives back the base weights
    for name, weight in base.items():
        assert type(vit.get_submodule(name)) is nn.Linear and torch.equal(vit.get_submodule(name).weight, weight)
        assert not vit.get_submodule(name).training  # the mode carries over


class _Attention(nn.Module):
    """The parts of a timm attention that splits=None reads: qkv and proj, of the widths given."""

    def __init__(self, width, qkv_out, proj_in):
        super().__init__()
        self.qkv, self.proj = nn.Linear(width, qkv_out), nn.Linear(proj_in, proj_in)


class _Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)


@pytest.mark.parametrize("attn, expected", [
    (_Attention(8, 24, 8), 3),  # a ViT's: out = 3 x in
    (_Attention(8, 48, 16), 3),  # MViTv2's and Hiera's first block of a stage: 3 x the widened width proj takes
    (_Attention(8, 16, 8), 1),  # GC ViT's global attention: k and v only
    (_Attention(6, 15, 4), 1),  # out divides by 3 but is 3 x neither width
], ids=["vit", "widening", "k-v-only", "other"])
def test_splits_default_to_three_for_a_layer_named_qkv_that_is_three_projections(attn, expected):
    model = nn.Sequential(nn.Sequential(attn, _Mlp(8, 24)))
    lora.inject_lora(model, targets=("qkv", "fc1", "fc2"), r=2)
    fc1 = model[0][1].fc1  # at mlp_ratio 3 (VOLO, GC ViT) out = 3 x in, and it is one projection
    assert (attn.qkv.splits, fc1.splits, model[0][1].fc2.splits) == (expected, 1, 1)
    assert attn.qkv.lora_A.shape == (expected * 2, attn.qkv.in_features) and fc1.lora_A.shape == (2, 8)


def test_splits_default_to_one_for_a_fused_layer_not_named_qkv_and_can_be_given():
    model = nn.Sequential(nn.Linear(4, 12))
    lora.inject_lora(model, targets=("0",), r=2)
    assert model[0].splits == 1
    lora.remove_lora(model)
    lora.inject_lora(model, targets=("0",), r=2, splits=3)
    assert model[0].splits == 3


class _SeparateQVBiases(nn.Module):
    """timm's EVA attention with qkv_bias_separate=True: q/v biases, and the branch taken calls qkv."""

    def __init__(self, width=8):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.qkv_bias_separate = True

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        if self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)


def test_a_parent_with_q_v_biases_added_separately_calls_the_layer_and_is_adapted():
    model = nn.Sequential(_SeparateQVBiases())
    assert lora.inject_lora(model, r=2) == ["0.qkv"]
    nn.init.normal_(model[0].qkv.lora_B)
    x = torch.randn(3, 8)
    assert not torch.allclose(model(x), F.linear(x, model[0].qkv.weight))  # the adapter runs


def test_merge_lora_for_good_keeps_no_copy_of_the_old_weights(vit):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    lora.merge_lora(vit, keep_unmerged=False)
    assert all(layer.merged and layer._unmerged_weight is None for _, layer in lora.lora_layers(vit))


def test_the_merged_context_unmerges_when_its_block_raises(vit):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    weights = {n: l.weight.detach().clone() for n, l in lora.lora_layers(vit)}
    with pytest.raises(KeyError, match="boom"):
        with lora.merged(vit):
            raise KeyError("boom")
    for n, l in lora.lora_layers(vit):
        assert not l.merged and torch.equal(l.weight, weights[n])  # training can go on after the failed eval


def test_merged_state_dict_folds_a_layer_of_a_shared_parent_under_each_of_its_names():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    model = nn.ModuleDict({"first": mlp, "second": mlp})  # as timm's CoaT: mlp2 = mlp3 = mlp4
    lora.inject_lora(model, targets="0", r=2)
    randomise_adapters(model)
    state = lora.merged_state_dict(model)
    plain_mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    plain = nn.ModuleDict({"first": plain_mlp, "second": plain_mlp})
    plain.load_state_dict(state)  # strict: no lora_ keys under the second name
    reference = copy.deepcopy(model)
    lora.remove_lora(reference, merge=True)
    assert state.keys() == reference.state_dict().keys()
    x = torch.randn(3, 8)
    torch.testing.assert_close(plain["second"](x), model["second"](x))
    torch.testing.assert_close(plain["second"][0].weight, reference["second"][0].weight)


def test_inject_refuses_a_layer_whose_weight_is_tied_to_another_parameter():
    class TiedHead(nn.Module):  # a language model's output layer sharing its embedding's weight
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)))

    class SharedWeight(nn.Module):  # two layers, one weight
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    tied_head, shared = TiedHead(), SharedWeight()
    with pytest.raises(ValueError, match=r"layer 'head' has a weight tied to other parameters \(embed\.weight, head"):
        lora.inject_lora(tied_head, targets="head")
    with pytest.raises(ValueError, match=r"layer 'a' has a weight tied to other parameters \(a\.weight, b\.weight\)"):
        lora.inject_lora(shared, targets=("a", "b"))
    assert not list(lora.lora_layers(tied_head)) and not list(lora.lora_layers(shared))  # nothing replaced


@pytest.mark.parametrize("error", [KeyboardInterrupt, torch.OutOfMemoryError])
def test_the_merged_context_takes_back_the_merges_made_when_merging_fails_part_of_the_way(vit, error):
    lora.inject_lora(vit, r=4)
    randomise_adapters(vit)
    weights = {n: l.weight.detach().clone() for n, l in lora.lora_layers(vit)}
    last = list(lora.lora_layers(vit))[-1][1]

    def fail(keep_unmerged=True):  # a Ctrl-C, or the allocation of the merged weight, at the last layer
        raise error("while merging")

    last.merge = fail
    with pytest.raises(error, match="while merging"):
        with lora.merged(vit):
            pass
    del last.merge
    for n, l in lora.lora_layers(vit):
        assert not l.merged
        torch.testing.assert_close(l.weight, weights[n], rtol=0, atol=0)  # training can go on


@pytest.mark.parametrize("target", ["second.0", re.compile(r"second\.0")])
def test_a_layer_of_a_shared_parent_matches_under_either_of_its_names(target):
    mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    model = nn.ModuleDict({"first": mlp, "second": mlp})  # as timm's CoaT: mlp2 = mlp3 = mlp4
    assert lora.inject_lora(model, targets=target, r=2) == ["second.0"]
    assert model["first"][0] is model["second"][0] and isinstance(model["first"][0], LoRALinear)
    randomise_adapters(model)
    x = torch.randn(3, 8)
    layer = model["second"][0]
    torch.testing.assert_close(model["second"](x), F.gelu(F.linear(x, layer.weight + layer.delta_weight(), layer.bias)))


def test_inject_refuses_a_layer_with_a_forward_set_on_the_instance():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].forward = lambda x: 2 * F.linear(x, model[1].weight, model[1].bias)  # a patch on the instance
    x = torch.randn(3, 4)
    reference = 2 * F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias)
    with pytest.raises(ValueError, match=r"layer '1' has a forward of its own set on the instance"):
        lora.inject_lora(model, targets=("0", "1"))
    assert not list(lora.lora_layers(model))  # nothing replaced
    torch.testing.assert_close(model(x), reference)


class _CastsThenHandsToCheckpoint(nn.Module):
    """Reads only its qkv weight's dtype, then hands qkv to a helper (activation checkpointing): the layer runs."""

    def __init__(self, width=8):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.qkv, x.to(self.qkv.weight.dtype), use_reentrant=False)


def test_a_parent_reading_only_its_layers_dtype_and_calling_it_through_a_helper_is_adapted():
    """Reading ``self.qkv.weight.dtype`` (or device, shape) is not reading the weight: a parent that does so and
    runs the layer through a helper (no ``self.qkv(`` in its source) must be adapted, not refused as a bypass."""
    model = nn.Sequential(_CastsThenHandsToCheckpoint())
    assert lora.inject_lora(model, r=2) == ["0.qkv"]
    layer = model[0].qkv
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), F.linear(x, layer.weight + layer.delta_weight(), layer.bias))


def test_inject_lora_defaults_are_the_documented_ones(vit):
    """inject_lora(model) adapts every qkv with r=8, alpha=16, no dropout and q/k/v adapters of their own, as the
    README's API table says."""
    names = lora.inject_lora(vit)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    for _, layer in lora.lora_layers(vit):
        assert (layer.r, layer.alpha, layer.scaling, layer.splits) == (8, 16.0, 16.0 / 8, 3)
        assert isinstance(layer.lora_dropout, nn.Identity)


@pytest.mark.parametrize("register", ["register_state_dict_pre_hook", "_register_state_dict_hook"])
def test_state_dict_hooks_on_a_layer_to_replace_are_a_clear_error(vit, register):
    """A state-dict hook (one that renames or quantises a layer's saved weights, say) would not move to the
    LoRALinear that replaces its layer, and checkpoints would silently change: inject_lora refuses it as it
    refuses forward hooks."""
    if register == "register_state_dict_pre_hook":
        getattr(vit.blocks[1].attn.qkv, register)(lambda module, prefix, keep_vars: None)
    else:
        getattr(vit.blocks[1].attn.qkv, register)(lambda module, state_dict, prefix, local_metadata: None)
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.attn\.qkv' has hooks registered on it \(state_dict_"):
        lora.inject_lora(vit)
    assert not list(lora.lora_layers(vit))


@pytest.mark.parametrize("call", [
    lambda model, tmp_path: lora.merge_lora(model),
    lambda model, tmp_path: lora.unmerge_lora(model),
    lambda model, tmp_path: lora.remove_lora(model),
    lambda model, tmp_path: lora.merged_state_dict(model),
    lambda model, tmp_path: lora.save_merged(model, tmp_path / "merged.safetensors"),
], ids=["merge_lora", "unmerge_lora", "remove_lora", "merged_state_dict", "save_merged"])
def test_merging_or_removing_adapters_a_model_does_not_have_is_an_error(vit, tmp_path, call):
    """A silent no-op would hand back the base model as if it were the adapted one (an export, say)."""
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(ValueError, match=r"VisionTransformer has no LoRA layers, so there is nothing to do; add "):
        call(vit, tmp_path)
    assert not list(tmp_path.iterdir())
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())
    assert all(type(m) is not lora.LoRALinear for m in vit.modules())


def test_the_merged_context_runs_a_model_without_adapters_as_it_is(vit):
    """Its outputs are the same merged or not, so an evaluation loop shared with full fine-tuning may use it."""
    x = torch.randn(1, 3, 28, 28)
    want = vit(x)
    with lora.merged(vit) as inside:
        assert inside is vit and torch.equal(vit(x), want)
