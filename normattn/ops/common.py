"""Pieces every op shares: Triton availability, the seed-mode warning, accumulation dtypes."""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor


def triton_usable(x: Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


_seed_warned = False


def warn_seed_once() -> None:
    global _seed_warned
    if not _seed_warned:
        _seed_warned = True
        warnings.warn(
            'grad="seed" uses the beta-attention write-up\'s homogeneity shortcut, which is NOT the true '
            'derivative of beta attention (docs/math.md, "The shortcut"); use it for experiments only.',
            stacklevel=3,
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision inputs accumulate in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def composition_error(backend: str, normalizer: str, what: str) -> str:
    """The message for a derivative composition that a backend does not implement."""
    return (
        f'normattn: backend="{backend}" (normalizer "{normalizer}") cannot differentiate {what}; '
        f'use backend="reference" (materialized attention, plain autograd) for this composition'
    )
