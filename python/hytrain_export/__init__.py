"""Exports a PyTorch model once, with Python, into a folder that `hytrain train --model FOLDER` trains with no Python.

The folder holds:

- ``train_step.pt2``: an AOTInductor package of the whole training step,
  ``(input, target, *parameters, *buffers) -> (loss, *gradients, *new_buffers)``, for any batch size from 1 to
  ``--max-batch``. hytrain owns the parameters and passes them in each step, averages the gradients over ranks and
  steps its own optimizer, so everything it does for built-in models serves exported ones unchanged.
- ``forward.pt2``: the eval-mode forward pass, ``(input, *parameters, *buffers) -> output``, for validation and
  inference, also for any batch size.
- ``weights.safetensors``: the initial parameters and buffers under the module's own ``state_dict`` names.
- ``hytrain-model.json``: names, shapes and dtypes, the input, output and target, the loss, the torch version, the
  device, the export options, and how far the compiled step's numbers were from a float64 reference.

Usage::

    python -m hytrain_export examples/resnet18_cifar.py:build --input-shape 3,32,32 --out resnet18-export
    hytrain train --model resnet18-export --data /data/cifar10 ...

or from Python: ``hytrain_export.export(module, input_shape=(3, 32, 32), out="resnet18-export")``.
"""

from __future__ import annotations

from ._export import ExportError, ExportOptions, export, load_factory

__all__ = ["ExportError", "ExportOptions", "export", "load_factory"]
__version__ = "0.1.0"
