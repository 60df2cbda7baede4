"""Fine-tune a tiny model after mask + quant, as one process or as one of several
under torchrun, and save what every process ends with. Used by
tests/test_distributed.py: ``python tests/distributed_worker.py OUT {bn|bn-local|nobn}``
(bn-local: BatchNorm statistics per process, ``TrainConfig.sync_batchnorm=False``)."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyprune import distributed  # noqa: E402
from pyprune.ir import example_input, propagate_shapes, trace  # noqa: E402
from pyprune.opt import constraint_hooks  # noqa: E402
from pyprune.passes import build_pipeline  # noqa: E402
from pyprune.train import TrainConfig, fine_tune, seed_everything  # noqa: E402
from tests.search.tiny import MEAN, SHAPE, STD, TinyNet, synthetic  # noqa: E402

PIPELINE = "mask(sparsity=0.5,scope=layer),quant(bits=3)"


class NoBatchNorm(nn.Module):
    """Each image's output depends on that image only, so the gradient of a batch
    split over processes is the gradient of the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def main(out: Path, kind: str) -> None:
    shard = distributed.init_from_env()
    seed_everything(0)
    model = NoBatchNorm() if kind == "nobn" else TinyNet()
    gm = propagate_shapes(trace(model), example_input(SHAPE))
    passes = build_pipeline(PIPELINE)
    for p in passes:
        gm = p(gm).graph_module
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    config = TrainConfig(epochs=3, lr=0.2, batch_size=32, seed=0, progress=False, sync_batchnorm=kind != "bn-local")
    logs = fine_tune(gm, synthetic(256, seed=1), MEAN, STD, config, hooks=constraint_hooks(passes, gm))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": gm.state_dict(), "before": before, "loss": logs[-1].loss, "world": shard.world},
               out / f"rank{shard.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
