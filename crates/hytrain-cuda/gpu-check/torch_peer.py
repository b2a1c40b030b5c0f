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
--train-exported FOLDER: the model a `python -m hytrain_export` folder was exported from (--factory), from the
  folder's initial weights, trained in PyTorch eager with SGD (lr 0.01, momentum 0.5) for --steps steps on the whole
  of --data (one batch, as `hytrain train` trained it), in float32 and in float64; what hytrain trained must be as
  close to PyTorch float32 as float32 rounding allows, measured by float64 (see EXPORTED_FACTOR).

usage: torch_peer.py --dump DIR --json OUT [--bench-elements N] [--device cuda|cpu]
       torch_peer.py --write-cifar DIR [--records N]
       torch_peer.py --train lenet|resnet18 --data DIR --batch N --warmup N --steps N --json OUT
                     [--hytrain-metrics FILE] [--device cuda|cpu]
       torch_peer.py --compare-weights A B --json OUT
       torch_peer.py --train-exported FOLDER --factory FILE.py:NAME --data DIR --batch N --steps N
                     --hytrain-model DIR --hytrain-metrics FILE --json OUT [--device cuda|cpu]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Packed beside this script; in the repository it lives in benches/. The exporter (hytrain_export) is packed under
# python/, as in the repository.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "..", "benches"), os.path.join(HERE, "python"),
                os.path.join(HERE, "..", "..", "..", "python")]
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
    forward, cross-entropy, backward and SGD step; the loss is read after the warm-up and after the last step only
    (hytrain reads it once per metrics window), which also waits for the device before the clock stops. Prints one
    row of the ratio table run.sh heads."""
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
        return loss

    loss = None
    for i in range(args.warmup):
        loss = step(i)
    if loss is not None:
        loss.item()
    started = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    loss = loss.item()
    seconds = time.perf_counter() - started
    report = {
        "model": args.train, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
        "device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "optimizer": "SGD lr 0.01 momentum 0.5",
        "pytorch_eager": {"samples_per_sec": args.batch * args.steps / seconds, "last_loss": loss},
    }
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    # A row of the table run.sh heads: model, batch, device, PyTorch eager and hytrain samples/s, their ratio.
    line = (f"train: {args.train:<9} {args.batch:>5}  {args.device:<6} "
            f"{report['pytorch_eager']['samples_per_sec']:>13.0f}")
    ok = True
    if args.hytrain_metrics:
        ours = hytrain_rate(args.hytrain_metrics, args.warmup, args.batch)
        report["hytrain"] = ours
        report["hytrain_over_pytorch"] = ours["samples_per_sec"] / report["pytorch_eager"]["samples_per_sec"]
        ok = ours["last_step"] >= args.warmup + args.steps
        line += f" {ours['samples_per_sec']:>9.0f} {report['hytrain_over_pytorch']:>8.2f}x  ({ours['steps']} steps)"
        if not ok:
            line += f"; hytrain stopped at step {ours['last_step']} of {args.warmup + args.steps}"
    else:
        line += f" {'-':>9} {'-':>9}  (hytrain did not train)"
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


# The exported model hytrain trained is compared with the same training in PyTorch eager float32 (the same initial
# weights, batch and steps), with a tolerance measured in the same run: how far float32 rounding takes PyTorch's
# own training from float64 (PyTorch eager float64, likewise). Rounding (ReLU and max-pool decisions within
# rounding of zero, summation order, cuDNN's algorithms, TF32 if NVIDIA_TF32_OVERRIDE=0 is ignored) makes any two
# float32 implementations part by an amount that grows with each step on a few random samples and depends on the
# samples: measured on the CPU for this ResNet-18, PyTorch float32 was 3e-5 to 0.14 off float64 after four steps at
# batch 16 and 8.5e-3 after one step at batch 64, with Inductor's compiled step from 3e-5 to 1.3 times that away
# from it. So a fixed tolerance would either pass real errors or fail float32 itself; hytrain must be within
# EXPORTED_FLOOR of PyTorch float32, or within EXPORTED_FACTOR times PyTorch float32's distance from float64 where
# that is larger. A distance is per tensor, ||a - b|| / ||b - initial|| (L2 norms: how far off, against how far
# training moved it, that floored at 1e-3 of ||b|| for tensors training barely moves), the worst over all tensors.
EXPORTED_FACTOR = 5.0
EXPORTED_FLOOR = 1e-2
# Each step's loss likewise; hytrain's metrics.jsonl rounds the loss to 4 decimals.
EXPORTED_LOSS_FLOOR = 1e-3


def cudnn_tf32_in_effect():
    """Whether a float32 convolution on the GPU is rounded like TF32 (about 1e-3 off float64) rather than float32
    (about 1e-6): torch's default allows TF32 in cuDNN, and NVIDIA_TF32_OVERRIDE=0 should override that."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 16, 16, generator=gen)
    w = torch.randn(64, 64, 3, 3, generator=gen)
    got = F.conv2d(x.cuda(), w.cuda()).double().cpu()
    want = F.conv2d(x.double(), w.double())
    return ((got - want).abs().max() / want.abs().max()).item() > 1e-4


def hytrain_losses(metrics):
    """(step, train_loss) of each metrics.jsonl window (one per step with --log-interval 1)."""
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    return [(row["step"], row["train_loss"]) for row in rows if "step" in row and "train_loss" in row]


def distances(state, reference, initial):
    """Per floating-point tensor of `reference`: ||state - reference|| / max(||reference - initial||,
    1e-3 ||reference||)."""
    out = {}
    for name, r in reference.items():
        if not r.is_floating_point():
            continue
        r, a, r0 = r.double(), state[name].double(), initial[name].double()
        moved = (r - r0).norm().item()
        out[name] = (a - r).norm().item() / max(moved, 1e-3 * r.norm().item(), 1e-30)
    return out


def worst(per_tensor):
    name = max(per_tensor, key=per_tensor.get)
    return per_tensor[name], name


def train_eager(factory, initial, x, y, steps, dtype, device):
    """PyTorch eager training of the module from `initial`, SGD lr 0.01 momentum 0.5 on (x, y) every step; returns
    the final state_dict (on the CPU) and each step's loss."""
    model = factory()
    model.load_state_dict(initial)  # strict: the folder's weights are the module's state_dict
    model.to(device=device, dtype=dtype).train()
    x = x.to(device=device, dtype=dtype)
    y = y.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {n: t.detach().cpu() for n, t in model.state_dict().items()}, losses


def train_exported(args):
    from hytrain_export import load_factory

    folder = args.train_exported
    meta = json.load(open(os.path.join(folder, "hytrain-model.json")))
    initial = read_safetensors(os.path.join(folder, meta["weights"]))
    factory = load_factory(args.factory)
    records = read_cifar(args.data)
    if records.shape[0] != args.batch:
        raise SystemExit(f"{args.data} holds {records.shape[0]} records, not one batch of {args.batch}: the "
                         "comparison needs every step to see the whole dataset")
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    # As hytrain-data normalises: (pixel / 255 - mean) / std in float32.
    x = (records[:, 1:].float().div_(255).view(-1, 3, 32, 32) - mean) / std
    y = records[:, 0].long()
    eager, eager_losses = train_eager(factory, initial, x, y, args.steps, torch.float32, args.device)
    exact, exact_losses = train_eager(factory, initial, x, y, args.steps, torch.float64, args.device)

    report = {"model": meta.get("name"), "factory": args.factory, "export_device": meta.get("device"),
              "device": args.device, "batch": args.batch, "steps": args.steps, "torch": torch.__version__,
              "cuda": torch.version.cuda, "optimizer": "SGD lr 0.01 momentum 0.5", "factor": EXPORTED_FACTOR,
              "floor": EXPORTED_FLOOR, "loss_floor": EXPORTED_LOSS_FLOOR,
              "nvidia_tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE")}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
        report["cudnn_tf32"] = cudnn_tf32_in_effect()
    problems = []
    if meta.get("device") != args.device:
        problems.append(f"the folder was exported for {meta.get('device')}, not {args.device}")

    logged = hytrain_losses(args.hytrain_metrics)
    ours_losses = [loss for _, loss in logged]
    report["losses"] = {"hytrain": ours_losses, "pytorch_float32": eager_losses, "pytorch_float64": exact_losses}
    if [step for step, _ in logged] != list(range(1, args.steps + 1)):
        problems.append(f"hytrain logged the loss at steps {[step for step, _ in logged]}, not 1..{args.steps}")
    else:
        ours_off = max(abs(a - b) for a, b in zip(ours_losses, eager_losses))
        rounding = max(abs(a - b) for a, b in zip(eager_losses, exact_losses))
        allowed = max(EXPORTED_FACTOR * rounding, EXPORTED_LOSS_FLOOR)
        report["loss"] = {"hytrain_off_pytorch_float32": ours_off, "pytorch_float32_off_float64": rounding,
                          "allowed": allowed}
        if not ours_off <= allowed:
            problems.append(f"hytrain's losses are up to {ours_off:.2e} off PyTorch float32's, more than the "
                            f"{allowed:.2e} allowed (PyTorch float32 is {rounding:.2e} off float64)")

    ours = read_safetensors(os.path.join(args.hytrain_model, "model.safetensors"))
    if sorted(ours) != sorted(exact):
        problems.append(f"hytrain's model.safetensors holds other tensors than the module's state_dict: "
                        f"{sorted(set(ours) ^ set(exact))}")
    else:
        for name in sorted(exact):
            h, e = ours[name], exact[name]
            if h.shape != e.shape or h.dtype != eager[name].dtype:
                problems.append(f"{name} is {list(h.shape)} {h.dtype} from hytrain, {list(e.shape)} "
                                f"{eager[name].dtype} in PyTorch")
            elif not e.is_floating_point() and not torch.equal(h, e):
                # num_batches_tracked: counted, not computed.
                problems.append(f"{name}: hytrain {h.tolist()}, PyTorch {e.tolist()}")
    if not problems:
        between = distances(ours, eager, initial)
        rounding = distances(eager, exact, initial)
        ours_float64 = distances(ours, exact, initial)
        (ours_worst, ours_name), (eager_worst, eager_name) = worst(between), worst(rounding)
        allowed = max(EXPORTED_FACTOR * eager_worst, EXPORTED_FLOOR)
        report["weights"] = {"hytrain_off_pytorch_float32": ours_worst, "tensor": ours_name,
                             "pytorch_float32_off_float64": eager_worst, "pytorch_float32_tensor": eager_name,
                             "hytrain_off_float64": worst(ours_float64)[0], "allowed": allowed}
        report["tensors"] = {n: {"hytrain_off_pytorch_float32": between[n], "pytorch_float32_off_float64": rounding[n],
                                 "hytrain_off_float64": ours_float64[n]} for n in between}
        if not ours_worst <= allowed:
            problems.append(f"hytrain's {ours_name} is {ours_worst:.2e} off PyTorch float32's, more than the "
                            f"{allowed:.2e} allowed (PyTorch float32 is {eager_worst:.2e} off float64, at "
                            f"{eager_name})")
    report["problems"] = problems
    report["passed"] = not problems
    with open(args.json, "w") as out:
        json.dump(report, out, indent=2)
    for problem in problems:
        print(f"exported: problem: {problem}")
    line = (f"exported: {'PASS' if not problems else 'FAIL'}: {meta.get('name')} exported for {meta.get('device')}, "
            f"{args.steps} SGD steps at batch {args.batch} on {args.device}")
    if "weights" in report:
        w = report["weights"]
        line += (f"; weights: hytrain off PyTorch float32 {w['hytrain_off_pytorch_float32']:.2e} ({w['tensor']}), "
                 f"allowed {w['allowed']:.2e} (PyTorch float32 off float64 {w['pytorch_float32_off_float64']:.2e}, "
                 f"hytrain off float64 {w['hytrain_off_float64']:.2e})")
    if "loss" in report:
        loss = report["loss"]
        line += (f"; losses: hytrain off PyTorch float32 {loss['hytrain_off_pytorch_float32']:.1e}, allowed "
                 f"{loss['allowed']:.1e} (float64 {exact_losses[0]:.4f} to {exact_losses[-1]:.4f})")
    if "cudnn_tf32" in report:
        line += f"; cuDNN TF32 {'ON' if report['cudnn_tf32'] else 'off'}"
    print(line)
    return 0 if not problems else 1


def main():
    parser = argparse.ArgumentParser()
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dump", help="hytrain-gpu-check's dump folder: kernel parity and timing")
    mode.add_argument("--write-cifar", metavar="DIR", help="write a random CIFAR-10 binary-version folder")
    mode.add_argument("--train", choices=sorted(MODELS), help="time PyTorch eager training of this model")
    mode.add_argument("--compare-weights", nargs=2, metavar=("A", "B"), help="compare two model.safetensors")
    mode.add_argument("--train-exported", metavar="FOLDER",
                      help="train an exported model's module in PyTorch eager and compare with hytrain's result")
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
    parser.add_argument("--hytrain-model", help="--train-exported: hytrain's --model-dir, with model.safetensors")
    parser.add_argument("--factory", help="--train-exported: the FILE.py:NAME the folder was exported from")
    args = parser.parse_args()
    if args.write_cifar:
        return write_cifar(args.write_cifar, args.records)
    if not args.json:
        parser.error("--json is required with --dump, --train, --compare-weights and --train-exported")
    if args.compare_weights:
        return compare_weights(args)
    if args.train_exported:
        for name in ("factory", "data", "batch", "steps", "hytrain_model", "hytrain_metrics"):
            if getattr(args, name) is None:
                parser.error(f"--train-exported needs --{name.replace('_', '-')}")
        return train_exported(args)
    if args.dump:
        return kernels(args)
    for name in ("data", "batch", "warmup", "steps"):
        if getattr(args, name) is None:
            parser.error(f"--train needs --{name}")
    return train(args)


if __name__ == "__main__":
    raise SystemExit(main())
