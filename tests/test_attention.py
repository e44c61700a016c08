"""normattn.attention for every normalizer on every backend: derivatives, agreement, edge cases.

Triton kernels run through the interpreter on the CPU (conftest sets TRITON_INTERPRET=1).
Every test is parametrized over the registry, so a new normalizer is tested everywhere.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from helpers import (
    F64,
    UGLY_SHAPES,
    all_derivatives,
    assert_flash_rule,
    attend,
    attention_ref,
    call_with_defaults,
    gradcheck,
    inputs,
    shape_id,
)

import normattn
from normattn.normalizers import NORMALIZERS
from normattn.ops.attention import blockwise
from normattn.ops.triton_utils import override_tiles

NAMES = sorted(NORMALIZERS)
BACKENDS = ("reference", "torch", "triton")
# (normalizer, grad): beta's seed mode is a separate derivative
MODES = [(name, "exact") for name in NAMES] + [("beta", "seed")]


@pytest.fixture(autouse=True)
def _quiet_seed_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _primals(name: str, shape):
    """``[q, k, v]``, plus per-head sinks for a normalizer that takes them."""
    primals = inputs(shape)
    if NORMALIZERS[name].sinks:
        primals.append(torch.randn(shape[1], dtype=torch.float64))
    return primals


@pytest.mark.parametrize("shape", UGLY_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_with_forward_ad(shape, backend, causal, name):
    """float64 gradcheck (VJP and JVP) on the ugly shapes; softmax also through its sinks."""
    primals = _primals(name, shape)
    # small tiles where the sequences are short (many tile edges), the default ones at T = 257
    with override_tiles(16, 32) if max(shape[3:5]) < 100 else contextlib.nullcontext():
        assert gradcheck(attend(backend, name, causal=causal), primals, interpreted=backend == "triton")


@pytest.mark.parametrize("shape", UGLY_SHAPES[1:5], ids=shape_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_backends_agree_with_the_definition(shape, causal, mode, monkeypatch):
    """Values, VJPs and JVPs of every backend against the independent reference, float64."""
    name, grad = mode
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 16)  # many tiles, diagonal and ragged ones
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 8)
    primals = _primals(name, shape)
    q, k, v, *sinks = primals
    cotangent = torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in primals]
    want = all_derivatives(attend("reference", name, causal=causal, grad=grad), primals, cotangent, tangents)
    if grad == "exact":
        ref = attention_ref(q, k, v, name, causal=causal, sinks=sinks[0] if sinks else None)
        torch.testing.assert_close(want[0], ref, **F64)
    with override_tiles(16, 32):
        for backend in ("torch", "triton"):
            got = all_derivatives(
                attend(backend, name, causal=causal, grad=grad), primals, cotangent, tangents
            )
            for what, a, b in zip(
                ("out", "dq", "dk", "dv", "dsinks", "jvp")[: len(got) - 1] + ("jvp",), got, want
            ):
                torch.testing.assert_close(a, b, **F64, msg=f"{backend} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_flash_attention_rule(dtype, causal, name):
    """Error vs float64 <= 2x (forward) / 3x (gradients, JVP) that of plain PyTorch in ``dtype``."""
    primals = _primals(name, (1, 2, 2, 150, 150, 64, 64))
    cotangent = torch.randn(1, 2, 150, 64, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in primals]
    truth = all_derivatives(attend("reference", name, causal=causal), primals, cotangent, tangents)

    def run(backend):
        low = [x.to(dtype) if x.dim() == 4 else x.float() for x in primals]
        low_tangents = [t.to(x.dtype) for t, x in zip(tangents, low)]
        return all_derivatives(attend(backend, name, causal=causal), low, cotangent.to(dtype), low_tangents)

    baseline = run("reference")
    names = ("out", "dq", "dk", "dv", "dsinks", "jvp")[: len(truth) - 1] + ("jvp",)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for backend in ("torch", "triton") if dtype == torch.float32 else ("torch",):
        ours = run(backend)
        assert all(a.dtype == b.dtype for a, b in zip(ours, baseline))
        assert_flash_rule(ours, baseline, truth, names, floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_rows_with_no_visible_key(backend, mode):
    """Causal with Tq > Tk: the first Tq - Tk queries see nothing: 0 output, 0 gradients, no NaN."""
    name, grad = mode
    q, k, v = inputs((2, 2, 2, 9, 4, 8, 8), requires_grad=True)
    f = attend(backend, name, causal=True, grad=grad)
    with override_tiles(16, 16):
        out = f(q, k, v)
        dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
        _, out_dot = torch.func.jvp(f, (q, k, v), tuple(torch.randn_like(x) for x in (q, k, v)))
    for t in (out, dq, out_dot):
        assert torch.equal(t[:, :, :5], torch.zeros_like(t[:, :, :5]))
    assert out[:, :, 5:].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv, out_dot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_huge_and_zero_scores_stay_finite(backend, name, causal):
    """Scores of magnitude 1e4 and rows of all-zero scores: finite outputs and derivatives."""
    q, k, v = inputs((1, 2, 2, 20, 20, 16, 8), magnitude=60.0, dtype=torch.float32)
    q = q.detach().clone()
    q[:, :, 3] = 0  # a row of zero scores
    assert (q @ k.transpose(-2, -1)).abs().max() / 4 > 1e3
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    f = attend(backend, name, causal=causal)
    with override_tiles(16, 16):
        out = f(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        _, out_dot = torch.func.jvp(f, (q, k, v), (q, k, v))
    for t in (out, out_dot, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_query_rows(backend):
    """r_i = 0: output 0, derivative dbeta(0) h = h, i.e. Od_i = sum_j sd_ij v_j."""
    q, k, v = inputs((1, 2, 2, 6, 6, 8, 5), transposed=False)
    q[:, :, 2] = 0
    qd, kd, vd = (torch.randn_like(x) for x in (q, k, v))
    f = attend(backend, "beta")
    out, od = torch.func.jvp(f, (q, k, v), (qd, kd, vd))
    sd_row = (qd[:, :, 2:3] @ k.transpose(-2, -1)) / math.sqrt(8)  # q_2 = 0: only qd . k
    torch.testing.assert_close(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    torch.testing.assert_close(od[:, :, 2], (sd_row @ v).squeeze(-2), atol=1e-12, rtol=1e-12)
    assert gradcheck(f, (q, k, v), interpreted=backend == "triton")


def _seed_formula(q, k, v, qd, kd, vd, g, causal):
    """The beta-attention write-up's shortcut written out on the materialized scores."""
    c = 1 / math.sqrt(q.shape[-1])
    s = c * q @ k.transpose(-2, -1)
    sd = c * (qd @ k.transpose(-2, -1) + q @ kd.transpose(-2, -1))
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril(s.shape[-1] - s.shape[-2])
        s, sd = s * mask, sd * mask
    r2 = (s * s).sum(-1, keepdim=True)
    n = 1 + r2.sqrt()
    w = s / n
    o = w @ v
    od = (s * sd).sum(-1, keepdim=True) / (r2 * n) * o + w @ vd
    ds = (g * o).sum(-1, keepdim=True) * s / (r2 * n)
    if causal:
        ds = ds * mask
    return od, (c * ds @ k, c * ds.transpose(-2, -1) @ q, w.transpose(-2, -1) @ g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seed_mode_is_the_shortcut_and_is_not_the_derivative(backend, causal):
    q, k, v = inputs((2, 3, 3, 33, 33, 16, 8))
    qd, kd, vd = (torch.randn_like(x) for x in (q, k, v))
    g = torch.randn(2, 3, 33, 8, dtype=torch.float64)
    want_od, want_grads = _seed_formula(q, k, v, qd, kd, vd, g, causal)
    seed = attend(backend, "beta", causal=causal, grad="seed")
    _, od = torch.func.jvp(seed, (q, k, v), (qd, kd, vd))
    _, vjp = torch.func.vjp(seed, q, k, v)
    torch.testing.assert_close(od, want_od, atol=1e-12, rtol=1e-10)
    for got, want in zip(vjp(g), want_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    _, exact_od = torch.func.jvp(attend(backend, "beta", causal=causal), (q, k, v), (qd, kd, vd))
    miss = ((od - exact_od).norm() / exact_od.norm()).item()
    assert miss > 0.3, f"the shortcut JVP misses the exact one by only {miss:.3f}"


def test_seed_warns_once_and_rejects_other_normalizers():
    from normattn.ops import common

    common._seed_warned = False
    q, k, v = inputs((1, 1, 1, 4, 4, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        normattn.attention(q, k, v, normalizer="beta", grad="seed")
        normattn.attention(q, k, v, normalizer="beta", grad="seed")
    assert sum("NOT the true derivative" in str(w.message) for w in caught) == 1
    for name in NAMES:
        if name != "beta":
            with pytest.raises(ValueError, match='grad="seed".*beta'):
                normattn.attention(q, k, v, normalizer=name, grad="seed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_api(backend):
    """torch.autograd.forward_ad (dual tensors, some inputs without tangent) equals torch.func.jvp."""
    import torch.autograd.forward_ad as fwad

    q, k, v = inputs((1, 2, 2, 9, 11, 8, 6))
    qd = torch.randn_like(q)
    f = attend(backend, "softpick", causal=True)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(f(fwad.make_dual(q, qd), k, v)).tangent
    _, want = torch.func.jvp(lambda q: f(q, k, v), (q,), (qd,))
    torch.testing.assert_close(tangent, want, atol=1e-12, rtol=1e-12)


def test_causal_alignment_is_bottom_right():
    """With Tq < Tk the last query sees every key; the first sees the first Tk - Tq + 1."""
    q, k, v = inputs((1, 1, 1, 3, 10, 4, 4))
    for backend in BACKENDS:
        for name in NAMES:
            causal = attend(backend, name, causal=True)(q, k, v)
            full = attend(backend, name)(q, k, v)
            torch.testing.assert_close(causal[:, :, -1], full[:, :, -1])
            if name != "sigmoid":  # sigmoid's bias -log(Tk) depends on the number of keys
                first = attend(backend, name)(q[:, :, :1], k[:, :, :8], v[:, :, :8])
                torch.testing.assert_close(causal[:, :, 0], first[:, :, 0])


def test_scale_is_applied():
    q, k, v = inputs((1, 1, 1, 5, 5, 4, 4))
    for name in NAMES:
        for backend in BACKENDS:
            a = normattn.attention(q, k, v, normalizer=name, scale=0.3, backend=backend)
            b = normattn.attention(0.3 * q, k, v, normalizer=name, scale=1.0, backend="reference")
            torch.testing.assert_close(a, b)


def test_auto_backend_on_cpu():
    from normattn import dispatch
    from normattn.ops.attention.problem import Problem

    q = torch.randn(1, 1, 2, 2)
    for name, spec in NORMALIZERS.items():
        problem = Problem(spec, 1.0, 0.0, None, None)
        expected = "torch-linear" if name == "beta" else "torch"
        assert dispatch.choose("auto", problem, q, None, None) == expected
        causal_window = Problem(spec, 1.0, 0.0, 4, 0)  # beta: the linear-time window form
        assert dispatch.choose("auto", causal_window, q, None, None) == expected
        two_sided = Problem(spec, 1.0, 0.0, 4, 2)
        assert dispatch.choose("auto", two_sided, q, None, None) == "torch"  # beta: exact blockwise


# --- bad input: each raises ValueError/TypeError naming the argument and the shapes or dtypes ---

GOOD = dict(q=(1, 2, 5, 8), k=(1, 2, 6, 8), v=(1, 2, 6, 4))


def _call(**kwargs):
    return call_with_defaults(GOOD, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(q=torch.randn(2, 5, 8)), ValueError, r"q must have 4 dimensions.*\(2, 5, 8\)"),
        (dict(k=torch.randn(2, 2, 6, 8)), ValueError, r"batch size.*q \(1, 2, 5, 8\), k \(2, 2, 6, 8\)"),
        (
            dict(v=torch.randn(1, 3, 6, 4)),
            ValueError,
            r"k and v must have the same number of heads.*v \(1, 3, 6, 4\)",
        ),
        (dict(k=torch.randn(1, 2, 6, 7)), ValueError, r"same head dim.*q \(1, 2, 5, 8\), k \(1, 2, 6, 7\)"),
        (
            dict(v=torch.randn(1, 2, 7, 4)),
            ValueError,
            r"k and v must have the same number of tokens.*v \(1, 2, 7, 4\)",
        ),
        (dict(v=torch.randn(1, 2, 6, 4, dtype=torch.float64)), TypeError, r"one dtype.*v torch.float64"),
        (dict(q=torch.ones(1, 2, 5, 8, dtype=torch.int64)), TypeError, r"q must be a floating-point.*int64"),
        (dict(k=torch.ones(1, 2, 6, 8, dtype=torch.bool)), TypeError, r"k must be a floating-point.*bool"),
        (dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
        (
            dict(normalizer="sparsemax"),
            ValueError,
            r"normalizer must be one of \['beta', 'sigmoid', 'softmax', 'softpick'\]",
        ),
        (dict(backend="cuda"), ValueError, r"backend must be one of .*'reference', 'torch'"),
        (dict(grad="approx"), ValueError, r"grad must be one of \['exact', 'seed'\]"),
        (dict(scale=0.0), ValueError, r"scale must be a positive finite number.*0.0"),
        (dict(scale=float("nan")), ValueError, r"scale must be a positive finite number"),
        (dict(scale=-1), ValueError, r"scale must be a positive finite number.*-1"),
        (dict(scale="1"), TypeError, r"scale must be a positive finite number or None, got str"),
        (dict(causal=1), TypeError, r"causal must be a bool"),
        (
            dict(sinks=torch.zeros(2), normalizer="beta"),
            ValueError,
            r"sinks are defined for normalizer \"softmax\" only",
        ),
        (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(heads,\) = \(2,\).*\(3,\)"),
        (dict(sinks=torch.zeros(2, dtype=torch.int32)), TypeError, r"sinks must be a floating-point"),
        (
            dict(backend="triton-linear", normalizer="softmax"),
            ValueError,
            r"triton-linear.*beta attention only",
        ),
    ],
)
def test_bad_input(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**kwargs)


def test_device_mismatch():
    q = torch.randn(GOOD["q"], device="meta")
    with pytest.raises(ValueError, match=r"one device.*q on meta, k on cpu"):
        _call(q=q)


def test_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend, normalizer in (("triton", "softmax"), ("triton-linear", "beta")):
        with pytest.raises(ValueError, match=f'backend="{backend}" needs triton and a CUDA tensor'):
            _call(backend=backend, normalizer=normalizer)
