"""The benchmarks' method: the orders their variants run in, what each variant trains and runs, and the ratios
reported."""
import argparse
import copy
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import lora
from conftest import tiny_vit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import throughput  # noqa: E402


@pytest.mark.parametrize("n", range(1, 9))
def test_within_a_round_each_variant_runs_after_every_other_equally_often_and_in_every_place(n):
    orders = throughput.balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    followers = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    assert set(followers) == set(pairs) and len(set(followers.values())) <= 1  # the same count for each pair
    places = Counter((i, v) for order in orders for i, v in enumerate(order))
    assert set(places.values()) == {len(orders) // n}  # each variant in each place equally often


def test_interleaved_times_every_variant_once_a_round_in_the_balanced_orders():
    ran = []
    fns = {name: (lambda name=name: ran.append(name)) for name in "abcd"}
    times = throughput.interleaved(fns, 8, torch.device("cpu"))
    assert {name: len(ts) for name, ts in times.items()} == dict.fromkeys("abcd", 8)
    names = list(fns)
    assert ran == [names[i] for r in range(8) for i in throughput.balanced_orders(4)[r % 4]]


def test_the_mask_benchmark_s_variants_each_draw_a_mask_of_the_same_kind_and_share():
    import dropout_mask

    variants = dropout_mask.masks(rows=200, width=96, p=0.25)
    assert list(variants) == ["LoRADropout", "randint", "bernoulli"]
    for name, draw in variants.items():
        mask = draw()
        assert mask.shape == (200, 96) and mask.dtype == torch.float32, name
        assert set(mask.unique().tolist()) == {0.0, 1.0}, name
        assert abs(mask.mean().item() - 0.75) < 0.02, name
    torch.manual_seed(5)
    layer_mask = variants["LoRADropout"]()
    torch.manual_seed(5)
    packed = variants["randint"]()
    # The same draws, each minus 2**63: only the sign of every fourth 16-bit decision differs.
    assert torch.equal(layer_mask.view(-1, 4)[:, :3], packed.view(-1, 4)[:, :3])
    assert not torch.equal(layer_mask, packed)


def test_the_host_time_benchmark_runs_each_path_it_names(monkeypatch):
    import lora.layer
    import layer_host_time

    folds, updates = [], []
    real_fold, real_update = lora.layer.LoRALinear._folded_weight, lora.layer._lora_update_
    monkeypatch.setattr(lora.layer.LoRALinear, "_folded_weight", lambda self: folds.append(1) or real_fold(self))
    monkeypatch.setattr(lora.layer, "_lora_update_", lambda *a: updates.append(1) or real_update(*a))
    ran = {}
    for name, (adapted, plain) in layer_host_time.paths(reps=3).items():
        folds.clear(), updates.clear()
        adapted()
        ran[name] = (len(folds), len(updates))
        folds.clear(), updates.clear()
        plain()
        assert (len(folds), len(updates)) == (0, 0), name  # the reference is a plain nn.Linear
    assert ran["update (inference)"] == (0, 3)
    assert ran["fold (inference)"] == ran["fold, bf16 autocast"] == (3, 0)
    assert ran["forward + backward, dropout 0"] == ran["forward + backward, dropout 0.1"] == (0, 3)


def test_the_host_time_benchmark_trains_only_what_a_lora_step_trains():
    import layer_host_time

    plain, adapted = built = layer_host_time.layers()
    calls = layer_host_time.paths(reps=2, built=built)
    for name in ("forward + backward, dropout 0", "forward + backward, dropout 0.1"):
        for call in calls[name]:
            call()
    # As in a LoRA step and its frozen floor: no base weight or bias gets a gradient, every adapter does.
    for layer in (plain, *adapted.values()):
        assert layer.weight.grad is None and layer.bias.grad is None
    for layer in adapted.values():
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


# The measured variants themselves: what each trains, runs and reports (a tiny ViT, well under a second each).
CPU = torch.device("cpu")


def tiny(name="vit_small_patch14_dinov2", img_size=28, device=CPU):
    """A stand-in for ``throughput.build``: conftest's tiny ViT with 4 blocks (the last 3 unfrozen leave one)."""
    torch.manual_seed(0)
    return tiny_vit(img_size=img_size, depth=4).to(device)


def trained_names(variant, model):
    """The parameters ``variant`` must train, by name."""
    names = [n for n, _ in model.named_parameters()]
    if variant.startswith("lora"):
        return {n for n in names if n.endswith(("lora_A", "lora_B"))}
    if variant == "last3_unfrozen":
        return {n for n in names if n.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "norm."))}
    if variant.startswith("full_finetune"):
        return set(names)
    return set()


def check_variant(variant, model, optimizer):
    params = dict(model.named_parameters())
    expected = trained_names(variant, model)
    assert {n for n, p in params.items() if p.requires_grad} == expected, variant
    assert model.training, variant
    layers = dict(lora.lora_layers(model))
    assert bool(layers) == variant.startswith("lora"), variant
    for layer in layers.values():
        assert not layer.merged and layer.r == 8, variant
        p = getattr(layer.lora_dropout, "p", 0.0)
        assert p == (0.1 if variant.endswith("0.1") else 0.0), variant
    if variant == "frozen_floor":
        assert optimizer is None
        return
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(params[n]) for n in expected}, variant
    assert bool(optimizer.defaults.get("fused")) == (variant == "full_finetune_fused"), variant


def test_an_unknown_training_variant_is_refused_not_measured_as_full_fine_tuning():
    for name in ("lora_r16_dropout0.1", "full_fine_tune", "last_3_unfrozen"):
        with pytest.raises(ValueError, match=f"unknown training variant '{name}'"):
            throughput.training_setup(tiny(), name)


@pytest.mark.parametrize("variant", throughput.TRAINING)
def test_each_training_variant_trains_exactly_its_parameters_on_a_copy_of_the_base(variant):
    base = tiny()
    before = copy.deepcopy(base.state_dict())
    model, optimizer = throughput.training_setup(base, variant)
    check_variant(variant, model, optimizer)
    # The gradient of the step's loss, taken apart from the step.
    x = torch.randn(2, 3, 28, 28)
    probe = copy.deepcopy(model)
    probe_params = {n: p for n, p in probe.named_parameters() if p.requires_grad}
    if probe_params:
        torch.manual_seed(1)  # the same dropout masks as the step's
        loss = probe(x).float().pow(2).mean()
        grads = dict(zip(probe_params, torch.autograd.grad(loss, list(probe_params.values()))))
    for p in model.parameters():  # a stale gradient the step must not add to
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e3)
    reached = []  # the backward pass reaches the first block's output

    def watch(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: reached.append(1))

    model.blocks[0].register_forward_hook(watch)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    throughput.train_step(model, optimizer, x)
    assert bool(reached) == (variant != "last3_unfrozen"), variant  # the floor back-propagates through every block
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed == trained_names(variant, model), variant
    for n, g in (grads.items() if probe_params else ()):
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, msg=f"{variant} {n}")
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), variant
    # Nor are the base's flags or hooks touched: a variant built from it after this one trains what it should.
    assert all(p.requires_grad for p in base.parameters()) and not base.patch_embed._forward_hooks, variant
    check_variant("full_finetune", *throughput.training_setup(base, "full_finetune"))


def test_inference_variants_are_the_base_and_an_adapter_unmerged_merged_and_removed():
    base = tiny().eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        y0 = base(x)
    before = copy.deepcopy(base.state_dict())
    models = throughput.inference_models(base)
    assert list(models) == list(throughput.INFERENCE) and models["base"] is base
    assert not any(m.training for ms in models.values() for m in ms.modules())
    assert not list(lora.lora_layers(base)) and not list(lora.lora_layers(models["lora_removed"]))
    unmerged, merged = dict(lora.lora_layers(models["lora_unmerged"])), dict(lora.lora_layers(models["lora_merged"]))
    assert unmerged and not any(layer.merged for layer in unmerged.values())
    assert merged.keys() == unmerged.keys() and all(layer.merged for layer in merged.values())
    for layer in list(unmerged.values()) + list(merged.values()):
        assert isinstance(layer.lora_dropout, torch.nn.Identity) and layer.lora_B.abs().sum() > 0 and layer.r == 8
    with torch.no_grad():
        torch.testing.assert_close(base(x), y0, rtol=0, atol=0)  # the base itself is untouched
        for name in ("lora_unmerged", "lora_merged", "lora_removed"):  # each holds a nonzero adapter
            assert not torch.allclose(models[name](x), y0, atol=1e-4), name
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_ratios_are_medians_of_per_round_reference_over_variant_times_with_their_quartiles():
    times = {"ref": [1.0, 2.0, 10.0, 4.0, 3.0], "v": [1.0, 4.0, 5.0, 1.0, 6.0]}
    per_round = [1.0, 0.5, 2.0, 4.0, 0.5]  # the medians' ratio, 3 / 4, is not what is asked
    r = throughput.ratios(times, "ref")
    assert r["v"]["median"] == statistics.median(per_round) == 1.0
    assert r["v"]["iqr"] == pytest.approx([0.5, 2.0])  # 25th and 75th percentiles of the per-round ratios
    assert r["ref"] == {"median": 1.0, "iqr": [1.0, 1.0]}
    assert throughput.summary([2.0]) == {"median": 2.0, "iqr": [2.0, 2.0]}


def percentile(values, p):
    """The ``p`` quantile by linear interpolation between the sorted values at (n - 1) p (numpy's default)."""
    v = sorted(values)
    h = (len(v) - 1) * p
    lo = int(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


@pytest.mark.parametrize("values", [[1.0, 2.0], [3.0, 1.0, 2.0], [0.5, 0.5, 1.0, 2.0, 4.0], [1.1, 0.9, 1.3, 1.0]])
def test_the_interquartile_range_interpolates_between_the_rounds_and_never_leaves_them(values):
    s = throughput.summary(values)
    assert s["median"] == statistics.median(values)
    assert s["iqr"] == pytest.approx([percentile(values, 0.25), percentile(values, 0.75)])
    assert min(values) <= s["iqr"][0] <= s["median"] <= s["iqr"][1] <= max(values)


def fake_times(names, rounds=4):
    """Distinct, known times per variant and round."""
    return {n: [0.01 * (i + 1) * (1 + 0.1 * ((r * (i + 2)) % 3)) for r in range(rounds)] for i, n in enumerate(names)}


def bench_args(**kw):
    return argparse.Namespace(**{"model": "m", "img_size": 28, "batch_size": 3, "infer_batch_size": 5,
                                 "rounds": 4, "warmup": 1, **kw})


def test_bench_training_times_each_variant_s_own_step_and_reports_ratios_to_full_fine_tuning(monkeypatch):
    built, ran, current, calls = [], {}, [None], []
    monkeypatch.setattr(throughput, "build", lambda *a: built.append(a[:2]) or tiny(img_size=a[1]))
    real_step = throughput.train_step

    def step(model, optimizer, x):
        ran.setdefault(current[0], []).append((model, optimizer, x.shape))
        real_step(model, optimizer, x)

    monkeypatch.setattr(throughput, "train_step", step)
    times = fake_times(throughput.TRAINING)

    def fake_interleaved(fns, rounds, device):
        assert list(fns) == list(throughput.TRAINING)
        calls.append(rounds)
        for name, fn in fns.items():
            current[0] = name
            fn()
        return {n: ts[:rounds] for n, ts in times.items()}

    monkeypatch.setattr(throughput, "interleaved", fake_interleaved)
    result = throughput.bench_training(bench_args(), CPU)
    assert built == [("m", 28)] and calls == [1, 4]  # the warmup's rounds, then the timed ones
    for v in throughput.TRAINING:
        (model, optimizer, shape), *_ = ran[v]
        check_variant(v, model, optimizer)
        assert shape == (3, 3, 28, 28)
        per_round = [f / t for f, t in zip(times["full_finetune"], times[v])]
        assert result[v]["ratio_to_full"] == pytest.approx(statistics.median(per_round))
        assert result[v]["ratio_iqr"] == pytest.approx(statistics.quantiles(per_round, n=4, method="inclusive")[::2])
        assert result[v]["images_per_s"] == pytest.approx(3 / statistics.median(times[v]))
        assert result[v]["round_seconds"] == times[v][:4]  # every timed round, in the order of the rounds
    models = [ran[v][0][0] for v in throughput.TRAINING]
    assert len({id(m) for m in models}) == len(models)  # a model of its own each
    cost = [a / b - 1 for a, b in zip(times["lora_r8_dropout0.1"], times["lora_r8_dropout0"])]
    assert result["dropout_cost"] == pytest.approx(statistics.median(cost))
    assert result["dropout_cost_iqr"] == pytest.approx(statistics.quantiles(cost, n=4, method="inclusive")[::2])
    fused = result["ratio_to_fused_full"]
    assert set(fused) == {"lora_r8_dropout0.1", "lora_r8_dropout0", "frozen_floor"}
    for v, r in fused.items():
        per_round = [f / t for f, t in zip(times["full_finetune_fused"], times[v])]
        assert r["median"] == pytest.approx(statistics.median(per_round))


def test_bench_inference_runs_each_model_in_inference_mode_and_reports_ratios_to_the_base(monkeypatch):
    built, calls, made = [], [], {}
    monkeypatch.setattr(throughput, "build", lambda *a: built.append(a[:2]) or tiny(img_size=a[1]))
    real_models = throughput.inference_models
    monkeypatch.setattr(throughput, "inference_models", lambda base: made.update(real_models(base)) or made)
    times = fake_times(throughput.INFERENCE)

    def fake_interleaved(fns, rounds, device):
        assert list(fns) == list(throughput.INFERENCE)
        calls.append(rounds)
        for name, fn in fns.items():
            seen = []
            handles = [m.register_forward_hook(lambda m, a, out, n=n: seen.append(
                (n, torch.is_inference_mode_enabled(), a[0].shape))) for n, m in made.items()]
            fn()
            for h in handles:
                h.remove()
            assert seen == [(name, True, (5, 3, 28, 28))]
        return {n: ts[:rounds] for n, ts in times.items()}

    monkeypatch.setattr(throughput, "interleaved", fake_interleaved)
    result = throughput.bench_inference(bench_args(), CPU)
    assert built == [("m", 28)] and calls == [1, 4]
    assert list(result) == list(throughput.INFERENCE)
    assert not made["base"].training
    for v in throughput.INFERENCE:
        per_round = [b / t for b, t in zip(times["base"], times[v])]
        assert result[v]["ratio_to_base"] == pytest.approx(statistics.median(per_round))
        assert result[v]["ratio_iqr"] == pytest.approx(statistics.quantiles(per_round, n=4, method="inclusive")[::2])
        assert result[v]["images_per_s"] == pytest.approx(5 / statistics.median(times[v]))
        assert result[v]["round_seconds"] == times[v][:4]


def test_a_memory_measurement_trains_the_named_variant_on_the_built_model_itself(monkeypatch):
    monkeypatch.setattr(throughput, "build", lambda *a: tiny(img_size=a[1]))
    setups, steps = [], []
    real_setup, real_step = throughput.training_setup, throughput.train_step
    monkeypatch.setattr(throughput, "training_setup",
                        lambda base, v, copy_base=True: setups.append((v, copy_base)) or real_setup(base, v, copy_base))
    monkeypatch.setattr(throughput, "train_step", lambda m, o, x: steps.append(x.shape) or real_step(m, o, x))
    growth = throughput.memory_growth(bench_args(), "last3_unfrozen", CPU)
    assert setups == [("last3_unfrozen", False)]
    assert steps == [(3, 3, 28, 28)] * 3
    assert isinstance(growth, float) and growth >= 0


def test_bench_memory_measures_each_variant_in_a_child_of_its_own_and_divides_by_full_fine_tuning(monkeypatch):
    calls = []
    sizes = {v: 2**20 * (i + 1) for i, v in enumerate(throughput.MEMORY)}

    def run(cmd, **kw):
        calls.append(cmd)
        variant = cmd[cmd.index("--memory-child") + 1]
        return argparse.Namespace(returncode=0, stdout=f"noise\n{float(sizes[variant])}\n", stderr="")

    monkeypatch.setattr(throughput.subprocess, "run", run)
    result = throughput.bench_memory(bench_args(model="mm", img_size=42, batch_size=7), CPU)
    assert [c[c.index("--memory-child") + 1] for c in calls] == list(throughput.MEMORY)
    for c in calls:
        assert (c[c.index("--model") + 1], c[c.index("--img-size") + 1], c[c.index("--batch-size") + 1],
                c[c.index("--device") + 1]) == ("mm", "42", "7", "cpu")
    assert "full_finetune_fused" not in result and list(result) == list(throughput.MEMORY)
    for v, r in result.items():
        assert r["growth_mib"] == pytest.approx(sizes[v] / 2**20)
        assert r["ratio_to_full"] == pytest.approx(sizes[v] / sizes["full_finetune"])


def test_bench_merge_times_merge_and_unmerge_apart_after_the_warmup(monkeypatch):
    built = []
    monkeypatch.setattr(throughput, "build", lambda *a: built.append(a[:2]) or tiny())
    clock, calls = [0.0], []
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    real_merge, real_unmerge = lora.merge_lora, lora.unmerge_lora

    def merge(model):
        calls.append("merge")
        assert list(lora.lora_layers(model)) and not any(layer.merged for _, layer in lora.lora_layers(model))
        clock[0] += 0.005 if calls.count("merge") <= 2 else 0.002  # the warmup's merges are slow
        return real_merge(model)

    def unmerge(model):
        calls.append("unmerge")
        assert all(layer.merged for _, layer in lora.lora_layers(model))
        clock[0] += 0.001
        return real_unmerge(model)

    monkeypatch.setattr(throughput.lora, "merge_lora", merge)
    monkeypatch.setattr(throughput.lora, "unmerge_lora", unmerge)
    result = throughput.bench_merge(bench_args(warmup=2, rounds=2), CPU)
    assert built == [("vit_base_patch14_dinov2", 224)]
    assert calls == ["merge", "unmerge"] * 4
    assert result == pytest.approx({"merge_ms": 2.0, "unmerge_ms": 1.0, "total_ms": 3.0, "first_merge_ms": 5.0})


def test_main_passes_its_arguments_runs_the_sections_asked_and_prints_what_it_writes(monkeypatch, tmp_path, capsys):
    got = {}
    training = {v: {"images_per_s": 10.0 + i, "ratio_to_full": 1.5 + i, "ratio_iqr": [1.25 + i, 1.75 + i]}
                for i, v in enumerate(throughput.TRAINING)}
    training.update(dropout_cost=0.125, dropout_cost_iqr=[0.0625, 0.25],
                    ratio_to_fused_full={"frozen_floor": {"median": 3.25, "iqr": [3.125, 3.375]}})
    inference = {v: {"images_per_s": 100.0 + i, "ratio_to_base": 0.5 + i, "ratio_iqr": [0.25 + i, 0.75 + i]}
                 for i, v in enumerate(throughput.INFERENCE)}
    monkeypatch.setattr(throughput, "bench_inference", lambda args, device: got.setdefault("inference", args)
                        and inference)
    monkeypatch.setattr(throughput, "bench_training", lambda args, device: got.setdefault("training", args)
                        and training)
    monkeypatch.setattr(throughput, "bench_memory", lambda args, device: got.setdefault("memory", args) and {})
    monkeypatch.setattr(throughput, "bench_merge", lambda args, device: got.setdefault("merge", args) and {})
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--model", "mm", "--img-size", "42", "--batch-size", "7",
                                      "--rounds", "5", "--warmup", "2", "--device", "cpu", "--only", "inference",
                                      "--only", "training", "--json", str(out)])
    throughput.main()
    assert set(got) == {"inference", "training"}
    for args in got.values():
        assert (args.model, args.img_size, args.batch_size, args.infer_batch_size, args.rounds, args.warmup) == \
            ("mm", 42, 7, 7, 5, 2)
    report = json.loads(out.read_text())
    assert report["inference"] == inference and report["training"] == training
    assert (report["model"], report["img_size"], report["batch_size"], report["rounds"], report["device"]) == \
        ("mm", 42, 7, 5, "cpu")
    printed = capsys.readouterr().out
    for i, v in enumerate(throughput.INFERENCE):
        assert f"inference {v:<22}{100.0 + i:>9.1f} img/s   x{0.5 + i:.3f} (IQR {0.25 + i:.3f} to {0.75 + i:.3f})" \
            in printed
    for i, v in enumerate(throughput.TRAINING):
        assert f"train     {v:<22}{10.0 + i:>9.1f} img/s   x{1.5 + i:.3f} (IQR {1.25 + i:.3f} to {1.75 + i:.3f})" \
            in printed
    assert "dropout 0.1 adds +12.5% (IQR +6.2% to +25.0%)" in printed
    assert "frozen_floor       x3.250 (IQR 3.125 to 3.375)" in printed


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
    (["--infer-batch-size", "0"], "argument --infer-batch-size: must be >= 1, got 0"),
    (["--img-size", "0"], "argument --img-size: must be >= 1, got 0"),
    (["--device", "foo"], "--device has unknown device 'foo'; use auto, cpu or cuda"),
])
def test_main_refuses_a_bad_option_with_a_usage_error_before_measuring_anything(monkeypatch, capsys, argv, message):
    for section in ("bench_inference", "bench_training", "bench_memory", "bench_merge"):
        monkeypatch.setattr(throughput, section, lambda args, device, section=section: pytest.fail(f"{section} ran"))
    monkeypatch.setattr(sys, "argv", ["throughput.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        throughput.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_json_records_the_inference_batch_and_the_warmup_it_ran_with(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(throughput, "bench_inference", lambda args, device: got.setdefault("args", args) and {})
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--batch-size", "7", "--infer-batch-size", "9", "--warmup", "2",
                                      "--device", "cpu", "--only", "inference", "--json", str(out)])
    throughput.main()
    assert (got["args"].batch_size, got["args"].infer_batch_size) == (7, 9)
    report = json.loads(out.read_text())
    assert (report["batch_size"], report["infer_batch_size"], report["warmup"]) == (7, 9, 2)


def test_step_profile_counts_each_kernel_once_not_the_optimizer_annotation_that_spans_them(monkeypatch, capsys):
    import types

    import step_profile
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def on_gpu(i, name, start_us, end_us, annotation=False):
        return FunctionEvent(id=i, name=name, thread=0, start_us=start_us, end_us=end_us, stack=[], use_device="cuda",
                             device_type=torch.autograd.DeviceType.CUDA, is_user_annotation=annotation)

    # One step on the GPU's timeline: a 3 ms GEMM, then AdamW's 1 ms kernel inside the optimizer's annotation,
    # as torch.profiler records a CUDA step (Optimizer.step#AdamW.step in bench/results/step_profile_cuda_h100.txt).
    events = EventList([on_gpu(1, "gemm", 0, 3000), on_gpu(2, "adam", 3000, 4000),
                        on_gpu(3, "Optimizer.step#AdamW.step", 3000, 4000, annotation=True)], use_device="cuda")
    events._build_tree()
    assert "Self CUDA time total: 4.000ms" in events.key_averages().table()  # the profiler's own sum

    class Profile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events.key_averages()

    monkeypatch.setattr(step_profile, "device_arg", lambda parser, name: torch.device("cuda"))
    monkeypatch.setattr(step_profile, "build", lambda *a: None)
    monkeypatch.setattr(step_profile, "training_setup", lambda base, variant: (None, None))
    monkeypatch.setattr(step_profile, "train_step", lambda *a: None)
    monkeypatch.setattr(step_profile, "sync", lambda device: None)
    monkeypatch.setattr(step_profile, "interleaved", lambda fns, rounds, device: {v: [0.005] * rounds for v in fns})
    monkeypatch.setattr(step_profile, "profile", Profile)
    # No CUDA here: the input is never made (the steps are stubs); the rest of torch as it is.
    monkeypatch.setattr(step_profile, "torch", types.SimpleNamespace(randn=lambda *a, **kw: None,
                                                                     autograd=torch.autograd))
    monkeypatch.setattr(sys, "argv", ["step_profile.py", "--steps", "1", "--rounds", "4"])
    step_profile.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if "GPU busy" in line]
    assert len(lines) == len(step_profile.VARIANTS)
    assert all("wall    5.00 ms/step   GPU busy    4.00 ms   GPU waiting   1.00 ms (20%)" in line for line in lines)


@pytest.mark.parametrize("script, argv", [
    ("layer_paths", ["--width", "8", "--rows", "4", "--rounds", "0", "--device", "cpu"]),
    ("layer_paths", ["--width", "8", "--rows", "4", "--reps", "0", "--device", "cpu"]),
    ("layer_paths", ["--width", "8", "--rows", "4", "--device", "foo"]),
    ("dropout_mask", ["--rows", "4", "--width", "8", "--rounds", "0"]),
    ("layer_host_time", ["--reps", "1", "--rounds", "0"]),
    ("step_profile", ["--rounds", "0", "--device", "cpu"]),
    ("step_profile", ["--steps", "0", "--device", "cpu"]),
    ("step_profile", ["--device", "foo"]),
])
def test_the_other_benchmarks_refuse_a_bad_option_with_a_usage_error(monkeypatch, script, argv):
    module = __import__(script)
    if hasattr(module, "build"):  # stands in for ViT-B at 224 px, should the options get that far
        monkeypatch.setattr(module, "build", lambda *a: tiny())
        monkeypatch.setattr(module, "torch", __import__("types").SimpleNamespace(
            randn=lambda *a, **kw: torch.randn(1, 3, 28, 28), autograd=torch.autograd))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2


def test_a_memory_child_measures_the_variant_it_is_given_and_prints_only_the_bytes(monkeypatch, capsys):
    got = []
    monkeypatch.setattr(throughput, "memory_growth", lambda args, v, device: got.append((v, args.model)) or 123.0)
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--memory-child", "lora_r8_dropout0", "--model", "mm",
                                      "--device", "cpu"])
    throughput.main()
    assert got == [("lora_r8_dropout0", "mm")]
    assert capsys.readouterr().out.split()[-1] == "123.0"
