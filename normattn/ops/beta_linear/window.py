"""Linear-time exact beta attention on a causal sliding window, in plain PyTorch.

Query ``i`` sees keys ``i - L .. i`` (``window=(L, 0)``). As in ``chunk.py`` (docs/math.md, section
9) every sum over keys factors through the states ``H = sum_j k_j v_j^T`` and ``G = sum_j k_j k_j^T``,
but here a query's states cover only the keys of its window. Cut the sequence into chunks of ``C <= L``
positions and write ``L = m C + rho`` with ``0 <= rho < C``. A query at offset ``a`` of chunk ``c``
sees

* its own chunk ``c`` at offsets ``b <= a`` (the causal diagonal block),
* the chunks ``c - m + 1 .. c - 1`` whole (through the states, summed over those ``m - 1`` chunks),
* chunk ``c - m`` at offsets ``b >= a - rho``, and chunk ``c - m - 1`` at ``b >= C + a - rho``
  (the window's lower edge; the second block only when ``rho > 0``).

The partial chunks are ``C x C`` blocks of scores used directly (the quadratic form), so the cost is
``O(T (d^2 + C d))`` whatever ``L``, with no ``T x T`` matrix and no running sum that has to be
subtracted again (a difference of prefix states would lose ``T / L`` digits). The window sum of the
per-chunk states takes ``O(log m)`` shifted additions. The backward sums ``R = sum_i a_i q_i g_i^T`` and
``W = sum_i rho_i q_i q_i^T`` over the queries that see a key the same way, in the other direction.

Any ``Tq, Tk`` reduce to the square case (bottom-right alignment): the keys left of the first query's
window are dropped (a decoding step costs its window, not its cache), then zero rows go in front: a
zero query sees nothing that matters and gets no gradient; a zero key adds nothing to either state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention.autograd import Kernels
from ..attention.problem import Problem
from ..common import accumulation_dtype
from .chunk import (
    _grouped,
    _norm_term_coefficient,
    _rowdot,
    _take,
    _ungrouped,
    norm_from_squared,
    outer_sum,
    rows_placeholder,
    tangent_backward_through,
)

CHUNK_SIZE = 64


def window_obstacle(problem: Problem) -> str | None:
    """Why this form cannot compute the call's band, or None: it takes ``window=(L, 0)``, ``L >= 1``."""
    if problem.right != 0 or problem.left is None:
        return "only a causal sliding window, window=(left, 0), has a linear-time form here"
    if problem.left < 1:
        return "window=(0, 0) (each query sees only its own key) has no use for the linear-time form"
    return None


def _add_shifted(dest: Tensor, x: Tensor, chunks: int) -> None:
    """``dest[c] += x[c - chunks]`` along the chunk axis (-3) where ``c - chunks`` is in range
    (a negative ``chunks`` adds the later chunks: ``dest[c] += x[c + |chunks|]``)."""
    n = x.shape[-3]
    if abs(chunks) >= n:
        return
    if chunks >= 0:
        dest[..., chunks:, :, :] += x[..., : n - chunks, :, :]
    else:
        dest[..., : n + chunks, :, :] += x[..., -chunks:, :, :]


def _window_sum(x: Tensor, width: int, direction: int) -> Tensor | None:
    """``sum_{t=1}^{width} x[c - direction * t]`` per chunk ``c``: the sum over the ``width`` chunks
    before it (``direction=1``) or after it (``-1``), by ``O(log width)`` shifted in-place additions
    of sums over 1, 2, 4, ... chunks. None when ``width`` is 0."""
    width = min(width, x.shape[-3] - 1)
    if width <= 0:
        return None
    total = torch.zeros_like(x)
    block, size, done = x, 1, 1  # block[c]: the sum over ``size`` chunks from c on (in direction)
    while True:
        if width & 1:
            _add_shifted(total, block, direction * done)
            done += size
        width >>= 1
        if not width:
            return total
        grown = block.clone()
        _add_shifted(grown, block, direction * size)
        block, size = grown, 2 * size


class _Layout:
    """Chunking of one square call: ``C``, ``m = L // C``, ``rho = L % C`` and the partial blocks."""

    def __init__(self, length: int, left: int, chunk_size: int) -> None:
        self.length = length
        self.chunk = max(1, min(chunk_size, left, length))
        self.whole, rho = divmod(left, self.chunk)  # m >= 1 since C <= L
        self.n_chunks = -(-length // self.chunk)
        # the own chunk (causal: b <= a), then the window's lower edge: (chunks back, lowest b - a seen);
        # an edge at least n_chunks back has no keys
        edges = [(self.whole, -rho)] + ([(self.whole + 1, self.chunk - rho)] if rho else [])
        self.blocks = [(0, None)] + [(back, lowest) for back, lowest in edges if back < self.n_chunks]

    def take(self, x: Tensor, acc: torch.dtype, scale: float | None = None) -> Tensor:
        """``[..., T, e] -> [..., NC, C, e]`` in the accumulation dtype, zero-padded at the end."""
        return _take(x, slice(None), self, acc, scale)

    def put(self, x: Tensor) -> Tensor:
        """``[..., NC, C, e] -> [..., T, e]`` without the padding."""
        return x.flatten(-3, -2)[..., : self.length, :]

    def states(self, a: Tensor, b: Tensor) -> Tensor | None:
        """Per chunk, ``sum_j a_j b_j^T`` over the keys of the ``m - 1`` whole chunks before it
        (None when there are none)."""
        return _window_sum(outer_sum(a, b), self.whole - 1, 1)

    def reverse_states(self, a: Tensor, b: Tensor) -> Tensor | None:
        """Per chunk, ``sum_i a_i b_i^T`` over the queries of the ``m - 1`` whole chunks after it and
        over the query heads of a group (axis 2): one state per shared key/value head."""
        return _window_sum(outer_sum(a, b).sum(2, keepdim=True), self.whole - 1, -1)


def _block_scores(q: Tensor, k: Tensor, back: int, lowest: int | None) -> Tensor:
    """Scores of query chunks ``back..NC-1`` against key chunks ``0..NC-1-back``, masked to what a
    query sees: ``b <= a`` in its own chunk (``lowest`` None), ``b - a >= lowest`` on the edge.

    ``[..., NC - back, C, d] @ [..., NC - back, d, C] -> [..., NC - back, C, C]``
    """
    return _visible(q[..., back:, :, :] @ _keys(k, back).transpose(-1, -2), lowest)


def _visible(x: Tensor, lowest: int | None) -> Tensor:
    """A block masked to the pairs a query sees (``_block_scores``)."""
    return x.tril() if lowest is None else x.triu(lowest)


def _keys(x: Tensor, back: int) -> Tensor:
    """Key chunks ``0..NC-1-back``: the keys that query chunks ``back..`` see ``back`` chunks back."""
    return x[..., : x.shape[-3] - back, :, :]


def _forward(layout: _Layout, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    acc = accumulation_dtype(q.dtype)
    qc, kc, vc = layout.take(q, acc, scale), layout.take(k, acc), layout.take(v, acc)
    dv = vc.shape[-1]
    u = qc.new_zeros(*torch.broadcast_shapes(qc.shape[:-1], vc.shape[:-1]), dv)
    squared = u.new_zeros(*u.shape[:-1], 1)
    states = layout.states(kc, torch.cat([vc, kc], -1))  # [H | G] per chunk: [..., NC, d, dv + d]
    if states is not None:
        hg_q = qc @ states  # [..., NC, C, d] @ [..., NC, d, dv + d]
        u += hg_q[..., :dv]
        squared += _rowdot(hg_q[..., dv:], qc)
    for back, lowest in layout.blocks:
        s = _block_scores(qc, kc, back, lowest)
        u[..., back:, :, :] += s @ _keys(vc, back)  # [..., C, C] @ [..., C, dv]
        squared[..., back:, :, :] += (s * s).sum(-1, keepdim=True)
    r = norm_from_squared(squared)
    return layout.put(u / (1 + r))


def _backward(
    layout: _Layout, q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, scale: float, grad: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the accumulation dtype; the formulas of ``chunk._backward`` per block."""
    exact = grad == "exact"
    acc = accumulation_dtype(q.dtype)
    qc, kc, vc = layout.take(q, acc, scale), layout.take(k, acc), layout.take(v, acc)
    go, o = layout.take(grad_out, acc), layout.take(out, acc)
    dv_width = vc.shape[-1]
    # row statistics, recomputed as in the forward
    states = layout.states(kc, torch.cat([vc, kc], -1))  # [H | G]
    hg_q = None if states is None else qc @ states
    squared = torch.zeros_like(qc[..., :1]) if hg_q is None else _rowdot(hg_q[..., dv_width:], qc)
    scores = []
    for back, lowest in layout.blocks:
        s = _block_scores(qc, kc, back, lowest)
        squared[..., back:, :, :] += (s * s).sum(-1, keepdim=True)
        scores.append(s)
    r = norm_from_squared(squared)
    a = 1 / (1 + r)
    rho = _rowdot(go, o) * _norm_term_coefficient(r, exact)
    ag = a * go
    # whole chunks: dq_i = a_i H_i g_i - rho_i G_i q_i; dk_j = R_j v_j - W_j k_j, dv_j = R_j^T k_j
    dq = torch.zeros_like(qc)
    if states is not None:
        dq -= rho * hg_q[..., dv_width:]
        if exact:
            dq += ag @ states[..., :dv_width].transpose(-1, -2)  # [.., C, dv] @ [.., dv, d]
    # key-side gradients of the shared heads only: the group is summed inside each product
    dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
    later = layout.reverse_states(qc, torch.cat([ag, rho * qc], -1))  # [R | W]: [..., NC, d, dv + d]
    if later is not None:
        rw_k = kc @ later  # [..., NC, C, d] @ [..., NC, d, dv + d]
        dv += rw_k[..., :dv_width]
        dk -= rw_k[..., dv_width:]  # W is symmetric: (W k_j)^T = k_j^T W
        if exact:
            dk += vc @ later[..., :dv_width].transpose(-1, -2)
    # the partial blocks: ds_ij = a_i (g_i . v_j) - rho_i s_ij, used directly
    for (back, lowest), s in zip(layout.blocks, scores, strict=True):
        rows = slice(back, None)
        ds = -rho[..., rows, :, :] * s
        if exact:
            ds += a[..., rows, :, :] * _visible(
                go[..., rows, :, :] @ _keys(vc, back).transpose(-1, -2), lowest
            )
        dq[..., rows, :, :] += ds @ _keys(kc, back)  # [..., C, C] @ [..., C, d]
        n = layout.n_chunks - back  # key chunks 0..n-1 get the gradient of these pairs
        # [C, G C] @ [G C, d] -> [C, d] per chunk: sum_g ds_g^T q_g
        dk[..., :n, :, :] += torch.einsum("bhgnij,bhgnid->bhnjd", ds, qc[..., rows, :, :]).unsqueeze(2)
        dv[..., :n, :, :] += torch.einsum(
            "bhgnij,bhgnie->bhnje", a[..., rows, :, :] * s, go[..., rows, :, :]
        ).unsqueeze(2)
    return layout.put(scale * dq), layout.put(dk), layout.put(dv)


def _jvp(
    layout: _Layout, q, k, v, out, q_dot, k_dot, v_dot, scale: float, grad: str
) -> Tensor:  # fmt: skip
    """``Od_i = Ud_i / N_i - kappa_i P_i O_i`` (``chunk._jvp``) with window states and blocks:
    ``P_i = sum_j s_ij sd_ij`` and ``Ud_i = sum_j s_ij vd_j`` (+ ``sd_ij v_j`` when exact)."""
    exact = grad == "exact"
    acc = accumulation_dtype(q.dtype)
    qc, qc_dot = layout.take(q, acc, scale), layout.take(q_dot, acc, scale)
    kc, vc, kc_dot, vc_dot = (layout.take(x, acc) for x in (k, v, k_dot, v_dot))
    o = layout.take(out, acc)
    d, dv = kc.shape[-1], vc.shape[-1]
    shape = torch.broadcast_shapes(qc.shape[:-1], kc.shape[:-1])
    ud, squared, p = qc.new_zeros(*shape, dv), qc.new_zeros(*shape, 1), qc.new_zeros(*shape, 1)
    # whole chunks: G, Gd = sum k kd^T, sum k vd^T and (exact) H = sum k v^T, in one window sum
    states = layout.states(kc, torch.cat([kc, kc_dot, vc_dot, vc] if exact else [kc, kc_dot, vc_dot], -1))
    if states is not None:
        through_q = qc @ states[..., : 2 * d + dv]  # [G q | Gd^T q | Hvd^T q]
        gq = through_q[..., :d]
        squared += _rowdot(gq, qc)
        p += _rowdot(gq, qc_dot) + _rowdot(through_q[..., d : 2 * d], qc)
        ud += through_q[..., 2 * d :]
        if exact:
            ud += qc_dot @ states[..., 2 * d + dv :] + qc @ layout.states(kc_dot, vc)
    for back, lowest in layout.blocks:
        rows = slice(back, None)
        k_block, v_block = _keys(kc, back), _keys(vc, back)
        s = _block_scores(qc, kc, back, lowest)
        s_dot = _visible(
            qc_dot[..., rows, :, :] @ k_block.transpose(-1, -2)
            + qc[..., rows, :, :] @ _keys(kc_dot, back).transpose(-1, -2),
            lowest,
        )
        squared[..., rows, :, :] += (s * s).sum(-1, keepdim=True)
        p[..., rows, :, :] += (s * s_dot).sum(-1, keepdim=True)
        ud[..., rows, :, :] += s @ _keys(vc_dot, back)
        if exact:
            ud[..., rows, :, :] += s_dot @ v_block
    r = norm_from_squared(squared)
    return layout.put(ud / (1 + r) - _norm_term_coefficient(r, exact) * p * o)


# -- steps along the sequence, and the four kernels -------------------------------------------------

# Queries per step. A step is a square call on its queries and the ``left`` positions before them
# (their window), so those are recomputed: steps of at least 4 x left recompute at most 25%. Measured
# at T = 16384, window (512, 0), B=1 H=4 d=64 fp32 on 2 cores, forward: the whole sequence in one
# step ran 2.5x slower than a causal call of the same length (its chunk states outgrow the caches).
GROUP_SIZE = 2048


def _steps(length: int, left: int):
    """``(start, first, stop)``: queries ``[first, stop)`` computed from positions ``[start, stop)``."""
    size = max(GROUP_SIZE, 4 * left)
    for first in range(0, length, size):
        yield max(0, first - left), first, min(length, first + size)


class _Square(NamedTuple):
    """A call as a square one: the keys no query sees are dropped, then zero rows put in front."""

    length: int
    q_rows: int  # zero query rows in front
    k_rows: int  # zero key rows in front
    unseen: int  # leading keys that no query sees (left of the first query's window)


def _square(problem: Problem, q: Tensor, k: Tensor) -> _Square:
    obstacle = window_obstacle(problem)
    if obstacle is not None:
        raise ValueError(f"the sliding-window linear-time beta path: {obstacle}")
    t_q, t_k = q.shape[-2], k.shape[-2]
    unseen = max(0, t_k - t_q - problem.left)  # query 0 sees keys from Tk - Tq - left on
    length = max(t_q, t_k - unseen)
    return _Square(length, length - t_q, length - (t_k - unseen), unseen)


def _front(x: Tensor, rows: int) -> Tensor:
    return F.pad(x, (0, 0, rows, 0)) if rows else x


def _keys_in(square: _Square, *xs: Tensor) -> list[Tensor]:
    """Key-side inputs ``(B, H_kv, Tk, e)`` as ``(B, H_kv, 1, length, e)``."""
    return [_front(x[..., square.unseen :, :].unsqueeze(2), square.k_rows) for x in xs]


def _inputs(problem: Problem, q, k, v, *query_side):
    """Grouped, square inputs: ``(square, q5, k5, v5, *query_side5)``."""
    square = _square(problem, q, k)
    query = [_front(_grouped(x, k.shape[1]), square.q_rows) for x in (q, *query_side)]
    return square, query[0], *_keys_in(square, k, v), query[1:]


def _rows(*xs: Tensor, start: int, stop: int) -> list[Tensor]:
    return [x[..., start:stop, :] for x in xs]


def _key_grad(x: Tensor, square: _Square, like: Tensor) -> Tensor:
    """A key-side gradient ``(B, H_kv, 1, length, e)`` without the padding, zero for the unseen keys."""
    return _front(x[..., square.k_rows :, :].squeeze(2), square.unseen).to(like.dtype)


def forward(problem: Problem, q, k, v, sinks, mask, seed):
    square, q5, k5, v5, _ = _inputs(problem, q, k, v)
    parts = []
    for start, first, stop in _steps(square.length, problem.left):
        layout = _Layout(stop - start, problem.left, CHUNK_SIZE)
        part = _forward(layout, *_rows(q5, k5, v5, start=start, stop=stop), problem.scale)
        parts.append(part[..., first - start :, :])
    out = torch.cat(parts, -2)
    return _ungrouped(out[..., square.q_rows :, :], q), rows_placeholder(q)


def backward(problem: Problem, q, k, v, sinks, mask, seed, out, stat, grad_out):
    square, q5, k5, v5, (o5, g5) = _inputs(problem, q, k, v, out, grad_out)
    acc = accumulation_dtype(q.dtype)
    dk, dv = k5.new_zeros(k5.shape, dtype=acc), v5.new_zeros(v5.shape, dtype=acc)  # the shared heads
    dq_parts = []
    for start, first, stop in _steps(square.length, problem.left):
        layout = _Layout(stop - start, problem.left, CHUNK_SIZE)
        # the step's context queries belong to the step before: a zero cotangent leaves them out
        g_step = _front(g5[..., first:stop, :], first - start)
        dq_step, dk_step, dv_step = _backward(
            layout, *_rows(q5, k5, v5, o5, start=start, stop=stop), g_step, problem.scale, problem.grad
        )
        dq_parts.append(dq_step[..., first - start :, :])
        dk[..., start:stop, :] += dk_step
        dv[..., start:stop, :] += dv_step
    dq = torch.cat(dq_parts, -2)
    dq = _ungrouped(dq[..., square.q_rows :, :], q)
    return dq, _key_grad(dk, square, k), _key_grad(dv, square, v), None


def jvp(problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot):
    square, q5, k5, v5, (o5, qd5) = _inputs(problem, q, k, v, out, q_dot)
    kd5, vd5 = _keys_in(square, k_dot, v_dot)
    parts = []
    for start, first, stop in _steps(square.length, problem.left):
        layout = _Layout(stop - start, problem.left, CHUNK_SIZE)
        tensors = _rows(q5, k5, v5, o5, qd5, kd5, vd5, start=start, stop=stop)
        part = _jvp(layout, *tensors, problem.scale, problem.grad)
        parts.append(part[..., first - start :, :])
    out_dot = torch.cat(parts, -2)
    return _ungrouped(out_dot[..., square.q_rows :, :], q), rows_placeholder(q)


def tangent_backward(
    problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot, out_dot, aux, h,
    need_tangent: bool = True,
):  # fmt: skip
    """The gradient of ``<h, Od>``: forward mode through ``backward`` (``tangent_backward_through``)."""
    return tangent_backward_through(
        backward, problem, q, k, v, out, q_dot, k_dot, v_dot, out_dot, h, need_tangent
    )


KERNELS = Kernels("torch", forward, backward, jvp, tangent_backward)
