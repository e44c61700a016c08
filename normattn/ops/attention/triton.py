"""Fused flash-attention kernels for the whole normalizer family: forward, JVP, backward, and the
gradient of the JVP's tangent output (docs/math.md).

One kernel family, specialised at compile time on the normalizer (``NORM: tl.constexpr``, whose
element functions live in ``normattn/normalizers_triton.py``) and on the call's features
(``HAS_SINKS``, ``HAS_MASK``, ``DROPOUT``, ``SEED_MODE``):

* ``_fwd_kernel``: one program per (query tile, batch * head), looping over the key tiles the band
  lets it see. A shifted normalizer keeps a running max in log2 units (``exp2`` with ``log2(e)``
  folded into the scale) and rescales its running sums; the row statistic saved for the other
  kernels is ``L = m + log N`` (natural log; ``+inf`` for a row with no visible key), or ``Psi``
  for an unshifted normalizer.
* ``_jvp_kernel``: the tangent ``Od`` and ``mu = Nd / N`` from the saved statistic: no running max.
* ``_dkdv_kernel`` (one program per key tile and key/value head, looping over its query heads and
  query tiles) and ``_dq_kernel`` (one per query tile): the backward, deterministic, no atomics.
  With ``TANGENT`` the same two kernels compute the gradient of ``<h, Od>`` for the primal inputs
  and, with ``NEED_TANGENT``, for the tangents.

Only tiles crossing a band edge (causal diagonal, sliding window, ragged end) build the band mask;
the loops are split into masked and unmasked ranges and never visit a tile the band hides.
Grouped-query heads read their shared key/value head in place. Dropout bits are the counter-based
hash of ``problem.py``, computed per tile in every kernel. The per-row preprocessing (``D = g.O``,
``h.O``, ``h.Od``, the sinks' gradients) is a few torch ops in the launchers.

Order of this file (Liger-Kernel's): jit helpers, kernels, launchers, ``torch.library`` custom ops
(what ``torch.compile`` and ``torch.func`` see), and the ``Kernels`` adapter of the autograd layer.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...normalizers_triton import derivative_terms, forward_terms, norm_coefficients, second_terms
from ..triton_utils import (
    MAX_HEAD_DIM,
    accumulates_in_fp64,
    block,
    dot_precision,
    guard_derivatives,
    load_tile,
    store_tile,
    tiles,
)
from .autograd import Kernels
from .problem import COL_STEP, HEAD_STEP, MIX_1, MIX_2, ROW_STEP, Problem, keep_threshold

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_MIX_1 = tl.constexpr(MIX_1)
_MIX_2 = tl.constexpr(MIX_2)
_HEAD_STEP = tl.constexpr(HEAD_STEP)
_ROW_STEP = tl.constexpr(ROW_STEP)
_COL_STEP = tl.constexpr(COL_STEP)

# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (the same hash as ``problem.mix32``)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], _MIX_1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], _MIX_2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _dropout_key(SEED, head_index):
    """Per-(batch, head) key of the dropout hash, and the seed's high word."""
    seed = tl.load(SEED)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _mix32(seed_lo + head_index.to(tl.uint32) * tl.full([], _HEAD_STEP, tl.uint32))
    return key, seed_hi


@triton.jit
def _keep(key, seed_hi, rows, cols, threshold):
    """Keep bits of pairs (``rows``, ``cols`` broadcast-shaped index tensors)."""
    row_key = _mix32(key ^ (rows.to(tl.uint32) * tl.full([], _ROW_STEP, tl.uint32) + seed_hi))
    bits = _mix32(row_key ^ (cols.to(tl.uint32) * tl.full([], _COL_STEP, tl.uint32)))
    return bits >= threshold.to(tl.uint32)


@triton.jit
def _visible(
    rows,
    cols,
    T_Q,
    T_K,
    LEFT,
    RIGHT,
    MASK_head,
    stride_mt,
    stride_mk,
    BAND: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Visible pairs of a tile (``rows``/``cols`` broadcast-shaped, either orientation)."""
    ok = (rows < T_Q) & (cols < T_K)
    if BAND:
        diff = cols - rows - (T_K - T_Q)  # j - i - off
        ok = ok & (diff >= -LEFT) & (diff <= RIGHT)
    if HAS_MASK:
        allowed = tl.load(MASK_head + rows * stride_mt + cols * stride_mk, mask=ok, other=0)
        ok = ok & (allowed != 0)
    return ok


@triton.jit
def _split(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Tile starts for the range ``[lo, hi)``: ``[a, b)`` and ``[c, hi)`` need the band mask,
    ``[b, c)`` lies inside ``[full_lo, full_hi)`` and does not."""
    a = lo // BLOCK * BLOCK
    b = tl.minimum(tl.maximum(a, (full_lo + BLOCK - 1) // BLOCK * BLOCK), hi)
    c = tl.maximum(b, tl.minimum(full_hi // BLOCK * BLOCK, hi))
    return a, b, c


@triton.jit
def _phase_range(a, b, c, hi, PHASE: tl.constexpr):
    """The tiles of phase 0 (``[a, b)``, masked), 1 (``[b, c)``, unmasked) and 2 (``[c, hi)``, masked)."""
    start = a if PHASE == 0 else (b if PHASE == 1 else c)
    end = b if PHASE == 0 else (c if PHASE == 1 else hi)
    return start, end


@triton.jit
def _key_range(start_m, BLOCK_M: tl.constexpr, T_Q, T_K, LEFT, RIGHT):
    """Keys seen by some row of the query tile ``[start_m, start_m + BLOCK_M)``, and by every row."""
    off = T_K - T_Q
    last = tl.minimum(start_m + BLOCK_M, T_Q) - 1
    lo = tl.maximum(start_m + off - LEFT, 0)
    hi = tl.maximum(tl.minimum(last + off + RIGHT + 1, T_K), lo)
    full_lo = tl.maximum(last + off - LEFT, 0)
    full_hi = tl.minimum(start_m + off + RIGHT + 1, T_K)
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_range(start_n, BLOCK_N: tl.constexpr, T_Q, T_K, LEFT, RIGHT):
    """Queries that see some key of the key tile ``[start_n, start_n + BLOCK_N)``, and every key."""
    off = T_K - T_Q
    last = tl.minimum(start_n + BLOCK_N, T_K) - 1
    lo = tl.maximum(start_n - off - RIGHT, 0)
    hi = tl.maximum(tl.minimum(last - off + LEFT + 1, T_Q), lo)
    full_lo = tl.maximum(last - off - RIGHT, 0)
    full_hi = tl.minimum(start_n - off + LEFT + 1, T_Q)
    return lo, hi, full_lo, full_hi


@triton.jit
def _row_coefficients(stat, alpha, NORM: tl.constexpr, SHIFTED: tl.constexpr):
    """Per-row ``(shift in log2 units, 1/N, N'/N, N N''/N'^2)`` from the saved statistic.

    A shifted normalizer evaluated at ``L`` has ``1/N`` and ``N'/N`` folded in (they are 1).
    """
    zero = tl.zeros_like(stat)  # not stat * 0: the statistic of a row with no visible key is inf
    if SHIFTED:
        return stat * LOG2E, zero + 1.0, zero + 1.0, zero
    inv_norm, slope, curvature = norm_coefficients(stat, alpha, NORM)
    return zero, inv_norm, slope, curvature


@triton.jit
def _terms(
    s,
    shift2,
    inv_norm,
    slope,
    psi_sum,
    param,
    visible,
    NORM: tl.constexpr,
    SHIFTED: tl.constexpr,
    SEED_MODE: tl.constexpr,
    VISIBILITY: tl.constexpr,
):
    """``(x, e, w, a, b)`` of a score tile ``s`` (natural units) with broadcast row coefficients.

    ``w = phi / N``, ``a = phi' / N``, ``b = N' psi' / N``; 0 where not visible. ``SEED_MODE``:
    the shortcut's ``a = 0``, ``b = -w / Psi``.
    """
    if SHIFTED:
        x = s * LOG2E - shift2
        e = tl.exp2(-shift2)
    else:
        x = s
        e = shift2 * 0.0 + 1.0
    phi, dphi, dpsi = derivative_terms(x, e, param, NORM)
    w = phi * inv_norm
    if SEED_MODE:
        a = w * 0.0
        b = tl.where(psi_sum > 0, -w / tl.where(psi_sum > 0, psi_sum, 1.0), 0.0)
    else:
        a = dphi * inv_norm
        b = dpsi * slope
    if VISIBILITY:
        w = tl.where(visible, w, 0.0)
        a = tl.where(visible, a, 0.0)
        b = tl.where(visible, b, 0.0)
    return x, e, w, a, b


@triton.jit
def _second(x, e, inv_norm, slope, param, visible, NORM: tl.constexpr, VISIBILITY: tl.constexpr):
    """``(a2, b2) = (phi'' / N, N' psi'' / N)``, 0 where not visible."""
    d2phi, d2psi = second_terms(x, e, param, NORM)
    a2 = d2phi * inv_norm
    b2 = d2psi * slope
    if VISIBILITY:
        a2 = tl.where(visible, a2, 0.0)
        b2 = tl.where(visible, b2, 0.0)
    return a2, b2


@triton.jit
def _scalars(SCALARS):
    """``(scale, param, alpha, floor, keep_scale)``: the float scalars travel in a tensor of the
    accumulation dtype, since a float kernel argument is fp32 (float64 calls must stay exact)."""
    return (tl.load(SCALARS), tl.load(SCALARS + 1), tl.load(SCALARS + 2), tl.load(SCALARS + 3),
            tl.load(SCALARS + 4))  # fmt: skip


@triton.jit
def _query_program(H, GROUPS, BLOCK_M: tl.constexpr):
    """``(start_m, batch_head, batch, head, kv_head)`` of a program over (query tile, batch * head).

    Heavy tiles (late queries under a causal band) run first, so the tail of the launch is short;
    offsets are 64-bit so that large batches of long sequences cannot overflow.
    """
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    batch_head = tl.program_id(1)
    head = (batch_head % H).to(tl.int64)
    return start_m, batch_head, (batch_head // H).to(tl.int64), head, head // GROUPS


@triton.jit
def _load_rows(ptr, rows, n_rows, stride_row, stride_col, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``rows`` of an ``(n_rows, WIDTH)`` matrix as a ``[len(rows), BLOCK]`` tile, 0 outside."""
    cols = tl.arange(0, BLOCK)
    return load_tile(ptr, rows, rows < n_rows, cols, cols < WIDTH, stride_row, stride_col)


@triton.jit
def _store_rows(ptr, value, rows, n_rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Store a ``[len(rows), BLOCK]`` tile into rows of a contiguous ``(n_rows, WIDTH)`` matrix."""
    cols = tl.arange(0, BLOCK)
    store_tile(ptr, value, rows, rows < n_rows, cols, cols < WIDTH, WIDTH, 1)


@triton.jit
def _load_row_stat(ptr, rows, n_rows, dtype):
    return tl.load(ptr + rows, mask=rows < n_rows, other=0.0).to(dtype)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    acc, norm_acc, shift2, q, K_head, V_head, MASK_head,
    stride_kt, stride_kd, stride_vt, stride_vd, stride_mt, stride_mk,
    start_n, rows, T_Q, T_K, LEFT, RIGHT, qk_scale, param, key, seed_hi, threshold, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BAND: tl.constexpr, NORM: tl.constexpr, SHIFTED: tl.constexpr,
    NORMALIZED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into a query tile's running sums (``acc = sum phi v``, ``norm_acc = N``)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K_head, cols, T_K, stride_kt, stride_kd, HEAD_DIM, BLOCK_D)  # [BN, BD]
    v = _load_rows(V_head, cols, T_K, stride_vt, stride_vd, HEAD_DIM_V, BLOCK_DV)  # [BN, BDV]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BD] @ [BD, BN] -> [BM, BN]
    visible = _visible(
        rows[:, None], cols[None, :], T_Q, T_K, LEFT, RIGHT, MASK_head, stride_mt, stride_mk, BAND, HAS_MASK
    )
    if SHIFTED:
        if BAND or HAS_MASK:
            s = tl.where(visible, s, float("-inf"))
        new = tl.maximum(shift2, tl.max(s, 1))
        # a row that has seen no visible key (softmax) keeps shift -inf: evaluate it at 0 instead
        safe = tl.where(new == float("-inf"), 0.0, new)
        rescale = tl.exp2(shift2 - safe)
        acc = acc * rescale[:, None]
        norm_acc = norm_acc * rescale
        shift2 = new
        x = s - safe[:, None]
        e = tl.exp2(-safe)[:, None]
    else:
        x = s
        e = 1.0
    phi, psi = forward_terms(x, e, param, NORM)
    if BAND or HAS_MASK:
        phi = tl.where(visible, phi, 0.0)
        psi = tl.where(visible, psi, 0.0)
    if NORMALIZED:
        norm_acc += tl.sum(psi, 1)
    if DROPOUT:
        phi = tl.where(_keep(key, seed_hi, rows[:, None], cols[None, :], threshold), phi * keep_scale, 0.0)
    acc = tl.dot(phi.to(v.dtype), v, acc, input_precision=PRECISION)  # [BM, BN] @ [BN, BDV] -> [BM, BDV]
    return acc, norm_acc, shift2


@triton.jit(do_not_specialize=["T_Q", "T_K", "LEFT", "RIGHT"])
def _fwd_kernel(
    Q, K, V, SINKS, MASK, SEED, O, STAT,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd, stride_sb, stride_sh,
    stride_mb, stride_mh, stride_mt, stride_mk,
    H, GROUPS, T_Q, T_K, LEFT, RIGHT, SCALARS, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NORM: tl.constexpr, SHIFTED: tl.constexpr,
    NORMALIZED: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    scale, param, alpha, floor, keep_scale = _scalars(SCALARS)
    start_m, batch_head, batch, head, kv_head = _query_program(H, GROUPS, BLOCK_M)
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = start_m + tl.arange(0, BLOCK_M)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    MASK_head = MASK + batch * stride_mb + head * stride_mh
    q = _load_rows(
        Q + batch * stride_qb + head * stride_qh, rows, T_Q, stride_qt, stride_qd, HEAD_DIM, BLOCK_D
    )
    qk_scale = scale * LOG2E if SHIFTED else scale
    key, seed_hi = (0, 0)
    if DROPOUT:
        key, seed_hi = _dropout_key(SEED, batch_head)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    if SHIFTED:
        # N starts with the pseudo-keys: alpha exp(-m), and the sink, a key of logit a and value 0
        shift2 = tl.zeros([BLOCK_M], dtype=acc_dtype) + floor * LOG2E
        if HAS_SINKS:
            sink2 = tl.load(SINKS + batch * stride_sb + head * stride_sh).to(acc_dtype) * LOG2E
            shift2 = tl.maximum(shift2, sink2)
        finite = shift2 != float("-inf")
        norm_acc = tl.where(finite, alpha * tl.exp2(-tl.where(finite, shift2, 0.0)), 0.0)
        if HAS_SINKS:
            norm_acc += tl.exp2(sink2 - shift2)
    else:
        shift2 = tl.zeros([BLOCK_M], dtype=acc_dtype)
        norm_acc = tl.zeros([BLOCK_M], dtype=acc_dtype)

    lo, hi, full_lo, full_hi = _key_range(start_m, BLOCK_M, T_Q, T_K, LEFT, RIGHT)
    a, b, c = _split(lo, hi, full_lo, full_hi, BLOCK_N)
    for phase in tl.static_range(3):  # masked, unmasked, masked: only band edges pay the mask
        start, end = _phase_range(a, b, c, hi, phase)
        for start_n in range(start, end, BLOCK_N):
            acc, norm_acc, shift2 = _fwd_tile(
                acc, norm_acc, shift2, q, K_head, V_head, MASK_head, stride_kt, stride_kd, stride_vt,
                stride_vd, stride_mt, stride_mk, start_n, rows, T_Q, T_K, LEFT, RIGHT, qk_scale, param,
                key, seed_hi,
                threshold, keep_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                phase != 1, NORM, SHIFTED, NORMALIZED, HAS_MASK, DROPOUT, PRECISION,
            )  # fmt: skip

    if SHIFTED:
        # N = 0 only for a row with no visible key and no pseudo-key: output 0, statistic +inf
        has_keys = norm_acc > 0
        safe_norm = tl.where(has_keys, norm_acc, 1.0)
        inv_norm = tl.where(has_keys, 1.0 / safe_norm, 0.0)
        shift2 = tl.where(shift2 == float("-inf"), 0.0, shift2)
        stat = tl.where(has_keys, (shift2 + tl.log2(safe_norm)) * LN2, float("inf"))
    else:
        inv_norm, _, _ = norm_coefficients(norm_acc, alpha, NORM)
        stat = norm_acc
    row_base = batch_head.to(tl.int64) * T_Q  # O and STAT are contiguous
    _store_rows(O + row_base * HEAD_DIM_V, acc * inv_norm[:, None], rows, T_Q, HEAD_DIM_V, BLOCK_DV)
    tl.store(STAT + row_base + rows, stat.to(STAT.dtype.element_ty), mask=rows < T_Q)


# --------------------------------------------------------------------------------------------
# JVP
# --------------------------------------------------------------------------------------------


@triton.jit
def _jvp_tile(
    acc, mu, q, qd, shift2, inv_norm, slope, psi_sum, K_head, V_head, KD_head, VD_head, MASK_head,
    stride_kt, stride_kd, stride_vt, stride_vd, stride_kdt, stride_kdd, stride_vdt, stride_vdd,
    stride_mt, stride_mk, start_n, rows, T_Q, T_K, LEFT, RIGHT, scale, param, key, seed_hi, threshold,
    keep_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BAND: tl.constexpr, NORM: tl.constexpr,
    SHIFTED: tl.constexpr, SEED_MODE: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into ``acc = sum a sd v + sum w vd`` and ``mu = sum b sd``."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K_head, cols, T_K, stride_kt, stride_kd, HEAD_DIM, BLOCK_D)
    v = _load_rows(V_head, cols, T_K, stride_vt, stride_vd, HEAD_DIM_V, BLOCK_DV)
    kd = _load_rows(KD_head, cols, T_K, stride_kdt, stride_kdd, HEAD_DIM, BLOCK_D)
    vd = _load_rows(VD_head, cols, T_K, stride_vdt, stride_vdd, HEAD_DIM_V, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]
    # sd = c (qd . k + q . kd), two products into one accumulator
    sd = tl.dot(qd, tl.trans(k), input_precision=PRECISION)
    sd = tl.dot(q, tl.trans(kd), sd, input_precision=PRECISION) * scale
    visible = _visible(
        rows[:, None], cols[None, :], T_Q, T_K, LEFT, RIGHT, MASK_head, stride_mt, stride_mk, BAND, HAS_MASK
    )
    _, _, w, a, b = _terms(
        s, shift2[:, None], inv_norm[:, None], slope[:, None], psi_sum[:, None], param, visible,
        NORM, SHIFTED, SEED_MODE, BAND or HAS_MASK,
    )  # fmt: skip
    mu += tl.sum(b * sd, 1)
    a_sd = a * sd
    if DROPOUT:
        keep = _keep(key, seed_hi, rows[:, None], cols[None, :], threshold)
        a_sd = tl.where(keep, a_sd * keep_scale, 0.0)
        w = tl.where(keep, w * keep_scale, 0.0)
    acc = tl.dot(a_sd.to(v.dtype), v, acc, input_precision=PRECISION)  # [BM, BN] @ [BN, BDV]
    acc = tl.dot(w.to(vd.dtype), vd, acc, input_precision=PRECISION)
    return acc, mu


@triton.jit(do_not_specialize=["T_Q", "T_K", "LEFT", "RIGHT"])
def _jvp_kernel(
    Q, K, V, QD, KD, VD, SINKS, SINKS_DOT, MASK, SEED, O, STAT, OD, MU,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd, stride_qdb, stride_qdh, stride_qdt, stride_qdd,
    stride_kdb, stride_kdh, stride_kdt, stride_kdd, stride_vdb, stride_vdh, stride_vdt, stride_vdd,
    stride_sb, stride_sh, stride_sdb, stride_sdh, stride_mb, stride_mh, stride_mt, stride_mk,
    H, GROUPS, T_Q, T_K, LEFT, RIGHT, SCALARS, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NORM: tl.constexpr, SHIFTED: tl.constexpr,
    SEED_MODE: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    scale, param, alpha, _, keep_scale = _scalars(SCALARS)
    start_m, batch_head, batch, head, kv_head = _query_program(H, GROUPS, BLOCK_M)
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = start_m + tl.arange(0, BLOCK_M)
    row_base = batch_head.to(tl.int64) * T_Q  # O, OD, STAT and MU are contiguous
    q = _load_rows(
        Q + batch * stride_qb + head * stride_qh, rows, T_Q, stride_qt, stride_qd, HEAD_DIM, BLOCK_D
    )
    qd = _load_rows(
        QD + batch * stride_qdb + head * stride_qdh, rows, T_Q, stride_qdt, stride_qdd, HEAD_DIM, BLOCK_D
    )
    stat = _load_row_stat(STAT + row_base, rows, T_Q, acc_dtype)
    shift2, inv_norm, slope, _ = _row_coefficients(stat, alpha, NORM, SHIFTED)
    key, seed_hi = (0, 0)
    if DROPOUT:
        key, seed_hi = _dropout_key(SEED, batch_head)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    KD_head = KD + batch * stride_kdb + kv_head * stride_kdh
    VD_head = VD + batch * stride_vdb + kv_head * stride_vdh
    MASK_head = MASK + batch * stride_mb + head * stride_mh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_dtype)
    mu = tl.zeros([BLOCK_M], dtype=acc_dtype)

    lo, hi, full_lo, full_hi = _key_range(start_m, BLOCK_M, T_Q, T_K, LEFT, RIGHT)
    a, b, c = _split(lo, hi, full_lo, full_hi, BLOCK_N)
    for phase in tl.static_range(3):  # masked, unmasked, masked: only band edges pay the mask
        start, end = _phase_range(a, b, c, hi, phase)
        for start_n in range(start, end, BLOCK_N):
            acc, mu = _jvp_tile(
                acc, mu, q, qd, shift2, inv_norm, slope, stat, K_head, V_head, KD_head, VD_head, MASK_head,
                stride_kt, stride_kd, stride_vt, stride_vd, stride_kdt, stride_kdd, stride_vdt, stride_vdd,
                stride_mt, stride_mk, start_n, rows, T_Q, T_K, LEFT, RIGHT, scale, param, key, seed_hi,
                threshold, keep_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, phase != 1, NORM,
                SHIFTED, SEED_MODE, HAS_MASK, DROPOUT, PRECISION,
            )  # fmt: skip

    if HAS_SINKS:
        # the sink's share of N moves with its logit's tangent: mu += (alpha_i / N_i) a_dot
        sink = tl.load(SINKS + batch * stride_sb + head * stride_sh).to(acc_dtype)
        sink_dot = tl.load(SINKS_DOT + batch * stride_sdb + head * stride_sdh).to(acc_dtype)
        mu += tl.exp2(sink * LOG2E - shift2) * sink_dot
    o = _load_rows(O + row_base * HEAD_DIM_V, rows, T_Q, HEAD_DIM_V, 1, HEAD_DIM_V, BLOCK_DV).to(acc_dtype)
    od = acc - mu[:, None] * o  # Od = sum a sd v + sum w vd - mu O
    _store_rows(OD + row_base * HEAD_DIM_V, od, rows, T_Q, HEAD_DIM_V, BLOCK_DV)
    tl.store(MU + row_base + rows, mu.to(MU.dtype.element_ty), mask=rows < T_Q)


# --------------------------------------------------------------------------------------------
# Backward, and the gradient of the JVP's output (TANGENT)
# --------------------------------------------------------------------------------------------


@triton.jit
def _score_grads(
    s, sd, u, z, shift2, inv_norm, slope, psi_sum, curvature, delta, mu, h_out, h_out_dot, param, visible,
    keep, keep_scale,
    NORM: tl.constexpr, SHIFTED: tl.constexpr, SEED_MODE: tl.constexpr, VISIBILITY: tl.constexpr,
    DROPOUT: tl.constexpr, TANGENT: tl.constexpr,
):  # fmt: skip
    """Score gradients of a tile in either orientation (row statistics come broadcast).

    Backward: ``(w~, ds, -, -)`` with ``ds = a u - D b``, ``u = g.v``. TANGENT: ``(w~, ds, dsd, dv~)``,
    the gradient of ``<h, Od>`` (docs/math.md, section 7), ``u = h.v``, ``z = h.vd``. ``w~`` is the
    dropped weight that carries the cotangent into ``dv`` (``dvd`` when TANGENT), ``dv~`` the one
    that carries it into ``dv`` when TANGENT.
    """
    x, e, w, a, b = _terms(
        s, shift2, inv_norm, slope, psi_sum, param, visible, NORM, SHIFTED, SEED_MODE, VISIBILITY
    )
    if DROPOUT:
        u = tl.where(keep, u * keep_scale, 0.0)
    if TANGENT:
        a2, b2 = _second(x, e, inv_norm, slope, param, visible, NORM, VISIBILITY)
        if DROPOUT:
            z = tl.where(keep, z * keep_scale, 0.0)
        row = h_out_dot - h_out * mu * (1.0 - curvature)
        ds = a2 * sd * u + a * (z - u * mu) - b * row - h_out * b2 * sd
        dsd = a * u - h_out * b
        dv_weight = a * sd - w * mu
    else:
        ds = a * u - delta * b
        dsd = ds
        dv_weight = ds
    if DROPOUT:
        w = tl.where(keep, w * keep_scale, 0.0)
        dv_weight = tl.where(keep, dv_weight * keep_scale, 0.0)
    return w, ds, dsd, dv_weight


@triton.jit
def _dq_tile(
    dq, dqd, q, qd, do, shift2, inv_norm, slope, psi_sum, curvature, delta, mu, h_out, h_out_dot,
    K_head, V_head, KD_head, VD_head, MASK_head,
    stride_kt, stride_kd, stride_vt, stride_vd, stride_kdt, stride_kdd, stride_vdt, stride_vdd,
    stride_mt, stride_mk, start_n, rows, T_Q, T_K, LEFT, RIGHT, scale, param, key, seed_hi, threshold,
    keep_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BAND: tl.constexpr, NORM: tl.constexpr,
    SHIFTED: tl.constexpr, SEED_MODE: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    TANGENT: tl.constexpr, NEED_TANGENT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K_head, cols, T_K, stride_kt, stride_kd, HEAD_DIM, BLOCK_D)
    v = _load_rows(V_head, cols, T_K, stride_vt, stride_vd, HEAD_DIM_V, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]
    u = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # g.v (h.v): [BM, BDV] @ [BDV, BN]
    visible = _visible(
        rows[:, None], cols[None, :], T_Q, T_K, LEFT, RIGHT, MASK_head, stride_mt, stride_mk, BAND, HAS_MASK
    )
    keep = visible
    if DROPOUT:
        keep = _keep(key, seed_hi, rows[:, None], cols[None, :], threshold)
    if TANGENT:
        kd = _load_rows(KD_head, cols, T_K, stride_kdt, stride_kdd, HEAD_DIM, BLOCK_D)
        vd = _load_rows(VD_head, cols, T_K, stride_vdt, stride_vdd, HEAD_DIM_V, BLOCK_DV)
        sd = tl.dot(qd, tl.trans(k), input_precision=PRECISION)
        sd = tl.dot(q, tl.trans(kd), sd, input_precision=PRECISION) * scale
        z = tl.dot(do, tl.trans(vd), input_precision=PRECISION)
    else:
        kd = k
        sd = s
        z = u
    _, ds, dsd, _ = _score_grads(
        s, sd, u, z, shift2[:, None], inv_norm[:, None], slope[:, None], psi_sum[:, None], curvature[:, None],
        delta[:, None], mu[:, None], h_out[:, None], h_out_dot[:, None], param, visible, keep, keep_scale,
        NORM, SHIFTED, SEED_MODE, BAND or HAS_MASK, DROPOUT, TANGENT,
    )  # fmt: skip
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # [BM, BN] @ [BN, BD]
    if TANGENT:
        dq = tl.dot(dsd.to(kd.dtype), kd, dq, input_precision=PRECISION)
        if NEED_TANGENT:
            dqd = tl.dot(dsd.to(k.dtype), k, dqd, input_precision=PRECISION)
    return dq, dqd


@triton.jit(do_not_specialize=["T_Q", "T_K", "LEFT", "RIGHT"])
def _dq_kernel(
    Q, K, V, QD, KD, VD, DO, MASK, SEED, STAT, DELTA, MU, HO, HOD, DQ, DQD,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd, stride_qdb, stride_qdh, stride_qdt, stride_qdd,
    stride_kdb, stride_kdh, stride_kdt, stride_kdd, stride_vdb, stride_vdh, stride_vdt, stride_vdd,
    stride_dob, stride_doh, stride_dot, stride_dod, stride_mb, stride_mh, stride_mt, stride_mk,
    H, GROUPS, T_Q, T_K, LEFT, RIGHT, SCALARS, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NORM: tl.constexpr, SHIFTED: tl.constexpr,
    SEED_MODE: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, TANGENT: tl.constexpr,
    NEED_TANGENT: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    scale, param, alpha, _, keep_scale = _scalars(SCALARS)
    start_m, batch_head, batch, head, kv_head = _query_program(H, GROUPS, BLOCK_M)
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = start_m + tl.arange(0, BLOCK_M)
    row_base = batch_head.to(tl.int64) * T_Q  # the row statistics, DQ and DQD are contiguous
    q = _load_rows(
        Q + batch * stride_qb + head * stride_qh, rows, T_Q, stride_qt, stride_qd, HEAD_DIM, BLOCK_D
    )
    do = _load_rows(
        DO + batch * stride_dob + head * stride_doh, rows, T_Q, stride_dot, stride_dod, HEAD_DIM_V, BLOCK_DV
    )
    stat = _load_row_stat(STAT + row_base, rows, T_Q, acc_dtype)
    shift2, inv_norm, slope, curvature = _row_coefficients(stat, alpha, NORM, SHIFTED)
    if TANGENT:
        qd = _load_rows(
            QD + batch * stride_qdb + head * stride_qdh, rows, T_Q, stride_qdt, stride_qdd, HEAD_DIM, BLOCK_D
        )
        mu = _load_row_stat(MU + row_base, rows, T_Q, acc_dtype)
        h_out = _load_row_stat(HO + row_base, rows, T_Q, acc_dtype)
        h_out_dot = _load_row_stat(HOD + row_base, rows, T_Q, acc_dtype)
        delta = mu
    else:  # only D is used
        qd = q
        delta = _load_row_stat(DELTA + row_base, rows, T_Q, acc_dtype)
        mu = delta
        h_out = delta
        h_out_dot = delta
    key, seed_hi = (0, 0)
    if DROPOUT:
        key, seed_hi = _dropout_key(SEED, batch_head)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    KD_head = KD + batch * stride_kdb + kv_head * stride_kdh
    VD_head = VD + batch * stride_vdb + kv_head * stride_vdh
    MASK_head = MASK + batch * stride_mb + head * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)
    dqd = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)

    lo, hi, full_lo, full_hi = _key_range(start_m, BLOCK_M, T_Q, T_K, LEFT, RIGHT)
    a, b, c = _split(lo, hi, full_lo, full_hi, BLOCK_N)
    for phase in tl.static_range(3):  # masked, unmasked, masked: only band edges pay the mask
        start, end = _phase_range(a, b, c, hi, phase)
        for start_n in range(start, end, BLOCK_N):
            dq, dqd = _dq_tile(
                dq, dqd, q, qd, do, shift2, inv_norm, slope, stat, curvature, delta, mu, h_out, h_out_dot,
                K_head, V_head, KD_head, VD_head, MASK_head, stride_kt, stride_kd, stride_vt, stride_vd,
                stride_kdt, stride_kdd, stride_vdt, stride_vdd, stride_mt, stride_mk, start_n, rows, T_Q, T_K,
                LEFT, RIGHT, scale, param, key, seed_hi, threshold, keep_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                BLOCK_D, BLOCK_DV, phase != 1, NORM, SHIFTED, SEED_MODE, HAS_MASK, DROPOUT, TANGENT,
                NEED_TANGENT, PRECISION,
            )  # fmt: skip
    _store_rows(DQ + row_base * HEAD_DIM, dq * scale, rows, T_Q, HEAD_DIM, BLOCK_D)
    if TANGENT and NEED_TANGENT:
        _store_rows(DQD + row_base * HEAD_DIM, dqd * scale, rows, T_Q, HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_tile(
    dk, dv, dkd, dvd, k, v, kd, vd, Q_head, QD_head, DO_head, MASK_head, STAT, DELTA, MU, HO, HOD,
    stride_qt, stride_qd, stride_qdt, stride_qdd, stride_dot, stride_dod, stride_mt, stride_mk,
    start_m, cols, T_Q, T_K, LEFT, RIGHT, scale, param, alpha, seed_key, seed_hi, threshold, keep_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BAND: tl.constexpr, NORM: tl.constexpr, SHIFTED: tl.constexpr,
    SEED_MODE: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, TANGENT: tl.constexpr,
    NEED_TANGENT: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One query tile against the resident key tile, transposed: ``[BN, BM]`` score tiles."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q_head, rows, T_Q, stride_qt, stride_qd, HEAD_DIM, BLOCK_D)  # [BM, BD]
    do = _load_rows(DO_head, rows, T_Q, stride_dot, stride_dod, HEAD_DIM_V, BLOCK_DV)  # [BM, BDV]
    stat = _load_row_stat(STAT, rows, T_Q, acc_dtype)
    shift2, inv_norm, slope, curvature = _row_coefficients(stat, alpha, NORM, SHIFTED)
    s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [BN, BD] @ [BD, BM] -> [BN, BM]
    u = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # v.g (v.h): [BN, BM]
    visible = _visible(
        rows[None, :], cols[:, None], T_Q, T_K, LEFT, RIGHT, MASK_head, stride_mt, stride_mk, BAND, HAS_MASK
    )
    keep = visible
    if DROPOUT:
        keep = _keep(seed_key, seed_hi, rows[None, :], cols[:, None], threshold)
    if TANGENT:
        qd = _load_rows(QD_head, rows, T_Q, stride_qdt, stride_qdd, HEAD_DIM, BLOCK_D)
        sd = tl.dot(k, tl.trans(qd), input_precision=PRECISION)
        sd = tl.dot(kd, tl.trans(q), sd, input_precision=PRECISION) * scale
        z = tl.dot(vd, tl.trans(do), input_precision=PRECISION)
        mu = _load_row_stat(MU, rows, T_Q, acc_dtype)
        h_out = _load_row_stat(HO, rows, T_Q, acc_dtype)
        h_out_dot = _load_row_stat(HOD, rows, T_Q, acc_dtype)
        delta = mu
    else:  # only D is used
        qd = q
        sd = s
        z = u
        delta = _load_row_stat(DELTA, rows, T_Q, acc_dtype)
        mu = delta
        h_out = delta
        h_out_dot = delta
    w, ds, dsd, dv_weight = _score_grads(
        s, sd, u, z, shift2[None, :], inv_norm[None, :], slope[None, :], stat[None, :], curvature[None, :],
        delta[None, :], mu[None, :], h_out[None, :], h_out_dot[None, :], param, visible, keep, keep_scale,
        NORM, SHIFTED, SEED_MODE, BAND or HAS_MASK, DROPOUT, TANGENT,
    )  # fmt: skip
    dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)  # [BN, BM] @ [BM, BD]
    if TANGENT:
        dk = tl.dot(dsd.to(qd.dtype), qd, dk, input_precision=PRECISION)
        dv = tl.dot(dv_weight.to(do.dtype), do, dv, input_precision=PRECISION)  # [BN, BM] @ [BM, BDV]
        if NEED_TANGENT:
            dkd = tl.dot(dsd.to(q.dtype), q, dkd, input_precision=PRECISION)
            dvd = tl.dot(w.to(do.dtype), do, dvd, input_precision=PRECISION)
    else:
        dv = tl.dot(w.to(do.dtype), do, dv, input_precision=PRECISION)
    return dk, dv, dkd, dvd


@triton.jit(do_not_specialize=["T_Q", "T_K", "LEFT", "RIGHT"])
def _dkdv_kernel(
    Q, K, V, QD, KD, VD, DO, MASK, SEED, STAT, DELTA, MU, HO, HOD, DK, DV, DKD, DVD,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd, stride_qdb, stride_qdh, stride_qdt, stride_qdd,
    stride_kdb, stride_kdh, stride_kdt, stride_kdd, stride_vdb, stride_vdh, stride_vdt, stride_vdd,
    stride_dob, stride_doh, stride_dot, stride_dod, stride_mb, stride_mh, stride_mt, stride_mk,
    H, GROUPS, T_Q, T_K, LEFT, RIGHT, SCALARS, threshold,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NORM: tl.constexpr, SHIFTED: tl.constexpr,
    SEED_MODE: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, TANGENT: tl.constexpr,
    NEED_TANGENT: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # one program per key tile and key/value head: it owns the gradients of those keys, summed over
    # the head's group of query heads, so nothing is written twice (no atomics, deterministic)
    scale, param, alpha, _, keep_scale = _scalars(SCALARS)
    start_n = tl.program_id(0) * BLOCK_N
    batch_kv_head = tl.program_id(1)
    H_KV = H // GROUPS
    batch = (batch_kv_head // H_KV).to(tl.int64)
    kv_head = (batch_kv_head % H_KV).to(tl.int64)
    acc_dtype = tl.float64 if FP64 else tl.float32
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(
        K + batch * stride_kb + kv_head * stride_kh, cols, T_K, stride_kt, stride_kd, HEAD_DIM, BLOCK_D
    )
    v = _load_rows(
        V + batch * stride_vb + kv_head * stride_vh, cols, T_K, stride_vt, stride_vd, HEAD_DIM_V, BLOCK_DV
    )
    if TANGENT:
        kd = _load_rows(
            KD + batch * stride_kdb + kv_head * stride_kdh,
            cols,
            T_K,
            stride_kdt,
            stride_kdd,
            HEAD_DIM,
            BLOCK_D,
        )
        vd = _load_rows(
            VD + batch * stride_vdb + kv_head * stride_vdh,
            cols,
            T_K,
            stride_vdt,
            stride_vdd,
            HEAD_DIM_V,
            BLOCK_DV,
        )
    else:
        kd = k
        vd = v
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=acc_dtype)
    dkd = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dvd = tl.zeros([BLOCK_N, BLOCK_DV], dtype=acc_dtype)

    lo, hi, full_lo, full_hi = _query_range(start_n, BLOCK_N, T_Q, T_K, LEFT, RIGHT)
    a, b, c = _split(lo, hi, full_lo, full_hi, BLOCK_M)
    for group in range(GROUPS):
        head = kv_head * GROUPS + group
        batch_head = batch * H + head
        row_base = batch_head * T_Q
        Q_head = Q + batch * stride_qb + head * stride_qh
        QD_head = QD + batch * stride_qdb + head * stride_qdh
        DO_head = DO + batch * stride_dob + head * stride_doh
        MASK_head = MASK + batch * stride_mb + head * stride_mh
        seed_key, seed_hi = (0, 0)
        if DROPOUT:
            seed_key, seed_hi = _dropout_key(SEED, batch_head)
        for phase in tl.static_range(3):  # masked, unmasked, masked: only band edges pay the mask
            start, end = _phase_range(a, b, c, hi, phase)
            for start_m in range(start, end, BLOCK_M):
                dk, dv, dkd, dvd = _dkdv_tile(
                    dk, dv, dkd, dvd, k, v, kd, vd, Q_head, QD_head, DO_head, MASK_head,
                    STAT + row_base, DELTA + row_base, MU + row_base, HO + row_base, HOD + row_base,
                    stride_qt, stride_qd, stride_qdt, stride_qdd, stride_dot, stride_dod, stride_mt,
                    stride_mk, start_m, cols, T_Q, T_K, LEFT, RIGHT, scale, param, alpha, seed_key,
                    seed_hi, threshold,
                    keep_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, phase != 1, NORM, SHIFTED,
                    SEED_MODE, HAS_MASK, DROPOUT, TANGENT, NEED_TANGENT, FP64, PRECISION,
                )  # fmt: skip
    # DK, DV (DKD, DVD) are contiguous (B, H_kv, Tk, d)
    key_base = batch_kv_head.to(tl.int64) * T_K
    _store_rows(DK + key_base * HEAD_DIM, dk * scale, cols, T_K, HEAD_DIM, BLOCK_D)
    _store_rows(DV + key_base * HEAD_DIM_V, dv, cols, T_K, HEAD_DIM_V, BLOCK_DV)
    if TANGENT and NEED_TANGENT:
        _store_rows(DKD + key_base * HEAD_DIM, dkd * scale, cols, T_K, HEAD_DIM, BLOCK_D)
        _store_rows(DVD + key_base * HEAD_DIM_V, dvd, cols, T_K, HEAD_DIM_V, BLOCK_DV)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# ``config`` is the call's non-tensor description as plain values (what a custom op can take):
# (normalizer kernel id, shift floor or nan, normalized, alpha, scale, parameter, left, right,
# dropout_p, seed mode); see ``_config``.


def _strides(x: Tensor | None, n: int = 4) -> tuple[int, ...]:
    return (0,) * n if x is None else tuple(x.stride())


class _Launch:
    """The arguments every attention kernel shares, built once per launcher call."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, sinks, mask, seed, config: tuple) -> None:
        norm, shift_floor, normalized, alpha, scale, param, left, right, dropout_p, seed_mode = config
        self.batch, self.heads, self.t_q, self.d = q.shape
        self.kv_heads, self.t_k, self.d_v = k.shape[1], k.shape[2], v.shape[3]
        self.on_gpu = q.is_cuda
        self.acc_dtype = torch.float64 if accumulates_in_fp64(q.dtype) else torch.float32
        self.q, self.seed = q, seed
        self.has_sinks, self.normalized, self.seed_mode = sinks is not None, normalized, seed_mode
        # broadcast (size-1) batch and head dims of the mask get stride 0; bytes, not bools, for Triton
        self.mask = None if mask is None else mask.expand(self.batch, self.heads, -1, -1).view(torch.uint8)
        # a band bound beyond Tq + Tk hides nothing, and clamping it keeps int32 index math exact
        left, right = min(left, self.t_q + self.t_k), min(right, self.t_q + self.t_k)
        shifted = not math.isnan(shift_floor)
        # float scalars travel in a tensor of the accumulation dtype (a float argument is fp32)
        floats = (scale, param, alpha, shift_floor if shifted else 0.0, 1.0 / (1.0 - dropout_p))
        self.scalars = (
            self.heads, self.heads // self.kv_heads, self.t_q, self.t_k, left, right,
            torch.tensor(floats, dtype=self.acc_dtype, device=q.device), keep_threshold(dropout_p),
        )  # fmt: skip
        self.flags = dict(
            HEAD_DIM=self.d, HEAD_DIM_V=self.d_v, BLOCK_D=block(self.d), BLOCK_DV=block(self.d_v),
            NORM=norm, SHIFTED=shifted, HAS_MASK=mask is not None, DROPOUT=dropout_p > 0,
            FP64=self.acc_dtype == torch.float64, PRECISION=dot_precision(q.dtype, self.on_gpu),
        )  # fmt: skip

    @property
    def empty(self) -> bool:
        return self.batch * self.heads == 0 or self.t_q == 0

    def optional(self, x: Tensor | None) -> Tensor:
        """An absent operand is passed as ``q``: its flag is off and the kernel never reads it."""
        return self.q if x is None else x

    def mask_and_seed(self) -> tuple[Tensor, Tensor]:
        return self.optional(self.mask), self.optional(self.seed)

    def launch(self, kernel, kind: str, grid_axis: str, *args, **flags) -> None:
        t = tiles(kind, max(self.flags["BLOCK_D"], self.flags["BLOCK_DV"]), self.q.dtype, self.on_gpu)
        if grid_axis == "queries":
            grid = (triton.cdiv(self.t_q, t.block_m), self.batch * self.heads)
        else:  # one program per key tile and key/value head
            grid = (triton.cdiv(self.t_k, t.block_n), self.batch * self.kv_heads)
        kernel[grid](
            *args, **self.flags, **flags, BLOCK_M=t.block_m, BLOCK_N=t.block_n, **t.options(self.on_gpu)
        )

    def rows(self) -> Tensor:
        """A ``(B, H, Tq)`` row statistic in the accumulation dtype."""
        return torch.empty((self.batch, self.heads, self.t_q), dtype=self.acc_dtype, device=self.q.device)


def flash_forward(q, k, v, sinks, mask, seed, *config) -> tuple[Tensor, Tensor]:
    """``(O (B, H, Tq, dv), stat (B, H, Tq))``: the statistic is ``L = m + log N`` or ``Psi``."""
    if q.is_cuda and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"the triton flash kernels take head dims up to {MAX_HEAD_DIM} on a GPU, got q {tuple(q.shape)}, "
            f"v {tuple(v.shape)}"
        )
    call = _Launch(q, k, v, sinks, mask, seed, config)
    o = torch.empty((call.batch, call.heads, call.t_q, call.d_v), dtype=q.dtype, device=q.device)
    stat = call.rows()
    if call.empty:
        return o, stat
    call.launch(
        _fwd_kernel, "fwd", "queries",
        q, k, v, call.optional(sinks), *call.mask_and_seed(), o, stat,
        *q.stride(), *k.stride(), *v.stride(), *_strides(sinks, 2), *_strides(call.mask), *call.scalars,
        NORMALIZED=call.normalized, HAS_SINKS=call.has_sinks,
    )  # fmt: skip
    return o, stat


def flash_jvp(q, k, v, sinks, mask, seed, o, stat, q_dot, k_dot, v_dot, sinks_dot, *config):
    """``(Od, mu)`` from the forward's statistic."""
    call = _Launch(q, k, v, sinks, mask, seed, config)
    od, mu = torch.empty_like(o), call.rows()
    if call.empty:
        return od, mu
    call.launch(
        _jvp_kernel, "jvp", "queries",
        q, k, v, q_dot, k_dot, v_dot, call.optional(sinks), call.optional(sinks_dot), *call.mask_and_seed(),
        o.contiguous(), stat.contiguous(), od, mu,
        *q.stride(), *k.stride(), *v.stride(), *q_dot.stride(), *k_dot.stride(), *v_dot.stride(),
        *_strides(sinks, 2), *_strides(sinks_dot, 2), *_strides(call.mask), *call.scalars,
        SEED_MODE=call.seed_mode, HAS_SINKS=call.has_sinks,
    )  # fmt: skip
    return od, mu


def _gradients(call: _Launch, q, k, v, grad_out, stat, delta, tangent_args, need_tangent: bool):
    """Launch the dK/dV and dQ kernels: ``(dq, dk, dv, dqd, dkd, dvd)``, the last three None unless
    ``tangent_args = (q_dot, k_dot, v_dot, mu, h_out, h_out_dot)`` is given and ``need_tangent``."""
    tangent = tangent_args is not None
    q_dot, k_dot, v_dot, mu, h_out, h_out_dot = tangent_args if tangent else (q, k, v, stat, stat, stat)
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    want = tangent and need_tangent
    dqd, dkd, dvd = (torch.zeros_like(x) for x in (dq, dk, dv)) if want else (None, None, None)
    if call.empty or call.t_k == 0:
        return dq, dk, dv, dqd, dkd, dvd
    operands = (
        q,
        k,
        v,
        q_dot,
        k_dot,
        v_dot,
        grad_out,
        *call.mask_and_seed(),
        stat,
        delta,
        mu,
        h_out,
        h_out_dot,
    )
    strides = (
        *q.stride(), *k.stride(), *v.stride(), *q_dot.stride(), *k_dot.stride(), *v_dot.stride(),
        *grad_out.stride(), *_strides(call.mask),
    )  # fmt: skip
    flags = dict(SEED_MODE=call.seed_mode, TANGENT=tangent, NEED_TANGENT=want)
    # the kernels write only the outputs their flags ask for; the others get a harmless pointer
    dqd_or, dkd_or, dvd_or = (dqd, dkd, dvd) if want else (dq, dk, dv)
    kind = "tangent_" if tangent else ""
    call.launch(
        _dkdv_kernel,
        kind + "dkdv",
        "keys",
        *operands,
        dk,
        dv,
        dkd_or,
        dvd_or,
        *strides,
        *call.scalars,
        **flags,
    )
    call.launch(_dq_kernel, kind + "dq", "queries", *operands, dq, dqd_or, *strides, *call.scalars, **flags)
    return dq, dk, dv, dqd, dkd, dvd


def _row_dot(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    return (a.to(dtype) * b.to(dtype)).sum(-1).contiguous()


def _sink_weight(sinks: Tensor, stat: Tensor) -> Tensor:
    """``alpha_i / N_i`` of the sink, ``exp(a_h - L_i)``, per row ``(B, H, Tq)``."""
    return torch.exp(sinks.to(stat.dtype)[..., None] - stat)


def flash_backward(q, k, v, sinks, mask, seed, o, stat, grad_out, *config):
    """``(dq, dk, dv, dsinks)``; ``dsinks`` is ``(B, H)`` or None."""
    call = _Launch(q, k, v, sinks, mask, seed, config)
    delta = _row_dot(grad_out, o, call.acc_dtype)  # D_i = g_i . O_i
    stat = stat.contiguous()
    dq, dk, dv, *_ = _gradients(call, q, k, v, grad_out, stat, delta, None, False)
    dsinks = None if sinks is None else -(delta * _sink_weight(sinks, stat)).sum(-1).to(sinks.dtype)
    return dq, dk, dv, dsinks


def flash_tangent_backward(q, k, v, sinks, mask, seed, o, stat, q_dot, k_dot, v_dot, sinks_dot, od, mu, h,
                           need_tangent, *config):  # fmt: skip
    """The gradient of ``<h, Od>``: ``(dq, dk, dv, dsinks, dqd, dkd, dvd, dsinksd)``."""
    call = _Launch(q, k, v, sinks, mask, seed, config)
    h_out, h_out_dot = _row_dot(h, o, call.acc_dtype), _row_dot(h, od, call.acc_dtype)
    stat, mu = stat.contiguous(), mu.contiguous()
    tangent_args = (q_dot, k_dot, v_dot, mu, h_out, h_out_dot)
    dq, dk, dv, dqd, dkd, dvd = _gradients(call, q, k, v, h, stat, stat, tangent_args, need_tangent)
    dsinks = dsinks_dot = None
    if sinks is not None:
        weight = _sink_weight(sinks, stat)
        ad = sinks_dot.to(stat.dtype)[..., None]
        dsinks = -(weight * (h_out_dot + h_out * (ad - mu))).sum(-1).to(sinks.dtype)
        dsinks_dot = -(weight * h_out).sum(-1).to(sinks.dtype) if need_tangent else None
    return dq, dk, dv, dsinks, dqd, dkd, dvd, dsinks_dot


# --------------------------------------------------------------------------------------------
# torch.library custom ops: the kernels as opaque dispatcher ops
# --------------------------------------------------------------------------------------------
# Fake (meta) implementations let torch.compile trace through them; the dispatcher unwraps
# torch.func's wrapped tensors before a kernel sees a data pointer. Optional outputs come back as
# empty 1-d tensors (a custom op returns tensors only). The config's schema, in order:
# int norm, float shift_floor, bool normalized, float alpha, float scale, float param,
# int left, int right, float dropout_p, bool seed_mode.

Opt = Tensor | None


def _none_to_empty(*xs: Tensor | None, like: Tensor) -> tuple[Tensor, ...]:
    return tuple(like.new_empty(0) if x is None else x for x in xs)


def _empty_to_none(x: Tensor) -> Tensor | None:
    return None if x.numel() == 0 and x.dim() == 1 else x


@torch.library.custom_op("normattn::flash_forward", mutates_args=())
def flash_forward_op(
    q: Tensor, k: Tensor, v: Tensor, sinks: Opt, mask: Opt, seed: Opt,
    norm: int, shift_floor: float, normalized: bool, alpha: float, scale: float, param: float,
    left: int, right: int, dropout_p: float, seed_mode: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    config = (norm, shift_floor, normalized, alpha, scale, param, left, right, dropout_p, seed_mode)
    return flash_forward(q, k, v, sinks, mask, seed, *config)


@flash_forward_op.register_fake
def _(q, k, v, sinks, mask, seed, *config):
    stat_dtype = torch.float64 if accumulates_in_fp64(q.dtype) else torch.float32
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=stat_dtype)


@torch.library.custom_op("normattn::flash_jvp", mutates_args=())
def flash_jvp_op(
    q: Tensor, k: Tensor, v: Tensor, sinks: Opt, mask: Opt, seed: Opt, o: Tensor, stat: Tensor,
    q_dot: Tensor, k_dot: Tensor, v_dot: Tensor, sinks_dot: Opt,
    norm: int, shift_floor: float, normalized: bool, alpha: float, scale: float, param: float,
    left: int, right: int, dropout_p: float, seed_mode: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    config = (norm, shift_floor, normalized, alpha, scale, param, left, right, dropout_p, seed_mode)
    return flash_jvp(q, k, v, sinks, mask, seed, o, stat, q_dot, k_dot, v_dot, sinks_dot, *config)


@flash_jvp_op.register_fake
def _(q, k, v, sinks, mask, seed, o, stat, *rest):
    return torch.empty_like(o), torch.empty_like(stat)


@torch.library.custom_op("normattn::flash_backward", mutates_args=())
def flash_backward_op(
    q: Tensor, k: Tensor, v: Tensor, sinks: Opt, mask: Opt, seed: Opt, o: Tensor, stat: Tensor,
    grad_out: Tensor,
    norm: int, shift_floor: float, normalized: bool, alpha: float, scale: float, param: float,
    left: int, right: int, dropout_p: float, seed_mode: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    config = (norm, shift_floor, normalized, alpha, scale, param, left, right, dropout_p, seed_mode)
    return _none_to_empty(*flash_backward(q, k, v, sinks, mask, seed, o, stat, grad_out, *config), like=q)


@flash_backward_op.register_fake
def _(q, k, v, sinks, mask, seed, *rest):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


@torch.library.custom_op("normattn::flash_tangent_backward", mutates_args=())
def flash_tangent_backward_op(
    q: Tensor, k: Tensor, v: Tensor, sinks: Opt, mask: Opt, seed: Opt, o: Tensor, stat: Tensor,
    q_dot: Tensor, k_dot: Tensor, v_dot: Tensor, sinks_dot: Opt, od: Tensor, mu: Tensor, h: Tensor,
    need_tangent: bool,
    norm: int, shift_floor: float, normalized: bool, alpha: float, scale: float, param: float,
    left: int, right: int, dropout_p: float, seed_mode: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    config = (norm, shift_floor, normalized, alpha, scale, param, left, right, dropout_p, seed_mode)
    grads = flash_tangent_backward(
        q, k, v, sinks, mask, seed, o, stat, q_dot, k_dot, v_dot, sinks_dot, od, mu, h, need_tangent, *config
    )
    return _none_to_empty(*grads, like=q)


@flash_tangent_backward_op.register_fake
def _(q, k, v, sinks, mask, seed, o, stat, q_dot, k_dot, v_dot, sinks_dot, od, mu, h, need_tangent, *config):
    def like(x: Tensor | None, wanted: bool = True) -> Tensor:
        return q.new_empty(0) if x is None or not wanted else torch.empty_like(x)

    primal = (like(q), like(k), like(v), like(sinks))
    return (
        *primal,
        like(q, need_tangent),
        like(k, need_tangent),
        like(v, need_tangent),
        like(sinks, need_tangent),
    )


def _forward_setup_context(ctx, inputs, output) -> None:
    q, k, v, sinks, mask, seed, *config = inputs
    o, stat = output
    ctx.mark_non_differentiable(stat)
    ctx.save_for_backward(q, k, v, sinks, mask, seed, o, stat)
    ctx.config = config


def _forward_op_backward(ctx, grad_out, _grad_stat):
    q, k, v, sinks, mask, seed, o, stat = ctx.saved_tensors
    dq, dk, dv, dsinks = flash_backward_op(q, k, v, sinks, mask, seed, o, stat, grad_out, *ctx.config)
    return (dq, dk, dv, _empty_to_none(dsinks)) + (None,) * (2 + len(ctx.config))


# The bare forward op has its first-order backward (for callers of the op itself); every other
# derivative of every op raises. normattn.attention differentiates through the autograd layer
# (ops/attention/autograd.py) and never asks the ops for one.
guard_derivatives(flash_forward_op, _forward_setup_context, _forward_op_backward)
for _op in (flash_jvp_op, flash_backward_op, flash_tangent_backward_op):
    guard_derivatives(_op)


# --------------------------------------------------------------------------------------------
# The Kernels of the autograd layer
# --------------------------------------------------------------------------------------------


def _config(problem: Problem) -> tuple:
    spec = problem.normalizer
    left, right = problem.band()
    floor = spec.shift_floor if spec.shifted else math.nan
    grad = problem.grad == "seed"
    return (spec.kernel, floor, spec.normalized, spec.alpha, problem.scale, problem.parameter, left, right,
            problem.dropout_p, grad)  # fmt: skip


def forward(problem: Problem, q, k, v, sinks, mask, seed):
    return flash_forward_op(q, k, v, sinks, mask, seed, *_config(problem))


def backward(problem: Problem, q, k, v, sinks, mask, seed, out, stat, grad_out):
    dq, dk, dv, dsinks = flash_backward_op(q, k, v, sinks, mask, seed, out, stat, grad_out, *_config(problem))
    return dq, dk, dv, _empty_to_none(dsinks)


def jvp(problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot):
    return flash_jvp_op(
        q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot, *_config(problem)
    )


def tangent_backward(problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot,
                     out_dot, mu, h, need_tangent: bool = True):  # fmt: skip
    grads = flash_tangent_backward_op(
        q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot, out_dot, mu, h, need_tangent,
        *_config(problem),
    )  # fmt: skip
    return tuple(_empty_to_none(x) for x in grads)


KERNELS = Kernels("triton", forward, backward, jvp, tangent_backward)
