"""Exports one of python/examples for the test suite, once: AOTInductor compiles take a minute or more, so the folder
is cached under <repo>/.cache/exported/<example>-<key>, where the key hashes the export package's sources, the
example's source, the export arguments and torch's version. Prints the folder's path.

    python python/tests/cached_export.py digits_cnn
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON_DIR = REPO / "python"
CACHE = REPO / ".cache" / "exported"

#: name -> (factory, export arguments)
EXAMPLES = {
    "digits_cnn": ("examples/digits_cnn.py:DigitsCnn", ["--input-shape", "1,8,8"]),
    # The suite's language model (examples/gpt.py's defaults: vocabulary 64, context 32, 2 layers of 2 heads, 32
    # wide): sequences of 32 token ids, targets the next 32.
    "gpt": ("examples/gpt.py:gpt", ["--input-shape", "32", "--input-dtype", "int64"]),
    # The step bench's (benches/step_time.rs); the float64 twin's compile would double a minutes-long export.
    "resnet18_cifar": ("examples/resnet18_cifar.py:build", ["--input-shape", "3,32,32", "--check", "none"]),
    # The step bench's GPT: vocabulary 512, context 128, 4 layers of 4 heads, 128 wide (0.9M parameters). The suite's
    # `gpt` proves the float64 twin of the same code at a smaller size.
    "gpt_bench": ("examples/gpt.py:gpt", ["--input-shape", "128", "--input-dtype", "int64", "--model-kwargs",
                                          '{"vocab_size": 512, "block_size": 128, "n_layer": 4, "n_head": 4, '
                                          '"n_embd": 128}', "--check", "none"]),
}


def key(name: str) -> str:
    import torch

    factory, args = EXAMPLES[name]
    h = hashlib.sha256()
    for file in sorted((PYTHON_DIR / "hytrain_export").glob("*.py")) + [PYTHON_DIR / factory.split(":")[0]]:
        h.update(file.name.encode() + b"\0" + file.read_bytes())
    h.update(repr((factory, args, torch.__version__)).encode())
    return h.hexdigest()[:16]


def cached(name: str) -> Path:
    if name not in EXAMPLES:
        sys.exit(f"unknown example {name}; known: {', '.join(EXAMPLES)}")
    folder = CACHE / f"{name}-{key(name)}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        # One export at a time, whichever test process asks first; the others then find it done.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "hytrain-model.json").is_file():
            return folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        factory, args = EXAMPLES[name]
        env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
        done = subprocess.run([sys.executable, "-m", "hytrain_export", factory, *args, "--out", str(partial)],
                              cwd=PYTHON_DIR, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"exporting {name} failed:\n{done.stdout}{done.stderr}")
        os.replace(partial, folder)
    return folder


if __name__ == "__main__":
    print(cached(sys.argv[1]))
