"""The export: trace the functional training step and the forward pass, compile both with AOTInductor, check the
compiled step against a float64 reference, write the model folder."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ._inductor_patches import dynamic_batch, float64_attention

#: The torch release whose Inductor internals `_inductor_patches` was written for, and that hytrain links against.
TORCH_RELEASE = "2.11"
FORMAT = "hytrain-exported-model"
FORMAT_VERSION = 1
METADATA = "hytrain-model.json"
TRAIN_STEP = "train_step.pt2"
FORWARD = "forward.pt2"
WEIGHTS = "weights.safetensors"

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
BUILTIN_LOSSES = ("cross_entropy", "mse")


class ExportError(Exception):
    """An export that cannot be done, with one paragraph saying what failed and what to change."""


@dataclasses.dataclass
class ExportOptions:
    """What to export and how; the command line's flags (`python -m hytrain_export --help`)."""

    #: One sample's input shape, without the batch dimension.
    input_shape: Sequence[int]
    #: The folder to write.
    out: str | os.PathLike[str]
    input_dtype: str = "float32"
    #: `cross_entropy` (integer class targets), `mse` (float targets shaped like the output), or the user's own
    #: `fn(output, target) -> scalar` as `file.py:fn` or `module:fn`.
    loss: str = "cross_entropy"
    #: For the user's own loss: one sample's target shape and dtype (default: one integer class label).
    target_shape: Sequence[int] | None = None
    target_dtype: str | None = None
    device: str = "cpu"
    #: The batch size the example batch is traced with; packages accept any batch from 1 to `max_batch`.
    example_batch: int = 8
    max_batch: int = 4096
    #: Above this error against float64 (see `_compare`), the float32 step's numbers are warned about.
    tolerance: float = 1e-4
    #: `float64`: also compile the step in float64 and require it to equal eager float64 (see `_check`); `none`.
    check: str = "float64"
    seed: int = 0
    #: Recorded in the metadata: where the model came from.
    source: str | None = None


def load_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """`path/to/file.py:name` or `package.module:name` -> the callable (a class or a function returning a module)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ExportError(
            f"model '{spec}' is not FILE.py:NAME or MODULE:NAME; name the function or class that builds the "
            "module, e.g. examples/resnet18_cifar.py:build"
        )
    if path.endswith(".py"):
        file = Path(path)
        if not file.is_file():
            raise ExportError(f"model file {file} does not exist")
        module_name = "_hytrain_user_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
        spec_ = importlib.util.spec_from_file_location(module_name, file)
        assert spec_ is not None and spec_.loader is not None
        module = importlib.util.module_from_spec(spec_)
        sys.modules[module_name] = module
        try:
            spec_.loader.exec_module(module)
        except Exception as e:
            raise ExportError(_paragraph(f"importing {file}", e, file)) from e
    else:
        try:
            module = importlib.import_module(path)
        except Exception as e:
            raise ExportError(_paragraph(f"importing module {path}", e, None)) from e
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise ExportError(f"{path} has no function or class named {name}")
    return factory


def _check_torch() -> None:
    if not torch.__version__.startswith(TORCH_RELEASE + "."):
        raise ExportError(
            f"this is torch {torch.__version__}, but hytrain_export (and the libtorch hytrain runs on) is for torch "
            f"{TORCH_RELEASE}: install torch=={TORCH_RELEASE}.* in the environment you export from"
        )


def _user_frame(e: BaseException, user_file: Path | None) -> str | None:
    """The innermost frame of the traceback that is the user's code rather than torch's or ours."""
    frames = traceback.extract_tb(e.__traceback__)
    here = str(Path(__file__).parent)
    torch_dir = str(Path(torch.__file__).parent)
    chosen = None
    for f in frames:
        if user_file is not None and Path(f.filename).resolve() == user_file.resolve():
            chosen = f
        elif user_file is None and not f.filename.startswith((here, torch_dir, sys.prefix, "<")):
            chosen = f
    if chosen is None:
        return None
    line = f" ({chosen.line.strip()})" if chosen.line else ""
    return f"{chosen.filename}:{chosen.lineno} in {chosen.name}{line}"


#: Advice for the ways tracing commonly fails, keyed by words of the exception's type or message.
_ADVICE = [
    (
        ("data-dependent", "GuardOnDataDependent", "item()", "tolist", "Could not guard on data-dependent"),
        "the model's Python code depends on tensor values (an `if` or loop on a tensor, `.item()`, `.tolist()`, "
        "`bool(tensor)`); the step is traced once for every batch, so compute it with tensor operations instead "
        "(`torch.where`, masks, `torch.cond`) or move it out of forward",
    ),
    (
        ("numpy", "__array__"),
        "the model converts tensors to numpy or Python values inside forward; keep forward in torch operations",
    ),
    (
        ("Constraints violated", "specialized", "dynamic_shapes"),
        "the model fixes the batch size somewhere (a `view(64, ...)` or a shape read from a global): use "
        "`x.shape[0]` or `-1` for the batch dimension",
    ),
]


def _paragraph(stage: str, e: BaseException, user_file: Path | None) -> str:
    """One paragraph: the stage that failed, where in the user's code, the first line of the error, what to do."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = _user_frame(e, user_file)
    text = f"{stage} failed"
    if where:
        text += f" at {where}"
    text += f": {type(e).__name__}: {first}"
    haystack = f"{type(e).__name__} {e}"
    for words, advice in _ADVICE:
        if any(w in haystack for w in words):
            text += f". Likely cause: {advice}"
            break
    return text + ". Run with --verbose for the full traceback."


def _loss_fn(options: ExportOptions, user_file: Path | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if options.loss == "cross_entropy":

        def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # [N, C] against [N], or per position: [N, T, C] against [N, T], averaged over every position.
            if output.dim() > 2:
                return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
            return F.cross_entropy(output, target)

        return cross_entropy
    if options.loss == "mse":
        return F.mse_loss
    if ":" not in options.loss:
        raise ExportError(
            f"loss '{options.loss}' is none of {', '.join(BUILTIN_LOSSES)}, nor FILE.py:FUNCTION or "
            "MODULE:FUNCTION naming your own loss(output, target) -> scalar"
        )
    return load_factory(options.loss)  # type: ignore[return-value]


def _example_target(options: ExportOptions, output: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    device = output.device
    if options.loss == "mse":
        return torch.randn(output.shape, generator=gen).to(device)
    if options.loss == "cross_entropy":
        if output.dim() < 2 or not output.is_floating_point():
            raise ExportError(
                f"cross_entropy needs the model to output class scores [batch, classes] (or [batch, ..., classes], "
                f"e.g. a language model's [batch, positions, vocabulary]), but it outputs shape "
                f"{list(output.shape)} {_dtype_name(output.dtype)}"
            )
        # The rule: one int64 class per output position, so the target is the output's shape without its last
        # dimension: [] per sample for a classifier, [T] for a language model's [T, vocabulary].
        want = list(output.shape[1:-1])
        if (options.target_shape is not None and list(options.target_shape) != want) or (
                options.target_dtype not in (None, "int64")):
            given = ",".join(map(str, options.target_shape or [])) or "scalar"
            raise ExportError(
                f"cross_entropy takes one int64 class index per output position: for outputs of shape "
                f"{list(output.shape[1:])} per sample its targets are {want or 'one label'} int64 per sample, but "
                f"--target-shape {given} --target-dtype {options.target_dtype or 'int64'} was given; leave both out "
                "(they are for your own loss) or give your own loss function"
            )
        return torch.randint(0, output.shape[-1], tuple(output.shape[:-1]), generator=gen).to(device)
    shape = [batch, *(options.target_shape or [])]
    dtype = DTYPES[options.target_dtype or "int64"]
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=dtype).to(device)
    classes = output.shape[-1] if output.dim() >= 2 else 2
    return torch.randint(0, classes, shape, generator=gen, dtype=dtype).to(device)


def _token_range(model: torch.nn.Module) -> int:
    """How many distinct values integer example inputs take: the smallest embedding's size, so every id is a valid
    row of every embedding (token ids of a language model, say); 2 for a model without embeddings."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return max(2, min(sizes, default=2))


def _example_input(options: ExportOptions, batch: int, gen: torch.Generator, token_range: int = 2) -> torch.Tensor:
    dtype = DTYPES[options.input_dtype]
    shape = [batch, *options.input_shape]
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=dtype).to(options.device)
    high = min(token_range, torch.iinfo(dtype).max + 1)
    return torch.randint(0, high, shape, generator=gen, dtype=dtype).to(options.device)


class _Step:
    """The functional training step and forward pass of `model`, over flat lists of parameters and buffers."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]):
        self.model = model
        self.loss_fn = loss_fn
        # named_parameters() lists a tied parameter once; the state_dict lists it under every name (aliases).
        self.param_names = [n for n, _ in model.named_parameters()]
        state = model.state_dict(keep_vars=True)
        persistent = set(state)
        # Non-persistent buffers (a causal mask) are not state: they stay inside the compiled code as constants.
        self.buffer_names = [n for n, _ in model.named_buffers() if n in persistent]
        first_name = {}
        for n, t in list(model.named_parameters()) + [(b, state[b]) for b in self.buffer_names]:
            first_name.setdefault(id(t), n)
        self.aliases = {n: first_name[id(t)] for n, t in state.items() if first_name.get(id(t), n) != n}

    def state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        named = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        return [named[n].detach() for n in self.param_names], [buffers[n].detach() for n in self.buffer_names]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = len(self.param_names)
        params = dict(zip(self.param_names, flat[:p]))
        # BatchNorm updates its running statistics in place: on copies, returned as the new buffers.
        buffers = {n: t.clone() for n, t in zip(self.buffer_names, flat[p:])}
        output = torch.func.functional_call(self.model, {**params, **buffers}, (x,))
        if not isinstance(output, torch.Tensor):
            raise ExportError(
                f"forward returns {type(output).__name__}; hytrain trains models whose forward returns one tensor "
                "(wrap the module to return the logits)"
            )
        loss = self.loss_fn(output, y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, params.values()))
        return (loss.detach(), *grads, *[buffers[n] for n in self.buffer_names])

    def forward(self, x: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        p = len(self.param_names)
        state = {**dict(zip(self.param_names, flat[:p])), **dict(zip(self.buffer_names, flat[p:]))}
        return torch.func.functional_call(self.model, state, (x,))


def _trace(fn: Callable[..., Any], args: Sequence[torch.Tensor], batched: int, max_batch: int, stage: str,
           user_file: Path | None) -> torch.export.ExportedProgram:
    """make_fx with symbolic shapes (through autograd, so backward's ops are recorded), then torch.export with the
    first `batched` inputs' dimension 0 as one dynamic batch."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        graph = make_fx(fn, tracing_mode="symbolic")(*args)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(_paragraph(f"tracing the {stage}", e, user_file)) from e
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = tuple({0: batch} if i < batched else None for i in range(len(args)))
    try:
        return torch.export.export(graph, tuple(args), dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        raise ExportError(_paragraph(f"exporting the {stage}", e, user_file)) from e


def _compile(program: torch.export.ExportedProgram, path: Path, stage: str, user_file: Path | None) -> None:
    import torch._inductor.config as inductor_config

    try:
        # Threads follow the process at run time (hytrain sets one per rank when ranks share a node), not the
        # exporting machine's count.
        with dynamic_batch(), inductor_config.patch({"cpp.dynamic_threads": True}):
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:
        raise ExportError(_paragraph(f"compiling the {stage} with AOTInductor", e, user_file)) from e


def _compare(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], names: Sequence[str]) -> list[tuple[float, str]]:
    """Per tensor, max|got - ref| / max(max|ref|, 1e-3 * the largest max|ref| of all): relative, except for tensors
    whose true value is about zero (a bias right before BatchNorm has a gradient of ~0), measured against a floor."""
    scale = max((r.abs().max().item() for r in ref if r.is_floating_point() and r.numel()), default=0.0)
    errors = []
    for g, r, n in zip(got, ref, names):
        if not r.is_floating_point():
            errors.append((0.0 if torch.equal(g.cpu(), r.cpu()) else float("inf"), n))
            continue
        if r.numel() == 0:
            continue
        diff = (g.double().cpu() - r.double().cpu()).abs().max().item()
        errors.append((diff / max(r.abs().max().item(), 1e-3 * scale, 1e-30), n))
    return sorted(errors, reverse=True)


def _float64_step(model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  params: list[torch.Tensor], buffers: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    reference = _Step(model, loss_fn)
    up = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    return reference.train_step(up(x), up(y), *[up(p).requires_grad_(True) for p in params],
                                *[up(b) for b in buffers])


def export(model: torch.nn.Module, options: ExportOptions, user_file: Path | None = None) -> dict[str, Any]:
    """Exports `model` into `options.out` (see the package doc); returns the metadata written. Raises
    `ExportError` with a one-paragraph explanation when a stage fails or the compiled step is not exact enough."""
    _check_torch()
    if options.input_dtype not in DTYPES:
        raise ExportError(f"input dtype '{options.input_dtype}' is none of {', '.join(DTYPES)}")
    if options.target_dtype is not None and options.target_dtype not in DTYPES:
        raise ExportError(f"target dtype '{options.target_dtype}' is none of {', '.join(DTYPES)}")
    if options.device not in ("cpu", "cuda"):
        raise ExportError(f"device '{options.device}' is neither cpu nor cuda")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ExportError(
            "--device cuda needs a GPU at export time (AOTInductor compiles for the GPU it sees); export on a "
            "GPU machine with the same torch, or export for the CPU"
        )
    if options.check not in ("float64", "none"):
        raise ExportError(f"check '{options.check}' is neither float64 nor none")
    if not 1 <= options.example_batch <= options.max_batch:
        raise ExportError(f"example batch {options.example_batch} must be between 1 and max batch {options.max_batch}")
    out = Path(options.out)
    loss_fn = _loss_fn(options, user_file)
    gen = torch.Generator().manual_seed(options.seed)
    model = model.to(options.device).train()
    step = _Step(model, loss_fn)
    params, buffers = step.state()
    for name, p in zip(step.param_names, params):
        if p.dtype != torch.float32:
            raise ExportError(f"parameter {name} is {p.dtype}; hytrain trains float32 parameters (call .float())")

    x = _example_input(options, options.example_batch, gen, _token_range(model))
    try:
        with torch.no_grad():
            output = copy.deepcopy(model)(x)
    except Exception as e:
        raise ExportError(_paragraph(f"running the model on an example batch of shape {list(x.shape)}", e,
                                     user_file)) from e
    if not isinstance(output, torch.Tensor):
        raise ExportError(
            f"forward returns {type(output).__name__}; hytrain trains models whose forward returns one tensor "
            "(wrap the module to return the logits)"
        )
    y = _example_target(options, output, options.example_batch, gen)
    trainable = [p.clone().requires_grad_(True) for p in params]

    with tempfile.TemporaryDirectory(prefix=".hytrain-export-", dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp)
        step_program = _trace(step.train_step, [x, y, *trainable, *buffers], 2, options.max_batch,
                              "training step", user_file)
        _compile(step_program, staging / TRAIN_STEP, "training step", user_file)
        model.eval()
        try:
            forward_program = _trace(step.forward, [x, *params, *buffers], 1, options.max_batch, "forward pass",
                                     user_file)
        finally:
            model.train()
        _compile(forward_program, staging / FORWARD, "forward pass", user_file)
        check = _check(staging, model, step, loss_fn, options, gen, user_file)
        metadata = _metadata(options, model, step, params, buffers, x, output, y, check)
        _save_weights(model, step, staging / WEIGHTS)
        (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        _replace(staging, out)
    return metadata


#: How far the float64 twin of the compiled step may be from eager float64: both compute the same function in
#: float64, so only summation order differs.
TWIN_TOLERANCE = 1e-9


def _check(staging: Path, model: torch.nn.Module, step: _Step, loss_fn: Callable[..., torch.Tensor],
           options: ExportOptions, gen: torch.Generator, user_file: Path | None) -> dict[str, Any]:
    """Checks the compiled step's numbers against eager float64, at the example batch and at another size.

    The float32 package is measured (and warned about above `options.tolerance`) but not failed on: float32
    rounding flips ReLU and max-pool decisions whose inputs are within rounding of zero, which puts whole channels
    of a ReLU network's gradients percent off float64 in eager float32 as well. What must hold exactly is the
    compiled code itself: with `options.check == "float64"` the step is also compiled in float64 (a twin of the
    same trace), and its every output must equal eager float64's within `TWIN_TOLERANCE`."""
    compiled = torch._inductor.aoti_load_package(str(staging / TRAIN_STEP))
    params, buffers = step.state()
    names = ["loss", *[f"gradient of {n}" for n in step.param_names], *[f"new {n}" for n in step.buffer_names]]
    batches = (options.example_batch, max(1, options.example_batch // 2 + 1))
    results: dict[str, Any] = {"batches": list(batches), "max_error_vs_float64": 0.0, "worst": "",
                               "eager_max_error_vs_float64": 0.0}
    reference_model = copy.deepcopy(model).double()
    twin_inputs = []
    for batch in batches:
        x = _example_input(options, batch, gen, _token_range(model))
        with torch.no_grad():
            y = _example_target(options, copy.deepcopy(model)(x), batch, gen)
        try:
            got = compiled(x, y, *params, *buffers)
        except Exception as e:
            raise ExportError(_paragraph(f"running the compiled training step at batch {batch}", e, None)) from e
        reference = _float64_step(reference_model, loss_fn, x, y, params, buffers)
        worst, name = _compare(got, reference, names)[0]
        eager = step.train_step(x, y, *[p.clone().requires_grad_(True) for p in params], *buffers)
        eager_worst, _ = _compare(eager, reference, names)[0]
        if worst >= results["max_error_vs_float64"]:
            results.update(max_error_vs_float64=worst, worst=name, eager_max_error_vs_float64=eager_worst)
        twin_inputs.append((x, y, reference))
    if results["max_error_vs_float64"] > options.tolerance:
        print(
            f"hytrain_export: warning: the float32 step is {results['max_error_vs_float64']:.1e} off float64 "
            f"({results['worst']}; eager float32: {results['eager_max_error_vs_float64']:.1e}). Near-zero ReLU or "
            "max-pool inputs flip under float32 rounding, eager or compiled; the float64 twin below checks the "
            "compiled code itself",
            file=sys.stderr,
        )
    if options.check == "float64":
        results["float64_twin_max_error"] = _check_twin(staging, reference_model, loss_fn, twin_inputs, names,
                                                        options, user_file)
    return results


def _check_twin(staging: Path, reference_model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor],
                batches: list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]], names: list[str],
                options: ExportOptions, user_file: Path | None) -> float:
    twin = _Step(reference_model, loss_fn)
    params, buffers = twin.state()
    up = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    x, y, _ = batches[0]
    trainable = [p.clone().requires_grad_(True) for p in params]
    with float64_attention():
        program = _trace(twin.train_step, [up(x), up(y), *trainable, *buffers], 2, options.max_batch,
                         "float64 twin of the training step", user_file)
        _compile(program, staging / "twin.pt2", "float64 twin of the training step", user_file)
    compiled = torch._inductor.aoti_load_package(str(staging / "twin.pt2"))
    worst_overall = 0.0
    for x, y, reference in batches:
        got = compiled(up(x), up(y), *params, *buffers)
        errors = _compare(got, reference, names)
        worst, name = errors[0]
        worst_overall = max(worst_overall, worst)
        if not worst <= TWIN_TOLERANCE:
            table = "; ".join(f"{n}: {e:.2e}" for e, n in errors[:5])
            raise ExportError(
                f"AOTInductor compiled a step that does not compute the model's gradients: compiled in float64 it "
                f"is {worst:.2e} off eager float64 at batch {x.shape[0]} ({name}), where only summation order "
                f"may differ (tolerance {TWIN_TOLERANCE:g}). Worst tensors: {table}. Nothing was written; please "
                "report the model to the hytrain maintainers (or export with --check none to skip this check)"
            )
    (staging / "twin.pt2").unlink()
    return worst_overall


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _metadata(options: ExportOptions, model: torch.nn.Module, step: _Step, params: list[torch.Tensor],
              buffers: list[torch.Tensor], x: torch.Tensor, output: torch.Tensor, y: torch.Tensor,
              check: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    def tensors(names: Sequence[str], values: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        return [{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in zip(names, values)]

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": type(model).__name__,
        "source": options.source,
        "torch_version": torch.__version__,
        "hytrain_export_version": __version__,
        "device": options.device,
        "input": {"shape": list(x.shape[1:]), "dtype": _dtype_name(x.dtype)},
        "output": {"shape": list(output.shape[1:]), "dtype": _dtype_name(output.dtype)},
        "target": {"shape": list(y.shape[1:]), "dtype": _dtype_name(y.dtype)},
        "loss": options.loss,
        "batch": {"min": 1, "max": options.max_batch},
        "parameters": tensors(step.param_names, params),
        "buffers": tensors(step.buffer_names, buffers),
        "aliases": step.aliases,
        "packages": {"train_step": TRAIN_STEP, "forward": FORWARD},
        "weights": WEIGHTS,
        "train_step": "(input, target, *parameters, *buffers) -> (loss, *gradients, *new_buffers)",
        "forward": "(input, *parameters, *buffers) -> output (eval mode)",
        "check": check,
        "export_options": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                           for k, v in dataclasses.asdict(options).items() if k not in ("out", "source")},
    }


def _save_weights(model: torch.nn.Module, step: _Step, path: Path) -> None:
    from safetensors.torch import save_file

    # Every state_dict name, tied ones included, so `load_state_dict(load_file(path))` restores the module; a tied
    # name gets its own copy (safetensors stores no shared tensors).
    state = {n: t.detach().cpu().contiguous().clone() for n, t in model.state_dict().items()}
    save_file(state, str(path))


def _replace(staging: Path, out: Path) -> None:
    """Moves the finished files into `out`; a folder already there is replaced only once the new one is whole."""
    out.mkdir(parents=True, exist_ok=True)
    # Without metadata the folder no longer counts as an export while its files are swapped.
    (out / METADATA).unlink(missing_ok=True)
    for name in (TRAIN_STEP, FORWARD, WEIGHTS):
        os.replace(staging / name, out / name)
    # The metadata last: a folder with metadata is complete.
    os.replace(staging / METADATA, out / METADATA)
