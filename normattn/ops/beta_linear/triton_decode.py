"""One fused decode step of beta attention from its constant-size state (docs/math.md, section 9).

A beta-attention head carries ``H = sum_j k_j v_j^T`` (d x dv) and ``G = sum_j k_j k_j^T`` (d x d)
instead of a KV cache. Generating one token adds the new key and value to the state and reads the
output from it:

    G += k k^T,   H += k v^T,   out = c H^T q / (1 + c sqrt(max(q^T G q, 0)))

which costs ``O(d (d + dv))`` whatever the context length. One program per (batch, head) streams
the state once, a block of ``BLOCK_ROWS`` state rows at a time: it updates the rows, writes them
back and accumulates ``H^T q`` and ``q^T G q`` from the updated rows, so the step is safe in place.
Inference only: no autograd.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import load_tile, store_tile

BLOCK_ROWS = 16


@triton.jit
def _beta_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    h_ptr,
    g_ptr,
    o_ptr,
    h_out_ptr,
    g_out_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_d,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    stride_h_b,
    stride_h_h,
    stride_h_row,
    stride_h_col,
    stride_g_b,
    stride_g_h,
    stride_g_row,
    stride_g_col,
    stride_ho_b,
    stride_ho_h,
    stride_ho_row,
    stride_ho_col,
    stride_go_b,
    stride_go_h,
    stride_go_row,
    stride_go_col,
    n_heads,
    dim_k,
    dim_v,
    scale,
    BLOCK_ROWS: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    batch, head = bh // n_heads, bh % n_heads
    acc_dtype = h_ptr.dtype.element_ty
    d_idx = tl.arange(0, BD)
    d_ok = d_idx < dim_k
    v_idx = tl.arange(0, BDV)
    v_ok = v_idx < dim_v
    q_base = q_ptr + batch * stride_q_b + head * stride_q_h
    k_base = k_ptr + batch * stride_k_b + head * stride_k_h
    h_base = h_ptr + batch * stride_h_b + head * stride_h_h
    g_base = g_ptr + batch * stride_g_b + head * stride_g_h
    h_out_base = h_out_ptr + batch * stride_ho_b + head * stride_ho_h
    g_out_base = g_out_ptr + batch * stride_go_b + head * stride_go_h
    q = tl.load(q_base + d_idx * stride_q_d, mask=d_ok, other=0.0).to(acc_dtype)
    k = tl.load(k_base + d_idx * stride_k_d, mask=d_ok, other=0.0).to(acc_dtype)
    v = tl.load(v_ptr + batch * stride_v_b + head * stride_v_h + v_idx * stride_v_d, mask=v_ok, other=0.0)
    v = v.to(acc_dtype)

    values = tl.zeros([BDV], dtype=acc_dtype)  # H_new^T q
    quad = tl.zeros([BLOCK_ROWS], dtype=acc_dtype)  # per row block of q^T G_new q
    for row0 in range(0, dim_k, BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        rows_ok = rows < dim_k
        q_rows = tl.load(q_base + rows * stride_q_d, mask=rows_ok, other=0.0).to(acc_dtype)
        k_rows = tl.load(k_base + rows * stride_k_d, mask=rows_ok, other=0.0).to(acc_dtype)

        g = load_tile(g_base, rows, rows_ok, d_idx, d_ok, stride_g_row, stride_g_col)
        g += k_rows[:, None] * k[None, :]
        store_tile(g_out_base, g, rows, rows_ok, d_idx, d_ok, stride_go_row, stride_go_col)
        quad += q_rows * tl.sum(g * q[None, :], 1)

        h = load_tile(h_base, rows, rows_ok, v_idx, v_ok, stride_h_row, stride_h_col)
        h += k_rows[:, None] * v[None, :]
        store_tile(h_out_base, h, rows, rows_ok, v_idx, v_ok, stride_ho_row, stride_ho_col)
        values += tl.sum(q_rows[:, None] * h, 0)

    r = scale * tl.sqrt(tl.maximum(tl.sum(quad, 0), 0.0))
    out = values * (scale / (1.0 + r))
    o_ptrs = o_ptr + batch * stride_o_b + head * stride_o_h + v_idx * stride_o_d
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=v_ok)


def _token(x: Tensor, name: str, batch: int, heads: int) -> Tensor:
    """``(B, Hh, e)`` view of a ``(B, Hh, e)`` or ``(B, Hh, 1, e)`` token."""
    if x.dim() == 4 and x.shape[2] == 1:
        x = x[:, :, 0]
    if x.dim() != 3 or x.shape[:2] != (batch, heads):
        raise ValueError(
            f"{name} must be ({batch}, {heads}, dim) or ({batch}, {heads}, 1, dim), got {tuple(x.shape)}"
        )
    return x


def beta_decode_triton(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    H: Tensor,
    G: Tensor,
    scale: float | None = None,
    *,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step: ``(out_t, H_new, G_new)`` from the new token and the state before it.

    Args:
        q_t, k_t: ``(B, Hh, d)`` or ``(B, Hh, 1, d)``; v_t: the same with ``dv``.
        H: ``(B, Hh, d, dv)``; G: ``(B, Hh, d, d)``, float32 (float64 stays float64), any strides.
        scale: score scale, ``1/sqrt(d)`` when None.
        inplace: update ``H`` and ``G`` in place and return them (no new state is allocated).

    Returns:
        ``out_t`` shaped like ``q_t`` with ``dv`` last, in the dtype of ``q_t``; the new states.
        CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if H.dim() != 4 or G.dim() != 4:
        raise ValueError(
            f"H and G must be (B, Hh, d, dv) and (B, Hh, d, d), got {tuple(H.shape)}, {tuple(G.shape)}"
        )
    batch, heads, dim_k, dim_v = H.shape
    if G.shape != (batch, heads, dim_k, dim_k):
        raise ValueError(
            f"G must be {(batch, heads, dim_k, dim_k)} to match H {tuple(H.shape)}, got {tuple(G.shape)}"
        )
    if H.dtype not in (torch.float32, torch.float64) or G.dtype != H.dtype:
        raise TypeError(f"H and G must share a float32 or float64 dtype, got {H.dtype} and {G.dtype}")
    q, k, v = (_token(x, n, batch, heads) for x, n in ((q_t, "q_t"), (k_t, "k_t"), (v_t, "v_t")))
    if q.shape[2] != dim_k or k.shape[2] != dim_k or v.shape[2] != dim_v:
        raise ValueError(
            f"token dims q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]} do not match "
            f"H (d={dim_k}, dv={dim_v})"
        )
    scale = 1.0 / math.sqrt(dim_k) if scale is None else float(scale)
    out = torch.empty(batch, heads, dim_v, dtype=q_t.dtype, device=q_t.device)
    h_new = H if inplace else torch.empty(H.shape, dtype=H.dtype, device=H.device)
    g_new = G if inplace else torch.empty(G.shape, dtype=G.dtype, device=G.device)
    if batch * heads:
        _beta_decode_kernel[(batch * heads,)](
            q, k, v, H, G, out, h_new, g_new,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *H.stride(), *G.stride(), *h_new.stride(), *g_new.stride(),
            heads, dim_k, dim_v, scale,
            BLOCK_ROWS=BLOCK_ROWS,
            BD=triton.next_power_of_2(dim_k),
            BDV=triton.next_power_of_2(dim_v),
            num_warps=4,
        )  # fmt: skip
    if q_t.dim() == 4:
        out = out[:, :, None]
    return out, h_new, g_new
