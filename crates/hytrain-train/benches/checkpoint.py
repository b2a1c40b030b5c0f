#!/usr/bin/env python3
"""Checkpoints of the same state dict (default 512 MiB of fp32) to the same local S3 server, side by side.

hytrain (examples/checkpoint_bench.rs: `CheckpointStore::s3` `save` and `latest_valid`, checksums verified) beside
s3torchconnector's `S3Checkpoint` (torch.save into its writer, torch.load from its reader) and beside
torch.distributed.checkpoint with s3torchconnector's `S3StorageWriter`/`S3StorageReader` (one process, no process
group). Also the training stall per checkpoint: the seconds hytrain's `AsyncCheckpointer::save` holds the caller
(the host copy; the write goes on in a thread) against a synchronous `CheckpointStore::save`, to S3 and to a folder.

The state is generated once, deterministically (a few large tensors and many small ones), and saved as safetensors;
the Rust side loads that file, so both sides save the same values, and every load is checked against them outside
the timing. Runs alternate hytrain and the peers; the table shows medians. The server is s3s-fs
(hytrain-data's examples/s3_server.rs), which spends much CPU per byte on a small machine: compare the writers with
each other, not with real S3.

Run (the xtask `bench` command wraps this):
    .cache/bench-venv/bin/pip install boto3 "s3torchconnector[dcp]" torch==2.11.0
    cargo build --release -p hytrain-data --examples && cargo build --release -p hytrain-train --example checkpoint_bench
    .cache/bench-venv/bin/python crates/hytrain-train/benches/checkpoint.py [--examples DIR] [--mib 512] [--runs 3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

BUCKET = "bench"
REGION = "us-east-1"


def state_dict(mib):
    """`mib` MiB of fp32 (a multiple of 8): 7/8 of it in 7 large tensors, 1/8 in tensors of 256 KiB each."""
    import torch

    if mib % 8 or mib < 8:
        raise SystemExit("--mib must be a positive multiple of 8")
    g = torch.Generator().manual_seed(1234)
    state = {}
    for i in range(7):
        state[f"layers.{i}.weight"] = torch.randn(mib * 32, 1024, generator=g)
    for j in range(mib // 2):
        state[f"norms.{j:04d}.weight"] = torch.randn(256, 256, generator=g)
    return state


def same(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main():
    here = Path(__file__).resolve()
    repo = here.parents[3]
    target = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, default=target / "release" / "examples",
                    help="folder with hytrain-data's s3_server and hytrain-train's checkpoint_bench examples")
    ap.add_argument("--mib", type=int, default=512, help="size of the state dict")
    ap.add_argument("--runs", type=int, default=3, help="runs of each side; the table shows the median")
    ap.add_argument("--server-threads", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--hytrain-args", default="", help="extra checkpoint_bench options, e.g. '--part-size 16777216'")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new one in the temporary folder)")
    args = ap.parse_args()

    server_bin, bench_bin = args.examples / "s3_server", args.examples / "checkpoint_bench"
    for binary in (server_bin, bench_bin):
        if not binary.exists():
            raise SystemExit(f"{binary} is missing: run `cargo build --release -p hytrain-data --examples` and "
                             "`cargo build --release -p hytrain-train --example checkpoint_bench`, or pass --examples")
    try:
        import torch
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file
        from s3torchconnector import S3Checkpoint, S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
        from s3torchconnector.dcp.s3_file_system import S3FileSystem
    except ImportError as e:
        raise SystemExit(f"{e}: pip install boto3 's3torchconnector[dcp]' (into .cache/bench-venv, torch kept at 2.11.0)")

    # One process, no process group: DCP says so once per call, which is the intent here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    work = Path(tempfile.mkdtemp(prefix="hytrain-ckpt-bench-", dir=args.work))
    root = work / "s3root"
    (root / BUCKET).mkdir(parents=True)
    server = subprocess.Popen([str(server_bin), str(root), "--threads", str(args.server_threads)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fields = dict(kv.split("=", 1) for kv in server.stdout.readline().split())
        endpoint, access_key, secret_key = fields["endpoint"], fields["access_key"], fields["secret_key"]
        os.environ.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, AWS_REGION=REGION,
                          AWS_EC2_METADATA_DISABLED="true")
        state = state_dict(args.mib)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        state_file = work / "state.safetensors"
        save_file(state, str(state_file))
        print(f"state dict: {len(state)} fp32 tensors, {nbytes / 2**20:.0f} MiB; server {endpoint} "
              f"({args.server_threads} threads), {os.cpu_count()} CPUs", flush=True)

        config = S3ClientConfig(force_path_style=True)

        def client():
            return S3Client(REGION, endpoint=endpoint, s3client_config=config)

        def s3checkpoint(run):
            checkpoint = S3Checkpoint(REGION, endpoint=endpoint, s3client_config=config)
            uri = f"s3://{BUCKET}/s3checkpoint/run-{run}.pt"
            started = time.perf_counter()
            with checkpoint.writer(uri) as writer:
                torch.save(state, writer)
            saved = time.perf_counter() - started
            started = time.perf_counter()
            with checkpoint.reader(uri) as reader:
                loaded = torch.load(reader)
            return saved, time.perf_counter() - started, loaded

        def distributed(run):
            # S3StorageWriter/Reader take no endpoint; their file system is given a client that has one.
            path = f"s3://{BUCKET}/dcp/run-{run}"
            writer = S3StorageWriter(REGION, path, s3client_config=config)
            writer.fs = S3FileSystem(REGION, s3_client=client())
            writer.path = writer.fs.init_path(path)
            started = time.perf_counter()
            dcp.save(state, storage_writer=writer, no_dist=True)
            saved = time.perf_counter() - started
            # DCP loads in place into the tensors of a state dict, as a resume into a built model does.
            loaded = {k: torch.empty_like(v) for k, v in state.items()}
            reader = S3StorageReader(REGION, path, s3client_config=config)
            reader.fs = S3FileSystem(REGION, s3_client=client(), reader_constructor=reader._reader_constructor)
            reader.path = reader.fs.init_path(path)
            started = time.perf_counter()
            dcp.load(loaded, storage_reader=reader, no_dist=True)
            return saved, time.perf_counter() - started, loaded

        def hytrain(run):
            out = subprocess.run(
                [str(bench_bin), str(state_file), "--url", f"s3://{BUCKET}/hytrain", "--dir", str(work / "dir"),
                 "--endpoint", endpoint, "--access-key", access_key, "--secret-key", secret_key, "--runs", "1",
                 *args.hytrain_args.split()],
                check=True, capture_output=True, text=True)
            return json.loads(out.stdout.splitlines()[-1])

        peers = {"s3torchconnector S3Checkpoint": s3checkpoint, "DCP + S3StorageWriter/Reader": distributed}
        times = {name: {"save": [], "load": []} for name in ["hytrain", *peers]}
        stall = {store: {"save": [], "async_held": [], "async_write": []} for store in ("s3", "dir")}
        for run in range(args.runs):
            line = hytrain(run)
            if line["bytes"] != nbytes:
                raise SystemExit(f"checkpoint_bench saved {line['bytes']} bytes, the state has {nbytes}")
            for op in ("save", "load"):
                times["hytrain"][op] += line["s3"][op]
            for store in stall:
                for key in stall[store]:
                    stall[store][key] += line[store][key]
            print(f"  run {run + 1}: hytrain save {line['s3']['save'][0]:.2f} s, load {line['s3']['load'][0]:.2f} s; "
                  f"held by a background save {line['s3']['async_held'][0]:.3f} s (S3), "
                  f"{line['dir']['async_held'][0]:.3f} s (folder, whose save took {line['dir']['save'][0]:.2f} s)",
                  flush=True)
            for name, fn in peers.items():
                saved, loaded_secs, loaded = fn(run)
                if not same(state, loaded):
                    raise SystemExit(f"{name} loaded a state dict that differs from the one saved")
                del loaded
                times[name]["save"].append(saved)
                times[name]["load"].append(loaded_secs)
                print(f"  run {run + 1}: {name} save {saved:.2f} s, load {loaded_secs:.2f} s", flush=True)
            # Each side's objects of this run go, so the server's disk holds at most one run's.
            for folder in ("s3checkpoint", "dcp"):
                shutil.rmtree(root / BUCKET / folder, ignore_errors=True)

        mb = nbytes / 1e6
        results = {name: {f"{op}_mb_per_s": mb / statistics.median(t[op]) for op in ("save", "load")}
                   | {f"{op}_seconds": t[op] for op in ("save", "load")} for name, t in times.items()}
        stalls = {store: {"save_seconds": statistics.median(t["save"]),
                          "held_seconds": statistics.median(t["async_held"]),
                          "background_write_seconds": statistics.median(t["async_write"])} for store, t in stall.items()}
        for s in stalls.values():
            s["ratio"] = s["held_seconds"] / s["save_seconds"]

        ours = results["hytrain"]
        names = list(peers)
        print()
        print(f"| operation | hytrain MB/s | {names[0]} MB/s | {names[1]} MB/s | hytrain / {names[0]} | "
              f"hytrain / {names[1]} |")
        print("|---|---:|---:|---:|---:|---:|")
        for op in ("save", "load"):
            key = f"{op}_mb_per_s"
            peer = [results[n][key] for n in names]
            print(f"| {op} | {ours[key]:.0f} | {peer[0]:.0f} | {peer[1]:.0f} | {ours[key] / peer[0]:.2f}x | "
                  f"{ours[key] / peer[1]:.2f}x |")
        print()
        print("| store | synchronous save s | background save: caller held s | ratio | background write s |")
        print("|---|---:|---:|---:|---:|")
        for store, s in stalls.items():
            print(f"| {'S3' if store == 's3' else 'folder'} | {s['save_seconds']:.2f} | {s['held_seconds']:.3f} | "
                  f"{s['ratio']:.3f}x | {s['background_write_seconds']:.2f} |")
        print(f"\nmedian of {args.runs} runs each; {len(state)} fp32 tensors, {nbytes / 2**20:.0f} MiB; "
              "MB/s = state bytes / seconds")
        if args.json:
            args.json.write_text(json.dumps({"bytes": nbytes, "tensors": len(state), "runs": args.runs,
                                             "results": results, "stall": stalls}, indent=2))
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
