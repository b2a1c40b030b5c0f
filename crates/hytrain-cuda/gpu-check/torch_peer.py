"""The PyTorch side of `cargo xtask gpu-check`, run with the GPU machine's own torch. Three modes:

--dump: parity and kernel timing.
  1. Parity: replays the optimizer steps hytrain-gpu-check ran (its --dump folder: inputs, hyperparameters in
     meta.json, and the results of hytrain's kernels) with torch.optim.SGD / AdamW on the GPU, and reports how far
     hytrain's results are from PyTorch's (PyTorch's own kernels may contract to FMA, so this is a tolerance check;
     the bit-for-bit check is against hytrain's CPU references, in hytrain-gpu-check).
  2. Peer timing: torch.optim.AdamW(fused=True) over one parameter of the same size hytrain-gpu-check timed, and the
     eager way of filling a 25 MB gradient bucket (torch.cat into the bucket, then scale), beside hytrain's kernels.
--write-cifar: a CIFAR-10 "binary version" folder of random images (data_batch_1..5.bin, test_batch.bin) for
  `hytrain train` and the training peer, made on the GPU machine so it need not be carried there.
--train: PyTorch eager training of the same model (benches/ddp_step.py's LeNet and ResNet-18, which match hytrain's
  model::LeNet and model::ResNet18), batch size and optimizer (SGD, lr 0.01, momentum 0.5: hytrain's defaults) on
  that folder, the same steps hytrain timed; with --hytrain-metrics, hytrain's own samples/s from its
  metrics.jsonl beside PyTorch's.
--compare-weights A B: how far two model.safetensors of `hytrain train` are apart (the same steps with gradient
  allreduces overlapped with backward on the side stream, and after backward): bit-identical, or the largest
  difference relative to the largest weight; it fails above 1e-4 (cuDNN may pick non-deterministic algorithms).

usage: torch_peer.py --dump DIR --json OUT [--bench-elements N] [--device cuda|cpu]
       torch_peer.py --write-cifar DIR [--records N]
       torch_peer.py --train lenet|resnet18 --data DIR --batch N --warmup N --steps N --json OUT
                     [--hytrain-metrics FILE] [--device cuda|cpu]
       torch_peer.py --compare-weights A B --json OUT
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Packed beside this script; in the repository it lives in benches/.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "..", "benches")]
from ddp_step import MODELS  # noqa: E402

# hytrain-data's CIFAR-10 record: one label byte, then 3x32x32 pixel bytes (CHW).
RECORD = 1 + 3 * 32 * 32
# hytrain-data's CIFAR10_MEAN and CIFAR10_STD.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def load(dump, name, count):
    path = os.path.join(dump, name + ".f32")
    values = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.float32)
    assert values.numel() == count, f"{path}: {values.numel()} values, expected {count}"
    return values


def replay(dump, meta, name, make_optimizer, device):
    n, steps = meta["elements"], meta["steps"]
    param = torch.nn.Parameter(load(dump, name + "_params0", n).to(device))
    grads = load(dump, name + "_grads", n * steps).to(device).view(steps, n)
    optimizer = make_optimizer([param])
    for step in range(steps):
        param.grad = grads[step].clone()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    ours = load(dump, name + "_hytrain_params", n).to(device)
    theirs = param.detach()
    difference = (ours - theirs).abs().max().item()
    # A few float32 ulps of the values' scale: a step ends in p - lr * g, which can cancel to near zero, so a
    # difference relative to each result would flag rounding noise.
    scale = max(1.0, theirs.abs().max().item())
    return {"max_abs_difference": difference, "scale": scale, "within_tolerance": difference <= 1e-6 * scale}


def median_seconds(work, warmup=3, runs=21):
    for _ in range(warmup):
        work()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def kernels(args):
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    ok = True

    meta = json.load(open(os.path.join(args.dump, "meta.json")))
    for name in ("sgd_nesterov", "sgd_dampened"):
        h = meta[name]
        result = replay(args.dump, meta, name, lambda params: torch.optim.SGD(
            params, lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
            weight_decay=h["weight_decay"], nesterov=h["nesterov"], foreach=False), args.device)
        report[name] = result
        ok &= result["within_tolerance"]
        print(f"parity: {name}: hytrain vs torch.optim.SGD on {args.device}: {result}")
    h = meta["adamw"]
    result = replay(args.dump, meta, "adamw", lambda params: torch.optim.AdamW(
        params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"],
        foreach=False), args.device)
    report["adamw"] = result
    ok &= result["within_tolerance"]
    print(f"parity: adamw: hytrain vs torch.optim.AdamW on {args.device}: {result}")

    n = args.bench_elements
    if n > 0 and args.device == "cuda":
        param = torch.nn.Parameter(torch.full((n,), 0.01, device="cuda"))
        param.grad = torch.full((n,), 0.01, device="cuda")
        fused = torch.optim.AdamW([param], fused=True)
        seconds = median_seconds(fused.step)
        report["bench_elements"] = n
        report["bench_adamw_fused_ms"] = seconds * 1e3
        report["bench_adamw_fused_gbps"] = 7 * 4 * n / seconds / 1e9
        print(f"bench: torch.optim.AdamW(fused=True) over {n} elements: {seconds * 1e3:.3f} ms, "
              f"{7 * 4 * n / seconds / 1e9:.0f} GB/s")
        del param, fused

        tensors = 160
        each = (25 << 20) // 4 // tensors
        grads = [torch.full((each,), 0.5, device="cuda") for _ in range(tensors)]
        bucket = torch.empty(each * tensors, device="cuda")

        def pack():
            torch.cat(grads, out=bucket)
            bucket.mul_(0.5)

        seconds = median_seconds(pack)
        report["bench_pack_eager_us"] = seconds * 1e6
        print(f"bench: torch.cat + mul_ of {tensors} tensors into a 25 MB bucket: {seconds * 1e6:.1f} us")

    report["passed"] = bool(ok)
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    return 0 if ok else 1


def write_cifar(folder, records):
    """Five training batch files sharing `records` between them and a small test batch, as CIFAR-10 ships."""
    os.makedirs(folder, exist_ok=True)
    files = 5
    for index in range(files):
        count = records // files + (1 if index < records % files else 0)
        write_records(os.path.join(folder, f"data_batch_{index + 1}.bin"), count)
    write_records(os.path.join(folder, "test_batch.bin"), min(records, 1000))
    print(f"data: {records} random CIFAR-10 records in {folder}")
    return 0


def write_records(path, count):
    pixels = bytearray(os.urandom(count * (RECORD - 1)))
    out = bytearray(count * RECORD)
    for i in range(count):
        out[i * RECORD] = i % 10
        out[i * RECORD + 1:(i + 1) * RECORD] = pixels[i * (RECORD - 1):(i + 1) * (RECORD - 1)]
    with open(path, "wb") as f:
        f.write(out)


def read_cifar(folder):
    """The training records of a binary-version folder, in data_batch order, as one uint8 tensor [N, RECORD]."""
    names = sorted((n for n in os.listdir(folder) if n.startswith("data_batch_") and n.endswith(".bin")),
                   key=lambda n: int(n[len("data_batch_"):-len(".bin")]))
    if not names:
        raise SystemExit(f"{folder} has no data_batch_N.bin files")
    data = b"".join(open(os.path.join(folder, n), "rb").read() for n in names)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, RECORD)


def hytrain_rate(metrics, warmup, batch):
    """hytrain's samples/s over the steps after `warmup`, from the windows of its metrics.jsonl (one per
    --log-interval steps, each with the samples/s of its own steps): total samples over total time."""
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    windows, previous = [], 0
    for row in rows:
        if "step" in row and "lr" in row and "samples_per_sec" in row:
            steps = row["step"] - previous
            previous = row["step"]
            if row["step"] - steps >= warmup and row["samples_per_sec"] > 0:
                windows.append((steps * batch, steps * batch / row["samples_per_sec"]))
    if not windows:
        raise SystemExit(f"{metrics} has no training window after step {warmup}: did hytrain train?")
    samples = sum(w[0] for w in windows)
    return {"samples_per_sec": samples / sum(w[1] for w in windows), "steps": samples // batch,
            "last_step": previous}


def train(args):
    """PyTorch eager, one process, as a plain training script without DataLoader workers feeds it: each step takes
    a shuffled batch of the records on the CPU, normalises it there and copies it to the device, then zero_grad,
    forward, cross-entropy, backward, SGD step and reading the loss (what hytrain's Ddp::train_step does)."""
    device = torch.device(args.device)
    torch.manual_seed(1)
    records = read_cifar(args.data)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    model = MODELS[args.train]().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    order = torch.randperm(records.shape[0])
    per_epoch = records.shape[0] // args.batch

    def step(i):
        picked = records[order[(i % per_epoch) * args.batch:(i % per_epoch + 1) * args.batch]]
        x = ((picked[:, 1:].float().div_(255).view(-1, 3, 32, 32) - mean) / std).to(device)
        y = picked[:, 0].long().to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    for i in range(args.warmup):
        step(i)
    started = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    seconds = time.perf_counter() - started
    report = {
        "model": args.train, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
        "device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "optimizer": "SGD lr 0.01 momentum 0.5",
        "pytorch_eager": {"samples_per_sec": args.batch * args.steps / seconds, "last_loss": loss},
    }
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    line = (f"train: {args.train} batch {args.batch} on {args.device}: PyTorch eager "
            f"{report['pytorch_eager']['samples_per_sec']:.0f} samples/s")
    ok = True
    if args.hytrain_metrics:
        ours = hytrain_rate(args.hytrain_metrics, args.warmup, args.batch)
        report["hytrain"] = ours
        report["hytrain_over_pytorch"] = ours["samples_per_sec"] / report["pytorch_eager"]["samples_per_sec"]
        ok = ours["last_step"] >= args.warmup + args.steps
        line += (f", hytrain {ours['samples_per_sec']:.0f} samples/s over {ours['steps']} steps "
                 f"({report['hytrain_over_pytorch']:.2f}x PyTorch)")
        if not ok:
            line += f"; hytrain stopped at step {ours['last_step']} of {args.warmup + args.steps}"
    report["passed"] = ok
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    print(line)
    return 0 if ok else 1


# safetensors' dtype names, for the types hytrain's models hold.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64}


def read_safetensors(path):
    """The tensors of a safetensors file by name (its format: an 8-byte little-endian header length, a JSON header
    of dtype, shape and data offsets per tensor, then the data), read without the safetensors package."""
    with open(path, "rb") as f:
        blob = f.read()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length])
    data = blob[8 + length:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        raw = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors


def compare_weights(args):
    a_path, b_path = args.compare_weights
    a, b = read_safetensors(a_path), read_safetensors(b_path)
    if sorted(a) != sorted(b):
        raise SystemExit(f"{a_path} and {b_path} hold different tensors: {sorted(set(a) ^ set(b))}")
    identical = all(torch.equal(a[n], b[n]) for n in a)
    worst, worst_name = 0.0, None
    for name in a:
        x, y = a[name].double(), b[name].double()
        difference = (x - y).abs().max().item() / max(y.abs().max().item(), 1e-12)
        if difference > worst:
            worst, worst_name = difference, name
    ok = worst <= 1e-4
    line = (f"overlap: {len(a)} tensors " + ("bit-identical" if identical else
            f"differ by at most {worst:.2e} of the largest weight ({worst_name})") + ("" if ok else ": FAILED"))
    with open(args.json, "w") as out:
        json.dump({"tensors": len(a), "identical": identical, "max_relative_difference": worst,
                   "worst_tensor": worst_name, "ok": ok}, out, indent=2)
    print(line)
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser()
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dump", help="hytrain-gpu-check's dump folder: kernel parity and timing")
    mode.add_argument("--write-cifar", metavar="DIR", help="write a random CIFAR-10 binary-version folder")
    mode.add_argument("--train", choices=sorted(MODELS), help="time PyTorch eager training of this model")
    mode.add_argument("--compare-weights", nargs=2, metavar=("A", "B"), help="compare two model.safetensors")
    parser.add_argument("--json")
    parser.add_argument("--bench-elements", type=int, default=64 << 20)
    # cpu: the tests' self-check on machines without a GPU (the timings that matter need a GPU).
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--records", type=int, default=50000)
    parser.add_argument("--data")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--hytrain-metrics")
    args = parser.parse_args()
    if args.write_cifar:
        return write_cifar(args.write_cifar, args.records)
    if not args.json:
        parser.error("--json is required with --dump, --train and --compare-weights")
    if args.compare_weights:
        return compare_weights(args)
    if args.dump:
        return kernels(args)
    for name in ("data", "batch", "warmup", "steps"):
        if getattr(args, name) is None:
            parser.error(f"--train needs --{name}")
    return train(args)


if __name__ == "__main__":
    raise SystemExit(main())
