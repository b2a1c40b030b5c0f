"""TorchScript side of the TorchScript test.

make <model.pt>                  scripts a small Linear-BatchNorm-ReLU-Linear module with torch.jit.script and saves it
make-pair <model.pt>             the same module with a forward that returns (logits, features), not one tensor
check <model.pt> <io.safetensors>  loads a module hytrain saved back and checks its eval output on `input` is `output`
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class Pair(Small):
    def forward(self, x):
        features = torch.relu(self.bn(self.fc1(x)))
        return self.fc2(features), features


def main():
    torch.set_num_threads(1)
    if sys.argv[1] == "make":
        torch.manual_seed(0)
        torch.jit.script(Small()).save(sys.argv[2])
    elif sys.argv[1] == "make-pair":
        torch.jit.script(Pair()).save(sys.argv[2])
    elif sys.argv[1] == "check":
        m = torch.jit.load(sys.argv[2])
        m.eval()
        io = safetensors_io.load(sys.argv[3])
        with torch.no_grad():
            got = m(io["input"])
        diff = (got - io["output"]).abs().max().item()
        print(f"max difference {diff:e}")
        assert diff < 1e-5, f"the saved module's output differs from hytrain's by {diff}"
        assert m.bn.num_batches_tracked.item() > 0, "BatchNorm statistics were not trained"
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
