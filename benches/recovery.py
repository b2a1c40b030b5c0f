"""The PyTorch peer of the recovery bench (`cargo xtask bench --only recovery`): the digits MLP of
benches/first_step.py trained with DistributedDataParallel (gloo) under torchrun's elastic agent, checkpointing as an
elastic job must, since torchrun restarts every worker when one fails and they can only resume from a checkpoint.

Run by each of the job's nodes, for example three on one machine:
    torchrun --nnodes 2:3 --nproc-per-node 1 --max-restarts 3 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29411 --rdzv-id bench benches/recovery.py --data .cache/demo/digits \\
        --checkpoint /tmp/ckpt.pt

Every worker prints `worker rank=R pid=P` when it starts (the bench kills one by its pid); rank 0 prints hytrain's
metrics line after each step (`epoch=E step=N train_loss=...`), flushed, and writes the checkpoint every
`--checkpoint-every` steps (to a temporary file renamed into place). A restarted worker resumes from it.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from first_step import Digits, Mlp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"worker rank={rank} pid={os.getpid()} world={dist.get_world_size()}", flush=True)
    torch.manual_seed(1)
    model = DDP(Mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    step = 0
    if os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    train = Digits(Path(args.data) / "train")
    sampler = DistributedSampler(train, shuffle=True, seed=1)
    model.train()
    epoch = 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in DataLoader(train, batch_size=args.batch_size, sampler=sampler):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0:
                print(f"epoch={epoch + 1} step={step} train_loss={loss.item():.4f}", flush=True)
                if step % args.checkpoint_every == 0:
                    tmp = args.checkpoint + ".tmp"
                    torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step}, tmp)
                    os.replace(tmp, args.checkpoint)
            if step >= args.steps:
                break
        epoch += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
