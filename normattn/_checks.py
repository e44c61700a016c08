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


def attention_inputs(q: object, k: object, v: object, scale: object) -> float:
    """Check ``q (B, H, Tq, d)``, ``k (B, H, Tk, d)``, ``v (B, H, Tk, dv)``; return the scale."""
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
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(f"q, k and v must have the same number of heads (dim 1), got {shapes}")
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
