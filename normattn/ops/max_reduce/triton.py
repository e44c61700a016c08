"""Max reduction in Triton (docs/math.md, section 2): values and argmax in one read, scatter backward.

The reduced axes are flattened into rows (``normattn.ops.rows``). A program owns ``BLOCK_ROWS``
rows and walks them in ``[BLOCK_ROWS, BLOCK_COLS]`` tiles, so any row length works and short rows
still fill a program. The row helpers here (:func:`row_block`, :func:`row_tile`, :func:`row_tiling`,
:func:`fold_batch`) are shared with the fused row softmax (``normattn.ops.softmax_rows.triton``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..rows import RowLayout, from_rows, row_layout, to_rows
from ..triton_utils import guard_derivatives
from .autograd import gather_at_argmax, save_argmax_context

# Column sentinel: larger than any real column, so a min over columns ignores it.
NO_COLUMN = tl.constexpr(2**31 - 1)
# Elements one program holds per tile: 16 KiB of fp32, 16 registers a thread at 8 warps.
MAX_TILE = 4096


@triton.jit
def row_block(pid, n_rows, BLOCK_ROWS: tl.constexpr):
    """The rows of program ``pid`` (int64, so ``row * stride`` cannot overflow) and their mask."""
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BR]
    return rows, rows < n_rows


@triton.jit
def row_tile(rows, row_mask, col_start, n_cols, stride_row, stride_col, BLOCK_COLS: tl.constexpr):
    """Columns, element offsets and in-bounds mask of the tile starting at column ``col_start``."""
    cols = col_start + tl.arange(0, BLOCK_COLS)  # [BC]
    offsets = rows[:, None] * stride_row + cols[None, :].to(tl.int64) * stride_col  # [BR, BC]
    mask = row_mask[:, None] & (cols[None, :] < n_cols)  # [BR, BC]
    return cols, offsets, mask


@triton.jit
def _max_reduce_fwd_kernel(
    x_ptr,
    values_ptr,
    indices_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows, row_mask = row_block(tl.program_id(0), n_rows, BLOCK_ROWS)
    # Running max and argmax per tile slot: element-wise updates in the loop, one row reduction
    # at the end. A slot takes a later column only when strictly greater, so it keeps the first.
    best = tl.full([BLOCK_ROWS, BLOCK_COLS], float("-inf"), x_ptr.dtype.element_ty)
    best_col = tl.full([BLOCK_ROWS, BLOCK_COLS], NO_COLUMN, tl.int32)
    for col_start in range(0, n_cols, BLOCK_COLS):
        cols, offsets, mask = row_tile(rows, row_mask, col_start, n_cols, stride_row, stride_col, BLOCK_COLS)
        x = tl.load(x_ptr + offsets, mask=mask, other=float("-inf"))  # [BR, BC]
        # An empty slot takes anything (a row of -inf still gets a column); NaN beats a number.
        take = mask & ((x > best) | (best_col == NO_COLUMN) | ((x != x) & (best == best)))
        best = tl.where(take, x, best)
        best_col = tl.where(take, cols[None, :], best_col)
    # A slot that saw a NaN holds its first NaN; any NaN in the row is the row's maximum.
    slot_is_nan = best != best
    nan_col = tl.min(tl.where(slot_is_nan, best_col, NO_COLUMN), axis=1)  # [BR]
    row_max = tl.max(tl.where(slot_is_nan, float("-inf"), best), axis=1)  # [BR]
    max_col = tl.min(tl.where(best == row_max[:, None], best_col, NO_COLUMN), axis=1)  # [BR]
    col = tl.where(nan_col != NO_COLUMN, nan_col, max_col).to(tl.int64)
    # Re-reading the chosen entry keeps a NaN's payload and costs one element per row.
    value = tl.load(x_ptr + rows * stride_row + col * stride_col, mask=row_mask)
    tl.store(values_ptr + rows, value, mask=row_mask)
    tl.store(indices_ptr + rows, col, mask=row_mask)


@triton.jit
def _max_reduce_bwd_kernel(
    grad_values_ptr,
    indices_ptr,
    grad_x_ptr,
    n_rows,
    n_cols,
    stride_grad_values,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows, row_mask = row_block(tl.program_id(0), n_rows, BLOCK_ROWS)
    grad = tl.load(grad_values_ptr + rows * stride_grad_values, mask=row_mask, other=0)  # [BR]
    argmax = tl.load(indices_ptr + rows, mask=row_mask, other=-1)  # [BR]
    # Every entry is written (zeros included), so the output needs no zero-fill pass.
    for col_start in range(0, n_cols, BLOCK_COLS):
        cols, offsets, mask = row_tile(rows, row_mask, col_start, n_cols, n_cols, 1, BLOCK_COLS)
        grad_x = tl.where(cols[None, :] == argmax[:, None], grad[:, None], 0)  # [BR, BC]
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def row_tiling(n_rows: int, row_len: int) -> tuple[int, int, int, tuple[int]]:
    """``(BLOCK_ROWS, BLOCK_COLS, num_warps, grid)`` for a row kernel over ``[n_rows, row_len]``.

    Tiles hold up to ``MAX_TILE`` elements: a long row is walked in ``MAX_TILE``-wide tiles by one
    program, short rows are stacked so that a program still moves a full tile per step.
    """
    block_cols = min(triton.next_power_of_2(row_len), MAX_TILE)
    block_rows = min(triton.next_power_of_2(max(n_rows, 1)), max(1, MAX_TILE // block_cols))
    num_warps = 8 if block_rows * block_cols >= 2048 else 4
    return block_rows, block_cols, num_warps, (triton.cdiv(n_rows, block_rows),)


def _check_row_len(row_len: int) -> None:
    if row_len >= NO_COLUMN.value:
        raise ValueError(f"rows of {row_len} elements are too long: column indices are 32-bit")


@torch.library.custom_op("normattn::max_reduce_rows_forward", mutates_args=())
def max_reduce_rows_fwd(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Max and first argmax of each row of a 2-D tensor (any strides): ``[n_rows]`` each."""
    n_rows, row_len = rows.shape
    _check_row_len(row_len)
    values = torch.empty(n_rows, dtype=rows.dtype, device=rows.device)
    indices = torch.empty(n_rows, dtype=torch.int64, device=rows.device)
    if n_rows == 0:
        return values, indices
    block_rows, block_cols, num_warps, grid = row_tiling(n_rows, row_len)
    _max_reduce_fwd_kernel[grid](
        rows,
        values,
        indices,
        n_rows,
        row_len,
        rows.stride(0),
        rows.stride(1),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )
    return values, indices


@max_reduce_rows_fwd.register_fake
def _(rows: Tensor) -> tuple[Tensor, Tensor]:
    return rows.new_empty(rows.shape[0]), rows.new_empty(rows.shape[0], dtype=torch.int64)


@torch.library.custom_op("normattn::max_reduce_rows_backward", mutates_args=())
def max_reduce_rows_bwd(grad_values: Tensor, indices: Tensor, row_len: int) -> Tensor:
    """``[n_rows, row_len]`` contiguous: ``grad_values[r]`` at column ``indices[r]``, zero elsewhere."""
    (n_rows,) = grad_values.shape
    grad_rows = torch.empty(n_rows, row_len, dtype=grad_values.dtype, device=grad_values.device)
    if n_rows == 0:
        return grad_rows
    block_rows, block_cols, num_warps, grid = row_tiling(n_rows, row_len)
    _max_reduce_bwd_kernel[grid](
        grad_values,
        indices.contiguous(),
        grad_rows,
        n_rows,
        row_len,
        grad_values.stride(0),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )
    return grad_rows


@max_reduce_rows_bwd.register_fake
def _(grad_values: Tensor, indices: Tensor, row_len: int) -> Tensor:
    return grad_values.new_empty(grad_values.shape[0], row_len)


# launched as custom ops (triton_utils.guard_derivatives); the Functions below give the derivatives
guard_derivatives(max_reduce_rows_fwd)
guard_derivatives(max_reduce_rows_bwd)


def fold_batch(info: Any, tensor: Tensor, batch_dim: int | None) -> Tensor:
    """A vmapped row tensor as more rows: ``[B, n_rows, ...] -> [B * n_rows, ...]`` (an unbatched
    input is broadcast over the batch). One launch then serves the whole vmap."""
    if batch_dim is None:
        tensor = tensor.unsqueeze(0).expand(info.batch_size, *tensor.shape)
    else:
        tensor = tensor.movedim(batch_dim, 0)
    return tensor.reshape(-1, *tensor.shape[2:])


# Kernels are launched only from autograd.Function.forward: under torch.func transforms that is
# where tensors arrive unwrapped (backward() and jvp() get functorch wrappers, which a Triton
# launch cannot take). So the backward scatter is a Function of its own, linear in the cotangent:
# its derivatives are a gather (reverse) and itself (forward), its vmap folds the batch into rows,
# and any composition (vmap of the VJP, jacfwd, Hessians, double backward) stays exact.


class ScatterToArgmaxFunction(torch.autograd.Function):
    """``[n_rows] -> [n_rows, row_len]``: each value at its row's argmax column, zero elsewhere."""

    @staticmethod
    def forward(grad_values: Tensor, indices: Tensor, row_len: int) -> Tensor:
        return max_reduce_rows_bwd(grad_values, indices, row_len)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        _, indices, ctx.row_len = inputs
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple:
        (indices,) = ctx.saved_tensors
        return grad_rows.gather(1, indices.unsqueeze(1)).squeeze(1), None, None

    @staticmethod
    def jvp(ctx: Any, grad_values_tangent: Tensor, _indices_tangent: None, _row_len_tangent: None) -> Tensor:
        (indices,) = ctx.saved_tensors
        return ScatterToArgmaxFunction.apply(grad_values_tangent, indices, ctx.row_len)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, grad_values: Tensor, indices: Tensor, row_len: int) -> tuple:
        grad_rows = ScatterToArgmaxFunction.apply(
            fold_batch(info, grad_values, in_dims[0]), fold_batch(info, indices, in_dims[1]), row_len
        )
        return grad_rows.reshape(info.batch_size, -1, row_len), 0


class MaxReduceTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple[Tensor, Tensor]:
        layout = row_layout(tuple(x.shape), dims, keepdim)
        values, indices = max_reduce_rows_fwd(to_rows(x, layout))
        return values.reshape(layout.out_shape), indices.reshape(layout.out_shape)

    setup_context = staticmethod(save_argmax_context)

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None) -> tuple:
        (indices,) = ctx.saved_tensors
        layout: RowLayout = ctx.layout
        grad_rows = ScatterToArgmaxFunction.apply(
            grad_values.reshape(layout.n_rows), indices.reshape(layout.n_rows), layout.row_len
        )
        return from_rows(grad_rows, layout), None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor, _dims_tangent: None, _keepdim_tangent: None) -> tuple:
        (indices,) = ctx.saved_tensors
        return gather_at_argmax(x_tangent, indices, ctx.layout), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple:
        # The batch is one more kept axis in front; flat indices into the reduced axes are unchanged.
        batched_dims = tuple(d + 1 for d in dims)
        outputs = MaxReduceTritonFunction.apply(x.movedim(in_dims[0], 0), batched_dims, keepdim)
        return outputs, (0, 0)


def max_reduce_triton(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple[Tensor, Tensor]:
    """Max of ``x`` over the sorted non-negative axes ``dims`` and its argmax, fused in Triton.

    Same contract as ``max_reduce_torch``: ``indices`` is the flat row-major index into the
    reduced axes (int64); NaN is the maximum of a row holding one (its first NaN); the backward
    sends each output's whole gradient to its argmax, the first index in row-major order on
    ties (``torch.amax`` splits ties evenly). Forward and backward are Triton kernels, the JVP a
    gather. Works under ``torch.func`` (``vjp`` + ``vmap`` for a whole Jacobian in one launch,
    ``jacrev``, ``jacfwd``, ``grad``, Hessians) and with double backward.
    """
    values, indices = MaxReduceTritonFunction.apply(x, dims, keepdim)
    return values, indices
