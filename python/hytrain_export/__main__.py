"""`python -m hytrain_export MODEL --input-shape C,H,W --out DIR`: see `python -m hytrain_export --help`."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from ._export import BUILTIN_LOSSES, DTYPES, ExportError, ExportOptions, export, load_factory


def _shape(text: str) -> list[int]:
    if text.strip() in ("", "scalar"):
        return []
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not comma-separated whole numbers, like 3,32,32") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}': every dimension must be at least 1")
    return dims


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hytrain_export",
        description="Export a PyTorch model (its training step and forward pass, compiled with AOTInductor) into "
        "a folder that `hytrain train --model FOLDER` trains without Python.",
    )
    p.add_argument("model", help="FILE.py:NAME or MODULE:NAME: a class or function that returns the nn.Module")
    p.add_argument("--input-shape", type=_shape, required=True, help="one sample's input shape, e.g. 3,32,32")
    p.add_argument("--input-dtype", default="float32", choices=sorted(DTYPES), help="default float32")
    p.add_argument("--loss", default="cross_entropy",
                   help=f"{' or '.join(BUILTIN_LOSSES)}, or FILE.py:FUNCTION / MODULE:FUNCTION taking "
                   "(output, target) and returning a scalar; default cross_entropy")
    p.add_argument("--target-shape", type=_shape, help="your own loss only: one sample's target shape (default: "
                   "one class label)")
    p.add_argument("--target-dtype", choices=sorted(DTYPES), help="your own loss only: default int64")
    p.add_argument("--model-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the packages run; cuda needs a GPU now (default cpu)")
    p.add_argument("--example-batch", type=int, default=8, help="batch size traced with (default 8)")
    p.add_argument("--max-batch", type=int, default=4096, help="largest batch the packages take (default 4096)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative error of the compiled step against float64 accepted (default 1e-4)")
    p.add_argument("--check", default="float64", choices=["float64", "none"],
                   help="float64 (default): also compile the step in float64 and require it to equal eager "
                   "float64, which proves the compiled code computes the model's gradients; none: skip (faster)")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the check's batches")
    p.add_argument("--out", required=True, type=Path, help="the folder to write")
    p.add_argument("--verbose", action="store_true", help="show the full traceback when export fails")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    started = time.monotonic()
    # torch's own deprecation notices about its internals say nothing to the user of this command.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        import torch

        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            raise ExportError(f"--model-kwargs is not JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise ExportError("--model-kwargs must be a JSON object, like '{\"num_classes\": 10}'")
        torch.manual_seed(args.seed)
        factory = load_factory(args.model)
        file_part = args.model.rpartition(":")[0]
        user_file = Path(file_part) if file_part.endswith(".py") else None
        try:
            model = factory(**kwargs)
        except Exception as e:
            from ._export import _paragraph

            raise ExportError(_paragraph(f"building the model with {args.model}", e, user_file)) from e
        if not isinstance(model, torch.nn.Module):
            raise ExportError(f"{args.model} returned {type(model).__name__}, not a torch.nn.Module")
        options = ExportOptions(
            input_shape=args.input_shape,
            out=args.out,
            input_dtype=args.input_dtype,
            loss=args.loss,
            target_shape=args.target_shape,
            target_dtype=args.target_dtype,
            device=args.device,
            example_batch=args.example_batch,
            max_batch=args.max_batch,
            tolerance=args.tolerance,
            check=args.check,
            seed=args.seed,
            source=args.model,
        )
        metadata = export(model, options, user_file=user_file)
    except ExportError as e:
        if args.verbose and e.__cause__ is not None:
            import traceback

            traceback.print_exception(e.__cause__)
        print(f"hytrain_export: error: {e}", file=sys.stderr)
        return 1
    check = metadata["check"]
    print(
        f"hytrain_export: wrote {args.out} ({len(metadata['parameters'])} parameters, {len(metadata['buffers'])} "
        f"buffers, batch 1..{args.max_batch}, {metadata['device']}) in {time.monotonic() - started:.0f} s; "
        f"compiled step vs float64: {check['max_error_vs_float64']:.1e} (eager float32: "
        f"{check['eager_max_error_vs_float64']:.1e}); "
        + (f"float64 twin vs eager float64: {check['float64_twin_max_error']:.1e}" if "float64_twin_max_error" in check
           else "float64 twin not checked")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
