"""The normalizers' element functions as ``@triton.jit`` helpers: the Triton half of each spec.

Each helper branches on ``NORM: tl.constexpr``, the spec's :attr:`Normalizer.kernel` id, so a kernel
compiles only its normalizer's branch (FlashAttention's ``BIAS_TYPE`` idiom). They mirror the torch
functions of ``normattn/normalizers.py`` with one convention: a *shifted* normalizer receives its
shifted score ``x`` in log2 units (``x = (s - m) log2(e)``, so ``exp(s - m) = exp2(x)``, the scale
having ``log2(e)`` folded in, as in FlashAttention) and ``e = exp(-m)``; an unshifted one receives
``x = s`` and ``e = 1``. ``p`` is the call's parameter (the sigmoid's bias). Derivatives are with
respect to the natural-units score ``s``.

Adding a normalizer: give it the next id in ``normalizers.py`` and a branch in each helper here.
"""

from __future__ import annotations

import triton
import triton.language as tl

SOFTMAX = tl.constexpr(0)
BETA = tl.constexpr(1)
SIGMOID = tl.constexpr(2)
SOFTPICK = tl.constexpr(3)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sigmoid(x, p):
    return 1.0 / (1.0 + tl.exp2(-(x + p) * LOG2E))


@triton.jit
def forward_terms(x, e, p, NORM: tl.constexpr):
    """``(phi, psi)``: the numerator and the summand of ``Psi`` (``psi`` unused if not normalized)."""
    if NORM == SOFTMAX:
        phi = tl.exp2(x)
        psi = phi
    elif NORM == BETA:
        phi = x
        psi = x * x
    elif NORM == SIGMOID:
        phi = _sigmoid(x, p)
        psi = phi * 0.0
    else:  # SOFTPICK: relu(exp(s - m) - exp(-m)) and |exp(s - m) - exp(-m)|
        diff = tl.exp2(x) - e
        phi = tl.maximum(diff, 0.0)
        psi = tl.abs(diff)
    return phi, psi


@triton.jit
def derivative_terms(x, e, p, NORM: tl.constexpr):
    """``(phi, phi', psi')``."""
    if NORM == SOFTMAX:
        phi = tl.exp2(x)
        dphi = phi
        dpsi = phi
    elif NORM == BETA:
        phi = x
        dphi = x * 0.0 + 1.0
        dpsi = 2.0 * x
    elif NORM == SIGMOID:
        phi = _sigmoid(x, p)
        dphi = phi * (1.0 - phi)
        dpsi = phi * 0.0
    else:  # SOFTPICK; the derivatives of relu and |.| are 0 where exp(s) = 1 exactly
        ex = tl.exp2(x)
        phi = tl.maximum(ex - e, 0.0)
        dphi = tl.where(ex > e, ex, 0.0)
        dpsi = tl.where(ex > e, ex, tl.where(ex < e, -ex, 0.0))
    return phi, dphi, dpsi


@triton.jit
def second_terms(x, e, p, NORM: tl.constexpr):
    """``(phi'', psi'')``."""
    if NORM == SOFTMAX:
        d2phi = tl.exp2(x)
        d2psi = d2phi
    elif NORM == BETA:
        d2phi = x * 0.0
        d2psi = x * 0.0 + 2.0
    elif NORM == SIGMOID:
        y = _sigmoid(x, p)
        d2phi = y * (1.0 - y) * (1.0 - 2.0 * y)
        d2psi = y * 0.0
    else:  # SOFTPICK
        ex = tl.exp2(x)
        d2phi = tl.where(ex > e, ex, 0.0)
        d2psi = tl.where(ex > e, ex, tl.where(ex < e, -ex, 0.0))
    return d2phi, d2psi


@triton.jit
def norm_coefficients(psi_sum, alpha, NORM: tl.constexpr):
    """Unshifted normalizers: ``(1/N, N'/N, N N''/N'^2)`` of ``N = alpha + Psi^gamma`` per row.

    Each is 0 where undefined (beta at ``r = 0``: its derivative there is the identity).
    """
    if NORM == BETA:  # N = alpha + r, r = sqrt(Psi)
        r = tl.sqrt(psi_sum)
        positive = r > 0
        safe_r = tl.where(positive, r, 1.0)
        inv_norm = 1.0 / (alpha + r)
        slope = tl.where(positive, 0.5 / safe_r, 0.0) * inv_norm
        curvature = tl.where(positive, -(alpha + r) / safe_r, 0.0)
    else:  # SIGMOID: not normalized, N = alpha
        inv_norm = psi_sum * 0.0 + 1.0 / alpha
        slope = inv_norm
        curvature = psi_sum * 0.0
    return inv_norm, slope, curvature
