"""Pieces every attention implementation shares: the causal mask and the seed-mode warning."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def visible(q_idx: Tensor, k_idx: Tensor, t_q: int, t_k: int, causal: bool) -> Tensor | None:
    """Boolean ``[len(q_idx), len(k_idx)]`` mask of the pairs a query may see, or None for all.

    Causal masks align bottom-right as FlashAttention does (MATH.md section 0): query ``i`` sees
    key ``j`` when ``j <= i + t_k - t_q``. ``q_idx``/``k_idx`` are absolute positions, so a block
    of a longer sequence gets its slice of the mask.
    """
    if not causal:
        return None
    return k_idx[None, :] <= q_idx[:, None] + (t_k - t_q)


def full_mask(t_q: int, t_k: int, causal: bool, device: torch.device) -> Tensor | None:
    return visible(torch.arange(t_q, device=device), torch.arange(t_k, device=device), t_q, t_k, causal)


_seed_warned = False


def warn_seed_once() -> None:
    global _seed_warned
    if not _seed_warned:
        _seed_warned = True
        warnings.warn(
            'grad="seed" uses the second note\'s homogeneity shortcut, which is NOT the true '
            "derivative of beta attention (MATH.md section 5); use it for experiments only.",
            stacklevel=3,
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision inputs accumulate in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Unsupported(torch.autograd.Function):
    """Passes ``value`` through unchanged; differentiating it (in the modes asked) raises ``message``.

    Hand-derived backward and JVP rules compute their results with kernels (or torch ops on
    saved row statistics that are not themselves differentiable): autograd would see either no
    dependence on the inputs or a wrong one. Attaching this node to such a result turns every
    later derivative of it into a clear error instead of a silently wrong number.
    """

    @staticmethod
    def forward(value, message, reverse, forward, *inputs):
        return value

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message, ctx.reverse, ctx.forward = inputs[1:4]

    @staticmethod
    def backward(ctx, grad):
        if ctx.reverse:
            raise NotImplementedError(ctx.message)
        return (grad, None, None, None) + (None,) * len(ctx.needs_input_grad[4:])

    @staticmethod
    def jvp(ctx, *tangents):
        if ctx.forward:
            raise NotImplementedError(ctx.message)
        return tangents[0]


def not_differentiable(
    value: Tensor, message: str, *inputs: Tensor | None, reverse: bool = True, forward: bool = True
) -> Tensor:
    """``value``, made to raise ``message`` when it is differentiated in reverse and/or forward mode.

    ``inputs`` are the tensors ``value`` was computed from: a derivative reaches ``value`` only
    through them, so they connect the error to the graph.
    """
    return _Unsupported.apply(value, message, reverse, forward, *(x for x in inputs if x is not None))


def composition_error(backend: str, normalizer: str, what: str) -> str:
    """The message for a derivative composition that a backend does not implement."""
    return (
        f'normattn: backend="{backend}" (normalizer "{normalizer}") cannot differentiate {what}; '
        f'use backend="reference" (materialized attention, plain autograd) for this composition'
    )


TANGENT_OUTPUT = (
    "through the tangent output of its JVP (a loss on torch.func.jvp's output, or a JVP of a JVP)"
)
GRADIENT = "its own gradient (double backward, or forward mode through the backward)"
