"""Attention normalizers as small specs (MATH.md section 3).

Every member of the family weighs row ``i`` of the scores as

    w_ij = phi(x_ij) / N_i,   N_i = alpha + Psi_i ** gamma,   Psi_i = sum_j psi(x_ij)

where ``x_ij = s_ij - m_i`` for a *shifted* normalizer (softmax, ``m_i`` the row max, whose
gradient is exactly zero: MATH.md section 2) and ``x_ij = s_ij`` otherwise. Masked pairs take no
part in any sum. Adding a normalizer means adding one ``Normalizer`` to ``NORMALIZERS``; the torch
blockwise path and the reference read nothing else. Triton kernels specialise on ``name``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Normalizer", "SOFTMAX", "BETA", "NORMALIZERS", "get_normalizer"]


@dataclass(frozen=True)
class Normalizer:
    name: str
    phi: Callable[[Tensor], Tensor]
    dphi: Callable[[Tensor], Tensor]
    psi: Callable[[Tensor], Tensor]
    dpsi: Callable[[Tensor], Tensor]
    alpha: float
    gamma: float
    shifted: bool
    # phi linear and psi quadratic: every sum factors through d x d states (MATH.md section 4).
    linear_time: bool

    def norm(self, psi_sum: Tensor) -> Tensor:
        """``N = alpha + Psi ** gamma``."""
        return self.alpha + psi_sum.clamp_min(0) ** self.gamma

    def dnorm(self, psi_sum: Tensor) -> Tensor:
        """``dN/dPsi = gamma * Psi ** (gamma - 1)``, taken as 0 where ``Psi == 0``.

        For beta, ``Psi = r^2`` and the coefficient multiplies ``psi'(s) = 2 s = 0`` there:
        beta is differentiable at ``r = 0`` with derivative ``I`` (MATH.md section 3), so the
        norm term vanishes instead of becoming ``0 * inf``.
        """
        if self.gamma == 1.0:
            return torch.ones_like(psi_sum)
        positive = psi_sum > 0
        safe = torch.where(positive, psi_sum, torch.ones_like(psi_sum))
        return torch.where(positive, self.gamma * safe ** (self.gamma - 1), torch.zeros_like(psi_sum))

    def reciprocal_norm(self, norm: Tensor) -> Tensor:
        """``1 / N``, and 0 for a row with no visible key (``N == 0``): its output is 0."""
        positive = norm > 0
        return torch.where(
            positive, 1 / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(norm)
        )


SOFTMAX = Normalizer(
    name="softmax",
    phi=torch.exp,
    dphi=torch.exp,
    psi=torch.exp,
    dpsi=torch.exp,
    alpha=0.0,
    gamma=1.0,
    shifted=True,
    linear_time=False,
)

BETA = Normalizer(
    name="beta",
    phi=lambda x: x,
    dphi=torch.ones_like,
    psi=torch.square,
    dpsi=lambda x: 2 * x,
    alpha=1.0,
    gamma=0.5,
    shifted=False,
    linear_time=True,
)

NORMALIZERS: dict[str, Normalizer] = {n.name: n for n in (SOFTMAX, BETA)}


def get_normalizer(name: str | Normalizer) -> Normalizer:
    if isinstance(name, Normalizer):
        return name
    if not isinstance(name, str) or name not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {sorted(NORMALIZERS)}, got {name!r}")
    return NORMALIZERS[name]
