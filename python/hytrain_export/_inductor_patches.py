"""What AOTInductor needs changed, for the duration of one compile, so that a training step keeps a dynamic batch.

Two of Inductor's CPU heuristics look at the example batch and then *guard* on what they saw, which pins the
batch dimension of the compiled package to the example's size (a package traced at batch 16 then refuses batch 7):

- ATen's convolution backend choice (`torch._C._select_conv_backend`, called by the fake convolution to pick the
  output's memory format) compares the batch with 16. Its answer only decides the memory format, which for the
  contiguous NCHW tensors a step passes is contiguous for every backend; it is asked with the example's sizes
  instead of symbolic ones, so it adds no guard.
- The C++ code generator's choice of an accumulation helper for float sums (`CppKernel.need_use_acc_helper`):
  without the helper a sum accumulates sequentially in float32, with it in chunks (a cascade), and it guards on
  the reduction size being on one side of 4096. For a reduction whose size depends on the batch the helper is
  always taken: no guard, and the accurate summation whatever the batch.

Both are internals of torch 2.11; the export refuses other versions (see `_check_torch`).

A third change serves the float64 twin only (`float64_attention`): torch 2.11's shape function for the CPU flash
attention kernel says its log-sum-exp output is float32 whatever the inputs, where the kernel itself returns it in
the inputs' accumulation type, float64 for float64. A float64 step compiled from that trace hands the backward
kernel a float32 log-sum-exp, which it refuses ("expected scalar type Double but found Float").
"""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import Iterator

import torch


def _with_example_sizes(t: object) -> object:
    """`t` with its symbolic sizes replaced by the example's (a fake tensor of the same dtype and device)."""
    if not isinstance(t, torch.Tensor):
        return t
    dims = list(t.shape) + list(t.stride())
    if all(isinstance(d, int) for d in dims):
        return t

    def hint(d: object) -> int:
        return d if isinstance(d, int) else d.node.hint  # type: ignore[union-attr]

    return torch.empty_strided(
        [hint(s) for s in t.shape], [hint(s) for s in t.stride()], dtype=t.dtype, device=t.device
    )


@contextlib.contextmanager
def dynamic_batch() -> Iterator[None]:
    """Inside this context, Inductor compiles without specialising the batch dimension (see the module doc)."""
    from torch._inductor.codegen import cpp as inductor_cpp

    select_conv_backend = torch._C._select_conv_backend
    need_use_acc_helper = inductor_cpp.CppKernel.need_use_acc_helper

    def select_conv_backend_without_guards(*args: object, **kwargs: object) -> object:
        return select_conv_backend(
            *[_with_example_sizes(a) for a in args], **{k: _with_example_sizes(v) for k, v in kwargs.items()}
        )

    def acc_helper_for_symbolic_sums(self, reduction_type, dtype, use_scalar):  # type: ignore[no-untyped-def]
        if reduction_type == "sum" and dtype == torch.float:
            size = functools.reduce(operator.mul, self.call_ranges[self.reduction_depth :])
            if getattr(size, "free_symbols", None):
                return True
        return need_use_acc_helper(self, reduction_type, dtype, use_scalar)

    torch._C._select_conv_backend = select_conv_backend_without_guards
    inductor_cpp.CppKernel.need_use_acc_helper = acc_helper_for_symbolic_sums
    try:
        yield
    finally:
        torch._C._select_conv_backend = select_conv_backend
        inductor_cpp.CppKernel.need_use_acc_helper = need_use_acc_helper


def _flash_attention_for_cpu_shapes(query, key, value, dropout_p=0.0, is_causal=False, attn_mask=None,  # noqa
                                    scale=None):
    # Replaces the code of torch._meta_registrations' function of the same job (so every table that holds that
    # function sees this): it runs with that module's globals, so it names only `torch`.
    batch_size, num_heads, max_seqlen_batch_q = query.size(0), query.size(1), query.size(2)
    attention = torch.empty_like(query)
    accumulate = torch.float64 if query.dtype == torch.float64 else torch.float
    logsumexp = torch.empty((batch_size, max_seqlen_batch_q, num_heads), dtype=accumulate, device=query.device)
    return attention, logsumexp.transpose(1, 2)


@contextlib.contextmanager
def float64_attention() -> Iterator[None]:
    """Inside this context, traces and compiles of `scaled_dot_product_attention` in float64 give the CPU flash
    attention kernel's log-sum-exp the dtype the kernel returns (see the module doc)."""
    from torch import _meta_registrations

    shapes = _meta_registrations.meta__scaled_dot_product_flash_attention_for_cpu
    original = shapes.__code__
    shapes.__code__ = _flash_attention_for_cpu_shapes.__code__
    try:
        yield
    finally:
        shapes.__code__ = original
