"""Multi-process training: DDP gradients through the LoRA layers, and train.py under torchrun (CPU, gloo).

Run as a script under torchrun, this file is the worker of the DDP equivalence test.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
import vit  # noqa: E402
from test_train import ARTEFACTS, nan_after, tiny_config  # noqa: E402  (tests/ is on the path: pytest, or as a script)
from vqa import DeterministicVQA, distributed  # noqa: E402
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


def vqa_model() -> nn.Module:
    torch.manual_seed(0)
    model = DeterministicVQA(vision_model="vit_small_patch14_dinov2", img_size=28, vocab_size=20, num_answers=5,
                             hidden_dim=32, num_heads=2, question_layers=1, vision_lora_r=4, vision_lora_dropout=0.0,
                             dropout=0.0, backbone_kwargs=dict(depth=2))
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.1)
    model.freeze_pretrained()
    return model


def batch(kind: str, rows: slice):
    """Rows of one fixed batch: (inputs, loss function of the model's output)."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, 28, 28, generator=g)
    if kind == "vit":
        target = torch.randn(BATCH, 32, generator=g)
        return (pixels[rows],), lambda out: nn.functional.mse_loss(out, target[rows])
    # One question per image; the type head's output is left out of the loss, as without the type loss.
    ids, answers = torch.randint(3, 20, (BATCH, 6), generator=g), torch.randint(0, 5, (BATCH,), generator=g)
    n = rows.stop - rows.start
    return ((pixels[rows], ids[rows], None, torch.arange(n)),
            lambda out: nn.functional.cross_entropy(out.logits, answers[rows]))  # a mean: halves average


def train(model: nn.Module, step_model: nn.Module, kind: str, shares: list[slice], accumulate: bool = False) -> None:
    """SGD steps on the mean of the shares' losses: what DDP computes from one share per process (each
    share a forward of its own, so the VQA model's BatchNorm sees each share's statistics, as in DDP).
    ``accumulate``: each share's loss / len(shares) gets a backward of its own, as train.py's grad_accum_steps does."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        optimizer.zero_grad()
        if accumulate:
            for inputs, loss_of in (batch(kind, rows) for rows in shares):
                (loss_of(step_model(*inputs)) / len(shares)).backward()
        else:
            losses = [loss_of(step_model(*inputs)) for inputs, loss_of in (batch(kind, rows) for rows in shares)]
            (sum(losses) / len(losses)).backward()
        optimizer.step()


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


MODELS = {"vit": adapted_vit, "vqa": vqa_model}


def halves() -> list[slice]:
    return [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]


def quarters() -> list[slice]:
    return [slice(i, i + BATCH // 4) for i in range(0, BATCH, BATCH // 4)]


def ddp_worker(out: Path) -> None:
    """Both models, one after the other, in one process group: one torchrun launch for both (a launch spends
    seconds starting processes)."""
    procs, device = distributed.setup(torch.device("cpu"))
    for kind in MODELS:
        model = MODELS[kind]()
        unused = [model.type_head] if kind == "vqa" else []
        mine = halves()[procs.rank]
        train(model, distributed.wrap(model, procs, device, unused), kind, [mine])
        save_file(parameters(model), str(out / f"{kind}_rank{procs.rank}.safetensors"))
        save_file(dict(model.named_buffers()), str(out / f"{kind}_rank{procs.rank}_own_buffers.safetensors"))
        distributed.sync_buffers(model, procs)  # as train.py does before evaluating
        save_file(dict(model.named_buffers()), str(out / f"{kind}_rank{procs.rank}_buffers.safetensors"))
    # Two quarters a process, each with a backward of its own inside one DDP step (no no_sync).
    model = vqa_model()
    train(model, distributed.wrap(model, procs, device, [model.type_head]), "vqa",
          quarters()[2 * procs.rank:2 * procs.rank + 2], accumulate=True)
    save_file(parameters(model), str(out / f"accumulated_rank{procs.rank}.safetensors"))
    distributed.teardown(procs)


def torchrun_command(log_dir: Path, *args) -> list[str]:
    """torchrun on two processes, its logs in ``log_dir`` (by default each launch leaves a torchelastic_*
    folder in the system's temporary folder)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--log-dir", str(log_dir), *args]


def torchrun(*args, timeout=240):
    with tempfile.TemporaryDirectory(prefix="torchrun_logs_") as logs:
        return subprocess.run(torchrun_command(Path(logs), *args), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="session")  # not "module": worksteal interleaves modules, building it again on each return
def ddp_trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_models")
    result = torchrun(__file__, "ddp", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", ["vit", "vqa"])
def test_ddp_on_two_processes_trains_as_one_process_on_the_whole_batch(kind, ddp_trained):
    """Both processes end with the weights of one process that stepped on the mean of both halves' losses:
    the adapters and the decoder got averaged gradients, and the type head, outside the loss, stayed put.
    (For the ViT, whose loss is a mean over the batch, that is one process on the whole batch.)"""
    start = parameters(MODELS[kind]())
    reference = MODELS[kind]()
    train(reference, reference, kind, halves())
    expected = parameters(reference)
    trainable = {name for name, p in reference.named_parameters() if p.requires_grad}
    moved = {name for name in trainable if not torch.equal(expected[name], start[name])}
    assert {k for k in trainable if ".lora_" in k} <= moved  # every adapter trained
    if kind == "vqa":
        assert not any(k.startswith("type_head.") for k in moved) and "answer_head.0.weight" in moved
    for rank in (0, 1):
        got = load_file(str(ddp_trained / f"{kind}_rank{rank}.safetensors"))
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # Each process's last forward updated its BatchNorm statistics from its own half; after sync_buffers
    # both hold the main process's, so every process evaluates with the statistics that are saved.
    own = [load_file(str(ddp_trained / f"{kind}_rank{rank}_own_buffers.safetensors")) for rank in (0, 1)]
    synced = [load_file(str(ddp_trained / f"{kind}_rank{rank}_buffers.safetensors")) for rank in (0, 1)]
    assert own[0].keys() == synced[1].keys() == dict(MODELS[kind]().named_buffers()).keys()
    for key in own[0]:
        assert torch.equal(synced[0][key], own[0][key]) and torch.equal(synced[1][key], own[0][key]), key
    if kind == "vqa":
        assert not torch.equal(own[0]["image_norm.running_mean"], own[1]["image_norm.running_mean"])


def test_ddp_with_two_batches_a_step_in_each_process_trains_as_one_process_on_all_four(ddp_trained):
    """train.py's grad_accum_steps under DDP: every batch's backward all-reduces onto what the step's earlier
    batches left (DDP with static_graph, no no_sync), which sums to the mean of all four quarters' losses."""
    reference = vqa_model()
    train(reference, reference, "vqa", quarters())
    expected = parameters(reference)
    halves_trained = load_file(str(ddp_trained / "vqa_rank0.safetensors"))  # BatchNorm saw halves there
    assert any(not torch.equal(halves_trained[k], expected[k]) for k in expected)
    for rank in (0, 1):
        got = load_file(str(ddp_trained / f"accumulated_rank{rank}.safetensors"))
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


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


def test_a_cuda_process_takes_the_gpu_of_its_local_rank_and_that_gpu_must_exist(monkeypatch):
    """On a machine of a multi-machine run, process RANK 3 with LOCAL_RANK 1 takes cuda:1; a LOCAL_RANK with no
    GPU of its own is a clear error. (CUDA's calls simulated: this runs without a GPU.)"""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # the group itself is not the point here
    procs, device = distributed.setup(torch.device("cuda"))
    assert procs == distributed.Processes(3, 4) and device == torch.device("cuda", 1) and chosen == [device]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(VQAError, match="process 3 wants GPU 2 but this machine has 2; lower torchrun's"):
        distributed.setup(torch.device("cuda"))


def test_processes_agree_on_the_largest_value_any_of_them_holds(monkeypatch):
    """Each value's maximum over the processes: two that both got SIGTERM (15) stop on 15, not on a sum that
    names another signal. (The other process's values simulated in the all-reduce.)"""
    import torch.distributed as dist

    theirs = torch.tensor([1, 15, 2])

    def all_reduce(t, op=dist.ReduceOp.SUM):
        t.copy_(torch.maximum(t, theirs) if op == dist.ReduceOp.MAX else t + theirs)

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    assert distributed.max_over_ranks([0, 15, 9], distributed.Processes(0, 2), torch.device("cpu")) == [1, 15, 9]


# One torchrun run, checked as it ends and as the reference the stopped runs must end up equal to: gradient
# checkpointing and no type loss (its head outside DDP), the options DDP is most particular about; dropout
# 0.1, 2 loader workers a process, a checkpoint every step.
RUN_OPTIONS = dict(checkpoint_every=1, epochs=3, batch_size=1, device="cpu", num_workers=2, use_type_loss=False,
                   log_every=3)
RUN_OVERRIDES = ("--grad_checkpointing", "true")


@pytest.fixture(scope="session")  # not "module": worksteal interleaves modules, building it again on each return
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    result = torchrun("train.py", "--config", str(tiny_config(tmp, **RUN_OPTIONS)), *RUN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


def test_train_under_torchrun_writes_one_run_and_evaluates_every_question(uninterrupted, capsys):
    import vqa.evaluate

    tmp, result = uninterrupted
    run = tmp / "run"
    for name in ARTEFACTS:
        assert (run / name).is_file(), name
    assert result.stdout.count("overall") == 1  # one process prints
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["grad_checkpointing"] is True and saved["train"]["use_type_loss"] is False
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 8 training images in batches of 1: 8 batches an epoch, 4 for each process; 3 epochs.
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, 4), (2, 8), (3, 12)]
    # Each process evaluated half of the validation set; the summed counts equal one process's full pass.
    assert vqa.evaluate.main(["--run", str(run), "--csv", str(tmp / "data" / "val.csv")]) == 0
    overall = [line for line in capsys.readouterr().out.splitlines() if line.startswith("overall")][0].split()
    best = max(lines, key=lambda m: m["accuracy"])
    assert lines[-1]["count"] == int(overall[-1]) == 4 * 5  # 4 validation images, 5 questions each
    assert overall[-2] == f"{100 * best['accuracy']:.2f}%"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    first, second = state["rng_per_process"]
    assert not torch.equal(first["torch"], second["torch"])  # each process draws its own dropout masks
    assert state["train_images"] == 8  # the data set's, which resume checks, not a process's share (4)


def nan_worker(argv: list[str]) -> int:
    """train.py's command line in a process whose loss turns NaN from its third step on rank 1 only."""
    import train

    if os.environ["RANK"] == "1":
        train.F.cross_entropy = nan_after(train.F.cross_entropy, 2)  # one loss a step
    return train.cli(argv)


@pytest.mark.parametrize("accumulate, step", [(1, 3), (2, 2)])
def test_a_loss_that_is_not_finite_in_one_process_stops_every_process(tmp_path, accumulate, step):
    """Rank 1 alone sees a NaN loss; both processes stop at the same step, with an error naming it, and no
    process hangs in a collective the other never joins. The last good checkpoint stays. Also with 2 batches a
    step, each batch's backward all-reducing inside the step."""
    # 8 images in batches of 2 over 2 processes: 2 batches an epoch each, so the NaN comes in epoch 2's first batch:
    # step 3, or with 2 batches a step, step 2.
    config = tiny_config(tmp_path, batch_size=2, device="cpu", use_type_loss=False, grad_accum_steps=accumulate)
    result = torchrun(__file__, "nan-on-rank-1", "--config", str(config), timeout=120)
    assert result.returncode != 0
    assert f"error: loss is nan at epoch 2, step {step}" in result.stderr, result.stderr[-3000:]
    assert f"error: loss is not finite in another process at epoch 2, step {step}" in result.stderr, \
        result.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2 // accumulate)  # the end of epoch 1, untouched


def validation_signal_worker(argv: list[str]) -> int:
    """train.py's command line in a process that, on rank 0 only, gets SIGTERM at its second validation batch."""
    import train
    import vqa.evaluate

    if os.environ["RANK"] == "0":
        class Signalling(vqa.evaluate.TypeAccuracy):
            updates = 0

            def update(self, *args):
                Signalling.updates += 1
                if Signalling.updates == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # handled by train.py's handler, in this process
                super().update(*args)

        vqa.evaluate.TypeAccuracy = Signalling
    return train.cli(argv)


def test_a_signal_during_validation_stops_every_process_though_their_batch_counts_differ(tmp_path):
    """3 validation batches over 2 processes: rank 0 validates 2, rank 1 one. SIGTERM on rank 0 during its
    second batch, when rank 1 has no batch left but still answers the stop check: both stop, the epoch's
    training saved, and the resumed run validates the epoch again, every question once."""
    # With the type loss: the one torchrun run here in which every head is in the loss.
    config = tiny_config(tmp_path, batch_size=1, epochs=1, device="cpu")
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["synthetic_val_images"] = 3
    config.write_text(yaml.safe_dump(cfg))
    result = torchrun(__file__, "signal-in-validation-on-rank-0", "--config", str(config), timeout=120)
    run = tmp_path / "run"
    assert "SIGTERM: checkpoint saved at step 4" in result.stdout, result.stderr[-3000:]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 4, 4) and not (run / "metrics.jsonl").exists()
    resumed = torchrun("train.py", "--resume", str(run), timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (logged,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    questions = len((tmp_path / "data" / "val.csv").read_text().strip().splitlines()) - 1  # less the header
    assert (logged["epoch"], logged["count"]) == (1, questions)


def test_a_collective_another_process_left_is_told_from_this_process_s_own_errors():
    """gloo's transport error, which a process meets in its next collective once another has ended, gives its
    reason in a few words, as does torch's DistError (NCCL's); any other RuntimeError is this process's own fault
    (None: its traceback stays)."""
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                        "[127.0.0.1]:17067: Connection reset by peer. This is typically caused by a remote worker")
    assert distributed.lost_contact(gloo) == "Read error [127.0.0.1]:17067: Connection reset by peer"
    nccl = torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1.\nmore detail")
    assert distributed.lost_contact(nccl) == "NCCL communicator was aborted on rank 1."
    assert distributed.lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None


def test_a_lost_contact_is_told_by_the_error_s_first_line_or_its_type_and_gloo_s_other_errors_are_this_process_s():
    """Every DistError (network, store, backend), its message stripped, or named by its type where it has none; a
    gloo error that is not its transport's is this process's own fault."""
    network = torch.distributed.DistNetworkError("\nConnection reset by peer\nat the TCPStore")
    assert distributed.lost_contact(network) == "Connection reset by peer"
    assert distributed.lost_contact(torch.distributed.DistStoreError("")) == "DistStoreError"
    shapes = RuntimeError("[/pytorch/third_party/gloo/gloo/allreduce.cc:92] Gloo allreduce: tensors differ in size")
    assert distributed.lost_contact(shapes) is None


def unreadable_image_worker(argv: list[str]) -> int:
    """train.py's command line in a process whose images, on rank 1 only, turn unreadable once training has
    begun (replaced on disk mid-run, say): the up-front check passed in both, rank 1 alone fails."""
    import vqa.data
    import train

    if os.environ["RANK"] == "1":
        def corrupt(self, index):
            raise VQAError(f"image '{self.images[index]}' cannot be decoded (OSError: image file is truncated); "
                           f"it is corrupt or truncated")

        vqa.data.VQADataset.__getitem__ = corrupt
    return train.cli(argv)


@pytest.mark.parametrize("failing", ["main process", "rank 1"])
def test_an_error_in_one_process_is_one_line_in_every_process(failing, tmp_path):
    """An error only one process meets: the main process cannot make output_dir (a file is in its way; only the
    main process writes the run folder), or rank 1's images turn unreadable mid-epoch. That process says why; the
    other, whose collective then fails, says in one line that it stopped because another process did, not in a
    traceback of gloo's RuntimeError ("Connection closed by peer"). Both end at once."""
    config = tiny_config(tmp_path, batch_size=2, epochs=1, device="cpu")
    if failing == "main process":
        (tmp_path / "file").write_text("")
        args, run = ("train.py", "--output_dir", str(tmp_path / "file" / "run")), tmp_path / "file" / "run"
        error, other = f"error: cannot write '{run}': Not a directory", 1
    else:
        args, error, other = (__file__, "unreadable-image-on-rank-1"), "cannot be decoded (OSError: image file", 0
    result = torchrun(*args, "--config", str(config), timeout=120)
    assert result.returncode != 0
    assert error in result.stderr, result.stderr[-3000:]
    assert 'train.py", line' not in result.stderr and "RuntimeError" not in result.stderr, result.stderr[-3000:]
    assert (f"error: training process {other} of 2 lost contact with another" in result.stderr
            or "Signal 15 (SIGTERM) received by PID" in result.stderr), result.stderr[-3000:]  # torchrun ended it first


def test_a_resume_with_another_process_count_is_refused_first_for_what_it_is(tmp_path):
    """A run trained in one process, resumed under torchrun with 2: the refusal names the process count, the one
    thing to change, before the data is read and the model built. Its one batch an epoch (8 images, batch_size 8)
    cannot be shared by 2 processes, but the advice to lower batch_size would be refused by --resume."""
    config = tiny_config(tmp_path, batch_size=8, epochs=1, device="cpu")
    import train

    assert train.cli(["--config", str(config)]) == 0  # in this process: the one-process run is not what is tested
    run = tmp_path / "run"
    result = torchrun("train.py", "--resume", str(run), "--epochs", "2", timeout=120)
    assert result.returncode != 0
    assert f"error: {run / 'checkpoint.pt'} was written by 1 training process(es), this resume runs 2" \
        in result.stderr, result.stderr[-3000:]
    assert "lower batch_size" not in result.stderr and "[LoRA]" not in result.stdout  # no model was built


def trainer_pid(launcher: int, rank: int) -> int:
    """The PID of the training process of ``rank`` that torchrun (PID ``launcher``) started (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # not a process, gone, or not ours
        if parent == launcher and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"torchrun {launcher} has no process of rank {rank}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through Linux /proc")
@pytest.mark.parametrize("target", ["torchrun", "rank 1 alone"])
def test_a_stopped_torchrun_run_resumes_to_the_weights_of_an_uninterrupted_one(target, uninterrupted, tmp_path,
                                                                             capsys):
    """SIGTERM mid-epoch, to torchrun (which passes it to every process group: the training processes and
    their loader workers) or to one training process alone: every process stops at the same step and the
    main one saves. The run stopped through torchrun, resumed (each process with its own random stream
    back), ends where the uninterrupted run ends; one process alone may not resume it."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path, **RUN_OPTIONS)
    cmd = torchrun_command(tmp_path / "torchrun_logs", "train.py", "--config", str(config), *RUN_OVERRIDES)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (run / "checkpoint.pt").is_file():
                state = torch.load(run / "checkpoint.pt", weights_only=True)
                if state["epoch"] < 2 and state["batch"] > 0:  # mid-epoch in epoch 1 or 2 of 3 (4 steps each)
                    break
            time.sleep(0.05)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be stopped:\n{proc.communicate()[1][-3000:]}")
        os.kill(proc.pid if target == "torchrun" else trainer_pid(proc.pid, 1), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failure here leaves no training processes behind
            for rank in (0, 1):
                try:
                    os.kill(trainer_pid(proc.pid, rank), signal.SIGKILL)
                except AssertionError:
                    pass  # that one already ended
            proc.kill()
            proc.communicate()
    assert "SIGTERM: checkpoint saved" in out and "torchrun --nproc_per_node 2 train.py --resume" in out, err[-3000:]
    assert 'train.py", line' not in err and "DataLoader worker" not in err, err[-3000:]  # torchrun's own may show
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)
    assert stopped["step"] < 12 and len(stopped["rng_per_process"]) == 2
    if target != "torchrun":  # the stop was the point; resuming under torchrun takes the path below
        import train

        assert train.cli(["--resume", str(run)]) == 2  # in this process: one of one
        refusal = capsys.readouterr().err
        assert "written by 2 training process(es)" in refusal and "--nproc_per_node 2" in refusal
        assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == stopped["step"]  # untouched
        return
    resumed = torchrun("train.py", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("adapter_last.safetensors", "model_last.safetensors"):
        a, b = load_file(str(uninterrupted[0] / "run" / name)), load_file(str(run / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    # The epoch the stop cut logs the mean loss of every process's steps, those before the stop too.
    logged = [[json.loads(line)["train_loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
              for folder in (uninterrupted[0] / "run", run)]
    assert logged[1] == pytest.approx(logged[0], rel=1e-6, abs=0) and len(logged[0]) == 3
    # So does the step log: every 3rd step's line, the mean of both processes' steps since the line before.
    steps = [[json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
             for folder in (uninterrupted[0] / "run", run)]
    assert [r["step"] for r in steps[0]] == [3, 6, 9, 12]
    assert [{**r, "loss": pytest.approx(r["loss"], rel=1e-6, abs=0)} for r in steps[0]] == steps[1]


if __name__ == "__main__":
    if sys.argv[1] == "nan-on-rank-1":
        sys.exit(nan_worker(sys.argv[2:]))
    if sys.argv[1] == "signal-in-validation-on-rank-0":
        sys.exit(validation_signal_worker(sys.argv[2:]))
    if sys.argv[1] == "unreadable-image-on-rank-1":
        sys.exit(unreadable_image_worker(sys.argv[2:]))
    ddp_worker(Path(sys.argv[2]))


def test_the_sum_over_processes_adds_every_process_s_share(monkeypatch):
    """Evaluation counts each process's share of the questions: the total is every process's count added, not
    this process's alone. (The other process's counts simulated in the all-reduce.)"""
    import torch.distributed as dist

    theirs = torch.tensor([3, 40])

    def all_reduce(t, op=dist.ReduceOp.SUM):
        t.copy_(t + theirs if op == dist.ReduceOp.SUM else torch.maximum(t, theirs))

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    mine = torch.tensor([5, 2])
    expected = mine + theirs
    assert torch.equal(distributed.sum_over_ranks(mine, distributed.Processes(1, 2), torch.device("cpu")), expected)
    assert torch.equal(mine, torch.tensor([5, 2]))  # the caller's own counts are left as they were


def test_the_image_check_is_shared_out_and_every_process_learns_every_bad_image(monkeypatch, tmp_path):
    """Each process decodes every N-th image, not all of them, and every process ends with every bad image, so all
    stop with the same error or skip the same rows. (Rank 1 of 2 here; rank 0's findings simulated in the gather.)"""
    from vqa import run_data

    images = [tmp_path / f"{i}.png" for i in range(5)]
    decoded = []

    def bad_images(share):
        decoded.extend(share)
        return {image: f"{image.name} is corrupt" for image in share if image.stem in ("1", "2")}

    monkeypatch.setattr(run_data, "bad_images", bad_images)
    monkeypatch.setattr(distributed, "gather", lambda found, procs: [{images[2]: "2.png is corrupt"}, found])
    got = run_data.shared_bad_images(images, distributed.Processes(1, 2))
    assert decoded == images[1::2]
    assert got == {images[1]: "1.png is corrupt", images[2]: "2.png is corrupt"}


def test_gather_lists_every_process_s_object_in_rank_order(monkeypatch):
    """Resume restores each process's random generators from the list gather gives: position r must hold rank
    r's, as torch's all_gather_object fills it. (The collective simulated: slot r gets rank r's object.)"""
    def all_gather_object(out, obj):
        out[:] = [{"rank": r} for r in range(len(out))]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    got = distributed.gather({"rank": 1}, distributed.Processes(1, 3))
    assert [o["rank"] for o in got] == [0, 1, 2]
    assert distributed.gather("alone", distributed.Processes()) == ["alone"]
