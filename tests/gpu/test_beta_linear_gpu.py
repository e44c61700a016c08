"""GPU tests of the chunked linear-time beta kernels (backend="triton-linear") and the decode kernel.

Half precision follows FlashAttention's rule: the kernel's error against a float64 reference may be
at most 2x (forward) or 3x (gradients, JVP) the error of the plain reference computed in the same
dtype. A T=32768 run must stay finite and close to the float32 torch chunked computation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jvp

import normattn
from normattn.ops.beta_linear.recurrent import BetaState, beta_decode
from normattn.ops.beta_linear.triton_decode import beta_decode_triton

pytestmark = pytest.mark.gpu

# (B, H, Tq, Tk, d, dv, causal)
SHAPES = [
    (2, 4, 256, 256, 64, 64, True),
    (2, 4, 1000, 1000, 128, 128, True),  # chunks do not divide T
    (1, 3, 777, 777, 80, 72, False),
    (1, 2, 300, 700, 256, 256, True),  # Tq < Tk, the largest head dim
    (1, 2, 700, 300, 64, 48, True),  # Tq > Tk: rows with no key
    (2, 2, 1, 513, 64, 64, True),
]


def _passes(fn, q, k, v, cotangent, tangents):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, cotangent.to(out.dtype))
    tangents = tuple(t.to(q.dtype) for t in tangents)
    _, out_tangent = jvp(fn, tuple(x.detach() for x in (q, k, v)), tangents)
    return [out, *grads, out_tangent]


def _attend(backend: str, causal: bool, scale: float, grad: str):
    return lambda q, k, v: normattn.attention(
        q, k, v, normalizer="beta", causal=causal, scale=scale, grad=grad, backend=backend
    )


@pytest.mark.parametrize("grad", ["exact", "seed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_half_precision_flash_rule(shape, dtype, grad):
    batch, heads, t_q, t_k, d, dv, causal = shape
    q = torch.randn(batch, heads, t_q, d, device="cuda", dtype=torch.float64)
    k = torch.randn(batch, heads, t_k, d, device="cuda", dtype=torch.float64)
    v = torch.randn(batch, heads, t_k, dv, device="cuda", dtype=torch.float64)
    low = [x.to(dtype) for x in (q, k, v)]
    q, k, v = (x.double() for x in low)  # every computation sees the same rounded inputs
    cotangent = torch.randn(batch, heads, t_q, dv, device="cuda", dtype=torch.float64)
    tangents = tuple(torch.randn_like(x).to(dtype).double() for x in (q, k, v))
    scale = 1 / math.sqrt(d)

    exact = _passes(_attend("reference", causal, scale, grad), q, k, v, cotangent, tangents)
    plain = _passes(_attend("reference", causal, scale, grad), *low, cotangent, tangents)
    kernel = _passes(_attend("triton-linear", causal, scale, grad), *low, cotangent, tangents)
    for name, factor, want, ref_low, got in zip(
        ("out", "dq", "dk", "dv", "jvp"), (2, 3, 3, 3, 3), exact, plain, kernel, strict=True
    ):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        ref_err = (ref_low.double() - want).abs().max().item()
        err = (got.double() - want).abs().max().item()
        slack = 1e-6 * want.abs().max().item()
        assert err <= factor * ref_err + slack, f"{name}: {err:.3e} vs reference-in-{dtype} {ref_err:.3e}"


@pytest.mark.parametrize("causal", [True, False])
def test_float32_and_float64_match_reference(causal):
    q, k, v = (torch.randn(2, 3, 333, 96, device="cuda", dtype=torch.float64) for _ in range(3))
    cotangent = torch.randn_like(v)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    want = _passes(_attend("reference", causal, 0.1, "exact"), q, k, v, cotangent, tangents)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        inputs = [x.to(dtype) for x in (q, k, v)]
        got = _passes(_attend("triton-linear", causal, 0.1, "exact"), *inputs, cotangent, tangents)
        for name, g, w in zip(("out", "dq", "dk", "dv", "jvp"), got, want, strict=True):
            scale = w.abs().max().item()
            # float64 on a GPU: Triton passes the scale as fp32, a 3e-8 relative rounding
            bound = (tol if dtype == torch.float32 else 1e-7) * scale
            assert (g.double() - w).abs().max().item() <= bound, (dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_sequence_stays_finite(dtype):
    """T = 32768: output, gradients and tangent finite and close to the float32 torch chunked pass."""
    t, d = 32768, 64
    q, k, v = (torch.randn(1, 2, t, d, device="cuda", dtype=dtype) for _ in range(3))
    cotangent = torch.randn_like(v)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    scale = 1 / math.sqrt(d)
    got = _passes(_attend("triton-linear", True, scale, "exact"), q, k, v, cotangent, tangents)
    want = _passes(
        _attend("torch", True, scale, "exact"),
        *(x.float() for x in (q, k, v)),
        cotangent.float(),
        tuple(x.float() for x in tangents),
    )
    for name, g, w in zip(("out", "dq", "dk", "dv", "jvp"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        err = (g.float() - w).abs().max().item()
        assert err <= 2e-2 * w.abs().max().item(), f"{name}: {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d, dv", [(64, 64), (128, 128), (80, 40), (256, 256)])
def test_decode_kernel_matches_torch_recurrence(d, dv, dtype):
    batch, heads = 4, 8
    keys = torch.randn(batch, heads, 100, d, device="cuda")
    state = BetaState(
        H=keys.transpose(-1, -2) @ torch.randn(batch, heads, 100, dv, device="cuda"),
        G=keys.transpose(-1, -2) @ keys,
        tokens_seen=100,
    )
    q_t, k_t = (torch.randn(batch, heads, 1, d, device="cuda", dtype=dtype) for _ in range(2))
    v_t = torch.randn(batch, heads, 1, dv, device="cuda", dtype=dtype)
    want, want_state = beta_decode(q_t, k_t, v_t, state)
    out, h_new, g_new = beta_decode_triton(q_t, k_t, v_t, state.H.clone(), state.G.clone(), inplace=True)
    assert out.dtype == dtype and out.shape == want.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(h_new, want_state.H, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_new, want_state.G, rtol=1e-6, atol=1e-5)
