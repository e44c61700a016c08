"""The normalizer specs: each member's functions, derivatives, definitions and edge cases.

Everything here is parametrized over the registry (``normattn.NORMALIZERS``), so a new entry is
tested automatically.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, attend, attention_ref, inputs

import normattn
from normattn.normalizers import NORMALIZERS, Normalizer, get_normalizer, sigmoid

NAMES = sorted(NORMALIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_spec_derivatives_are_the_derivatives_of_its_functions(name):
    """``dphi``/``d2phi``/``dpsi``/``d2psi`` against autograd of ``phi``/``psi`` (float64)."""
    spec = NORMALIZERS[name]
    x = torch.randn(200, dtype=torch.float64) * 3
    x = x[(x.abs() > 1e-3)]  # away from the kinks of relu and |.| at s = 0
    e = torch.full_like(x, 0.7) if spec.shifted else torch.ones_like(x)
    if spec.shifted:  # x is s - m, with exp(-m) = e: the kinks sit at x = log(e)
        x = x + math.log(0.7)
    p = spec.resolve(17)
    for f, df, d2f in ((spec.phi, spec.dphi, spec.d2phi), (spec.psi, spec.dpsi, spec.d2psi)):
        xs = x.clone().requires_grad_()
        value = f(xs, e, p)
        first = second = torch.zeros_like(x)  # a constant function (sigmoid's psi) or derivative
        if value.requires_grad:
            (first,) = torch.autograd.grad(value.sum(), xs, create_graph=True)
        if first.requires_grad:
            (second,) = torch.autograd.grad(first.sum(), xs, materialize_grads=True)
        torch.testing.assert_close(df(x, e, p), first.detach(), **F64)
        torch.testing.assert_close(d2f(x, e, p), second, **F64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_matches_the_definition(name, causal):
    """The spec-driven reference equals each normalizer written from its definition."""
    q, k, v = inputs((2, 3, 3, 9, 11, 8, 5))
    got = normattn.attention(q, k, v, normalizer=name, causal=causal, backend="reference")
    torch.testing.assert_close(got, attention_ref(q, k, v, name, causal=causal), **F64)


@pytest.mark.parametrize("name", [n for n in NAMES if NORMALIZERS[n].shifted])
def test_the_row_shift_has_zero_gradient(name):
    """A shifted normalizer's weights do not depend on the shift m: detaching it changes nothing."""
    spec = NORMALIZERS[name]
    s = torch.randn(5, 17, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 17, dtype=torch.float64)

    def weights(detach):
        m = s.amax(-1, keepdim=True).clamp_min(0 if spec.shift_floor == 0 else -math.inf)
        m = m.detach() if detach else m
        e = torch.exp(-m)
        norm = spec.alpha * e + spec.psi(s - m, e, 0.0).sum(-1, keepdim=True)
        return spec.phi(s - m, e, 0.0) / norm

    live, fixed = (torch.autograd.grad(weights(d), s, upstream)[0] for d in (False, True))
    torch.testing.assert_close(live, fixed, atol=1e-14, rtol=0)


def test_registry_and_lookup():
    assert set(NORMALIZERS) >= {"softmax", "beta", "sigmoid", "softpick"}
    assert all(get_normalizer(name) is spec for name, spec in NORMALIZERS.items())
    custom = sigmoid(bias=-2.0)
    assert get_normalizer(custom) is custom and custom.resolve(1000) == -2.0
    assert NORMALIZERS["sigmoid"].resolve(1000) == pytest.approx(-math.log(1000))
    with pytest.raises(ValueError, match="normalizer must be one of"):
        get_normalizer("sparsemax")
    with pytest.raises(ValueError, match="bias must be a finite number"):
        sigmoid(bias=float("inf"))


def test_sigmoid_bias_is_one_constant_per_call():
    q, k, v = inputs((1, 2, 2, 6, 9, 4, 4))
    for bias in (None, -2.0):
        spec = sigmoid(bias)
        got = normattn.attention(q, k, v, normalizer=spec, backend="torch")
        want = attention_ref(q, k, v, "sigmoid", sigmoid_bias=bias)
        torch.testing.assert_close(got, want, **F64)
    # a causal row sees fewer keys but keeps the call's bias -log(Tk)
    causal = normattn.attention(q, k, v, normalizer="sigmoid", causal=True, backend="torch")
    torch.testing.assert_close(causal, attention_ref(q, k, v, "sigmoid", causal=True), **F64)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_softpick_is_overflow_free(backend):
    """Scores of magnitude ~1e4 of either sign, whole rows of large negative scores included."""
    d = 8
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    keys = 10 * (u + 0.05 * torch.randn(1, 2, 12, d, dtype=torch.float64))
    signs = torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)[:, None]
    q = (3e3 * signs * u).expand(1, 2, 12, d).clone().requires_grad_()
    k = keys.requires_grad_()
    v = torch.randn(1, 2, 12, 4, dtype=torch.float64)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    assert scores.abs().min() > 5e3
    f = attend(backend, "softpick", causal=True)
    out = f(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k))
    _, out_dot = torch.func.jvp(f, (q, k, v), (q, k, v))
    for t in (out, out_dot, *grads):
        assert torch.isfinite(t).all()
    # rows of only negative scores: every relu is 0, so the row's output is 0; the others are not
    assert out[:, :, 1::2].abs().max() == 0 and (out[:, :, ::2].abs().sum(-1) > 0).all()


def test_softpick_kink_derivative_is_zero():
    """At exp(s) = 1 exactly (s = 0) the derivatives of relu and |.| are taken as 0."""
    spec = NORMALIZERS["softpick"]
    zero = torch.zeros(3, dtype=torch.float64)
    one = torch.ones(3, dtype=torch.float64)
    assert torch.equal(spec.dphi(zero, one, 0.0), zero) and torch.equal(spec.dpsi(zero, one, 0.0), zero)


def test_a_user_defined_normalizer_runs_on_reference_and_torch():
    """A spec outside the registry (here: softmax with a temperature of 2 in phi/psi)."""
    half_exp = lambda x, e, p: torch.exp(x / 2)  # noqa: E731
    spec = Normalizer(
        name="half-softmax",
        phi=half_exp,
        dphi=lambda x, e, p: torch.exp(x / 2) / 2,
        d2phi=lambda x, e, p: torch.exp(x / 2) / 4,
        psi=half_exp,
        dpsi=lambda x, e, p: torch.exp(x / 2) / 2,
        d2psi=lambda x, e, p: torch.exp(x / 2) / 4,
        alpha=0.0,
        gamma=1.0,
    )
    q, k, v = inputs((1, 2, 2, 7, 7, 4, 4))
    want = normattn.attention(q, k, v, normalizer="softmax", scale=0.25, backend="reference")
    for backend in ("reference", "torch"):
        got = normattn.attention(q, k, v, normalizer=spec, scale=0.5, backend=backend)
        torch.testing.assert_close(got, want, **F64)
    with pytest.raises(ValueError, match="no Triton kernel helpers"):
        normattn.attention(q, k, v, normalizer=spec, backend="triton")


def test_spec_validation():
    base = NORMALIZERS["softmax"]
    with pytest.raises(ValueError, match="gamma = 1"):
        Normalizer(**{**base.__dict__, "gamma": 0.5})
    with pytest.raises(ValueError, match="sinks need a shifted"):
        Normalizer(**{**NORMALIZERS["beta"].__dict__, "sinks": True})


def test_a_spec_claiming_linear_time_that_is_not_beta_is_refused():
    fake = Normalizer(**{**NORMALIZERS["sigmoid"].__dict__, "name": "fake-linear", "linear_time": True})
    q, k, v = inputs((1, 1, 1, 5, 5, 4, 4))
    with pytest.raises(ValueError, match="claims linear_time"):
        normattn.attention(q, k, v, normalizer=fake, backend="triton-linear")
    # the torch backend computes it exactly (blockwise) instead of as beta
    got = normattn.attention(q, k, v, normalizer=fake, backend="torch")
    torch.testing.assert_close(got, attention_ref(q, k, v, "sigmoid"), **F64)
