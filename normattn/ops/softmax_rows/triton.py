"""Fused row softmax in Triton: online max and sum over row tiles, exp2 with log2(e) folded in.

Forward ``y = exp(x - m) / sum exp(x - m)`` with the running max ``m`` treated as a constant
(docs/math.md, section 3: the shift has no gradient). Backward ``dx = y * (dy - sum(y * dy))``; the
JVP is the same map applied to the tangent (the softmax Jacobian is symmetric), so one kernel
serves both. Rows that fit one tile are read once; longer rows take a statistics pass and an
output pass. Accumulates in fp32 for fp16/bf16 (fp64 stays fp64). A row of only ``-inf`` gives zeros and
zero gradients (``torch.softmax`` gives NaN).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _checks
from ..common import accumulation_dtype
from ..max_reduce.triton import fold_batch, row_block, row_tile, row_tiling
from ..rows import RowLayout, from_rows, row_layout, to_rows
from ..triton_utils import guard_derivatives

LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def finite_or_zero(row_max):
    """The shift for a row: its max, or 0 for a row of -inf (keeps -inf - -inf out of exp2)."""
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def _softmax_rows_fwd_kernel(
    x_ptr,
    y_ptr,
    n_rows,
    n_cols,
    stride_x_row,
    stride_x_col,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    rows, row_mask = row_block(tl.program_id(0), n_rows, BLOCK_ROWS)
    if SINGLE_TILE:
        cols, offsets, mask = row_tile(rows, row_mask, 0, n_cols, stride_x_row, stride_x_col, BLOCK_COLS)
        x = tl.load(x_ptr + offsets, mask=mask, other=float("-inf")).to(ACC_DTYPE)  # [BR, BC]
        shift = finite_or_zero(tl.max(x, axis=1))  # [BR]
        p = tl.exp2((x - shift[:, None]) * LOG2E)
        total = tl.sum(p, axis=1)
        inv_total = 1.0 / tl.where(total > 0, total, 1.0)  # an all -inf row has p = 0
        _, y_offsets, _ = row_tile(rows, row_mask, 0, n_cols, n_cols, 1, BLOCK_COLS)
        tl.store(y_ptr + y_offsets, (p * inv_total[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        running_max = tl.full([BLOCK_ROWS], float("-inf"), ACC_DTYPE)
        total = tl.zeros([BLOCK_ROWS], ACC_DTYPE)
        for col_start in range(0, n_cols, BLOCK_COLS):
            _, offsets, mask = row_tile(
                rows, row_mask, col_start, n_cols, stride_x_row, stride_x_col, BLOCK_COLS
            )
            x = tl.load(x_ptr + offsets, mask=mask, other=float("-inf")).to(ACC_DTYPE)  # [BR, BC]
            new_max = tl.maximum(running_max, tl.max(x, axis=1))  # [BR]
            shift = finite_or_zero(new_max)
            # Rescale the sum so far to the new max; exp2(-inf) = 0 while the row was all -inf.
            total = total * tl.exp2((running_max - shift) * LOG2E) + tl.sum(
                tl.exp2((x - shift[:, None]) * LOG2E), axis=1
            )
            running_max = new_max
        shift = finite_or_zero(running_max)
        inv_total = 1.0 / tl.where(total > 0, total, 1.0)  # an all -inf row has p = 0
        for col_start in range(0, n_cols, BLOCK_COLS):
            _, offsets, mask = row_tile(
                rows, row_mask, col_start, n_cols, stride_x_row, stride_x_col, BLOCK_COLS
            )
            x = tl.load(x_ptr + offsets, mask=mask, other=float("-inf")).to(ACC_DTYPE)
            y = tl.exp2((x - shift[:, None]) * LOG2E) * inv_total[:, None]
            _, y_offsets, _ = row_tile(rows, row_mask, col_start, n_cols, n_cols, 1, BLOCK_COLS)
            tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_rows_bwd_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    stride_dy_row,
    stride_dy_col,
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    # y and dx are contiguous [n_rows, n_cols]; dy may have any strides.
    rows, row_mask = row_block(tl.program_id(0), n_rows, BLOCK_ROWS)
    if SINGLE_TILE:
        _, offsets, mask = row_tile(rows, row_mask, 0, n_cols, n_cols, 1, BLOCK_COLS)
        _, dy_offsets, _ = row_tile(rows, row_mask, 0, n_cols, stride_dy_row, stride_dy_col, BLOCK_COLS)
        y = tl.load(y_ptr + offsets, mask=mask, other=0).to(ACC_DTYPE)  # [BR, BC]
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0).to(ACC_DTYPE)
        y_dot_dy = tl.sum(y * dy, axis=1)  # [BR]
        dx = y * (dy - y_dot_dy[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        y_dot_dy = tl.zeros([BLOCK_ROWS], ACC_DTYPE)
        for col_start in range(0, n_cols, BLOCK_COLS):
            _, offsets, mask = row_tile(rows, row_mask, col_start, n_cols, n_cols, 1, BLOCK_COLS)
            _, dy_offsets, _ = row_tile(
                rows, row_mask, col_start, n_cols, stride_dy_row, stride_dy_col, BLOCK_COLS
            )
            y = tl.load(y_ptr + offsets, mask=mask, other=0).to(ACC_DTYPE)
            dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0).to(ACC_DTYPE)
            y_dot_dy += tl.sum(y * dy, axis=1)
        for col_start in range(0, n_cols, BLOCK_COLS):
            _, offsets, mask = row_tile(rows, row_mask, col_start, n_cols, n_cols, 1, BLOCK_COLS)
            _, dy_offsets, _ = row_tile(
                rows, row_mask, col_start, n_cols, stride_dy_row, stride_dy_col, BLOCK_COLS
            )
            y = tl.load(y_ptr + offsets, mask=mask, other=0).to(ACC_DTYPE)
            dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0).to(ACC_DTYPE)
            dx = y * (dy - y_dot_dy[:, None])
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


@torch.library.custom_op("normattn::softmax_rows_forward", mutates_args=())
def softmax_rows_fwd(x_rows: Tensor) -> Tensor:
    """Softmax of each row of a 2-D tensor (any strides), contiguous ``[n_rows, row_len]``."""
    n_rows, row_len = x_rows.shape
    y_rows = torch.empty(n_rows, row_len, dtype=x_rows.dtype, device=x_rows.device)
    if y_rows.numel() == 0:
        return y_rows
    block_rows, block_cols, num_warps, grid = row_tiling(n_rows, row_len)
    _softmax_rows_fwd_kernel[grid](
        x_rows,
        y_rows,
        n_rows,
        row_len,
        x_rows.stride(0),
        x_rows.stride(1),
        ACC_DTYPE=_acc_dtype(x_rows.dtype),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        SINGLE_TILE=row_len <= block_cols,
        num_warps=num_warps,
    )
    return y_rows


@softmax_rows_fwd.register_fake
def _(x_rows: Tensor) -> Tensor:
    return x_rows.new_empty(x_rows.shape)


@torch.library.custom_op("normattn::softmax_rows_backward", mutates_args=())
def softmax_rows_bwd(y_rows: Tensor, dy_rows: Tensor) -> Tensor:
    """``y * (dy - sum(y * dy))`` per row: the VJP, and also the JVP with the tangent as ``dy``."""
    n_rows, row_len = y_rows.shape
    dx_rows = torch.empty(n_rows, row_len, dtype=y_rows.dtype, device=y_rows.device)
    if dx_rows.numel() == 0:
        return dx_rows
    block_rows, block_cols, num_warps, grid = row_tiling(n_rows, row_len)
    _softmax_rows_bwd_kernel[grid](
        y_rows.contiguous(),
        dy_rows,
        dx_rows,
        n_rows,
        row_len,
        dy_rows.stride(0),
        dy_rows.stride(1),
        ACC_DTYPE=_acc_dtype(y_rows.dtype),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        SINGLE_TILE=row_len <= block_cols,
        num_warps=num_warps,
    )
    return dx_rows


@softmax_rows_bwd.register_fake
def _(y_rows: Tensor, dy_rows: Tensor) -> Tensor:
    return y_rows.new_empty(y_rows.shape)


# launched as custom ops (triton_utils.guard_derivatives); the Functions below give the derivatives
guard_derivatives(softmax_rows_fwd)
guard_derivatives(softmax_rows_bwd)


def _shifted(v_rows: Tensor, y_rows: Tensor) -> Tensor:
    """``v - sum(y * v)`` per row, the factor the softmax Jacobian puts next to ``y``."""
    return v_rows - (y_rows * v_rows).sum(dim=1, keepdim=True)


class SoftmaxJacobianFunction(torch.autograd.Function):
    """``J(y) v = y * (v - sum(y * v))`` per row of ``[n_rows, row_len]``: the VJP of a cotangent
    and, ``J`` being symmetric, the JVP of a tangent. Its own Function so that the kernel
    launches from ``forward`` (see ``normattn.ops.max_reduce.triton``) and derivatives of
    derivatives stay exact: in ``v`` it is linear and self-adjoint; in ``y`` (double backward,
    Hessians) ``d/dy [y * (v - sum(y v))] a = a * (v - sum(y v)) - y * sum(a v)``, in torch ops.
    """

    @staticmethod
    def forward(y_rows: Tensor, v_rows: Tensor) -> Tensor:
        return softmax_rows_bwd(y_rows, v_rows)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        y_rows, v_rows = ctx.saved_tensors
        grad_y = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_out * _shifted(v_rows, y_rows) - v_rows * (y_rows * grad_out).sum(1, keepdim=True)
        if ctx.needs_input_grad[1]:
            grad_v = SoftmaxJacobianFunction.apply(y_rows, grad_out)
        return grad_y, grad_v

    @staticmethod
    def jvp(ctx: Any, y_tangent: Tensor | None, v_tangent: Tensor | None) -> Tensor:
        y_rows, v_rows = ctx.saved_tensors
        out = torch.zeros_like(y_rows)
        if v_tangent is not None:
            out = out + SoftmaxJacobianFunction.apply(y_rows, v_tangent)
        if y_tangent is not None:
            out = (
                out
                + y_tangent * _shifted(v_rows, y_rows)
                - y_rows * (y_tangent * v_rows).sum(1, keepdim=True)
            )
        return out

    @staticmethod
    def vmap(info: Any, in_dims: tuple, y_rows: Tensor, v_rows: Tensor) -> tuple:
        out = SoftmaxJacobianFunction.apply(
            fold_batch(info, y_rows, in_dims[0]), fold_batch(info, v_rows, in_dims[1])
        )
        return out.reshape(info.batch_size, -1, out.shape[-1]), 0


def _softmax_jacobian_times(y: Tensor, vector: Tensor, layout: RowLayout) -> Tensor:
    # to_rows(y) undoes the from_rows of the forward: a contiguous view, no copy.
    return from_rows(SoftmaxJacobianFunction.apply(to_rows(y, layout), to_rows(vector, layout)), layout)


class SoftmaxRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, dims: tuple[int, ...]) -> Tensor:
        layout = row_layout(tuple(x.shape), dims, keepdim=True)
        return from_rows(softmax_rows_fwd(to_rows(x, layout)), layout)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, dims = inputs
        ctx.layout = row_layout(tuple(x.shape), dims, keepdim=True)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple:
        (y,) = ctx.saved_tensors
        return _softmax_jacobian_times(y, grad_y, ctx.layout), None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor, _dims_tangent: None) -> Tensor:
        (y,) = ctx.saved_tensors
        return _softmax_jacobian_times(y, x_tangent, ctx.layout)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, dims: tuple[int, ...]) -> tuple:
        return SoftmaxRowsFunction.apply(x.movedim(in_dims[0], 0), tuple(d + 1 for d in dims)), 0


def softmax_rows_triton(x: Tensor, dim: int = -1) -> Tensor:
    """``torch.softmax(x, dim)`` as fused Triton kernels, differentiable in both modes.

    CUDA tensors (fp16/bf16/fp32), or CPU tensors (fp32/fp64) under ``TRITON_INTERPRET=1``. A row
    of only ``-inf`` gives zeros and zero gradients, where ``torch.softmax`` gives NaN. Works
    under ``torch.func`` too (``grad``, ``vjp``/``jvp`` with ``vmap``, ``jacrev``, ``jacfwd``).
    """
    from ..common import triton_usable

    _checks.float_tensor("x", x)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    dims = _checks.reduce_dims(dim, x.dim(), x.shape)
    if not triton_usable(x):
        raise ValueError(
            f"softmax_rows_triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU "
            f"tensors); got a tensor on {x.device}"
        )
    return SoftmaxRowsFunction.apply(x, dims)
