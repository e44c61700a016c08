"""normattn's normalizers as Hugging Face transformers attention implementations.

After :func:`register`, any model that dispatches through transformers' ``AttentionInterface``
(Llama, Qwen2, Mistral, GPT-2, gpt-oss and most recent decoders) computes its attention with
:func:`normattn.attention`::

    from normattn.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="normattn-beta")
    model.set_attn_implementation("normattn")   # or switch an existing model

How transformers' arguments map onto ``normattn.attention``:

* Masks: the names are registered with ``AttentionMaskInterface`` too, with a mask function
  (:func:`bottom_right_causal_mask`) that returns transformers' own boolean mask (True = attend,
  padding, sliding windows, packed sequences and static-cache slots included) and returns None only
  for plain causal (or full) attention whose last query sits on the last key. None then means
  ``causal=is_causal``, which normattn aligns bottom-right: exact with a KV cache, where the
  top-left ``is_causal`` of SDPA would not be. A boolean mask is passed as ``attn_mask`` and is the
  whole pattern, as in SDPA.
* Grouped-query heads: ``enable_gqa`` whenever the key/value heads are fewer; keys are never
  repeated.
* ``scaling`` is ``scale``; ``dropout`` is ``dropout_p`` in training mode only, as eager attention.
* Sinks: ``s_aux`` (what gpt-oss passes), else ``module.sinks``; softmax ("normattn") only.
* Output ``(B, T, H, d)`` and None for the weights, which the kernels never form.

``"normattn-sigmoid"``'s default bias ``-log(Tk)`` counts the keys of each call, padded ones and a
static cache's empty slots included, so a cached generation step or a padded sequence weighs its keys
differently from a full pass over the unpadded sequence; the other normalizers do not depend on ``Tk``.

What normattn cannot honour exactly raises a ``ValueError`` naming the argument:
``output_attentions``, ``softcap``, ``head_mask``, ``position_bias``, sinks with another normalizer,
and a float ``attention_mask`` with values other than 0 and -inf (or the dtype's minimum).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from packaging.version import Version
from torch import Tensor

import normattn
from normattn.normalizers import NORMALIZERS, get_normalizer

try:
    import transformers
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'normattn.integrations.transformers needs transformers: pip install "normattn[hf]"'
    ) from error

__all__ = ["IMPLEMENTATIONS", "register", "attention_forward", "bottom_right_causal_mask"]

# The mask function relies on sdpa_mask's offset arguments (q_offset, kv_offset), which the tested
# range has; older releases take other arguments and would build a different mask.
MIN_TRANSFORMERS = "5.17"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"normattn.integrations.transformers needs transformers>={MIN_TRANSFORMERS}, "
        f"found {transformers.__version__}"
    )

IMPLEMENTATIONS: dict[str, str] = {
    ("normattn" if name == "softmax" else f"normattn-{name}"): name for name in sorted(NORMALIZERS)
}
"""The ``attn_implementation`` names :func:`register` adds, one per registered normalizer
(``"normattn"`` for softmax, ``"normattn-<name>"`` for the others), and the normalizer each computes."""


def register() -> tuple[str, ...]:
    """Register every name of :data:`IMPLEMENTATIONS` with transformers; returns the names.

    Each gets its attention function (``AttentionInterface``) and :func:`bottom_right_causal_mask`
    as its mask function (``AttentionMaskInterface``). Registering again replaces them.
    """
    for name, normalizer in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, functools.partial(attention_forward, normalizer=normalizer))
        AttentionMaskInterface.register(name, bottom_right_causal_mask)
    return tuple(IMPLEMENTATIONS)


def bottom_right_causal_mask(
    *,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> Tensor | None:
    """transformers' boolean SDPA mask, or None where bottom-right ``causal=True`` is exact.

    ``sdpa_mask`` skips the mask in cases its top-left ``is_causal`` reproduces, such as prefill into
    an empty static cache (``kv_length`` past the queries). normattn's causal is bottom-right, so the
    skip is allowed only when the queries' last position is the keys' last one: then query ``i``
    sees key ``j`` iff ``kv_offset + j <= q_offset + i``, i.e. ``j <= i + kv_length - q_length``.
    A tensor ``q_offset`` (static caches) always gets the mask: reading it would synchronize.
    """
    last_query_on_last_key = isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length
    return sdpa_mask(
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        allow_is_causal_skip=allow_is_causal_skip and last_query_on_last_key,
        **kwargs,
    )


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    normalizer: str = "softmax",
    is_causal: bool | None = None,
    s_aux: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """One attention layer's call from transformers, computed by :func:`normattn.attention`.

    ``query (B, H, Tq, d)``, ``key``/``value (B, H_kv, Tk, d)`` and the mask from
    :func:`bottom_right_causal_mask` (or a 4-d mask the caller passed); returns ``(B, Tq, H, d)`` and
    None. ``kwargs`` are the model's remaining keyword arguments: those that would change the
    result and that normattn cannot compute raise; the rest (e.g. ``sliding_window``, which the mask
    already carries, or flash-attention's sequence lengths) do not affect this computation.
    """
    _refuse_what_cannot_be_honoured(module, kwargs)
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if sinks is not None and not get_normalizer(normalizer).sinks:
        raise ValueError(
            f'this model has attention sinks (module.sinks / s_aux), which normalizer "{normalizer}" '
            'cannot honour: use attn_implementation="normattn" (softmax), or a model without sinks'
        )
    mask = _boolean_mask(attention_mask)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    output = normattn.attention(
        query,
        key,
        value,
        normalizer=normalizer,
        # a mask is the whole pattern (it already holds causality), as SDPA reads it
        causal=bool(causal) and mask is None,
        attn_mask=mask,
        dropout_p=dropout if module.training else 0.0,
        enable_gqa=key.shape[1] != query.shape[1],
        scale=scaling,
        sinks=sinks,
    )
    return output.transpose(1, 2).contiguous(), None


def _refuse_what_cannot_be_honoured(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        # capture_outputs falls back to the config when the call does not say
        output_attentions = getattr(getattr(module, "config", None), "output_attentions", False)
    if output_attentions:
        raise ValueError(
            "output_attentions=True asks for the attention weights, which normattn's fused kernels never "
            'form; use attn_implementation="eager" to inspect weights'
        )
    for argument, meaning in (
        ("softcap", "logit softcapping"),
        ("head_mask", "a per-head multiplier of the attention weights"),
        ("position_bias", "an additive bias on the scores"),
    ):
        if kwargs.get(argument) is not None:
            raise ValueError(f"{argument} ({meaning}) is not supported by normattn attention implementations")


def _boolean_mask(attention_mask: object) -> Tensor | None:
    """A boolean mask (True = attend); a float mask only when it is 0 (attend) or blocked (-inf/min)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask must be a boolean tensor or None, got {type(attention_mask).__name__}"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if not attention_mask.is_floating_point():
        raise TypeError(f"attention_mask must be a boolean or float tensor, got dtype {attention_mask.dtype}")
    # an additive mask of 0 and -inf (or the dtype's minimum, as transformers' eager masks) only
    # removes keys; any other value would shift the scores, which normattn never does
    blocked = attention_mask <= torch.finfo(attention_mask.dtype).min
    if not bool((blocked | (attention_mask == 0)).all()):
        raise ValueError(
            "attention_mask: a float (additive) mask with values other than 0 and -inf (or the dtype's "
            "minimum) would add to the scores, which normattn cannot honour; pass a boolean mask "
            "(True = attend)"
        )
    return ~blocked
