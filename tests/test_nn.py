"""``normattn.nn.Attention``: nanoGPT's attention for softmax, the reference for beta, grouped-query
heads, sliding windows, sinks, attention dropout, decoding."""

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


def test_dropout_only_in_training():
    layer = Attention(32, 4, normalizer="softmax", dropout=0.5)
    assert layer.attn_dropout == 0.5  # nanoGPT's one p for the weights and the residual
    x = torch.randn(2, 9, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_attention_dropout_is_normattn_dropout_on_the_weights():
    """In training the layer is ``normattn.attention(..., dropout_p=attn_dropout)`` (same bits for the
    same generator state); in eval mode, and with attn_dropout=0, no dropout at all."""
    layer = Attention(32, 4, normalizer="softmax", dropout=0.0, attn_dropout=0.4)
    x = torch.randn(2, 9, 32)
    q, k, v = layer._heads(x)
    merge = lambda y: layer.c_proj(y.transpose(1, 2).reshape(2, 9, 32))
    torch.manual_seed(3)
    dropped = merge(normattn.attention(q, k, v, causal=True, dropout_p=0.4))
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), dropped)
    plain = merge(normattn.attention(q, k, v, causal=True))
    assert not torch.allclose(dropped, plain, atol=1e-3)
    torch.testing.assert_close(layer.eval()(x), plain)
    no_attn_dropout = Attention(32, 4, normalizer="softmax", dropout=0.4, attn_dropout=0.0)
    no_attn_dropout.load_state_dict(layer.state_dict())
    no_attn_dropout.resid_dropout.p = 0.0  # leave only the attention dropout, which is off
    torch.testing.assert_close(no_attn_dropout.train()(x), plain)


def _softmax_by_hand(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention materialized, with the layer's grouped heads, window and sinks."""
    b, t, e = x.shape
    h, h_kv, d = layer.num_heads, layer.num_kv_heads, e // layer.num_heads
    q, k, v = layer.c_attn(x).split((e, h_kv * d, h_kv * d), dim=2)
    q = q.reshape(b, t, h, d).transpose(1, 2)
    k, v = (z.reshape(b, t, h_kv, d).transpose(1, 2).repeat_interleave(h // h_kv, dim=1) for z in (k, v))
    s = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = (j <= i) & (i - j < (layer.window or t))
    s = s.masked_fill(~visible, float("-inf"))
    if layer.sinks is not None:  # one more key of logit sinks_h and value 0
        s = torch.cat([s, layer.sinks.view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1)
    w = F.softmax(s, dim=-1)[..., :t]
    return layer.c_proj((w @ v).transpose(1, 2).reshape(b, t, e))


@pytest.mark.parametrize(
    "options",
    [
        {"num_kv_heads": 2},
        {"num_kv_heads": 1},
        {"window": 4},
        {"sinks": True},
        {"num_kv_heads": 2, "window": 1},
    ],
)
def test_grouped_heads_window_and_sinks_match_the_materialized_softmax(options):
    layer = Attention(64, 4, normalizer="softmax", **options).double()
    if layer.sinks is not None:
        assert torch.equal(layer.sinks, torch.zeros(4))  # initialised as the off-by-one softmax
        with torch.no_grad():
            layer.sinks.copy_(torch.tensor([-1.0, 0.0, 1.0, 3.0]))
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, _softmax_by_hand(layer, x))
    kv_width = 2 * layer.num_kv_heads * 16
    assert layer.c_attn.weight.shape == (64 + kv_width, 64)
    if layer.sinks is not None:  # the sinks learn
        (grad,) = torch.autograd.grad(y.square().sum(), layer.sinks)
        assert grad.abs().min() > 0


def test_grouped_heads_equal_full_heads_with_repeated_key_value_weights():
    grouped = Attention(48, 4, normalizer="beta", num_kv_heads=2).double()
    full = Attention(48, 4, normalizer="beta").double()
    q_w, k_w, v_w = grouped.c_attn.weight.split((48, 24, 24))
    repeat = lambda w: w.view(2, 12, 48).repeat_interleave(2, dim=0).reshape(48, 48)
    with torch.no_grad():
        full.c_attn.weight.copy_(torch.cat([q_w, repeat(k_w), repeat(v_w)]))
        full.c_proj.weight.copy_(grouped.c_proj.weight)
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    torch.testing.assert_close(grouped(x), full(x))


DECODING = [
    ("softmax", {}),
    ("beta", {}),
    ("softpick", {}),
    ("softmax", {"sinks": True}),
    ("softmax", {"num_kv_heads": 1}),
    ("beta", {"num_kv_heads": 1}),
    ("softmax", {"window": 5}),
    ("beta", {"window": 5, "num_kv_heads": 1}),
]


@pytest.mark.parametrize(("normalizer", "options"), DECODING)
@pytest.mark.parametrize("prompt", [1, 5, 24])
def test_prefill_then_decode_matches_forward(normalizer, options, prompt):
    layer = Attention(48, 3, normalizer=normalizer, **options).double().eval()
    if layer.sinks is not None:
        with torch.no_grad():
            layer.sinks.normal_()
    x = torch.randn(2, 24 + 6, 48, dtype=torch.float64)
    full = layer(x)
    y, state = layer.prefill(x[:, :prompt])
    torch.testing.assert_close(y, full[:, :prompt])
    for t in range(prompt, x.shape[1]):
        y_t, state = layer.decode(x[:, t : t + 1], state)
        torch.testing.assert_close(y_t, full[:, t : t + 1])
    if normalizer == "beta" and "window" not in options:
        assert isinstance(state, normattn.BetaState)  # constant size, whatever the context
    else:
        assert isinstance(state, KVCache) and len(state) == min(x.shape[1], options.get("window", x.shape[1]))
        assert state.k.shape[1] == layer.num_kv_heads


def test_a_normalizer_that_depends_on_the_number_of_keys_refuses_to_decode():
    layer = Attention(32, 4, normalizer="sigmoid").eval()
    assert not layer.decodes_incrementally
    with pytest.raises(RuntimeError, match="number of keys"):
        layer.prefill(torch.randn(1, 3, 32))
    fixed_bias = Attention(32, 4, normalizer=normattn.normalizers.sigmoid(bias=-2.0)).double().eval()
    assert fixed_bias.decodes_incrementally
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    _, state = fixed_bias.prefill(x[:, :5])
    y_t, _ = fixed_bias.decode(x[:, 5:], state)
    torch.testing.assert_close(y_t, fixed_bias(x)[:, 5:])


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
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "attn_dropout": -0.1}, "attn_dropout"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "num_kv_heads": 3}, "divisible"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "num_kv_heads": 0}, "num_kv_heads"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "window": 0}, "window"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "window": 4, "causal": False}, "causal"),
        ({"embed_dim": 32, "num_heads": 4, "normalizer": "beta", "sinks": True}, "sinks"),
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
