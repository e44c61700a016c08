"""The chunked linear-time beta kernels (backend="triton-linear") under FlashAttention's error rule,
causal and full, exact and seed gradients, Tq != Tk; the fused decode step against the torch
recurrence; a long sequence that must stay finite."""

from __future__ import annotations

import math

import pytest
import torch
from support import HEAD_DIMS, LOW, LOW_PRECISION, WIDE, check_flash_rule, derivatives, dtype_id, randn, sized

import normattn
from normattn.ops.beta_linear.recurrent import BetaState, beta_decode
from normattn.ops.beta_linear.triton_decode import beta_decode_triton

pytestmark = pytest.mark.gpu

# (B, H, Tq, Tk); chunks of 64 do not divide T on the GPU.
REGULAR = sized((2, 4, 1000, 1000), (1, 2, 40, 40))
# causal, Tq < Tk and Tq > Tk (rows that see no key), value dims of their own
UGLY = sized(
    [(1, 2, 300, 700, 80, 72), (1, 2, 700, 300, 64, 48)], [(1, 2, 9, 21, 24, 16), (1, 2, 21, 9, 16, 8)]
)


def _attend(causal: bool, grad: str):
    return lambda backend: (
        lambda q, k, v: normattn.attention(
            q, k, v, normalizer="beta", causal=causal, grad=grad, backend=backend
        )
    )


def _qkv(batch, heads, t_q, t_k, d, dv, dtype):
    return (
        randn(batch, heads, t_q, d, dtype=dtype),
        randn(batch, heads, t_k, d, dtype=dtype),
        randn(batch, heads, t_k, dv, dtype=dtype),
    )


@pytest.mark.parametrize("grad", ["exact", "seed"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_rule(causal, d, dtype, grad):
    """The gradient of the JVP's output is the torch chunked path's (first order is the kernels')."""
    primals = _qkv(*REGULAR, d, d, dtype)
    check_flash_rule(_attend(causal, grad), primals, second_order=grad == "exact", backend="triton-linear")


@pytest.mark.parametrize("shape", UGLY, ids=lambda s: "x".join(map(str, s)))
def test_flash_rule_ugly_shape(shape):
    check_flash_rule(_attend(True, "exact"), _qkv(*shape, LOW), backend="triton-linear")


@pytest.mark.parametrize("dtype", WIDE, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_rule_wide_operands(causal, dtype):
    """float32 on a GPU takes chunks of 32 and narrower feature tiles (triton_chunk.BWD_LAUNCH)."""
    primals = _qkv(*REGULAR, 72, 72, dtype)  # a padded head dim, several feature tiles
    check_flash_rule(_attend(causal, "exact"), primals, backend="triton-linear")


@pytest.mark.parametrize("dtype", sized([torch.bfloat16, torch.float32], [torch.float32]), ids=dtype_id)
@pytest.mark.parametrize("d, dv", sized([(64, 64), (128, 128), (80, 40), (256, 256)], [(16, 16), (24, 8)]))
def test_decode_step_matches_torch_recurrence(d, dv, dtype):
    batch, heads, context = sized((4, 8, 100), (1, 2, 5))
    keys = randn(batch, heads, context, d)
    state = BetaState(
        H=keys.transpose(-1, -2) @ randn(batch, heads, context, dv),
        G=keys.transpose(-1, -2) @ keys,
        tokens_seen=context,
    )
    q_t, k_t = (randn(batch, heads, 1, d, dtype=dtype) for _ in "qk")
    v_t = randn(batch, heads, 1, dv, dtype=dtype)
    want, want_state = beta_decode(q_t, k_t, v_t, state)
    out, h_new, g_new = beta_decode_triton(q_t, k_t, v_t, state.H.clone(), state.G.clone(), inplace=True)
    assert out.dtype == dtype and out.shape == want.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(h_new, want_state.H, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_new, want_state.G, rtol=1e-6, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_long_sequence_stays_finite(dtype):
    """T = 32768: every derivative finite and close to the float32 torch chunked computation."""
    t, d = 32768, 64
    q, k, v = _qkv(1, 2, t, t, d, d, dtype)
    scale = 1 / math.sqrt(d)

    def attend(backend: str):
        return lambda q, k, v: normattn.attention(
            q, k, v, normalizer="beta", causal=True, scale=scale, backend=backend
        )

    cotangent = torch.randn_like(v)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    got = derivatives(attend("triton-linear"), (q, k, v), cotangent, tangents, second_order=False)
    want = derivatives(
        attend("torch"),
        [x.float() for x in (q, k, v)],
        cotangent.float(),
        [x.float() for x in tangents],
        False,
    )
    for name, g in got.items():
        assert not g.isnan().any(), f"{name}: NaN"
        err = (g.float() - want[name]).abs().max().item()
        assert err <= 2e-2 * want[name].abs().max().item(), f"{name}: {err:.3e}"
