"""PyTorch side of the LeNet parity tests: the reference sample's Net, 10 SGD steps (lr 0.01, momentum 0.5) with
cross-entropy on fixed batches. Writes the initial weights, the batches, each step's loss and the final weights to
the safetensors file named on the command line. With a second argument `bf16`, 3 steps with forward and loss under
torch.autocast("cpu", dtype=torch.bfloat16) instead."""
import contextlib
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402


class Net(nn.Module):
    """cifar10-distributed-gpu-final.py's model."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def main(out, steps=10, batch=64, precision="fp32"):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    net = Net()
    saved = {f"init.{k}": v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
    for i in range(steps):
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        opt.zero_grad()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        saved[f"batch{i}.x"] = x
        saved[f"batch{i}.y"] = y
        saved[f"loss{i}"] = loss.detach().reshape(1)
    saved.update({f"final.{k}": v.clone() for k, v in net.state_dict().items()})
    safetensors_io.save(saved, out)
    print(f"torch {torch.__version__}: {steps} steps, last loss {loss.item():.6f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "bf16":
        main(sys.argv[1], steps=3, precision="bf16")
    else:
        main(sys.argv[1])
