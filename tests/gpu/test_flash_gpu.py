"""The fused flash kernels (backend="triton") for every registry normalizer with Triton helpers:
forward, gradients, JVP and the gradient of the JVP's output, under FlashAttention's error rule in
bf16 and fp16; the call's features (grouped-query heads, masks, dropout, sinks, windows, the seed
gradient) and their combination; no NaN at extreme scores; a deterministic backward."""

from __future__ import annotations

import pytest
import torch
from support import (
    DEVICE,
    HEAD_DIMS,
    LOW,
    LOW_PRECISION,
    NORMALIZERS,
    WIDE,
    check_flash_rule,
    derivatives,
    dtype_id,
    randn,
    sized,
)

import normattn

pytestmark = pytest.mark.gpu

# (B, H, H_kv, Tq, Tk, dv): the regular shape at every head dim of HEAD_DIMS.
REGULAR = sized((2, 4, 4, 256, 256), (1, 2, 2, 24, 24))
# Tq != Tk, nothing a multiple of a tile, head dim 80 padded to 128 and a value dim of its own.
UGLY = sized((1, 3, 3, 300, 517, 80, 72), (1, 2, 2, 9, 21, 24, 16))
FEATURE_HEAD_DIM = HEAD_DIMS[0]


def _qkv(batch, heads, kv_heads, t_q, t_k, d, dv, dtype):
    return (
        randn(batch, heads, t_q, d, dtype=dtype),
        randn(batch, kv_heads, t_k, d, dtype=dtype),
        randn(batch, kv_heads, t_k, dv, dtype=dtype),
    )


def _attend(normalizer: str, **options):
    """``attend(backend) -> f(q, k, v)``; a dropout call draws from a fresh generator every time, so
    that every backend and pass sees the same bits."""

    def attend(backend: str):
        def f(q, k, v):
            extra = {}
            if options.get("dropout_p"):
                extra["generator"] = torch.Generator(device=DEVICE).manual_seed(5)
            sinks = options.get("sinks")
            if sinks is not None:
                extra["sinks"] = sinks.to(q.dtype)
            rest = {key: value for key, value in options.items() if key != "sinks"}
            return normattn.attention(q, k, v, normalizer=normalizer, backend=backend, **rest, **extra)

        return f

    return attend


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_flash_rule(normalizer, causal, d, dtype):
    check_flash_rule(_attend(normalizer, causal=causal), _qkv(*REGULAR, d, d, dtype))


@pytest.mark.parametrize("dtype", WIDE, ids=dtype_id)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_flash_rule_wide_operands(normalizer, d, dtype):
    """float32 takes the 4/8-byte rows of the tile table and 3xTF32 products."""
    check_flash_rule(_attend(normalizer, causal=True), _qkv(*REGULAR, d, d, dtype))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_flash_rule_ugly_shape(normalizer, causal):
    check_flash_rule(_attend(normalizer, causal=causal), _qkv(*UGLY, LOW))


def _feature_options(feature: str, heads: int, t_q: int, t_k: int) -> dict:
    if feature == "gqa":
        return {"enable_gqa": True}
    if feature == "mask":
        generator = torch.Generator().manual_seed(3)
        return {"attn_mask": (torch.rand(2, 1, t_q, t_k, generator=generator) < 0.7).to(DEVICE)}
    if feature == "dropout":
        return {"dropout_p": 0.2}
    if feature == "sinks":
        return {"sinks": randn(heads)}
    if feature == "window":
        return {"window": (t_k // 3, None)}
    return {"grad": "seed"}


# Each feature with every normalizer that takes it (sinks: softmax; the seed gradient: beta).
FEATURE_CASES = [
    ("gqa", name) for name in NORMALIZERS
] + [
    (feature, name) for feature in ("mask", "dropout", "window") for name in NORMALIZERS
] + [("sinks", "softmax"), ("seed", "beta")]  # fmt: skip


@pytest.mark.parametrize("feature, normalizer", FEATURE_CASES, ids=[f"{f}-{n}" for f, n in FEATURE_CASES])
def test_feature(feature, normalizer):
    batch, heads, _, t_q, t_k = REGULAR
    kv_heads = heads // 2 if feature == "gqa" else heads
    options = {"causal": True, **_feature_options(feature, heads, t_q, t_k)}
    primals = _qkv(2, heads, kv_heads, t_q, t_k, FEATURE_HEAD_DIM, FEATURE_HEAD_DIM, LOW)
    check_flash_rule(_attend(normalizer, **options), primals, second_order=feature != "seed")


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_every_feature_at_once(normalizer):
    """Grouped heads, a mask, dropout, a window and sinks (softmax) in one call, Tq != Tk."""
    _, heads, _, t_q, t_k, _, _ = UGLY
    heads = 2 * heads
    options = {"causal": True, "enable_gqa": True}
    for feature in ("mask", "dropout", "window") + (("sinks",) if normalizer == "softmax" else ()):
        options |= _feature_options(feature, heads, t_q, t_k)
    primals = _qkv(2, heads, heads // 2, t_q, t_k, FEATURE_HEAD_DIM, FEATURE_HEAD_DIM, LOW)
    check_flash_rule(_attend(normalizer, **options), primals)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_extreme_scores_stay_finite(normalizer):
    """|s| ~ 1e4: the shifted normalizers' running max and the others' sums must not overflow."""
    q, k, v = _qkv(*REGULAR, FEATURE_HEAD_DIM, FEATURE_HEAD_DIM, LOW)
    attend = _attend(normalizer, causal=True)("triton")
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    result = derivatives(attend, (100 * q, 100 * k, v), torch.randn_like(q), tangents, second_order=False)
    for name, x in result.items():
        assert not x.isnan().any(), f"{name}: NaN"


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
def test_backward_is_deterministic(normalizer):
    q, k, v = _qkv(*REGULAR, HEAD_DIMS[-1], HEAD_DIMS[-1], LOW)
    attend = _attend(normalizer, causal=True)("triton")
    cotangent = torch.randn_like(q)
    first, second = (derivatives(attend, (q, k, v), cotangent, [q, k, v], second_order=False) for _ in "ab")
    for name in ("dq", "dk", "dv"):
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_flash_rule_long_sequence(normalizer):
    check_flash_rule(_attend(normalizer, causal=True), _qkv(1, 2, 2, 4096, 4096, 128, 128, LOW))


@pytest.mark.slow
@pytest.mark.parametrize("d", [16, 24, 32, 72, 96, 192, 256])
def test_flash_rule_every_head_dim(d):
    check_flash_rule(_attend("softmax", causal=True), _qkv(*REGULAR, d, d, LOW))
