"""``torch.nn`` layers around :func:`normattn.attention`.

``Attention`` is nanoGPT's causal self-attention with the fused score-normalize-weigh step replaced
by ``normattn.attention``: one fused ``q, k, v`` projection, any normalizer, one output projection.
It also decodes one token at a time: a growing key/value cache for softmax, and for beta the
constant-size ``(H, G)`` state of docs/math.md, section 9 (``beta_prefill`` / ``beta_decode``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from .functional import ATTENTION_BACKENDS, GRAD_MODES, attention
from .normalizers import get_normalizer

__all__ = ["Attention", "KVCache"]


class KVCache:
    """Keys and values of every position seen so far, ``(B, H, T, d)`` each (softmax decoding)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def append(self, k_t: Tensor, v_t: Tensor) -> KVCache:
        return KVCache(torch.cat([self.k, k_t], dim=2), torch.cat([self.v, v_t], dim=2))

    def to(self, *args: Any, **kwargs: Any) -> KVCache:
        return KVCache(self.k.to(*args, **kwargs), self.v.to(*args, **kwargs))

    def __len__(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module):
    """Multi-head self-attention: ``c_proj(attention(split_heads(c_attn(x))))``.

    Args:
        embed_dim: model width ``E``; must be divisible by ``num_heads``.
        num_heads: number of heads, each ``E / num_heads`` wide.
        normalizer: ``"softmax"`` or ``"beta"`` (keyword only: the choice is the point of the layer).
        causal: each position attends to itself and the past only.
        bias: biases in the two projections.
        dropout: applied to the output projection (nanoGPT's residual dropout). The fused kernels
            never materialize the attention weights, so unlike nanoGPT there is no dropout on them.
        backend, grad: passed to :func:`normattn.attention`.

    With ``normalizer="softmax"`` and the same weights this computes nanoGPT's
    ``CausalSelfAttention`` (parameter names ``c_attn`` and ``c_proj`` match it).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        normalizer: str,
        causal: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
        grad: str = "exact",
    ) -> None:
        super().__init__()
        for arg, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.normalizer = get_normalizer(normalizer).name
        _checks.choice("backend", backend, ATTENTION_BACKENDS)
        _checks.choice("grad", grad, GRAD_MODES)
        if grad == "seed" and self.normalizer != "beta":
            raise ValueError(f'grad="seed" is defined for normalizer="beta" only, got "{self.normalizer}"')
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.causal, self.backend, self.grad = causal, backend, grad
        self.c_attn = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.c_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return (
            f"normalizer={self.normalizer!r}, num_heads={self.num_heads}, causal={self.causal}, "
            f"backend={self.backend!r}, grad={self.grad!r}"
        )

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, E) -> 3 x (B, H, T, E / H)``."""
        batch, tokens, _ = x.shape
        q, k, v = self.c_attn(x).split(self.embed_dim, dim=2)
        shape = (batch, tokens, self.num_heads, self.embed_dim // self.num_heads)
        return tuple(t.view(shape).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def _merge(self, y: Tensor) -> Tensor:
        """``(B, H, T, E / H) -> (B, T, E)``, then the output projection."""
        batch, _, tokens, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, tokens, self.embed_dim)))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        # Under autocast q, k, v arrive in the low-precision dtype; the kernels accumulate in float32
        # themselves, so autocast must not recast the matmuls inside them.
        device_type = q.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._attention(q, k, v, causal)
        return self._attention(q, k, v, causal)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        return attention(
            q, k, v, normalizer=self.normalizer, causal=causal, grad=self.grad, backend=self.backend
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, T, E) -> (B, T, E)``."""
        return self._merge(self._attend(*self._heads(x), causal=self.causal))

    # Incremental decoding (causal layers only). ``prefill`` runs a whole prompt and returns the
    # state; ``decode`` appends one token. Both give the outputs ``forward`` gives on the sequence.

    def prefill(self, x: Tensor) -> tuple[Tensor, Any]:
        """``x (B, T, E) -> (y (B, T, E), state)`` for the decoding of the following tokens."""
        self._require_causal()
        q, k, v = self._heads(x)
        if self.normalizer == "beta":
            from .ops.beta_linear.recurrent import beta_prefill

            y, state = beta_prefill(q, k, v)
            return self._merge(y), state
        return self._merge(self._attend(q, k, v, causal=True)), KVCache(k, v)

    def decode(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One new token ``x_t (B, 1, E)`` after the ones in ``state``: ``(y_t (B, 1, E), state)``."""
        self._require_causal()
        q_t, k_t, v_t = self._heads(x_t)
        if self.normalizer == "beta":
            from .ops.beta_linear.recurrent import beta_decode

            y_t, state = beta_decode(q_t, k_t, v_t, state)
            return self._merge(y_t), state
        state = state.append(k_t, v_t)
        # One query against every cached key: the bottom-right causal alignment lets it see them all.
        return self._merge(self._attend(q_t, state.k, state.v, causal=True)), state

    def _require_causal(self) -> None:
        if not self.causal:
            raise RuntimeError("incremental decoding needs a causal Attention (causal=True)")
