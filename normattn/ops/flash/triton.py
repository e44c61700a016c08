"""Fused flash-attention kernels for the whole normalizer family (MATH.md sections 2, 3 and 5).

One kernel family, specialised at compile time on the normalizer (``SOFTMAX: tl.constexpr``):

* softmax: online max, ``exp2`` with ``log2(e)`` folded into the scale; the row statistic kept
  for the backward is the log-sum-exp in base 2, ``m_i + log2(l_i)`` of the scaled scores.
* beta: no exponentials; the row norm is accumulated as a sum of squared scores, and the row
  statistic is ``r_i = sqrt(sum_j s_ij^2)`` (``N_i = 1 + r_i``). Keeping ``r`` rather than ``N``
  avoids ``N - 1`` cancelling for tiny rows, where ``rho = D / (N r)`` needs ``r`` to full precision.

Kernels:

* ``_flash_fwd_kernel``: one program per (query tile, batch*head), looping over key tiles. With
  ``TANGENT`` it is also the JVP: the same single pass keeps the tangent's running sums (softmax:
  ``sum P sd v + sum P vd`` and ``mu = sum P sd``, rescaled with the running max; beta:
  ``sum sd v + sum s vd`` and ``sum s sd``) and writes ``Od`` without any ``T x T`` matrix.
* ``_flash_bwd_preprocess_kernel``: ``D_i = dO_i . O_i`` turned into the per-row coefficient
  the score gradient needs (softmax ``D``, beta ``rho = D / (N r)``, seed ``D / (r^2 N)``).
* ``_flash_bwd_dkdv_kernel``: one program per key tile, looping over query tiles.
* ``_flash_bwd_dq_kernel``: one program per query tile, looping over key tiles.
  No atomics: the backward is deterministic.

Masking: only tiles that straddle the causal diagonal (aligned bottom-right, ``j <= i + Tk - Tq``)
or a sequence end pay for a mask; every loop is split into unmasked and masked ranges. Any
sequence length works, and head dims are padded to the next power of two (at least 16) with
masked loads. Rows with no visible key give 0 output and 0 gradients.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...normalizers import Normalizer
from ..common import GRADIENT, TANGENT_OUTPUT, accumulation_dtype, composition_error, not_differentiable

__all__ = ["flash_attention_triton", "flash_forward", "flash_backward", "FlashAttentionTriton"]


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(
    base, rows, cols, n_rows, n_cols, stride_row, stride_col, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr
):
    """``base[rows, cols]`` with out-of-range entries read as 0; only the asked-for masks are paid."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0) if MASK_COLS else tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(base, tile, rows, cols, n_rows, n_cols, stride_row, stride_col):
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _visible(query, key, T_Q, T_K, causal_offset, CAUSAL: tl.constexpr):
    """Pairs that exist and, when causal, satisfy ``key <= query + Tk - Tq``.

    ``query`` and ``key`` come already broadcast (``[:, None]`` / ``[None, :]``) in the caller's
    orientation, so the forward and the transposed dK/dV tiles share this one definition.
    """
    ok = (query < T_Q) & (key < T_K)
    if CAUSAL:
        ok = ok & (key <= query + causal_offset)
    return ok


@triton.jit
def _key_loop_bounds(
    start_m, T_K, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """Key range of one query tile: ``[0, full_end)`` needs no mask, ``[full_end, end)`` does."""
    if CAUSAL:
        # the tile's last row sees keys up to start_m + BLOCK_M - 1 + offset; its first row up to
        # start_m + offset, so whole key tiles below that are visible to every row
        end = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_offset, T_K), 0)
        full_end = tl.maximum(tl.minimum(start_m + causal_offset + 1, T_K), 0) // BLOCK_N * BLOCK_N
    else:
        end = T_K
        full_end = T_K // BLOCK_N * BLOCK_N
    return full_end, end


# --------------------------------------------------------------------------------------------
# Forward (and JVP) kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    acc_o,
    acc_t,
    row_sum,
    row_max,
    row_tangent,
    q,
    qd,
    K_head,
    V_head,
    KD_head,
    VD_head,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    stride_kdt,
    stride_kdd,
    stride_vdt,
    stride_vdd,
    start_n,
    rows,
    T_Q,
    T_K,
    causal_offset,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAD_D: tl.constexpr,
    PAD_DV: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
    TANGENT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold one key tile into a query tile's running sums.

    softmax: ``row_sum = sum p``, ``row_max`` the running max (log2 units), ``row_tangent = sum p sd``.
    beta: ``row_sum = sum s^2``, ``row_max`` unused, ``row_tangent = sum s sd``.
    ``acc_o = sum phi v``; ``acc_t = sum phi' sd v + sum phi vd`` (seed: ``sum phi vd`` only).
    """
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    k = _load_tile(K_head, keys, dims, T_K, HEAD_DIM, stride_kt, stride_kd, MASKED, PAD_D)  # [BN, BD]
    v = _load_tile(V_head, keys, dims_v, T_K, HEAD_DIM_V, stride_vt, stride_vd, MASKED, PAD_DV)  # [BN, BDV]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, BD] @ [BD, BN] -> [BM, BN]
    if MASKED:
        visible = _visible(rows[:, None], keys[None, :], T_Q, T_K, causal_offset, CAUSAL)
    if TANGENT:
        kd = _load_tile(KD_head, keys, dims, T_K, HEAD_DIM, stride_kdt, stride_kdd, MASKED, PAD_D)
        vd = _load_tile(VD_head, keys, dims_v, T_K, HEAD_DIM_V, stride_vdt, stride_vdd, MASKED, PAD_DV)
        # sd = c (qd . k + q . kd): [BM, BD] @ [BD, BN] -> [BM, BN], twice into one accumulator
        sd = tl.dot(qd, tl.trans(k), input_precision=PRECISION)
        sd = tl.dot(q, tl.trans(kd), sd, input_precision=PRECISION) * scale
    if SOFTMAX:
        s = s * scale_log2
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # a row that has seen no visible key keeps a -inf max: shift by 0 so exp2 gives 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max) if MASKED else new_max
        rescale = tl.exp2(row_max - shift)
        p = tl.exp2(s - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        # [BM, BN] @ [BN, BDV] -> [BM, BDV]
        acc_o = tl.dot(p.to(v.dtype), v, acc_o * rescale[:, None], input_precision=PRECISION)
        if TANGENT:
            # masked pairs have p = 0, so p * sd needs no mask of its own
            p_sd = p * sd
            row_tangent = row_tangent * rescale + tl.sum(p_sd, 1)
            acc_t = tl.dot(p_sd.to(v.dtype), v, acc_t * rescale[:, None], input_precision=PRECISION)
            acc_t = tl.dot(p.to(vd.dtype), vd, acc_t, input_precision=PRECISION)
        row_max = new_max
    else:
        s = s * scale
        if MASKED:
            s = tl.where(visible, s, 0.0)
        row_sum += tl.sum(s * s, 1)
        acc_o = tl.dot(s.to(v.dtype), v, acc_o, input_precision=PRECISION)
        if TANGENT:
            if MASKED:
                sd = tl.where(visible, sd, 0.0)
            row_tangent += tl.sum(s * sd, 1)
            if not SEED:
                acc_t = tl.dot(sd.to(v.dtype), v, acc_t, input_precision=PRECISION)
            acc_t = tl.dot(s.to(vd.dtype), vd, acc_t, input_precision=PRECISION)
    return acc_o, acc_t, row_sum, row_max, row_tangent


@triton.jit(do_not_specialize=["T_Q", "T_K"])
def _flash_fwd_kernel(
    Q,
    K,
    V,
    QD,
    KD,
    VD,
    O,
    OD,
    STAT,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_qdb,
    stride_qdh,
    stride_qdt,
    stride_qdd,
    stride_kdb,
    stride_kdh,
    stride_kdt,
    stride_kdd,
    stride_vdb,
    stride_vdh,
    stride_vdt,
    stride_vdd,
    H,
    T_Q,
    T_K,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
    TANGENT: tl.constexpr,
    FP64: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # heavy causal tiles (late queries) first, so the tail of the launch is short
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    batch_head = tl.program_id(1)
    # 64-bit so that offsets into large batches of long sequences cannot overflow
    batch = (batch_head // H).to(tl.int64)
    head = (batch_head % H).to(tl.int64)
    acc_dtype = tl.float64 if FP64 else tl.float32
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    PAD_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V
    causal_offset = T_K - T_Q

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    Q_head = Q + batch * stride_qb + head * stride_qh
    K_head = K + batch * stride_kb + head * stride_kh
    V_head = V + batch * stride_vb + head * stride_vh
    QD_head = QD + batch * stride_qdb + head * stride_qdh
    KD_head = KD + batch * stride_kdb + head * stride_kdh
    VD_head = VD + batch * stride_vdb + head * stride_vdh

    q = _load_tile(Q_head, rows, dims, T_Q, HEAD_DIM, stride_qt, stride_qd, True, PAD_D)  # [BM, BD]
    qd = _load_tile(QD_head, rows, dims, T_Q, HEAD_DIM, stride_qdt, stride_qdd, True, PAD_D) if TANGENT else q
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    row_sum = tl.zeros([BLOCK_M], dtype=acc_dtype)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    row_tangent = tl.zeros([BLOCK_M], dtype=acc_dtype)

    full_end, end = _key_loop_bounds(start_m, T_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        acc_o, acc_t, row_sum, row_max, row_tangent = _fwd_tile(
            acc_o, acc_t, row_sum, row_max, row_tangent, q, qd, K_head, V_head, KD_head, VD_head,
            stride_kt, stride_kd, stride_vt, stride_vd, stride_kdt, stride_kdd, stride_vdt, stride_vdd,
            start_n, rows, T_Q, T_K, causal_offset, scale, scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV,
            False, CAUSAL, SOFTMAX, SEED, TANGENT, PRECISION,
        )  # fmt: skip
    for start_n in range(full_end, end, BLOCK_N):
        acc_o, acc_t, row_sum, row_max, row_tangent = _fwd_tile(
            acc_o, acc_t, row_sum, row_max, row_tangent, q, qd, K_head, V_head, KD_head, VD_head,
            stride_kt, stride_kd, stride_vt, stride_vd, stride_kdt, stride_kdd, stride_vdt, stride_vdd,
            start_n, rows, T_Q, T_K, causal_offset, scale, scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV,
            True, CAUSAL, SOFTMAX, SEED, TANGENT, PRECISION,
        )  # fmt: skip

    if SOFTMAX:
        # l = 0 only for a row with no visible key: output 0, and a +inf statistic so that the
        # backward's exp2(s - L) is 0 there instead of NaN
        has_keys = row_sum > 0
        safe_sum = tl.where(has_keys, row_sum, 1.0)
        inv_norm = tl.where(has_keys, 1.0 / safe_sum, 0.0)
        stat = tl.where(has_keys, row_max + tl.log2(safe_sum), float("inf"))
        o = acc_o * inv_norm[:, None]
        if TANGENT:
            # Od = sum P sd v + sum P vd - mu O,  mu = sum P sd
            od = (acc_t - row_tangent[:, None] * o) * inv_norm[:, None]
    else:
        r = tl.sqrt(row_sum)
        inv_norm = 1.0 / (1.0 + r)
        stat = r
        o = acc_o * inv_norm[:, None]
        if TANGENT:
            # exact: Od = (sum sd v + sum s vd) / N - O (s . sd) / (r N)
            # seed:  Od = sum s vd / N + O (s . sd) / (r^2 N); both drop the O term at r = 0
            safe_r = tl.where(r > 0, r, 1.0)
            if SEED:
                coefficient = tl.where(r > 0, row_tangent / (safe_r * safe_r), 0.0) * inv_norm
            else:
                coefficient = -tl.where(r > 0, row_tangent / safe_r, 0.0) * inv_norm
            od = acc_t * inv_norm[:, None] + coefficient[:, None] * o

    # O, Od and STAT are contiguous: (B, H, Tq, dv) and (B, H, Tq)
    row_base = batch_head.to(tl.int64) * T_Q
    _store_tile(O + row_base * HEAD_DIM_V, o, rows, dims_v, T_Q, HEAD_DIM_V, HEAD_DIM_V, 1)
    if TANGENT:
        _store_tile(OD + row_base * HEAD_DIM_V, od, rows, dims_v, T_Q, HEAD_DIM_V, HEAD_DIM_V, 1)
    tl.store(STAT + row_base + rows, stat.to(STAT.dtype.element_ty), mask=rows < T_Q)


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T_Q"])
def _flash_bwd_preprocess_kernel(
    O,
    DO,
    STAT,
    DELTA,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    H,
    T_Q,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
    FP64: tl.constexpr,
):
    """Per-row coefficient of the score gradient, from ``D_i = dO_i . O_i`` (MATH.md sections 3, 5).

    softmax ``D``; beta exact ``rho = D / (N r)``; beta seed ``D / (r^2 N)``; 0 where ``r = 0``.
    """
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = start_m + tl.arange(0, BLOCK_M)
    dims_v = tl.arange(0, BLOCK_DV)
    row_base = batch_head.to(tl.int64) * T_Q
    DO_head = DO + (batch_head // H).to(tl.int64) * stride_dob + (batch_head % H).to(tl.int64) * stride_doh
    o = _load_tile(O + row_base * HEAD_DIM_V, rows, dims_v, T_Q, HEAD_DIM_V, HEAD_DIM_V, 1, True, True)
    do = _load_tile(DO_head, rows, dims_v, T_Q, HEAD_DIM_V, stride_dot, stride_dod, True, True)
    delta = tl.sum(o.to(acc_dtype) * do.to(acc_dtype), 1)  # [BM]
    if not SOFTMAX:
        r = tl.load(STAT + row_base + rows, mask=rows < T_Q, other=0.0).to(acc_dtype)
        safe_r = tl.where(r > 0, r, 1.0)
        if SEED:
            delta = tl.where(r > 0, delta / (safe_r * safe_r * (1.0 + r)), 0.0)
        else:
            delta = tl.where(r > 0, delta / (safe_r * (1.0 + r)), 0.0)
    tl.store(DELTA + row_base + rows, delta.to(DELTA.dtype.element_ty), mask=rows < T_Q)


@triton.jit
def _score_grad(
    s,
    dp,
    stat,
    delta,
    visible,
    scale,
    scale_log2,
    ROW_AXIS: tl.constexpr,
    MASKED: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
):
    """Weights ``w`` and score gradient ``ds`` of a tile, from raw dot products ``s = q . k``.

    ``stat``/``delta`` are per query row; ``ROW_AXIS`` says which tile axis the queries run along
    (0 in the dQ kernel's ``[BM, BN]`` tiles, 1 in the dK/dV kernel's transposed ``[BN, BM]``).
    ``dp = dO . v`` is ignored in seed mode.
    """
    if ROW_AXIS == 0:
        stat = stat[:, None]
        delta = delta[:, None]
    else:
        stat = stat[None, :]
        delta = delta[None, :]
    if SOFTMAX:
        s = s * scale_log2
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        w = tl.exp2(s - stat)
        # ds = P (dP - D): masked pairs have P = 0
        ds = w * (dp - delta)
    else:
        s = s * scale
        if MASKED:
            s = tl.where(visible, s, 0.0)
        inv_norm = 1.0 / (1.0 + stat)
        w = s * inv_norm
        if SEED:
            ds = delta * s
        else:
            ds = dp * inv_norm - delta * s
            if MASKED:
                ds = tl.where(visible, ds, 0.0)
    return w, ds


@triton.jit
def _bwd_dkdv_tile(
    dk,
    dv,
    k,
    v,
    Q_head,
    DO_head,
    STAT_rows,
    DELTA_rows,
    stride_qt,
    stride_qd,
    stride_dot,
    stride_dod,
    start_m,
    keys,
    T_Q,
    T_K,
    causal_offset,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAD_D: tl.constexpr,
    PAD_DV: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q_head, rows, dims, T_Q, HEAD_DIM, stride_qt, stride_qd, MASKED, PAD_D)  # [BM, BD]
    do = _load_tile(DO_head, rows, dims_v, T_Q, HEAD_DIM_V, stride_dot, stride_dod, MASKED, PAD_DV)
    if MASKED:
        stat = tl.load(STAT_rows + rows, mask=rows < T_Q, other=0.0)
        delta = tl.load(DELTA_rows + rows, mask=rows < T_Q, other=0.0)
        visible = _visible(rows[None, :], keys[:, None], T_Q, T_K, causal_offset, CAUSAL)
    else:
        stat = tl.load(STAT_rows + rows)
        delta = tl.load(DELTA_rows + rows)
        visible = 0
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BN, BD] @ [BD, BM] -> [BN, BM]
    # dP^T = v dO^T: [BN, BDV] @ [BDV, BM] -> [BN, BM]; the seed's ds does not use it
    dp_t = s_t if SEED else tl.dot(v, tl.trans(do), input_precision=PRECISION)
    w_t, ds_t = _score_grad(s_t, dp_t, stat, delta, visible, scale, scale_log2, 1, MASKED, SOFTMAX, SEED)
    dv = tl.dot(w_t.to(do.dtype), do, dv, input_precision=PRECISION)  # [BN, BM] @ [BM, BDV] -> [BN, BDV]
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)  # [BN, BM] @ [BM, BD] -> [BN, BD]
    return dk, dv


@triton.jit(do_not_specialize=["T_Q", "T_K"])
def _flash_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    STAT,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    H,
    T_Q,
    T_K,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
    FP64: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    # 64-bit so that offsets into large batches of long sequences cannot overflow
    batch = (batch_head // H).to(tl.int64)
    head = (batch_head % H).to(tl.int64)
    acc_dtype = tl.float64 if FP64 else tl.float32
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    PAD_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V
    causal_offset = T_K - T_Q

    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    Q_head = Q + batch * stride_qb + head * stride_qh
    DO_head = DO + batch * stride_dob + head * stride_doh
    row_base = batch_head.to(tl.int64) * T_Q
    STAT_rows = STAT + row_base
    DELTA_rows = DELTA + row_base
    K_head = K + batch * stride_kb + head * stride_kh
    V_head = V + batch * stride_vb + head * stride_vh
    k = _load_tile(K_head, keys, dims, T_K, HEAD_DIM, stride_kt, stride_kd, True, PAD_D)  # [BN, BD]
    v = _load_tile(V_head, keys, dims_v, T_K, HEAD_DIM_V, stride_vt, stride_vd, True, PAD_DV)  # [BN, BDV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=acc_dtype)

    # Queries [start, band_end) straddle the causal diagonal of this key tile (masked), then
    # [band_end, full_end) see all of it (unmasked), then [full_end, T_Q) is the ragged tail.
    if CAUSAL:
        start = tl.minimum(tl.maximum(start_n - causal_offset, 0), T_Q)
        sees_all = tl.minimum(tl.maximum(tl.minimum(start_n + BLOCK_N, T_K) - 1 - causal_offset, start), T_Q)
        band_end = start + tl.cdiv(sees_all - start, BLOCK_M) * BLOCK_M
    else:
        start = 0
        band_end = 0
    full_end = band_end + tl.maximum(T_Q - band_end, 0) // BLOCK_M * BLOCK_M
    for start_m in range(start, band_end, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, Q_head, DO_head, STAT_rows, DELTA_rows,
            stride_qt, stride_qd, stride_dot, stride_dod,
            start_m, keys, T_Q, T_K, causal_offset, scale, scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV,
            True, CAUSAL, SOFTMAX, SEED, PRECISION,
        )  # fmt: skip
    for start_m in range(band_end, full_end, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, Q_head, DO_head, STAT_rows, DELTA_rows,
            stride_qt, stride_qd, stride_dot, stride_dod,
            start_m, keys, T_Q, T_K, causal_offset, scale, scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV,
            False, CAUSAL, SOFTMAX, SEED, PRECISION,
        )  # fmt: skip
    for start_m in range(full_end, T_Q, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, Q_head, DO_head, STAT_rows, DELTA_rows,
            stride_qt, stride_qd, stride_dot, stride_dod,
            start_m, keys, T_Q, T_K, causal_offset, scale, scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV,
            True, CAUSAL, SOFTMAX, SEED, PRECISION,
        )  # fmt: skip

    # DK, DV are contiguous (B, H, Tk, d) and (B, H, Tk, dv)
    key_base = batch_head.to(tl.int64) * T_K
    _store_tile(DK + key_base * HEAD_DIM, dk * scale, keys, dims, T_K, HEAD_DIM, HEAD_DIM, 1)
    _store_tile(DV + key_base * HEAD_DIM_V, dv, keys, dims_v, T_K, HEAD_DIM_V, HEAD_DIM_V, 1)


@triton.jit
def _bwd_dq_tile(
    dq,
    q,
    do,
    stat,
    delta,
    K_head,
    V_head,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    start_n,
    rows,
    T_Q,
    T_K,
    causal_offset,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAD_D: tl.constexpr,
    PAD_DV: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    k = _load_tile(K_head, keys, dims, T_K, HEAD_DIM, stride_kt, stride_kd, MASKED, PAD_D)  # [BN, BD]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, BD] @ [BD, BN] -> [BM, BN]
    if SEED:
        dp = s
    else:
        v = _load_tile(V_head, keys, dims_v, T_K, HEAD_DIM_V, stride_vt, stride_vd, MASKED, PAD_DV)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BDV] @ [BDV, BN] -> [BM, BN]
    visible = _visible(rows[:, None], keys[None, :], T_Q, T_K, causal_offset, CAUSAL) if MASKED else 0
    _, ds = _score_grad(s, dp, stat, delta, visible, scale, scale_log2, 0, MASKED, SOFTMAX, SEED)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # [BM, BN] @ [BN, BD] -> [BM, BD]


@triton.jit(do_not_specialize=["T_Q", "T_K"])
def _flash_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    STAT,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    H,
    T_Q,
    T_K,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SEED: tl.constexpr,
    FP64: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    batch_head = tl.program_id(1)
    # 64-bit so that offsets into large batches of long sequences cannot overflow
    batch = (batch_head // H).to(tl.int64)
    head = (batch_head % H).to(tl.int64)
    acc_dtype = tl.float64 if FP64 else tl.float32
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    PAD_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V
    causal_offset = T_K - T_Q

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    K_head = K + batch * stride_kb + head * stride_kh
    V_head = V + batch * stride_vb + head * stride_vh
    row_base = batch_head.to(tl.int64) * T_Q
    Q_head = Q + batch * stride_qb + head * stride_qh
    DO_head = DO + batch * stride_dob + head * stride_doh
    q = _load_tile(Q_head, rows, dims, T_Q, HEAD_DIM, stride_qt, stride_qd, True, PAD_D)  # [BM, BD]
    do = _load_tile(DO_head, rows, dims_v, T_Q, HEAD_DIM_V, stride_dot, stride_dod, True, PAD_DV)  # [BM, BDV]
    stat = tl.load(STAT + row_base + rows, mask=rows < T_Q, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=rows < T_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)

    full_end, end = _key_loop_bounds(start_m, T_K, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _bwd_dq_tile(
            dq, q, do, stat, delta, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
            start_n, rows, T_Q, T_K, causal_offset, scale, scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV,
            False, CAUSAL, SOFTMAX, SEED, PRECISION,
        )  # fmt: skip
    for start_n in range(full_end, end, BLOCK_N):
        dq = _bwd_dq_tile(
            dq, q, do, stat, delta, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
            start_n, rows, T_Q, T_K, causal_offset, scale, scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV,
            True, CAUSAL, SOFTMAX, SEED, PRECISION,
        )  # fmt: skip
    _store_tile(DQ + row_base * HEAD_DIM, dq * scale, rows, dims, T_Q, HEAD_DIM, HEAD_DIM, 1)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: ``BLOCK_M`` query rows, ``BLOCK_N`` keys per tile."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


_tile_override: Tiles | None = None
# Widest head the GPU tile table is sized for (register and shared-memory budget of one SM).
MAX_HEAD_DIM = 256


@contextlib.contextmanager
def override_tiles(block_m: int, block_n: int) -> Iterator[None]:
    """Force every kernel's tile sizes (tests use tiny tiles so the interpreter sees many tiles)."""
    global _tile_override
    previous, _tile_override = _tile_override, Tiles(block_m, block_n)
    try:
        yield
    finally:
        _tile_override = previous


# (kernel, 32/64-bit operands) -> ((largest padded head dim, tiles), ...). Chosen by compiling for
# sm_90 and reading registers and spills: 256-wide heads keep fp32 accumulators of [tile, 256] (two
# of them in the JVP) and need small tiles; fp32 with exact ("ieee") products runs on FMA units and
# spills from d = 128 on whatever the tile (it is the precise mode, not the fast one).
_GPU_TILES: dict[tuple[str, bool], tuple[tuple[int, Tiles], ...]] = {
    ("fwd", False): ((64, Tiles(128, 64, 4, 3)), (128, Tiles(128, 64, 8, 3)), (256, Tiles(64, 64, 8, 2))),
    ("jvp", False): ((64, Tiles(128, 64, 8, 2)), (128, Tiles(128, 32, 8, 2)), (256, Tiles(32, 32, 8, 2))),
    ("dkdv", False): ((64, Tiles(32, 128, 8, 3)), (128, Tiles(32, 128, 8, 2)), (256, Tiles(32, 32, 8, 2))),
    ("dq", False): ((64, Tiles(128, 32, 4, 3)), (128, Tiles(128, 32, 8, 2)), (256, Tiles(32, 32, 8, 2))),
    ("fwd", True): ((64, Tiles(32, 32, 4, 2)), (128, Tiles(16, 32, 4, 2)), (256, Tiles(16, 32, 8, 1))),
    ("jvp", True): ((128, Tiles(16, 32, 8, 1)), (256, Tiles(16, 16, 8, 1))),
    ("dkdv", True): ((128, Tiles(32, 64, 8, 2)), (256, Tiles(16, 32, 8, 1))),
    ("dq", True): ((64, Tiles(64, 32, 8, 2)), (128, Tiles(32, 32, 8, 2)), (256, Tiles(16, 32, 8, 1))),
}


def _pick_tiles(kernel: str, block_d: int, dtype: torch.dtype, on_gpu: bool) -> Tiles:
    """Tiles of ``kernel`` (``"fwd"``, ``"jvp"``, ``"dkdv"`` or ``"dq"``) for a padded head dim.

    ``"jvp"`` is the forward kernel with the tangent's two extra accumulators and three extra
    operands; ``"dkdv"`` keeps a key tile resident while query tiles stream, ``"dq"`` the reverse.
    """
    if _tile_override is not None:
        return _tile_override
    if not on_gpu:
        # the interpreter pays per tile op, not per element: big tiles mean fewer Python steps
        return Tiles(64, 64)
    by_head_dim = _GPU_TILES[(kernel, dtype.itemsize > 2)]
    return next((tiles for max_d, tiles in by_head_dim if block_d <= max_d), by_head_dim[-1][1])


def _block(dim: int) -> int:
    """Head dims pad to the next power of two, and to at least 16 (the smallest tensor-core K)."""
    return max(16, triton.next_power_of_2(dim))


def _kernel_flags(q: Tensor) -> dict:
    return {
        "FP64": q.dtype == torch.float64,
        # fp32/fp64 are compared exactly against references; tf32 is the (ignored) default for 16-bit
        "PRECISION": "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
    }


def _launch(kernel, grid: tuple[int, int], tiles: Tiles, on_gpu: bool, *args, **constexprs) -> None:
    """Launch with ``tiles``' BLOCK_M/BLOCK_N (those the kernel takes) and, on a GPU, warps and stages."""
    blocks = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n}
    # Triton rejects keyword arguments a kernel does not declare
    constexprs.update({name: size for name, size in blocks.items() if name in kernel.arg_names})
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages} if on_gpu else {}
    kernel[grid](*args, **constexprs, **options)


def flash_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tangents: tuple[Tensor, Tensor, Tensor] | None,
    softmax: bool,
    causal: bool,
    scale: float,
    seed: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the forward kernel: ``(O, row statistic, Od)``, ``Od`` None unless tangents are given.

    The statistic is ``(B, H, Tq)``: softmax the base-2 log-sum-exp of ``scale * log2(e) * q k^T``
    (``+inf`` for a row with no visible key), beta ``r``.
    """
    B, H, T_Q, d = q.shape
    T_K, d_v = k.shape[2], v.shape[3]
    o = torch.empty((B, H, T_Q, d_v), dtype=q.dtype, device=q.device)
    stat = torch.empty((B, H, T_Q), dtype=accumulation_dtype(q.dtype), device=q.device)
    tangent = tangents is not None
    od = torch.empty_like(o) if tangent else None
    if B * H == 0 or T_Q == 0:
        return o, stat, od
    if tangent:
        qd, kd, vd = tangents
    else:
        qd, kd, vd = q, k, v  # never read
    on_gpu = q.is_cuda
    tiles = _pick_tiles("jvp" if tangent else "fwd", _block(max(d, d_v)), q.dtype, on_gpu)
    grid = (triton.cdiv(T_Q, tiles.block_m), B * H)
    _launch(
        _flash_fwd_kernel, grid, tiles, on_gpu,
        q, k, v, qd, kd, vd, o, od if tangent else o, stat,
        *q.stride(), *k.stride(), *v.stride(), *qd.stride(), *kd.stride(), *vd.stride(),
        H, T_Q, T_K, scale, scale * math.log2(math.e),
        HEAD_DIM=d, HEAD_DIM_V=d_v, BLOCK_D=_block(d), BLOCK_DV=_block(d_v),
        CAUSAL=causal, SOFTMAX=softmax, SEED=seed, TANGENT=tangent, **_kernel_flags(q),
    )  # fmt: skip
    return o, stat, od


def flash_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    stat: Tensor,
    softmax: bool,
    causal: bool,
    scale: float,
    seed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` from the forward's output ``o`` and row statistic ``stat``."""
    B, H, T_Q, d = q.shape
    T_K, d_v = k.shape[2], v.shape[3]
    dq = torch.empty((B, H, T_Q, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, T_K, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, T_K, d_v), dtype=v.dtype, device=q.device)
    if B * H == 0 or T_Q == 0 or T_K == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    on_gpu = q.is_cuda
    flags = _kernel_flags(q)
    o, stat = o.contiguous(), stat.contiguous()
    delta = torch.empty_like(stat)
    block_d, block_dv = _block(d), _block(d_v)
    pre_tiles = Tiles(64, 16)
    _launch(
        _flash_bwd_preprocess_kernel, (triton.cdiv(T_Q, pre_tiles.block_m), B * H), pre_tiles, on_gpu,
        o, do, stat, delta, *do.stride(), H, T_Q,
        HEAD_DIM_V=d_v, BLOCK_DV=block_dv, SOFTMAX=softmax, SEED=seed, FP64=flags["FP64"],
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    args = (*strides, H, T_Q, T_K, scale, scale * math.log2(math.e))
    constexprs = dict(HEAD_DIM=d, HEAD_DIM_V=d_v, BLOCK_D=block_d, BLOCK_DV=block_dv)
    constexprs.update(CAUSAL=causal, SOFTMAX=softmax, SEED=seed)
    block = max(block_d, block_dv)
    tiles = _pick_tiles("dkdv", block, q.dtype, on_gpu)
    _launch(
        _flash_bwd_dkdv_kernel, (triton.cdiv(T_K, tiles.block_n), B * H), tiles, on_gpu,
        q, k, v, do, stat, delta, dk, dv, *args, **constexprs, **flags,
    )  # fmt: skip
    tiles = _pick_tiles("dq", block, q.dtype, on_gpu)
    _launch(
        _flash_bwd_dq_kernel, (triton.cdiv(T_Q, tiles.block_m), B * H), tiles, on_gpu,
        q, k, v, do, stat, delta, dq, *args, **constexprs, **flags,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class FlashAttentionTriton(torch.autograd.Function):
    """``(O, stat) = attention(q, k, v)``; ``stat`` is the non-differentiable row statistic.

    The kernels are reached through the ``torch.library`` ops of ``library.py``: under
    ``torch.func`` transforms ``backward`` and ``jvp`` see functorch-wrapped tensors, which only
    the dispatcher knows how to unwrap before handing raw pointers to Triton.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, softmax: bool, causal: bool, scale: float, seed: bool):
        return library.flash_attention_forward(q, k, v, softmax, causal, scale, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, softmax, causal, scale, seed = inputs
        o, stat = output
        ctx.mark_non_differentiable(stat)
        ctx.save_for_backward(q, k, v, o, stat)
        ctx.save_for_forward(q, k, v)
        ctx.config = (softmax, causal, scale, seed)

    @staticmethod
    def backward(ctx, do: Tensor, _dstat: Tensor | None):
        q, k, v, o, stat = ctx.saved_tensors
        with torch.no_grad():  # the kernels have no derivative of their own: see not_differentiable
            dq, dk, dv = library.flash_attention_backward(do, q, k, v, o, stat, *ctx.config)
        message = composition_error("triton", _normalizer_name(ctx.config[0]), GRADIENT)
        dq, dk, dv = (not_differentiable(d, message, q, k, v, do) for d in (dq, dk, dv))
        return dq, dk, dv, None, None, None, None

    @staticmethod
    def jvp(ctx, qd: Tensor | None, kd: Tensor | None, vd: Tensor | None, *_):
        q, k, v = ctx.saved_tensors
        primals, tangents = (q, k, v), (qd, kd, vd)
        qd, kd, vd = (torch.zeros_like(x) if t is None else t for x, t in zip(primals, tangents, strict=True))
        # first order only, like the backward: the kernels have no derivative of their own
        with torch.no_grad():
            od = library.flash_attention_jvp(q, k, v, qd, kd, vd, *ctx.config)
        message = composition_error("triton", _normalizer_name(ctx.config[0]), TANGENT_OUTPUT)
        return not_differentiable(od, message, q, k, v, qd, kd, vd), None


def _normalizer_name(softmax: bool) -> str:
    return "softmax" if softmax else "beta"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.allow_in_graph
def _flash_attention(
    q: Tensor, k: Tensor, v: Tensor, softmax: bool, causal: bool, scale: float, seed: bool
) -> Tensor:
    """``FlashAttentionTriton`` as one opaque node for ``torch.compile``.

    Dynamo refuses to trace an ``autograd.Function`` with a custom ``jvp``; allowed in the graph,
    the call is not traced by dynamo but by AOTAutograd, through the fake implementations of the
    ``library.py`` ops, so ``fullgraph=True`` works with backward and forward-mode AD alike.
    """
    return FlashAttentionTriton.apply(q, k, v, softmax, causal, scale, seed)[0]


def flash_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, normalizer: Normalizer, causal: bool, scale: float, grad: str
) -> Tensor:
    """Fused flash attention for softmax or beta with hand-derived backward and JVP kernels.

    Inputs are validated by ``normattn.attention``: ``q (B, H, Tq, d)``, ``k (B, H, Tk, d)``,
    ``v (B, H, Tk, dv)`` on a CUDA device (fp16/bf16/fp32), or on the CPU under
    ``TRITON_INTERPRET=1`` (fp32/fp64). Returns ``(B, H, Tq, dv)`` in the input dtype.
    Differentiable once, in reverse and forward mode (``torch.autograd``, ``torch.func``,
    ``torch.autograd.forward_ad``), eagerly and under ``torch.compile``.
    """
    if normalizer.name not in ("softmax", "beta"):
        raise ValueError(f'backend="triton" has kernels for softmax and beta, not "{normalizer.name}"')
    if not (q.is_cuda or (q.device.type == "cpu" and _interpreting())):
        raise ValueError(
            f"the triton flash kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got a tensor on {q.device}"
        )
    if q.is_cuda and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"the triton flash kernels take head dims up to {MAX_HEAD_DIM} on a GPU, got q {tuple(q.shape)}, "
            f"v {tuple(v.shape)}"
        )
    return _flash_attention(q, k, v, normalizer.name == "softmax", causal, scale, grad == "seed")


from . import library  # noqa: E402  (the torch.library ops that launch the kernels above)
