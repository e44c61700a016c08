"""Materialized attention with plain autograd: the yardstick every backend is checked against.

The full ``(Tq, Tk)`` score matrix, the normalizer's weights built from its spec's ``phi`` and ``psi``
with the row shift detached (its gradient is zero), and PyTorch's autograd for every derivative:
it shares no derivative formula with the kernels, so agreement means something. Grouped-query
heads are repeated, masks and dropout bits are materialized: memory is ``O(Tq Tk)`` per head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...normalizers import Normalizer
from .problem import Problem, dropout_keep


def visible_pairs(
    problem: Problem, mask: Tensor | None, batch: int, heads: int, t_q: int, t_k: int, device
) -> Tensor:
    """``(B, H, Tq, Tk)`` bool: the band and the attention mask, ANDed."""
    band = problem.visible(torch.arange(t_q, device=device), torch.arange(t_k, device=device), t_q, t_k)
    out = torch.ones(batch, heads, t_q, t_k, dtype=torch.bool, device=device)
    if band is not None:
        out = out & band
    if mask is not None:
        out = out & mask
    return out


def dropout_multiplier(problem: Problem, seed: Tensor, shape: tuple[int, int, int, int], device) -> Tensor:
    """``keep / (1 - p)`` for every ``(b, h, i, j)``, as a float64 tensor of ``shape``."""
    batch, heads, t_q, t_k = shape
    head = torch.arange(batch * heads, device=device).view(batch, heads, 1, 1)
    rows = torch.arange(t_q, device=device).view(1, 1, t_q, 1)
    cols = torch.arange(t_k, device=device).view(1, 1, 1, t_k)
    keep = dropout_keep(seed, head, rows, cols, problem.dropout_p)
    return keep.to(torch.float64) / (1 - problem.dropout_p)


class _SeedBeta(torch.autograd.Function):
    """beta's weights with the beta-attention write-up's shortcut derivative, for ``grad="seed"``.

    Forward ``w = s / (1 + r)``; JVP ``wd = f w`` with ``f = (s . sd) / (r^2 N)``; VJP
    ``ds = (sum_j dw_j w_j) s / (r^2 N)``; both 0 where ``r = 0`` (docs/math.md).
    """

    @staticmethod
    def forward(s: Tensor) -> Tensor:
        return s / (1 + torch.linalg.vector_norm(s, dim=-1, keepdim=True))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def _coefficient(s: Tensor) -> Tensor:
        r2 = (s * s).sum(-1, keepdim=True)
        positive = r2 > 0
        safe = torch.where(positive, r2, torch.ones_like(r2))
        return torch.where(positive, 1 / (safe * (1 + safe.sqrt())), torch.zeros_like(r2))

    @staticmethod
    def backward(ctx, dw: Tensor) -> Tensor:
        s, w = ctx.saved_tensors
        return (dw * w).sum(-1, keepdim=True) * _SeedBeta._coefficient(s) * s

    @staticmethod
    def jvp(ctx, sd: Tensor) -> Tensor:
        s, w = ctx.saved_tensors
        return (s * sd).sum(-1, keepdim=True) * _SeedBeta._coefficient(s) * w


def weights(
    spec: Normalizer, s: Tensor, visible: Tensor, p: float, sinks: Tensor | None, grad: str
) -> Tensor:
    """``w_ij = phi / (alpha_i + Psi_i^gamma)`` over the visible pairs; 0 elsewhere and on empty rows."""
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if grad == "seed":
        return _SeedBeta.apply(torch.where(visible, s, zero))
    if spec.shifted:
        # a detached shift: the weights do not depend on it, and neither do their derivatives
        floor = torch.full_like(s[..., :1], spec.shift_floor)
        if sinks is not None:
            floor = torch.maximum(floor, sinks.detach()[..., None, None].to(s.dtype))
        shift = torch.maximum(floor, torch.where(visible, s, float("-inf")).amax(-1, keepdim=True)).detach()
        finite = torch.isfinite(shift)
        shift = torch.where(finite, shift, zero)  # a row with no visible key and no floor
        e = torch.where(finite, torch.exp(-shift), zero)
        x = torch.where(visible, s - shift, zero)  # masked scores never reach exp (no inf * 0)
        alpha = spec.alpha * e
        if sinks is not None:
            alpha = alpha + torch.exp(sinks[..., None, None].to(s.dtype) - shift)
    else:
        e = torch.ones_like(s[..., :1])
        x = torch.where(visible, s, zero)
        alpha = None
    phi = torch.where(visible, spec.phi(x, e, p), zero)
    if not spec.normalized:
        return phi / spec.alpha
    psi_sum = torch.where(visible, spec.psi(x, e, p), zero).sum(-1, keepdim=True)
    norm = alpha + psi_sum if spec.shifted else spec.norm(psi_sum)
    has_keys = norm > 0
    return torch.where(has_keys, phi / torch.where(has_keys, norm, torch.ones_like(norm)), zero)


def attention_naive(
    problem: Problem,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sinks: Tensor | None = None,
    mask: Tensor | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """``(B, H, Tq, dv)``. ``k, v`` may have ``H / G`` heads (grouped-query attention); ``sinks`` is
    ``(B, H)``, ``mask`` a bool tensor broadcastable to ``(B, H, Tq, Tk)``, ``seed`` the dropout seed."""
    batch, heads, t_q, _ = q.shape
    t_k = k.shape[-2]
    groups = heads // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s = problem.scale * (q @ k.transpose(-2, -1))
    visible = visible_pairs(problem, mask, batch, heads, t_q, t_k, q.device)
    w = weights(problem.normalizer, s, visible, problem.parameter, sinks, problem.grad)
    if problem.dropout_p > 0:
        w = w * dropout_multiplier(problem, seed, (batch, heads, t_q, t_k), q.device).to(w.dtype)
    return w @ v
