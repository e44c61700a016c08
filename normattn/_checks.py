"""Input validation shared by every public entry point: clear errors before any kernel runs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def choice(arg: str, value: object, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{arg} must be one of {list(valid)}, got {value!r}")
    return value


def float_tensor(arg: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{arg} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    return x


def attention_inputs(q: object, k: object, v: object, scale: object, enable_gqa: bool = False) -> float:
    """Check ``q (B, H, Tq, d)``, ``k (B, H_kv, Tk, d)``, ``v (B, H_kv, Tk, dv)``; return the scale.

    ``H_kv`` must equal ``H``, or divide it when ``enable_gqa`` (grouped-query attention).
    """
    for arg, x in (("q", q), ("k", k), ("v", v)):
        float_tensor(arg, x)
        if x.dim() != 4:
            raise ValueError(
                f"{arg} must have 4 dimensions (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}"
            )
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must have the same batch size (dim 0), got {shapes}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads (dim 1), got {shapes}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if q.shape[1] != k.shape[1]:
        if not enable_gqa:
            raise ValueError(
                f"q has {q.shape[1]} heads but k and v have {k.shape[1]}: pass enable_gqa=True for "
                f"grouped-query attention, or give them the same number of heads (dim 1); got {shapes}"
            )
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(
                f"grouped-query attention needs the query heads ({q.shape[1]}) to be a multiple of the "
                f"key/value heads ({k.shape[1]}); got {shapes}"
            )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim (dim 3), got {shapes}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of tokens (dim 2), got {shapes}")
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[3] == 0:
            raise ValueError(f"{arg} must have a head dim of at least 1, got {shapes}")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[3])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive finite number or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def reduce_dims(dim: object, ndim: int, shape: Sequence[int]) -> tuple[int, ...]:
    """Normalise ``dim`` (an int or a tuple of ints) to sorted non-negative axes."""
    dims = (dim,) if isinstance(dim, int) and not isinstance(dim, bool) else dim
    if (
        not isinstance(dims, (tuple, list))
        or not dims
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
    ):
        raise TypeError(f"dim must be an int or a non-empty tuple of ints, got {dim!r}")
    out = []
    for d in dims:
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise ValueError(
                f"dim {d} is out of range for a tensor of shape {tuple(shape)} "
                f"(expected in [{-ndim}, {ndim - 1}])"
            )
        out.append(d % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ValueError(f"dim must not repeat an axis, got {dim!r} for shape {tuple(shape)}")
    for d in out:
        if ndim and shape[d] == 0:
            raise ValueError(f"cannot reduce over axis {d} of size 0 (tensor shape {tuple(shape)})")
    return tuple(sorted(out))


def boolean(arg: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{arg} must be a bool, got {type(value).__name__}")
    return value


def attn_mask(mask: object, q: Tensor, k: Tensor) -> Tensor | None:
    """A bool mask broadcastable to ``(B, H, Tq, Tk)`` as a 4-d view; size-1 batch and head dims stay 1.

    ``True`` means the query may attend to the key (SDPA's convention). Broadcast dims become
    stride-0 views: nothing is copied.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"attn_mask must be a torch.Tensor of dtype torch.bool or None, got {type(mask).__name__}"
        )
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dtype != torch.bool:
        raise TypeError(
            f"attn_mask must be a boolean tensor (True = may attend), got dtype {mask.dtype}; pass a boolean "
            f"mask, e.g. mask > 0 or float_mask == 0 for an additive mask of 0 and -inf"
        )
    if mask.device != q.device:
        raise ValueError(f"attn_mask is on {mask.device}, but q is on {q.device}")
    if mask.dim() > 4 or any(m not in (1, t) for m, t in zip(mask.shape[::-1], target[::-1])):
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} is not broadcastable to "
            f"(batch, heads, Tq, Tk) = {target}"
        )
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask.expand(mask.shape[0], mask.shape[1], target[2], target[3])


def window(value: object) -> tuple[int | None, int | None]:
    """``(left, right)``: each an int >= 0, or None for unbounded on that side."""
    if value is None:
        return None, None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"window must be a pair (left, right) of ints >= 0 or None, got {value!r}")
    for side, bound in zip(("left", "right"), value):
        if bound is None:
            continue
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise TypeError(f"window's {side} bound must be an int >= 0 or None, got {bound!r}")
        if bound < 0:
            raise ValueError(f"window's {side} bound must be >= 0, got {bound} (window={tuple(value)!r})")
    return value[0], value[1]


def dropout(p: object, generator: object, q: Tensor) -> float:
    """``dropout_p`` in ``[0, 1)``, and a generator on the inputs' device (or None)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(p).__name__}")
    if not 0 <= p < 1 or not math.isfinite(p):
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != q.device.type or (
            generator.device.index is not None
            and q.device.index is not None
            and generator.device.index != q.device.index
        ):
            raise ValueError(f"generator is on {generator.device}, but the inputs are on {q.device}")
    return float(p)


def sinks(value: object, accepts: bool, normalizer: str, q: Tensor) -> Tensor | None:
    """Per-head sink logits ``(H,)`` (one per query head), float, on the inputs' device."""
    if value is None:
        return None
    if not accepts:
        raise ValueError(f'sinks are defined for normalizer "softmax" only, got normalizer "{normalizer}"')
    float_tensor("sinks", value)
    assert isinstance(value, Tensor)
    if value.shape != (q.shape[1],):
        raise ValueError(
            f"sinks must have shape (heads,) = ({q.shape[1]},), one logit per query head, "
            f"got {tuple(value.shape)}"
        )
    if value.device != q.device:
        raise ValueError(f"sinks is on {value.device}, but q is on {q.device}")
    return value
