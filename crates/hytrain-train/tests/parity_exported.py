"""PyTorch side of the exported-model parity tests, for a folder written by `python -m hytrain_export` from
python/examples/digits_cnn.py or python/examples/gpt.py (its default size); which one is read from the folder's
metadata (`source`).

    parity_exported.py train FOLDER OUT WORLD [sgd|adamw]
        10 steps on WORLD processes (gloo) from the folder's weights on the example's fixed batches of 16; writes
        the batches, each step's mean loss over ranks and every rank's final state_dict to OUT (safetensors).
        sgd (default): torch DDP (broadcast_buffers), eager, SGD with lr 0.05 and momentum 0.5.
        adamw: torch.optim.AdamW (lr 1e-2 on hytrain's cosine schedule: 2 warm-up steps, down to a tenth at step
        10; weight decay 0.01) stepped with the gradients of FOLDER/train_step.pt2 (the package hytrain runs)
        averaged over the ranks. Adam divides each gradient by its running magnitude, so a gradient that is
        exactly zero in exact arithmetic (the key bias of attention: softmax ignores a shift shared by all keys)
        becomes float32 noise normalised to a step of size lr, different noise in eager and in compiled code; with
        the gradients held equal, what is compared is the optimizer, the schedule and the averaging.
    parity_exported.py float64 FOLDER OUT       the loss and gradients of the folder's weights on batch 0 in eager
        float64, as the reference for hytrain's compiled float32 step.
    parity_exported.py load MODEL_DIR OUT       loads hytrain's exported model.safetensors into the Python module
        (strict load_state_dict), and runs the module in eval mode and MODEL_DIR/forward.pt2 on one batch; writes
        both outputs to OUT.
"""

import json
import math
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
from gpt import gpt  # noqa: E402

STEPS, BATCH = 10, 16


def cosine(step, base, warmup, total, min_factor):
    """hytrain's `Schedule::Cosine` (crates/hytrain-train/src/schedule.rs) at optimizer update `step`, times `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return base * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


def digit_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def token_batches():
    # Sequences of 33 random ids: the first 32 are the input, the last 32 (the next token at every position) the
    # target, as a token dataset gives them.
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        seq = torch.randint(0, 64, (BATCH, 33), generator=gen)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def loss_fn(logits, y):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


#: name -> (module factory, batches).
EXAMPLES = {"digits_cnn": (DigitsCnn, digit_batches), "gpt": (gpt, token_batches)}

#: name -> (optimizer factory, learning rate of update i); tests/exported.rs (`Optimizer`) steps hytrain the same.
OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5), lambda i: 0.05),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
              lambda i: cosine(i, 1e-2, 2, STEPS, 0.1)),
}


def example(folder):
    source = json.loads((Path(folder) / "hytrain-model.json").read_text())["source"]
    name = Path(source.split(":")[0]).stem
    if name not in EXAMPLES:
        sys.exit(f"{folder} was exported from {source}, which this script does not know")
    return EXAMPLES[name]


def module(folder, weights="weights.safetensors"):
    net = example(folder)[0]()
    net.load_state_dict(load_file(str(Path(folder) / weights)))  # strict: every name, no extra
    return net


def compiled_step(folder, net):
    """A function that sets the parameters' .grad to FOLDER/train_step.pt2's gradients, averaged over the ranks
    (for a model without buffers), and returns the loss."""
    meta = json.loads((Path(folder) / "hytrain-model.json").read_text())
    if meta["buffers"]:
        sys.exit("adamw takes a model without buffers")
    package = torch._inductor.aoti_load_package(str(Path(folder) / "train_step.pt2"))
    named = dict(net.named_parameters())
    params = [named[t["name"]] for t in meta["parameters"]]

    def step(x, y):
        loss, *grads = package(x, y, *[p.detach() for p in params])
        for p, g in zip(params, grads):
            dist.all_reduce(g)
            p.grad = g / dist.get_world_size()
        return loss

    return step


def ddp_worker(rank, world, folder, optimizer, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    make_optimizer, lr = OPTIMIZERS[optimizer]
    net = module(folder)
    if optimizer == "sgd":
        ddp = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=True)

        def step(x, y):
            loss = loss_fn(ddp(x), y)
            loss.backward()
            return loss
    else:
        step = compiled_step(folder, net)
    opt = make_optimizer(net.parameters())
    per_rank = BATCH // world
    saved = {}
    for i, (x, y) in enumerate(example(folder)[1]()):
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        for group in opt.param_groups:
            group["lr"] = lr(i)
        opt.zero_grad()
        loss = step(x[part], y[part])
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        saved[f"loss{i}"] = (mean / world).reshape(1)
    # Tied names (gpt's lm_head.weight) share one tensor in the state_dict; safetensors wants copies.
    saved.update({f"rank{rank}.{k}": v.detach().clone() for k, v in net.state_dict().items()})
    save_file(saved, f"{out}.rank{rank}")
    # Both ranks leave together: a rank tearing gloo down while its peer still holds the pair open can make the
    # peer's I/O thread throw, and the process abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def train(folder, out, world, optimizer):
    if optimizer not in OPTIMIZERS:
        sys.exit(f"unknown optimizer {optimizer}; expected one of {', '.join(OPTIMIZERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(ddp_worker, args=(world, folder, optimizer, os.path.join(tmp, "init"), out),
                                    nprocs=world)
    saved = {}
    for rank in range(world):
        part = load_file(f"{out}.rank{rank}")
        os.remove(f"{out}.rank{rank}")
        saved.update({k: v for k, v in part.items() if rank == 0 or not k.startswith("loss")})
    for i, (x, y) in enumerate(example(folder)[1]()):
        saved[f"batch{i}.x"], saved[f"batch{i}.y"] = x, y
    save_file(saved, out)


def float64(folder, out):
    net = module(folder).double().train()
    x, y = example(folder)[1]()[0]
    x = x.double() if x.is_floating_point() else x
    loss = loss_fn(net(x), y)
    loss.backward()
    saved = {"loss": loss.detach().reshape(1)}
    saved.update({f"grad.{n}": p.grad for n, p in net.named_parameters()})
    save_file(saved, out)


def load(model_dir, out):
    net = module(model_dir, "model.safetensors")
    net.eval()
    x = example(model_dir)[1]()[0][0]
    with torch.no_grad():
        eager = net(x)
    runner = torch._inductor.aoti_load_package(str(Path(model_dir) / "forward.pt2"))
    state = dict(net.state_dict())
    meta = json.loads((Path(model_dir) / "hytrain-model.json").read_text())
    inputs = [state[t["name"]] for t in meta["parameters"] + meta["buffers"]]
    compiled = runner(x, *inputs)
    save_file({"eager": eager, "compiled": compiled}, out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    what = sys.argv[1]
    if what == "train":
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "sgd")
    elif what == "float64":
        float64(sys.argv[2], sys.argv[3])
    elif what == "load":
        load(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {what}")
