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

import contextlib
import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .text import first_line


@dataclass(frozen=True)
class Shard:
    """Which part of the work this process does: ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


class JoinError(RuntimeError):
    """This process could not join the process group, most often because a peer
    already failed and left (its error is on stderr): said in one line, not a traceback."""


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
        try:
            dist.init_process_group(backend)
        except RuntimeError as exc:  # torch's DistError family included
            others = int(os.environ["WORLD_SIZE"]) - 1
            raise JoinError(f"could not join the other {others} process{'es' if others > 1 else ''} "
                            f"(one may have failed and left): {first_line(exc)}") from None
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


def shutdown(together: bool = True) -> None:
    """Leave the process group. ``together`` (after a successful run) waits for
    every process first: one that tears gloo down while a peer is still working
    (rank 0 writing the files, say) can abort in gloo's threads ("terminate called
    without an active exception"). After a failure the peers may never arrive, so
    the process leaves at once and torchrun stops the rest."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
            dist.destroy_process_group()
            return
        # a peer that failed first may have closed its connections already: leaving can
        # then fail too, which must not add a traceback to the error this process printed
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m pyprune ARGV`` as NPROC processes, as ``torchrun --standalone
    --nproc-per-node NPROC`` would, and return the exit code of the first process
    that failed (2 for bad input, 3 for a failed verification, ...), not torchrun's
    blanket 1: what ``--nproc`` does. torchrun runs in this process so that its
    failure report can be read rather than printed as a traceback."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "pyprune", *argv]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode  # the process said why on stderr
        signal = -failure.exitcode
        print(f"pyprune: process {rank} of {nproc} was killed by signal {signal}", file=sys.stderr)
        return 128 + signal
    except SignalException as exc:
        # Ctrl-C or a kill reached the launcher, which stopped the processes (they
        # said "interrupted"): exit as the CLI does for a signal, 130 for Ctrl-C.
        return 128 + int(exc.sigval)
    return 0


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum that every process
    uses is the sum of their gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _synchronized_forward(bn: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode with statistics over the whole global batch: each
    process's sums are all-reduced (differentiably, so the backward pass sees every
    process's use of the statistics, as with one process). What ``SyncBatchNorm``
    does on GPUs, for gloo on CPUs, where it is not available."""
    if not bn.training:
        return type(bn).forward(bn, x)
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
    # float64 sums: E[x^2] - E[x]^2 cancels, and the sums span the whole global batch
    sums = torch.cat([x.double().sum(dims), (x.double() ** 2).sum(dims), count])
    sums = _AllReduceSum.apply(sums)
    channels = x.shape[1]
    n = sums[-1]
    mean = sums[:channels] / n
    var = (sums[channels:2 * channels] / n - mean ** 2).clamp_min(0)
    shape = [1, channels] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + bn.eps).float()
    y = (x - mean.float().view(shape)) * scale.view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var.detach() * n / max(float(n) - 1, 1.0)
            bn.running_mean.mul_(1 - factor).add_(mean.detach().float(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.float(), alpha=factor)
    return y


@contextlib.contextmanager
def synchronized_batchnorm(model: torch.nn.Module):
    """Within the block, every BatchNorm of ``model`` computes its training-mode
    statistics over all processes' batches (a no-op outside torchrun). The modules
    stay what they are (the passes and the file format know BatchNorm, not
    SyncBatchNorm); only their forward is swapped for the block's duration."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not current().distributed or not bns:
        yield
        return
    for bn in bns:
        bn.forward = functools.partial(_synchronized_forward, bn)
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward
