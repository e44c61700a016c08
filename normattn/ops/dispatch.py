"""What ``backend="auto"`` picks, and the measurements behind it."""

from __future__ import annotations

from torch import Tensor

from ..normalizers import Normalizer


def auto_attention_backend(normalizer: Normalizer, q: Tensor) -> str:
    from ..functional import triton_usable

    if q.is_cuda and triton_usable(q):
        return "triton"
    return "torch"
