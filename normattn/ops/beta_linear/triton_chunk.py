"""Chunked linear-time beta attention in Triton: forward, backward and JVP (docs/math.md, sections 4-10).

beta attention weighs row ``i`` of the scores as ``s_ij / (1 + r_i)``, ``r_i = ||s_i||``. Its numerator
is linear and ``r_i^2`` quadratic in the scores, so every sum over keys factors through the states
``H = sum_j k_j v_j^T`` (d x dv) and ``G = sum_j k_j k_j^T`` (d x d) and the cost is ``O(T d^2)``:

    O_i = c H_i^T q_i / (1 + c sqrt(q_i^T G_i q_i))

The positions are cut into chunks of ``BT``. Three steps, all parallel over chunks:

1. ``_chunk_outer_kernel``: the local state of every chunk, ``sum_t w_t a_t x_t^T`` in float32
   (float64 for float64 inputs), e.g. ``K_c^T V_c`` and ``K_c^T K_c``;
2. ``_chunk_scan_kernel``: an exclusive prefix over the chunk axis, in place, giving the states that
   enter each chunk (a reverse prefix for the backward states ``R, W``); non-causal attention only
   needs the totals;
3. one kernel per chunk for the output (or the gradients, or the tangent): the keys of earlier
   chunks enter through the states, the keys of the chunk itself through a ``[BT, BT]`` score tile
   under the causal mask. That diagonal tile is the only one that pays for masking.

Bottom-right causal alignment (``Tq != Tk``) is handled in the chunk indexing: chunks are cut on the
key axis and query ``i`` belongs to the chunk of its last visible key ``p_i = i + Tk - Tq``. Query
and key chunk ``n`` then share one diagonal tile with the usual ``t >= s`` mask, and a query with
``p_i < 0`` (no visible key) belongs to no chunk: it outputs 0 and gets 0 gradients.

The backward pass uses the reverse states ``R_j = sum_{i sees j} a_i q_i g_i^T``,
``W_j = sum_{i sees j} rho_i q_i q_i^T`` (``a_i = 1/N_i``, ``rho_i = D_i / (N_i r_i)``, 0 at
``r_i = 0``) and produces ``dq``, ``dk`` and ``dv`` of a chunk in one program. ``grad="seed"`` keeps
``dv`` and replaces ``ds_ij`` by ``D_i s_ij / (r_i^2 N_i)``, which is the same code with the value
term dropped and ``rho_i = -D_i / (r_i^2 N_i)``. The JVP carries the tangent states
``Hd = sum_j (kd_j v_j^T + k_j vd_j^T)`` and ``Gd = sum_j k_j kd_j^T`` alongside ``H, G``.

Precision: states and accumulators are float32 (float64 stays float64). Products of two input
tiles use the input dtype on the tensor cores, products with a float32 state tf32 for fp16/bf16
inputs (every fp16/bf16 value is exact in tf32). fp32 inputs use 3xTF32 on a GPU and IEEE in the
interpreter, fp64 IEEE. On a GPU a float64 call rounds the scale to float32 (Triton passes float
arguments as fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..attention.autograd import Kernels, attention_function
from ..attention.problem import Problem
from ..common import accumulation_dtype
from ..triton_utils import block, dot_precision, guard_derivatives, load_tile, store_tile
from . import chunk

# Tile sizes. One chunk of BT positions is one diagonal score tile; head dims are tiled by BK/BV
# (at most these caps, at least 16 for tl.dot), so d up to 256 costs loops, not registers. The
# backward and JVP kernels keep two or three [BT, BT] tiles alive and take narrower feature tiles.
# On a GPU, 4- and 8-byte operands (fp32 with 3xTF32 products, fp64) take chunks of at most 32 and,
# in the backward and JVP, 16-wide feature tiles and one stage. Compiled by Triton 3.9 for sm_90, no
# launch then spills except the causal backward at head dims padded within a feature tile (2-byte:
# 24, 72; 4/8-byte: 40) and the fp32 forward at d=72 (tools/gpu_static.py, KNOWN_LINEAR_PROBLEMS;
# docs/results/gpu-static/tiles.md). The interpreter (CPU) takes the 2-byte shapes for every dtype.
CHUNK_SIZE = 64
WIDE_CHUNK_SIZE = 32
# (largest feature tile, pipeline stages) per operand width (False: 2-byte, True: 4/8-byte on a GPU)
FWD_LAUNCH = {False: (64, 2), True: (64, 2)}
BWD_LAUNCH = {False: (32, 2), True: (16, 1)}
OUTER_MAX_BLOCK = 64
SCAN_BLOCK = 1024
NUM_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _add_scores(
    acc,
    a_ptr,
    stride_a_row,
    stride_a_col,
    a_rows,
    a_ok,
    b_ptr,
    stride_b_row,
    stride_b_col,
    b_rows,
    b_ok,
    dim,
    BLOCK: tl.constexpr,
    N_BLOCKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``acc + A B^T`` over a feature axis of length ``dim``, in input-dtype tiles of ``BLOCK``."""
    for blk in range(N_BLOCKS):
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        cols_ok = cols < dim
        a = load_tile(a_ptr, a_rows, a_ok, cols, cols_ok, stride_a_row, stride_a_col)
        b = load_tile(b_ptr, b_rows, b_ok, cols, cols_ok, stride_b_row, stride_b_col)
        # [BT, BLOCK] @ [BLOCK, BT] -> [BT, BT]
        acc += tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _add_rows_times_state(
    acc,
    x_ptr,
    stride_x_row,
    stride_x_col,
    rows,
    rows_ok,
    dim_in,
    state_ptr,
    stride_state_in,
    stride_state_out,
    out_cols,
    out_ok,
    BLOCK_IN: tl.constexpr,
    N_IN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``acc + X S`` for a tile of state columns; swapping the two state strides gives ``X S^T``."""
    for blk in range(N_IN):
        idx = blk * BLOCK_IN + tl.arange(0, BLOCK_IN)
        idx_ok = idx < dim_in
        x = load_tile(x_ptr, rows, rows_ok, idx, idx_ok, stride_x_row, stride_x_col).to(acc.dtype)
        state = load_tile(state_ptr, idx, idx_ok, out_cols, out_ok, stride_state_in, stride_state_out)
        # [BT, BLOCK_IN] @ [BLOCK_IN, BLOCK_OUT] -> [BT, BLOCK_OUT]
        acc += tl.dot(x, state, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _row_quadratic_form(
    acc,
    x_ptr,
    stride_x_row,
    stride_x_col,
    y_ptr,
    stride_y_row,
    stride_y_col,
    rows,
    rows_ok,
    dim,
    state_ptr,
    stride_state,
    BT: tl.constexpr,
    BK: tl.constexpr,
    NK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``acc_t + x_t^T S y_t`` for every row ``t`` of a chunk (``S`` is ``d x d``)."""
    for blk in range(NK):
        cols = blk * BK + tl.arange(0, BK)
        cols_ok = cols < dim
        x_state = _add_rows_times_state(
            tl.zeros([BT, BK], dtype=acc.dtype),
            x_ptr, stride_x_row, stride_x_col, rows, rows_ok, dim,
            state_ptr, stride_state, 1, cols, cols_ok,
            BK, NK, DOT_PRECISION,
        )  # fmt: skip
        y = load_tile(y_ptr, rows, rows_ok, cols, cols_ok, stride_y_row, stride_y_col).to(acc.dtype)
        acc += tl.sum(x_state * y, 1)
    return acc


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chunk_outer_kernel(
    a_ptr,
    x_ptr,
    weight_ptr,
    out_ptr,
    stride_a_b,
    stride_a_h,
    stride_a_t,
    stride_a_d,
    stride_x_b,
    stride_x_h,
    stride_x_t,
    stride_x_d,
    stride_out_bh,
    stride_out_chunk,
    stride_out_row,
    n_heads,
    t_rows,
    row_shift,
    dim_a,
    dim_x,
    HAS_WEIGHT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BT: tl.constexpr,
    BA: tl.constexpr,
    BX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``out[bh, n] (+)= sum_{t in chunk n} w_t a_t x_t^T``, one ``[BA, BX]`` tile per program.

    Row ``t`` of chunk ``n`` is position ``n * BT + t - row_shift`` (queries in key-aligned chunks).
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    n_x_tiles = tl.cdiv(dim_x, BX)
    a_cols = (tile // n_x_tiles) * BA + tl.arange(0, BA)
    x_cols = (tile % n_x_tiles) * BX + tl.arange(0, BX)
    a_cols_ok = a_cols < dim_a
    x_cols_ok = x_cols < dim_x
    rows = chunk * BT + tl.arange(0, BT) - row_shift
    rows_ok = (rows >= 0) & (rows < t_rows)
    batch, head = bh // n_heads, bh % n_heads
    acc_dtype = out_ptr.dtype.element_ty

    a_base = a_ptr + batch * stride_a_b + head * stride_a_h
    x_base = x_ptr + batch * stride_x_b + head * stride_x_h
    a = load_tile(a_base, rows, rows_ok, a_cols, a_cols_ok, stride_a_t, stride_a_d).to(acc_dtype)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + bh * t_rows + rows, mask=rows_ok, other=0.0)
        a = a * weight[:, None]
    x = load_tile(x_base, rows, rows_ok, x_cols, x_cols_ok, stride_x_t, stride_x_d).to(acc_dtype)
    # [BA, BT] @ [BT, BX] -> [BA, BX]
    local = tl.dot(tl.trans(a), x, input_precision=DOT_PRECISION)

    out_base = out_ptr + bh * stride_out_bh + chunk * stride_out_chunk
    if ACCUMULATE:
        local += load_tile(out_base, a_cols, a_cols_ok, x_cols, x_cols_ok, stride_out_row, 1)
    store_tile(out_base, local, a_cols, a_cols_ok, x_cols, x_cols_ok, stride_out_row, 1)


@triton.jit
def _chunk_scan_kernel(state_ptr, n_chunks, chunk_size, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """In place: chunk ``n`` of ``[BH, NC, E]`` becomes the sum of the chunks before (REVERSE: after) it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_ok = offs < chunk_size
    base = state_ptr + tl.program_id(1).to(tl.int64) * n_chunks * chunk_size
    running = tl.zeros([BLOCK], dtype=state_ptr.dtype.element_ty)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step if REVERSE else step
        ptrs = base + chunk.to(tl.int64) * chunk_size + offs
        local = tl.load(ptrs, mask=offs_ok, other=0.0)
        tl.store(ptrs, running, mask=offs_ok)
        running += local


@triton.jit
def _beta_chunk_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h_ptr,
    o_ptr,
    r_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_t,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_t,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_t,
    stride_v_d,
    stride_o_b,
    stride_o_h,
    stride_o_t,
    stride_o_d,
    stride_state_bh,
    stride_state_chunk,
    stride_state_row,
    n_heads,
    n_groups,
    t_q,
    t_k,
    row_shift,
    first_chunk,
    dim_k,
    dim_v,
    scale,
    CAUSAL: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    NV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``O`` and ``r`` for one chunk of queries: states for earlier chunks, a score tile for this one.

    Query head ``head`` reads key/value head ``head // n_groups`` and its states (grouped-query heads)."""
    chunk = tl.program_id(0) + first_chunk
    bh = tl.program_id(1).to(tl.int64)
    batch, head = bh // n_heads, bh % n_heads
    kv_head = head // n_groups
    kv_bh = batch * (n_heads // n_groups) + kv_head
    pos = tl.arange(0, BT)
    q_rows = chunk * BT + pos - row_shift
    q_ok = (q_rows >= 0) & (q_rows < t_q)
    k_rows = chunk * BT + pos
    k_ok = k_rows < t_k
    q_base = q_ptr + batch * stride_q_b + head * stride_q_h
    k_base = k_ptr + batch * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + batch * stride_v_b + kv_head * stride_v_h
    o_base = o_ptr + batch * stride_o_b + head * stride_o_h
    g_base = g_ptr + kv_bh * stride_state_bh + chunk * stride_state_chunk
    h_base = h_ptr + kv_bh * stride_state_bh + chunk * stride_state_chunk
    acc_dtype = g_ptr.dtype.element_ty

    # r_i^2 / c^2 = q_i^T G_in q_i + (squared unscaled scores inside the chunk)
    sq_norm = _row_quadratic_form(
        tl.zeros([BT], dtype=acc_dtype),
        q_base, stride_q_t, stride_q_d, q_base, stride_q_t, stride_q_d, q_rows, q_ok, dim_k,
        g_base, stride_state_row, BT, BK, NK, DOT_PRECISION,
    )  # fmt: skip
    if CAUSAL:
        scores = _add_scores(
            tl.zeros([BT, BT], dtype=acc_dtype),
            q_base, stride_q_t, stride_q_d, q_rows, q_ok,
            k_base, stride_k_t, stride_k_d, k_rows, k_ok,
            dim_k, BK, NK, DOT_PRECISION,
        )  # fmt: skip
        scores = tl.where(pos[None, :] <= pos[:, None], scores, 0.0)
        sq_norm += tl.sum(scores * scores, 1)
    r = scale * tl.sqrt(tl.maximum(sq_norm, 0.0))
    tl.store(r_ptr + bh * t_q + q_rows, r, mask=q_ok)
    out_scale = scale / (1.0 + r)
    if CAUSAL:
        # The beta weights of the diagonal tile, |w| <= 1: safe to round to fp16/bf16 for the dot.
        weights = scores * out_scale[:, None]

    for iv in range(NV):
        v_cols = iv * BV + tl.arange(0, BV)
        v_ok = v_cols < dim_v
        out = _add_rows_times_state(
            tl.zeros([BT, BV], dtype=acc_dtype),
            q_base, stride_q_t, stride_q_d, q_rows, q_ok, dim_k,
            h_base, stride_state_row, 1, v_cols, v_ok,
            BK, NK, DOT_PRECISION,
        )  # fmt: skip
        out = out * out_scale[:, None]
        if CAUSAL:
            v = load_tile(v_base, k_rows, k_ok, v_cols, v_ok, stride_v_t, stride_v_d)
            # [BT, BT] @ [BT, BV] -> [BT, BV]
            out += tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        store_tile(o_base, out, q_rows, q_ok, v_cols, v_ok, stride_o_t, stride_o_d)


@triton.jit
def _beta_chunk_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    g_ptr,
    h_ptr,
    w_ptr,
    r_ptr,
    coef_a_ptr,
    coef_rho_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_t,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_t,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_t,
    stride_v_d,
    stride_do_b,
    stride_do_h,
    stride_do_t,
    stride_do_d,
    stride_dq_b,
    stride_dq_h,
    stride_dq_t,
    stride_dq_d,
    stride_dk_b,
    stride_dk_h,
    stride_dk_t,
    stride_dk_d,
    stride_dv_b,
    stride_dv_h,
    stride_dv_t,
    stride_dv_d,
    stride_fwd_bh,
    stride_fwd_chunk,
    stride_fwd_row,
    stride_rev_bh,
    stride_rev_chunk,
    stride_rev_row,
    n_heads,
    n_groups,
    t_q,
    t_k,
    row_shift,
    dim_k,
    dim_v,
    scale,
    CAUSAL: tl.constexpr,
    SEED: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    NV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``dq`` of query chunk ``n`` and ``dk, dv`` of key chunk ``n``: they share one diagonal tile.

    ``g, h`` are the forward states ``G, H`` entering the chunk, ``w, r`` the reverse states ``W, R``
    from the later chunks; ``coef_a = 1/N`` and ``coef_rho`` (``rho``, or the seed's ``-D/(r^2 N)``).
    One program per key/value head: it loops over the ``n_groups`` query heads that share it and sums
    their ``dk, dv`` into the zeroed float32 (float64) ``dk, dv`` it alone writes (no atomics).
    """
    chunk = tl.program_id(0)
    kv_bh = tl.program_id(1).to(tl.int64)
    n_kv_heads = n_heads // n_groups
    batch, kv_head = kv_bh // n_kv_heads, kv_bh % n_kv_heads
    pos = tl.arange(0, BT)
    q_rows = chunk * BT + pos - row_shift
    q_ok = (q_rows >= 0) & (q_rows < t_q)
    k_rows = chunk * BT + pos
    k_ok = k_rows < t_k
    k_base = k_ptr + batch * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + batch * stride_v_b + kv_head * stride_v_h
    dk_base = dk_ptr + batch * stride_dk_b + kv_head * stride_dk_h
    dv_base = dv_ptr + batch * stride_dv_b + kv_head * stride_dv_h
    g_base = g_ptr + kv_bh * stride_fwd_bh + chunk * stride_fwd_chunk
    h_base = h_ptr + kv_bh * stride_fwd_bh + chunk * stride_fwd_chunk
    acc_dtype = g_ptr.dtype.element_ty
    for group in range(n_groups):
        head = kv_head * n_groups + group
        bh = batch * n_heads + head
        q_base = q_ptr + batch * stride_q_b + head * stride_q_h
        do_base = do_ptr + batch * stride_do_b + head * stride_do_h
        w_base = w_ptr + bh * stride_rev_bh + chunk * stride_rev_chunk
        r_base = r_ptr + bh * stride_rev_bh + chunk * stride_rev_chunk
        coef_a = tl.load(coef_a_ptr + bh * t_q + q_rows, mask=q_ok, other=0.0)
        coef_rho = tl.load(coef_rho_ptr + bh * t_q + q_rows, mask=q_ok, other=0.0)
        if CAUSAL:
            visible = pos[None, :] <= pos[:, None]
            scores = _add_scores(
                tl.zeros([BT, BT], dtype=acc_dtype),
                q_base, stride_q_t, stride_q_d, q_rows, q_ok,
                k_base, stride_k_t, stride_k_d, k_rows, k_ok,
                dim_k, BK, NK, DOT_PRECISION,
            )  # fmt: skip
            scores = tl.where(visible, scores, 0.0)
            # ds / c, with ds_ij = a_i (g_i . v_j) - c rho_i (q_i . k_j)
            dscores = -(scale * coef_rho)[:, None] * scores
            if not SEED:
                dvalues = _add_scores(
                    tl.zeros([BT, BT], dtype=acc_dtype),
                    do_base, stride_do_t, stride_do_d, q_rows, q_ok,
                    v_base, stride_v_t, stride_v_d, k_rows, k_ok,
                    dim_v, BV, NV, DOT_PRECISION,
                )  # fmt: skip
                dscores += coef_a[:, None] * tl.where(visible, dvalues, 0.0)
            probs = coef_a[:, None] * scores

        for ik in range(NK):
            k_cols = ik * BK + tl.arange(0, BK)
            k_cols_ok = k_cols < dim_k
            # dq_i / c = a_i H_in g_i - c rho_i G_in q_i + sum_j ds_ij k_j
            dq = -(scale * coef_rho)[:, None] * _add_rows_times_state(
                tl.zeros([BT, BK], dtype=acc_dtype),
                q_base, stride_q_t, stride_q_d, q_rows, q_ok, dim_k,
                g_base, stride_fwd_row, 1, k_cols, k_cols_ok,
                BK, NK, DOT_PRECISION,
            )  # fmt: skip
            # dk_j / c = R_in v_j - c W_in k_j + sum_i ds_ij q_i
            dk = -scale * _add_rows_times_state(
                tl.zeros([BT, BK], dtype=acc_dtype),
                k_base, stride_k_t, stride_k_d, k_rows, k_ok, dim_k,
                w_base, stride_rev_row, 1, k_cols, k_cols_ok,
                BK, NK, DOT_PRECISION,
            )  # fmt: skip
            if not SEED:
                dq += coef_a[:, None] * _add_rows_times_state(
                    tl.zeros([BT, BK], dtype=acc_dtype),
                    do_base, stride_do_t, stride_do_d, q_rows, q_ok, dim_v,
                    h_base, 1, stride_fwd_row, k_cols, k_cols_ok,
                    BV, NV, DOT_PRECISION,
                )  # fmt: skip
                dk = _add_rows_times_state(
                    dk,
                    v_base, stride_v_t, stride_v_d, k_rows, k_ok, dim_v,
                    r_base, 1, stride_rev_row, k_cols, k_cols_ok,
                    BV, NV, DOT_PRECISION,
                )  # fmt: skip
            if CAUSAL:
                k = load_tile(k_base, k_rows, k_ok, k_cols, k_cols_ok, stride_k_t, stride_k_d)
                q = load_tile(q_base, q_rows, q_ok, k_cols, k_cols_ok, stride_q_t, stride_q_d)
                # [BT, BT] @ [BT, BK] -> [BT, BK], both ways round the diagonal tile
                dq += tl.dot(dscores.to(k.dtype), k, input_precision=DOT_PRECISION)
                dk += tl.dot(tl.trans(dscores).to(q.dtype), q, input_precision=DOT_PRECISION)
            store_tile(dq_ptr + batch * stride_dq_b + head * stride_dq_h, dq * scale,
                        q_rows, q_ok, k_cols, k_cols_ok, stride_dq_t, stride_dq_d)  # fmt: skip
            dk = dk * scale + load_tile(dk_base, k_rows, k_ok, k_cols, k_cols_ok, stride_dk_t, stride_dk_d)
            store_tile(dk_base, dk, k_rows, k_ok, k_cols, k_cols_ok, stride_dk_t, stride_dk_d)

        for iv in range(NV):
            v_cols = iv * BV + tl.arange(0, BV)
            v_cols_ok = v_cols < dim_v
            # dv_j / c = R_in^T k_j + sum_i a_i (q_i . k_j) g_i
            dv = _add_rows_times_state(
                tl.zeros([BT, BV], dtype=acc_dtype),
                k_base, stride_k_t, stride_k_d, k_rows, k_ok, dim_k,
                r_base, stride_rev_row, 1, v_cols, v_cols_ok,
                BK, NK, DOT_PRECISION,
            )  # fmt: skip
            if CAUSAL:
                do = load_tile(do_base, q_rows, q_ok, v_cols, v_cols_ok, stride_do_t, stride_do_d)
                # [BT, BT]^T @ [BT, BV] -> [BT, BV]
                dv += tl.dot(tl.trans(probs).to(do.dtype), do, input_precision=DOT_PRECISION)
            dv = dv * scale + load_tile(dv_base, k_rows, k_ok, v_cols, v_cols_ok, stride_dv_t, stride_dv_d)
            store_tile(dv_base, dv, k_rows, k_ok, v_cols, v_cols_ok, stride_dv_t, stride_dv_d)


@triton.jit
def _beta_chunk_jvp_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qd_ptr,
    kd_ptr,
    vd_ptr,
    o_ptr,
    r_ptr,
    g_ptr,
    h_ptr,
    gd_ptr,
    hd_ptr,
    od_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_t,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_t,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_t,
    stride_v_d,
    stride_qd_b,
    stride_qd_h,
    stride_qd_t,
    stride_qd_d,
    stride_kd_b,
    stride_kd_h,
    stride_kd_t,
    stride_kd_d,
    stride_vd_b,
    stride_vd_h,
    stride_vd_t,
    stride_vd_d,
    stride_o_b,
    stride_o_h,
    stride_o_t,
    stride_o_d,
    stride_od_b,
    stride_od_h,
    stride_od_t,
    stride_od_d,
    stride_state_bh,
    stride_state_chunk,
    stride_state_row,
    n_heads,
    n_groups,
    t_q,
    t_k,
    row_shift,
    first_chunk,
    dim_k,
    dim_v,
    scale,
    CAUSAL: tl.constexpr,
    SEED: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    NV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The tangent ``Od`` of one chunk of queries (docs/math.md, section 9; section 5 if SEED).

    exact: ``Od = (c/N)(qd H + q Hd + sd V + s Vd) - O c^2 quad / (r N)``
    seed:  ``Od = (c/N)(q Hd + s Vd) + O c^2 quad / (r^2 N)``, ``Hd`` holding only ``k vd^T``
    with ``quad = q^T G qd + q^T Gd q`` (both 0 at ``r = 0``), intra-chunk parts as score tiles.
    """
    chunk = tl.program_id(0) + first_chunk
    bh = tl.program_id(1).to(tl.int64)
    batch, head = bh // n_heads, bh % n_heads
    kv_head = head // n_groups
    kv_bh = batch * (n_heads // n_groups) + kv_head
    pos = tl.arange(0, BT)
    q_rows = chunk * BT + pos - row_shift
    q_ok = (q_rows >= 0) & (q_rows < t_q)
    k_rows = chunk * BT + pos
    k_ok = k_rows < t_k
    q_base = q_ptr + batch * stride_q_b + head * stride_q_h
    k_base = k_ptr + batch * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + batch * stride_v_b + kv_head * stride_v_h
    qd_base = qd_ptr + batch * stride_qd_b + head * stride_qd_h
    kd_base = kd_ptr + batch * stride_kd_b + kv_head * stride_kd_h
    vd_base = vd_ptr + batch * stride_vd_b + kv_head * stride_vd_h
    o_base = o_ptr + batch * stride_o_b + head * stride_o_h
    state_offset = kv_bh * stride_state_bh + chunk * stride_state_chunk
    acc_dtype = g_ptr.dtype.element_ty

    # quad = q^T G_in qd + q^T Gd_in q + sum_j s_ij sd_ij / c^2 (masked, inside the chunk)
    quad = _row_quadratic_form(
        tl.zeros([BT], dtype=acc_dtype),
        q_base, stride_q_t, stride_q_d, qd_base, stride_qd_t, stride_qd_d, q_rows, q_ok, dim_k,
        g_ptr + state_offset, stride_state_row, BT, BK, NK, DOT_PRECISION,
    )  # fmt: skip
    quad = _row_quadratic_form(
        quad,
        q_base, stride_q_t, stride_q_d, q_base, stride_q_t, stride_q_d, q_rows, q_ok, dim_k,
        gd_ptr + state_offset, stride_state_row, BT, BK, NK, DOT_PRECISION,
    )  # fmt: skip
    if CAUSAL:
        visible = pos[None, :] <= pos[:, None]
        scores = _add_scores(
            tl.zeros([BT, BT], dtype=acc_dtype),
            q_base, stride_q_t, stride_q_d, q_rows, q_ok,
            k_base, stride_k_t, stride_k_d, k_rows, k_ok,
            dim_k, BK, NK, DOT_PRECISION,
        )  # fmt: skip
        score_tangents = _add_scores(
            tl.zeros([BT, BT], dtype=acc_dtype),
            qd_base, stride_qd_t, stride_qd_d, q_rows, q_ok,
            k_base, stride_k_t, stride_k_d, k_rows, k_ok,
            dim_k, BK, NK, DOT_PRECISION,
        )  # fmt: skip
        score_tangents = _add_scores(
            score_tangents,
            q_base, stride_q_t, stride_q_d, q_rows, q_ok,
            kd_base, stride_kd_t, stride_kd_d, k_rows, k_ok,
            dim_k, BK, NK, DOT_PRECISION,
        )  # fmt: skip
        scores = tl.where(visible, scores, 0.0)
        score_tangents = tl.where(visible, score_tangents, 0.0)
        quad += tl.sum(scores * score_tangents, 1)

    r = tl.load(r_ptr + bh * t_q + q_rows, mask=q_ok, other=0.0)
    positive = r > 0
    safe_r = tl.where(positive, r, 1.0)
    out_scale = scale / (1.0 + r)
    # Coefficient of O: -c^2 quad / (r N) (exact) or c^2 quad / (r^2 N) (seed), divided by r in two
    # steps so that a tiny r cannot overflow r^2; 0 at r = 0 (docs/math.md, section 4).
    norm_term = out_scale * scale * quad / safe_r
    norm_term = norm_term / safe_r if SEED else -norm_term
    norm_term = tl.where(positive, norm_term, 0.0)
    if CAUSAL:
        weights = scores * out_scale[:, None]
        weight_tangents = score_tangents * out_scale[:, None]

    for iv in range(NV):
        v_cols = iv * BV + tl.arange(0, BV)
        v_ok = v_cols < dim_v
        out = _add_rows_times_state(
            tl.zeros([BT, BV], dtype=acc_dtype),
            q_base, stride_q_t, stride_q_d, q_rows, q_ok, dim_k,
            hd_ptr + state_offset, stride_state_row, 1, v_cols, v_ok,
            BK, NK, DOT_PRECISION,
        )  # fmt: skip
        if not SEED:
            out = _add_rows_times_state(
                out,
                qd_base, stride_qd_t, stride_qd_d, q_rows, q_ok, dim_k,
                h_ptr + state_offset, stride_state_row, 1, v_cols, v_ok,
                BK, NK, DOT_PRECISION,
            )  # fmt: skip
        out = out * out_scale[:, None]
        if CAUSAL:
            vd = load_tile(vd_base, k_rows, k_ok, v_cols, v_ok, stride_vd_t, stride_vd_d)
            # [BT, BT] @ [BT, BV] -> [BT, BV]
            out += tl.dot(weights.to(vd.dtype), vd, input_precision=DOT_PRECISION)
            if not SEED:
                v = load_tile(v_base, k_rows, k_ok, v_cols, v_ok, stride_v_t, stride_v_d)
                out += tl.dot(weight_tangents.to(v.dtype), v, input_precision=DOT_PRECISION)
        o = load_tile(o_base, q_rows, q_ok, v_cols, v_ok, stride_o_t, stride_o_d).to(acc_dtype)
        out += norm_term[:, None] * o
        store_tile(od_ptr + batch * stride_od_b + head * stride_od_h, out,
                    q_rows, q_ok, v_cols, v_ok, stride_od_t, stride_od_d)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class _Plan:
    """Chunk geometry of one call: key-aligned chunks (causal) or plain chunks of each axis."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, chunk: int) -> None:
        self.batch, self.heads, self.t_q, self.dim_k = q.shape
        self.t_k, self.dim_v = k.shape[2], v.shape[3]
        # grouped-query heads: query head h reads key/value head h // groups, never a repeated copy
        self.kv_heads = k.shape[1]
        self.groups = self.heads // self.kv_heads
        self.causal = causal
        # fp32/fp64 on a GPU: chunks of at most WIDE_CHUNK_SIZE (see the tile sizes above)
        self.wide = q.is_cuda and q.element_size() >= 4
        self.chunk = chunk = min(chunk, WIDE_CHUNK_SIZE) if self.wide else chunk
        self.acc_dtype = accumulation_dtype(q.dtype)
        self.precision = dot_precision(q.dtype, q.is_cuda)
        # Query row t of chunk n is query n * BT + t - query_shift (its last visible key is n * BT + t).
        self.query_shift = self.t_k - self.t_q if causal else 0
        self.key_chunks = triton.cdiv(self.t_k, chunk)
        self.query_chunks = self.key_chunks if causal else triton.cdiv(self.t_q, chunk)
        # Causal chunks before the first query hold keys only: no output program for them.
        self.first_query_chunk = max(self.query_shift, 0) // chunk if causal else 0
        # Only causal Tq > Tk leaves rows (those that see no key) that no program writes.
        self.unvisited_rows = causal and self.t_q > self.t_k
        self.empty = q.numel() == 0 or k.numel() == 0 or v.numel() == 0

    def kernel_args(self, launch: dict[bool, tuple[int, int]]) -> dict:
        """Tiles and launch options of a chunk kernel; ``launch`` is ``FWD_LAUNCH`` or ``BWD_LAUNCH``."""
        max_block, stages = launch[self.wide]
        block_k, block_v = block(self.dim_k, max_block), block(self.dim_v, max_block)
        return dict(
            BT=self.chunk,
            BK=block_k,
            BV=block_v,
            NK=triton.cdiv(self.dim_k, block_k),
            NV=triton.cdiv(self.dim_v, block_v),
            DOT_PRECISION=self.precision,
            num_warps=NUM_WARPS,
            num_stages=stages,
        )

    def state_strides(self, states: Tensor) -> tuple[int, int, int]:
        """(bh, chunk, row) strides; non-causal totals are one chunk that every chunk reads."""
        return states.stride(0), states.stride(1) if self.causal else 0, states.stride(2)


def _chunk_states(
    plan: _Plan,
    columns: list[list[tuple[Tensor, Tensor, Tensor | None]]],
    *,
    queries: bool,
    reverse: bool,
) -> Tensor:
    """States ``[BH, NC, da, sum(dx)]``: column group ``g`` holds ``sum_terms sum_t w_t a_t x_t^T``
    (``BH`` counts the key/value heads for key rows).

    Causal: the exclusive prefix over chunks (the suffix if ``reverse``); otherwise ``[BH, 1, ...]``
    totals. ``queries`` says the rows are queries (key-aligned chunks) rather than keys.
    """
    a0 = columns[0][0][0]
    dim_a = a0.shape[3]
    widths = [group[0][1].shape[3] for group in columns]
    t_rows = plan.t_q if queries else plan.t_k
    n_chunks = plan.query_chunks if queries else plan.key_chunks
    row_shift = plan.query_shift if queries else 0
    heads = plan.heads if queries else plan.kv_heads
    bh = plan.batch * heads
    states = torch.empty(bh, n_chunks, dim_a, sum(widths), dtype=plan.acc_dtype, device=a0.device)
    col = 0
    for group, width in zip(columns, widths, strict=True):
        out = states[..., col : col + width]
        block_a, block_x = block(dim_a, OUTER_MAX_BLOCK), block(width, OUTER_MAX_BLOCK)
        grid = (triton.cdiv(dim_a, block_a) * triton.cdiv(width, block_x), n_chunks, bh)
        for term, (a, x, weight) in enumerate(group):
            _chunk_outer_kernel[grid](
                a, x, weight if weight is not None else a, out,
                *a.stride(), *x.stride(), out.stride(0), out.stride(1), out.stride(2),
                heads, t_rows, row_shift, dim_a, width,
                HAS_WEIGHT=weight is not None, ACCUMULATE=term > 0,
                BT=plan.chunk, BA=block_a, BX=block_x, DOT_PRECISION=plan.precision,
                num_warps=4,
            )  # fmt: skip
        col += width
    if not plan.causal:
        return states.sum(1, keepdim=True)
    size = states[0, 0].numel()
    _chunk_scan_kernel[(triton.cdiv(size, SCAN_BLOCK), bh)](
        states, n_chunks, size, REVERSE=reverse, BLOCK=SCAN_BLOCK, num_warps=4
    )
    return states


def _key_states(plan: _Plan, k: Tensor, v: Tensor) -> Tensor:
    """``[G | H]`` entering each chunk (causal) or in total."""
    return _chunk_states(plan, [[(k, k, None)], [(k, v, None)]], queries=False, reverse=False)


def _new_rows(plan: _Plan, like: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """A ``(B, H, Tq, width)`` output (``(B, H, Tq)`` if width is 0), zeroed where no program writes."""
    shape = (plan.batch, plan.heads, plan.t_q) + ((width,) if width else ())
    make = torch.zeros if plan.unvisited_rows else torch.empty
    return make(shape, dtype=dtype, device=like.device)


def _forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, chunk: int
) -> tuple[Tensor, Tensor]:
    plan = _Plan(q, k, v, causal, chunk)
    if plan.empty:
        o = q.new_zeros(plan.batch, plan.heads, plan.t_q, plan.dim_v)
        return o, q.new_zeros(o.shape[:3], dtype=plan.acc_dtype)
    o = _new_rows(plan, q, plan.dim_v, q.dtype)
    r = _new_rows(plan, q, 0, plan.acc_dtype)
    states = _key_states(plan, k, v)
    g, h = states[..., : plan.dim_k], states[..., plan.dim_k :]
    grid = (plan.query_chunks - plan.first_query_chunk, plan.batch * plan.heads)
    _beta_chunk_fwd_kernel[grid](
        q, k, v, g, h, o, r,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *plan.state_strides(states),
        plan.heads, plan.groups, plan.t_q, plan.t_k, plan.query_shift, plan.first_query_chunk,
        plan.dim_k, plan.dim_v, scale,
        CAUSAL=causal, **plan.kernel_args(FWD_LAUNCH),
    )  # fmt: skip
    return o, r


def _backward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, r: Tensor, do: Tensor, scale: float, causal: bool, seed: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    plan = _Plan(q, k, v, causal, chunk)
    if plan.empty:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Row coefficients (docs/math.md, sections 5 and 10): a = 1/N; rho = D/(N r), or -D/(r^2 N) for the seed.
    dot_do_o = (do.to(plan.acc_dtype) * o.to(plan.acc_dtype)).sum(-1)
    inv_norm = 1 / (1 + r)
    positive = r > 0
    safe_r = torch.where(positive, r, torch.ones_like(r))
    rho = dot_do_o * inv_norm / safe_r
    rho = -rho / safe_r if seed else rho
    coef_rho = torch.where(positive, rho, torch.zeros_like(rho)).contiguous()
    coef_a = inv_norm.contiguous()

    fwd = _key_states(plan, k, v)
    rev = _chunk_states(plan, [[(q, q, coef_rho)], [(q, do, coef_a)]], queries=True, reverse=True)
    dq = _new_rows(plan, q, plan.dim_k, q.dtype)
    # summed over the query heads of a group by the program of their key/value head
    dk = torch.zeros(k.shape, dtype=plan.acc_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=plan.acc_dtype, device=v.device)
    d = plan.dim_k
    grid = (max(plan.query_chunks, plan.key_chunks), plan.batch * plan.kv_heads)
    _beta_chunk_bwd_kernel[grid](
        q, k, v, do, fwd[..., :d], fwd[..., d:], rev[..., :d], rev[..., d:], coef_a, coef_rho, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        *plan.state_strides(fwd), *plan.state_strides(rev),
        plan.heads, plan.groups, plan.t_q, plan.t_k, plan.query_shift, plan.dim_k, plan.dim_v, scale,
        CAUSAL=causal, SEED=seed, **plan.kernel_args(BWD_LAUNCH),
    )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _jvp(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, r: Tensor, qd: Tensor, kd: Tensor, vd: Tensor, scale: float,
    causal: bool, seed: bool, chunk: int,
) -> Tensor:  # fmt: skip
    plan = _Plan(q, k, v, causal, chunk)
    if plan.empty:
        return torch.zeros_like(o)
    # [G | H | Gd | Hd]; the seed's Hd keeps only the value tangent (docs/math.md, section 10).
    hd_terms = [(k, vd, None)] if seed else [(k, vd, None), (kd, v, None)]
    states = _chunk_states(
        plan, [[(k, k, None)], [(k, v, None)], [(k, kd, None)], hd_terms], queries=False, reverse=False
    )
    d, dv = plan.dim_k, plan.dim_v
    g, h = states[..., :d], states[..., d : d + dv]
    gd, hd = states[..., d + dv : 2 * d + dv], states[..., 2 * d + dv :]
    od = _new_rows(plan, q, dv, q.dtype)
    grid = (plan.query_chunks - plan.first_query_chunk, plan.batch * plan.heads)
    _beta_chunk_jvp_kernel[grid](
        q, k, v, qd, kd, vd, o, r, g, h, gd, hd, od,
        *q.stride(), *k.stride(), *v.stride(), *qd.stride(), *kd.stride(), *vd.stride(),
        *o.stride(), *od.stride(), *plan.state_strides(states),
        plan.heads, plan.groups, plan.t_q, plan.t_k, plan.query_shift, plan.first_query_chunk, d, dv, scale,
        CAUSAL=causal, SEED=seed, **plan.kernel_args(BWD_LAUNCH),
    )  # fmt: skip
    return od


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Custom ops (the one way kernels launch: see triton_utils.guard_derivatives) and Kernels
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("normattn::beta_chunk_forward", mutates_args=())
def forward_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``(O, r)``: the output and the row norms ``r_i``."""
    return _forward(q, k, v, scale, causal, chunk_size)


@forward_op.register_fake
def _(q, k, v, scale, causal, chunk_size):
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(
        q.shape[:3], dtype=accumulation_dtype(q.dtype)
    )


@torch.library.custom_op("normattn::beta_chunk_backward", mutates_args=())
def backward_op(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, r: Tensor, grad_out: Tensor, scale: float, causal: bool,
    seed: bool, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _backward(q, k, v, o, r, grad_out, scale, causal, seed, chunk_size)


@backward_op.register_fake
def _(q, k, v, o, r, grad_out, scale, causal, seed, chunk_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("normattn::beta_chunk_jvp", mutates_args=())
def jvp_op(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, r: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor,
    scale: float, causal: bool, seed: bool, chunk_size: int,
) -> Tensor:  # fmt: skip
    return _jvp(q, k, v, o, r, q_dot, k_dot, v_dot, scale, causal, seed, chunk_size)


@jvp_op.register_fake
def _(q, k, v, o, r, q_dot, k_dot, v_dot, scale, causal, seed, chunk_size):
    return torch.empty_like(o)


for _op in (forward_op, backward_op, jvp_op):
    guard_derivatives(_op)


def _seed(problem: Problem) -> bool:
    chunk._options(problem, CHUNK_SIZE)  # full or causal only
    return problem.grad == "seed"


def forward(problem: Problem, q, k, v, sinks, mask, seed, chunk_size: int = CHUNK_SIZE):
    return forward_op(q, k, v, problem.scale, problem.causal, chunk_size)


def backward(problem: Problem, q, k, v, sinks, mask, seed, out, stat, grad_out, chunk_size: int = CHUNK_SIZE):
    grads = backward_op(
        q, k, v, out, stat, grad_out, problem.scale, problem.causal, _seed(problem), chunk_size
    )
    return (*grads, None)


def jvp(problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot,
        chunk_size: int = CHUNK_SIZE):  # fmt: skip
    out_dot = jvp_op(
        q, k, v, out, stat, q_dot, k_dot, v_dot, problem.scale, problem.causal, _seed(problem), chunk_size
    )
    return out_dot, chunk.rows_placeholder(q)


# The gradient of the tangent output runs the torch chunked path's written-out tangent backward
# (exact and linear-time, in torch ops on the same device), not a fused kernel.
KERNELS = Kernels("triton-linear", forward, backward, jvp, chunk.tangent_backward)


def beta_linear_attention_triton(
    problem: Problem, q: Tensor, k: Tensor, v: Tensor, chunk_size: int = CHUNK_SIZE
) -> Tensor:
    """beta attention in ``O(T d^2)`` with chunked Triton kernels for forward, backward and JVP.

    ``q (B, H, Tq, d)``, ``k (B, H_kv, Tk, d)``, ``v (B, H_kv, Tk, dv)`` with ``H_kv`` dividing ``H``
    (grouped-query heads, never repeated; any strides, d and dv any size;
    tiles of up to 64 are looped over) on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    ``chunk_size`` (a power of two >= 16) is the length of the diagonal score tile.
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return attention_function(chunk.with_chunk_size(KERNELS, chunk_size), problem, q, k, v, None, None, None)
