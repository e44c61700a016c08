"""Linear-time beta attention (docs/math.md, section 9): chunked torch path, recurrent reference, decoding.

Checked in float64 against the materialized autograd reference (which shares no code with the
chunked algorithm except the mask) and the token-by-token recurrence; float32 and bfloat16 by
FlashAttention's error rule.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from helpers import UGLY_SHAPES, all_derivatives, attend, attention_ref, gradcheck, inputs, shape_id

import normattn
from normattn import BETA
from normattn.ops.attention.naive import attention_naive
from normattn.ops.attention.problem import Problem
from normattn.ops.beta_linear import chunk, window
from normattn.ops.beta_linear.chunk import CHUNK_SIZE, beta_linear_attention
from normattn.ops.beta_linear.naive import beta_attention_recurrent
from normattn.ops.beta_linear.recurrent import BetaState, beta_decode, beta_prefill

F64 = {"rtol": 1e-10, "atol": 1e-10}
DEFAULT_GROUP_SIZE = chunk.GROUP_SIZE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These shapes are far too small to gain from intra-op threads, and on a busy 2-core runner
    OpenMP's barriers make every small op wait for a descheduled thread (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _small_groups(monkeypatch):
    """Groups of 40 positions instead of 1024, so that these short sequences cross group
    boundaries too: chunk 16 -> 2 chunks per group, chunk 64 -> 1, non-causal -> 40 queries."""
    monkeypatch.setattr(chunk, "GROUP_SIZE", 40)


def make_inputs(
    b: int, h: int, t_q: int, t_k: int, d: int, dv: int, *, layout: str = "contiguous", dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q, k, v``; ``layout`` "transposed" gives (B, T, H, d) storage, "strided" every other
    element of the last axis: both non-contiguous views."""

    def make(t: int, e: int) -> torch.Tensor:
        if layout == "transposed":
            return torch.randn(b, t, h, e, dtype=dtype).transpose(1, 2)
        if layout == "strided":
            return torch.randn(b, h, t, 2 * e, dtype=dtype)[..., ::2]
        return torch.randn(b, h, t, e, dtype=dtype)

    return make(t_q, d), make(t_k, d), make(t_k, dv)


def beta_problem(q, *, causal, grad="exact", scale=None) -> Problem:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return Problem(BETA, scale, 0.0, left=None, right=0 if causal else None, grad=grad)


def linear(q, k, v, *, causal, grad="exact", chunk_size=CHUNK_SIZE, scale=None):
    return beta_linear_attention(beta_problem(q, causal=causal, grad=grad, scale=scale), q, k, v, chunk_size)


def reference(q, k, v, *, causal, grad="exact", scale=None):
    return attention_naive(beta_problem(q, causal=causal, grad=grad, scale=scale), q, k, v)


def vjp(fn, inputs, cotangent):
    leaves = [x.detach().requires_grad_() for x in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, cotangent)


def jvp(fn, inputs, tangents):
    return torch.func.jvp(fn, tuple(inputs), tuple(tangents))[1]


def assert_all_close(actual, expected, **tol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tol)


def prefill_then_decode(q, k, v, prompt: int, scale=None) -> tuple[torch.Tensor, BetaState]:
    """Causal attention by ``beta_prefill`` on the first ``prompt`` tokens, then ``beta_decode`` one
    token at a time; checks on the way that no step modifies the state it was given."""
    out, state = beta_prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], scale)
    rows = [out]
    for i in range(prompt, q.shape[-2]):
        before = (state.H.clone(), state.G.clone(), state.tokens_seen)
        token = (x[..., i : i + 1, :] for x in (q, k, v))
        out_t, new_state = beta_decode(*token, state, scale)
        assert torch.equal(state.H, before[0]) and torch.equal(state.G, before[1])
        assert state.tokens_seen == before[2] and new_state.tokens_seen == i + 1
        rows.append(out_t)
        state = new_state
    return torch.cat(rows, dim=-2), state


# (T, d, dv): every T the chunk boundaries can get wrong, with the awkward head dims spread over them
CASES = [(1, 3, 5), (2, 24, 24), (7, 72, 8), (63, 80, 40), (64, 24, 72), (65, 3, 80), (130, 72, 24)]
CASES += [(257, 24, 3), (300, 80, 64)]
LAYOUTS = ["contiguous", "transposed", "strided"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)))
def test_matches_reference_and_recurrent(index, case, causal):
    t, d, dv = case
    q, k, v = make_inputs(1, 2, t, t, d, dv, layout=LAYOUTS[index % 3])
    g = torch.randn(1, 2, t, dv, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    expected = reference(q, k, v, causal=causal)
    torch.testing.assert_close(
        beta_attention_recurrent(q, k, v, causal=causal, scale=d**-0.5), expected, **F64
    )
    public = normattn.attention(q, k, v, normalizer="beta", causal=causal, backend="torch")
    torch.testing.assert_close(public, expected, **F64)
    if causal:
        torch.testing.assert_close(prefill_then_decode(q, k, v, prompt=t // 2)[0], expected, **F64)
    # non-causal attention is a single chunk, so the chunk size only matters when causal
    for grad, chunk_sizes in (("exact", (16, 64) if causal else (64,)), ("seed", (16,))):
        ref = lambda q, k, v, grad=grad: reference(q, k, v, causal=causal, grad=grad)  # noqa: E731
        ref_grads, ref_tangent = vjp(ref, (q, k, v), g), jvp(ref, (q, k, v), tangents)
        for chunk_size in chunk_sizes:
            ours = lambda q, k, v, grad=grad, c=chunk_size: linear(  # noqa: E731
                q, k, v, causal=causal, grad=grad, chunk_size=c
            )
            torch.testing.assert_close(ours(q, k, v), expected, **F64)
            assert_all_close(vjp(ours, (q, k, v), g), ref_grads, **F64)
            torch.testing.assert_close(jvp(ours, (q, k, v), tangents), ref_tangent, **F64)


@pytest.mark.parametrize("causal", [True, False])
def test_default_group_size_long_sequence(causal, monkeypatch):
    monkeypatch.setattr(chunk, "GROUP_SIZE", DEFAULT_GROUP_SIZE)
    t_q, t_k = 1100, 1130  # two groups of the default size, the last chunk and group partial
    q, k, v = make_inputs(1, 1, t_q, t_k, 4, 3)
    g = torch.randn(1, 1, t_q, 3, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    ours = lambda q, k, v: linear(q, k, v, causal=causal, chunk_size=50)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, causal=causal)  # noqa: E731
    torch.testing.assert_close(ours(q, k, v), ref(q, k, v), **F64)
    assert_all_close(vjp(ours, (q, k, v), g), vjp(ref, (q, k, v), g), **F64)
    torch.testing.assert_close(jvp(ours, (q, k, v), tangents), jvp(ref, (q, k, v), tangents), **F64)


# (B, H, H_kv, Tq, Tk, d, dv, chunk): groups of 40 positions; prefix keys, blind queries, GQA
TANGENT_CASES = [
    (1, 2, 2, 1, 1, 3, 5, 16), (2, 4, 2, 63, 63, 24, 8, 16), (1, 3, 1, 130, 130, 5, 3, 64),
    (1, 2, 1, 70, 5, 8, 4, 16), (2, 2, 2, 20, 97, 8, 4, 16), (1, 4, 2, 257, 257, 4, 6, 16),
]  # fmt: skip


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", TANGENT_CASES, ids=str)
def test_tangent_backward_is_the_derivative_of_the_backward(case, causal):
    """The hand-derived gradient of ``<h, Od>`` equals forward mode through the hand-derived backward
    (docs/math.md, section 7: the tangent of ``J^T h``), for the primal inputs and, with
    ``need_tangent``, the tangents; a zero query row (``r = 0``) included."""
    b, h, h_kv, t_q, t_k, d, dv, chunk_size = case
    q, q_dot = (torch.randn(b, h, t_q, d, dtype=torch.float64) for _ in range(2))
    q[:, :, t_q // 2] = 0
    k, k_dot = (torch.randn(b, h_kv, t_k, d, dtype=torch.float64) for _ in range(2))
    v, v_dot = (torch.randn(b, h_kv, t_k, dv, dtype=torch.float64) for _ in range(2))
    cotangent = torch.randn(b, h, t_q, dv, dtype=torch.float64)
    problem = beta_problem(q, causal=causal, scale=0.8)
    none = (None,) * 3
    out, stat = chunk.forward(problem, q, k, v, *none, chunk_size=chunk_size)
    tangents = (q_dot, k_dot, v_dot, None)
    out_dot, aux = chunk.jvp(problem, q, k, v, *none, out, stat, *tangents, chunk_size=chunk_size)
    args = (problem, q, k, v, *none, out, stat, q_dot, k_dot, v_dot, None, out_dot, aux, cotangent)
    got = chunk.tangent_backward(*args, chunk_size=chunk_size)
    want = chunk.tangent_backward_through(
        functools.partial(chunk.backward, chunk_size=chunk_size),
        problem, q, k, v, out, q_dot, k_dot, v_dot, out_dot, cotangent, True,
    )  # fmt: skip
    for name, a, c in zip(("dq", "dk", "dv", "dsinks", "dqd", "dkd", "dvd"), got, want, strict=False):
        if c is not None:
            torch.testing.assert_close(a, c, **F64, msg=name)
    primal_only = chunk.tangent_backward(*args, need_tangent=False, chunk_size=chunk_size)
    assert primal_only[4:] == (None,) * 4
    assert_all_close(primal_only[:3], want[:3], **F64)


# (Tq, Tk): causal masks align bottom-right, so Tq > Tk leaves leading rows with no key at all
CROSS = [(1, 300), (5, 70), (64, 130), (70, 5), (130, 64), (257, 1), (3, 0), (0, 4)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("t_q", "t_k"), CROSS)
def test_cross_lengths(t_q, t_k, causal):
    q, k, v = make_inputs(1, 3, t_q, t_k, 24, 8, layout="transposed")
    expected = reference(q, k, v, causal=causal)
    g = torch.randn_like(expected)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    ref = lambda q, k, v: reference(q, k, v, causal=causal)  # noqa: E731
    for chunk_size in (16, 64):
        ours = lambda q, k, v, c=chunk_size: linear(q, k, v, causal=causal, chunk_size=c)  # noqa: E731
        torch.testing.assert_close(ours(q, k, v), expected, **F64)
        dq, dk, dv = vjp(ours, (q, k, v), g)
        assert_all_close((dq, dk, dv), vjp(ref, (q, k, v), g), **F64)
        od = jvp(ours, (q, k, v), tangents)
        torch.testing.assert_close(od, jvp(ref, (q, k, v), tangents), **F64)
        if causal and t_q > t_k:
            blind = t_q - t_k  # rows that see no key: exactly 0 out, 0 gradient, 0 tangent
            assert ours(q, k, v)[..., :blind, :].eq(0).all()
            assert dq[..., :blind, :].eq(0).all() and od[..., :blind, :].eq(0).all()
    torch.testing.assert_close(
        beta_attention_recurrent(q, k, v, causal=causal, scale=24**-0.5), expected, **F64
    )


@pytest.mark.parametrize("grad", ["exact", "seed"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("t_q", "t_k"), [(7, 7), (4, 7), (7, 4)])
def test_gradcheck(t_q, t_k, causal, grad, monkeypatch):
    """Exact: the hand-derived VJP and JVP are the derivative. Seed: only the value derivative is
    the true one (the shortcut changes d/dq and d/dk), so gradcheck runs with ``v`` alone; the
    seed's q/k derivatives are checked against the reference's seed map elsewhere. Fast mode
    (random projections of the Jacobian) here, the full Jacobian once below."""
    monkeypatch.setattr(chunk, "GROUP_SIZE", 6)  # 2 chunks of 3 per group, 2 groups
    q, k, v = make_inputs(1, 2, t_q, t_k, 3, 2, layout="strided")
    inputs = (q.requires_grad_(grad == "exact"), k.requires_grad_(grad == "exact"), v.requires_grad_())
    fn = lambda q, k, v: linear(q, k, v, causal=causal, grad=grad, chunk_size=3, scale=0.9)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, fast_mode=True)


def test_gradcheck_full_jacobian(monkeypatch):
    monkeypatch.setattr(chunk, "GROUP_SIZE", 4)
    q, k, v = (x.requires_grad_() for x in make_inputs(1, 1, 5, 6, 3, 2, layout="transposed"))
    fn = lambda q, k, v: linear(q, k, v, causal=True, chunk_size=2, scale=0.9)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True)


@pytest.mark.parametrize("causal", [True, False])
def test_seed_jvp_and_vjp_are_adjoint(causal):
    """The seed's VJP is the adjoint of its JVP (docs/math.md, section 10): <J t, g> == <t, J^T g>."""
    q, k, v = make_inputs(2, 2, 19, 23, 5, 6)
    fn = lambda q, k, v: linear(q, k, v, causal=causal, grad="seed", chunk_size=4)  # noqa: E731
    g = torch.randn(2, 2, 19, 6, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    lhs = (jvp(fn, (q, k, v), tangents) * g).sum()
    rhs = sum((t * d).sum() for t, d in zip(tangents, vjp(fn, (q, k, v), g), strict=True))
    torch.testing.assert_close(lhs, rhs, **F64)
    # and it is not the true derivative: the JVP misses the exact one by far
    exact = jvp(lambda q, k, v: linear(q, k, v, causal=causal), (q, k, v), tangents)
    assert (jvp(fn, (q, k, v), tangents) - exact).norm() > 0.1 * exact.norm()


def test_forward_ad_dual_numbers():
    import torch.autograd.forward_ad as fwAD

    q, k, v = make_inputs(1, 2, 33, 40, 8, 4)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents, strict=True)]
        out = normattn.attention(*duals, normalizer="beta", causal=True, backend="torch")
        od = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(
        od, jvp(lambda q, k, v: reference(q, k, v, causal=True), (q, k, v), tangents), **F64
    )


@pytest.mark.parametrize("causal", [True, False])
def test_zero_score_rows(causal):
    """q_i = 0 gives r_i = 0, where beta's derivative is the identity (docs/math.md, section 4):
    O_i = 0, dq_i = c sum_j (g_i . v_j) k_j, Od_i = c sum_j (qd_i . k_j) v_j, with no NaN."""
    t, d = 20, 6
    c = d**-0.5
    q, k, v = make_inputs(1, 2, t, t, d, 5)
    zero_rows = [0, 3, 11, 19]
    q[..., zero_rows, :] = 0
    g = torch.randn(1, 2, t, 5, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    ours = lambda q, k, v: linear(q, k, v, causal=causal, chunk_size=4)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, causal=causal)  # noqa: E731
    out = ours(q, k, v)
    dq, dk, dv = vjp(ours, (q, k, v), g)
    od = jvp(ours, (q, k, v), tangents)
    for x in (out, dq, dk, dv, od):
        assert torch.isfinite(x).all()
    torch.testing.assert_close(out, ref(q, k, v), **F64)
    assert_all_close((dq, dk, dv), vjp(ref, (q, k, v), g), **F64)
    torch.testing.assert_close(od, jvp(ref, (q, k, v), tangents), **F64)
    visible = torch.ones(t, t, dtype=torch.bool).tril() if causal else torch.ones(t, t, dtype=torch.bool)
    for i in zero_rows:
        keys = visible[i]
        assert out[..., i, :].eq(0).all()
        expected_dq = c * torch.einsum(
            "bhj,bhjd->bhd", g[..., i, None, :].mul(v[..., keys, :]).sum(-1), k[..., keys, :]
        )
        torch.testing.assert_close(dq[..., i, :], expected_dq, **F64)
        scores_dot = c * torch.einsum("bhd,bhjd->bhj", tangents[0][..., i, :], k[..., keys, :])
        torch.testing.assert_close(
            od[..., i, :], torch.einsum("bhj,bhje->bhe", scores_dot, v[..., keys, :]), **F64
        )
    # all keys zero: every score is 0, the output is 0 and the derivative is the identity map
    k0 = torch.zeros_like(k)
    seeds = vjp(lambda q, k, v: linear(q, k, v, causal=causal, grad="seed", chunk_size=4), (q, k0, v), g)
    assert all(torch.isfinite(x).all() for x in seeds) and seeds[0].eq(0).all()
    assert_all_close(vjp(ours, (q, k0, v), g), vjp(ref, (q, k0, v), g), **F64)


@pytest.mark.parametrize("causal", [True, False])
def test_norm_never_negative_through_rounding(causal):
    """Queries orthogonal to every key: q^T G q is 0 in exact arithmetic, and evaluated through the
    d x d state it comes out slightly negative for most rows; it must be clamped, not sqrt'ed to NaN.
    Through the state ``r`` is only known to about sqrt(eps) here, so the derivatives match the
    materialized reference to 1e-4 of their size, not 1e-10: their norm term is O(r) exactly, and
    a ratio of rounding noise in floating point (see the accuracy note in chunk.py)."""
    t, d = 200, 16
    basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    k = 30 * torch.randn(1, 2, t, d - 1, dtype=torch.float64) @ basis[:, : d - 1].T
    q = torch.randn(1, 2, t, 1, dtype=torch.float64) * basis[:, d - 1]
    v = torch.randn(1, 2, t, 4, dtype=torch.float64)
    g = torch.randn(1, 2, t, 4, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    ours = lambda q, k, v: linear(q, k, v, causal=causal, chunk_size=16)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, causal=causal)  # noqa: E731
    got = [ours(q, k, v), *vjp(ours, (q, k, v), g), jvp(ours, (q, k, v), tangents)]
    want = [ref(q, k, v), *vjp(ref, (q, k, v), g), jvp(ref, (q, k, v), tangents)]
    for a, e in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10 + 1e-4 * e.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_huge_scores(dtype, causal):
    q, k, v = make_inputs(1, 2, 70, 70, 16, 8, dtype=dtype)
    q, k = q * 100 / q.norm(dim=-1, keepdim=True), k * 100 / k.norm(dim=-1, keepdim=True)
    scale = 1.0  # scores up to 1e4 in magnitude
    ours = lambda q, k, v: linear(q, k, v, causal=causal, chunk_size=16, scale=scale)  # noqa: E731
    ref = lambda q, k, v: reference(q, k, v, causal=causal, scale=scale)  # noqa: E731
    as64 = [x.double() for x in (q, k, v)]
    g = torch.randn(1, 2, 70, 8, dtype=dtype)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    got = [ours(q, k, v), *vjp(ours, (q, k, v), g), jvp(ours, (q, k, v), tangents)]
    want = [
        ref(*as64),
        *vjp(ref, as64, g.double()),
        jvp(ref, as64, [t.double() for t in tangents]),
    ]
    for a, e in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        assert (a.double() - e).abs().max() <= tol * e.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_low_precision_flash_rule(dtype, causal):
    """FlashAttention's rule: the error against a float64 reference is at most 2x (forward) or 3x
    (gradients) the error of the reference computed in the same dtype, plus a small floor."""
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-3}[dtype]
    q, k, v = make_inputs(2, 2, 257, 257, 72, 40)
    g = torch.randn(2, 2, 257, 40, dtype=torch.float64)
    ref = lambda q, k, v: reference(q, k, v, causal=causal)  # noqa: E731
    ours = lambda q, k, v: linear(q, k, v, causal=causal)  # noqa: E731
    low, g_low = [x.to(dtype) for x in (q, k, v)], g.to(dtype)
    # the float64 yardstick sees the same rounded inputs, so only the computation's error counts
    up = [x.double() for x in low]
    exact = [ref(*up), *vjp(ref, up, g_low.double())]
    baseline = [ref(*low), *vjp(ref, low, g_low)]
    got = [ours(*low), *vjp(ours, low, g_low)]
    for name, a, b, e, factor in zip(
        ("out", "dq", "dk", "dv"), got, baseline, exact, (2, 3, 3, 3), strict=True
    ):
        assert a.dtype == dtype
        err, ref_err = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert err <= factor * ref_err + floor, f"{name}: {err:.3g} > {factor} x {ref_err:.3g} + {floor}"


def test_chunk_size_validation():
    q, k, v = make_inputs(1, 1, 4, 4, 2, 2)
    for bad in (0, -3, 2.0, True, None):
        with pytest.raises(ValueError, match="chunk_size"):
            linear(q, k, v, causal=True, chunk_size=bad)


def test_public_seed_mode_dispatches_here():
    q, k, v = make_inputs(1, 2, 30, 30, 8, 8)
    g = torch.randn(1, 2, 30, 8, dtype=torch.float64)
    public = lambda q, k, v: normattn.attention(
        q, k, v, normalizer="beta", causal=True, grad="seed", backend="torch"
    )  # noqa: E731
    direct = lambda q, k, v: linear(q, k, v, causal=True, grad="seed")  # noqa: E731
    assert_all_close(vjp(public, (q, k, v), g), vjp(direct, (q, k, v), g), **F64)


# ---- recurrent decoding -------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "prompt", "d", "dv"), [(1, 0, 3, 5), (9, 1, 24, 8), (70, 64, 80, 72)])
def test_prefill_then_decode_state(t, prompt, d, dv):
    q, k, v = make_inputs(2, 3, t, t, d, dv, layout="transposed")
    out, state = prefill_then_decode(q, k, v, prompt)
    torch.testing.assert_close(out, reference(q, k, v, causal=True), **F64)
    assert state.H.shape == (2, 3, d, dv) and state.G.shape == (2, 3, d, d) and state.tokens_seen == t
    torch.testing.assert_close(state.H, k.transpose(-1, -2) @ v, **F64)
    torch.testing.assert_close(state.G, k.transpose(-1, -2) @ k, **F64)


def test_prefill_last_query_only_and_explicit_scale():
    q, k, v = make_inputs(1, 2, 40, 40, 8, 8)
    out, state = beta_prefill(q[..., -1:, :], k, v, scale=0.3)
    torch.testing.assert_close(out, reference(q, k, v, causal=True, scale=0.3)[..., -1:, :], **F64)
    assert state.tokens_seen == 40
    q2, k2, v2 = make_inputs(1, 2, 1, 1, 8, 8)
    out_t, _ = beta_decode(q2, k2, v2, state, scale=0.3)
    full = [torch.cat([x, y], dim=-2) for x, y in ((q, q2), (k, k2), (v, v2))]
    torch.testing.assert_close(out_t, reference(*full, causal=True, scale=0.3)[..., -1:, :], **F64)


def test_decode_low_precision_and_state_to():
    q, k, v = make_inputs(1, 2, 33, 33, 16, 16, dtype=torch.bfloat16)
    _, state = beta_prefill(q[..., :32, :], k[..., :32, :], v[..., :32, :])
    assert state.H.dtype == state.G.dtype == torch.float32
    out_t, _ = beta_decode(q[..., 32:, :], k[..., 32:, :], v[..., 32:, :], state)
    assert out_t.dtype == torch.bfloat16
    torch.testing.assert_close(out_t, linear(q, k, v, causal=True)[..., 32:, :], rtol=1e-2, atol=1e-2)
    wide = state.to(torch.float64)
    assert wide.H.dtype == wide.G.dtype == torch.float64 and wide.tokens_seen == 32
    out64, _ = beta_decode(*(x[..., 32:, :].double() for x in (q, k, v)), wide)
    torch.testing.assert_close(out64, reference(q.double(), k.double(), v.double(), causal=True)[..., 32:, :])


def test_decode_is_differentiable_at_zero_query():
    q, k, v = make_inputs(1, 2, 12, 12, 6, 4)
    q[..., -1, :] = 0
    _, state = beta_prefill(q[..., :11, :], k[..., :11, :], v[..., :11, :])
    g = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    step = lambda q_t, k_t, v_t: beta_decode(q_t, k_t, v_t, state)[0]  # noqa: E731
    last = [x[..., 11:, :] for x in (q, k, v)]
    full = (
        lambda q_t, k_t, v_t: reference(  # noqa: E731
            *(
                torch.cat([x[..., :11, :], y], dim=-2)
                for x, y in zip((q, k, v), (q_t, k_t, v_t), strict=True)
            ),
            causal=True,
        )[..., -1:, :]
    )
    assert_all_close(vjp(step, last, g), vjp(full, last, g), **F64)


def test_decode_and_prefill_errors():
    q, k, v = make_inputs(2, 3, 5, 5, 8, 4)
    _, state = beta_prefill(q, k, v)
    q_t, k_t, v_t = q[..., :1, :], k[..., :1, :], v[..., :1, :]
    with pytest.raises(ValueError, match=r"q_t must hold one token.*\(2, 3, 2, 8\)"):
        beta_decode(q[..., :2, :], k_t, v_t, state)
    with pytest.raises(ValueError, match=r"v_t must hold one token"):
        beta_decode(q_t, k_t, v[0], state)
    with pytest.raises(TypeError, match="k_t must be a torch.Tensor"):
        beta_decode(q_t, k_t.tolist(), v_t, state)
    with pytest.raises(TypeError, match="state must be a BetaState"):
        beta_decode(q_t, k_t, v_t, (state.H, state.G))
    with pytest.raises(ValueError, match=r"state.H has shape \(2, 3, 8, 4\).*\(2, 3, 8, 6\)"):
        beta_decode(q_t, k_t, torch.randn(2, 3, 1, 6, dtype=torch.float64), state)
    with pytest.raises(ValueError, match=r"state.G has shape \(2, 3, 6, 6\)"):
        beta_decode(q_t, k_t, v_t, BetaState(state.H, state.G[..., :6, :6], 5))
    with pytest.raises(ValueError, match=r"state.H has shape \(2, 3, 8, 4\).*\(1, 3, 8, 4\)"):
        beta_decode(q_t[:1], k_t[:1], v_t[:1], state)
    with pytest.raises(TypeError, match=r"state.H has dtype torch.float64.*torch.float32"):
        beta_decode(q_t.float(), k_t.float(), v_t.float(), state)
    with pytest.raises(TypeError, match="must share one dtype"):
        beta_decode(q_t, k_t.float(), v_t, state)
    with pytest.raises(ValueError, match="scale"):
        beta_decode(q_t, k_t, v_t, state, scale=-1.0)
    with pytest.raises(ValueError, match="4 dimensions"):
        beta_prefill(q[0], k, v)
    with pytest.raises(ValueError, match="same head dim"):
        beta_prefill(q, k[..., :4], v)


def test_state_has_constant_size():
    """Decoding keeps d (d + dv) numbers per head, however many tokens came before."""
    sizes = set()
    for prompt in (1, 100, 1000):
        q, k, v = make_inputs(1, 2, prompt + 1, prompt + 1, 8, 4)
        _, state = beta_prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :])
        _, state = beta_decode(q[..., -1:, :], k[..., -1:, :], v[..., -1:, :], state)
        sizes.add(state.H.numel() + state.G.numel())
        assert state.tokens_seen == prompt + 1
    assert sizes == {2 * 8 * (8 + 4)}


# -- the causal sliding window in linear time (ops/beta_linear/window.py) ---------------------------

# (Tq, Tk, left) with chunks of 4: left < C, left a multiple of C, left = m C + rho with rho > 0 (two
# edge blocks), a window wider than the sequence, bottom-right alignment both ways
WINDOW_CASES = [
    (1, 1, 3),
    (7, 7, 1),
    (63, 63, 4),
    (63, 63, 13),
    (257, 257, 37),
    (9, 30, 6),
    (30, 9, 6),
    (20, 20, 50),
]


@pytest.mark.parametrize("grad", ["exact", "seed"])
@pytest.mark.parametrize(("t_q", "t_k", "left"), WINDOW_CASES, ids=str)
def test_sliding_window_is_linear_and_matches_reference(t_q, t_k, left, grad, monkeypatch):
    """beta with ``window=(left, 0)`` on the torch backend takes the linear-time window form (with
    grouped-query heads and key padding); values, gradients and the JVP equal the reference's."""
    monkeypatch.setattr(window, "CHUNK_SIZE", 4)
    monkeypatch.setattr(window, "GROUP_SIZE", 8)  # steps of max(8, 4 left) queries
    calls = []
    original = window._forward
    monkeypatch.setattr(window, "_forward", lambda *args: calls.append(1) or original(*args))
    q, k, v = inputs((2, 4, 2, t_q, t_k, 24, 16))
    padding = (torch.arange(t_k)[None, :] < torch.tensor([t_k, max(t_k - 5, 1)])[:, None])[:, None, None, :]
    options = dict(window=(left, 0), attn_mask=padding, enable_gqa=True, grad=grad)
    cotangent = torch.randn(2, 4, t_q, 16, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grad="seed" warns that it is the shortcut
        got = all_derivatives(attend("torch", "beta", **options), (q, k, v), cotangent, tangents)
        want = all_derivatives(attend("reference", "beta", **options), (q, k, v), cotangent, tangents)
    assert calls
    for what, a, c in zip(("out", "dq", "dk", "dv", "jvp"), got, want, strict=True):
        torch.testing.assert_close(a, c, **F64, msg=what)


@pytest.mark.parametrize("shape", UGLY_SHAPES, ids=shape_id)
def test_sliding_window_gradcheck_of_output_and_tangent(shape, monkeypatch):
    """float64 gradcheck of ``(q, k, v, qd, kd, vd) -> (O, Od)`` through the window form: its
    backward, JVP and the gradient of its JVP (forward mode through the backward)."""
    monkeypatch.setattr(window, "CHUNK_SIZE", 4)
    monkeypatch.setattr(window, "GROUP_SIZE", 8)  # steps of max(8, 4 left) queries
    primals = inputs(shape)
    tangents = [torch.randn_like(x) for x in primals]
    f = attend("torch", "beta", window=(6, 0), enable_gqa=shape[1] != shape[2])

    def output_and_tangent(*args):
        return torch.func.jvp(f, args[:3], args[3:])

    assert gradcheck(output_and_tangent, (*primals, *tangents), fast=True, forward_ad=False)
    assert gradcheck(f, primals, fast=True)


def test_sliding_window_states_need_no_subtraction():
    """The window sums chunk states forward, never as a difference of prefix sums: a window at the
    end of a long sequence of huge keys keeps its float32 accuracy."""
    t, left = 4096, 64
    q, k, v = inputs((1, 1, 1, t, t, 16, 16), dtype=torch.float32, transposed=False)
    k = k.clone()
    k[..., : t - 2 * left, :] *= 1e4  # keys far outside the last queries' windows
    got = normattn.attention(q[..., -8:, :], k, v, normalizer="beta", window=(left, 0), backend="torch")
    want = attention_ref(
        q[..., -8:, :].double(), k.double(), v.double(), "beta", window=(left, 0), causal=True
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_sliding_window_leaves_out_keys_no_query_sees(monkeypatch):
    """A few queries at the end of a long key sequence (a decoding step) cost their windows, not the
    sequence: the keys left of the first query's window are never visited, and get zero gradients."""
    lengths = []
    original = window._Layout
    monkeypatch.setattr(
        window, "_Layout", lambda length, *args: lengths.append(length) or original(length, *args)
    )
    q, k, v = inputs((1, 2, 1, 3, 500, 8, 8))
    f = attend("torch", "beta", window=(10, 0), enable_gqa=True)
    cotangent = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    got = all_derivatives(f, (q, k, v), cotangent, tangents)
    assert lengths and max(lengths) <= 3 + 10
    want = all_derivatives(
        attend("reference", "beta", window=(10, 0), enable_gqa=True), (q, k, v), cotangent, tangents
    )
    for what, a, c in zip(("out", "dq", "dk", "dv", "jvp"), got, want, strict=True):
        torch.testing.assert_close(a, c, **F64, msg=what)
    assert (got[2][..., : 500 - 13, :] == 0).all()
