"""PyTorch side of the exported-model parity tests, for a folder written by `python -m hytrain_export` from
python/examples/digits_cnn.py.

    parity_exported.py train FOLDER OUT WORLD   10 SGD steps (lr 0.05, momentum 0.5) of torch DDP (gloo, WORLD
        processes, broadcast_buffers) from the folder's weights on fixed batches of 16; writes the batches, each
        step's mean loss over ranks and every rank's final state_dict to OUT (safetensors).
    parity_exported.py float64 FOLDER OUT       the loss and gradients of the folder's weights on batch 0 in eager
        float64, as the reference for hytrain's compiled float32 step.
    parity_exported.py load MODEL_DIR OUT       loads hytrain's exported model.safetensors into the Python module
        (strict load_state_dict), and runs the module in eval mode and MODEL_DIR/forward.pt2 on one batch; writes
        both outputs to OUT.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "python" / "examples"))
from digits_cnn import DigitsCnn  # noqa: E402

STEPS, BATCH = 10, 16


def batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def module(folder):
    net = DigitsCnn()
    net.load_state_dict(load_file(str(Path(folder) / "weights.safetensors")))
    return net


def ddp_worker(rank, world, folder, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net = torch.nn.parallel.DistributedDataParallel(module(folder), broadcast_buffers=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    per_rank = BATCH // world
    saved = {}
    for i, (x, y) in enumerate(batches()):
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad()
        loss = F.cross_entropy(net(x[part]), y[part])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        saved[f"loss{i}"] = (mean / world).reshape(1)
    saved.update({f"rank{rank}.{k}": v.detach().clone() for k, v in net.module.state_dict().items()})
    save_file(saved, f"{out}.rank{rank}")
    dist.destroy_process_group()


def train(folder, out, world):
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(ddp_worker, args=(world, folder, os.path.join(tmp, "init"), out), nprocs=world)
    saved = {}
    for rank in range(world):
        part = load_file(f"{out}.rank{rank}")
        os.remove(f"{out}.rank{rank}")
        saved.update({k: v for k, v in part.items() if rank == 0 or not k.startswith("loss")})
    for i, (x, y) in enumerate(batches()):
        saved[f"batch{i}.x"], saved[f"batch{i}.y"] = x, y
    save_file(saved, out)


def float64(folder, out):
    net = module(folder).double().train()
    x, y = batches()[0]
    loss = F.cross_entropy(net(x.double()), y)
    loss.backward()
    saved = {"loss": loss.detach().reshape(1)}
    saved.update({f"grad.{n}": p.grad for n, p in net.named_parameters()})
    save_file(saved, out)


def load(model_dir, out):
    net = DigitsCnn()
    net.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")))  # strict: every name, no extra
    net.eval()
    x = batches()[0][0]
    with torch.no_grad():
        eager = net(x)
    runner = torch._inductor.aoti_load_package(str(Path(model_dir) / "forward.pt2"))
    state = dict(net.state_dict())
    import json

    meta = json.loads((Path(model_dir) / "hytrain-model.json").read_text())
    inputs = [state[t["name"]] for t in meta["parameters"] + meta["buffers"]]
    compiled = runner(x, *inputs)
    save_file({"eager": eager, "compiled": compiled}, out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    what = sys.argv[1]
    if what == "train":
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif what == "float64":
        float64(sys.argv[2], sys.argv[3])
    elif what == "load":
        load(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {what}")
