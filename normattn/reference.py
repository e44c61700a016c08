"""Materialized attention with plain autograd: the yardstick every backend is checked against.

Written the way the second note's ``Beta`` module does it: the full ``(Tq, Tk)`` score matrix,
masked scores set to ``-inf`` for softmax and ``0`` for beta, and PyTorch's autograd for the
derivatives. It shares no code with the kernels except the mask, so agreement means something.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .normalizers import Normalizer
from .ops.common import full_mask


def _beta_map(s: Tensor) -> Tensor:
    """``beta(x) = x / (1 + ||x||)`` row-wise, through autograd (vector_norm's derivative is 0 at 0)."""
    return s / (1 + torch.linalg.vector_norm(s, dim=-1, keepdim=True))


class _SeedBeta(torch.autograd.Function):
    """beta with the second note's shortcut derivative (MATH.md section 5), for ``grad="seed"``.

    JVP ``wd = f w`` with ``f = (s . sd) / (r^2 N)``; VJP ``ds = (sum_j dw_j w_j) s / (r^2 N)``,
    both 0 where ``r = 0``.
    """

    @staticmethod
    def forward(s: Tensor) -> Tensor:
        return _beta_map(s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (s,) = inputs
        ctx.save_for_backward(s, output)
        ctx.save_for_forward(s, output)

    @staticmethod
    def _coefficient(s: Tensor) -> Tensor:
        r2 = (s * s).sum(-1, keepdim=True)
        n = 1 + r2.sqrt()
        return torch.where(r2 > 0, 1 / (torch.where(r2 > 0, r2, torch.ones_like(r2)) * n), 0 * r2)

    @staticmethod
    def backward(ctx, dw: Tensor) -> Tensor:
        s, w = ctx.saved_tensors
        return (dw * w).sum(-1, keepdim=True) * _SeedBeta._coefficient(s) * s

    @staticmethod
    def jvp(ctx, sd: Tensor) -> Tensor:
        s, w = ctx.saved_tensors
        return (s * sd).sum(-1, keepdim=True) * _SeedBeta._coefficient(s) * w


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, normalizer: Normalizer, causal: bool, scale: float, grad: str
) -> Tensor:
    t_q, t_k = q.shape[-2], k.shape[-2]
    s = scale * (q @ k.transpose(-2, -1))
    mask = full_mask(t_q, t_k, causal, q.device)
    if normalizer.name == "softmax":
        if mask is not None:
            # A row with no visible key would be all -inf (NaN, and NaN gradients): it attends to
            # nothing, so its scores are zeroed before the softmax and its weights after.
            empty = ~mask.any(-1, keepdim=True)
            s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
        w = torch.softmax(s, dim=-1)
        if mask is not None:
            w = w.masked_fill(empty, 0.0)
    elif normalizer.name == "beta":
        if mask is not None:
            s = s.masked_fill(~mask, 0.0)
        w = _SeedBeta.apply(s) if grad == "seed" else _beta_map(s)
    else:
        raise ValueError(f"the reference backend has no normalizer {normalizer.name!r}")
    return w @ v
