"""The peer of benches/allreduce.rs: allreduce bus bandwidth of PyTorch's gloo backend, 2 processes on one host.

Usage: python gloo_allreduce.py SIZE_BYTES[,SIZE_BYTES...]
Prints one JSON line per size: {"bytes": ..., "seconds": ..., "busbw_gbps": ...} (best mean of ten timed rounds, as
the Rust side reports the best of criterion's samples).
"""
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def worker(rank, port, sizes, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    for size in sizes:
        buf = torch.ones(size // 4, dtype=torch.float32)
        for _ in range(2):
            dist.all_reduce(buf)
        # Like criterion on the Rust side: several rounds of back-to-back allreduces, best mean per round.
        iters = max(1, min(20, (64 << 20) // max(size, 1 << 20)))
        best = float("inf")
        for _ in range(10):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(buf)
            best = min(best, (time.perf_counter() - start) / iters)
        if rank == 0:
            busbw = size * 2 * (WORLD - 1) / WORLD / best / 1e9
            queue.put({"bytes": size, "seconds": best, "busbw_gbps": busbw})
    dist.destroy_process_group()


def main():
    sizes = [int(s) for s in sys.argv[1].split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, sizes, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=600) for _ in sizes]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"gloo worker exited with {p.exitcode}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
