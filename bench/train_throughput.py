"""Training throughput of pyprune's engine against a plain PyTorch loop, same run.

Both train the same model for the same number of batches on 2 threads:

* plain: the minimal loop (forward, cross-entropy, backward, SGD step) on batches
  that are already normalised float tensors, with no augmentation, which is the
  ceiling any engine can reach;
* torchvision: a DataLoader with per-image torchvision transforms (crop, flip,
  normalise), num_workers=0, the common way to write it;
* pyprune: ``pyprune.train.fine_tune`` with batched augmentation from uint8,
  cosine schedule, progress accounting and channels-last convolutions;
* pyprune-nchw: the same with ``channels_last=False``;
* distilled: pyprune with knowledge distillation from a frozen copy of the model
  (``--distill 0.5``, as every fine-tune of ``compile``), the teacher run on every batch;
* distilled-memo: the same with the teacher wrapped in ``MemoizedTeacher``, as
  ``compile`` does, after a first run has seen the batches (every fine-tune of a compile
  after its first replays the same seeded batches).

Each is repeated; the table gives medians and the ratio to the plain loop.

    python bench/train_throughput.py [--arch resnet20] [--batches 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from pyprune.data import Normalize, load_cifar10
from pyprune.models import build_model, get_spec
from pyprune.train import MemoizedTeacher, TrainConfig, fine_tune


def sgd_loop(model, batches) -> float:
    """Seconds for the minimal training loop over ``batches``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def torchvision_loop(model, dataset, batch_size, spec) -> float:
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToPILImage(), transforms.RandomCrop(32, padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(spec.mean, spec.std)])

    class Images(Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return transform(dataset.images[i]), dataset.labels[i]

    loader = DataLoader(Images(), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    return sgd_loop(model, loader)


def engine_loop(model, dataset, batch_size, spec, channels_last=True, teacher=None) -> float:
    config = TrainConfig(epochs=1, batch_size=batch_size, progress=False, channels_last=channels_last,
                         distill=0.5 if teacher is not None else 0.0)
    start = time.perf_counter()
    fine_tune(model, dataset, spec.mean, spec.std, config, teacher=teacher)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", help="default: $PYPRUNE_DATA, else ./data")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    spec = get_spec(args.arch)
    n = args.batch_size * args.batches
    dataset = load_cifar10("train", data_root=args.data_root, limit=n)
    normalize = Normalize(spec.mean, spec.std)
    batches = [(normalize(dataset.images[i:i + args.batch_size]), dataset.labels[i:i + args.batch_size])
               for i in range(0, n, args.batch_size)]
    model = build_model(args.arch)
    teacher = copy.deepcopy(model).eval()
    memo = MemoizedTeacher(copy.deepcopy(teacher))
    sgd_loop(model, batches[:2])  # warm-up: first calls allocate and pick kernels
    engine_loop(model, dataset, args.batch_size, spec, teacher=memo)  # the memo sees the (seeded) batches once

    times: dict[str, list[float]] = {"plain": [], "torchvision": [], "pyprune": [], "pyprune-nchw": [],
                                     "distilled": [], "distilled-memo": []}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits all three alike
        times["plain"].append(sgd_loop(model, batches))
        times["torchvision"].append(torchvision_loop(model, dataset, args.batch_size, spec))
        times["pyprune"].append(engine_loop(model, dataset, args.batch_size, spec))
        times["pyprune-nchw"].append(engine_loop(model, dataset, args.batch_size, spec, channels_last=False))
        times["distilled"].append(engine_loop(model, dataset, args.batch_size, spec, teacher=teacher))
        times["distilled-memo"].append(engine_loop(model, dataset, args.batch_size, spec, teacher=memo))

    base = n / statistics.median(times["plain"])
    print(f"{args.arch}, batch {args.batch_size}, {args.batches} batches x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'loop':<14} {'median s':>9} {'images/s':>9} {'vs plain':>9}")
    for name, ts in times.items():
        rate = n / statistics.median(ts)
        print(f"{name:<14} {statistics.median(ts):>9.2f} {rate:>9.0f} {rate / base:>9.2f}")
    print(f"distilled-memo / distilled: {statistics.median(times['distilled']) / statistics.median(times['distilled-memo']):.2f}x "
          f"faster; teacher batches reused {memo.reused}, computed {memo.computed}")


if __name__ == "__main__":
    main()
