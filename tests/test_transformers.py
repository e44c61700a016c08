"""The Hugging Face transformers integration: tiny random models built locally, no download."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("transformers", minversion="5.17")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DynamicCache,
    GPT2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)
from transformers.masking_utils import sdpa_mask  # noqa: E402

import normattn  # noqa: E402
from normattn.integrations.transformers import (  # noqa: E402
    IMPLEMENTATIONS,
    attention_forward,
    bottom_right_causal_mask,
    register,
)

VOCAB = 96
T = 12
PADDING = 3  # left padding of the second sequence
SLIDING_WINDOW = 4  # Mistral's window, shorter than T so that it removes keys
TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    **TOKENS,
)

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(num_key_value_heads=2, **DECODER),
    "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **DECODER),
    "mistral": lambda: MistralConfig(num_key_value_heads=2, sliding_window=SLIDING_WINDOW, **DECODER),
    "gpt2": lambda: GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **TOKENS
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()


def build(
    config: PretrainedConfig, implementation: str, like: PreTrainedModel | None = None
) -> PreTrainedModel:
    """A model with its own copy of ``config`` (transformers stores the implementation in it), with
    the weights of ``like`` when given."""
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def batch(padding: str | None = "left") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two sequences of ``T`` tokens, the second padded by ``PADDING`` on the side given (or None)."""
    ids = torch.randint(3, VOCAB, (2, T))
    if padding is None:
        return ids, None
    attention_mask = torch.ones(2, T, dtype=torch.long)
    pad = slice(0, PADDING) if padding == "left" else slice(T - PADDING, T)
    attention_mask[1, pad] = 0
    ids[1, pad] = 0
    return ids, attention_mask


def loss_and_gradients(
    model: PreTrainedModel, ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)
    output = model(ids, attention_mask=attention_mask, labels=labels)
    model.zero_grad()
    output.loss.backward()
    return output.logits.detach(), output.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        error = (actual[name] - grad).abs().max().item()
        assert error <= 1e-4 * grad.abs().max().item() + 1e-9, f"{name}: gradient off by {error}"


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("model_name", list(CONFIGS))
def test_softmax_matches_sdpa(model_name: str, padding: str | None) -> None:
    config = CONFIGS[model_name]()
    reference = build(config, "sdpa")
    model = build(config, "normattn", like=reference)
    ids, attention_mask = batch(padding)
    logits, loss, grads = loss_and_gradients(model, ids, attention_mask)
    ref_logits, ref_loss, ref_grads = loss_and_gradients(reference, ids, attention_mask)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    assert_gradients_close(grads, ref_grads)


def test_bidirectional_config_matches_sdpa() -> None:
    """``config.is_causal = False`` reaches the attention as ``is_causal``; masks then hold only padding."""
    config = CONFIGS["llama"]()
    config.is_causal = False
    reference = build(config, "sdpa")
    model = build(config, "normattn", like=reference)
    causal = build(CONFIGS["llama"](), "normattn", like=reference)
    for padding in (None, "left"):
        ids, attention_mask = batch(padding)
        with torch.no_grad():
            logits, ref_logits, causal_logits = (
                m(ids, attention_mask=attention_mask).logits for m in (model, reference, causal)
            )
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        assert (logits - causal_logits).abs().max() > 1e-3


def test_mistral_sliding_window_is_honoured() -> None:
    """The window changes the logits (so the comparison with SDPA above is one that can fail)."""
    config = CONFIGS["mistral"]()
    windowed = build(config, "normattn")
    unwindowed_config = copy.deepcopy(config)
    unwindowed_config.sliding_window = None
    unwindowed = build(unwindowed_config, "normattn", like=windowed)
    ids, attention_mask = batch()
    with torch.no_grad():
        logits = windowed(ids, attention_mask=attention_mask).logits
        full = unwindowed(ids, attention_mask=attention_mask).logits
    # positions that see no more than the window agree; later ones do not
    torch.testing.assert_close(logits[0, :SLIDING_WINDOW], full[0, :SLIDING_WINDOW], rtol=0, atol=1e-6)
    assert (logits[0, SLIDING_WINDOW:] - full[0, SLIDING_WINDOW:]).abs().amax(-1).min() > 1e-4


def test_gpt_oss_sinks_match_eager() -> None:
    """gpt-oss keeps per-head sink logits in ``module.sinks``; it has no SDPA path, so against eager."""
    config = GptOssConfig(
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        **DECODER,
    )
    reference = build(config, "eager")
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.sinks.normal_()  # initialised to zero-mean noise; make them matter
    model = build(config, "normattn", like=reference)
    ids, attention_mask = batch()
    logits, _, grads = loss_and_gradients(model, ids, attention_mask)
    ref_logits, _, ref_grads = loss_and_gradients(reference, ids, attention_mask)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert_gradients_close(grads, ref_grads)
    assert ref_grads["model.layers.0.self_attn.sinks"].abs().max() > 0

    with pytest.raises(ValueError, match="sinks"):
        build(config, "normattn-beta", like=reference)(ids)


@pytest.mark.parametrize(
    ("model_name", "cache", "padding"),
    [
        ("llama", "dynamic", "left"),
        ("qwen2", "dynamic", "left"),
        ("mistral", "dynamic", "left"),
        ("gpt2", "dynamic", "left"),
        ("llama", "static", "left"),
        ("llama", "static", None),
    ],
)
def test_batched_greedy_generation_matches_sdpa(model_name: str, cache: str, padding: str | None) -> None:
    """A growing KV cache (Tq = 1 < Tk) after left-padded prompts, or a static cache, whose empty
    slots after the prompt only the mask removes (SDPA's top-left is_causal does without one)."""
    config = CONFIGS[model_name]()
    reference = build(config, "sdpa")
    model = build(config, "normattn", like=reference)
    ids, attention_mask = batch(padding)
    kwargs = dict(
        attention_mask=attention_mask,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        cache_implementation=cache,
        return_dict_in_generate=True,
        output_scores=True,
    )
    out = model.generate(ids, **kwargs)
    ref = reference.generate(ids, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=0, atol=1e-5)


# Sigmoid's default bias, -log(Tk), depends on how many keys a call has, so a cached step (fewer keys
# than a full pass, or a static cache's empty slots) is a different computation by definition.
CACHE_CONSISTENT = ["normattn", "normattn-beta", "normattn-softpick"]


@pytest.mark.parametrize("implementation", CACHE_CONSISTENT)
@pytest.mark.parametrize("model_name", ["llama", "mistral"])
def test_several_new_tokens_against_a_cache_align_bottom_right(model_name: str, implementation: str) -> None:
    """Tq = 4 new tokens after 8 cached ones (Tq != Tk > 1): exactly the last rows of one full pass.

    SDPA's top-left ``is_causal`` would let the new tokens see only the first keys; Mistral's
    window then also slides over the cache.
    """
    model = build(CONFIGS[model_name](), implementation)
    ids, _ = batch(None)
    # the cache goes by position: its keyword is past_key_values in 5.17 and cache in later releases
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(ids).logits
        model(ids[:, :8], None, None, cache)
        continued = model(ids[:, 8:], None, None, cache).logits
    torch.testing.assert_close(continued, full[:, 8:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("implementation", CACHE_CONSISTENT[1:])
def test_cached_generation_equals_recomputation(implementation: str) -> None:
    """Left-padded greedy generation with a dynamic or static cache equals recomputing every step."""
    model = build(CONFIGS["llama"](), implementation)
    ids, attention_mask = batch()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), recomputed)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), recomputed)


def test_mask_is_left_implicit_only_where_bottom_right_causal_is_exact() -> None:
    common = dict(batch_size=1, attention_mask=None)
    # the last query on the last key (no cache, or decoding with a dynamic one): plain causal
    assert bottom_right_causal_mask(q_length=5, kv_length=5, q_offset=0, **common) is None
    assert bottom_right_causal_mask(q_length=1, kv_length=5, q_offset=4, **common) is None
    # prefill into an empty static cache: SDPA skips the mask for its top-left is_causal; we do not
    assert sdpa_mask(q_length=3, kv_length=5, q_offset=0, **common) is None
    mask = bottom_right_causal_mask(q_length=3, kv_length=5, q_offset=0, **common)
    assert torch.equal(mask[0, 0], torch.ones(3, 5, dtype=torch.bool).tril())
    # a tensor offset (static caches during decoding) always gets the mask
    mask = bottom_right_causal_mask(q_length=1, kv_length=5, q_offset=torch.tensor(2), **common)
    assert torch.equal(mask[0, 0, 0], torch.tensor([True, True, True, False, False]))


@pytest.mark.parametrize("implementation", [n for n in IMPLEMENTATIONS if n != "normattn"])
def test_other_normalizers_train(implementation: str) -> None:
    torch.manual_seed(0)
    model = build(CONFIGS["llama"](), implementation)
    model.train()
    ids, attention_mask = batch()
    labels = ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


def test_dropout_only_in_training_mode() -> None:
    config = CONFIGS["llama"]()
    config.attention_dropout = 0.5
    model = build(config, "normattn-beta")
    ids, attention_mask = batch()
    model.eval()
    with torch.no_grad():
        evaluated = model(ids, attention_mask=attention_mask).logits
        model.train()
        torch.manual_seed(1)
        dropped = model(ids, attention_mask=attention_mask).logits
        torch.manual_seed(1)
        repeated = model(ids, attention_mask=attention_mask).logits
    assert (dropped - evaluated).abs().max() > 1e-3
    torch.testing.assert_close(dropped, repeated, rtol=0, atol=0)

    # a dropout rate reaching the function of a module in eval mode is ignored, as eager does
    attention = model.model.layers[0].self_attn.eval()
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    kept, _ = attention_forward(attention, q, k, v, None, dropout=0.5, normalizer="beta")
    plain, _ = attention_forward(attention, q, k, v, None, dropout=0.0, normalizer="beta")
    torch.testing.assert_close(kept, plain, rtol=0, atol=0)


def embeddings_and_tangent(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, attention_mask = batch()
    embeddings = model.get_input_embeddings()(ids).detach()
    return embeddings, torch.randn_like(embeddings), attention_mask


def logits_jvp(
    model: PreTrainedModel, embeddings: torch.Tensor, tangent: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The derivative of the logits along ``tangent`` of the input embeddings, by ``torch.func.jvp``."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=x, attention_mask=attention_mask).logits

    return torch.func.jvp(logits, (embeddings,), (tangent,))[1]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_jvp_through_the_model_matches_finite_differences(implementation: str) -> None:
    """Forward mode through a whole model in float64 (GPT-2: every op stays in float64)."""
    model = build(CONFIGS["gpt2"](), implementation).double()
    embeddings, tangent, attention_mask = embeddings_and_tangent(model)

    jvp = logits_jvp(model, embeddings, tangent, attention_mask)
    eps = 1e-6
    with torch.no_grad():
        plus, minus = (
            model(inputs_embeds=embeddings + sign * eps * tangent, attention_mask=attention_mask).logits
            for sign in (1, -1)
        )
    torch.testing.assert_close(jvp, (plus - minus) / (2 * eps), rtol=0, atol=1e-7 * jvp.abs().max().item())


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_gradient_of_a_jvp_matches_plain_autograd(
    implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consistency-model use: a loss on the JVP's tangent, backpropagated to the weights.

    The yardstick is the same model with normattn's materialized reference backend (plain
    autograd). Finite differences would not do here: torch 2.13's own layer_norm, in every GPT-2
    block, gets the gradient of its JVP wrong (cf. pytorch/pytorch#196700), on both sides alike.
    """
    model = build(CONFIGS["gpt2"](), implementation).double()
    embeddings, tangent, attention_mask = embeddings_and_tangent(model)
    projection = torch.randn(2, T, VOCAB, dtype=torch.float64)

    def gradients_of_tangent_loss() -> dict[str, torch.Tensor]:
        model.zero_grad()
        (projection * logits_jvp(model, embeddings, tangent, attention_mask)).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    grads = gradients_of_tangent_loss()
    monkeypatch.setattr(normattn, "attention", functools.partial(normattn.attention, backend="reference"))
    ref_grads = gradients_of_tangent_loss()
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-9 * scale, msg=name)


def test_jvp_with_grouped_query_heads_matches_eager() -> None:
    """Llama (GQA; its RMSNorm computes in float32, too coarse for finite differences): against eager.

    Eager attention gives left padding's query rows, which see no key, a uniform average where
    normattn (and SDPA) give 0, so only real tokens are compared.
    """
    config = CONFIGS["llama"]()
    reference = build(config, "eager")
    model = build(config, "normattn", like=reference)
    embeddings, tangent, attention_mask = embeddings_and_tangent(model)
    jvp, ref_jvp = (logits_jvp(m, embeddings, tangent, attention_mask) for m in (model, reference))
    tokens = attention_mask.bool()
    torch.testing.assert_close(jvp[tokens], ref_jvp[tokens], rtol=0, atol=1e-5)


def test_one_implementation_per_registered_normalizer() -> None:
    from transformers import AttentionInterface

    names = register()
    assert {"normattn", "normattn-beta", "normattn-sigmoid", "normattn-softpick"} <= set(names)
    assert sorted(IMPLEMENTATIONS.values()) == sorted(normattn.NORMALIZERS)
    for name in names:
        assert name in AttentionInterface._global_mapping


def test_set_attn_implementation_switches_a_model() -> None:
    config = CONFIGS["qwen2"]()
    model = build(config, "sdpa")
    beta = build(config, "normattn-beta", like=model)
    ids, attention_mask = batch()
    with torch.no_grad():
        sdpa_logits, beta_logits = (m(ids, attention_mask=attention_mask).logits for m in (model, beta))
        model.set_attn_implementation("normattn-beta")
        assert model.config._attn_implementation == "normattn-beta"
        switched = model(ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(switched, beta_logits, rtol=0, atol=0)
        assert (beta_logits - sdpa_logits).abs().max() > 1e-3
        model.set_attn_implementation("normattn")
        switched_back = model(ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(switched_back, sdpa_logits, rtol=0, atol=1e-5)


def test_output_attentions_is_refused() -> None:
    config = CONFIGS["llama"]()
    model = build(config, "normattn")
    ids, _ = batch(None)
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    # transformers refuses to set it on the config of a model with another implementation, but a
    # model switched from eager keeps it
    eager = build(config, "eager")
    eager.config.output_attentions = True
    eager.set_attn_implementation("normattn")
    with pytest.raises(ValueError, match="output_attentions"):
        eager(ids)


def test_float_masks_only_when_they_are_boolean() -> None:
    model = build(CONFIGS["llama"](), "normattn-softpick")
    ids, _ = batch(None)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[:, 0] = False
    allowed[0, 0] = True  # every row keeps a key
    boolean = allowed.expand(2, 1, T, T)
    blocked = torch.finfo(torch.float32).min
    with torch.no_grad():
        expected = model(ids, attention_mask=boolean).logits
        assert (expected - model(ids).logits).abs().max() > 1e-3  # the 4-d mask is the whole pattern
        for fill in (float("-inf"), blocked):
            additive = torch.zeros(2, 1, T, T).masked_fill(~boolean, fill)
            torch.testing.assert_close(model(ids, attention_mask=additive).logits, expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=torch.zeros(2, 1, T, T).masked_fill(~boolean, -1.0))


@pytest.mark.parametrize("argument", ["softcap", "head_mask", "position_bias"])
def test_arguments_that_cannot_be_honoured_are_refused(argument: str) -> None:
    attention = build(CONFIGS["llama"](), "normattn").model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, T, 8), torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    with pytest.raises(ValueError, match=argument):
        attention_forward(attention, q, k, v, None, **{argument: torch.ones(())})
