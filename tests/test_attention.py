"""normattn.attention: every CPU backend against autograd, the reference and MATH.md."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import normattn
from normattn import BETA, SOFTMAX
from normattn.ops.flash import blockwise

CPU_BACKENDS = ("reference", "torch")
MODES = [("softmax", "exact"), ("beta", "exact"), ("beta", "seed")]

# (B, H, Tq, Tk, d, dv): T = 1, 7, 63, 257; Tq != Tk both ways; head dims 3, 24, 72, 80; dv != d.
SHAPES = [
    (1, 1, 1, 1, 3, 3),
    (2, 3, 7, 7, 24, 24),
    (1, 2, 63, 63, 72, 40),
    (1, 1, 257, 257, 80, 80),
    (2, 1, 7, 63, 24, 16),
    (1, 2, 63, 7, 3, 5),
]


def make_inputs(shape, dtype=torch.float64, transposed=True, requires_grad=False, scale=1.0):
    """q, k, v; ``transposed`` builds them as (B, T, H, d) views, i.e. non-contiguous."""
    b, h, tq, tk, d, dv = shape
    out = []
    for t, width in ((tq, d), (tk, d), (tk, dv)):
        if transposed:
            x = torch.randn(b, t, h, width, dtype=dtype).transpose(1, 2)
        else:
            x = torch.randn(b, h, t, width, dtype=dtype)
        out.append((scale * x).detach().requires_grad_(requires_grad))
    return out


def attn(backend, normalizer, causal, grad="exact", scale=None):
    def f(q, k, v):
        return normattn.attention(
            q, k, v, normalizer=normalizer, causal=causal, grad=grad, backend=backend, scale=scale
        )

    return f


@pytest.fixture(autouse=True)
def _quiet_seed_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_gradcheck_with_forward_ad(shape, backend, causal, mode):
    normalizer, grad = mode
    inputs = make_inputs(shape, requires_grad=True)
    fast = math.prod(shape) > 2000  # full Jacobians for the small shapes, random projections beyond
    f = attn(backend, normalizer, causal, grad)
    if grad == "seed":
        # The seed's q/k derivative is by design not the true one (checked against its own formula
        # in test_seed_mode_*); its v derivative is exact, and its VJP and JVP must be adjoint.
        q, k, v = inputs
        tangents = [torch.randn_like(x) for x in inputs]
        out, jvp_out = torch.func.jvp(f, (q, k, v), tuple(tangents))
        cotangent = torch.randn_like(out)
        _, vjp = torch.func.vjp(f, q, k, v)
        lhs = (jvp_out * cotangent).sum()
        rhs = sum((t * g).sum() for t, g in zip(tangents, vjp(cotangent)))
        torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)
        f, inputs = (lambda v: attn(backend, normalizer, causal, grad)(q.detach(), k.detach(), v)), [v]
    assert torch.autograd.gradcheck(
        f,
        inputs,
        check_forward_ad=True,
        fast_mode=fast,
        atol=1e-7,
        rtol=1e-5,
    )


def _all_derivatives(f, inputs, cotangent, tangents):
    out, vjp = torch.func.vjp(f, *inputs)
    _, jvp = torch.func.jvp(f, tuple(inputs), tuple(tangents))
    return [out, *vjp(cotangent), jvp]


def _blockwise(normalizer, causal, grad):
    spec = normattn.NORMALIZERS[normalizer]

    def f(q, k, v):
        return blockwise.flash_attention_blockwise(
            q, k, v, normalizer=spec, causal=causal, scale=1 / math.sqrt(q.shape[-1]), grad=grad
        )

    return f


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_backends_agree_float64(shape, causal, mode, monkeypatch):
    normalizer, grad = mode
    # Small tiles so the blockwise path crosses many tile edges and diagonal tiles.
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 16)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 8)
    inputs = make_inputs(shape)
    cotangent = torch.randn(*shape[:3], shape[5], dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in inputs]
    ref = _all_derivatives(attn("reference", normalizer, causal, grad), inputs, cotangent, tangents)
    candidates = {"torch": attn("torch", normalizer, causal, grad)}
    candidates["blockwise"] = _blockwise(normalizer, causal, grad)  # generic tile path, any normalizer
    for name, f in candidates.items():
        got = _all_derivatives(f, inputs, cotangent, tangents)
        for what, a, b in zip(("out", "dq", "dk", "dv", "jvp"), got, ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"{name} {what}")


def _errors(f, inputs64, dtype, cotangent64):
    """Max abs errors of (out, dq, dk, dv, jvp) of ``f`` at ``dtype`` against float64 reference values."""
    lowp = [x.to(dtype) for x in inputs64]
    tangents64 = [torch.randn_like(x) for x in inputs64]
    got = _all_derivatives(f, lowp, cotangent64.to(dtype), [t.to(dtype) for t in tangents64])
    return got, tangents64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_low_precision_flashattention_rule(dtype, causal, mode):
    """Error vs float64 <= 2x (forward) / 3x (gradients, JVP) that of the reference in ``dtype``."""
    normalizer, grad = mode
    shape = (2, 2, 200, 200, 64, 64)
    inputs = make_inputs(shape)
    cotangent = torch.randn(*shape[:3], shape[5], dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in inputs]
    truth = _all_derivatives(attn("reference", normalizer, causal, grad), inputs, cotangent, tangents)

    def run(backend):
        lowp = [x.to(dtype) for x in inputs]
        f = attn(backend, normalizer, causal, grad)
        return _all_derivatives(f, lowp, cotangent.to(dtype), [t.to(dtype) for t in tangents])

    ours, baseline = run("torch"), run("reference")
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for i, what in enumerate(("out", "dq", "dk", "dv", "jvp")):
        assert ours[i].dtype == dtype
        err = (ours[i].double() - truth[i]).abs().max().item()
        base = (baseline[i].double() - truth[i]).abs().max().item()
        factor = 2 if what == "out" else 3
        assert err <= factor * base + floor, f"{what}: error {err:.3g} vs reference's {base:.3g}"


def test_max_shift_has_zero_gradient():
    """MATH.md section 2: softmax(Sp - max Sp) with the max differentiated or detached, same gradient."""
    sp = torch.randn(5, 17, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 17, dtype=torch.float64)

    def grad_through(shift_detached):
        m = sp.amax(-1, keepdim=True)
        s = sp - (m.detach() if shift_detached else m)
        p = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
        (g,) = torch.autograd.grad(p, sp, upstream)
        return g

    live, detached = grad_through(False), grad_through(True)
    torch.testing.assert_close(live, detached, atol=1e-15, rtol=0)
    # The gradient through the max alone: -1[j = argmax] sum_k dS_ik, with sum_k dS_ik = 0.
    s = sp.detach() - sp.detach().amax(-1, keepdim=True)
    p = s.softmax(-1)
    ds = p * (upstream - (p * upstream).sum(-1, keepdim=True))
    assert ds.sum(-1).abs().max() < 1e-15


def _seed_formula(q, k, v, qd, kd, vd, g, causal):
    """MATH.md section 5 written out on the materialized scores, independent of any backend."""
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
    f = (s * sd).sum(-1, keepdim=True) / (r2 * n)
    od = f * o + w @ vd
    dd = (g * o).sum(-1, keepdim=True)
    ds = dd * s / (r2 * n)
    if causal:
        ds = ds * mask
    return od, (c * ds @ k, c * ds.transpose(-2, -1) @ q, w.transpose(-2, -1) @ g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_seed_mode_is_the_notes_formula_and_is_not_the_derivative(backend, causal):
    shape = (2, 3, 33, 33, 16, 8)
    q, k, v = make_inputs(shape)
    qd, kd, vd = (torch.randn_like(x) for x in (q, k, v))
    g = torch.randn(2, 3, 33, 8, dtype=torch.float64)
    want_od, want_grads = _seed_formula(q, k, v, qd, kd, vd, g, causal)
    seed = attn(backend, "beta", causal, "seed")
    _, od = torch.func.jvp(seed, (q, k, v), (qd, kd, vd))
    _, vjp = torch.func.vjp(seed, q, k, v)
    torch.testing.assert_close(od, want_od, atol=1e-12, rtol=1e-10)
    for got, want in zip(vjp(g), want_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    _, exact_od = torch.func.jvp(attn(backend, "beta", causal), (q, k, v), (qd, kd, vd))
    miss = ((od - exact_od).norm() / exact_od.norm()).item()
    print(f"seed JVP relative miss vs exact ({backend}, causal={causal}): {miss:.3f}")
    assert miss > 0.3


def test_seed_warns_once_and_rejects_softmax():
    from normattn.ops import common

    common._seed_warned = False
    q, k, v = make_inputs((1, 1, 4, 4, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        normattn.attention(q, k, v, normalizer="beta", grad="seed")
        normattn.attention(q, k, v, normalizer="beta", grad="seed")
    assert sum("NOT the true derivative" in str(w.message) for w in caught) == 1
    with pytest.raises(ValueError, match='grad="seed".*beta'):
        normattn.attention(q, k, v, normalizer="softmax", grad="seed")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_forward_ad_api(backend, mode):
    """torch.autograd.forward_ad (dual tensors) gives the same tangent as torch.func.jvp."""
    import torch.autograd.forward_ad as fwAD

    normalizer, grad = mode
    q, k, v = make_inputs((1, 2, 9, 11, 8, 6))
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    f = attn(backend, normalizer, True, grad)
    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents)))
        tangent = fwAD.unpack_dual(out).tangent
    _, want = torch.func.jvp(f, (q, k, v), tuple(tangents))
    torch.testing.assert_close(tangent, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_beta_zero_query_rows(backend):
    """r_i = 0: output 0, derivative dbeta(0) h = h, i.e. Od_i = sum_j sd_ij v_j (MATH.md section 3)."""
    q, k, v = make_inputs((1, 2, 6, 6, 8, 5), transposed=False)
    q[:, :, 2] = 0
    qd, kd, vd = (torch.randn_like(x) for x in (q, k, v))
    f = attn(backend, "beta", False)
    out, od = torch.func.jvp(f, (q, k, v), (qd, kd, vd))
    c = 1 / math.sqrt(8)
    sd_row = c * qd[:, :, 2:3] @ k.transpose(-2, -1)  # q_2 = 0 so only qd . k contributes
    want = (sd_row @ v).squeeze(-2)
    torch.testing.assert_close(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    torch.testing.assert_close(od[:, :, 2], want, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(f(*(x.requires_grad_() for x in (q, k, v))).square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.autograd.gradcheck(f, (q, k, v), check_forward_ad=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_scores_stay_finite(backend, normalizer, causal):
    q, k, v = make_inputs((1, 2, 20, 20, 16, 8), scale=60.0)  # |s| up to ~1e4
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    s = (q @ k.transpose(-2, -1)).abs().max() / 4
    assert s > 1e3
    out = attn(backend, normalizer, causal)(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    _, od = torch.func.jvp(attn(backend, normalizer, causal), (q, k, v), (q, k, v))
    for t in (out, od, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m))
def test_rows_with_no_visible_key(backend, mode):
    """Causal with Tq > Tk: the first Tq - Tk queries see nothing, give 0 and get 0 gradients."""
    normalizer, grad = mode
    q, k, v = make_inputs((2, 2, 9, 4, 8, 8), requires_grad=True)
    f = attn(backend, normalizer, True, grad)
    out = f(q, k, v)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert (out[:, :, 5:].abs().sum(-1) > 0).all()
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    _, od = torch.func.jvp(f, (q, k, v), tuple(torch.randn_like(x) for x in (q, k, v)))
    assert torch.equal(od[:, :, :5], torch.zeros_like(od[:, :, :5]))


def test_causal_alignment_is_bottom_right():
    """With Tq < Tk the last query sees every key: it equals non-causal attention of that row."""
    q, k, v = make_inputs((1, 1, 3, 10, 4, 4))
    for backend, normalizer in itertools.product(CPU_BACKENDS, ["softmax", "beta"]):
        causal = attn(backend, normalizer, True)(q, k, v)
        full = attn(backend, normalizer, False)(q, k, v)
        torch.testing.assert_close(causal[:, :, -1], full[:, :, -1])
        first = attn(backend, normalizer, False)(q[:, :, :1], k[:, :, :8], v[:, :, :8])
        torch.testing.assert_close(causal[:, :, 0], first[:, :, 0])


def test_scale_is_applied():
    q, k, v = make_inputs((1, 1, 5, 5, 4, 4))
    for normalizer in ("softmax", "beta"):
        a = normattn.attention(q, k, v, normalizer=normalizer, scale=0.3, backend="torch")
        b = normattn.attention(0.3 * q, k, v, normalizer=normalizer, scale=1.0, backend="reference")
        torch.testing.assert_close(a, b)


def test_auto_picks_torch_on_cpu_and_normalizer_specs():
    from normattn.ops.dispatch import auto_attention_backend

    q = torch.randn(1, 1, 2, 2)
    assert auto_attention_backend(SOFTMAX, q) == "torch"
    assert auto_attention_backend(BETA, q) == "torch"
    assert normattn.NORMALIZERS == {"softmax": SOFTMAX, "beta": BETA}


# --- bad input: each raises ValueError/TypeError naming the argument and the shapes or dtypes ---

GOOD = dict(q=(1, 2, 5, 8), k=(1, 2, 6, 8), v=(1, 2, 6, 4))


def _call(q=None, k=None, v=None, **kwargs):
    q = torch.randn(GOOD["q"]) if q is None else q
    k = torch.randn(GOOD["k"]) if k is None else k
    v = torch.randn(GOOD["v"]) if v is None else v
    return normattn.attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(q=torch.randn(2, 5, 8)), ValueError, r"q must have 4 dimensions.*\(2, 5, 8\)"),
        (dict(k=torch.randn(2, 2, 6, 8)), ValueError, r"batch size.*q \(1, 2, 5, 8\), k \(2, 2, 6, 8\)"),
        (dict(v=torch.randn(1, 3, 6, 4)), ValueError, r"number of heads.*v \(1, 3, 6, 4\)"),
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
        (dict(normalizer="sparsemax"), ValueError, r"normalizer must be one of \['beta', 'softmax'\]"),
        (dict(backend="cuda"), ValueError, r"backend must be one of .*'reference', 'torch'"),
        (dict(grad="approx"), ValueError, r"grad must be one of \['exact', 'seed'\]"),
        (dict(scale=0.0), ValueError, r"scale must be a positive finite number.*0.0"),
        (dict(scale=float("nan")), ValueError, r"scale must be a positive finite number"),
        (dict(scale=-1), ValueError, r"scale must be a positive finite number.*-1"),
        (dict(scale="1"), TypeError, r"scale must be a positive finite number or None, got str"),
        (dict(causal=1), TypeError, r"causal must be a bool"),
        (
            dict(backend="triton-linear", normalizer="softmax"),
            ValueError,
            r"triton-linear.*beta attention",
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
