"""Multi-process training: DDP gradients through the LoRA layers, and train.py under torchrun (CPU, gloo).

Run as a script under torchrun, this file is the worker of the DDP equivalence test.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
import vit  # noqa: E402
from test_train import ARTEFACTS, cli, tiny_config  # noqa: E402  (tests/ is on the path: pytest, or as a script)
from vqa import distributed  # noqa: E402
from vqa.errors import VQAError  # noqa: E402

STEPS, BATCH = 2, 8  # the whole batch; each of the two processes takes half


def adapted_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=28, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0, init_values=0.5)
    vit.add_lora(model, r=4)
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.1)  # B = 0 would hide a missing A gradient for a step
    lora.mark_only_lora_as_trainable(model)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 28, 28, generator=g), torch.randn(BATCH, 32, generator=g)


def train(model: nn.Module, step_model: nn.Module, rows: slice) -> None:
    x, target = data()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(step_model(x[rows]), target[rows])  # a mean: halves average to the whole
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def ddp_worker(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = adapted_vit()
    half = BATCH // dist.get_world_size()
    train(model, nn.parallel.DistributedDataParallel(model, static_graph=True), slice(rank * half, (rank + 1) * half))
    save_file(lora.lora_state_dict(model), str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


def torchrun(*args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ddp_on_two_processes_trains_the_adapters_as_one_process_on_the_whole_batch(tmp_path):
    result = torchrun(__file__, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    reference = adapted_vit()
    train(reference, reference, slice(0, BATCH))
    expected = lora.lora_state_dict(reference)
    start = lora.lora_state_dict(adapted_vit())
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got.keys() == expected.keys() and len(got) == 4  # 2 blocks x (A, B)
        for key in expected:
            assert not torch.equal(got[key], start[key]), key  # every adapter trained
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_each_process_gets_an_equal_disjoint_share_of_the_batches():
    batches = [[i] for i in range(11)]
    shares = [distributed.shard(batches, distributed.Processes(rank, 3)) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]  # 11 // 3: the last 2 batches sit this epoch out
    seen = [b[0] for s in shares for b in s]
    assert sorted(seen) == list(range(9))
    assert distributed.shard(batches, distributed.Processes()) == batches


def test_more_processes_than_batches_is_a_clear_error():
    with pytest.raises(VQAError, match="2 batch.* 4 processes"):
        distributed.shard([[0], [1]], distributed.Processes(0, 4))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    result = torchrun("train.py", "--config", str(tiny_config(tmp, batch_size=2)))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


def test_train_under_torchrun_writes_one_run_and_evaluates_every_question(ddp_run):
    tmp, result = ddp_run
    run = tmp / "run"
    for name in ARTEFACTS:
        assert (run / name).is_file(), name
    assert result.stdout.count("overall") == 1  # one process prints
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 8 training images in batches of 2: 4 batches an epoch, 2 for each process; 2 epochs.
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, 2), (2, 4)]
    # Each process evaluated half of the validation set; the summed counts equal one process's full pass.
    table = cli("-m", "vqa.evaluate", "--run", str(run), "--csv", str(tmp / "data" / "val.csv")).stdout
    overall = [line for line in table.splitlines() if line.startswith("overall")][0].split()
    best = max(lines, key=lambda m: m["accuracy"])
    assert lines[-1]["count"] == int(overall[-1]) == 4 * 5  # 4 validation images, 5 questions each
    assert overall[-2] == f"{100 * best['accuracy']:.2f}%"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    first, second = state["rng_per_process"]
    assert not torch.equal(first["torch"], second["torch"])  # each process draws its own dropout masks


def test_a_torchrun_checkpoint_resumes_under_torchrun_only(ddp_run, tmp_path):
    tmp, _ = ddp_run
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(tmp / "run"), str(run)], check=True)
    alone = cli("train.py", "--resume", str(run), "--epochs", "3", check=False)
    assert alone.returncode == 2
    assert "written by 2 training process(es)" in alone.stderr and "--nproc_per_node 2" in alone.stderr
    result = torchrun("train.py", "--resume", str(run), "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "epoch 3:" in result.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


if __name__ == "__main__":
    ddp_worker(Path(sys.argv[1]))
