"""Row layout shared by the row reductions: reduced axes moved to the end and flattened.

A reduction over the axes ``dims`` of ``x`` becomes a reduction over the last axis of a
``[n_rows, row_len]`` matrix: the kept axes, in order, index the rows, and the reduced axes, in
order, index the columns, so a column number is the flat row-major index into the reduced axes.
Plain torch only: the torch backends use it without needing triton.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor


class RowLayout(NamedTuple):
    input_shape: tuple[int, ...]
    perm: tuple[int, ...]  # kept axes, then reduced axes
    inverse_perm: tuple[int, ...]
    n_rows: int
    row_len: int
    out_shape: tuple[int, ...]  # the reduction's output shape (keepdim applied)


def row_layout(shape: tuple[int, ...], dims: tuple[int, ...], keepdim: bool) -> RowLayout:
    """Layout of a reduction over the sorted non-negative axes ``dims`` of a tensor of ``shape``.

    A 0-d tensor (``dims == (0,)`` from the validator) is one row of length one.
    """
    ndim = len(shape)
    reduced = tuple(d for d in dims if d < ndim)
    kept = tuple(d for d in range(ndim) if d not in reduced)
    perm = kept + reduced
    inverse_perm = tuple(sorted(range(ndim), key=perm.__getitem__))
    if keepdim:
        out_shape = tuple(1 if d in reduced else shape[d] for d in range(ndim))
    else:
        out_shape = tuple(shape[d] for d in kept)
    return RowLayout(
        input_shape=tuple(shape),
        perm=perm,
        inverse_perm=inverse_perm,
        n_rows=math.prod(shape[d] for d in kept),
        row_len=math.prod(shape[d] for d in reduced),
        out_shape=out_shape,
    )


def to_rows(x: Tensor, layout: RowLayout) -> Tensor:
    """``[n_rows, row_len]``, a view when the strides allow it, else a copy."""
    return x.permute(layout.perm).reshape(layout.n_rows, layout.row_len)


def from_rows(rows: Tensor, layout: RowLayout) -> Tensor:
    """Inverse of :func:`to_rows`: a ``[n_rows, row_len]`` tensor back to the input shape (a view)."""
    permuted = rows.reshape(tuple(layout.input_shape[d] for d in layout.perm))
    return permuted.permute(layout.inverse_perm)
