"""One autograd layer for every kernel backend: first and second derivatives from four kernels.

A backend supplies :class:`Kernels`, four plain functions of ``(problem, q, k, v, sinks, mask,
seed, ...)`` that launch its kernels (no autograd inside):

* ``forward -> (O, stat)``;  ``backward(O, stat, dO) -> (dq, dk, dv, dsinks)``;
* ``jvp(O, stat, tangents) -> (Od, aux)``, ``aux`` a row statistic of the tangent (``mu``);
* ``tangent_backward(O, stat, tangents, Od, aux, h) -> (dq, dk, dv, dsinks, dqd, dkd, dvd, dsinksd)``,
  the gradient of ``<h, Od>`` (docs/math.md, "Gradients through the JVP").

From them, three ``autograd.Function`` classes give every composition of two derivatives exactly:

* :class:`Attention`: ``(q, k, v, sinks) -> O``. Its backward is :class:`AttentionVJP`, its JVP
  is :class:`AttentionJVP`, so both results are differentiable again.
* :class:`AttentionJVP`: ``(q, k, v, sinks, qd, kd, vd, sinksd) -> Od``. Backward:
  ``tangent_backward`` (a loss on ``torch.func.jvp``'s tangent output, as consistency models train).
* :class:`AttentionVJP`: ``(q, k, v, sinks, dO) -> (dq, dk, dv, dsinks)``. Backward (double
  backward) and JVP (forward mode through the backward, Hessian-vector products) use the identity
  ``d/dx <h, J(x) t> = d/de J(x + e t)^T h``: the primal part of ``tangent_backward`` with
  ``h = dO``, plus ``J t`` (a ``jvp``) or ``J^T dOd`` (a ``backward``).

A third derivative raises a clear error, as do derivatives of the ``grad="seed"`` shortcut. Inside
backward and JVP rules, kernels run through :class:`_KernelCall`, a Function whose forward receives
plain tensors under ``torch.func`` transforms (which Triton needs) and whose own derivatives raise.
Every Function has a ``vmap`` rule that folds the mapped dimension into the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..common import composition_error
from .problem import Problem

__all__ = ["Kernels", "attention_function"]


@dataclass(frozen=True)
class Kernels:
    """A backend's four kernels (see the module docstring) and its name for error messages."""

    backend: str
    forward: Callable
    backward: Callable
    jvp: Callable
    tangent_backward: Callable


# positions, among the tensor arguments ``(q, k, v, sinks, mask, seed, *rest)``, of the two that
# are not batch-major: the mask keeps its broadcast batch dim, the seed is a scalar
_MASK, _SEED = 4, 5


def _third_order(kernels: Kernels, problem: Problem) -> str:
    return composition_error(
        kernels.backend,
        problem.normalizer.name,
        "a third derivative (of a double backward, or of the gradient of a JVP's tangent output)",
    )


def _seed_error(problem: Problem) -> None:
    if problem.grad == "seed":
        raise NotImplementedError(
            'normattn: grad="seed" defines first derivatives only (the beta-attention write-up\'s shortcut '
            "VJP and JVP); differentiating them again (a loss on a JVP's tangent output, double backward, "
            'a JVP of the gradient) is not defined for it: use grad="exact"'
        )


def _zeros_for_missing(tangents, primals):
    """``torch.func`` passes None for an input without a tangent: it contributes zero."""
    return tuple(
        None if x is None else (torch.zeros_like(x) if t is None else t)
        for t, x in zip(tangents, primals, strict=True)
    )


# -- vmap: fold the mapped dimension into the batch ------------------------------------------


def _fold(info, in_dims, tensors, problem: Problem):
    """Tensor arguments with the vmapped dim merged into the batch dim (``V * B``)."""
    if problem.dropout_p > 0:
        raise NotImplementedError(
            "normattn: dropout_p > 0 under torch.vmap is not supported (the dropout bits would not follow "
            "vmap's randomness mode); map over a Python loop or set dropout_p=0"
        )
    size = info.batch_size
    q, q_dim = tensors[0], in_dims[0]
    batch = q.shape[0] if q_dim is None else q.movedim(q_dim, 0).shape[1]
    out = []
    for position, (x, dim) in enumerate(zip(tensors, in_dims, strict=True)):
        if x is None or position == _SEED:
            if position == _SEED and dim is not None:
                raise NotImplementedError("normattn: a vmapped dropout seed is not supported")
            out.append(x)
            continue
        if dim is None:
            if position == _MASK and x.shape[0] == 1:
                out.append(x)  # broadcast over every batch entry, mapped or not
                continue
            x = x.unsqueeze(0)
        else:
            x = x.movedim(dim, 0)
        x = x.expand(size, batch, *x.shape[2:])
        out.append(x.reshape(size * batch, *x.shape[2:]))
    return out


def _unfold(info, outputs):
    size = info.batch_size
    single = isinstance(outputs, Tensor)
    items = (outputs,) if single else tuple(outputs)
    unfolded = tuple(None if x is None else x.unflatten(0, (size, x.shape[0] // size)) for x in items)
    dims = tuple(None if x is None else 0 for x in items)
    return (unfolded[0], dims[0]) if single else (unfolded, dims)


def _vmap_apply(function, info, in_dims, kernels, problem, *tensors):
    folded = _fold(info, in_dims[2:], tensors, problem)
    return _unfold(info, function.apply(kernels, problem, *folded))


class _KernelCall(torch.autograd.Function):
    """Runs ``kernel(*tensors)`` as a Function's forward; its derivatives raise ``message``."""

    @staticmethod
    def forward(kernel, message, problem, *tensors):
        return kernel(problem, *tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(ctx.message)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(ctx.message)

    @staticmethod
    def vmap(info, in_dims, kernel, message, problem, *tensors):
        folded = _fold(info, in_dims[3:], tensors, problem)
        return _unfold(info, _KernelCall.apply(kernel, message, problem, *folded))


def _call(kernel: Callable, kernels: Kernels, problem: Problem, *tensors, **options):
    """Launch ``kernel`` from inside a backward or JVP rule (see ``_KernelCall``)."""
    bound = functools.partial(kernel, **options) if options else kernel
    return _KernelCall.apply(bound, _third_order(kernels, problem), problem, *tensors)


def _save_attention(ctx, inputs, output, forward_mode: bool) -> None:
    """What :class:`Attention` and :class:`CompiledAttention` keep: the inputs, ``O`` and ``stat``
    (for the JVP rule too where ``forward_mode``); ``stat`` is not differentiable."""
    kernels, problem, q, k, v, sinks, mask, seed = inputs
    out, stat = output
    ctx.mark_non_differentiable(stat)
    saved = (q, k, v, sinks, mask, seed, out, stat)
    ctx.save_for_backward(*saved)
    if forward_mode:
        ctx.save_for_forward(*saved)
    ctx.kernels, ctx.problem = kernels, problem


class Attention(torch.autograd.Function):
    """``(kernels, problem, q, k, v, sinks, mask, seed) -> (O, stat)``; ``stat`` is not differentiable."""

    @staticmethod
    def forward(kernels, problem, q, k, v, sinks, mask, seed):
        return kernels.forward(problem, q, k, v, sinks, mask, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_attention(ctx, inputs, output, forward_mode=True)

    @staticmethod
    def backward(ctx, grad_out, _grad_stat):
        dq, dk, dv, dsinks = AttentionVJP.apply(ctx.kernels, ctx.problem, *ctx.saved_tensors, grad_out)
        return None, None, dq, dk, dv, dsinks, None, None

    @staticmethod
    def jvp(ctx, _kernels, _problem, q_dot, k_dot, v_dot, sinks_dot, _mask, _seed):
        q, k, v, sinks, mask, seed, out, stat = ctx.saved_tensors
        tangents = _zeros_for_missing((q_dot, k_dot, v_dot, sinks_dot), (q, k, v, sinks))
        out_dot, _ = AttentionJVP.apply(
            ctx.kernels, ctx.problem, q, k, v, sinks, mask, seed, out, stat, *tangents
        )
        return out_dot, None

    @staticmethod
    def vmap(info, in_dims, kernels, problem, *tensors):
        return _vmap_apply(Attention, info, in_dims, kernels, problem, *tensors)


class AttentionJVP(torch.autograd.Function):
    """``(..., O, stat, qd, kd, vd, sinksd) -> (Od, aux)``: the tangent output, differentiable."""

    @staticmethod
    def forward(kernels, problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot):
        return kernels.jvp(problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kernels, problem, *tensors = inputs
        out_dot, aux = output
        ctx.mark_non_differentiable(aux)
        ctx.save_for_backward(*tensors, out_dot, aux)
        ctx.kernels, ctx.problem = kernels, problem

    @staticmethod
    def backward(ctx, h, _grad_aux):
        _seed_error(ctx.problem)
        q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot, out_dot, aux = (
            ctx.saved_tensors
        )
        grads = _call(
            ctx.kernels.tangent_backward, ctx.kernels, ctx.problem,
            q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot, out_dot, aux, h,
        )  # fmt: skip
        dq, dk, dv, dsinks, dq_dot, dk_dot, dv_dot, dsinks_dot = grads
        return None, None, dq, dk, dv, dsinks, None, None, None, None, dq_dot, dk_dot, dv_dot, dsinks_dot

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            composition_error(
                ctx.kernels.backend,
                ctx.problem.normalizer.name,
                "a JVP of its JVP (second-order forward mode)",
            )
        )

    @staticmethod
    def vmap(info, in_dims, kernels, problem, *tensors):
        return _vmap_apply(AttentionJVP, info, in_dims, kernels, problem, *tensors)


class AttentionVJP(torch.autograd.Function):
    """``(..., O, stat, dO) -> (dq, dk, dv, dsinks)``: the gradient, differentiable once more."""

    @staticmethod
    def forward(kernels, problem, q, k, v, sinks, mask, seed, out, stat, grad_out):
        return kernels.backward(problem, q, k, v, sinks, mask, seed, out, stat, grad_out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kernels, problem, *tensors = inputs
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.kernels, ctx.problem = kernels, problem

    @staticmethod
    def _primal_tangent(ctx, tangents, grad_out):
        """``d/de J(x + e t)^T dO``: run the JVP along ``t``, then the primal part of its gradient."""
        q, k, v, sinks, mask, seed, out, stat, _ = ctx.saved_tensors
        kernels, problem = ctx.kernels, ctx.problem
        out_dot, aux = _call(kernels.jvp, kernels, problem, q, k, v, sinks, mask, seed, out, stat, *tangents)
        primal = _call(
            kernels.tangent_backward, kernels, problem,
            q, k, v, sinks, mask, seed, out, stat, *tangents, out_dot, aux, grad_out, need_tangent=False,
        )[:4]  # fmt: skip
        return primal, out_dot

    @staticmethod
    def backward(ctx, dq_bar, dk_bar, dv_bar, dsinks_bar):
        # d/dx <dO, J(x) t'> with t' the cotangent of the gradient, and d/d(dO) = J(x) t'
        _seed_error(ctx.problem)
        q, k, v, sinks, mask, seed, out, stat, grad_out = ctx.saved_tensors
        tangents = _zeros_for_missing((dq_bar, dk_bar, dv_bar, dsinks_bar), (q, k, v, sinks))
        (dq, dk, dv, dsinks), d_grad_out = AttentionVJP._primal_tangent(ctx, tangents, grad_out)
        return None, None, dq, dk, dv, dsinks, None, None, None, None, d_grad_out

    @staticmethod
    def jvp(ctx, _kernels, _problem, q_dot, k_dot, v_dot, sinks_dot, _mask, _seed, _out, _stat, grad_out_dot):
        # tangent of J(x)^T dO along (x_dot, dO_dot): J^T dO_dot + d/de J(x + e x_dot)^T dO
        _seed_error(ctx.problem)
        q, k, v, sinks, mask, seed, out, stat, grad_out = ctx.saved_tensors
        tangents = _zeros_for_missing((q_dot, k_dot, v_dot, sinks_dot), (q, k, v, sinks))
        primal, _ = AttentionVJP._primal_tangent(ctx, tangents, grad_out)
        if grad_out_dot is None:
            return primal
        kernels, problem = ctx.kernels, ctx.problem
        linear = _call(
            kernels.backward, kernels, problem, q, k, v, sinks, mask, seed, out, stat, grad_out_dot
        )
        return tuple(None if a is None else a + b for a, b in zip(primal, linear, strict=True))

    @staticmethod
    def vmap(info, in_dims, kernels, problem, *tensors):
        return _vmap_apply(AttentionVJP, info, in_dims, kernels, problem, *tensors)


class CompiledAttention(torch.autograd.Function):
    """What ``torch.compile`` traces: :class:`Attention`'s forward and backward, without the JVP.

    Dynamo cannot trace an ``autograd.Function`` that defines a custom ``jvp``; inside a compiled
    region the kernels' forward and backward are traced (Inductor fuses the torch backend's tile
    code; the Triton kernels are custom ops with fake implementations). Forward mode and second
    derivatives through a compiled region raise; ``torch.func.jvp`` of eager code is unaffected.
    """

    @staticmethod
    def forward(kernels, problem, q, k, v, sinks, mask, seed):
        return kernels.forward(problem, q, k, v, sinks, mask, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_attention(ctx, inputs, output, forward_mode=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_stat):
        dq, dk, dv, dsinks = ctx.kernels.backward(ctx.problem, *ctx.saved_tensors, grad_out)
        return None, None, dq, dk, dv, dsinks, None, None


def attention_function(
    kernels: Kernels, problem: Problem, q: Tensor, k: Tensor, v: Tensor, sinks, mask, seed
) -> Tensor:
    """``O`` with every derivative of :class:`Attention` (the entry point of kernel backends).

    Inside a ``torch.compile`` region the call is :class:`CompiledAttention` (forward and
    backward). A ``torch.func`` transform traced around it differentiates the traced forward
    (torch backend: exact) or meets the Triton ops' own autograd kernels, which raise rather than
    drop a derivative (tests/test_compile.py). ``grad="seed"`` breaks the graph and runs eagerly.
    """
    if torch.compiler.is_compiling():
        if problem.grad == "seed":
            # traced ops would differentiate to the true derivative, not the shortcut: run eagerly
            torch._dynamo.graph_break()
        else:
            return CompiledAttention.apply(kernels, problem, q, k, v, sinks, mask, seed)[0]
    return Attention.apply(kernels, problem, q, k, v, sinks, mask, seed)[0]
