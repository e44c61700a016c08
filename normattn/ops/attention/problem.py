"""What one attention call computes, shared by every backend: the problem, visibility and dropout.

* Visibility: query ``i`` may see key ``j`` when ``j`` lies in the band
  ``i + off - left <= j <= i + off + right`` with ``off = Tk - Tq`` (a bound of None is open;
  ``causal`` is ``right = 0``, FlashAttention's bottom-right alignment) and the boolean
  ``attn_mask`` allows it. Masked pairs take no part in any sum.
* Dropout: inverted dropout on the normalized weights, ``w_ij -> w_ij keep_ij / (1 - p)``. The
  keep bit of ``(batch, query head, i, j)`` is a counter-based hash of a 64-bit seed drawn from
  the caller's generator (one draw per call): nothing is stored, and the backward, the JVP and
  every backend regenerate the same bits (``normattn/ops/attention/triton.py`` computes the same
  hash in Triton), so all backends agree bit for bit given the generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...normalizers import Normalizer

# A band bound that no index difference reaches: "unbounded" for kernels that take ints.
UNBOUNDED = 2**31 - 1


@dataclass(frozen=True)
class Problem:
    """The non-tensor description of one call; tensors (q, k, v, sinks, mask, seed) travel beside it."""

    normalizer: Normalizer
    scale: float
    parameter: float  # the normalizer's parameter for this call (the sigmoid's bias)
    left: int | None  # band: keys at most ``left`` before the query's diagonal (None: all)
    right: int | None  # and at most ``right`` after it (None: all; causal: 0)
    dropout_p: float = 0.0
    grad: str = "exact"

    @property
    def causal(self) -> bool:
        return self.right is not None and self.right <= 0

    def band(self) -> tuple[int, int]:
        """``(left, right)`` as ints, ``UNBOUNDED`` for an open side (what the kernels take)."""
        return (
            UNBOUNDED if self.left is None else self.left,
            UNBOUNDED if self.right is None else self.right,
        )

    def key_range(self, r0: int, r1: int, t_q: int, t_k: int) -> tuple[int, int, int, int]:
        """For queries ``[r0, r1)``: keys ``[lo, hi)`` seen by some row, ``[full_lo, full_hi)`` by all.

        ``full_lo >= full_hi`` when no key is seen by every row.
        """
        left, right = self.band()
        off = t_k - t_q
        lo = max(0, r0 + off - left) if self.left is not None else 0
        hi = min(t_k, r1 - 1 + off + right + 1) if self.right is not None else t_k
        full_lo = max(0, r1 - 1 + off - left) if self.left is not None else 0
        full_hi = min(t_k, r0 + off + right + 1) if self.right is not None else t_k
        return lo, max(lo, hi), full_lo, full_hi

    def visible(self, q_idx: Tensor, k_idx: Tensor, t_q: int, t_k: int) -> Tensor | None:
        """``[len(q_idx), len(k_idx)]`` band mask (absolute positions), or None when all are visible."""
        if self.left is None and self.right is None:
            return None
        diff = k_idx[None, :] - q_idx[:, None] - (t_k - t_q)  # j - i - off
        ok = torch.ones_like(diff, dtype=torch.bool)
        if self.left is not None:
            ok &= diff >= -self.left
        if self.right is not None:
            ok &= diff <= self.right
        return ok


# -- dropout bits --------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
# odd 32-bit constants: a golden-ratio step per head/row/column, and the lowbias32 mixer's multipliers
ROW_STEP, COL_STEP, HEAD_STEP = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9
MIX_1, MIX_2 = 0x7FEB352D, 0x846CA68B


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant mod 2^32`` for ``0 <= x < 2^32`` in int64, without overflowing int64."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def mix32(x: Tensor) -> Tensor:
    """The lowbias32 integer hash (a bijection of 32-bit words with good avalanche), in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_2)
    return x ^ (x >> 16)


def keep_threshold(p: float) -> int:
    """A 32-bit word ``u`` keeps its weight when ``u >= keep_threshold(p)`` (probability ``1 - p``)."""
    return min(int(round(p * 2**32)), 2**32 - 1)


def dropout_keep(seed: Tensor, head: Tensor, rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """Keep bits of the pairs ``(head, rows, cols)``, broadcast together; ``head = b * H + h``.

    ``seed`` is the call's int64 seed (0-d tensor). The hash chain is
    ``u = mix(mix(mix(seed_lo + HEAD_STEP * head) ^ (ROW_STEP * i + seed_hi)) ^ (COL_STEP * j))``.
    """
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    key = mix32((seed_lo + _mul32(head.long() & _MASK32, HEAD_STEP)) & _MASK32)
    row_key = mix32(key ^ ((_mul32(rows.long() & _MASK32, ROW_STEP) + seed_hi) & _MASK32))
    return mix32(row_key ^ _mul32(cols.long() & _MASK32, COL_STEP)) >= keep_threshold(p)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One int64 seed from ``generator`` (or the device's default generator), advancing its state."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator, device=device)
