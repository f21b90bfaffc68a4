import copy
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from safetensors import safe_open
from torch import nn

import lora


def adapted(r=4, **kwargs):
    model = tiny_vit(**kwargs).eval()
    lora.inject_lora(model, r=r, alpha=2.0 * r)
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.3)
    return model


def test_lora_state_dict_holds_only_adapter_weights():
    model = adapted()
    state = lora.lora_state_dict(model)
    assert sorted(state) == sorted(f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB")
    assert sum(v.numel() for v in state.values()) == 2 * 3 * (32 * 4 + 4 * 32)


def test_state_dict_round_trip_reproduces_outputs():
    source, target = adapted(), adapted()
    target.load_state_dict(source.state_dict(), strict=False)  # same base weights
    for _, layer in lora.lora_layers(target):
        nn.init.zeros_(layer.lora_B)
    x = torch.randn(2, 3, 28, 28)
    assert not torch.allclose(target(x), source(x))
    loaded = lora.load_lora_state_dict(target, lora.lora_state_dict(source))
    assert loaded == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert torch.equal(target(x), source(x))


def test_adapter_file_round_trip_into_a_model_without_lora(tmp_path):
    source = adapted()
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(source, path, metadata={"base_model": "tiny"})
    target = tiny_vit().eval()
    target.load_state_dict({k: v for k, v in source.state_dict().items() if "lora_" not in k})
    lora.load_adapter(target, path)  # injects from the file's config first
    assert all(isinstance(b.attn.qkv, lora.LoRALinear) for b in target.blocks)
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(target(x), source(x))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(lora.lora_state_dict(source))  # no base weights in the file
    assert json.loads(meta["r"]) == {"blocks.0.attn.qkv": 4, "blocks.1.attn.qkv": 4}
    assert json.loads(meta["splits"])["blocks.1.attn.qkv"] == 3
    assert json.loads(meta["alpha"])["blocks.0.attn.qkv"] == 8.0
    assert json.loads(meta["targets"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert meta["base_model"] == "tiny"
    config, _ = lora.read_adapter_config(path)
    assert config["blocks.0.attn.qkv"] == {"r": 4, "alpha": 8.0, "splits": 3}


def test_adapter_file_is_small(tmp_path):
    model = adapted()
    path = tmp_path / "a.safetensors"
    lora.save_adapter(model, path)
    payload = 4 * sum(v.numel() for v in lora.lora_state_dict(model).values())
    assert payload < path.stat().st_size < payload + 2048  # tensors plus a small JSON header


def test_rank_mismatch_names_the_layer(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(adapted(r=4), path)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*r=4.*r=8"):
        lora.load_adapter(adapted(r=8), path)


def test_shape_mismatch_names_the_layer_and_shapes():
    small, wide = adapted(), adapted(embed_dim=64)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*\(12, 32\).*\(12, 64\)"):
        lora.load_lora_state_dict(wide, lora.lora_state_dict(small))


def test_architecture_mismatch_names_the_layer_and_changes_nothing(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(adapted(depth=3), path)
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"targets layer 'blocks\.2\.attn\.qkv', which is not an nn\.Linear"):
        lora.load_adapter(model, path)
    assert not list(lora.lora_layers(model))  # blocks 0 and 1 fit, but nothing was injected
    # strict=False skips the layers the model lacks, as it does for a model with adapters already
    assert lora.load_adapter(model, path, strict=False) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert [n for n, _ in lora.lora_layers(model)] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="targets no layer Sequential has"):
        lora.load_adapter(other, path, strict=False)
    assert type(other[0]) is nn.Linear


@pytest.mark.parametrize("target_has_lora", [False, True])
def test_an_adapter_of_another_model_size_says_so_and_changes_nothing(tmp_path, target_has_lora):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(adapted(), path)  # embed_dim 32
    model = adapted(embed_dim=64) if target_has_lora else tiny_vit(embed_dim=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv' maps 64 -> 192 .* but 32 -> 96 .*another model size"):
        lora.load_adapter(model, path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_the_layers_loaded_are_returned_in_the_models_order(tmp_path):
    """Eleven layers named 0 to 10: "2" before "10", as the model runs them (a string sort put "10" after "1")."""
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(11)))
    lora.inject_lora(model, targets=re.compile(r"\d+"), r=2)
    names = [str(i) for i in range(11)]
    assert lora.load_lora_state_dict(model, lora.lora_state_dict(model)) == names
    lora.save_adapter(model, tmp_path / "a.safetensors")
    assert lora.load_adapter(nn.Sequential(*(nn.Linear(4, 4) for _ in range(11))), tmp_path / "a.safetensors") == names


def test_strict_loading_reports_missing_and_unexpected_layers():
    model = adapted()
    state = lora.lora_state_dict(model)
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv"):
        lora.load_lora_state_dict(model, partial)
    assert lora.load_lora_state_dict(model, partial, strict=False) == ["blocks.0.attn.qkv"]
    with pytest.raises(ValueError, match="not a LoRA weight"):
        lora.load_lora_state_dict(model, {"blocks.0.attn.qkv.weight": torch.zeros(1)})


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora.load_adapter(adapted(), tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        lora.load_adapter(adapted(), junk)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    model = adapted()
    lora.save_adapter(model, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(adapted(r=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt("Ctrl-C")],
                         ids=lambda error: type(error).__name__)
def test_a_writer_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, error):
    import lora.atomic

    path = tmp_path / "a.safetensors"
    lora.save_merged(adapted(), path)
    before = path.read_bytes()

    def half_then_boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise error

    monkeypatch.setattr(lora.atomic, "save_file", half_then_boom)
    with pytest.raises(type(error), match=str(error)):
        lora.save_merged(adapted(r=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_a_file_failing_after_injection_leaves_the_model_as_it_came(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    lora.save_adapter(adapted(), path)
    _, meta = lora.read_adapter_config(path)
    with safe_open(str(path), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys()}
    kept["blocks.1.attn.qkv.lora_A"] = torch.zeros(12, 16)  # another width: found once the layers are injected
    save_file(kept, str(path), metadata=meta)
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [block.attn.qkv for block in model.blocks]
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.attn\.qkv' maps 32 -> 96 features in the model but 16"):
        lora.load_adapter(model, path)
    assert not list(lora.lora_layers(model))
    assert all(block.attn.qkv is layer for block, layer in zip(model.blocks, layers))  # the very modules, hooks and all
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("strict", [True, False])
def test_a_layer_the_file_lists_without_tensors_is_not_built_from_its_metadata(tmp_path, strict):
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    lora.save_adapter(adapted(), path)
    config, meta = lora.read_adapter_config(path)
    meta["r"] = json.dumps({"blocks.0.attn.qkv": 4, "blocks.1.attn.qkv": 2**40})  # built, A would not fit in memory
    with safe_open(str(path), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k.startswith("blocks.0.")}, str(path), metadata=meta)
    model = tiny_vit()
    if strict:
        with pytest.raises(ValueError, match=r"lists layer 'blocks\.1\.attn\.qkv' but has no "
                                             r"'blocks\.1\.attn\.qkv\.lora_A': it is damaged"):
            lora.load_adapter(model, path)
        assert not list(lora.lora_layers(model))
    else:
        assert lora.load_adapter(model, path, strict=False) == ["blocks.0.attn.qkv"]
        assert [name for name, _ in lora.lora_layers(model)] == ["blocks.0.attn.qkv"]


def test_adapter_weights_with_torch_compiles_prefix_still_load(tmp_path):
    source = adapted()
    state = {f"_orig_mod.{k}": v for k, v in lora.lora_state_dict(source).items()}  # as older versions saved them
    target = adapted()
    assert lora.load_lora_state_dict(target, state) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert all(torch.equal(v, lora.lora_state_dict(source)[k]) for k, v in lora.lora_state_dict(target).items())
    config, meta = lora.read_adapter_config(_saved(source, tmp_path / "a.safetensors"))
    meta["targets"] = json.dumps([f"_orig_mod.{n}" for n in config])
    for key in ("r", "alpha", "splits"):
        meta[key] = json.dumps({f"_orig_mod.{n}": v for n, v in json.loads(meta[key]).items()})
    lora.save_safetensors(state, tmp_path / "old.safetensors", meta)
    fresh = tiny_vit()
    assert lora.load_adapter(fresh, tmp_path / "old.safetensors") == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def _saved(model, path):
    lora.save_adapter(model, path)
    return path


def test_a_child_named_like_a_wrappers_is_not_unwrapped(tmp_path):
    model = nn.Sequential()
    model.add_module("_orig_mod", adapted())
    model.add_module("module", nn.Linear(2, 2))
    expected = {f"_orig_mod.blocks.{i}.attn.qkv.lora_{p}" for i in (0, 1) for p in "AB"}
    assert lora.lora_state_dict(model).keys() == expected
    assert "module.weight" in lora.merged_state_dict(model)
    assert lora.load_lora_state_dict(model, lora.lora_state_dict(model)) == ["_orig_mod.blocks.0.attn.qkv",
                                                                           "_orig_mod.blocks.1.attn.qkv"]
    fresh = nn.Sequential()
    fresh.add_module("_orig_mod", tiny_vit())
    assert lora.load_adapter(fresh, _saved(model, tmp_path / "a.safetensors"))[0] == "_orig_mod.blocks.0.attn.qkv"


def test_a_file_without_any_tensor_is_damaged_even_when_not_strict(tmp_path):
    path = _saved(adapted(), tmp_path / "a.safetensors")
    _, meta = lora.read_adapter_config(path)
    lora.save_safetensors({}, path, meta)
    with pytest.raises(ValueError, match=r"holds no tensors for the layers it lists: it is damaged"):
        lora.load_adapter(tiny_vit(), path, strict=False)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel])
def test_adapters_of_a_compiled_or_wrapped_model_carry_the_inner_models_names(tmp_path, wrap):
    base = tiny_vit().eval()
    source, target = copy.deepcopy(base), copy.deepcopy(base)
    lora.inject_lora(source, r=4)
    for _, layer in lora.lora_layers(source):
        nn.init.normal_(layer.lora_B, std=0.3)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(wrap(source), path)
    config, _ = lora.read_adapter_config(path)
    assert list(config) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert lora.lora_state_dict(wrap(source)).keys() == lora.lora_state_dict(source).keys()
    assert lora.load_adapter(wrap(target), path) == list(config)
    assert lora.load_lora_state_dict(wrap(target), lora.lora_state_dict(source)) == list(config)
    x = torch.randn(2, 3, 28, 28, device=target.cls_token.device)  # DataParallel moves a model to a GPU if any
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    plain = tiny_vit()
    plain.load_state_dict(lora.merged_state_dict(wrap(source)))  # strict: no _orig_mod. or module. prefix


@pytest.mark.parametrize("target_has_lora", [False, True])
def test_not_strict_skips_a_layer_that_is_no_linear_in_the_model_as_one_it_lacks(tmp_path, target_has_lora):
    # A classifier adapted in its head too, loaded into the backbone alone (timm's num_classes=0: head is Identity).
    base = tiny_vit(num_classes=5).eval()
    source = copy.deepcopy(base)
    lora.inject_lora(source, ("qkv", "head"), r=4, alpha=8.0)
    for _, layer in lora.lora_layers(source):
        nn.init.normal_(layer.lora_B, std=0.3)
    path = _saved(source, tmp_path / "a.safetensors")
    target = copy.deepcopy(base)
    target.reset_classifier(0)
    if target_has_lora:
        lora.inject_lora(target, r=4, alpha=8.0)
    assert lora.load_adapter(target, path, strict=False) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert isinstance(target.head, nn.Identity)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_a_dropout_asked_for_on_a_model_with_adapters_already_is_an_error_not_ignored(tmp_path):
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(adapted(), path)
    model = adapted()  # its adapters without dropout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"dropout=0\.3 applies to the adapters it injects.*'blocks\.0\.attn\.qkv' "
                                         r"with dropout 0\.0"):
        lora.load_adapter(model, path, dropout=0.3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model = tiny_vit()
    lora.inject_lora(model, r=4, alpha=8.0, dropout=0.3)
    assert len(lora.load_adapter(model, path, dropout=0.3)) == 2  # the dropout it has: nothing to refuse
    assert len(lora.load_adapter(model, path)) == 2  # as ever without one


def test_adapters_are_not_injected_into_a_model_already_wrapped_in_ddp(tmp_path):
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(adapted(), path)
    model = tiny_vit()
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)  # no process group needed
    nn.Module.__init__(ddp)
    ddp.module = model
    for inject in (lambda: lora.inject_lora(ddp, r=4), lambda: lora.load_adapter(ddp, path)):
        with pytest.raises(ValueError, match=r"wrapped in DistributedDataParallel.*before wrapping"):
            inject()  # its reducer would never all-reduce the new adapters: each process would train its own
        assert not list(lora.lora_layers(model))
    lora.inject_lora(model, r=4, alpha=8.0)
    assert len(lora.load_adapter(ddp, path)) == 2  # adapters there before the wrapping still load through it


def test_an_adapter_loaded_into_a_fresh_model_takes_the_dropout_asked_for(tmp_path):
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(adapted(), path)
    for dropout, kind in ((0.0, nn.Identity), (0.25, lora.LoRADropout)):
        model = tiny_vit()
        lora.load_adapter(model, path, dropout=dropout)
        assert all(isinstance(layer.lora_dropout, kind) for _, layer in lora.lora_layers(model))
    assert model.blocks[1].attn.qkv.lora_dropout.p == 0.25


def test_a_saved_file_is_written_beside_its_path_synced_renamed_over_it_and_the_rename_synced(tmp_path, monkeypatch):
    """Durable and atomic: the new bytes reach the disk before the name points at them, the rename stays on one
    file system (the same folder), and the folder is synced so that the rename survives a power cut."""
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.path.dirname(src), dst))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(adapted(), path)
    renames = [i for i, event in enumerate(events) if event[0] == "replace"]
    assert len(renames) == 1
    _, written, folder, target = events[renames[0]]
    assert os.path.samefile(folder, tmp_path) and os.fspath(target) == os.fspath(path)
    assert ("fsync", written) in events[:renames[0]]  # the file's bytes, before its name
    assert ("fsync", tmp_path.stat().st_ino) in events[renames[0] + 1:]  # the folder, after the rename


def test_a_symbolic_link_is_written_through_as_open_would(tmp_path):
    target = tmp_path / "store" / "adapter.safetensors"
    target.parent.mkdir()
    link = tmp_path / "adapter.safetensors"
    link.symlink_to(target)
    lora.save_adapter(adapted(), link)
    assert link.is_symlink() and lora.read_adapter_config(target)[0]


def test_a_path_that_is_no_regular_file_is_refused_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    for path in (fifo, link, tmp_path):
        with pytest.raises(ValueError, match=r"exists and is not a regular file"):
            lora.save_adapter(adapted(), path)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_reading_the_umask_does_not_change_it_on_linux(tmp_path, monkeypatch):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc here: the umask can only be read by setting it")
    old_umask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask changes the whole process's umask"))
        path = tmp_path / "adapter.safetensors"
        lora.save_adapter(adapted(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old_umask)


@pytest.mark.parametrize("covered", [("q",), ("q", "sub.q")])
def test_an_adapter_loads_by_whole_layer_names_not_suffixes(tmp_path, covered):
    def model():
        return nn.ModuleDict({"q": nn.Linear(8, 8), "sub": nn.ModuleDict({"q": nn.Linear(8, 8)})})

    source = model()
    lora.inject_lora(source, [re.compile(re.escape(name)) for name in covered], r=2)
    for _, layer in lora.lora_layers(source):
        nn.init.normal_(layer.lora_B)
    lora.save_adapter(source, tmp_path / "a.safetensors")
    target = model()
    assert lora.load_adapter(target, tmp_path / "a.safetensors") == sorted(covered)
    assert [name for name, _ in lora.lora_layers(target)] == list(covered)  # 'sub.q' only where it was adapted


def test_a_layer_that_does_not_fit_leaves_every_layer_as_it_was():
    source, target = adapted(), adapted()
    before = {k: v.clone() for k, v in lora.lora_state_dict(target).items()}
    state = lora.lora_state_dict(source)
    state["blocks.1.attn.qkv.lora_A"] = torch.zeros(8, 32)  # the second layer with another r
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv.*\(8, 32\).*\(12, 32\)"):
        lora.load_lora_state_dict(target, state)
    assert all(torch.equal(v, before[k]) for k, v in lora.lora_state_dict(target).items())  # layer 0 too


def test_a_failed_load_into_a_model_that_is_itself_one_layer_leaves_it_as_it_was(tmp_path):
    """A single LoRALinear saves its adapter under the name ''; loading that into a plain nn.Linear is refused
    (inject_lora adapts layers inside a model), and the undo must not put the model back into itself."""
    path = tmp_path / "layer.safetensors"
    lora.save_adapter(lora.LoRALinear(4, 4, r=2), path)
    plain = nn.Linear(4, 4)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match="this is a single Linear; use LoRALinear.from_linear"):
            lora.load_adapter(plain, path, strict=strict)
    assert list(plain.named_children()) == [] and repr(plain) == "Linear(in_features=4, out_features=4, bias=True)"
    assert state.keys() == plain.state_dict().keys() and all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())


def test_an_alpha_set_after_injecting_is_the_one_the_file_keeps(tmp_path):
    source = adapted()
    for _, layer in lora.lora_layers(source):
        layer.alpha = 3.0
    lora.save_adapter(source, tmp_path / "a.safetensors")
    target = tiny_vit()
    target.load_state_dict(source.state_dict(), strict=False)  # the same base weights
    lora.load_adapter(target, tmp_path / "a.safetensors")
    assert {layer.alpha for _, layer in lora.lora_layers(target)} == {3.0}
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


@pytest.mark.parametrize("damage", ["a scalar A", "an r its tensors do not have", "int8 B", "complex A"])
def test_a_damaged_adapter_is_a_clear_error_before_anything_is_built(tmp_path, damage):
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(adapted(), path)
    config, meta = lora.read_adapter_config(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    message = (r"is damaged: layer 'blocks\.0\.attn\.qkv' has r=\d+, splits=3 in its metadata but "
               r"lora_A \((12, 32)?\), lora_B \(96, 4\)")
    if damage == "a scalar A":
        tensors["blocks.0.attn.qkv.lora_A"] = torch.tensor(1.0)
    elif damage == "int8 B":  # before: copied into the float parameter, rounded to whole numbers, silently
        tensors["blocks.0.attn.qkv.lora_B"] = tensors["blocks.0.attn.qkv.lora_B"].to(torch.int8)
        message = r"is damaged: 'blocks\.0\.attn\.qkv\.lora_B' holds torch\.int8, not floating-point numbers"
    elif damage == "complex A":
        tensors["blocks.0.attn.qkv.lora_A"] = tensors["blocks.0.attn.qkv.lora_A"].to(torch.complex64)
        message = r"is damaged: 'blocks\.0\.attn\.qkv\.lora_A' holds torch\.complex64"
    else:  # built from the metadata, A would take 2**40 * 3 * 32 floats
        meta["r"] = json.dumps({name: 2**40 for name in config})
    lora.save_safetensors(tensors, path, meta)
    model = tiny_vit().eval()
    with pytest.raises(ValueError, match=message):
        lora.load_adapter(model, path)
    assert not list(lora.lora_layers(model))


@pytest.mark.parametrize("key, value", [("r", 2.7), ("r", 0), ("splits", True), ("alpha", float("inf")),
                                        ("alpha", "16"), pytest.param("alpha", 10**400, id="alpha-10**400")])
def test_metadata_values_that_are_no_lora_setting_are_damage(tmp_path, key, value):
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(adapted(), path)
    config, meta = lora.read_adapter_config(path)
    meta[key] = json.dumps({name: value for name in config})
    with safe_open(str(path), framework="pt") as f:
        lora.save_safetensors({k: f.get_tensor(k) for k in f.keys()}, path, meta)
    with pytest.raises(ValueError, match=rf"damaged metadata: layer 'blocks\.0\.attn\.qkv' has {key}="):
        lora.read_adapter_config(path)


def test_a_folder_given_as_the_adapter_file_is_named_as_such(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a folder, not an adapter file.*adapter_best\.safetensors"):
        lora.load_adapter(tiny_vit(), tmp_path)


def test_saved_files_get_the_permissions_a_plain_open_gives(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "adapter.safetensors"
        lora.save_adapter(adapted(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's own would be 0600
        path.chmod(0o640)
        lora.save_adapter(adapted(), path)  # replacing a file keeps its permissions, as open(path, "w") does
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_files_are_written_and_written_again_under_a_umask_that_leaves_the_owner_no_write_bit():
    """A umask of 0o222 gives read-only files, which ``open(path, "w")`` creates and writes all the same. The
    atomic writes must too: they had made the temporary file read-only before opening it again to sync it,
    which fails for any user but root. Such a file is then replaced by the next write (a run rewrites its files
    every epoch), where the plain open refuses it. A root test process drops to user nobody in the child, after
    its imports; where it cannot, modes are no obstacle to it and the test cannot run."""
    import shutil
    import subprocess
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp" if os.path.isdir("/tmp") else None))
    folder.chmod(0o777)  # nobody's to write in; tmp_path's parents are root's alone
    child = f"""
import encodings.ascii, os, torch  # codecs load on first use: after the drop, root's Python may be unreadable
from lora.atomic import atomic_write, save_safetensors
if os.geteuid() == 0:
    try:
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    except OSError:  # no capability to, or no such user in this namespace
        print("still root"); raise SystemExit
os.umask(0o222)
with open({str(folder / "plain.txt")!r}, "w") as f:
    f.write("x")
with atomic_write({str(folder / "atomic.txt")!r}, "w") as f:
    f.write("x")
save_safetensors({{"w": torch.ones(2)}}, {str(folder / "w.safetensors")!r})
for opener in (lambda: open({str(folder / "plain.txt")!r}, "w"), lambda: atomic_write({str(folder / "plain.txt")!r}, "w")):
    try:
        with opener() as f:
            f.write("y")
    except PermissionError as e:
        print("refused", e.filename)
    else:
        print("written")
"""
    try:
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        if done.stdout == "still root\n":
            pytest.skip("running as root, and the child could not become another user")
        assert done.stdout.splitlines() == [f"refused {folder / 'plain.txt'}", "written"]  # plain open, atomic write
        assert sorted(p.name for p in folder.iterdir()) == ["atomic.txt", "plain.txt", "w.safetensors"]
        assert (folder / "atomic.txt").read_text() == "x" and (folder / "plain.txt").read_text() == "y"
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes == dict.fromkeys(modes, 0o444)  # what the plain open gave
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_file_name_as_long_as_the_file_system_allows_is_written(tmp_path):
    path = tmp_path / ("w" * 243 + ".safetensors")  # 255 bytes: open(path, "w") takes it
    lora.save_safetensors({"w": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_safetensors_takes_a_view_that_is_not_contiguous_and_saves_its_values(tmp_path):
    from safetensors.torch import load_file

    weight = torch.randn(3, 5)
    lora.save_safetensors({"weight_t": weight.t(), "column": weight[:, 1]}, tmp_path / "views.safetensors")
    loaded = load_file(str(tmp_path / "views.safetensors"))
    assert torch.equal(loaded["weight_t"], weight.t()) and torch.equal(loaded["column"], weight[:, 1])


def test_metadata_that_is_not_text_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"'epochs' maps to int 3; pass str\(value\) or json\.dumps\(value\)"):
        lora.save_adapter(adapted(), tmp_path / "a.safetensors", metadata={"epochs": 3})
    assert not list(tmp_path.iterdir())


def test_an_adapter_of_another_alpha_is_refused(tmp_path):
    source = tiny_vit().eval()
    lora.inject_lora(source, r=4, alpha=8.0)
    lora.save_adapter(source, tmp_path / "a.safetensors")
    target = tiny_vit().eval()
    lora.inject_lora(target, r=4, alpha=16.0)  # same shapes: only alpha tells them apart
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*alpha=8\.0 but the model has alpha=16\.0"):
        lora.load_adapter(target, tmp_path / "a.safetensors")


def test_loading_adapter_weights_into_a_merged_layer_is_refused():
    source, target = adapted(), adapted()
    lora.merge_lora(target)
    before = {k: v.clone() for k, v in lora.lora_state_dict(target).items()}
    with pytest.raises(RuntimeError, match=r"layer 'blocks\.0\.attn\.qkv' is merged; call unmerge_lora"):
        lora.load_lora_state_dict(target, lora.lora_state_dict(source))
    assert all(torch.equal(v, before[k]) for k, v in lora.lora_state_dict(target).items())


def test_strict_loading_refuses_weights_for_a_layer_the_model_does_not_adapt():
    model = adapted()
    before = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    state = lora.lora_state_dict(adapted(depth=3))
    with pytest.raises(ValueError, match=r"adapter weight 'blocks\.2\.attn\.qkv\.lora_A' is for layer "
                                         r"'blocks\.2\.attn\.qkv', which has no LoRA adapter.*strict=False"):
        lora.load_lora_state_dict(model, state)
    assert all(torch.equal(v, before[k]) for k, v in lora.lora_state_dict(model).items())
    assert lora.load_lora_state_dict(model, state, strict=False) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_strict_loading_refuses_a_layer_that_lacks_only_its_b():
    model = adapted()
    state = lora.lora_state_dict(model)
    del state["blocks.1.attn.qkv.lora_B"]
    with pytest.raises(ValueError, match=r"adapter has no 'blocks\.1\.attn\.qkv\.lora_B' for the model's LoRA layer"):
        lora.load_lora_state_dict(model, state)


def test_a_b_that_would_broadcast_is_a_shape_error_and_changes_nothing():
    source, target = adapted(), adapted()
    before = {k: v.clone() for k, v in lora.lora_state_dict(target).items()}
    state = lora.lora_state_dict(source)
    state["blocks.1.attn.qkv.lora_B"] = torch.ones(96, 1)  # copy_ would broadcast it over r silently
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.attn\.qkv': lora_B has shape \(96, 1\) in the adapter "
                                         r"but \(96, 4\) in the model"):
        lora.load_lora_state_dict(target, state)
    assert all(torch.equal(v, before[k]) for k, v in lora.lora_state_dict(target).items())


def test_weights_under_both_a_prefixed_and_a_plain_name_are_not_merged_into_one():
    model = adapted()
    state = lora.lora_state_dict(model)
    state.update({f"_orig_mod.{k}": torch.ones_like(v) for k, v in lora.lora_state_dict(model).items()})
    with pytest.raises(ValueError, match=r"is for layer '_orig_mod\.blocks\.0\.attn\.qkv', which has no LoRA adapter"):
        lora.load_lora_state_dict(model, state)


def test_metadata_cannot_overwrite_the_adapters_own_config(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(adapted(), path, metadata={"r": "{}", "targets": "[]", "lora_version": "0", "note": "kept"})
    config, meta = lora.read_adapter_config(path)
    assert config["blocks.0.attn.qkv"] == {"r": 4, "alpha": 8.0, "splits": 3} and meta["note"] == "kept"


def test_a_safetensors_file_that_is_no_adapter_is_named_as_such(tmp_path):
    path = tmp_path / "merged.safetensors"
    lora.save_merged(adapted(), path, {"note": "a whole model"})
    with pytest.raises(ValueError, match=r"is a safetensors file but not a LoRA adapter written by lora\.save_adapter"):
        lora.load_adapter(tiny_vit(), path)


def test_a_strict_load_into_an_adapted_model_names_the_file_and_the_layer_it_lacks(tmp_path):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(adapted(depth=3), path)
    model = adapted()
    before = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"adapter '.*a\.safetensors' has layer 'blocks\.2\.attn\.qkv', which has no "
                                         r"LoRA adapter in the model"):
        lora.load_adapter(model, path)
    assert all(torch.equal(v, before[k]) for k, v in lora.lora_state_dict(model).items())
    assert lora.load_adapter(model, path, strict=False) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_a_file_with_none_of_an_adapted_model_s_layers_is_an_error_also_when_not_strict(tmp_path):
    """strict=False skips layers the model lacks, but a load of nothing at all would pass for a load."""
    source = nn.Sequential(nn.Linear(4, 12))
    lora.inject_lora(source, targets=("0",), r=2)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(source, path)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 12))
    lora.inject_lora(model, targets=("1",), r=2)
    for strict in (True, False):
        with pytest.raises(ValueError, match="has layer '0'" if strict else r"has none of the model's LoRA layers"):
            lora.load_adapter(model, path, strict=strict)


@pytest.mark.parametrize("meta", [{"targets": "[0]", "r": "[2]", "alpha": "[4]", "splits": "[1]"},
                                  {"targets": '"fc"', "r": '{"f": 2, "c": 2}', "alpha": '{"f": 4, "c": 4}',
                                   "splits": '{"f": 1, "c": 1}'},
                                  {"targets": "[" * 100000 + "]" * 100000}])
def test_metadata_of_the_wrong_shape_is_damaged_metadata(tmp_path, meta):
    from safetensors.torch import save_file
    base = {"lora_version": "1", "targets": '["fc"]', "r": '{"fc": 2}', "alpha": '{"fc": 4}', "splits": '{"fc": 1}'}
    path = tmp_path / "a.safetensors"
    save_file({"fc.lora_A": torch.zeros(2, 4), "fc.lora_B": torch.zeros(6, 2)}, str(path), metadata={**base, **meta})
    model = nn.Sequential()
    model.fc = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="a.safetensors' has damaged metadata"):
        lora.load_adapter(model, path)


def test_saved_files_are_byte_identical_for_the_same_weights_and_metadata(tmp_path):
    # A run started from an exported file records its SHA-256: exporting the same weights again must give the
    # same bytes, whatever order safetensors' hash map puts the metadata in.
    model = adapted()
    metadata = {k: str(i) for i, k in enumerate(("architecture", "img_size", "run", "weights", "epoch", "val_accuracy", "é"))}
    files = []
    for i in range(6):
        lora.save_merged(model, tmp_path / f"m{i}.safetensors", metadata)
        lora.save_adapter(model, tmp_path / f"a{i}.safetensors")
        files.append(((tmp_path / f"m{i}.safetensors").read_bytes(), (tmp_path / f"a{i}.safetensors").read_bytes()))
    assert all(f == files[0] for f in files)
    with safe_open(str(tmp_path / "m0.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
    assert set(lora.read_adapter_config(tmp_path / "a0.safetensors")[0]) == {f"blocks.{i}.attn.qkv" for i in range(2)}


def test_lora_state_dict_values_are_detached_from_the_trained_parameters():
    """The adapter weights come out with no autograd attached, as the docstring says: editing them in place (an
    average of several runs, say) is allowed and never becomes part of a training graph."""
    model = adapted()
    lora.mark_only_lora_as_trainable(model)
    state = lora.lora_state_dict(model)
    assert set(state) == {f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in ("lora_A", "lora_B")}
    for key, value in state.items():
        assert not value.requires_grad and value.grad_fn is None, key
    state["blocks.0.attn.qkv.lora_A"].mul_(1.0)  # in place on a Parameter that requires grad would raise


def test_a_b_whose_rows_do_not_divide_into_its_splits_is_damage_not_another_model_size(tmp_path):
    """No q/k/v layer has an out width that is not a multiple of its splits: such a B is a damaged file (save it
    again), said before anything is built, not a sign that the adapter belongs to another model size."""
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(adapted(), path)
    _, meta = lora.read_adapter_config(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.attn.qkv.lora_B"] = tensors["blocks.0.attn.qkv.lora_B"][:-1]  # (95, 4) with splits=3
    lora.save_safetensors(tensors, path, meta)
    model = tiny_vit().eval()
    with pytest.raises(ValueError, match=r"is damaged: layer 'blocks\.0\.attn\.qkv' has r=4, splits=3 in its "
                                         r"metadata but lora_A \(12, 32\), lora_B \(95, 4\)"):
        lora.load_adapter(model, path)
    assert not list(lora.lora_layers(model))


def test_loading_adapter_weights_copies_them_into_the_models_own_parameters():
    """load_lora_state_dict copies values into the model's parameters, which keep their memory and dtype: training
    the model after the load never writes into the state dict, nor into the model it was taken from."""
    source = adapted()
    before = {k: v.clone() for k, v in lora.lora_state_dict(source).items()}
    target = adapted()
    lora.load_lora_state_dict(target, lora.lora_state_dict(source))
    with torch.no_grad():
        for _, layer in lora.lora_layers(target):  # an optimizer step, say
            layer.lora_A.add_(1.0)
            layer.lora_B.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in lora.lora_state_dict(source).items())
    wide = adapted().double()
    lora.load_lora_state_dict(wide, before)
    for _, layer in lora.lora_layers(wide):
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64


def test_a_file_in_a_folder_not_made_yet_is_written_with_its_folders(tmp_path):
    """save_adapter and save_merged take a path as a user names it (``exports/run3/adapter.safetensors``): the
    folders it names are made, as a run's own output folder is, not left to a FileNotFoundError."""
    model = adapted()
    path = tmp_path / "exports" / "run3" / "adapter.safetensors"
    lora.save_adapter(model, path)
    target = adapted()
    assert lora.load_adapter(target, path)
    merged = tmp_path / "merged" / "encoder.safetensors"
    lora.save_merged(model, merged)
    assert [p.name for p in merged.parent.iterdir()] == ["encoder.safetensors"]
