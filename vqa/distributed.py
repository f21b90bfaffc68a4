"""Training on several GPUs (or CPU processes) with torchrun: one process each, the model in DDP.

    torchrun --nproc_per_node 4 train.py --config configs/dinov2_base_vqa.yaml

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them (``python train.py``) every
function here is a no-op for a single process. ``batch_size`` counts images per process.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import VQAError

__all__ = ["Processes", "setup", "wrap", "shard", "max_over_ranks", "sum_over_ranks", "gather", "sync_buffers",
           "barrier", "teardown", "lost_contact"]


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0  # the one process that prints and writes files

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> tuple[Processes, torch.device]:
    """Joins the process group torchrun started (NCCL on CUDA, gloo on CPU); CUDA processes take the
    GPU of their ``LOCAL_RANK``. A single process gets ``Processes()`` and its device back unchanged."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise VQAError(f"process {rank} wants GPU {local_rank} but this machine has "
                           f"{torch.cuda.device_count()}; lower torchrun's --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size), device


def wrap(model: nn.Module, procs: Processes, device: torch.device, unused: Iterable[nn.Module] = ()) -> nn.Module:
    """``model`` in DistributedDataParallel, or ``model`` itself for a single process.

    ``unused`` are submodules whose output never reaches the loss (the question-type head without the
    type loss): DDP leaves their parameters alone, as a single process's optimizer does, instead of
    waiting for gradients that never come. The model's outputs must be tensors or types torch's pytree
    knows (tuples, NamedTuples, dicts): inside a dataclass DDP cannot see them and silently skips the
    gradient all-reduce (pytorch#124666). Static graph: the same parameters take part in every step;
    declaring it lets DDP accept reentrant activation checkpointing (``TIMM_REENTRANT_CKPT=1``), whose
    recomputation would otherwise mark the checkpointed blocks' parameters ready twice. timm's default,
    non-reentrant checkpointing, works either way.
    """
    if not procs.enabled:
        return model
    skip = {id(p) for module in unused for p in module.parameters()}
    ignored = [name for name, p in model.named_parameters() if id(p) in skip]
    # A private but long-standing DDP hook; the public constructor has no way to leave parameters out.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


def shard(batches: list[list[int]], procs: Processes) -> list[list[int]]:
    """This process's batches: every ``world_size``-th one. Each process gets the same number (DDP
    steps in lockstep), so up to ``world_size - 1`` batches at the end of the epoch are left out."""
    if not procs.enabled:
        return batches
    per_process = len(batches) // procs.world_size
    if per_process == 0:
        raise VQAError(f"an epoch has {len(batches)} batch(es) of training images but there are "
                       f"{procs.world_size} processes, and each needs one; lower batch_size or the process count")
    return batches[procs.rank:per_process * procs.world_size:procs.world_size]


def max_over_ranks(values: list[int], procs: Processes, device: torch.device) -> list[int]:
    """Each value's maximum over all processes, so that every process makes the same decision (a flag
    is true if it is true anywhere)."""
    if not procs.enabled:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def sum_over_ranks(t: torch.Tensor, procs: Processes, device: torch.device) -> torch.Tensor:
    """The sum of ``t`` over all processes (on ``t``'s own device); ``t`` itself is left as it was."""
    if not procs.enabled:
        return t
    total = t.to(device, copy=True)  # NCCL reduces CUDA tensors only
    dist.all_reduce(total)
    return total.to(t.device)


def gather(obj: Any, procs: Processes) -> list[Any]:
    """Every process's ``obj``, in rank order (in every process)."""
    if not procs.enabled:
        return [obj]
    out: list[Any] = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out


def sync_buffers(model: nn.Module, procs: Processes) -> None:
    """Copies the main process's buffers (BatchNorm running statistics) to every process.

    DDP sends them at the start of each forward, and each process's own forward then updates them
    with its own batch: without this, each process would evaluate its share with slightly different
    statistics from the ones in the weights the main process saves."""
    if procs.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier(procs: Processes) -> None:
    if procs.enabled:
        dist.barrier()


def teardown(procs: Processes) -> None:
    if procs.enabled and dist.is_initialized():
        dist.destroy_process_group()


def lost_contact(error: BaseException) -> str | None:
    """What broke, where ``error`` is a collective that failed because another process ended or stopped answering
    (an error only it met, a kill), as gloo's transport and torch's ``DistError`` say it; ``None`` for any other
    error."""
    text = str(error).strip()
    if isinstance(error, dist.DistError):
        return text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, RuntimeError) and "/gloo/transport/" in text:
        # "[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:5555. This is typically ..."
        return text.split("] ", 1)[-1].split(". ", 1)[0]
    return None
