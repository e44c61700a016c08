"""Public API: validate once, then dispatch to an implementation.

Every implementation takes validated tensors and keyword arguments
``(q, k, v, *, normalizer, causal, scale, grad)`` and returns ``(B, H, Tq, dv)`` in the input dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from . import _checks
from .normalizers import Normalizer, get_normalizer
from .ops.common import warn_seed_once

ATTENTION_BACKENDS = ("auto", "reference", "torch", "triton", "triton-linear")
MAX_REDUCE_BACKENDS = ("auto", "reference", "torch", "triton")
GRAD_MODES = ("exact", "seed")


def triton_usable(x: Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _require_triton(backend: str, x: Tensor) -> None:
    if not triton_usable(x):
        raise ValueError(
            f'backend="{backend}" needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU '
            f"tensors); got a tensor on {x.device}"
            + ("" if os.environ.get("TRITON_INTERPRET") == "1" else " without TRITON_INTERPRET=1")
        )


def _attention_impl(backend: str, normalizer: Normalizer, q: Tensor) -> Callable[..., Tensor]:
    if backend == "auto":
        from .ops.dispatch import auto_attention_backend

        backend = auto_attention_backend(normalizer, q)
    if backend == "reference":
        from .reference import attention_reference

        return attention_reference
    if backend == "torch":
        if normalizer.linear_time:
            from .ops.beta_linear.chunk import beta_linear_attention

            return beta_linear_attention
        from .ops.flash.blockwise import flash_attention_blockwise

        return flash_attention_blockwise
    if backend == "triton":
        _require_triton(backend, q)
        from .ops.flash.triton import flash_attention_triton

        return flash_attention_triton
    # backend == "triton-linear"
    if not normalizer.linear_time:
        raise ValueError(
            f'backend="triton-linear" computes beta attention only, got normalizer="{normalizer.name}"'
        )
    _require_triton(backend, q)
    from .ops.beta_linear.triton_chunk import beta_linear_attention_triton

    return beta_linear_attention_triton


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalizer: str | Normalizer = "softmax",
    causal: bool = False,
    scale: float | None = None,
    grad: str = "exact",
    backend: str = "auto",
) -> Tensor:
    """Attention ``O = w(scale * q k^T) v`` with a row normalizer ``w`` (MATH.md section 3).

    Args:
        q: ``(B, H, Tq, d)``; k: ``(B, H, Tk, d)``; v: ``(B, H, Tk, dv)``, one float dtype and device.
        normalizer: ``"softmax"`` or ``"beta"`` (``beta(x) = x / (1 + ||x||)`` row-wise).
        causal: mask keys after the query, aligned bottom-right when ``Tq != Tk``; a query row
            with no visible key returns zeros and gets zero gradients.
        scale: score scale, ``1/sqrt(d)`` when None.
        grad: ``"exact"``, or ``"seed"`` for beta only: the second note's shortcut derivative,
            which is not the true derivative (MATH.md section 5); it warns once.
        backend: ``"auto"``, ``"reference"`` (materialized, autograd), ``"torch"`` (hand-derived
            backward and JVP; blockwise online softmax, linear-time chunked beta), ``"triton"``
            (fused flash kernels) or ``"triton-linear"`` (chunked linear-time beta kernels).

    Returns:
        ``(B, H, Tq, dv)`` in the dtype of the inputs. Backward and forward-mode AD
        (``torch.func.jvp``, ``torch.autograd.forward_ad``) use the hand-derived formulas.
    """
    scale_value = _checks.attention_inputs(q, k, v, scale)
    spec = get_normalizer(normalizer)
    _checks.choice("grad", grad, GRAD_MODES)
    _checks.choice("backend", backend, ATTENTION_BACKENDS)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if grad == "seed":
        if spec.name != "beta":
            raise ValueError(f'grad="seed" is defined for normalizer="beta" only, got "{spec.name}"')
        warn_seed_once()
    impl = _attention_impl(backend, spec, q)
    return impl(q, k, v, normalizer=spec, causal=causal, scale=scale_value, grad=grad)


class MaxReduceResult(NamedTuple):
    values: Tensor
    indices: Tensor


def max_reduce(
    x: Tensor, dim: int | tuple[int, ...] = -1, keepdim: bool = False, backend: str = "auto"
) -> MaxReduceResult:
    """Max over one or several axes, with the argmax, differentiable (MATH.md section 1).

    ``indices`` is the flat row-major index into the reduced axes. The backward sends the whole
    gradient of each output to its argmax; on ties the first index (row-major) gets all of it,
    where ``torch.amax`` would split it evenly between the tied entries. Works under
    ``torch.func.vmap`` of its VJP, so a full Jacobian is one call.
    """
    _checks.float_tensor("x", x)
    dims = _checks.reduce_dims(dim, x.dim(), x.shape)
    _checks.choice("backend", backend, MAX_REDUCE_BACKENDS)
    if not isinstance(keepdim, bool):
        raise TypeError(f"keepdim must be a bool, got {type(keepdim).__name__}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_usable(x) else "torch"
    if backend == "reference":
        from .ops.max_reduce.naive import max_reduce_reference as impl
    elif backend == "torch":
        from .ops.max_reduce.autograd import max_reduce_torch as impl
    else:
        _require_triton(backend, x)
        from .ops.max_reduce.triton import max_reduce_triton as impl
    values, indices = impl(x, dims, keepdim)
    return MaxReduceResult(values, indices)
