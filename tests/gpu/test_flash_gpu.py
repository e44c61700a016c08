"""Triton flash kernels on a CUDA device, in the precisions they are built for.

FlashAttention's acceptance rule: against a float64 reference, the kernel's error may be at most
2x (forward) or 3x (gradients, JVP) the error of the plain PyTorch reference run in the same
dtype, plus a tiny floor. Shapes up to T = 4096, head dims 64, 80, 128 and 256.
"""

from __future__ import annotations

import pytest
import torch

import normattn

pytestmark = pytest.mark.gpu

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _passes(backend, normalizer, causal, q, k, v, do, tangents, grad="exact"):
    def fn(q, k, v):
        return normattn.attention(q, k, v, normalizer=normalizer, causal=causal, grad=grad, backend=backend)

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    dq, dk, dv = torch.autograd.grad(o, leaves, do)
    _, od = torch.func.jvp(fn, (q, k, v), tangents)
    return {"out": o.detach(), "dq": dq, "dk": dk, "dv": dv, "jvp": od}


def _inputs(b, h, t_q, t_k, d, d_v, dtype):
    q = torch.randn(b, h, t_q, d, device="cuda", dtype=dtype)
    k = torch.randn(b, h, t_k, d, device="cuda", dtype=dtype)
    v = torch.randn(b, h, t_k, d_v, device="cuda", dtype=dtype)
    do = torch.randn(b, h, t_q, d_v, device="cuda", dtype=dtype)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    return q, k, v, do, tangents


def _assert_flash_rule(normalizer, causal, q, k, v, do, tangents, grad="exact"):
    kernel = _passes("triton", normalizer, causal, q, k, v, do, tangents, grad)
    same_dtype = _passes("reference", normalizer, causal, q, k, v, do, tangents, grad)
    exact = _passes(
        "reference", normalizer, causal, *(x.double() for x in (q, k, v)), do.double(),
        tuple(t.double() for t in tangents), grad,
    )  # fmt: skip
    for name, want in exact.items():
        got = kernel[name]
        assert got.dtype == q.dtype and got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        baseline = (same_dtype[name].double() - want).abs().max().item()
        factor = 2.0 if name == "out" else 3.0
        floor = 1e-5 * want.abs().max().item() + 1e-7
        assert err <= factor * baseline + floor, f"{name}: kernel {err:.3g} vs torch-{q.dtype} {baseline:.3g}"


# (B, H, Tq, Tk, d, dv); every (head dim, normalizer, causal, dtype) compiles its own kernels
SHAPES = [
    pytest.param((2, 4, 128, 128, 64, 64), id="T128-d64"),
    pytest.param((1, 4, 1000, 1000, 80, 80), id="T1000-d80"),
    pytest.param((1, 2, 4096, 4096, 128, 128), id="T4096-d128"),
    pytest.param((1, 2, 512, 512, 256, 256), id="T512-d256"),
    pytest.param((2, 2, 300, 517, 64, 64), id="Tq300-Tk517-d64"),
    pytest.param((2, 2, 517, 300, 128, 128), id="Tq517-Tk300-d128"),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_rule(shape, normalizer, causal, dtype):
    torch.manual_seed(0)
    _assert_flash_rule(normalizer, causal, *_inputs(*shape, dtype))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]])
def test_flash_rule_float32(shape, normalizer, causal):
    torch.manual_seed(0)
    _assert_flash_rule(normalizer, causal, *_inputs(*shape.values[0], torch.float32))


def test_value_dim_differs_from_head_dim():
    torch.manual_seed(0)
    _assert_flash_rule("softmax", True, *_inputs(2, 2, 300, 517, 64, 32, torch.bfloat16))
    _assert_flash_rule("beta", True, *_inputs(2, 2, 517, 300, 64, 32, torch.bfloat16))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seed_mode_flash_rule(causal, dtype):
    torch.manual_seed(0)
    _assert_flash_rule("beta", causal, *_inputs(2, 4, 1024, 1024, 64, 64, dtype), grad="seed")


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_non_contiguous_and_empty_rows(normalizer):
    torch.manual_seed(0)
    b, h, t_q, t_k, d = 2, 4, 700, 500, 64
    q = torch.randn(b, t_q, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, t_k, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(b, t_k, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    do = torch.randn(b, t_q, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    _assert_flash_rule(normalizer, True, q, k, v, do, tangents)
    out = _passes("triton", normalizer, True, q, k, v, do, tangents)
    for name in ("out", "dq", "jvp"):
        assert torch.equal(out[name][:, :, : t_q - t_k], torch.zeros_like(out[name][:, :, : t_q - t_k])), name


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_backward_is_deterministic(normalizer, d):
    torch.manual_seed(0)
    q, k, v, do, _ = _inputs(2, 8, 2048, 2048, d, d, torch.bfloat16)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def grads():
        o = normattn.attention(*leaves, normalizer=normalizer, causal=True, backend="triton")
        return torch.autograd.grad(o, leaves, do)

    first, second = grads(), grads()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_huge_scores_stay_finite(normalizer):
    torch.manual_seed(0)
    q, k, v, do, tangents = _inputs(1, 2, 512, 512, 64, 64, torch.bfloat16)
    q, k = 100 * q, 100 * k  # |s| ~ 1e4 at d = 64
    out = _passes("triton", normalizer, True, q, k, v, do, tangents)
    for name, x in out.items():
        assert torch.isfinite(x).all(), name
