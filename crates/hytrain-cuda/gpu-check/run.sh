#!/bin/sh
# hytrain's GPU check, packed by `cargo xtask gpu-check`. Runs on a machine with an NVIDIA GPU and PyTorch (default
# /opt/torch/.venv; PYTHON=/path/to/python for another); needs no Rust and no network.
#   1. hytrain-gpu-check: every kernel of kernels/ against its CPU reference, NCCL allreduce at world size 1, timings
#   2. torch_peer.py --dump: hytrain's optimizer results against torch.optim on the GPU, PyTorch's timings beside
#   3. hytrain train --device cuda (NCCL at world size 1) on LeNet and ResNet-18 over a random CIFAR-10-shaped
#      dataset made here, and torch_peer.py --train: PyTorch eager on the same model, batch, optimizer and data;
#      and LeNet's weights after the same steps with gradient allreduces overlapped with backward (on the side
#      stream, the default) and after it (--overlap false), compared by torch_peer.py --compare-weights
# Findings go to $OUT (or ./out beside this script): kernels.json, torch_peer.json, train_lenet.json,
# train_resnet18.json, overlap.json, summary.txt, and each step's log. Every step has a timeout; all of them together stay under
# 8 minutes (expected on an H200: about 2).
#
# GPU_CHECK_REHEARSAL=1 runs part 3 only, on the CPU with a few steps: what `cargo xtask gpu-check` runs here to
# prove the packed binary, its libraries and these command lines before the pack goes to the GPU machine.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-/opt/torch/.venv/bin/python}
HYTRAIN=${HYTRAIN:-$HERE/hytrain}
OUT=${OUT:-$HERE/out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() {
    echo "gpu-check: $*" | tee -a "$SUMMARY"
}

if [ "${GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
    DEVICE=cpu RECORDS=600
    LENET="16 2 4" RESNET="4 1 2" OVERLAP_STEPS=4
else
    DEVICE=cuda RECORDS=50000 OVERLAP_STEPS=50
    # batch, warm-up steps, timed steps: sized so both fit in one epoch of RECORDS (no epoch restart inside the
    # timed steps) and take seconds on an H200 (LeNet about 1-3 ms a step, ResNet-18 about 20-40 ms).
    LENET="128 30 360" RESNET="128 20 200"
fi

# hytrain was linked against the CPU libtorch `cargo xtask setup` builds and needs libtorch_cpu.so and libc10.so
# (its runpath names that folder on the build machine, absent here): it takes this torch's own from torch/lib, and
# loads libtorch_cuda.so from beside them itself when asked for CUDA. torch's libraries find their CUDA, cuDNN and
# NCCL in site-packages/nvidia through their own RPATH.
TORCH=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))') || {
    echo "gpu-check: $PYTHON cannot import torch; set PYTHON to a Python with PyTorch" >&2
    exit 2
}
LD_LIBRARY_PATH=$TORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
say "$(date -u +%Y-%m-%dT%H:%M:%SZ) torch at $TORCH, device $DEVICE"
status=0

if [ "$DEVICE" = cuda ]; then
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L | tee -a "$SUMMARY"
    else
        say "nvidia-smi is not available"
    fi
    echo "gpu-check: [1/3] hytrain kernels and NCCL"
    LIBTORCH=$TORCH timeout -k 10 75 "$HERE/hytrain-gpu-check" --json "$OUT/kernels.json" --dump "$WORK"
    code=$?
    say "kernels: hytrain-gpu-check exited $code"
    [ "$code" -eq 0 ] || status=1
    echo "gpu-check: [2/3] PyTorch peer of the kernels"
    timeout -k 10 60 "$PYTHON" "$HERE/torch_peer.py" --dump "$WORK" --json "$OUT/torch_peer.json"
    code=$?
    say "kernels: torch_peer.py exited $code"
    [ "$code" -eq 0 ] || status=1
fi

echo "gpu-check: [3/3] training: hytrain train --device $DEVICE beside PyTorch eager"
DATA=$WORK/cifar-10-batches-bin
timeout -k 10 30 "$PYTHON" "$HERE/torch_peer.py" --write-cifar "$DATA" --records "$RECORDS" || {
    say "train: cannot write the dataset"
    exit 1
}

# train MODEL BATCH WARMUP STEPS HYTRAIN_TIMEOUT PEER_TIMEOUT
train() {
    model=$1 batch=$2 warmup=$3 steps=$4
    dir=$WORK/$model
    # One metrics window per WARMUP steps: the first is the warm-up, the rest are timed.
    timeout -k 10 "$5" "$HYTRAIN" train --device "$DEVICE" --model "$model" --data "$DATA" --validation none \
        --num-classes 10 --batch-size "$batch" --max-steps $((warmup + steps)) --log-interval "$warmup" --lr 0.01 \
        --momentum 0.5 --no-resume --checkpoint-dir none --model-dir "$dir/model" --output-dir "$dir/output" \
        >"$OUT/train_$model.log" 2>&1
    code=$?
    cp "$dir/output/metrics.jsonl" "$OUT/train_${model}_metrics.jsonl" 2>/dev/null
    if [ "$code" -ne 0 ]; then
        say "train: $model: hytrain train exited $code: $(tail -n 1 "$OUT/train_$model.log")"
        status=1
        metrics=
    else
        metrics="--hytrain-metrics $dir/output/metrics.jsonl"
    fi
    # shellcheck disable=SC2086 # $metrics is empty or two words
    timeout -k 10 "$6" "$PYTHON" "$HERE/torch_peer.py" --train "$model" --device "$DEVICE" --data "$DATA" \
        --batch "$batch" --warmup "$warmup" --steps "$steps" $metrics --json "$OUT/train_$model.json" \
        >"$WORK/peer.txt" 2>&1
    code=$?
    cat "$WORK/peer.txt"
    grep '^train: ' "$WORK/peer.txt" >>"$SUMMARY"
    if [ "$code" -ne 0 ]; then
        say "train: $model: torch_peer.py --train exited $code"
        status=1
    fi
}
# overlap_check RUN_TIMEOUT COMPARE_TIMEOUT: LeNet trained twice from the same seed on the same batches, gradient allreduces overlapped with
# backward and after it; the weights must agree (bit for bit, or within cuDNN's own run-to-run noise).
overlap_check() {
    for overlap in true false; do
        dir=$WORK/overlap_$overlap
        timeout -k 10 "$1" "$HYTRAIN" train --device "$DEVICE" --model lenet --data "$DATA" --validation none \
            --num-classes 10 --batch-size 64 --max-steps "$OVERLAP_STEPS" --lr 0.01 --momentum 0.5 --overlap "$overlap" \
            --no-resume --checkpoint-dir none --model-dir "$dir/model" --output-dir "$dir/output" \
            >"$OUT/overlap_$overlap.log" 2>&1
        code=$?
        if [ "$code" -ne 0 ]; then
            say "overlap: --overlap $overlap exited $code: $(tail -n 1 "$OUT/overlap_$overlap.log")"
            status=1
            return
        fi
    done
    timeout -k 10 "$2" "$PYTHON" "$HERE/torch_peer.py" --compare-weights "$WORK/overlap_true/model/model.safetensors" \
        "$WORK/overlap_false/model/model.safetensors" --json "$OUT/overlap.json" >"$WORK/compare.txt" 2>&1
    code=$?
    say "$(tail -n 1 "$WORK/compare.txt")"
    [ "$code" -eq 0 ] || status=1
}

# shellcheck disable=SC2086 # LENET and RESNET are three words each
train lenet $LENET 45 35
overlap_check 20 15
# shellcheck disable=SC2086
train resnet18 $RESNET 75 45

if [ "${GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
    # What the GPU machine asks first: does the packed binary load this torch's libtorch_cuda.so? (Without a GPU
    # it then stops, saying why.)
    timeout -k 10 30 "$HYTRAIN" train --device cuda --model lenet --data "$DATA" --validation none --num-classes 10 \
        --max-steps 1 --batch-size 4 --no-resume --checkpoint-dir none --model-dir "$WORK/probe/model" \
        --output-dir "$WORK/probe/output" >"$OUT/cuda_probe.log" 2>&1
    say "rehearsal: --device cuda exited $?: $(tail -n 1 "$OUT/cuda_probe.log")"
fi

echo
echo "gpu-check: summary ($OUT/summary.txt)"
cat "$SUMMARY"
[ "$status" -eq 0 ] && echo "gpu-check: passed" || echo "gpu-check: FAILED (see the logs in $OUT)"
exit "$status"
