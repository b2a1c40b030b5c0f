"""PyTorch side of the optimizer parity test: torch.optim.SGD (weight decay with dampening, weight decay with
Nesterov) and torch.optim.AdamW, each for 6 steps from the same initial parameters with the same given gradients,
on torch.optim's default (single-tensor on the CPU) path and with fused=True (`<name>_fused`). Writes the
parameters, the gradients and each optimizer's final parameters to the safetensors file named on the command
line."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402

LR = 0.05
STEPS = 6
CONFIGS = {
    "sgd_dampening": lambda ps, fused: torch.optim.SGD(
        ps, lr=LR, momentum=0.9, dampening=0.3, weight_decay=1e-2, fused=fused
    ),
    "sgd_nesterov": lambda ps, fused: torch.optim.SGD(
        ps, lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-2, fused=fused
    ),
    "adamw": lambda ps, fused: torch.optim.AdamW(
        ps, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=fused
    ),
}


def main(out):
    torch.set_num_threads(1)
    torch.manual_seed(3)
    init = {"a": torch.randn(37, 29), "b": torch.randn(101)}
    grads = [{k: torch.randn_like(v) * 10 ** (i % 3 - 1) for k, v in init.items()} for i in range(STEPS)]
    saved = {f"init.{k}": v for k, v in init.items()}
    for i, g in enumerate(grads):
        saved.update({f"grad{i}.{k}": v for k, v in g.items()})
    for name, make in CONFIGS.items():
        for fused in (False, True):
            params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
            # fused=None is torch.optim's default: the single-tensor loop on the CPU.
            opt = make(list(params.values()), True if fused else None)
            for g in grads:
                for k, p in params.items():
                    p.grad = g[k].clone()
                opt.step()
            key = f"{name}_fused" if fused else name
            saved.update({f"{key}.{k}": p.detach() for k, p in params.items()})
    safetensors_io.save(saved, out)
    print(f"torch {torch.__version__}: {len(CONFIGS)} optimizers, default and fused, {STEPS} steps")


if __name__ == "__main__":
    main(sys.argv[1])
