"""Token-by-token recurrent beta attention: the plain reference for the chunked and decoding paths.

Walks the keys one at a time, adding each to the states ``H = sum_j k_j v_j^T`` and
``G = sum_j k_j k_j^T`` (docs/math.md, section 9), and reads a query out as soon as its last visible key
is in: ``O_i = c H^T q_i / (1 + c sqrt(q_i^T G q_i))``. Slow (a Python loop over positions) and
obviously right; it shares no code with ``chunk.py`` or ``recurrent.py`` so that agreement means
something. Differentiable by autograd wherever ``r_i > 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import accumulation_dtype


def beta_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> Tensor:
    """beta attention of ``q (B, H, Tq, d)``, ``k (B, H, Tk, d)``, ``v (B, H, Tk, dv)`` -> ``(B, H, Tq, dv)``.

    Causal masks align bottom-right: query ``i`` reads the states after key ``i + Tk - Tq``
    (and outputs 0 when that index is negative).
    """
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    t_q, t_k = q.shape[-2], k.shape[-2]
    h = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])  # [B, H, d, dv]
    g = q.new_zeros(*q.shape[:2], q.shape[-1], q.shape[-1])  # [B, H, d, d]
    keys_in = 0
    rows = []
    for i in range(t_q):
        last_visible = i + t_k - t_q if causal else t_k - 1
        while keys_in <= last_visible:
            k_j, v_j = k[:, :, keys_in], v[:, :, keys_in]
            h = h + k_j[..., :, None] * v_j[..., None, :]
            g = g + k_j[..., :, None] * k_j[..., None, :]
            keys_in += 1
        q_i = q[:, :, i, None, :]  # [B, H, 1, d]
        u = scale * (q_i @ h)  # [B, H, 1, dv]
        r = scale * ((q_i @ g) * q_i).sum(-1, keepdim=True).clamp_min(0).sqrt()
        rows.append(u / (1 + r))
    if not rows:
        return q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=dtype)
    return torch.cat(rows, dim=-2).to(dtype)
