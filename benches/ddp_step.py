"""The PyTorch side of benches/step_time.rs: one rank of a DistributedDataParallel job on gloo that times optimizer
steps of LeNet, ResNet-18 (CIFAR variant), torchvision's ResNet-18 as it comes (`resnet18_cifar`, the model of
python/examples/resnet18_cifar.py that hytrain trains exported) or the bench's GPT (`gpt_bench`,
python/examples/gpt.py at python/tests/cached_export.py's `gpt_bench` size, trained with AdamW on random token
sequences, next-token cross-entropy over every position) on fixed random batches.

Usage: RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python ddp_step.py MODEL WARMUP STEPS BATCH [eager|compile]
`compile` runs the DDP module through `torch.compile` (Inductor's C++ backend on CPU; DDP's optimizer splits the
graph at bucket boundaries so the allreduces still overlap backward); its first step compiles, which the warm-up
steps absorb.
Rank 0 prints one JSON line: {"side": "pytorch", "model": ..., "median_ms": ..., "cpu_median_ms": ..., ...}, the
median wall time and the median CPU time of this process (all its threads, gloo's included) per timed step.
A step is what hytrain's Ddp::train_step does: zero_grad, forward, cross-entropy, backward (DDP allreduces the
gradient buckets), optimizer step, and reading the loss. BATCH is images per rank, or sequences for the GPT.
"""
import datetime
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class LeNet(nn.Module):
    """The reference sample's Net (cifar10-distributed-gpu-final.py)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, 0, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout with a 3x3 stride-1 stem and no max-pool, as hytrain's model::ResNet18."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers = []
        inputs = 64
        for outputs, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)))
            inputs = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resnet18_cifar(num_classes=10):
    """The factory hytrain's export of this model came from, loaded from its file as `python -m hytrain_export` does."""
    return _load(PYTHON_DIR / "examples" / "resnet18_cifar.py", "resnet18_cifar").build(num_classes)


def gpt_bench_config():
    """The factory, keyword arguments and context length hytrain's export of `gpt_bench` used (read from
    python/tests/cached_export.py, so both sides train the same model)."""
    factory, args = _load(PYTHON_DIR / "tests" / "cached_export.py", "cached_export").EXAMPLES["gpt_bench"]
    file, _, name = factory.partition(":")
    kwargs = json.loads(args[args.index("--model-kwargs") + 1])
    context = int(args[args.index("--input-shape") + 1])
    return getattr(_load(PYTHON_DIR / file, "gpt"), name), kwargs, context


def gpt_bench():
    factory, kwargs, _ = gpt_bench_config()
    return factory(**kwargs)


MODELS = {"lenet": LeNet, "resnet18": ResNet18, "resnet18_cifar": resnet18_cifar, "gpt_bench": gpt_bench}


def make_batches(model, batch):
    """4 random batches: images and labels, or for the GPT token sequences and as many target tokens."""
    if model == "gpt_bench":
        _, kwargs, context = gpt_bench_config()
        vocab = kwargs["vocab_size"]
        return [(torch.randint(0, vocab, (batch, context)), torch.randint(0, vocab, (batch, context)))
                for _ in range(4)]
    return [(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))) for _ in range(4)]


def main():
    model, warmup, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "eager"
    if model not in MODELS:
        sys.exit(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
    if mode not in ("eager", "compile"):
        sys.exit(f"unknown mode {mode!r}; expected eager or compile")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    torch.manual_seed(rank)
    # Defaults as hytrain's DdpOptions: 25 MiB buckets (1 MiB first), buffers broadcast from rank 0 every forward.
    ddp = nn.parallel.DistributedDataParallel(MODELS[model]())
    if model == "gpt_bench":
        # As hytrain's side: AdamW, lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 (torch's defaults but
        # the learning rate).
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.5)
    if mode == "compile":
        # PyTorch's recommended order (compile the DDP module); the loss and the optimizer stay eager, as in the
        # eager peer.
        ddp = torch.compile(ddp)
    batches = make_batches(model, batch)
    times, cpu_times, first_ms = [], [], None
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        start, cpu_start = time.perf_counter(), time.process_time()
        opt.zero_grad()
        # Over every position for the GPT ([batch, context, vocabulary] against [batch, context]).
        loss = F.cross_entropy(ddp(x).flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        loss.item()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if i == 0:
            first_ms = elapsed * 1e3
        if i >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    dist.destroy_process_group()
    if rank == 0:
        row = {
            "side": "pytorch",
            "model": model,
            "mode": mode,
            "median_ms": statistics.median(times) * 1e3,
            "mean_ms": statistics.fmean(times) * 1e3,
            "cpu_median_ms": statistics.median(cpu_times) * 1e3,
            "steps": len(times),
            "first_step_ms": first_ms,
            "torch": torch.__version__,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
