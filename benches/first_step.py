"""The PyTorch peer of the launch-to-first-step bench (`cargo xtask bench`): the reference sample's training
script reduced to what happens before its first step, on the demo digits instead of CIFAR-10.

Run under torchrun, one process per rank, exactly as the reference job runs it:
    torchrun --nproc-per-node 2 benches/first_step.py --data .cache/demo/digits [--steps 1]

Like the reference: gloo process group from torchrun's environment, a DistributedSampler over the training set,
DistributedDataParallel, SGD (lr 0.01, momentum 0.5), cross-entropy. The model is hytrain's `mlp` (64 -> 128 -> 64 ->
10 with ReLU) and the batch 32, as on the hytrain side. Rank 0 prints hytrain's metrics line after each step
(`epoch=1 step=N train_loss=...`), flushed, so both sides are observed the same way: the time the line appears on
stdout.
"""

import argparse
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class Digits(Dataset):
    """The WebDataset shards of the demo digits: `{key}.npy` (float32 1x8x8) and `{key}.cls` per sample."""

    def __init__(self, folder):
        samples = {}
        for shard in sorted(Path(folder).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.rsplit(".", 1)
                    data = tar.extractfile(member).read()
                    entry = samples.setdefault((shard.name, key), {})
                    if ext == "npy":
                        entry["x"] = torch.from_numpy(np.load(io.BytesIO(data)).astype(np.float32))
                    elif ext == "cls":
                        entry["y"] = int(data)
        self.samples = [s for _, s in sorted(samples.items())]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]["x"], self.samples[i]["y"]


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1)
    train = Digits(Path(args.data) / "train")
    sampler = DistributedSampler(train, shuffle=True, seed=1)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    model = DDP(Mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    model.train()
    for step, (x, y) in enumerate(loader, 1):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"epoch=1 step={step} train_loss={loss.item():.4f}", flush=True)
        if step >= args.steps:
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
