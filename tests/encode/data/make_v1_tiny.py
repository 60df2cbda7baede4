"""How tests/encode/data/v1-tiny.ppz and v1-tiny.json were made: run once with the version-1
writer of main at a0edc25 (`python tests/encode/data/make_v1_tiny.py`). Kept only as the record
of that: the files are fixtures of the version-1 format, and re-running this with a later
writer would not reproduce them."""
import hashlib, json
import torch
from torch import nn
from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.passes import build_pipeline, codebooks_of
from pyprune.encode import save_ppz

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

torch.manual_seed(0)
m = Tiny()
for bn in (m.bn1, m.bn2):
    bn.running_mean.uniform_(-0.5, 0.5); bn.running_var.uniform_(0.5, 2.0); bn.weight.data.uniform_(0.5, 1.5)
gm = propagate_shapes(trace(m.eval()), example_input((3, 8, 8)))
passes = build_pipeline("mask(sparsity=0.6),quant(bits=3)")
for p in passes:
    gm = p(gm).graph_module
gm.eval()
meta = {"arch": "tiny", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_shape": [3, 8, 8],
        "provenance": [{"written_by": "pyprune main a0edc25, container version 1"}]}
path = save_ppz(gm, "tests/encode/data/v1-tiny.ppz", meta, codebooks_of(passes, gm), force=True)
x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = gm(x)
expected = {"tensors": {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
                        for k, v in gm.state_dict().items()},
            "input_seed": 1, "input_shape": [2, 3, 8, 8], "logits": logits.tolist()}
open("tests/encode/data/v1-tiny.json", "w").write(json.dumps(expected, indent=1) + "\n")
print(path, path.stat().st_size)
