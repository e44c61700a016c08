"""Blockwise attention for any normalizer in plain PyTorch: the ``"torch"`` backend for softmax.

Scores are built one ``QUERY_BLOCK x KEY_BLOCK`` tile at a time, so memory is ``O(T d)`` plus a few
tiles, never ``Tq x Tk``. The forward keeps running row sums of ``phi v`` and ``psi`` (rescaled by the running
max for a shifted, i.e. exponential, normalizer: ``phi(x - delta) = phi(x) exp(-delta)``) and saves the
row statistics ``m`` (the shift) and ``Psi``; backward and JVP recompute each block's scores from
them (MATH.md section 3). Under a causal mask invisible tiles are skipped and only tiles crossing
the diagonal build a mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...normalizers import Normalizer
from ..common import GRADIENT, TANGENT_OUTPUT, accumulation_dtype, composition_error, not_differentiable

QUERY_BLOCK = 1024
KEY_BLOCK = 512


def _tiles(t_q: int, t_k: int, causal: bool, device: torch.device):
    """Yield ``(r0, r1, k0, k1, mask)`` for the visible tiles, query blocks outer, key blocks inner.

    ``mask`` (``[r1 - r0, k1 - k0]``) is None where every pair of the tile is visible, so only
    tiles crossing the causal diagonal pay for masking. Tiles with no visible pair are skipped.
    """
    offset = t_k - t_q  # query i sees key j iff j <= i + offset (bottom-right alignment)
    for r0 in range(0, t_q, QUERY_BLOCK):
        r1 = min(r0 + QUERY_BLOCK, t_q)
        k_end = min(t_k, r1 + offset) if causal else t_k
        for k0 in range(0, k_end, KEY_BLOCK):
            k1 = min(k0 + KEY_BLOCK, k_end)
            mask = None
            if causal and k1 - 1 > r0 + offset:
                rows = torch.arange(r0, r1, device=device)
                mask = torch.arange(k0, k1, device=device)[None, :] <= rows[:, None] + offset
            yield r0, r1, k0, k1, mask


def _block_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    # [.., R, d] @ [.., d, BK] -> [.., R, BK]
    return scale * (q @ k.transpose(-2, -1))


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x.masked_fill(~mask, 0.0)


def _same_or(normalizer: Normalizer, fn, value: Tensor, x: Tensor) -> Tensor:
    """Reuse ``value = phi(x)`` when ``fn`` is ``phi`` (softmax: phi = psi = phi' = psi' = exp)."""
    return value if fn is normalizer.phi else fn(x)


def _forward(normalizer: Normalizer, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    *batch, t_q, _ = q.shape
    t_k, dv = k.shape[-2], v.shape[-1]
    acc = q.new_zeros(*batch, t_q, dv)  # sum_j phi(x_ij) v_j
    psi_sum = q.new_zeros(*batch, t_q)  # sum_j psi(x_ij)
    shift = q.new_full((*batch, t_q), float("-inf")) if normalizer.shifted else q.new_zeros(*batch, t_q)
    for r0, r1, k0, k1, mask in _tiles(t_q, t_k, causal, q.device):
        s = _block_scores(q[..., r0:r1, :], k[..., k0:k1, :], scale)
        if normalizer.shifted:
            visible_s = s if mask is None else s.masked_fill(~mask, float("-inf"))
            m_old = shift[..., r0:r1]
            m_new = torch.maximum(m_old, visible_s.amax(-1))
            # Rows that have seen no key yet keep shift -inf; evaluate them at shift 0 (all masked).
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            rescale = torch.exp(m_old - m_safe)  # exp(-inf) = 0 for a row's first visible tile
            acc[..., r0:r1, :] *= rescale[..., None]
            psi_sum[..., r0:r1] *= rescale
            shift[..., r0:r1] = m_new
            x = visible_s - m_safe[..., None]
        else:
            x = s
        phi = _masked(normalizer.phi(x), mask)
        acc[..., r0:r1, :] += phi @ v[..., k0:k1, :]  # [R, BK] @ [BK, dv] -> [R, dv]
        psi_sum[..., r0:r1] += _masked(_same_or(normalizer, normalizer.psi, phi, x), mask).sum(-1)
    if normalizer.shifted:
        shift = torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)
    out = acc * normalizer.reciprocal_norm(normalizer.norm(psi_sum))[..., None]
    return out, shift, psi_sum


def _tile_x(normalizer: Normalizer, q: Tensor, k: Tensor, shift: Tensor, scale: float, mask) -> Tensor:
    s = _block_scores(q, k, scale)
    if not normalizer.shifted:
        return s
    # Masked scores may lie far above the row's shift: exp would overflow to inf, and inf * 0 = NaN.
    x = s - shift[..., None]
    return x if mask is None else x.masked_fill(~mask, float("-inf"))


def _backward(normalizer, grad_mode, q, k, v, out, shift, psi_sum, g, causal, scale):
    t_q, t_k = q.shape[-2], k.shape[-2]
    inv_norm = normalizer.reciprocal_norm(normalizer.norm(psi_sum))
    d_row = (g * out).sum(-1)  # D_i = g_i . O_i
    if grad_mode == "seed":
        # MATH.md section 5: ds_ij = D_i s_ij / (r_i^2 N_i), 0 where r_i = 0.
        positive = psi_sum > 0
        coef = torch.where(positive, d_row * inv_norm / torch.where(positive, psi_sum, 1.0), 0.0)
    else:
        coef = d_row * inv_norm * normalizer.dnorm(psi_sum)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for r0, r1, k0, k1, mask in _tiles(t_q, t_k, causal, q.device):
        q_r, k_b, v_b, g_r = q[..., r0:r1, :], k[..., k0:k1, :], v[..., k0:k1, :], g[..., r0:r1, :]
        x = _tile_x(normalizer, q_r, k_b, shift[..., r0:r1], scale, mask)
        inv_r, coef_r = inv_norm[..., r0:r1, None], coef[..., r0:r1, None]
        phi = normalizer.phi(x)
        dv[..., k0:k1, :] += _masked(phi * inv_r, mask).transpose(-2, -1) @ g_r  # [BK, R] @ [R, dv]
        if grad_mode == "seed":
            ds = coef_r * _masked(x, mask)
        else:
            g_dot_v = g_r @ v_b.transpose(-2, -1)  # [R, dv] @ [dv, BK] -> [R, BK]
            dphi = _same_or(normalizer, normalizer.dphi, phi, x)
            dpsi = _same_or(normalizer, normalizer.dpsi, phi, x)
            ds = _masked(dphi * g_dot_v * inv_r - coef_r * dpsi, mask)
        dq[..., r0:r1, :] += scale * (ds @ k_b)  # [R, BK] @ [BK, d] -> [R, d]
        dk[..., k0:k1, :] += scale * (ds.transpose(-2, -1) @ q_r)  # [BK, R] @ [R, d] -> [BK, d]
    return dq, dk, dv


def _jvp(normalizer, grad_mode, q, k, v, out, shift, psi_sum, qd, kd, vd, causal, scale):
    t_q, t_k = q.shape[-2], k.shape[-2]
    inv_norm = normalizer.reciprocal_norm(normalizer.norm(psi_sum))
    dphi_sd_v = torch.zeros_like(out)  # sum_j phi'(x_ij) sd_ij v_j
    dpsi_sd = torch.zeros_like(psi_sum)  # sum_j psi'(x_ij) sd_ij   (seed: sum_j s_ij sd_ij)
    phi_vd = torch.zeros_like(out)  # sum_j phi(x_ij) vd_j
    for r0, r1, k0, k1, mask in _tiles(t_q, t_k, causal, q.device):
        q_r, k_b = q[..., r0:r1, :], k[..., k0:k1, :]
        x = _tile_x(normalizer, q_r, k_b, shift[..., r0:r1], scale, mask)
        phi = normalizer.phi(x)
        if qd is not None or kd is not None:
            sd = 0.0
            if qd is not None:
                sd = sd + _block_scores(qd[..., r0:r1, :], k_b, scale)
            if kd is not None:
                sd = sd + _block_scores(q_r, kd[..., k0:k1, :], scale)
            sd = _masked(sd, mask)
            if grad_mode == "seed":
                dpsi_sd[..., r0:r1] += (x * sd).sum(-1)
            else:
                dphi = _same_or(normalizer, normalizer.dphi, phi, x)
                dpsi = _same_or(normalizer, normalizer.dpsi, phi, x)
                dphi_sd_v[..., r0:r1, :] += (dphi * sd) @ v[..., k0:k1, :]
                dpsi_sd[..., r0:r1] += (dpsi * sd).sum(-1)
        if vd is not None:
            phi_vd[..., r0:r1, :] += _masked(phi, mask) @ vd[..., k0:k1, :]
    if grad_mode == "seed":
        # Od_i = f_i O_i + sum_j w_ij vd_j, f_i = (sum_j s_ij sd_ij) / (r_i^2 N_i)  (MATH.md section 5)
        positive = psi_sum > 0
        f = torch.where(positive, dpsi_sd * inv_norm / torch.where(positive, psi_sum, 1.0), 0.0)
        return f[..., None] * out + phi_vd * inv_norm[..., None]
    norm_dot = normalizer.dnorm(psi_sum) * dpsi_sd  # Nd_i
    return (dphi_sd_v - out * norm_dot[..., None] + phi_vd) * inv_norm[..., None]


class BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, normalizer, causal, scale, grad_mode):
        acc_dtype = accumulation_dtype(q.dtype)
        qf, kf, vf = (x.to(acc_dtype) for x in (q, k, v))
        out, shift, psi_sum = _forward(normalizer, qf, kf, vf, causal, scale)
        # Low-precision inputs also keep the float32 output for backward (None when it is the result).
        return out.to(q.dtype), shift, psi_sum, (out if out.dtype != q.dtype else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, normalizer, causal, scale, grad_mode = inputs
        result, shift, psi_sum, out = output
        ctx.mark_non_differentiable(shift, psi_sum, *([] if out is None else [out]))
        out = result if out is None else out
        ctx.save_for_backward(q, k, v, out, shift, psi_sum)
        ctx.save_for_forward(q, k, v, out, shift, psi_sum)
        ctx.args = (normalizer, grad_mode, causal, scale)

    @staticmethod
    def backward(ctx, grad_out, *_):
        q, k, v, out, shift, psi_sum = ctx.saved_tensors
        normalizer, grad_mode, causal, scale = ctx.args
        acc_dtype = out.dtype
        dq, dk, dv = _backward(
            normalizer, grad_mode, q.to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype),
            out, shift, psi_sum, grad_out.to(acc_dtype), causal, scale,
        )  # fmt: skip
        # The formulas treat the saved row statistics as constants: right for one derivative,
        # wrong for a derivative of this one, which must raise instead.
        message = composition_error("torch", normalizer.name, GRADIENT)
        dq, dk, dv = (
            not_differentiable(d.to(x.dtype), message, q, k, v, grad_out)
            for d, x in ((dq, q), (dk, k), (dv, v))
        )
        return dq, dk, dv, None, None, None, None

    @staticmethod
    def jvp(ctx, qd, kd, vd, *_):
        q, k, v, out, shift, psi_sum = ctx.saved_tensors
        normalizer, grad_mode, causal, scale = ctx.args
        acc_dtype = out.dtype
        cast = lambda t: None if t is None else t.to(acc_dtype)
        out_dot = _jvp(
            normalizer, grad_mode, cast(q), cast(k), cast(v), out, shift, psi_sum,
            cast(qd), cast(kd), cast(vd), causal, scale,
        )  # fmt: skip
        message = composition_error("torch", normalizer.name, TANGENT_OUTPUT)
        out_dot = not_differentiable(out_dot.to(q.dtype), message, q, k, v, qd, kd, vd)
        return out_dot, None, None, None


def flash_attention_blockwise(
    q: Tensor, k: Tensor, v: Tensor, *, normalizer: Normalizer, causal: bool, scale: float, grad: str
) -> Tensor:
    """Memory-lean attention for any normalizer, with hand-derived backward and JVP."""
    return BlockwiseAttention.apply(q, k, v, normalizer, causal, scale, grad)[0]
