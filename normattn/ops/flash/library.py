"""The triton flash kernels as ``torch.library`` custom ops; every kernel launch goes through them.

* ``torch.func``: inside ``FlashAttentionTriton.backward``/``jvp`` the saved tensors and the
  cotangents/tangents are functorch wrappers; a dispatcher op unwraps them before the kernel sees
  a data pointer, a bare Triton launch cannot.
* ``torch.compile``: the fake (meta) implementations let AOTAutograd trace
  ``FlashAttentionTriton`` (allowed into dynamo's graph unread, see ``triton._flash_attention``)
  with backward and JVP; Inductor calls the ops as opaque kernels.

``normattn::flash_attention`` also has an autograd registration, for callers of the bare op.
PyTorch has no forward-mode rule for custom ops: ``torch.func.jvp`` or ``forward_ad`` through the
bare op silently drops the tangent, so differentiate ``normattn.attention(..., backend="triton")``
(or ``flash_attention_triton``), whose ``autograd.Function`` carries the JVP kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import accumulation_dtype
from . import triton as kernels

__all__ = ["flash_attention_forward", "flash_attention_backward", "flash_attention_jvp"]


@torch.library.custom_op("normattn::flash_attention", mutates_args=())
def flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, softmax: bool, causal: bool, scale: float, seed: bool
) -> tuple[Tensor, Tensor]:
    """``(O, row statistic)``; ``seed`` only changes the registered backward."""
    o, stat, _ = kernels.flash_forward(q, k, v, None, softmax, causal, scale, seed)
    return o, stat


@flash_attention_forward.register_fake
def _forward_fake(q, k, v, softmax, causal, scale, seed):
    batch, heads, t_q, _ = q.shape
    o = q.new_empty((batch, heads, t_q, v.shape[-1]))
    stat = q.new_empty((batch, heads, t_q), dtype=accumulation_dtype(q.dtype))
    return o, stat


@torch.library.custom_op("normattn::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    stat: Tensor,
    softmax: bool,
    causal: bool,
    scale: float,
    seed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = kernels.flash_backward(do, q, k, v, o, stat, softmax, causal, scale, seed)
    return dq, dk, dv


@flash_attention_backward.register_fake
def _backward_fake(do, q, k, v, o, stat, softmax, causal, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("normattn::flash_attention_jvp", mutates_args=())
def flash_attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qd: Tensor,
    kd: Tensor,
    vd: Tensor,
    softmax: bool,
    causal: bool,
    scale: float,
    seed: bool,
) -> Tensor:
    """The tangent ``Od``, from the single fused forward-and-tangent pass."""
    _, _, od = kernels.flash_forward(q, k, v, (qd, kd, vd), softmax, causal, scale, seed)
    return od


@flash_attention_jvp.register_fake
def _jvp_fake(q, k, v, qd, kd, vd, softmax, causal, scale, seed):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax, causal, scale, seed = inputs
    o, stat = output
    ctx.mark_non_differentiable(stat)
    ctx.save_for_backward(q, k, v, o, stat)
    ctx.config = (softmax, causal, scale, seed)


def _backward(ctx, do: Tensor, _dstat: Tensor | None):
    q, k, v, o, stat = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(do, q, k, v, o, stat, *ctx.config)
    return dq, dk, dv, None, None, None, None


flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)
