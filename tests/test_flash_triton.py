"""Triton flash kernels (softmax and beta) against the materialized autograd reference.

Runs the kernels through the Triton interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU): forward, backward (dq, dk, dv) and JVP, exact and seed
mode, causal and not, ragged shapes, empty rows, huge scores, determinism. The interpreter pays per
tile operation, so the shapes are small and some tests force tiny tiles to get many of them.
"""

from __future__ import annotations

import os

import pytest
import torch

import normattn
from normattn.normalizers import get_normalizer

flash_triton = pytest.importorskip("normattn.ops.flash.triton")

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests (TRITON_INTERPRET=1, set by conftest without a GPU); tests/gpu covers CUDA",
)


F64 = {"rtol": 1e-9, "atol": 1e-10}


def _inputs(b, h, t_q, t_k, d, d_v, dtype=torch.float64, magnitude=1.0):
    q = magnitude * torch.randn(b, h, t_q, d, dtype=dtype)
    k = magnitude * torch.randn(b, h, t_k, d, dtype=dtype)
    v = torch.randn(b, h, t_k, d_v, dtype=dtype)
    return q, k, v


def _attention(backend, normalizer, causal, grad="exact"):
    def fn(q, k, v):
        return normattn.attention(q, k, v, normalizer=normalizer, causal=causal, grad=grad, backend=backend)

    return fn


def _all_passes(fn, q, k, v, do, tangents):
    """Output, (dq, dk, dv) through torch.autograd.grad, and the JVP through torch.func.jvp."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    grads = torch.autograd.grad(o, leaves, do)
    _, od = torch.func.jvp(fn, (q, k, v), tangents)
    return o.detach(), grads, od


def _check_against_reference(normalizer, causal, q, k, v, grad="exact", tol=F64, ref_dtype=None):
    do = torch.randn(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    got = _all_passes(_attention("triton", normalizer, causal, grad), q, k, v, do, tangents)
    ref_dtype = ref_dtype or q.dtype
    cast = [x.to(ref_dtype) for x in (q, k, v, do, *tangents)]
    want = _all_passes(_attention("reference", normalizer, causal, grad), *cast[:3], cast[3], tuple(cast[4:]))
    names = ("out", "dq", "dk", "dv", "jvp")
    for name, a, b in zip(names, (got[0], *got[1], got[2]), (want[0], *want[1], want[2]), strict=True):
        assert torch.isfinite(a).all(), name
        assert a.dtype == q.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.to(ref_dtype), b, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return got


# (B, H, Tq, Tk, d, dv) at the default interpreter tiles (64 x 64): one or two tiles a side
SHAPES = [
    pytest.param((1, 1, 63, 63, 24, 24), id="T63-d24"),
    pytest.param((1, 1, 40, 70, 80, 48), id="Tq40-Tk70-d80-dv48"),
    pytest.param((1, 1, 70, 40, 3, 5), id="Tq70-Tk40-d3-dv5"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_float64(shape, normalizer, causal):
    _check_against_reference(normalizer, causal, *_inputs(*shape))


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_single_token_batched(normalizer):
    # T = 1, where causal and full attention coincide; B = H = 2 exercises the batch/head offsets
    _check_against_reference(normalizer, True, *_inputs(2, 2, 1, 1, 16, 16))


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_three_tiles_a_side(normalizer):
    _check_against_reference(normalizer, True, *_inputs(1, 1, 130, 130, 24, 40))


# Tiny tiles so that every loop sees unmasked tiles, a diagonal band and a ragged tail, with
# BLOCK_M != BLOCK_N both ways and the causal diagonal shifted both ways (Tq < Tk, Tq > Tk).
@pytest.mark.parametrize(
    ("tiles", "t_q", "t_k"), [((16, 32), 45, 71), ((32, 16), 71, 45)], ids=["16x32-Tq<Tk", "32x16-Tq>Tk"]
)
@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_many_small_tiles(normalizer, tiles, t_q, t_k):
    with flash_triton.override_tiles(*tiles):
        _check_against_reference(normalizer, True, *_inputs(1, 1, t_q, t_k, 24, 16))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seed_mode_matches_reference(causal):
    q, k, v = _inputs(1, 1, 40, 70, 24, 16)
    with flash_triton.override_tiles(16, 32):
        seed = _check_against_reference("beta", causal, q, k, v, grad="seed")
    # the seed's shortcut is not the true derivative (MATH.md section 5): dv agrees, dq and Od do not
    do = torch.randn(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    # (a tangent along (q, k, v) itself is radial, where the shortcut happens to be exact)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    exact = _all_passes(_attention("reference", "beta", causal), q, k, v, do, tangents)
    seed = _all_passes(_attention("triton", "beta", causal, "seed"), q, k, v, do, tangents)
    torch.testing.assert_close(seed[1][2], exact[1][2], **F64)
    assert not torch.allclose(seed[1][0], exact[1][0]) and not torch.allclose(seed[2], exact[2])


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_float32_matches_float64_reference(normalizer):
    q, k, v = _inputs(1, 1, 63, 50, 24, 24, dtype=torch.float32)
    _check_against_reference(
        normalizer, True, q, k, v, tol={"rtol": 1e-4, "atol": 1e-5}, ref_dtype=torch.float64
    )


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_non_contiguous_inputs(normalizer):
    # (B, T, H, d) projections viewed as (B, H, T, d); v also strided along the head dim
    b, h, t, d = 2, 2, 37, 24
    q = torch.randn(b, t, h, d, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(b, t + 5, h, d, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(b, t + 5, h, 2 * d, dtype=torch.float64).transpose(1, 2)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    fn = _attention("triton", normalizer, True)
    ref = _attention("reference", normalizer, True)
    do = torch.randn(b, t, h, d, dtype=torch.float64).transpose(1, 2)
    tangents = tuple(torch.randn_like(x.transpose(-1, -2)).transpose(-1, -2) for x in (q, k, v))
    assert not any(x.is_contiguous() for x in (do, *tangents))
    got, want = _all_passes(fn, q, k, v, do, tangents), _all_passes(ref, q, k, v, do, tangents)
    torch.testing.assert_close(got[0], want[0], **F64)
    for a, c in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, c, **F64)
    torch.testing.assert_close(got[2], want[2], **F64)


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_rows_without_visible_keys_are_zero(normalizer):
    # causal with Tq > Tk: the first Tq - Tk queries see no key
    q, k, v = _inputs(1, 1, 20, 6, 8, 8)
    with flash_triton.override_tiles(16, 16):
        o, (dq, dk, dv), od = _check_against_reference(normalizer, True, q, k, v)
    empty = slice(0, 14)
    for x in (o, dq, od):
        assert torch.isfinite(x).all()
        assert torch.equal(x[:, :, empty], torch.zeros_like(x[:, :, empty]))
    assert dq[:, :, 14:].abs().sum() > 0 and dk.abs().sum() > 0 and dv.abs().sum() > 0


def test_beta_zero_score_row():
    # q_i = 0 gives r_i = 0: beta is differentiable there (rho = 0, no N-term), no NaN
    q, k, v = _inputs(1, 1, 9, 9, 16, 16)
    q[:, :, 3] = 0
    _, (dq, _, _), od = _check_against_reference("beta", False, q, k, v)
    assert dq[:, :, 3].abs().sum() > 0 and od[:, :, 3].abs().sum() > 0


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_huge_scores(normalizer):
    # |s| ~ 1e4: the online max keeps softmax finite, beta has no exponential to overflow
    q, k, v = _inputs(1, 1, 33, 33, 16, 16, magnitude=100.0)
    scores = (q @ k.transpose(-1, -2)) / 4
    assert scores.abs().max() > 1e4
    _check_against_reference(normalizer, True, q, k, v, tol={"rtol": 1e-7, "atol": 1e-8})
    q32, k32, v32 = (x.float() for x in (q, k, v))
    o = normattn.attention(q32, k32, v32, normalizer=normalizer, causal=True, backend="triton")
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_deterministic(normalizer):
    q, k, v = _inputs(1, 1, 40, 40, 16, 16)
    do = torch.randn_like(q)
    fn = _attention("triton", normalizer, True)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    with flash_triton.override_tiles(16, 16):
        first, second = (torch.autograd.grad(fn(*leaves), leaves, do) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("normalizer", "causal"), [("softmax", True), ("beta", False)])
def test_gradcheck_with_forward_ad(normalizer, causal):
    q, k, v = (x.requires_grad_() for x in _inputs(1, 1, 4, 3, 3, 2))
    fn = _attention("triton", normalizer, causal)
    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True, fast_mode=True)


def test_forward_ad_partial_tangents_and_func_grad():
    from torch.autograd import forward_ad

    q, k, v = _inputs(1, 2, 20, 25, 8, 4)
    qd = torch.randn_like(q)
    fn, ref = _attention("triton", "softmax", True), _attention("reference", "softmax", True)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(fn(forward_ad.make_dual(q, qd), k, v)).tangent
        want = forward_ad.unpack_dual(ref(forward_ad.make_dual(q, qd), k, v)).tangent
    torch.testing.assert_close(got, want, **F64)

    def loss(f):
        return lambda *x: f(*x).square().sum()

    got = torch.func.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_second_derivative_raises():
    q, k, v = (x.requires_grad_() for x in _inputs(1, 1, 5, 5, 4, 4))
    o = _attention("triton", "beta", False)(q, k, v)
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dq.sum(), k)


def test_torch_compile_fullgraph_backward_and_jvp():
    q, k, v = _inputs(1, 2, 20, 24, 8, 8)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    eager, ref = _attention("triton", "beta", True), _attention("reference", "beta", True)
    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = compiled(*leaves)
    torch.testing.assert_close(o, ref(q, k, v), **F64)
    grads = torch.autograd.grad(o.square().sum(), leaves)
    want = torch.autograd.grad(ref(*leaves).square().sum(), leaves)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, **F64)
    # forward mode inside the compiled region: a custom op alone would drop the tangent silently
    compiled_jvp = torch.compile(
        lambda *x: torch.func.jvp(eager, x, tangents)[1], fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled_jvp(q, k, v), torch.func.jvp(ref, (q, k, v), tangents)[1], **F64)


def test_cpu_without_interpreter_raises(monkeypatch):
    q, k, v = _inputs(1, 1, 4, 4, 4, 4)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        normattn.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flash_triton.flash_attention_triton(
            q, k, v, normalizer=get_normalizer("softmax"), causal=False, scale=0.5, grad="exact"
        )
