#!/bin/sh
# hytrain's GPU check, packed by `cargo xtask gpu-check`. Runs on a machine with an NVIDIA GPU and PyTorch (default
# /opt/torch/.venv; PYTHON=/path/to/python for another); needs no Rust and no network.
#   1. hytrain-gpu-check: every kernel of kernels/ against its CPU reference, NCCL allreduce at world size 1, timings
#   2. torch_peer.py: hytrain's optimizer results against torch.optim on the GPU, PyTorch's timings beside hytrain's
# Findings go to $OUT (or ./out beside this script): kernels.json and torch_peer.json.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-/opt/torch/.venv/bin/python}
OUT=${OUT:-$HERE/out}
mkdir -p "$OUT"
DUMP=$(mktemp -d)
trap 'rm -rf "$DUMP"' EXIT

# hytrain-cuda finds NCCL and NVRTC in pip's nvidia/ folders beside the libtorch that LIBTORCH names.
TORCH=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))') || {
    echo "gpu-check: $PYTHON cannot import torch; set PYTHON to a Python with PyTorch" >&2
    exit 2
}
nvidia-smi -L 2>/dev/null || echo "gpu-check: nvidia-smi is not available"
echo "gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ) torch at $TORCH"

echo "gpu-check: [1/2] hytrain kernels and NCCL"
LIBTORCH=$TORCH timeout 300 "$HERE/hytrain-gpu-check" --json "$OUT/kernels.json" --dump "$DUMP"
hytrain=$?
echo "gpu-check: [2/2] PyTorch peer"
timeout 300 "$PYTHON" "$HERE/torch_peer.py" --dump "$DUMP" --json "$OUT/torch_peer.json"
peer=$?
echo "gpu-check: hytrain-gpu-check exited $hytrain, torch_peer.py exited $peer; findings in $OUT"
[ "$hytrain" -eq 0 ] && [ "$peer" -eq 0 ]
