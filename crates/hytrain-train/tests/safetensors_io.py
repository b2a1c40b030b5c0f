"""Minimal safetensors reader/writer for the parity scripts, so they need only torch and numpy."""
import json
import struct

import numpy as np
import torch

_DTYPES = {torch.float32: ("F32", np.float32), torch.float64: ("F64", np.float64), torch.int64: ("I64", np.int64)}
_BY_NAME = {name: (dt, npt) for dt, (name, npt) in _DTYPES.items()}


def save(tensors, path):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype][0], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, npt = _BY_NAME[info["dtype"]]
        begin, end = info["data_offsets"]
        arr = np.frombuffer(body[begin:end], dtype=npt).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out
