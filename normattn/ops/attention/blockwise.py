"""Blockwise attention for any normalizer in plain PyTorch: the ``"torch"`` backend's quadratic path.

Scores are built one ``QUERY_BLOCK x KEY_BLOCK`` tile at a time, so memory is ``O(T d)`` plus a few
tiles, never ``Tq x Tk``. Four kernels, each one pass over the visible tiles, with the formulas of
docs/math.md written through the spec's coefficients (``Normalizer.terms``/``all_terms``):

* ``forward``: running sums of ``phi v`` and ``psi`` (rescaled by the running max for a shifted
  normalizer); returns ``O`` and the row statistic (``L = m + log N`` shifted, ``Psi`` otherwise).
* ``backward``: ``dq, dk, dv`` (and the sinks' gradient) from ``O``, the statistic and ``dO``.
* ``jvp``: the tangent ``Od`` and ``mu_i = Nd_i / N_i`` from the statistic (no running max needed).
* ``tangent_backward``: the gradient of ``<h, Od>`` with respect to the primal and tangent inputs.

Grouped-query heads are computed as ``(B, H_kv, G, T, d)`` queries against ``(B, H_kv, 1, T, d)``
keys: matmuls broadcast over the group axis, the repeated keys are never formed, and key
gradients fold the group into their product's contraction, so they are formed for the ``H_kv``
heads only. Tiles that the band (causal, sliding window) hides are never
visited, only tiles crossing a band edge build the band mask, and with an attention mask a tile
with no visible pair is skipped. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...normalizers import SOFTMAX
from ..common import accumulation_dtype
from .autograd import Kernels
from .problem import Problem, dropout_keep

# 256 x 256 tiles keep a tile's few score-sized temporaries in the CPU's caches (measured: the
# softmax JVP at T = 4096 ran 25% faster than with 1024 x 512 tiles; smaller tiles lose to overhead)
QUERY_BLOCK = 256
KEY_BLOCK = 256


class _Call:
    """One call's tensors in the grouped layout, and the tile loop over them."""

    def __init__(self, problem: Problem, q: Tensor, k: Tensor, v: Tensor, sinks, mask, seed) -> None:
        self.problem = problem
        self.dtype = q.dtype
        self.acc = accumulation_dtype(q.dtype)
        batch, heads, self.t_q, _ = q.shape
        self.kv_heads, self.t_k = k.shape[1], k.shape[2]
        self.groups = heads // self.kv_heads
        self.q = self.grouped(q)  # [B, Hkv, G, Tq, d]
        self.q_scaled = problem.scale * self.q
        # exact softmax: its five coefficients are one exponential, evaluated in place (``terms``)
        self.softmax = problem.normalizer == SOFTMAX and problem.grad == "exact"
        self.k, self.v = self.shared(k), self.shared(v)  # [B, Hkv, 1, Tk, d]
        self.sinks = None if sinks is None else self.grouped_rows(sinks)  # [B, Hkv, G]
        self.mask = None
        if mask is not None:  # keeps its broadcast (size-1) dims: never expanded in memory
            self.mask = (
                mask.unflatten(1, (self.kv_heads, self.groups)) if mask.shape[1] > 1 else mask.unsqueeze(2)
            )
        self.seed = seed
        if problem.dropout_p > 0:
            self.head_index = torch.arange(batch * heads, device=q.device).view(
                batch, self.kv_heads, self.groups, 1, 1
            )

    def grouped(self, x: Tensor) -> Tensor:
        """``(B, H, T, e) -> (B, H_kv, G, T, e)`` in the accumulation dtype."""
        return x.unflatten(1, (self.kv_heads, self.groups)).to(self.acc)

    def shared(self, x: Tensor) -> Tensor:
        """``(B, H_kv, T, e) -> (B, H_kv, 1, T, e)``: one key/value head per group."""
        return x.unsqueeze(2).to(self.acc)

    def key_zeros(self, width: int) -> Tensor:
        """Zeros ``(B, H_kv, 1, Tk, width)``: key-side gradients of the shared heads (``key_product``)."""
        return self.q.new_zeros(*self.q.shape[:2], 1, self.t_k, width)

    def key_product(self, x: Tensor, y: Tensor) -> Tensor:
        """``sum_g x_g^T y_g`` over a group's query heads: ``[B, H_kv, G, R, K], [B, H_kv, G, R, e] ->
        [B, H_kv, 1, K, e]``, the group folded into the contraction, so that a shared key's gradient is
        formed once, never per query head. [K, G R] @ [G R, e] -> [K, e]"""
        if self.groups == 1:
            return x.transpose(-2, -1) @ y
        x_t = x.permute(0, 1, 4, 2, 3).flatten(-2)  # [B, H_kv, K, G R]
        return (x_t @ y.flatten(2, 3)).unsqueeze(2)

    def grouped_rows(self, x: Tensor) -> Tensor:
        """``(B, H, ...) -> (B, H_kv, G, ...)`` for per-head or per-row statistics."""
        return x.unflatten(1, (self.kv_heads, self.groups)).to(self.acc)

    def ungroup(self, x: Tensor) -> Tensor:
        """Inverse of ``grouped``: ``(B, H_kv, G, T, e) -> (B, H, T, e)`` in the input dtype."""
        return x.flatten(1, 2).to(self.dtype)

    def unshare(self, x: Tensor) -> Tensor:
        """Key-side gradients ``(B, H_kv, 1, T, e) -> (B, H_kv, T, e)`` in the input dtype."""
        return x.squeeze(2).to(self.dtype)

    def tiles(self):
        """Yield ``(rows, keys, visible)`` for the tiles with a visible pair.

        ``rows``/``keys`` are slices; ``visible`` is None when every pair of the tile is visible,
        else a bool tensor broadcastable to ``[B, H_kv, G, R, K]``.
        """
        problem, device = self.problem, self.q.device
        for r0 in range(0, self.t_q, QUERY_BLOCK):
            r1 = min(r0 + QUERY_BLOCK, self.t_q)
            lo, hi, full_lo, full_hi = problem.key_range(r0, r1, self.t_q, self.t_k)
            for k0 in range(lo, hi, KEY_BLOCK):
                k1 = min(k0 + KEY_BLOCK, hi)
                visible = None
                if not (full_lo <= k0 and k1 <= full_hi):
                    visible = problem.visible(
                        torch.arange(r0, r1, device=device),
                        torch.arange(k0, k1, device=device),
                        self.t_q,
                        self.t_k,
                    )
                if self.mask is not None:
                    tile_mask = self.mask[..., r0:r1, k0:k1]
                    visible = tile_mask if visible is None else tile_mask & visible
                    # skipping a hidden tile depends on the data: torch.compile traces every tile
                    if not torch.compiler.is_compiling() and not visible.any():
                        continue
                yield slice(r0, r1), slice(k0, k1), visible

    def scores(self, rows: slice, keys: slice) -> Tensor:
        """``s = c q k^T`` of a tile. [B, Hkv, G, R, d] @ [B, Hkv, 1, d, K] -> [B, Hkv, G, R, K]"""
        return self.q_scaled[..., rows, :] @ self.k[..., keys, :].transpose(-2, -1)

    def score_tangents(self, q_dot: Tensor, k_dot: Tensor) -> None:
        """Prepare ``score_tangent``: ``sd = c (qd k^T + q kd^T)`` is one product ``[c qd, c q] [k, kd]^T``
        of twice the width, formed per tile."""
        self.q_pair = torch.cat([self.problem.scale * q_dot, self.q_scaled], -1)
        self.k_pair = torch.cat([self.k, k_dot.expand_as(self.k)], -1)

    def score_tangent(self, rows: slice, keys: slice) -> Tensor:
        return self.q_pair[..., rows, :] @ self.k_pair[..., keys, :].transpose(-2, -1)

    def dropout(self, rows: slice, keys: slice) -> Tensor | None:
        """``keep / (1 - p)`` of the tile, or None without dropout."""
        if self.problem.dropout_p == 0:
            return None
        device = self.q.device
        keep = dropout_keep(
            self.seed,
            self.head_index,
            torch.arange(rows.start, rows.stop, device=device)[:, None],
            torch.arange(keys.start, keys.stop, device=device)[None, :],
            self.problem.dropout_p,
        )
        return keep.to(self.acc) / (1 - self.problem.dropout_p)

    def terms(self, s: Tensor, stat: Tensor, visible: Tensor | None, second: bool = False):
        """The spec's coefficients of a tile, 0 where a pair is not visible: ``(w, a, b)``, or with
        ``second`` ``(w, a, b, a2, b2, c)``. Coefficients the spec computes as one tensor (softmax's
        five are one exponential) stay one tensor. The tile's scores ``s`` are consumed: softmax's
        ``w = exp(s - L)`` (0 in a row with ``L = inf``) is computed in place on them, without the
        spec's temporaries."""
        if self.softmax:
            w = s.sub_(stat[..., None]).exp_()
            if visible is not None:
                w.masked_fill_(~visible, 0.0)
            return (w, w, w, w, w, torch.zeros_like(stat[..., None])) if second else (w, w, w)
        spec, p = self.problem.normalizer, self.problem.parameter
        if second:
            *values, c = spec.all_terms(s, stat, p)
        else:
            values = spec.terms(s, stat, p, self.problem.grad)
        if visible is not None:
            masked: dict[int, Tensor] = {}  # mask a shared tensor once
            for x in values:
                if id(x) not in masked:
                    masked[id(x)] = torch.where(visible, x, 0.0)
            values = [masked[id(x)] for x in values]
        return (*values, c) if second else tuple(values)

    def sink_weight(self, stat: Tensor) -> Tensor:
        """``alpha_i / N_i`` of the sink, ``exp(a_h - L_i)`` (0 for a row whose statistic is inf)."""
        return torch.exp(self.sinks[..., None] - stat)


def _dropped(x: Tensor, keep: Tensor | None) -> Tensor:
    return x if keep is None else x * keep


# Row chunk of the fused kernel on a band (sliding window): each chunk's keys span the chunk plus the
# band's width, so the work grows with T * width. Measured at T = 16384, window (512, 0), B=1 H=4 d=64
# fp32 on 2 cores, forward: 64 rows 87 ms, 128 rows 93 ms, 256 rows 99 ms (16 causal T = 1024 calls:
# about 105 ms); smaller chunks pay per-call overhead.
FUSED_BAND_ROWS = 64


def _fused_cpu_softmax(problem: Problem, q: Tensor, k: Tensor, v: Tensor, sinks, mask) -> bool:
    """Whether PyTorch's fused CPU flash attention computes this call exactly, and gives the
    log-sum-exp that is softmax's row statistic: plain softmax, no mask, sinks or dropout, equal head
    dims, and every query seeing at least one key (the kernel's log-sum-exp of an empty row is 0, not
    -inf). A band (causal with ``Tq != Tk``, a sliding window) runs as row chunks, each against the
    keys its rows can see, with the band as an additive mask (``_fused_band_chunks``). It is several
    times faster than the tiles below."""
    t_q, t_k = q.shape[2], k.shape[2]
    return (
        q.device.type == "cpu"
        and problem.normalizer == SOFTMAX
        and problem.grad == "exact"
        and problem.dropout_p == 0
        and sinks is None
        and mask is None
        and q.shape[-1] == v.shape[-1]
        and min(t_q, t_k) > 0
        and all(lo < hi for lo, hi, _, _ in (problem.key_range(i, i + 1, t_q, t_k) for i in (0, t_q - 1)))
    )


def _fused_band_chunks(problem: Problem, q: Tensor, k: Tensor):
    """Yield ``(rows, keys, additive mask or None, is_causal)`` covering the call with fused-kernel calls.

    Full attention and square causal attention are one call (the kernel's own ``is_causal`` is the
    top-left alignment, which is ours when ``Tq == Tk``). Otherwise chunks of ``FUSED_BAND_ROWS``
    rows each see the keys ``[lo, hi)`` of their band, masked (0 / -inf, in the inputs' dtype) only
    when the band cuts that rectangle.
    """
    t_q, t_k = q.shape[2], k.shape[2]
    if problem.left is None and (problem.right is None or (problem.right == 0 and t_q == t_k)):
        yield slice(0, t_q), slice(0, t_k), None, problem.causal
        return
    masks: dict[tuple[int, int, int], Tensor] = {}  # the band's pattern repeats along the diagonal
    for r0 in range(0, t_q, FUSED_BAND_ROWS):
        r1 = min(r0 + FUSED_BAND_ROWS, t_q)
        lo, hi, full_lo, full_hi = problem.key_range(r0, r1, t_q, t_k)
        mask = None
        if not (full_lo <= lo and hi <= full_hi):
            pattern = (r1 - r0, hi - lo, lo - r0)
            if pattern not in masks:
                visible = problem.visible(
                    torch.arange(r0, r1, device=q.device), torch.arange(lo, hi, device=q.device), t_q, t_k
                )
                masks[pattern] = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(
                    ~visible, float("-inf")
                )
            mask = masks[pattern]
        yield slice(r0, r1), slice(lo, hi), mask, False


def _fused_forward(problem: Problem, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    chunks = []
    for rows, keys, mask, causal in _fused_band_chunks(problem, q, k):
        chunks.append(
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, rows], k[:, :, keys], v[:, :, keys], 0.0, causal, attn_mask=mask, scale=problem.scale
            )
        )
    if len(chunks) == 1:
        return chunks[0]
    return torch.cat([out for out, _ in chunks], 2), torch.cat([lse for _, lse in chunks], 2)


def _fused_backward(problem: Problem, q, k, v, out, lse, grad_out) -> tuple[Tensor, Tensor, Tensor]:
    backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    chunks = list(_fused_band_chunks(problem, q, k))
    if len(chunks) == 1:  # one call covers every row and key: its gradients are the gradients
        _, _, mask, causal = chunks[0]
        return backward_op(grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=problem.scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, keys, mask, causal in chunks:
        dq_rows, dk_keys, dv_keys = backward_op(
            grad_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
            lse[:, :, rows], 0.0, causal, attn_mask=mask, scale=problem.scale,
        )  # fmt: skip
        dq[:, :, rows] = dq_rows
        dk[:, :, keys] += dk_keys  # neighbouring row chunks share keys
        dv[:, :, keys] += dv_keys
    return dq, dk, dv


def forward(problem: Problem, q, k, v, sinks, mask, seed) -> tuple[Tensor, Tensor]:
    """``(O (B, H, Tq, dv), stat (B, H, Tq))``; the statistic in the accumulation dtype."""
    if _fused_cpu_softmax(problem, q, k, v, sinks, mask):
        out, lse = _fused_forward(problem, q, k, v)
        return out, lse.to(accumulation_dtype(q.dtype))
    call = _Call(problem, q, k, v, sinks, mask, seed)
    spec, p = problem.normalizer, problem.parameter
    acc = call.q.new_zeros(*call.q.shape[:-1], v.shape[-1])  # sum_j phi v (dropped)
    if spec.shifted:
        shift = torch.full_like(acc[..., 0], spec.shift_floor)  # running max, log units
        if call.sinks is not None:
            shift = torch.maximum(shift, call.sinks[..., None])
        # N starts with the pseudo-keys: alpha e and the sink's exp(a - m)
        norm = torch.zeros_like(shift) if spec.alpha == 0 else spec.alpha * torch.exp(-shift)
        if call.sinks is not None:
            norm = norm + torch.exp(call.sinks[..., None] - shift)
    else:
        psi_sum = torch.zeros_like(acc[..., 0])
    for rows, keys, visible in call.tiles():
        s = call.scores(rows, keys)
        keep = call.dropout(rows, keys)
        if spec.shifted:
            s_visible = s if visible is None else s.masked_fill(~visible, float("-inf"))
            old = shift[..., rows]
            new = torch.maximum(old, s_visible.amax(-1))
            # a row that has seen no key yet (softmax) keeps shift -inf: evaluate it at 0 instead
            safe = torch.where(torch.isinf(new), 0.0, new)
            rescale = torch.exp(old - safe)  # 0 for a row's first visible tile
            acc[..., rows, :] *= rescale[..., None]
            norm[..., rows] *= rescale
            shift[..., rows] = new
            x, e = s - safe[..., None], torch.exp(-safe)[..., None]
        else:
            x, e = s, torch.ones_like(s[..., :1])
        phi = spec.phi(x, e, p)
        if visible is not None:
            phi = torch.where(visible, phi, 0.0)
        acc[..., rows, :] += _dropped(phi, keep) @ call.v[..., keys, :]  # [R, K] @ [K, dv] -> [R, dv]
        if spec.normalized:
            if spec.psi is spec.phi:  # softmax: the same exponential
                psi = phi
            else:
                psi = spec.psi(x, e, p)
                psi = psi if visible is None else torch.where(visible, psi, 0.0)
            psi_sum_tile = psi.sum(-1)
            if spec.shifted:
                norm[..., rows] += psi_sum_tile
            else:
                psi_sum[..., rows] += psi_sum_tile
    if spec.shifted:
        stat = spec.row_statistic(torch.where(torch.isinf(shift), 0.0, shift), norm)
    else:
        stat, norm = psi_sum, spec.norm(psi_sum)
    has_norm = norm > 0  # N = 0: a row with no visible key (softmax), whose output is 0
    out = acc * torch.where(has_norm, 1 / torch.where(has_norm, norm, 1.0), 0.0)[..., None]
    return call.ungroup(out), stat.flatten(1, 2)


def backward(problem: Problem, q, k, v, sinks, mask, seed, out, stat, grad_out):
    """``(dq, dk, dv, dsinks)``; ``dsinks`` is ``(B, H)`` or None."""
    if _fused_cpu_softmax(problem, q, k, v, sinks, mask):
        return (*_fused_backward(problem, q, k, v, out, stat, grad_out), None)
    call = _Call(problem, q, k, v, sinks, mask, seed)
    stat, g = call.grouped_rows(stat), call.grouped(grad_out)
    d_row = (g * call.grouped(out)).sum(-1)  # D_i = g_i . O_i  (O as dropped)
    dq, dk, dv = torch.zeros_like(call.q), call.key_zeros(call.q.shape[-1]), call.key_zeros(call.v.shape[-1])
    for rows, keys, visible in call.tiles():
        q_r, k_b, v_b, g_r = call.q[..., rows, :], call.k[..., keys, :], call.v[..., keys, :], g[..., rows, :]
        w, a, b = call.terms(call.scores(rows, keys), stat[..., rows], visible)
        keep = call.dropout(rows, keys)
        u = _dropped(g_r @ v_b.transpose(-2, -1), keep)  # [R, dv] @ [dv, K] -> [R, K]
        ds = a * u - d_row[..., rows, None] * b
        dv[..., keys, :] += call.key_product(_dropped(w, keep), g_r)  # [K, R] @ [R, dv]
        dq[..., rows, :] += ds @ k_b  # [R, K] @ [K, d] -> [R, d]
        dk[..., keys, :] += call.key_product(ds, q_r)  # [K, R] @ [R, d] -> [K, d]
    dsinks = None
    if call.sinks is not None:
        dsinks = -(d_row * call.sink_weight(stat)).sum(-1).flatten(1, 2).to(sinks.dtype)
    scale = problem.scale
    return call.ungroup(scale * dq), call.unshare(scale * dk), call.unshare(dv), dsinks


def jvp(problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot):
    """``(Od (B, H, Tq, dv), mu (B, H, Tq))`` with ``mu_i = Nd_i / N_i`` (the row's log-norm tangent)."""
    call = _Call(problem, q, k, v, sinks, mask, seed)
    stat = call.grouped_rows(stat)
    call.score_tangents(call.grouped(q_dot), call.shared(k_dot))
    vd = call.shared(v_dot)
    acc = torch.zeros_like(call.grouped(out))  # sum_j a sd v + w vd (dropped)
    mu = torch.zeros_like(stat)  # sum_j b sd
    for rows, keys, visible in call.tiles():
        sd = call.score_tangent(rows, keys)
        w, a, b = call.terms(call.scores(rows, keys), stat[..., rows], visible)
        keep = call.dropout(rows, keys)
        if b is a:  # softmax: mu sums the same products; sd is not needed after them
            a_sd = sd.mul_(a)
            mu[..., rows] += a_sd.sum(-1)
        else:
            a_sd = a * sd
            mu[..., rows] += (b * sd).sum(-1)
        acc_rows = acc[..., rows, :]
        acc_rows += _dropped(a_sd, keep) @ call.v[..., keys, :]  # [R, K] @ [K, dv] -> [R, dv]
        acc_rows += _dropped(w, keep) @ vd[..., keys, :]
    if call.sinks is not None:
        mu = mu + call.sink_weight(stat) * call.grouped_rows(sinks_dot)[..., None]
    out_dot = acc - mu[..., None] * call.grouped(out)
    return call.ungroup(out_dot), mu.flatten(1, 2)


def tangent_backward(
    problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot, out_dot, mu, h,
    need_tangent: bool = True,
):  # fmt: skip
    """Gradient of ``<h, Od>``: ``(dq, dk, dv, dsinks, dqd, dkd, dvd, dsinksd)`` (docs/math.md).

    The primal part (the first four) is the tangent, along ``(qd, kd, vd, sinksd)``, of the
    ordinary VJP with cotangent ``h``; the tangent part is that ordinary VJP. With
    ``need_tangent=False`` the tangent part is not formed (returned as None).
    """
    call = _Call(problem, q, k, v, sinks, mask, seed)
    stat, mu = call.grouped_rows(stat), call.grouped_rows(mu)
    qd, kd, vd = call.grouped(q_dot), call.shared(k_dot), call.shared(v_dot)
    call.score_tangents(qd, kd)
    h = call.grouped(h)
    h_out = (h * call.grouped(out)).sum(-1)  # h_i . O_i
    h_out_dot = (h * call.grouped(out_dot)).sum(-1)  # h_i . Od_i
    d, dv_width = call.q.shape[-1], call.v.shape[-1]
    dq, dqd = torch.zeros_like(call.q), torch.zeros_like(call.q)
    dk, dkd, dv, dvd = (
        call.key_zeros(d),
        call.key_zeros(d),
        call.key_zeros(dv_width),
        call.key_zeros(dv_width),
    )
    # softmax's five coefficients are the weight w: the closed form, in place on the tile's temporaries
    closed_form = call.softmax and problem.dropout_p == 0
    for rows, keys, visible in call.tiles():
        q_r, qd_r, h_r = call.q[..., rows, :], qd[..., rows, :], h[..., rows, :]
        k_b, kd_b, v_b, vd_b = call.k[..., keys, :], kd[..., keys, :], call.v[..., keys, :], vd[..., keys, :]
        s, sd = call.scores(rows, keys), call.score_tangent(rows, keys)
        mu_r, h_out_r = mu[..., rows, None], h_out[..., rows, None]
        if closed_form:
            # dsd = w (u - hO), ds = (sd - mu) dsd + w (z - hOd), dv term w (sd - mu) (docs/math.md, 7)
            w = call.terms(s, stat[..., rows], visible)[0]
            dsd = (h_r @ v_b.transpose(-2, -1)).sub_(h_out_r).mul_(w)  # [R, dv] @ [dv, K] -> [R, K]
            z = (h_r @ vd_b.transpose(-2, -1)).sub_(h_out_dot[..., rows, None])
            sd -= mu_r
            dv[..., keys, :] += call.key_product(w * sd, h_r)
            ds = sd.mul_(dsd).addcmul_(z, w)
            keep = None
        else:
            w, a, b, a2, b2, c = call.terms(s, stat[..., rows], visible, second=True)
            keep = call.dropout(rows, keys)
            u = _dropped(h_r @ v_b.transpose(-2, -1), keep)  # h_i . v_j  [R, K]
            z = _dropped(h_r @ vd_b.transpose(-2, -1), keep)  # h_i . vd_j
            row_coefficient = h_out_dot[..., rows, None] - h_out_r * mu_r * (1 - c)
            ds = a2 * sd * u + a * (z - u * mu_r) - b * row_coefficient - h_out_r * b2 * sd
            dsd = a * u - h_out_r * b  # the ordinary backward with cotangent h
            dv[..., keys, :] += call.key_product(_dropped(a * sd - w * mu_r, keep), h_r)
        dq[..., rows, :] += ds @ k_b + dsd @ kd_b
        dk[..., keys, :] += call.key_product(ds, q_r) + call.key_product(dsd, qd_r)
        if need_tangent:
            dvd[..., keys, :] += call.key_product(_dropped(w, keep), h_r)
            dqd[..., rows, :] += dsd @ k_b
            dkd[..., keys, :] += call.key_product(dsd, q_r)
    dsinks = dsinks_dot = None
    if call.sinks is not None:
        sink_w = call.sink_weight(stat)
        ad = call.grouped_rows(sinks_dot)[..., None]
        dsinks = -(sink_w * (h_out_dot + h_out * (ad - mu))).sum(-1).flatten(1, 2).to(sinks.dtype)
        dsinks_dot = -(sink_w * h_out).sum(-1).flatten(1, 2).to(sinks.dtype) if need_tangent else None
    scale = problem.scale
    primal = (call.ungroup(scale * dq), call.unshare(scale * dk), call.unshare(dv), dsinks)
    if not need_tangent:
        return (*primal, None, None, None, None)
    return (*primal, call.ungroup(scale * dqd), call.unshare(scale * dkd), call.unshare(dvd), dsinks_dot)


KERNELS = Kernels("torch", forward, backward, jvp, tangent_backward)
