"""Chunked linear-time beta kernels (backend="triton-linear") and the fused decode step.

Checked against the materialized autograd reference (``normattn.reference``) in float64 and float32:
forward, dq/dk/dv and torch.func.jvp, exact and seed, causal and not, Tq != Tk both ways, chunk
sizes that do and do not divide T, head dims that are not powers of two or exceed one tile.
Without a GPU the kernels run in the Triton interpreter (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch.func import jvp

import normattn
from normattn.normalizers import BETA
from normattn.ops.attention.naive import attention_naive
from normattn.ops.attention.problem import Problem
from normattn.ops.beta_linear.triton_chunk import beta_linear_attention_triton
from normattn.ops.beta_linear.triton_decode import beta_decode_triton


def _problem(causal, scale, grad):
    return Problem(BETA, scale, 0.0, left=None, right=0 if causal else None, grad=grad)


def linear_triton(q, k, v, *, normalizer, causal, scale, grad, chunk_size=64):
    assert normalizer is BETA
    return beta_linear_attention_triton(_problem(causal, scale, grad), q, k, v, chunk_size)


def attention_reference(q, k, v, *, normalizer, causal, scale, grad):
    assert normalizer is BETA
    return attention_naive(_problem(causal, scale, grad), q, k, v)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |error| relative to max |expected|
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


@dataclass(frozen=True)
class Case:
    t_q: int
    t_k: int
    d: int
    dv: int
    causal: bool
    grad: str = "exact"
    chunk: int = 16
    dtype: torch.dtype = torch.float64
    heads: int = 1
    kv_heads: int | None = None  # grouped-query heads: fewer key/value heads than query heads

    def __str__(self) -> str:
        kind = "causal" if self.causal else "full"
        dtype = str(self.dtype).removeprefix("torch.")
        gqa = f"-h{self.heads}kv{self.kv_heads}" if self.kv_heads else ""
        return f"q{self.t_q}-k{self.t_k}-d{self.d}-dv{self.dv}-{kind}-{self.grad}-c{self.chunk}-{dtype}{gqa}"


CASES = [
    Case(63, 63, 24, 20, causal=True, chunk=32),  # the chunk does not divide T
    Case(63, 63, 24, 20, causal=False, chunk=32),
    Case(64, 64, 24, 24, causal=True, chunk=32),  # the chunk divides T
    Case(1, 1, 3, 3, causal=True),
    Case(1, 1, 3, 5, causal=False),
    Case(130, 130, 24, 20, causal=True, chunk=64, dtype=torch.float32),
    Case(40, 40, 80, 72, causal=True, chunk=32),  # d and dv span two tiles
    Case(20, 63, 24, 20, causal=True, chunk=32),  # Tq < Tk: a prefix of keys every query sees
    Case(63, 20, 24, 20, causal=True),  # Tq > Tk: 43 queries see no key
    Case(1, 130, 24, 20, causal=True, chunk=64),  # one query, in the last chunk
    Case(20, 45, 24, 20, causal=False),
    Case(45, 20, 3, 20, causal=False),
    Case(63, 63, 24, 20, causal=True, grad="seed", chunk=32),
    Case(45, 20, 24, 20, causal=True, grad="seed"),
    Case(20, 45, 80, 24, causal=False, grad="seed", chunk=32),
    # grouped-query heads: the kernels read the shared head, the backward sums over its group
    Case(63, 63, 24, 20, causal=True, chunk=32, heads=4, kv_heads=2),
    Case(45, 20, 24, 20, causal=True, heads=3, kv_heads=1),
    Case(20, 45, 24, 20, causal=False, grad="seed", heads=4, kv_heads=1),
]


def _inputs(case: Case, batch: int = 1) -> tuple[torch.Tensor, ...]:
    shape, kv_shape = (batch, case.heads), (batch, case.kv_heads or case.heads)
    q = torch.randn(*shape, case.t_q, case.d, dtype=torch.float64)
    k = torch.randn(*kv_shape, case.t_k, case.d, dtype=torch.float64)
    v = torch.randn(*kv_shape, case.t_k, case.dv, dtype=torch.float64)
    return q, k, v


def _run(fn, q, k, v, cotangent, tangents):
    """Forward, the VJP of ``cotangent`` and the JVP along ``tangents``."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, cotangent.to(out.dtype))
    tangents = tuple(t.to(q.device, q.dtype) for t in tangents)
    _, out_tangent = jvp(fn, tuple(x.detach() for x in (q, k, v)), tangents)
    return out.detach(), grads, out_tangent


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() or 1.0
    err = (actual.to(torch.float64) - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})"


def _check_against_reference(case: Case, q, k, v) -> None:
    scale = 1 / math.sqrt(case.d)
    cotangent = torch.randn(q.shape[:-1] + (case.dv,), dtype=torch.float64)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))

    def kernel(q, k, v):
        return linear_triton(
            q, k, v, normalizer=BETA, causal=case.causal, scale=scale, grad=case.grad, chunk_size=case.chunk
        )

    def reference(q, k, v):
        return attention_reference(q, k, v, normalizer=BETA, causal=case.causal, scale=scale, grad=case.grad)

    expected = _run(reference, q, k, v, cotangent, tangents)
    got = _run(kernel, *(x.to(DEVICE, case.dtype) for x in (q, k, v)), cotangent.to(DEVICE), tangents)
    _assert_close(got[0].cpu(), expected[0], case.dtype, "output")
    for name, g, e in zip(("dq", "dk", "dv"), got[1], expected[1], strict=True):
        _assert_close(g.cpu(), e, case.dtype, name)
    _assert_close(got[2].cpu(), expected[2], case.dtype, "jvp")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case) -> None:
    _check_against_reference(case, *_inputs(case))


def test_rows_without_keys_are_exactly_zero() -> None:
    """Causal Tq > Tk: the first Tq - Tk queries see nothing: output and dq are exactly 0.

    ``out.sum()`` also sends a cotangent with zero strides through the backward kernels.
    """
    q, k, v = (x.to(DEVICE).requires_grad_() for x in _inputs(Case(40, 10, 24, 20, causal=True)))
    out = linear_triton(q, k, v, normalizer=BETA, causal=True, scale=0.2, grad="exact")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert out[:, :, :30].abs().max() == 0 and grads[0][:, :, :30].abs().max() == 0
    assert out[:, :, 30:].abs().min() > 0
    expected = attention_reference(q, k, v, normalizer=BETA, causal=True, scale=0.2, grad="exact")
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v)), strict=True):
        _assert_close(got.cpu(), want.detach().cpu(), torch.float64, "gradient of out.sum()")


def test_zero_queries_and_huge_scores() -> None:
    """Rows with r = 0 (zero queries) take rho = 0 (docs/math.md, section 4); scores of 1e4 stay finite."""
    case = Case(63, 63, 24, 20, causal=True, chunk=32)
    q, k, v = _inputs(case)
    q[:, :, ::7] = 0
    _check_against_reference(case, q, k, v)
    big = Case(63, 63, 24, 20, causal=True, chunk=32, dtype=torch.float32)
    q, k, v = _inputs(big)
    q = q * (1e4 / (1 / math.sqrt(big.d) * (q @ k.transpose(-1, -2)).abs().max()))
    q[:, :, 5] = 0
    _check_against_reference(big, q, k, v)


def test_noncontiguous_inputs_and_forward_ad() -> None:
    """Strided views (a (B, T, H, d) layout and a stride-2 head dim) and torch.autograd.forward_ad."""
    case = Case(45, 45, 24, 20, causal=True, chunk=32, heads=2)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(case))
    wide = torch.randn(*v.shape[:-1], 2 * case.dv, dtype=torch.float64)[..., ::2]
    assert not q.is_contiguous() and wide.stride(-1) == 2
    _check_against_reference(case, q, k, wide)

    scale = 1 / math.sqrt(case.d)
    tangent = torch.randn(*v.shape[:-1], 2 * case.dv, dtype=torch.float64)[..., 1::2]
    with torch.autograd.forward_ad.dual_level():
        dual_v = torch.autograd.forward_ad.make_dual(wide.to(DEVICE), tangent.to(DEVICE))
        out = normattn.attention(
            q.to(DEVICE), k.to(DEVICE), dual_v, normalizer="beta", causal=True, backend="triton-linear"
        )
        out_tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    _, expected = jvp(
        lambda v: attention_reference(q, k, v, normalizer=BETA, causal=True, scale=scale, grad="exact"),
        (wide,),
        (tangent,),
    )
    _assert_close(out_tangent.cpu(), expected, torch.float64, "forward_ad tangent")


def test_gradcheck_float64() -> None:
    q, k, v = (x.to(DEVICE).requires_grad_() for x in _inputs(Case(5, 7, 3, 2, causal=True)))

    def fn(q, k, v):
        return linear_triton(q, k, v, normalizer=BETA, causal=True, scale=0.7, grad="exact")

    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True, fast_mode=True)


def test_torch_func_grad() -> None:
    """Under torch.func transforms the backward rule gets wrapped tensors; the kernels still run."""
    q, k, v = (x.to(DEVICE) for x in _inputs(Case(20, 20, 8, 8, causal=True)))

    def loss(fn):
        return lambda q, k, v: (
            fn(q, k, v, normalizer=BETA, causal=True, scale=0.3, grad="exact").square().sum()
        )

    got = torch.func.grad(loss(linear_triton), argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(loss(attention_reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        _assert_close(g.cpu(), w.cpu(), torch.float64, name)


def test_public_dispatch() -> None:
    q, k, v = (x.to(DEVICE) for x in _inputs(Case(20, 20, 24, 20, causal=True)))
    got = normattn.attention(q, k, v, normalizer="beta", causal=True, backend="triton-linear")
    expected = normattn.attention(q, k, v, normalizer="beta", causal=True, backend="reference")
    _assert_close(got.cpu(), expected.cpu(), torch.float64, "dispatch")
    with pytest.raises(ValueError, match="beta"):
        normattn.attention(q, k, v, normalizer="softmax", backend="triton-linear")
    with pytest.raises(ValueError, match="power of two"):
        linear_triton(q, k, v, normalizer=BETA, causal=True, scale=0.2, grad="exact", chunk_size=24)


@pytest.mark.parametrize("d, dv", [(24, 20), (80, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_step_matches_attention(d: int, dv: int, dtype: torch.dtype) -> None:
    """States of a prefix plus one decode step give the last row of causal beta attention."""
    batch, heads, t = 2, 2, 9
    q, k, v = (torch.randn(batch, heads, t, n, dtype=torch.float64) for n in (d, d, dv))
    scale = 1 / math.sqrt(d)
    prefix_h = (k[:, :, :-1].transpose(-1, -2) @ v[:, :, :-1]).to(dtype)
    prefix_g = (k[:, :, :-1].transpose(-1, -2) @ k[:, :, :-1]).to(dtype)
    expected = attention_reference(q, k, v, normalizer=BETA, causal=True, scale=scale, grad="exact")[:, :, -1]
    token = [x[:, :, -1].to(dtype).to(DEVICE) for x in (q, k, v)]

    out, h_new, g_new = beta_decode_triton(*token, prefix_h.to(DEVICE), prefix_g.to(DEVICE), scale)
    _assert_close(out.cpu(), expected, dtype, "decode output")
    _assert_close(h_new.cpu(), k.transpose(-1, -2) @ v, dtype, "H")
    _assert_close(g_new.cpu(), k.transpose(-1, -2) @ k, dtype, "G")

    # (B, H, 1, d) tokens, non-contiguous states updated in place
    h_state = prefix_h.transpose(-1, -2).contiguous().transpose(-1, -2).to(DEVICE)
    g_state = prefix_g.to(DEVICE)
    out4, h_same, g_same = beta_decode_triton(
        *(x[:, :, None] for x in token), h_state, g_state, scale, inplace=True
    )
    assert out4.shape == (batch, heads, 1, dv) and h_same is h_state and g_same is g_state
    _assert_close(out4[:, :, 0].cpu(), expected, dtype, "decode output (in place)")
    _assert_close(h_state.cpu(), k.transpose(-1, -2) @ v, dtype, "H (in place)")


def test_decode_zero_query_and_bad_shapes() -> None:
    h = torch.randn(1, 2, 4, 3, dtype=torch.float32, device=DEVICE)
    g = torch.zeros(1, 2, 4, 4, dtype=torch.float32, device=DEVICE)
    q = torch.zeros(1, 2, 4, device=DEVICE)
    out, _, _ = beta_decode_triton(q, torch.randn_like(q), torch.randn(1, 2, 3, device=DEVICE), h, g)
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="G must be"):
        beta_decode_triton(q, q, q[..., :3], h, g[..., :3])
    with pytest.raises(ValueError, match="token dims"):
        beta_decode_triton(q, q, q, h, g)
