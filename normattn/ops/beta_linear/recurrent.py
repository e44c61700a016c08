"""Causal beta attention as a recurrence: prefill a prompt, then decode with a constant-size state.

Causal beta attention at position ``i`` needs only ``H_i = sum_{j<=i} k_j v_j^T`` and
``G_i = sum_{j<=i} k_j k_j^T`` (docs/math.md, section 9). A decoder keeps ``(H, G)`` per head instead of a
key/value cache that grows with the context: each new token costs ``O(d^2)`` time and the state is
``d (d + dv)`` numbers per head, whatever the number of tokens before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ... import _checks
from ...normalizers import BETA
from ..attention.problem import Problem
from ..common import accumulation_dtype
from .chunk import beta_linear_attention, outer_sum


@dataclass(frozen=True)
class BetaState:
    """Decoding state of causal beta attention after ``tokens_seen`` tokens.

    ``H`` is ``(B, heads, d, dv)`` (``sum_j k_j v_j^T``) and ``G`` is ``(B, heads, d, d)``
    (``sum_j k_j k_j^T``), float32 for half-precision models and float64 for float64 ones. Immutable:
    ``beta_decode`` returns a new state.
    """

    H: Tensor
    G: Tensor
    tokens_seen: int

    def to(self, *args, **kwargs) -> BetaState:
        """The state with ``Tensor.to(*args, **kwargs)`` applied to ``H`` and ``G``."""
        return BetaState(self.H.to(*args, **kwargs), self.G.to(*args, **kwargs), self.tokens_seen)


def beta_prefill(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, BetaState]:
    """Causal beta attention over a prompt, and the state to decode from.

    Args:
        q: ``(B, H, Tq, d)``; k: ``(B, H, Tk, d)``; v: ``(B, H, Tk, dv)``, one float dtype and device.
            Usually ``Tq == Tk``; ``Tq < Tk`` gives the outputs of the last ``Tq`` positions only
            (causal masks align bottom-right), e.g. ``q[..., -1:, :]`` for the next-token logits.
        scale: score scale, ``1/sqrt(d)`` when None; pass the same one to ``beta_decode``.

    Returns:
        ``(out, state)``: ``out`` equals ``normattn.attention(q, k, v, normalizer="beta",
        causal=True, scale=scale)`` (differentiable), and ``state`` holds ``H`` and ``G`` over all
        ``Tk`` keys.
    """
    scale_value = _checks.attention_inputs(q, k, v, scale)
    out = beta_linear_attention(Problem(BETA, scale_value, 0.0, left=None, right=0), q, k, v)
    acc = accumulation_dtype(q.dtype)
    keys, values = k.to(acc), v.to(acc)
    return out, BetaState(H=outer_sum(keys, values), G=outer_sum(keys, keys), tokens_seen=k.shape[-2])


def _check_decode_inputs(q_t: object, k_t: object, v_t: object, state: object, scale: object) -> float:
    for arg, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.float_tensor(arg, x)
        assert isinstance(x, Tensor)
        if x.dim() != 4 or x.shape[2] != 1:
            raise ValueError(
                f"{arg} must hold one token per sequence and head, shape (batch, heads, 1, head_dim), "
                f"got shape {tuple(x.shape)}"
            )
    scale_value = _checks.attention_inputs(q_t, k_t, v_t, scale)
    if not isinstance(state, BetaState):
        raise TypeError(
            f"state must be a BetaState (from beta_prefill or beta_decode), got {type(state).__name__}"
        )
    assert isinstance(q_t, Tensor) and isinstance(v_t, Tensor)
    batch, heads, _, dim = q_t.shape
    expected = {"H": (batch, heads, dim, v_t.shape[-1]), "G": (batch, heads, dim, dim)}
    acc = accumulation_dtype(q_t.dtype)
    for name, tensor in (("H", state.H), ("G", state.G)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state.{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"state.{name} has shape {tuple(tensor.shape)}, but q_t {tuple(q_t.shape)} and "
                f"v_t {tuple(v_t.shape)} need {expected[name]} (batch, heads, d, "
                f"{'dv' if name == 'H' else 'd'})"
            )
        if tensor.dtype != acc:
            raise TypeError(
                f"state.{name} has dtype {tensor.dtype}, but inputs of dtype {q_t.dtype} decode with a "
                f"{acc} state (beta_prefill makes one; convert with state.to({acc}))"
            )
        if tensor.device != q_t.device:
            raise ValueError(f"state.{name} is on {tensor.device}, but q_t is on {q_t.device}")
    return scale_value


def _differentiated(tensors: tuple[Tensor, ...]) -> bool:
    import torch.autograd.forward_ad as fwad

    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return True
    return any(
        torch._C._functorch.is_functorch_wrapped_tensor(x) or fwad.unpack_dual(x).tangent is not None
        for x in tensors
    )


def beta_decode(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, state: BetaState, scale: float | None = None
) -> tuple[Tensor, BetaState]:
    """One decoding step of causal beta attention in ``O(d^2)`` per head, whatever the context.

    Args:
        q_t, k_t: ``(B, H, 1, d)``; v_t: ``(B, H, 1, dv)``: the new token's query, key and value.
        state: the state after the previous tokens (``beta_prefill`` or an earlier ``beta_decode``);
            it is not modified.
        scale: score scale, ``1/sqrt(d)`` when None (use the prefill's).

    Returns:
        ``(out_t, new_state)``: ``out_t`` ``(B, H, 1, dv)`` in the inputs' dtype equals the last row of
        causal beta attention over the whole sequence so far, and ``new_state`` includes the token.
    """
    scale_value = _check_decode_inputs(q_t, k_t, v_t, state, scale)
    # The fused kernel has no derivative: it serves plain inference on CUDA. Anything that will be
    # differentiated (autograd, forward-mode duals, torch.func transforms) takes the torch ops.
    tensors = (q_t, k_t, v_t, state.H, state.G)
    if q_t.is_cuda and not _differentiated(tensors):
        from ..common import triton_usable

        if triton_usable(q_t):
            from .triton_decode import beta_decode_triton

            out, h, g = beta_decode_triton(q_t, k_t, v_t, state.H, state.G, scale_value)
            return out, BetaState(H=h, G=g, tokens_seen=state.tokens_seen + 1)
    acc = state.H.dtype
    q, k, v = scale_value * q_t.to(acc), k_t.to(acc), v_t.to(acc)
    h = state.H + outer_sum(k, v)  # [B, H, 1, d]^T @ [B, H, 1, dv] -> [B, H, d, dv]
    g = state.G + outer_sum(k, k)
    u = q @ h  # [B, H, 1, d] @ [B, H, d, dv] -> [B, H, 1, dv]
    squared = ((q @ g) * q).sum(-1, keepdim=True).clamp_min(0)
    # sqrt through autograd has an infinite slope at 0; beta's derivative there drops the norm term
    positive = squared > 0
    r = torch.where(positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(), 0)
    out = (u / (1 + r)).to(q_t.dtype)
    return out, BetaState(H=h, G=g, tokens_seen=state.tokens_seen + 1)
