"""Max reduction in plain torch, differentiated by autograd: the yardstick (docs/math.md, section 2)."""

from __future__ import annotations

from torch import Tensor

from ..rows import row_layout, to_rows


def max_reduce_reference(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple[Tensor, Tensor]:
    """Max of ``x`` over the sorted non-negative axes ``dims``, and its argmax.

    ``indices`` (int64, the shape of ``values``) is the flat row-major index into the reduced
    axes. ``argmax`` picks the first maximum and treats NaN as the maximum, and autograd through
    ``gather`` sends each output's whole gradient to that one entry: on ties the first index in
    row-major order gets all of it (``torch.amax`` would split it evenly).
    """
    layout = row_layout(tuple(x.shape), dims, keepdim)
    rows = to_rows(x, layout)  # [n_rows, row_len]
    indices = rows.argmax(dim=1, keepdim=True)  # [n_rows, 1]
    values = rows.gather(1, indices)
    return values.reshape(layout.out_shape), indices.reshape(layout.out_shape)
