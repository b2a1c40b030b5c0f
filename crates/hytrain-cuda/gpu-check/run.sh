#!/bin/sh
# hytrain's GPU check, packed by `cargo xtask gpu-check`. Runs on a machine with an NVIDIA GPU and PyTorch (default
# /opt/torch/.venv; PYTHON=/path/to/python for another) with torchvision and safetensors; needs no Rust and no
# network.
#   0. in the background from the start, beside steps 1 and 2 (on 8 of the CPU cores): python -m hytrain_export
#      (packed under python/) exports python/examples/resnet18_cifar.py, torchvision's ResNet-18, with
#      --device cuda: AOTInductor compiles its training step and forward pass for this GPU
#   1. hytrain-gpu-check: every kernel of kernels/ against its CPU reference, NCCL allreduce at world size 1, timings
#   2. torch_peer.py --dump: hytrain's optimizer results against torch.optim on the GPU, PyTorch's timings beside
#   3. hytrain train --device cuda (NCCL at world size 1) on LeNet and ResNet-18 over a random CIFAR-10-shaped
#      dataset made here, and torch_peer.py --train: PyTorch eager on the same model, batch, optimizer and data;
#      and LeNet's weights after the same steps with gradient allreduces overlapped with backward (on the side
#      stream, the default) and after it (--overlap false), compared by torch_peer.py --compare-weights
#   4. the exported ResNet-18 of step 0 trained by hytrain train --device cuda for 4 SGD steps on a dataset of
#      one batch of 16 (so every step sees the same samples whatever the shuffle), and by PyTorch eager from the
#      same initial weights on the same batch in float32 and in float64 (torch_peer.py --train-exported), TF32 off
#      (NVIDIA_TF32_OVERRIDE=0); hytrain's final weights and losses must be within 1e-2 of PyTorch float32's (of
#      how far training moved each tensor), or 5 times PyTorch float32's own distance from float64: PASS or FAIL
# Findings go to $OUT (or ./out beside this script): kernels.json, torch_peer.json, train_lenet.json,
# train_resnet18.json, overlap.json, exported.json, summary.txt, and each step's log. Every step has a timeout; all
# of them together (the export counted beside steps 1 and 2) stay under 8 minutes (expected on an H200: about 4,
# most of it the export).
#
# GPU_CHECK_REHEARSAL=1 runs steps 0, 3 and 4 only, on the CPU with a few steps and --device cpu (the export's
# timeout five times longer, for a CPU compile on a small machine), and checks that an export for cuda without a
# GPU stops at once, saying so: what `cargo xtask gpu-check` runs here to prove the packed binary, its libraries,
# the packed exporter and these command lines before the pack goes to the GPU machine.
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
    LENET="16 2 4" RESNET="4 1 2" OVERLAP_STEPS=4 EXPORTED="16 4"
    # Every timeout S times longer: the rehearsal shares a small CPU with builds, and compiles the export for it.
    S=4
else
    DEVICE=cuda RECORDS=50000 OVERLAP_STEPS=50 S=1
    # batch, warm-up steps, timed steps: sized so both fit in one epoch of RECORDS (no epoch restart inside the
    # timed steps) and take seconds on an H200 (LeNet about 1-3 ms a step, ResNet-18 about 20-40 ms).
    LENET="128 30 360" RESNET="128 20 200"
    # The exported model's batch (the whole of its dataset) and SGD steps: few of each, since float32 rounding
    # takes any training on a few random samples away from float64 faster with each step and with larger batches
    # (torch_peer.py's EXPORTED_FACTOR), and the comparison can only be as sharp as that.
    EXPORTED="16 4"
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

# export_model TIMEOUT: step 0, run in the background; writes "EXIT_CODE SECONDS" to $WORK/export.status.
EXPORTED_DIR=$WORK/resnet18_export
FACTORY=$HERE/python/examples/resnet18_cifar.py:build
export_model() {
    limit=$(($1 * S)) started=$(date +%s)
    # --check none: the float64 twin would double the compile; the comparison with PyTorch in step 4 checks the
    # compiled step instead. The example batch is the batch step 4 trains with; the exporter still runs the package
    # at a second batch size, so a package that lost its dynamic batch on the GPU fails here, saying so.
    # shellcheck disable=SC2086 # $EXPORTED is two words
    set -- $EXPORTED
    PYTHONPATH=$HERE/python TORCHINDUCTOR_COMPILE_THREADS=8 timeout -k 10 "$limit" "$PYTHON" -m hytrain_export \
        "$FACTORY" --input-shape 3,32,32 --device "$DEVICE" --check none --example-batch "$1" \
        --out "$EXPORTED_DIR" >"$OUT/export.log" 2>&1
    echo "$? $(($(date +%s) - started))" >"$WORK/export.status"
}
echo "gpu-check: [0/4] exporting the ResNet-18 example for $DEVICE (in the background; log in $OUT/export.log)"
export_model 180 &
EXPORT_PID=$!
# wait_for_export: the end of step 0; sets EXPORT_OK.
wait_for_export() {
    wait "$EXPORT_PID"
    # shellcheck disable=SC2046 # two words: exit code, seconds
    set -- $(cat "$WORK/export.status" 2>/dev/null || echo "? ?")
    if [ "$1" = 0 ]; then
        EXPORT_OK=1
        say "export: resnet18_cifar.py:build for $DEVICE in $2 s: $(grep '^hytrain_export: wrote' "$OUT/export.log")"
    else
        EXPORT_OK=0
        status=1
        say "export: FAILED (exit $1 after $2 s; 124 is the timeout): $(tail -n 3 "$OUT/export.log" | tr '\n' ' ')"
    fi
}

if [ "$DEVICE" = cuda ]; then
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L | tee -a "$SUMMARY"
    else
        say "nvidia-smi is not available"
    fi
    echo "gpu-check: [1/4] hytrain kernels and NCCL"
    LIBTORCH=$TORCH timeout -k 10 75 "$HERE/hytrain-gpu-check" --json "$OUT/kernels.json" --dump "$WORK"
    code=$?
    say "kernels: hytrain-gpu-check exited $code"
    [ "$code" -eq 0 ] || status=1
    echo "gpu-check: [2/4] PyTorch peer of the kernels"
    timeout -k 10 60 "$PYTHON" "$HERE/torch_peer.py" --dump "$WORK" --json "$OUT/torch_peer.json"
    code=$?
    say "kernels: torch_peer.py exited $code"
    [ "$code" -eq 0 ] || status=1
fi

wait_for_export
echo "gpu-check: [3/4] training: hytrain train --device $DEVICE beside PyTorch eager"
DATA=$WORK/cifar-10-batches-bin
timeout -k 10 $((20 * S)) "$PYTHON" "$HERE/torch_peer.py" --write-cifar "$DATA" --records "$RECORDS" || {
    say "train: cannot write the dataset"
    exit 1
}

# train MODEL BATCH WARMUP STEPS HYTRAIN_TIMEOUT PEER_TIMEOUT
train() {
    model=$1 batch=$2 warmup=$3 steps=$4
    dir=$WORK/$model
    # One metrics window per WARMUP steps: the first is the warm-up, the rest are timed.
    timeout -k 10 $(($5 * S)) "$HYTRAIN" train --device "$DEVICE" --model "$model" --data "$DATA" --validation none \
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
    timeout -k 10 $(($6 * S)) "$PYTHON" "$HERE/torch_peer.py" --train "$model" --device "$DEVICE" --data "$DATA" \
        --batch "$batch" --warmup "$warmup" --steps "$steps" $metrics --json "$OUT/train_$model.json" \
        >"$WORK/peer.txt" 2>&1
    code=$?
    cat "$WORK/peer.txt"
    grep '^train: ' "$WORK/peer.txt" >>"$WORK/ratios.txt"
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
        timeout -k 10 $(($1 * S)) "$HYTRAIN" train --device "$DEVICE" --model lenet --data "$DATA" --validation none \
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
    timeout -k 10 $(($2 * S)) "$PYTHON" "$HERE/torch_peer.py" --compare-weights "$WORK/overlap_true/model/model.safetensors" \
        "$WORK/overlap_false/model/model.safetensors" --json "$OUT/overlap.json" >"$WORK/compare.txt" 2>&1
    code=$?
    say "$(tail -n 1 "$WORK/compare.txt")"
    [ "$code" -eq 0 ] || status=1
}

# exported_check HYTRAIN_TIMEOUT PEER_TIMEOUT: step 4.
exported_check() {
    echo "gpu-check: [4/4] the exported ResNet-18: hytrain train --device $DEVICE beside PyTorch eager"
    if [ "$EXPORT_OK" != 1 ]; then
        say "exported: FAIL: not trained, the export failed (above)"
        status=1
        return
    fi
    # shellcheck disable=SC2086 # $EXPORTED is two words
    set -- $EXPORTED "$1" "$2"
    batch=$1 steps=$2
    # One batch is the whole dataset: hytrain's shuffle then only reorders samples inside the batch, so both sides
    # take the same samples at every step (the first records of the dataset made for step 3).
    small=$WORK/exported/cifar-10-batches-bin
    mkdir -p "$small"
    head -c $((batch * 3073)) "$DATA/data_batch_1.bin" >"$small/data_batch_1.bin"
    # TF32 off on both sides (cuBLAS and cuDNN read this), so the comparison is of float32 arithmetic.
    NVIDIA_TF32_OVERRIDE=0 timeout -k 10 $(($3 * S)) "$HYTRAIN" train --device "$DEVICE" --model "$EXPORTED_DIR" \
        --data "$small" --validation none --num-classes 10 --batch-size "$batch" --max-steps "$steps" \
        --log-interval 1 --lr 0.01 --momentum 0.5 --no-resume --checkpoint-dir none \
        --model-dir "$WORK/exported/model" --output-dir "$WORK/exported/output" >"$OUT/train_exported.log" 2>&1
    code=$?
    cp "$WORK/exported/output/metrics.jsonl" "$OUT/train_exported_metrics.jsonl" 2>/dev/null
    if [ "$code" -ne 0 ]; then
        say "exported: FAIL: hytrain train exited $code: $(tail -n 1 "$OUT/train_exported.log")"
        status=1
        return
    fi
    NVIDIA_TF32_OVERRIDE=0 PYTHONPATH=$HERE/python timeout -k 10 $(($4 * S)) "$PYTHON" "$HERE/torch_peer.py" \
        --train-exported "$EXPORTED_DIR" --factory "$FACTORY" --device "$DEVICE" --data "$small" --batch "$batch" \
        --steps "$steps" --hytrain-model "$WORK/exported/model" \
        --hytrain-metrics "$WORK/exported/output/metrics.jsonl" --json "$OUT/exported.json" >"$WORK/peer.txt" 2>&1
    code=$?
    cat "$WORK/peer.txt"
    grep '^exported: ' "$WORK/peer.txt" >>"$SUMMARY"
    if [ "$code" -ne 0 ]; then
        grep -q '^exported: ' "$WORK/peer.txt" ||
            say "exported: FAIL: torch_peer.py --train-exported exited $code: $(tail -n 1 "$WORK/peer.txt")"
        status=1
    fi
}

# shellcheck disable=SC2086 # LENET and RESNET are three words each
train lenet $LENET 30 25
overlap_check 20 15
# shellcheck disable=SC2086
train resnet18 $RESNET 50 35
exported_check 35 40

if [ "${GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
    # What the GPU machine asks first: does the packed binary load this torch's libtorch_cuda.so? (Without a GPU
    # it then stops, saying why.)
    timeout -k 10 30 "$HYTRAIN" train --device cuda --model lenet --data "$DATA" --validation none --num-classes 10 \
        --max-steps 1 --batch-size 4 --no-resume --checkpoint-dir none --model-dir "$WORK/probe/model" \
        --output-dir "$WORK/probe/output" >"$OUT/cuda_probe.log" 2>&1
    say "rehearsal: --device cuda exited $?: $(tail -n 1 "$OUT/cuda_probe.log")"
    # And the exporter asked for cuda where no GPU is visible: it must stop at once, saying why.
    CUDA_VISIBLE_DEVICES= PYTHONPATH=$HERE/python timeout -k 10 60 "$PYTHON" -m hytrain_export "$FACTORY" \
        --input-shape 3,32,32 --device cuda --out "$WORK/nogpu" >"$OUT/export_nogpu.log" 2>&1
    say "rehearsal: export --device cuda without a GPU exited $?: $(tail -n 1 "$OUT/export_nogpu.log")"
fi

# The ratio table: one row per model that step 3 trained, whichever failed.
{
    echo "gpu-check: samples/s of hytrain train against PyTorch eager, same model, batch, data and SGD (lr 0.01,"
    echo "gpu-check: momentum 0.5), float32, one process on $DEVICE, after the warm-up steps:"
    printf 'train: %-9s %5s  %-6s %13s %9s %9s\n' model batch device "PyTorch eager" hytrain ratio
    cat "$WORK/ratios.txt" 2>/dev/null
} >>"$SUMMARY"

echo
echo "gpu-check: summary ($OUT/summary.txt)"
cat "$SUMMARY"
[ "$status" -eq 0 ] && echo "gpu-check: passed" || echo "gpu-check: FAILED (see the logs in $OUT)"
exit "$status"
