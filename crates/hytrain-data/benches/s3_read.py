#!/usr/bin/env python3
"""Reading the same tar shards (default 64 x 8 MiB = 512 MiB) from a folder and from a local S3 server.

Beside hytrain's two sources, in the same run and against the same server: boto3 (one thread, and 8 threads),
s3torchconnector (AWS's Rust-cored S3 connector for PyTorch), and a plain read of the files from disk as the
ceiling. The server is s3s-fs (`examples/s3_server.rs`), whose CPU cost per byte makes every S3 figure here
server-bound on a small machine: compare the S3 readers with each other, not with real S3.

Run (the xtask `bench` command wraps this):
    python3 -m venv .cache/bench-venv && .cache/bench-venv/bin/pip install boto3 s3torchconnector
    cargo build --release -p hytrain-data --examples
    .cache/bench-venv/bin/python crates/hytrain-data/benches/s3_read.py [--examples DIR] [--shards 64]
"""

import argparse
import concurrent.futures
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BUCKET = "bench"
PREFIX = "shards/"
SAMPLE_BYTES = 3072  # a CIFAR-10 image's worth


def make_shard(rng, max_bytes, index):
    """A WebDataset tar shard of random samples (`.bin` + `.cls`) no larger than max_bytes; (bytes, samples)."""
    out = io.BytesIO()
    samples = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        # Each sample takes two headers and two data blocks of 512 bytes beyond its payload.
        while out.tell() + SAMPLE_BYTES + 3 * 512 + 20480 <= max_bytes:
            key = f"{index:04d}{samples:06d}"
            for ext, data in ((".bin", rng.randbytes(SAMPLE_BYTES)), (".cls", str(samples % 10).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            samples += 1
    return out.getvalue(), samples


def timed(runs, fn):
    """Median and best seconds of `runs` calls of fn, which returns the bytes it read, or (bytes, seconds) when it
    timed itself."""
    seconds, total = [], None
    for _ in range(runs):
        started = time.perf_counter()
        got = fn()
        elapsed = time.perf_counter() - started
        if isinstance(got, tuple):
            got, elapsed = got
        seconds.append(elapsed)
        if total is not None and got != total:
            raise SystemExit(f"a reader returned {got} bytes, then {total}")
        total = got
    return statistics.median(seconds), min(seconds), total


def main():
    here = Path(__file__).resolve()
    repo = here.parents[3]
    target = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, default=target / "release" / "examples",
                    help="folder with the s3_server and read_source example binaries")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--shard-mib", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="runs per reader; the table shows the median")
    ap.add_argument("--threads", type=int, default=8, help="threads of the threaded boto3 reader")
    ap.add_argument("--server-threads", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--hytrain-s3", action="append", default=[], metavar="ARGS",
                    help="extra read_source options for another hytrain S3 row, e.g. '--prefetch 16' (repeatable)")
    args = ap.parse_args()

    server_bin, reader_bin = args.examples / "s3_server", args.examples / "read_source"
    for binary in (server_bin, reader_bin):
        if not binary.exists():
            raise SystemExit(f"{binary} is missing: run `cargo build --release -p hytrain-data --examples` "
                             "or pass --examples")
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SystemExit("boto3 is missing: pip install boto3 s3torchconnector (into .cache/bench-venv)")
    try:
        from s3torchconnector import S3ClientConfig, S3IterableDataset
        connector = "s3torchconnector"
    except ImportError:
        S3IterableDataset = None
        try:
            from s3torchconnectorclient._mountpoint_s3_client import MountpointS3Client
            connector = "s3torchconnectorclient"
        except ImportError:
            raise SystemExit("s3torchconnector is missing: pip install s3torchconnector")

    work = Path(tempfile.mkdtemp(prefix="hytrain-s3-bench-"))
    root = work / "s3root"
    server = subprocess.Popen([str(server_bin), str(root), "--threads", str(args.server_threads)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fields = dict(kv.split("=", 1) for kv in server.stdout.readline().split())
        endpoint, access_key, secret_key = fields["endpoint"], fields["access_key"], fields["secret_key"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key,
                   AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        os.environ.update(env)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                          config=Config(s3={"addressing_style": "path"}, max_pool_connections=args.threads * 2,
                                        retries={"max_attempts": 3}))
        # Upload through the server, so it keeps each object's ETag instead of hashing the file on every GET.
        s3.create_bucket(Bucket=BUCKET)
        rng = random.Random(1234)
        samples = 0
        for i in range(args.shards):
            data, n = make_shard(rng, args.shard_mib << 20, i)
            samples += n
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}shard-{i:04d}.tar", Body=data)
        folder = root / BUCKET / PREFIX
        files = sorted(folder.iterdir())
        total = sum(f.stat().st_size for f in files)
        print(f"{len(files)} shards, {total / 2**20:.0f} MiB, {samples} samples; server {endpoint} "
              f"({args.server_threads} threads), {os.cpu_count()} CPUs", flush=True)

        def disk():
            n = 0
            for f in files:
                with open(f, "rb") as fh:
                    n += len(fh.read())
            return n

        def hytrain(spec, *extra):
            # The example times list + reads itself, so process start and client set-up are left out, as they
            # are for the Python readers, whose clients exist before the clock starts.
            def run():
                out = subprocess.run([str(reader_bin), spec, *extra], check=True, capture_output=True, text=True)
                line = json.loads(out.stdout.splitlines()[-1])
                return line["bytes"], line["seconds"]
            return run

        s3_args = ("--endpoint", endpoint, "--access-key", access_key, "--secret-key", secret_key)

        def keys():
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        def boto3_sequential():
            return sum(len(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys())

        def boto3_threads():
            with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
                return sum(pool.map(lambda k: len(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()), keys()))

        def s3torch():
            # Listed through boto3: s3torchconnector's own listing sends `delimiter=` (empty), which s3s-fs takes
            # for a real delimiter, so from_prefix finds nothing here (AWS ignores it). The reads are its own.
            uris = [f"s3://{BUCKET}/{k}" for k in keys()]
            if S3IterableDataset is not None:
                dataset = S3IterableDataset.from_objects(
                    uris, region="us-east-1", endpoint=endpoint,
                    s3client_config=S3ClientConfig(force_path_style=True))
                return sum(len(reader.read()) for reader in dataset)
            client = MountpointS3Client("us-east-1", endpoint=endpoint, force_path_style=True)
            return sum(len(chunk) for uri in uris for chunk in client.get_object(BUCKET, uri.split("/", 3)[3]))

        readers = [
            ("plain read of the files (ceiling)", disk),
            ("hytrain Dir (folder)", hytrain(str(folder))),
            ("hytrain S3", hytrain(f"s3://{BUCKET}/{PREFIX}", *s3_args)),
            *[(f"hytrain S3 {extra}", hytrain(f"s3://{BUCKET}/{PREFIX}", *s3_args, *extra.split()))
              for extra in args.hytrain_s3],
            ("boto3, 1 thread", boto3_sequential),
            (f"boto3, {args.threads} threads", boto3_threads),
            (connector, s3torch),
        ]
        results = []
        for name, fn in readers:
            median, best, got = timed(args.runs, fn)
            if got != total:
                raise SystemExit(f"{name} read {got} bytes, expected {total}")
            results.append({"reader": name, "seconds": median, "best_seconds": best,
                            "mb_per_s": total / median / 1e6, "samples_per_s": samples / median})
            print(f"  {name}: {total / median / 1e6:.0f} MB/s", flush=True)

        by = {r["reader"]: r["mb_per_s"] for r in results}
        peer, boto = by[connector], by[f"boto3, {args.threads} threads"]
        print()
        print(f"| reader | MB/s | samples/s | vs {connector} | vs boto3 {args.threads} threads |")
        print("|---|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['reader']} | {r['mb_per_s']:.0f} | {r['samples_per_s']:.0f} | "
                  f"{r['mb_per_s'] / peer:.2f}x | {r['mb_per_s'] / boto:.2f}x |")
        print(f"\nmedian of {args.runs} runs each; {len(files)} shards x {args.shard_mib} MiB, {samples} samples of "
              f"{SAMPLE_BYTES} bytes; samples/s = shards' samples / seconds (bytes only, no decoding)")
        if args.json:
            args.json.write_text(json.dumps({"shards": len(files), "bytes": total, "samples": samples,
                                             "results": results}, indent=2))
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
