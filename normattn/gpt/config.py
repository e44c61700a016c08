"""Model and training configurations, the presets, and ``--name value`` overrides.

Overrides are parsed by each field's declared type (never evaluated as code) and every value is
range-checked before anything runs, so a bad value is one line of error and exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from ..functional import ATTENTION_BACKENDS
from ..normalizers import NORMALIZERS

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class AttentionVariant:
    """What an attention name stands for: the normalizer and how the model uses it."""

    normalizer: str
    grad: str = "exact"  # "seed": the beta-attention write-up's shortcut gradient (docs/math.md, section 10)
    sinks: bool = False  # learnable per-head sink logits (softmax)


def attention_variants() -> dict[str, AttentionVariant]:
    """The names a run is known by: every registered normalizer, plus ``beta-seed`` and ``softmax-sinks``.

    Read from the registry on each call, so a normalizer registered at run time is a valid name too.
    """
    return {
        **{name: AttentionVariant(name) for name in NORMALIZERS},
        "beta-seed": AttentionVariant("beta", grad="seed"),
        "softmax-sinks": AttentionVariant("softmax", sinks=True),
    }


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 6
    n_head: int = 6
    # Key/value heads (grouped-query attention when fewer than n_head); None: n_head.
    n_kv_head: int | None = None
    n_embd: int = 384
    block_size: int = 256
    # None: the vocabulary size of the data (a larger value pads the embedding, as nanoGPT does).
    vocab_size: int | None = None
    dropout: float = 0.0
    # Dropout on the attention weights; None: ``dropout`` (nanoGPT uses one p for both).
    attn_dropout: float | None = None
    # Causal sliding window: each position sees itself and the window - 1 before it; None: all of them.
    window: int | None = None
    bias: bool = False
    normalizer: str = "softmax"
    grad: str = "exact"
    sinks: bool = False
    backend: str = "auto"

    @property
    def attention(self) -> str:
        return attention_name(AttentionVariant(self.normalizer, self.grad, self.sinks))

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    def validate(self) -> GPTConfig:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("vocab_size", "n_kv_head", "window"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise UsageError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise UsageError(f"{name} must be in [0, 1), got {value!r}")
        _one_of("normalizer", self.normalizer, tuple(NORMALIZERS))
        _one_of("grad", self.grad, ("exact", "seed"))
        _one_of("backend", self.backend, ATTENTION_BACKENDS)
        if self.grad == "seed" and self.normalizer != "beta":
            raise UsageError(f"grad 'seed' needs normalizer 'beta', got {self.normalizer!r}")
        if self.sinks and not NORMALIZERS[self.normalizer].sinks:
            raise UsageError(f"normalizer {self.normalizer!r} takes no attention sinks")
        if self.backend == "triton-linear" and self.normalizer != "beta":
            raise UsageError(f"backend 'triton-linear' computes beta attention only, not {self.normalizer!r}")
        return self


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    max_iters: int = 5000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    # None: decay over the whole run (max_iters). Fix it to resume a run for more iterations exactly.
    lr_decay_iters: int | None = None
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    seed: int = 1337
    # auto: bfloat16 autocast on CUDA (float16 with loss scaling where bf16 is missing), float32 on CPU.
    dtype: str = "auto"
    compile: bool = False

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def validate(self) -> TrainConfig:
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "eval_interval",
            "eval_iters",
            "log_interval",
        ):
            _at_least(name, getattr(self, name), 1)
        for name in ("max_iters", "warmup_iters", "seed"):
            _at_least(name, getattr(self, name), 0)
        if self.lr_decay_iters is not None:
            _at_least("lr_decay_iters", self.lr_decay_iters, 0)
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.learning_rate <= 0:
            raise UsageError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.min_lr > self.learning_rate:
            raise UsageError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        _one_of("dtype", self.dtype, DTYPES)
        return self


@dataclass(frozen=True)
class Preset:
    description: str
    model: GPTConfig
    train: TrainConfig
    # The beta-attention write-up's final losses for this preset: attention -> (train, val).
    reference: dict[str, tuple[float, float]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # nanoGPT's config/train_shakespeare_char.py (its model exactly: dropout 0.2 on the attention
    # weights and the residual stream), run for 10000 iterations as the beta-attention write-up did.
    "shakespeare-char": Preset(
        description="nanoGPT's Tiny Shakespeare model, 6 layers x 6 heads x 384, context 256, "
        "10000 iterations as in the beta-attention write-up (GPU)",
        model=GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False),
        train=TrainConfig(
            batch_size=64,
            max_iters=10000,
            learning_rate=1e-3,
            min_lr=1e-4,
            warmup_iters=100,
            lr_decay_iters=5000,
            beta2=0.99,
            eval_interval=250,
            eval_iters=200,
        ),
        reference={"softmax": (0.7140, 1.6204), "beta": (1.0040, 1.5550)},
    ),
    # Small enough to learn visibly in a few minutes on two CPU cores.
    "shakespeare-char-cpu": Preset(
        description="a small model that learns in a few minutes on 2 CPU cores",
        model=GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False),
        train=TrainConfig(
            batch_size=16,
            max_iters=1500,
            learning_rate=2e-3,
            min_lr=2e-4,
            warmup_iters=50,
            beta2=0.99,
            eval_interval=100,
            eval_iters=20,
        ),
    ),
}


def attention_name(variant: AttentionVariant) -> str:
    for name, known in attention_variants().items():
        if known == variant:
            return name
    return f"{variant.normalizer}-{variant.grad}" + ("-sinks" * variant.sinks)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_attention(name: str) -> AttentionVariant:
    variants = attention_variants()
    if name not in variants:
        raise UsageError(f"unknown attention {name!r}; choose one of {', '.join(variants)}")
    return variants[name]


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(name: str, raw: str, annotation: Any) -> Any:
    """Convert the command-line string ``raw`` to the declared type of field ``name``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if raw.strip().lower() in ("none", "null"):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    text = raw.strip()
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--{name} expects true or false, got {raw!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--{name} expects an integer, got {raw!r}") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"--{name} expects a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"--{name} expects a finite number, got {raw!r}")
        return value
    return text


def apply_overrides(config: Any, overrides: dict[str, str]) -> Any:
    """``config`` with the fields named in ``overrides`` (raw strings) replaced, type-checked."""
    types = _field_types(type(config))
    changes = {name: parse_value(name, raw, types[name]) for name, raw in overrides.items() if name in types}
    return dataclasses.replace(config, **changes)


def _at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config saved by ``to_dict``, ignoring fields this version does not know."""
    known = set(field_names(cls))
    return cls(**{k: v for k, v in values.items() if k in known})


def build_configs(
    preset_name: str, attention: str | None = None, overrides: dict[str, str] | None = None
) -> tuple[GPTConfig, TrainConfig]:
    """The preset's configs, with the attention and the ``--name value`` overrides applied, checked."""
    preset = get_preset(preset_name)
    model_config, train_config = preset.model, preset.train
    if attention is not None:
        model_config = dataclasses.replace(model_config, **dataclasses.asdict(parse_attention(attention)))
    overrides = overrides or {}
    unknown = set(overrides) - set(field_names(GPTConfig)) - set(field_names(TrainConfig))
    if unknown:
        raise UsageError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    model_config = apply_overrides(model_config, overrides).validate()
    train_config = apply_overrides(train_config, overrides).validate()
    return model_config, train_config
