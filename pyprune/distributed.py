"""Running under ``torchrun``: one process per device, PyTorch's own engine.

``torchrun`` starts N copies of the command with ``RANK``, ``WORLD_SIZE`` and a
rendezvous in the environment; :func:`init_from_env` joins the process group
(NCCL on GPUs, gloo on CPUs). Every process then runs the same program: the
training engine (:mod:`pyprune.train`) wraps the model in
``DistributedDataParallel`` and gives each process its share of every batch, and
evaluation shards the images and all-reduces the counts, so every process sees
the same accuracies and the search takes the same decisions everywhere. Only
rank 0 writes files and shows progress (:func:`is_main`).

Outside ``torchrun`` (no ``WORLD_SIZE``, or 1) every function here is the
single-process identity: rank 0 of 1, no communication.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """Which part of the work this process does: ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> Shard:
    """Join the process group ``torchrun`` set up (once); a no-op outside it."""
    if not launched_by_torchrun():
        return Shard()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return current()


def current() -> Shard:
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def is_main() -> bool:
    return current().rank == 0


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over all processes (float64, so counts stay exact)."""
    if not current().distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float) -> float:
    if not current().distributed:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj: object) -> list[object]:
    """Every process's ``obj``, in rank order."""
    shard = current()
    if not shard.distributed:
        return [obj]
    out: list[object] = [None] * shard.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every process."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m pyprune ARGV`` under ``torchrun --standalone --nproc-per-node
    NPROC`` and return its exit code: what ``--nproc`` does."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pyprune", *argv]
    return subprocess.call(command)
