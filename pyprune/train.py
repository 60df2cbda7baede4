"""The fine-tuning and evaluation engine.

A plain PyTorch loop (SGD with momentum, cosine schedule, weight decay) over
in-memory batches, with two hook points that later passes use to keep their
invariants: ``after_backward`` (edit gradients before the step, for example the
L1 subgradient on BatchNorm gammas or zeroing masked gradients) and
``after_step`` (restore invariants on the weights, for example re-applying masks
or tying shared weights), plus ``on_start``, told the number of steps before the
first (for schedules over the fine-tune, such as gradual pruning). Constraints kept
by projection (:class:`~pyprune.passes.constraints.Projection`) train straight
through: the optimizer steps full-precision latent copies of those layers' weights
(:class:`LatentWeights`), and the model uses their projection. Runs are seeded, so
the same seed replays the same batches, augmentations and initialisations.

Under ``torchrun`` (see :mod:`pyprune.distributed`) the same functions run in
every process: :func:`fine_tune` wraps the model in ``DistributedDataParallel``
and each process takes its part of every global batch (``batch_size`` stays the
global batch, so the learning-rate schedule and the gradient of each step are
those of one process, up to the order of floating-point sums); :func:`evaluate`
gives each process a contiguous part of the images and all-reduces the counts, so
every process returns the same result. The hooks run in every process on the
averaged gradients and identical weights, so masks and tied weights stay equal
everywhere. BatchNorm layers compute their training-mode statistics over the whole
global batch (:func:`pyprune.distributed.synchronized_batchnorm`: ``SyncBatchNorm``'s
job, which torch does only on GPUs and only by replacing the modules).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .data import ArrayDataset
from .ir import in_mode, inference_only
from .passes.constraints import Hook, Projection, TrainHooks  # what passes ask of training; the engine runs it

__all__ = ["DivergenceError", "EpochLog", "EvalResult", "Hook", "LatentWeights", "MemoizedTeacher", "Projection",
           "TrainConfig",
           "TrainHooks", "bn_gamma_l1",
           "distillation_loss", "evaluate", "fine_tune", "recalibrate_bn", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, for reproducible initialisation and batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    epochs: float = 1.0  # fractional epochs run that share of the first epoch's batches
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    slim_l1: float = 0.0  # network slimming's sparsity penalty on BatchNorm gammas
    # Knowledge distillation from a teacher (fine_tune's ``teacher``): the share of the
    # loss that is the teacher's softened outputs rather than the labels (0: labels only).
    distill: float = 0.0
    distill_temperature: float = 4.0
    seed: int = 0
    augment: bool = True
    progress: bool = True
    # Under torchrun, BatchNorm statistics over the global batch, so N processes train
    # what one does; False keeps DDP's per-process statistics (cheaper communication).
    sync_batchnorm: bool = True
    # NHWC convolutions train about 20% faster on the CPU here (bench/train_throughput.py).
    channels_last: bool = True
    # A cross-entropy this high means logits thousands apart: training has diverged even
    # if the loss is still finite (logsumexp keeps it so while the weights blow up).
    divergence_loss: float = 1e3
    # A time limit in seconds (None: none). Once the first steps show the pace, the
    # steps that would not fit are dropped and the learning rate anneals to zero at
    # the new end, so a budgeted run still finishes its schedule: a budget must not
    # be spent by one training whose length was set for an idle machine.
    max_seconds: float | None = None
    # At most this many optimizer steps (None: as many as ``epochs`` take); the learning
    # rate anneals over the steps that run. A screen's short recovery is a step count.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.slim_l1 < 0:
            raise ValueError(f"--slim-l1 must be >= 0, got {self.slim_l1}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"--distill must be in [0, 1], got {self.distill}")
        if self.distill_temperature <= 0:
            raise ValueError(f"--distill-temperature must be positive, got {self.distill_temperature}")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights (NaN or inf): the model is
    unusable, and the caller should roll back to its copy from before training."""


@dataclass
class EpochLog:
    epoch: int
    loss: float
    accuracy: float
    images_per_s: float
    seconds: float
    images: int = 0  # trained on in this epoch, over all processes


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    n: int
    seconds: float
    predictions: torch.Tensor | None = None  # int64 [n]: the top-1 class of every image, in dataset order
    log_probs: torch.Tensor | None = None  # float32 [n, classes], in dataset order, when asked for


def bn_gamma_l1(strength: float) -> Hook:
    """Add ``strength * sign(gamma)`` to every BatchNorm weight gradient: the
    subgradient of an L1 penalty on gammas, which network slimming uses to drive
    unimportant channels towards zero before they are removed."""
    def hook(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.grad is not None:
                m.weight.grad.add_(torch.sign(m.weight.detach()), alpha=strength)
    return hook


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """Hinton et al.'s knowledge distillation: ``(1 - weight)`` times the cross-entropy
    with the labels plus ``weight`` times ``T**2`` times the KL divergence from the
    teacher's to the student's distribution at temperature ``T``, averaged over the
    batch. ``T**2`` keeps the soft term's gradients on the scale of the hard one's,
    so the weight means the same at any temperature."""
    hard = F.cross_entropy(logits, labels)
    if weight == 0:
        return hard
    t = temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    return (1.0 - weight) * hard + weight * soft


class MemoizedTeacher(nn.Module):
    """A frozen teacher whose outputs are remembered by the content of its input.

    A compile fine-tunes many candidates with the same seed, so every fine-tune
    replays the same augmented batches, and the teacher (the uncompressed model,
    never trained) answers each of them the same way each time: on a CPU its forward
    pass is a fifth of a distilled step. Outputs are kept on the CPU, keyed by a hash
    of the input's bytes (so a batch that differs in any value is recomputed), until
    ``max_bytes`` of them are kept; later inputs are computed and not kept, as the
    first batches of an epoch are the ones every fine-tune sees. Only evaluation-mode
    calls without autograd on CPU tensors are remembered; anything else passes
    straight through. A remembered output is the one computed first: one taken in
    another memory format differs in the last bits from a fresh computation."""

    def __init__(self, teacher: nn.Module, max_bytes: int = 256 << 20) -> None:
        super().__init__()
        self.teacher = teacher
        self.max_bytes = max_bytes
        self.kept_bytes = 0
        self.reused = self.computed = 0
        self._outputs: dict[bytes, torch.Tensor] = {}

    def _key(self, x: torch.Tensor) -> bytes:
        digest = hashlib.blake2b(x.detach().contiguous().numpy().tobytes(), digest_size=16)
        digest.update(repr((tuple(x.shape), str(x.dtype))).encode())
        return digest.digest()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or any(m.training for m in self.teacher.modules()):
            return self.teacher(x)
        key = self._key(x)
        kept = self._outputs.get(key)
        if kept is not None:
            self.reused += 1
            return kept.clone()
        out = self.teacher(x)
        self.computed += 1
        size = out.numel() * out.element_size()
        if self.kept_bytes + size <= self.max_bytes:
            self._outputs[key] = out.detach().clone()
            self.kept_bytes += size
        return out


class LatentWeights:
    """Straight-through training of the layers that ``projections`` constrain: each
    keeps a full-precision latent copy of its weight. The gradient is taken at the
    projected weight (what the model uses); :meth:`before_step` puts the latent
    weights in the parameters so the optimizer steps them, and :meth:`after_step`
    keeps the result as the new latent weights and puts their projection (every
    projection, in order) back. Edits that ``after_step`` hooks then make to the
    weights (a gradual mask's new zeros) are edits of the latent weights too
    (:meth:`absorb`), so the next projection starts from them."""

    def __init__(self, model: nn.Module, projections: Sequence[Projection]) -> None:
        self.projections = list(projections)
        names = list(dict.fromkeys(n for p in self.projections for n in p.layers))
        self.params = {n: model.get_submodule(n).weight for n in names}
        with torch.no_grad():
            self.latent = {n: w.detach().clone(memory_format=torch.contiguous_format) for n, w in self.params.items()}
        self.projected: dict[str, torch.Tensor] = {}

    def before_step(self) -> None:
        with torch.no_grad():
            for n, w in self.params.items():
                w.copy_(self.latent[n])

    def after_step(self) -> None:
        with torch.no_grad():
            for n, w in self.params.items():
                self.latent[n].copy_(w)
            weights = {n: v.clone() for n, v in self.latent.items()}
            for projection in self.projections:
                projection.project(weights)
            for n, w in self.params.items():
                w.copy_(weights[n])
            self.projected = weights

    def absorb(self) -> None:
        with torch.no_grad():
            for n, w in self.params.items():
                edited = w != self.projected[n]
                if bool(edited.any()):
                    self.latent[n][edited] = w.detach().contiguous()[edited]


def _progress(iterable, total: int, desc: str, enabled: bool):
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False,
                disable=not enabled, dynamic_ncols=True)


def _training_device(shard: distributed.Shard) -> torch.device:
    if shard.distributed and torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _wrap(model: nn.Module, shard: distributed.Shard, device: torch.device) -> nn.Module:
    """The module to call in training: ``model`` itself, or a DDP wrapper around it
    (which broadcasts rank 0's weights first, so every process starts equal)."""
    if not shard.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


#: A run with ``max_seconds`` times its steps up to this one (the first excluded: it
#: also pays for the kernels' first-call set-up) to decide how many steps fit.
PACE_STEPS = 4


def _fit_steps(total: int, done: int, elapsed: float, per_step: float, limit: float) -> int:
    """How many of ``total`` steps fit in ``limit`` seconds when ``done`` took
    ``elapsed`` and each further one takes ``per_step``: never more than planned,
    never fewer than one more."""
    return max(done + 1, min(total, done + int((limit - elapsed) / max(per_step, 1e-9))))


def fine_tune(model: nn.Module, train_set: ArrayDataset, mean: Sequence[float], std: Sequence[float],
              config: TrainConfig, hooks: TrainHooks | None = None,
              teacher: nn.Module | None = None) -> list[EpochLog]:
    """Train ``model`` in place on ``train_set``; return one log entry per epoch
    (loss, accuracy and images/s over all processes). With a ``teacher`` and
    ``config.distill > 0`` the loss is :func:`distillation_loss` against the
    teacher's outputs on the same (augmented) batch; the teacher is not changed."""
    folded = inference_only(model)
    if folded:
        raise ValueError(f"this model's BatchNorm was folded for inference ({len(folded)} ChannelAffine modules, "
                         f"e.g. {folded[0]}): it cannot be fine-tuned. Fine-tune the model before folding "
                         "(pyprune compile --keep-batchnorm writes the trainable form)")
    hooks = hooks or TrainHooks()
    after_backward = list(hooks.after_backward)
    if config.slim_l1 > 0:
        after_backward.append(bn_gamma_l1(config.slim_l1))
    shard = distributed.current()
    if config.batch_size % shard.world:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the {shard.world} processes: "
                         "it is the global batch, split evenly between them")
    seed_everything(config.seed)
    loader = train_set.batches(config.batch_size, mean, std, shuffle=True, augment=config.augment, seed=config.seed,
                               drop_last=len(train_set) >= config.batch_size, shard=shard)
    total_steps = max(1, math.ceil(config.epochs * len(loader)))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if config.max_seconds is not None and hooks.on_start:
        raise ValueError("max_seconds would shorten a fine-tune whose hooks plan on its length (on_start)")
    for start_hook in hooks.on_start:
        start_hook(total_steps)
    device = _training_device(shard)
    distil = teacher is not None and config.distill > 0
    show = config.progress and shard.rank == 0
    logs: list[EpochLog] = []
    with contextlib.ExitStack() as placed:
        memory_format = placed.enter_context(_layout(model, config.channels_last, device))
        if distil:
            placed.enter_context(_layout(teacher, config.channels_last, device))
            placed.enter_context(in_mode(teacher, training=False))
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        step = 0
        model.train()
        trained = _wrap(model, shard, device)
        latent = LatentWeights(model, hooks.projections) if hooks.projections else None
        with distributed.synchronized_batchnorm(model) if config.sync_batchnorm else contextlib.nullcontext():
            began = time.perf_counter()
            for epoch in range(math.ceil(config.epochs)):
                if step >= total_steps:
                    break
                loss_sum = correct = seen = 0
                start = time.perf_counter()
                bar = _progress(loader, min(len(loader), total_steps - step),
                                f"epoch {epoch + 1}/{math.ceil(config.epochs)}", show)
                for i, (x, y) in enumerate(bar):
                    if step >= total_steps:
                        break
                    x, y = x.to(device), y.to(device)
                    x = x.contiguous(memory_format=memory_format)
                    logits = trained(x)
                    if distil:
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                        loss = distillation_loss(logits, teacher_logits, y, config.distill, config.distill_temperature)
                    else:
                        loss = F.cross_entropy(logits, y)
                    # every process must take the same decision, or the others wait forever
                    loss_value = distributed.all_reduce_max(loss.item()) if shard.distributed else loss.item()
                    if not math.isfinite(loss_value) or loss_value > config.divergence_loss:
                        raise DivergenceError(f"diverged: loss {loss_value:.4g} (not finite, or above "
                                              f"{config.divergence_loss:g}) at step {step + 1} of {total_steps}, "
                                              f"lr {scheduler.get_last_lr()[0]:g}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # DDP has averaged the gradients over the processes when this returns
                    for hook in after_backward:
                        hook(model)
                    if latent is not None:
                        latent.before_step()
                    optimizer.step()
                    if latent is not None:
                        latent.after_step()
                    for hook in hooks.after_step:
                        hook(model)
                    if latent is not None and hooks.after_step:
                        latent.absorb()
                    scheduler.step()
                    step += 1
                    if step == 1:
                        first_step_done = time.perf_counter()
                    if step == PACE_STEPS and config.max_seconds is not None:
                        now = time.perf_counter()
                        # rank 0's clock decides, so every process stops at the same step
                        total_steps = distributed.broadcast_object(_fit_steps(
                            total_steps, step, now - began, (now - first_step_done) / (step - 1), config.max_seconds))
                        scheduler.T_max = total_steps
                        bar.total = min(bar.total, total_steps - step + i + 1)
                    loss_sum += loss.item() * len(y)
                    correct += (logits.argmax(1) == y).sum().item()
                    seen += len(y)
                    if show:
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                        img_s=f"{seen * shard.world / (time.perf_counter() - start):.0f}",
                                        refresh=False)
                loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen])
                seconds = time.perf_counter() - start
                logs.append(EpochLog(epoch + 1, loss_sum / max(seen, 1), correct / max(seen, 1),
                                     seen / max(seconds, 1e-9), seconds, seen))
    if shard.distributed:
        # the statistics are global already; copying rank 0's buffers makes "equal on
        # every process" exact rather than equal up to the order of sums
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    return logs


@contextlib.contextmanager
def _layout(model: nn.Module, channels_last: bool, device: torch.device | None = None):
    """The memory format to feed ``model`` in: NHWC with its weights made so for the
    block, else NCHW; on ``device`` for the block when one is given. Later passes
    slice weights as plain NCHW tensors on the CPU, hence the return (to the CPU
    when the block moved the model)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device is None and not channels_last:
        yield memory_format
        return
    model.to(device=device, memory_format=memory_format)
    try:
        yield memory_format
    finally:
        model.to(device="cpu" if device is not None else None, memory_format=torch.contiguous_format)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: ArrayDataset, mean: Sequence[float], std: Sequence[float],
                   images: int = 1024, batch_size: int = 128, seed: int = 0, channels_last: bool = False) -> int:
    """Re-estimate every BatchNorm's running mean and variance from the first
    ``images`` of ``dataset`` (no weight update): pruning and quantization shift
    the activations, and stale statistics alone cost accuracy that needs no
    training to recover. The batches get the training augmentation (seeded),
    because the weights were trained on augmented statistics: on the shared
    ResNet-20, recalibrating on plain images costs 2.4 points of test-search
    accuracy, on augmented ones it gains 2.4. Statistics are the plain average
    over the batches (momentum ``None``). Returns the number of images used (0
    when the model has no BatchNorm). ``channels_last``: see :func:`evaluate`."""
    bns = _batchnorms(model)
    if not bns:
        return 0
    subset = dataset.subset(slice(0, images))
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    try:
        with in_mode(model, training=True), _layout(model, channels_last) as layout:
            for x, _ in subset.batches(batch_size, mean, std, augment=True, seed=seed):
                model(x.contiguous(memory_format=layout))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
    return len(subset)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ArrayDataset, mean: Sequence[float], std: Sequence[float],
             batch_size: int = 500, progress: bool = True, channels_last: bool = False,
             log_probs: bool = False) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset``, in eval
    mode, and with ``log_probs`` the log-softmax of every image's logits. Under
    torchrun each process evaluates a contiguous part of the images and every
    process returns the result over all of them. ``channels_last`` runs a plain
    PyTorch model in NHWC (its weights are plain NCHW again on return): on the CPU
    here ResNet-20's forward at batch 500 runs 2.1x faster so; not for modules with
    their own kernels (the runtime's), which expect NCHW."""
    shard = distributed.current()
    n = len(dataset)
    part = dataset
    if shard.distributed:
        bounds = torch.linspace(0, n, shard.world + 1).round().long().tolist()
        part = dataset.subset(slice(bounds[shard.rank], bounds[shard.rank + 1]))
    loader = part.batches(batch_size, mean, std)
    loss_sum = correct = 0.0
    predictions, logs = [], []
    start = time.perf_counter()
    with in_mode(model, training=False), _layout(model, channels_last) as layout:
        for x, y in _progress(loader, len(loader), f"eval {dataset.name}", progress and shard.rank == 0):
            logits = model(x.contiguous(memory_format=layout))
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            predictions.append(logits.argmax(1))
            correct += (predictions[-1] == y).sum().item()
            if log_probs:
                logs.append(F.log_softmax(logits.float(), dim=1))
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    logged = torch.cat(logs) if logs else None
    if shard.distributed:
        loss_sum, correct = distributed.all_reduce_sum([loss_sum, correct])
        predicted = torch.cat(distributed.all_gather_objects(predicted))
        if logged is not None:
            logged = torch.cat(distributed.all_gather_objects(logged))
    return EvalResult(correct / n, loss_sum / n, n, time.perf_counter() - start, predicted, logged)
