"""Pieces every attention implementation shares: the causal mask and the seed-mode warning."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def visible(q_idx: Tensor, k_idx: Tensor, t_q: int, t_k: int, causal: bool) -> Tensor | None:
    """Boolean ``[len(q_idx), len(k_idx)]`` mask of the pairs a query may see, or None for all.

    Causal masks align bottom-right as FlashAttention does (MATH.md section 0): query ``i`` sees
    key ``j`` when ``j <= i + t_k - t_q``. ``q_idx``/``k_idx`` are absolute positions, so a block
    of a longer sequence gets its slice of the mask.
    """
    if not causal:
        return None
    return k_idx[None, :] <= q_idx[:, None] + (t_k - t_q)


def full_mask(t_q: int, t_k: int, causal: bool, device: torch.device) -> Tensor | None:
    return visible(torch.arange(t_q, device=device), torch.arange(t_k, device=device), t_q, t_k, causal)


_seed_warned = False


def warn_seed_once() -> None:
    global _seed_warned
    if not _seed_warned:
        _seed_warned = True
        warnings.warn(
            'grad="seed" uses the second note\'s homogeneity shortcut, which is NOT the true '
            "derivative of beta attention (MATH.md section 5); use it for experiments only.",
            stacklevel=3,
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision inputs accumulate in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
