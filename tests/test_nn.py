"""``normattn.nn.Attention``: nanoGPT's attention for softmax, the reference for beta, decoding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normattn
from normattn.nn import Attention, KVCache


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core runner: one thread avoids OpenMP oversubscription (10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NanoGPTStyleAttention(nn.Module):
    """Causal self-attention written the way nanoGPT's ``CausalSelfAttention`` computes it (no dropout):
    fused qkv projection, explicit masked softmax of ``q k^T / sqrt(d)``, output projection."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.c_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        h = self.num_heads
        q, k, v = (z.reshape(b, t, h, e // h).transpose(1, 2) for z in self.c_attn(x).split(e, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(e // h)
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, e))


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k.startswith(("c_attn", "c_proj"))})


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("tokens", "embed_dim", "heads"), [(1, 48, 2), (63, 48, 2), (257, 144, 2), (40, 72, 3)]
)
def test_softmax_matches_nanogpt_attention(tokens, embed_dim, heads, bias):
    ours = Attention(embed_dim, heads, normalizer="softmax", bias=bias)
    theirs = NanoGPTStyleAttention(embed_dim, heads, bias)
    _copy_weights(ours, theirs)
    x = torch.randn(2, tokens, embed_dim, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=2e-6)
    (g_ours,) = torch.autograd.grad((y_ours * y_theirs.detach()).sum(), x)
    (g_theirs,) = torch.autograd.grad((y_theirs * y_theirs.detach()).sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5)
    # A different layer must not pass: the comparison has teeth.
    other = Attention(embed_dim, heads, normalizer="beta", bias=bias)
    _copy_weights(ours, other)
    if tokens > 1:
        assert not torch.allclose(other(x), y_theirs, atol=1e-3)


def _beta_by_hand(layer: Attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """``beta(x) = x / (1 + ||x||)`` on each row of masked scores, materialized."""
    b, t, e = x.shape
    h = layer.num_heads
    q, k, v = (z.reshape(b, t, h, e // h).transpose(1, 2) for z in layer.c_attn(x).split(e, dim=2))
    s = (q @ k.transpose(-2, -1)) / math.sqrt(e // h)
    if causal:
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0)
    w = s / (1 + s.norm(dim=-1, keepdim=True))
    return layer.c_proj((w @ v).transpose(1, 2).reshape(b, t, e))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("grad", ["exact", "seed"])
def test_beta_matches_materialized_formula(causal, grad):
    layer = Attention(48, 2, normalizer="beta", causal=causal, grad=grad).double()
    x = torch.randn(2, 63, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _beta_by_hand(layer, x, causal))


def test_seed_gradient_differs_from_exact():
    exact = Attention(32, 2, normalizer="beta").double()
    seed = Attention(32, 2, normalizer="beta", grad="seed").double()
    seed.load_state_dict(exact.state_dict())
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    grads = []
    for layer in (exact, seed):
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append(layer.c_attn.weight.grad.clone())
    assert not torch.allclose(*grads, rtol=1e-3)


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_backend_is_passed_through(backend):
    layer = Attention(32, 4, normalizer="softmax", backend=backend)
    x = torch.randn(2, 9, 32)
    reference = Attention(32, 4, normalizer="softmax", backend="reference")
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-6)


def test_output_dropout_only_in_training():
    layer = Attention(32, 4, normalizer="softmax", dropout=0.5)
    x = torch.randn(2, 9, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("normalizer", ["softmax", "beta"])
@pytest.mark.parametrize("prompt", [1, 5, 24])
def test_prefill_then_decode_matches_forward(normalizer, prompt):
    layer = Attention(48, 3, normalizer=normalizer).double().eval()
    x = torch.randn(2, 24 + 6, 48, dtype=torch.float64)
    full = layer(x)
    y, state = layer.prefill(x[:, :prompt])
    torch.testing.assert_close(y, full[:, :prompt])
    for t in range(prompt, x.shape[1]):
        y_t, state = layer.decode(x[:, t : t + 1], state)
        torch.testing.assert_close(y_t, full[:, t : t + 1])
    if normalizer == "softmax":
        assert isinstance(state, KVCache) and len(state) == x.shape[1]


def test_attention_under_cpu_autocast_runs_in_bf16():
    layer = Attention(32, 4, normalizer="beta")
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 30, "num_heads": 4, "normalizer": "softmax"}, "divisible"),
        ({"embed_dim": 0, "num_heads": 1, "normalizer": "softmax"}, "positive"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "relu"}, "normalizer"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "softmax", "grad": "seed"}, "seed"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "backend": "cuda"}, "backend"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attention(**kwargs)


def test_decoding_needs_causal():
    layer = Attention(32, 4, normalizer="softmax", causal=False)
    with pytest.raises(RuntimeError, match="causal"):
        layer.prefill(torch.randn(1, 3, 32))


def test_normattn_attention_is_what_the_layer_calls():
    layer = Attention(32, 4, normalizer="beta", causal=False)
    x = torch.randn(2, 5, 32)
    q, k, v = layer._heads(x)
    y = normattn.attention(q, k, v, normalizer="beta", causal=False)
    torch.testing.assert_close(layer(x), layer.c_proj(y.transpose(1, 2).reshape(2, 5, 32)))
