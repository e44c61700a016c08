"""Attention normalizers as small specs: the one place a normalizer is defined.

Every member of the family weighs row ``i`` of the scores ``s_ij`` (over the keys it may see) as

    w_ij = phi(s_ij - m_i; e_i) / N_i,   N_i = alpha_i + Psi_i ** gamma,   Psi_i = sum_j psi(s_ij - m_i; e_i)

* An *unshifted* normalizer (beta, sigmoid) has ``m_i = 0``, ``e_i = 1`` and ``alpha_i = alpha``.
* A *shifted* normalizer (softmax, softpick) subtracts the row shift ``m_i = max(floor, max_j s_ij)``
  and passes ``e_i = exp(-m_i)``. Its ``phi``, ``psi`` and ``alpha_i = alpha * e_i`` all scale by
  ``e_i`` when ``m_i`` moves, so the weights do not depend on the shift and its gradient is zero
  (the max-kernel write-up's argument); flash kernels may use a running max. With attention
  sinks (softmax only), ``alpha_i`` gains ``exp(a_h - m_i)``: the sink is one more key, of logit
  ``a_h`` and value 0, and the floor becomes ``a_h``. Shifted normalizers have ``gamma = 1``.

A spec gives ``phi``, ``psi`` and their first and second derivatives as functions
``f(x, e, p)`` of the shifted score ``x``, the row factor ``e`` and the call's parameter ``p`` (the
sigmoid's bias). From these, :meth:`Normalizer.terms` and :meth:`Normalizer.all_terms` give
every coefficient the backward, the JVP and the gradient of the JVP need (docs/math.md derives
them); the torch kernels and the reference read nothing else. The Triton kernels evaluate the same
functions through the ``@triton.jit`` helpers of ``normattn/normalizers_triton.py``, selected by
:attr:`Normalizer.kernel`. Adding a normalizer means adding a spec here, its Triton helper there,
and its docs and tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Normalizer", "SOFTMAX", "BETA", "SIGMOID", "SOFTPICK", "NORMALIZERS", "get_normalizer", "sigmoid"]

ElementFn = Callable[[Tensor, Tensor, float], Tensor]


def _positive(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x > 0, x where positive else 1)``: a divisor that is safe on both branches of a where."""
    positive = x > 0
    return positive, torch.where(positive, x, torch.ones_like(x))


@dataclass(frozen=True)
class Normalizer:
    """One member of the family (see the module docstring).

    Attributes:
        name: the registry key, e.g. ``"softmax"``.
        phi, dphi, d2phi: the numerator function and its first two derivatives in ``x``.
        psi, dpsi, d2psi: the function summed into ``Psi`` and its first two derivatives.
        alpha: the constant term of ``N`` (times ``e_i`` for a shifted normalizer).
        gamma: the power of ``Psi`` in ``N``; 1 for shifted normalizers.
        shift_floor: None for an unshifted normalizer, else the floor of the row shift
            (``-inf`` for softmax, 0 for softpick).
        normalized: False when ``psi`` is identically 0 (``N = alpha``): kernels skip the row sums.
        sinks: whether the normalizer accepts per-head sink logits.
        linear_time: ``phi`` linear and ``psi`` quadratic, so every sum factors through
            ``d x d`` states (beta only: the linear-time paths implement exactly beta).
        kernel: the id of the normalizer's Triton helpers (``normalizers_triton.py``), None if it
            has none (a user-defined spec runs on the reference and torch backends only).
        parameter: the value ``p`` passed to the element functions: a float, or a function of the
            number of keys ``Tk`` (the sigmoid's default bias ``-log(Tk)``).
    """

    name: str
    phi: ElementFn
    dphi: ElementFn
    d2phi: ElementFn
    psi: ElementFn
    dpsi: ElementFn
    d2psi: ElementFn
    alpha: float
    gamma: float
    shift_floor: float | None = None
    normalized: bool = True
    sinks: bool = False
    linear_time: bool = False
    kernel: int | None = None
    parameter: float | Callable[[int], float] = 0.0

    def __post_init__(self) -> None:
        if self.shifted and self.gamma != 1.0:
            raise ValueError(
                f"normalizer {self.name!r}: a shifted normalizer needs gamma = 1, got {self.gamma}"
            )
        if self.sinks and not self.shifted:
            raise ValueError(f"normalizer {self.name!r}: sinks need a shifted (exponential) normalizer")
        if not self.normalized and self.alpha <= 0:
            raise ValueError(f"normalizer {self.name!r}: without psi, N = alpha must be positive")

    @property
    def shifted(self) -> bool:
        return self.shift_floor is not None

    def resolve(self, t_k: int) -> float:
        """The parameter ``p`` of one call with ``t_k`` keys."""
        return float(self.parameter(t_k)) if callable(self.parameter) else float(self.parameter)

    # -- the row normalizer N(Psi) of an unshifted normalizer, and its derivatives --------------

    def norm(self, psi_sum: Tensor) -> Tensor:
        """``N = alpha + Psi ** gamma``, with a zero derivative at ``Psi = 0`` when ``gamma < 1``.

        For beta ``Psi = r^2``: beta is differentiable at ``r = 0`` with derivative ``I`` (the norm's
        kink is multiplied by ``s = 0``), so the norm's contribution there is 0, not ``0 * inf``.
        """
        if self.gamma == 1.0:
            return self.alpha + psi_sum
        positive, safe = _positive(psi_sum)
        return self.alpha + torch.where(positive, safe**self.gamma, torch.zeros_like(psi_sum))

    def _norm_coefficients(self, psi_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(1/N, N'/N, N N''/N'^2)`` of ``N(Psi)``, each 0 where undefined (``N = 0`` or ``Psi = 0``)."""
        norm = self.norm(psi_sum)
        has_norm, safe_norm = _positive(norm)
        inv_norm = torch.where(has_norm, 1 / safe_norm, torch.zeros_like(norm))
        if self.gamma == 1.0:
            return inv_norm, inv_norm, torch.zeros_like(norm)
        positive, safe = _positive(psi_sum)
        slope = torch.where(positive, self.gamma * safe ** (self.gamma - 1), torch.zeros_like(psi_sum))
        # N N'' / N'^2 = (gamma - 1) N / (gamma Psi^gamma)
        curvature = torch.where(
            positive, (self.gamma - 1) * norm / (self.gamma * safe**self.gamma), torch.zeros_like(psi_sum)
        )
        return inv_norm, slope * inv_norm, curvature

    # -- the coefficients every derivative is built from -----------------------------------------

    def _evaluate(self, s: Tensor, stat: Tensor, p: float):
        """``(x, e, 1/N, N'/N, N N''/N'^2)`` per score, from the row statistic; None for a factor of 1.

        A shifted normalizer keeps ``L_i = m_i + log N_i``: evaluating ``phi`` at the shift ``L_i``
        divides it by ``N_i`` (homogeneity), so ``1/N`` and ``N'/N`` are 1 (and ``N''`` is 0).
        ``L_i = +inf`` (a row with no visible key) gives ``x = -inf``, ``e = 0`` and weights 0. An
        unshifted normalizer keeps ``Psi_i``.
        """
        stat = stat[..., None]
        if self.shifted:
            return s - stat, torch.exp(-stat), None, None, None
        inv_norm, slope, curvature = self._norm_coefficients(stat)
        return s, torch.ones_like(stat), inv_norm, slope, curvature

    def _apply(self, functions: tuple[ElementFn, ...], x: Tensor, e: Tensor, p: float) -> list[Tensor]:
        """Evaluate element functions, once each: softmax's phi, phi', psi' are one exponential."""
        values: dict[int, Tensor] = {}
        for f in functions:
            if id(f) not in values:
                values[id(f)] = f(x, e, p)
        return [values[id(f)] for f in functions]

    def terms(self, s: Tensor, stat: Tensor, p: float, grad: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
        """``(w, a, b)`` per score: the weight ``phi / N``, ``a = phi' / N`` and ``b = N' psi' / N``.

        The backward is ``ds = a (g.v) - D b`` with ``D_i = g_i.O_i``; the JVP is
        ``Od = sum_j a sd v - mu O + sum_j w vd`` with ``mu_i = sum_j b sd``. ``grad="seed"`` gives the
        beta-attention write-up's shortcut instead: ``a = 0``, ``b = -w / Psi`` (docs/math.md).
        Results may share storage (softmax: ``w``, ``a`` and ``b`` are one tensor).
        """
        x, e, inv_norm, slope, _ = self._evaluate(s, stat, p)
        phi, dphi, dpsi = self._apply((self.phi, self.dphi, self.dpsi), x, e, p)
        w = phi if inv_norm is None else phi * inv_norm
        if grad == "seed":
            positive, safe = _positive(stat[..., None])
            return w, torch.zeros_like(w), torch.where(positive, -w / safe, torch.zeros_like(w))
        if inv_norm is None:
            return w, dphi, dpsi
        return w, dphi * inv_norm, dpsi * slope

    def all_terms(self, s: Tensor, stat: Tensor, p: float) -> tuple[Tensor, ...]:
        """``(w, a, b, a2, b2, c)``: ``terms`` (exact) and the second-order ``a2 = phi'' / N``,
        ``b2 = N' psi'' / N`` and the row's ``c = N N'' / N'^2``, from one evaluation (softmax's
        five element values are one exponential, and shared).

        They enter the gradient of the JVP's tangent output (docs/math.md, section 7).
        """
        x, e, inv_norm, slope, curvature = self._evaluate(s, stat, p)
        functions = (self.phi, self.dphi, self.dpsi, self.d2phi, self.d2psi)
        phi, dphi, dpsi, d2phi, d2psi = self._apply(functions, x, e, p)
        if inv_norm is None:
            return phi, dphi, dpsi, d2phi, d2psi, torch.zeros_like(stat[..., None])
        return phi * inv_norm, dphi * inv_norm, dpsi * slope, d2phi * inv_norm, d2psi * slope, curvature

    def row_statistic(self, shift: Tensor, norm: Tensor) -> Tensor:
        """The statistic a shifted normalizer keeps, ``L = m + log N`` (``+inf`` where ``N = 0``)."""
        has_norm, safe = _positive(norm)
        return torch.where(has_norm, shift + torch.log(safe), torch.full_like(norm, math.inf))


def _zero(x: Tensor, e: Tensor, p: float) -> Tensor:
    return torch.zeros_like(x)


def _exp(x: Tensor, e: Tensor, p: float) -> Tensor:
    return torch.exp(x)


SOFTMAX = Normalizer(
    name="softmax",
    phi=_exp,
    dphi=_exp,
    d2phi=_exp,
    psi=_exp,
    dpsi=_exp,
    d2psi=_exp,
    alpha=0.0,
    gamma=1.0,
    shift_floor=-math.inf,
    sinks=True,
    kernel=0,
)

# beta(x) = x / (1 + ||x||) row-wise: phi(s) = s, psi(s) = s^2, N = 1 + sqrt(Psi).
BETA = Normalizer(
    name="beta",
    phi=lambda x, e, p: x,
    dphi=lambda x, e, p: torch.ones_like(x),
    d2phi=_zero,
    psi=lambda x, e, p: x * x,
    dpsi=lambda x, e, p: 2 * x,
    d2psi=lambda x, e, p: torch.full_like(x, 2.0),
    alpha=1.0,
    gamma=0.5,
    linear_time=True,
    kernel=1,
)


def _sigmoid_derivative(x: Tensor, e: Tensor, p: float) -> Tensor:
    y = torch.sigmoid(x + p)
    return y * (1 - y)


def _sigmoid_second_derivative(x: Tensor, e: Tensor, p: float) -> Tensor:
    y = torch.sigmoid(x + p)
    return y * (1 - y) * (1 - 2 * y)


def sigmoid(bias: float | None = None) -> Normalizer:
    """Sigmoid attention, ``w_ij = sigmoid(s_ij + bias)`` with no row normalization.

    ``bias=None`` is the default normalizer ``"sigmoid"``: ``bias = -log(Tk)`` for a call with
    ``Tk`` keys, one constant per call (the bias recommended by "Theory, Analysis, and Best Practices
    for Sigmoid Self-Attention", Ramapuram et al., 2024). A float gives that constant instead.
    """
    if bias is not None and (
        isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias)
    ):
        raise ValueError(f"bias must be a finite number or None, got {bias!r}")
    return Normalizer(
        name="sigmoid" if bias is None else f"sigmoid(bias={bias:g})",
        phi=lambda x, e, p: torch.sigmoid(x + p),
        dphi=_sigmoid_derivative,
        d2phi=_sigmoid_second_derivative,
        psi=_zero,
        dpsi=_zero,
        d2psi=_zero,
        alpha=1.0,
        gamma=1.0,
        normalized=False,
        kernel=2,
        parameter=(lambda t_k: -math.log(max(t_k, 1))) if bias is None else float(bias),
    )


SIGMOID = sigmoid()


def _softpick_numerator_derivative(x: Tensor, e: Tensor, p: float) -> Tensor:
    # d/ds relu(exp(s) - 1) = exp(s) where s > 0, and 0 at s = 0 exactly (by definition)
    ex = torch.exp(x)
    return torch.where(ex > e, ex, torch.zeros_like(ex))


def _softpick_denominator_derivative(x: Tensor, e: Tensor, p: float) -> Tensor:
    # d/ds |exp(s) - 1| = sign(s) exp(s), and 0 at s = 0 exactly
    ex = torch.exp(x)
    return torch.sign(ex - e) * ex


# softpick (Zuhri et al., 2025, arXiv 2504.20966): relu(exp(s) - 1) / (sum_j |exp(s_j) - 1| + eps),
# shifted by m = max(max_j s_j, 0): exp(s - m) - exp(-m) = e (exp(s) - 1) never overflows.
SOFTPICK = Normalizer(
    name="softpick",
    phi=lambda x, e, p: torch.relu(torch.exp(x) - e),
    dphi=_softpick_numerator_derivative,
    d2phi=_softpick_numerator_derivative,
    psi=lambda x, e, p: torch.abs(torch.exp(x) - e),
    dpsi=_softpick_denominator_derivative,
    d2psi=_softpick_denominator_derivative,
    alpha=1e-6,
    gamma=1.0,
    shift_floor=0.0,
    kernel=3,
)

NORMALIZERS: dict[str, Normalizer] = {n.name: n for n in (SOFTMAX, BETA, SIGMOID, SOFTPICK)}


def get_normalizer(name: str | Normalizer) -> Normalizer:
    if isinstance(name, Normalizer):
        return name
    if not isinstance(name, str) or name not in NORMALIZERS:
        raise ValueError(
            f"normalizer must be one of {sorted(NORMALIZERS)} or a normattn.Normalizer, got {name!r}"
        )
    return NORMALIZERS[name]
