"""``torch.nn`` layers around :func:`normattn.attention`.

``Attention`` is nanoGPT's causal self-attention with the fused score-normalize-weigh step replaced
by ``normattn.attention``: one fused ``q, k, v`` projection, any normalizer, one output projection;
optionally grouped-query heads, a causal sliding window and per-head attention sinks.

It also decodes one token at a time. Causal beta without a window keeps the constant-size ``(H, G)``
state of docs/math.md, section 9 (``beta_prefill`` / ``beta_decode``); every other layer keeps a
key/value cache, of the last ``window`` positions only when there is a window. A normalizer whose
parameter depends on the number of keys (the default ``"sigmoid"``, whose bias is ``-log Tk``) gives
each position a different function of the same keys as the sequence grows, so no cache reproduces
the full forward: such a layer says so in ``decodes_incrementally`` and refuses to decode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from .functional import ATTENTION_BACKENDS, GRAD_MODES, attention
from .normalizers import BETA, Normalizer, get_normalizer
from .ops.beta_linear.recurrent import BetaState, beta_decode, beta_prefill

__all__ = ["Attention", "KVCache"]


class KVCache:
    """Keys and values of the positions seen so far, ``(B, H_kv, T, d)`` each.

    With ``limit`` it keeps the last ``limit`` positions only (a sliding-window layer needs no more).
    """

    def __init__(self, k: Tensor, v: Tensor, limit: int | None = None) -> None:
        if limit is not None:
            k, v = k[:, :, -limit:], v[:, :, -limit:]
        self.k, self.v, self.limit = k, v, limit

    def append(self, k_t: Tensor, v_t: Tensor) -> KVCache:
        return KVCache(torch.cat([self.k, k_t], dim=2), torch.cat([self.v, v_t], dim=2), self.limit)

    def to(self, *args: Any, **kwargs: Any) -> KVCache:
        return KVCache(self.k.to(*args, **kwargs), self.v.to(*args, **kwargs), self.limit)

    def __len__(self) -> int:
        return self.k.shape[2]


def _positive_int(arg: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return value


def _probability(arg: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{arg} must be in [0, 1), got {value!r}")
    return float(value)


class Attention(nn.Module):
    """Multi-head self-attention: ``c_proj(attention(split_heads(c_attn(x))))``.

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: number of query heads, each ``E / num_heads`` wide.
        normalizer: a name of ``normattn.NORMALIZERS`` or a :class:`normattn.Normalizer` (keyword
            only: the choice is the point of the layer).
        causal: each position attends to itself and the past only.
        bias: biases in the two projections.
        dropout: applied to the output projection (nanoGPT's residual dropout).
        attn_dropout: dropout on the normalized attention weights in training mode (nanoGPT's
            ``attn_dropout``); None: ``dropout``, as nanoGPT uses one p for both.
        num_kv_heads: key/value heads; fewer than ``num_heads`` (dividing it) is grouped-query
            attention, with query head ``h`` reading key/value head ``h // (num_heads / num_kv_heads)``.
            None: ``num_heads``.
        window: with ``causal``, each position sees itself and the ``window - 1`` positions before it.
            None: no window.
        sinks: one learnable sink logit per head, initialised at 0 (the off-by-one softmax), for a
            normalizer that takes sinks (softmax).
        backend, grad: passed to :func:`normattn.attention`.

    With ``normalizer="softmax"``, no window, no sinks, ``num_kv_heads=None`` and the same weights
    this computes nanoGPT's ``CausalSelfAttention`` (parameter names ``c_attn`` and ``c_proj`` match).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        normalizer: str | Normalizer,
        causal: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        attn_dropout: float | None = None,
        num_kv_heads: int | None = None,
        window: int | None = None,
        sinks: bool = False,
        backend: str = "auto",
        grad: str = "exact",
    ) -> None:
        super().__init__()
        _positive_int("embed_dim", embed_dim)
        _positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if window is not None:
            _positive_int("window", window)
            if not causal:
                raise ValueError("window is a causal sliding window: it needs causal=True")
        _probability("dropout", dropout)
        self.attn_dropout = dropout if attn_dropout is None else _probability("attn_dropout", attn_dropout)
        self.spec = get_normalizer(normalizer)
        _checks.choice("backend", backend, ATTENTION_BACKENDS)
        _checks.choice("grad", grad, GRAD_MODES)
        if grad == "seed" and self.spec != BETA:
            raise ValueError(f'grad="seed" is defined for normalizer="beta" only, got "{self.spec.name}"')
        if sinks and not self.spec.sinks:
            raise ValueError(f'normalizer "{self.spec.name}" takes no attention sinks')
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.window, self.backend, self.grad = causal, window, backend, grad
        self.c_attn = nn.Linear(embed_dim, embed_dim + 2 * num_kv_heads * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None

    @property
    def normalizer(self) -> str:
        return self.spec.name

    def extra_repr(self) -> str:
        return (
            f"normalizer={self.normalizer!r}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"causal={self.causal}, window={self.window}, sinks={self.sinks is not None}, "
            f"attn_dropout={self.attn_dropout}, backend={self.backend!r}, grad={self.grad!r}"
        )

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, E) -> q (B, H, T, E / H), k and v (B, H_kv, T, E / H)``."""
        batch, tokens, _ = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = self.c_attn(x).split((self.embed_dim, kv_dim, kv_dim), dim=2)
        return (
            q.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2),
            k.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2),
            v.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2),
        )

    def _merge(self, y: Tensor) -> Tensor:
        """``(B, H, T, E / H) -> (B, T, E)``, then the output projection."""
        batch, _, tokens, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, tokens, self.embed_dim)))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # Under autocast q, k, v arrive in the low-precision dtype; the kernels accumulate in float32
        # themselves, so autocast must not recast the matmuls inside them.
        device_type = q.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._attention(q, k, v)
        return self._attention(q, k, v)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # Called with Tq == Tk by forward and prefill, and with one query against the cache by decode:
        # the bottom-right alignment of causal and window makes both the same rows of the full forward.
        return attention(
            q,
            k,
            v,
            normalizer=self.spec,
            causal=self.causal,
            window=None if self.window is None else (self.window - 1, None),
            dropout_p=self.attn_dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
            sinks=self.sinks,
            grad=self.grad,
            backend=self.backend,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, T, E) -> (B, T, E)``."""
        return self._merge(self._attend(*self._heads(x)))

    # Incremental decoding (causal layers only). ``prefill`` runs a whole prompt and returns the
    # state; ``decode`` appends one token. Both give the outputs ``forward`` gives on the sequence.

    @property
    def decodes_incrementally(self) -> bool:
        """Whether ``prefill`` / ``decode`` reproduce ``forward`` (else re-run the forward instead)."""
        return self.causal and not callable(self.spec.parameter)

    def _uses_beta_state(self) -> bool:
        # The recurrent state sums over every key and never forms the weights: no window, no dropout.
        dropout_p = self.attn_dropout if self.training else 0.0
        return self.spec == BETA and self.window is None and dropout_p == 0.0

    def _query_heads(self, t: Tensor) -> Tensor:
        """Key/value heads repeated to one per query head (the beta state is kept per query head)."""
        return t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def prefill(self, x: Tensor) -> tuple[Tensor, BetaState | KVCache]:
        """``x (B, T, E) -> (y (B, T, E), state)`` for the decoding of the following tokens."""
        self._require_incremental()
        q, k, v = self._heads(x)
        if self._uses_beta_state():
            y, state = beta_prefill(q, self._query_heads(k), self._query_heads(v))
            return self._merge(y), state
        return self._merge(self._attend(q, k, v)), KVCache(k, v, limit=self.window)

    def decode(self, x_t: Tensor, state: BetaState | KVCache) -> tuple[Tensor, BetaState | KVCache]:
        """One new token ``x_t (B, 1, E)`` after the ones in ``state``: ``(y_t (B, 1, E), state)``."""
        self._require_incremental()
        q_t, k_t, v_t = self._heads(x_t)
        if isinstance(state, BetaState):
            y_t, state = beta_decode(q_t, self._query_heads(k_t), self._query_heads(v_t), state)
            return self._merge(y_t), state
        state = state.append(k_t, v_t)
        return self._merge(self._attend(q_t, state.k, state.v)), state

    def _require_incremental(self) -> None:
        if not self.causal:
            raise RuntimeError("incremental decoding needs a causal Attention (causal=True)")
        if not self.decodes_incrementally:
            raise RuntimeError(
                f'normalizer "{self.normalizer}" depends on the number of keys, so a cache cannot reproduce '
                "the full forward; run the forward on the whole sequence instead"
            )
