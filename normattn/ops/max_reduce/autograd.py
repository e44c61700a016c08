"""Max reduction with a hand-written backward and JVP (docs/math.md, section 2), vmap-friendly.

Backward: ``dA[s2, s1] = dB[s2] * 1[s1 == m(s2)]``; JVP: ``Bd[s2] = Ad[s2, m(s2)]``. Both are
written with vmappable ops only (``where``, ``gather``, reshapes), so ``torch.func.vmap`` of the
VJP takes a whole Jacobian (one cotangent per output of a loss ``O[s3]``) in one call, and
``generate_vmap_rule`` lets ``jacfwd`` / ``vmap`` batch the forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..rows import RowLayout, from_rows, row_layout, to_rows


def scatter_to_argmax(grad_values: Tensor, indices: Tensor, layout: RowLayout) -> Tensor:
    """``dA``: each ``dB`` in its row's argmax column, zero elsewhere, in the input's shape.

    ``where`` against a column iota instead of ``zeros().scatter_()``: it has a vmap batching
    rule, and it allocates only the result plus a boolean mask (no zero-filled copy to clone).
    """
    columns = torch.arange(layout.row_len, device=indices.device)  # [row_len]
    hit = columns == indices.reshape(layout.n_rows, 1)  # [n_rows, row_len]
    grad_rows = torch.where(hit, grad_values.reshape(layout.n_rows, 1), 0)
    return from_rows(grad_rows, layout)


def gather_at_argmax(tangent: Tensor, indices: Tensor, layout: RowLayout) -> Tensor:
    """``Bd``: the tangent's entry at each row's argmax, in the output's shape."""
    picked = to_rows(tangent, layout).gather(1, indices.reshape(layout.n_rows, 1))
    return picked.reshape(layout.out_shape)


def save_argmax_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    """``setup_context`` shared by the max-reduce Functions: keep the layout and the argmax."""
    x, dims, keepdim = inputs
    _, indices = output
    ctx.layout = row_layout(tuple(x.shape), dims, keepdim)
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(indices)
    ctx.save_for_forward(indices)


class MaxReduceFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple[Tensor, Tensor]:
        layout = row_layout(tuple(x.shape), dims, keepdim)
        rows = to_rows(x, layout)  # [n_rows, row_len]
        # argmax is documented to return the first maximum (torch.max(dim) is not, on CUDA);
        # NaN counts as the maximum, as in torch.max.
        indices = rows.argmax(dim=1, keepdim=True)  # [n_rows, 1]
        values = rows.gather(1, indices)
        return values.reshape(layout.out_shape), indices.reshape(layout.out_shape)

    setup_context = staticmethod(save_argmax_context)

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None) -> tuple:
        (indices,) = ctx.saved_tensors
        return scatter_to_argmax(grad_values, indices, ctx.layout), None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor, _dims_tangent: None, _keepdim_tangent: None) -> tuple:
        (indices,) = ctx.saved_tensors
        return gather_at_argmax(x_tangent, indices, ctx.layout), None


def max_reduce_torch(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple[Tensor, Tensor]:
    """Max of ``x`` over the sorted non-negative axes ``dims``, with its argmax.

    ``indices`` (int64, the shape of ``values``) is the flat row-major index into the reduced
    axes. NaN is the maximum of any row holding one (its first NaN), as in ``torch.max``.
    Backward sends each output's whole gradient to its argmax; on ties the first index in
    row-major order of the reduced axes gets all of it, where ``torch.amax`` splits it evenly.
    """
    values, indices = MaxReduceFunction.apply(x, dims, keepdim)
    return values, indices
