"""The GPT model and its configs: initialisation, tying, optimizer groups, generation, overrides."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import normattn
from normattn.gpt.config import (
    PRESETS,
    AttentionVariant,
    GPTConfig,
    TrainConfig,
    UsageError,
    attention_variants,
    build_configs,
    parse_attention,
)
from normattn.gpt.model import GPT, sample_next
from normattn.gpt.train import learning_rate


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core runner: one thread avoids OpenMP oversubscription (10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=11)


def test_nanogpt_initialisation_and_weight_tying():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64, vocab_size=80)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - residual) < 0.1 * residual, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) < 0.002, name
    # Tied weights are counted once.
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == model.num_parameters(non_embedding=False)
    assert model.num_parameters() == n_params - 64 * 256


def test_layers_are_pre_layernorm_blocks_with_the_chosen_attention():
    model = GPT(GPTConfig(**{**TINY.__dict__, "normalizer": "beta", "grad": "seed", "backend": "reference"}))
    attn = model.transformer.h[0].attn
    assert (attn.normalizer, attn.grad, attn.backend, attn.causal) == ("beta", "seed", "reference", True)
    assert len(model.transformer.h) == 2


def test_weight_decay_on_two_dimensional_weights_only():
    model = GPT(GPTConfig(**{**TINY.__dict__, "bias": True}))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_forward_loss_and_logits_shapes():
    model = GPT(TINY)
    idx, targets = torch.randint(11, (2, 3, 8))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 8, 11) and loss.shape == ()
    assert abs(loss.item() - math.log(11)) < 0.2  # small init: nearly uniform
    last, none = model(idx)
    assert last.shape == (3, 1, 11) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _random_model(attention: str, dtype=torch.float64, **options) -> GPT:
    torch.manual_seed(1)
    variant = parse_attention(attention).__dict__
    model = GPT(GPTConfig(**{**TINY.__dict__, **variant, **options}))
    with torch.no_grad():  # larger weights than the init (sinks too), so attention patterns and samples vary
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(dtype).eval()


# (attention, GPTConfig options): the beta state, KV caches (windowed, grouped), and sigmoid, which
# cannot decode incrementally and re-runs the forward.
GENERATION = [
    ("softmax", {}),
    ("beta", {}),
    ("beta-seed", {}),
    ("softmax-sinks", {}),
    ("softpick", {}),
    ("sigmoid", {}),
    ("beta", {"n_kv_head": 1}),
    ("softmax-sinks", {"n_kv_head": 1, "window": 3}),
    ("beta", {"window": 3}),
]


@pytest.mark.parametrize(("attention", "options"), GENERATION)
@pytest.mark.parametrize(("prompt", "new"), [(1, 14), (5, 6), (8, 3)])
def test_cached_generation_gives_the_full_forward_tokens(attention, options, prompt, new):
    """Decoding with the KV cache / beta state picks the tokens that re-running the forward picks,
    including after the context slides past block_size (8)."""
    model = _random_model(attention, **options)
    idx = torch.randint(11, (3, prompt))
    outputs = {}
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(5)
        outputs[use_cache] = model.generate(
            idx, new, temperature=1.0, top_k=8, use_cache=use_cache, generator=generator
        )
    assert outputs[True].shape == (3, prompt + new)
    assert torch.equal(outputs[True], outputs[False])
    assert len(set(outputs[True][:, prompt:].flatten().tolist())) > 2  # sampling did vary
    greedy = [model.generate(idx, new, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(*greedy)


def test_cached_generation_float32():
    model = _random_model("beta", torch.float32)
    idx = torch.randint(11, (2, 3))
    tokens = [model.generate(idx, 12, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(*tokens)


def test_only_a_normalizer_that_depends_on_the_number_of_keys_decodes_by_full_forward():
    assert [name for name in attention_variants() if not _random_model(name).decodes_incrementally] == [
        "sigmoid"
    ]
    model = _random_model("sigmoid")
    with pytest.raises(RuntimeError, match="number of keys"):
        model.prefill(torch.randint(11, (1, 3)))


@pytest.mark.parametrize(
    ("attention", "options"), [("softmax", {}), ("beta", {}), ("softmax", {"window": 2})]
)
def test_decode_logits_match_forward_logits(attention, options):
    model = _random_model(attention, **options)
    idx = torch.randint(11, (2, 8))
    full, _ = model(idx, idx)
    logits, states = model.prefill(idx[:, :3])
    torch.testing.assert_close(logits, full[:, 2])
    for t in range(3, 8):
        logits, states = model.decode(idx[:, t : t + 1], states, position=t)
        torch.testing.assert_close(logits, full[:, t])


def test_sample_next_top_k_and_greedy():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    assert sample_next(logits, 0, None, None).item() == 1
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 2.0, 2, generator).item() for _ in range(200)}
    assert draws == {1, 2}


# Configs.


def test_shakespeare_char_preset_is_nanogpts_model(monkeypatch):
    """nanoGPT's config/train_shakespeare_char.py: 6 x 6 x 384, context 256, bias off, and dropout 0.2
    on the residual stream and on the attention weights alike, for every attention layer."""
    preset = PRESETS["shakespeare-char"]
    m = preset.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias) == (6, 6, 384, 256, False)
    assert (m.n_kv_head, m.window, m.sinks, m.dropout, m.attention_dropout) == (None, None, False, 0.2, 0.2)
    model = GPT(replace(m, vocab_size=65, n_layer=2, n_embd=48))  # narrower: the same dropout wiring
    dropouts = {
        name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)
    }
    assert set(dropouts.values()) == {0.2} and len(dropouts) == 1 + 2 * 2  # embedding, attention, MLP
    seen = []
    attention = normattn.nn.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return attention(*args, **kwargs)

    monkeypatch.setattr(normattn.nn, "attention", spy)
    idx = torch.randint(65, (1, 16))
    model.train()(idx, idx)
    model.eval()(idx, idx)
    assert seen == [0.2, 0.2, 0.0, 0.0]
    t = preset.train
    assert (t.batch_size, t.learning_rate, t.min_lr, t.warmup_iters) == (64, 1e-3, 1e-4, 100)
    assert (t.lr_decay_iters, t.max_iters, t.beta2, t.eval_interval, t.eval_iters) == (
        5000,
        10000,
        0.99,
        250,
        200,
    )
    assert preset.reference == {"softmax": (0.7140, 1.6204), "beta": (1.0040, 1.5550)}
    for preset in PRESETS.values():
        preset.model.validate()
        preset.train.validate()


def test_overrides_are_typed():
    model, train = build_configs(
        "shakespeare-char-cpu",
        "beta-seed",
        {"n_layer": "3", "dropout": "0.1", "bias": "true", "learning_rate": "3e-4", "lr_decay_iters": "none"},
    )
    assert (model.n_layer, model.dropout, model.bias, model.normalizer, model.grad) == (
        3,
        0.1,
        True,
        "beta",
        "seed",
    )
    assert train.learning_rate == 3e-4 and train.lr_decay_iters is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_layer": "two"}, "integer"),
        ({"n_layer": "2.5"}, "integer"),
        ({"dropout": "x"}, "number"),
        ({"bias": "maybe"}, "true or false"),
        ({"n_embd": "30", "n_head": "4"}, "divisible"),
        ({"block_size": "0"}, "block_size"),
        ({"dropout": "1.5"}, "dropout"),
        ({"learning_rate": "nan"}, "finite"),
        ({"min_lr": "1"}, "min_lr"),
        ({"beta2": "1"}, "beta2"),
        ({"backend": "cuda"}, "backend"),
        ({"normalizer": "softmax", "grad": "seed"}, "seed"),
        ({"dtype": "int8"}, "dtype"),
        ({"eval_interval": "0"}, "eval_interval"),
        ({"n_layers": "2"}, "unknown config field"),
        ({"n_kv_head": "3"}, "divisible by n_kv_head"),
        ({"n_kv_head": "0"}, "n_kv_head"),
        ({"window": "0"}, "window"),
        ({"attn_dropout": "1"}, "attn_dropout"),
        ({"normalizer": "beta", "sinks": "true"}, "no attention sinks"),
        ({"normalizer": "relu"}, "normalizer must be one of softmax, beta"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(UsageError, match=message):
        build_configs("shakespeare-char-cpu", None, overrides)


def test_attention_names_come_from_the_normalizer_registry(monkeypatch):
    assert list(attention_variants()) == [*normattn.NORMALIZERS, "beta-seed", "softmax-sinks"]
    assert parse_attention("softmax-sinks") == AttentionVariant("softmax", sinks=True)
    assert parse_attention("beta-seed") == AttentionVariant("beta", grad="seed")
    monkeypatch.setitem(normattn.NORMALIZERS, "sigmoid-shifted", normattn.normalizers.sigmoid(bias=-2.0))
    model, _ = build_configs("shakespeare-char-cpu", "sigmoid-shifted")
    assert model.normalizer == "sigmoid-shifted" and model.attention == "sigmoid-shifted"
    model, _ = build_configs("shakespeare-char-cpu", "softmax-sinks", {"n_kv_head": "2", "window": "16"})
    assert (model.sinks, model.n_kv_head, model.window, model.attention) == (True, 2, 16, "softmax-sinks")


def test_unknown_preset_and_attention():
    with pytest.raises(UsageError, match="unknown preset 'gpt9'"):
        build_configs("gpt9")
    with pytest.raises(UsageError, match="unknown attention 'relu'"):
        build_configs("shakespeare-char", "relu")


def test_learning_rate_schedule():
    config = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    lrs = [learning_rate(i, config) for i in range(200)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[110:] == [1e-4] * 90
    assert learning_rate(50, TrainConfig(decay_lr=False, learning_rate=2e-3)) == 2e-3
    # lr_decay_iters unset: the decay spans the run.
    assert learning_rate(99, TrainConfig(max_iters=100, warmup_iters=0)) == pytest.approx(1e-4, rel=1e-2)
