"""The one test helper module: inputs, an independent materialized reference, the FlashAttention
error rule, gradcheck, and every first derivative of a function in one call."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import normattn

F64 = {"rtol": 1e-9, "atol": 1e-10}

# (B, H, H_kv, Tq, Tk, d, dv): T = 1, 7, 63, 257; Tq != Tk both ways; head dims 3..80; dv != d
UGLY_SHAPES = [
    (1, 1, 1, 1, 1, 3, 3),
    (2, 3, 3, 7, 7, 24, 24),
    (1, 2, 2, 63, 63, 72, 40),
    (1, 1, 1, 257, 257, 80, 80),
    (2, 1, 1, 7, 63, 24, 16),
    (1, 2, 2, 63, 7, 3, 5),
]


def shape_id(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def inputs(shape, dtype=torch.float64, transposed=True, requires_grad=False, magnitude=1.0, generator=None):
    """``q, k, v`` for ``shape = (B, H, H_kv, Tq, Tk, d, dv)``; ``transposed`` makes them
    ``(B, T, H, d)`` views (non-contiguous), as a model's projections are."""
    b, h, h_kv, t_q, t_k, d, dv = shape
    out = []
    for heads, t, width in ((h, t_q, d), (h_kv, t_k, d), (h_kv, t_k, dv)):
        if transposed:
            x = torch.randn(b, t, heads, width, dtype=dtype, generator=generator).transpose(1, 2)
        else:
            x = torch.randn(b, heads, t, width, dtype=dtype, generator=generator)
        out.append((magnitude * x).detach().requires_grad_(requires_grad))
    return out


def attend(backend: str, normalizer="softmax", **options) -> Callable[..., Tensor]:
    """``f(q, k, v)`` (or ``f(q, k, v, sinks)``) calling ``normattn.attention`` with fixed options."""

    def f(q, k, v, sinks=None):
        extra = {} if sinks is None else {"sinks": sinks}
        return normattn.attention(q, k, v, normalizer=normalizer, backend=backend, **options, **extra)

    return f


def call_with_defaults(shapes: dict, **kwargs) -> Tensor:
    """``normattn.attention`` on random ``q, k, v`` of ``shapes``, any of them replaced by ``kwargs``."""
    tensors = {name: kwargs.pop(name, None) for name in ("q", "k", "v")}
    q, k, v = (torch.randn(shapes[name]) if x is None else x for name, x in tensors.items())
    return normattn.attention(q, k, v, **kwargs)


def all_derivatives(
    f, primals: Sequence[Tensor], cotangent: Tensor, tangents: Sequence[Tensor]
) -> list[Tensor]:
    """``[out, *vjp(cotangent), jvp(tangents)]``."""
    out, vjp = torch.func.vjp(f, *primals)
    _, out_dot = torch.func.jvp(f, tuple(primals), tuple(tangents))
    return [out, *vjp(cotangent), out_dot]


def gradcheck(
    f, primals: Sequence[Tensor], fast: bool | None = None, interpreted: bool = False, forward_ad: bool = True
) -> bool:
    """float64 ``gradcheck`` with ``check_forward_ad``: full Jacobians for small inputs, random
    projections (``fast_mode``) beyond. ``interpreted`` (Triton kernels through the interpreter,
    which pays per kernel call): random projections, and no undefined-cotangent check (the autograd
    layer it exercises is the one every kernel backend shares, checked on the torch backend)."""
    primals = [x.detach().requires_grad_() for x in primals]
    if fast is None:
        fast = interpreted or sum(x.numel() for x in primals) > 600
    return torch.autograd.gradcheck(
        f,
        primals,
        check_forward_ad=forward_ad,
        fast_mode=fast,
        atol=1e-7,
        rtol=1e-5,
        check_undefined_grad=not interpreted,
    )


def assert_flash_rule(
    ours: Sequence[Tensor], baseline: Sequence[Tensor], truth: Sequence[Tensor], names, floor: float
):
    """FlashAttention's rule: error vs a float64 truth at most 2x (outputs) / 3x (derivatives) that
    of plain PyTorch (``baseline``) in the same dtype, plus a small ``floor``."""
    for name, a, b, t in zip(names, ours, baseline, truth, strict=True):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err = (a.double() - t).abs().max().item()
        base = (b.double() - t).abs().max().item()
        factor = 2 if name == "out" else 3
        assert err <= factor * base + floor, f"{name}: error {err:.3g} vs plain PyTorch's {base:.3g}"


# -- an independent reference: each normalizer written from its definition, materialized -------


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: str = "softmax",
    *,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    sinks: Tensor | None = None,
    scale: float | None = None,
    sigmoid_bias: float | None = None,
) -> Tensor:
    """Attention written from each normalizer's published definition, not from the spec.

    Plain autograd, materialized weights, ``k, v`` repeated for grouped-query heads.
    """
    t_q, t_k = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    c = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = c * q @ k.transpose(-2, -1)
    i = torch.arange(t_q)[:, None]
    j = torch.arange(t_k)[None, :]
    keep = torch.ones(t_q, t_k, dtype=torch.bool)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    off = t_k - t_q
    if left is not None:
        keep = keep & (j >= i + off - left)
    if right is not None:
        keep = keep & (j <= i + off + right)
    keep = keep.expand(s.shape)
    if attn_mask is not None:
        keep = keep & attn_mask
    zero = torch.zeros((), dtype=s.dtype)
    if normalizer == "softmax":
        logits = s.masked_fill(~keep, -math.inf)
        if sinks is not None:
            sink = sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:-1], 1)
            w = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
        else:
            empty = ~keep.any(-1, keepdim=True)
            w = torch.softmax(logits.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    elif normalizer == "beta":
        x = torch.where(keep, s, zero)
        r2 = (x * x).sum(-1, keepdim=True)
        safe = torch.where(r2 > 0, r2, torch.ones_like(r2))
        w = x / (1 + torch.where(r2 > 0, safe.sqrt(), zero))
    elif normalizer == "sigmoid":
        bias = -math.log(t_k) if sigmoid_bias is None else sigmoid_bias
        w = torch.where(keep, torch.sigmoid(s + bias), zero)
    elif normalizer == "softpick":
        # relu(exp(s) - 1) / (sum |exp(s) - 1| + 1e-6), directly (fine for moderate scores)
        x = torch.where(keep, s, zero)
        ex = torch.where(keep, torch.expm1(x), zero)
        w = torch.relu(ex) / (ex.abs().sum(-1, keepdim=True) + 1e-6)
    else:
        raise ValueError(normalizer)
    return w @ v
