"""Backend choice: which implementation computes a validated attention call.

``backend="auto"`` takes the fused Triton kernels for CUDA tensors (when Triton is installed) and
the torch backend otherwise. The torch backend computes beta in linear time whenever the call
allows it (full, causal, or a causal sliding window ``window=(left, 0)``; no attention-weight
dropout; no mask other than key padding) and uses its exact blockwise form otherwise.
"""

from __future__ import annotations

import os

from torch import Tensor

from .normalizers import BETA
from .ops.attention import blockwise, naive
from .ops.attention.autograd import attention_function
from .ops.attention.problem import Problem
from .ops.beta_linear import window
from .ops.common import triton_usable

ATTENTION_BACKENDS = ("auto", "reference", "torch", "triton", "triton-linear")
LINEAR_BACKENDS = ("triton-linear",)


def require_triton(backend: str, x: Tensor) -> None:
    if not triton_usable(x):
        raise ValueError(
            f'backend="{backend}" needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU '
            f"tensors); got a tensor on {x.device}"
            + ("" if os.environ.get("TRITON_INTERPRET") == "1" else " without TRITON_INTERPRET=1")
        )


def is_key_padding(mask: Tensor | None) -> bool:
    """A mask of shape ``(B or 1, 1, Tq, Tk)`` that is the same for every query: it only removes keys."""
    return mask is None or (mask.shape[1] == 1 and (mask.shape[2] == 1 or mask.stride(2) == 0))


def linear_time_obstacle(
    problem: Problem, mask: Tensor | None, sinks: Tensor | None, sliding_window: bool = False
) -> str | None:
    """Why the linear-time beta form cannot compute this call exactly, or None if it can.

    ``sliding_window``: the form has the causal sliding window (the torch backend's does)."""
    if problem.normalizer != BETA:
        if problem.normalizer.linear_time:
            name = problem.normalizer.name
            return f'normalizer "{name}" claims linear_time, but only beta has a linear-time form'
        return (
            f'the linear-time form computes beta attention only, got normalizer "{problem.normalizer.name}"'
        )
    if problem.left is not None or problem.right not in (None, 0):
        if not sliding_window:
            return 'this backend has no linear-time sliding window (backend="torch" has window=(left, 0))'
        obstacle = window.window_obstacle(problem)
        if obstacle is not None:
            return obstacle
    if not is_key_padding(mask):
        return "a general attn_mask has no linear-time form (only key padding, shape (B, 1, 1, Tk), has)"
    if problem.dropout_p > 0:
        return "dropout on the attention weights needs the weights, which the linear-time form never forms"
    return None


def choose(backend: str, problem: Problem, q: Tensor, mask: Tensor | None, sinks: Tensor | None) -> str:
    """The concrete backend: reference, torch, torch-linear, triton or triton-linear."""
    if backend == "auto":
        backend = (
            "triton" if q.is_cuda and triton_usable(q) and problem.normalizer.kernel is not None else "torch"
        )
    if backend == "torch":
        linear = linear_time_obstacle(problem, mask, sinks, sliding_window=True) is None
        return "torch-linear" if linear else "torch"
    if backend in ("triton", "triton-linear"):
        require_triton(backend, q)
    if backend == "triton" and problem.normalizer.kernel is None:
        raise ValueError(
            f'normalizer "{problem.normalizer.name}" has no Triton kernel helpers; use backend="torch" or '
            f'"reference" (or add its helpers to normattn/normalizers_triton.py)'
        )
    if backend == "triton-linear":
        obstacle = linear_time_obstacle(problem, mask, sinks)
        if obstacle is not None:
            raise ValueError(f'backend="triton-linear": {obstacle}; use backend="triton" or "torch" instead')
    return backend


def run(
    backend: str,
    problem: Problem,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sinks: Tensor | None,
    mask: Tensor | None,
    seed: Tensor | None,
) -> Tensor:
    """Compute the call on the concrete ``backend`` (from :func:`choose`)."""
    if backend == "reference":
        return naive.attention_naive(problem, q, k, v, sinks, mask, seed)
    if backend == "triton":
        from .ops.attention import triton

        return attention_function(triton.KERNELS, problem, q, k, v, sinks, mask, seed)
    if backend in ("torch-linear", "triton-linear"):
        return _linear(backend, problem, q, k, v, mask)
    return attention_function(blockwise.KERNELS, problem, q, k, v, sinks, mask, seed)


def _linear(backend: str, problem: Problem, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        # a removed key adds nothing to either state: zero it (its gradient is then zero too)
        k = k * mask[:, :, :1, :].transpose(-2, -1).to(k.dtype)
    if backend == "torch-linear":  # grouped-query heads natively
        if problem.left is not None:
            return attention_function(window.KERNELS, problem, q, k, v, None, None, None)
        from .ops.beta_linear.chunk import beta_linear_attention

        return beta_linear_attention(problem, q, k, v)
    from .ops.beta_linear.triton_chunk import beta_linear_attention_triton

    return beta_linear_attention_triton(problem, q, k, v)  # grouped-query heads natively


def max_reduce_backend(backend: str, x: Tensor) -> str:
    if backend == "auto":
        return "triton" if x.is_cuda and triton_usable(x) else "torch"
    if backend == "triton":
        require_triton(backend, x)
    return backend
