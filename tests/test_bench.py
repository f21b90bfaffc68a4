"""The benchmarks' timing method: the orders their variants run in."""
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

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
