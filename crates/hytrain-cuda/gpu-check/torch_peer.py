"""The PyTorch side of `cargo xtask gpu-check`, run with the GPU machine's own torch.

1. Parity: replays the optimizer steps hytrain-gpu-check ran (its --dump folder: inputs, hyperparameters in
   meta.json, and the results of hytrain's kernels) with torch.optim.SGD / AdamW on the GPU, and reports how far
   hytrain's results are from PyTorch's (PyTorch's own kernels may contract to FMA, so this is a tolerance check;
   the bit-for-bit check is against hytrain's CPU references, in hytrain-gpu-check).
2. Peer timing: torch.optim.AdamW(fused=True) over one parameter of the same size hytrain-gpu-check timed, and the
   eager way of filling a 25 MB gradient bucket (torch.cat into the bucket, then scale), beside hytrain's kernels.

usage: torch_peer.py --dump DIR --json OUT [--bench-elements N] [--device cuda|cpu]
"""

import argparse
import json
import os
import statistics
import time

import torch


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--bench-elements", type=int, default=64 << 20)
    # cpu: the tests' self-check on machines without a GPU (parity only; the timings need a GPU).
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
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
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
