"""The PyTorch peer of the sharded-training bench (`cargo xtask bench --only zero`): peak host memory per rank and
step time of an AdamW-trained MLP whose optimizer state dominates, under DistributedDataParallel alone (each rank
holds all of AdamW's state) and with torch.distributed.optim.ZeroRedundancyOptimizer (ZeRO-1: each rank holds its
shard of the state).

Run under torchrun, one process per rank:
    torchrun --standalone --nproc-per-node 4 benches/zero_memory.py --mode zero --hidden 4096,4096,4096,4096

The model is hytrain's `mlp:<hidden>` on the demo digits' input shape (1x8x8 flattened, 10 classes): Linear + ReLU
layers, the same parameter count; the batches are random with that shape (the step's cost does not depend on the
values). gloo process group, as on CPUs; AdamW (lr 1e-4, weight decay 0.01). Each rank runs `--warmup` steps, then
`--steps` timed ones, and reports its peak resident set (getrusage's ru_maxrss, the kernel's high-water mark of the
whole process, as hytrain's summary reports it); rank 0 prints one JSON line:
    {"mode": "zero", "world": 4, "params": 50..., "peak_bytes": [per rank], "step_seconds": mean timed step}
"""

import argparse
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP


def mlp(hidden):
    layers, width = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ddp", "zero"], required=True)
    p.add_argument("--hidden", default="4096,4096,4096,4096")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(mlp([int(h) for h in args.hidden.split(",")]))
    params = sum(p.numel() for p in model.parameters())
    if args.mode == "zero":
        optimizer = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4, weight_decay=0.01
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(rank)

    def step():
        x = torch.randn(args.batch_size, 1, 8, 8, generator=generator)
        y = torch.randint(0, 10, (args.batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - start) / args.steps

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "world": world,
                    "params": params,
                    "peak_bytes": [int(t.item()) for t in peaks],
                    "step_seconds": seconds,
                }
            ),
            flush=True,
        )
    # Every rank is done with gloo before any leaves; then no teardown at all: at 4 ranks destroy_process_group()
    # hung rank 0, and without it a rank's exit failed another's (both seen with torch 2.11).
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
