"""Linear-time exact beta attention in plain PyTorch: chunked forward, backward, JVP and the
gradient through the JVP.

beta attention (docs/math.md, sections 4 and 9) weighs row ``i`` of the scores as ``s_ij / (1 + r_i)`` with
``r_i = ||s_i||``. The numerator is linear and ``r_i^2`` quadratic in the scores, so every sum over
keys factors through the states ``H = sum_j k_j v_j^T`` (d x dv) and ``G = sum_j k_j k_j^T`` (d x d):

    U_i = H_i^T q_i,   r_i = sqrt(q_i^T G_i q_i),   O_i = U_i / (1 + r_i)

(the scale is folded into ``q`` here and below), at ``O(T d^2)`` cost with no ``T x T`` matrix.
Causal attention cuts the queries into chunks of ``C`` positions: inside a chunk the ``C x C`` block
of scores is used directly (the quadratic form), and the keys of all earlier chunks enter through
``H`` and ``G`` summed over those chunks. The backward pass does the same in reverse with
``R_j = sum_{i sees j} a_i q_i g_i^T`` and ``W_j = sum_{i sees j} rho_i q_i q_i^T``; the JVP carries
the tangent states ``Hd`` and ``Gd`` alongside ``H`` and ``G``.

The chunks are processed in groups of ``GROUP_SIZE`` positions: within a group, the states of all
chunks come from one batched matmul and one cumulative sum over the chunk axis; between groups a
single ``d x d`` state is carried (forward) or ``R, W`` are carried back (backward). So the Python
loop runs ``T / GROUP_SIZE`` times, never per position or per chunk, and the per-chunk temporaries
(``T d^2 / C`` and ``T C`` numbers per head if made for all chunks at once) stay a fixed size.
The gradient through the JVP is the exception: it keeps each group's key chunks and chunk states
from its forward sweep for the reverse one (``2 (d + e) (T + T d / C)`` numbers per key head, about
eight inputs' worth at ``C = d = e``) rather than recomputing them.

Bottom-right causal alignment with ``Tq != Tk`` reduces to the square case: when ``Tq > Tk`` the
first ``Tq - Tk`` queries see nothing (output 0, gradient 0) and are left out; when ``Tq < Tk`` the
first ``Tk - Tq`` keys are seen by every query and enter as the initial state (the "prefix").
Non-causal attention is the case where every key is in the prefix (no quadratic part).

Accuracy: ``q^T G q`` through the state has an absolute rounding error of about
``eps * q^T |G| q``, so it is clamped at 0. For a query almost orthogonal to every key (``r_i``
below that noise) the output is still right, but ``rho_i`` is a ratio of rounding noise: the norm
term of the gradient is ``O(r_i)`` in exact arithmetic and comes out at rounding level instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention.autograd import Kernels, attention_function
from ..attention.problem import Problem
from ..common import accumulation_dtype

CHUNK_SIZE = 64
# Positions handled by one vectorized step; bounds the per-chunk temporaries, not the result.
GROUP_SIZE = 1024


@dataclass(frozen=True)
class _Group:
    queries: slice  # rows of q, out, grad_out and dq
    keys: slice  # rows of the diagonal keys paired with those queries (causal)
    length: int


@dataclass(frozen=True)
class _Layout:
    """How the queries and keys of one call split into the parts the chunked algorithm handles."""

    skip: int  # leading queries that see no key (causal, Tq > Tk): output 0, gradient 0
    active: int  # the remaining queries
    n_prefix: int  # leading keys that every active query sees (all keys when not causal)
    causal: bool  # the other keys pair one-to-one with the active queries, lower-triangular
    chunk: int  # quadratic-form chunk length (non-causal: one chunk per group, no quadratic part)

    @staticmethod
    def of(t_q: int, t_k: int, causal: bool, chunk_size: int) -> _Layout:
        if not causal:
            return _Layout(0, t_q, t_k, False, chunk=max(min(GROUP_SIZE, t_q), 1))
        skip = max(t_q - t_k, 0)
        active = t_q - skip
        return _Layout(skip, active, max(t_k - t_q, 0), True, chunk=max(min(chunk_size, active), 1))

    def groups(self) -> list[_Group]:
        size = self.chunk * max(1, GROUP_SIZE // self.chunk)
        return [
            _Group(
                slice(self.skip + start, self.skip + stop),
                slice(self.n_prefix + start, self.n_prefix + stop),
                stop - start,
            )
            for start, stop in ((s, min(s + size, self.active)) for s in range(0, self.active, size))
        ]


def outer_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum_t a_t b_t^T``: ``[..., T, m], [..., T, n] -> [..., m, n]``."""
    return a.transpose(-1, -2) @ b


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``[..., e], [..., e] -> [..., 1]``: row-wise dot products, kept as a column for broadcasting."""
    return (a * b).sum(-1, keepdim=True)


def _take(
    x: Tensor | tuple[Tensor, ...], rows: slice, layout: _Layout, acc: torch.dtype, scale: float | None = None
) -> Tensor:
    """Rows of ``x`` in the accumulation dtype as chunks ``[..., NC, C, e]``, zero-padded at the end:
    zero rows add nothing to any sum. A tuple of tensors is taken side by side (concatenated along
    the last dim: one product of ``[a | b]`` instead of one of ``a`` and one of ``b``)."""
    if isinstance(x, tuple):
        x = torch.cat([t[..., rows, :] for t in x], -1).to(acc)
    else:
        x = x[..., rows, :].to(acc)
    if scale is not None:
        x = scale * x
    length = x.shape[-2]
    n_chunks = -(-length // layout.chunk)
    if n_chunks * layout.chunk != length:
        x = F.pad(x, (0, 0, 0, n_chunks * layout.chunk - length))
    # contiguous: the rows of a group are not (the heads are T rows apart), and a matmul on such a
    # view copies it first, every time it is used
    return x.unflatten(-2, (n_chunks, layout.chunk)).contiguous()


def _put(dest: Tensor, rows: slice, chunks: Tensor, length: int) -> None:
    """Write chunks ``[..., NC, C, e]`` (dropping the padding) into rows of ``dest [..., T, e]``."""
    dest[..., rows, :] = chunks.flatten(-3, -2)[..., :length, :]


def _cumsum_chunks_(x: Tensor) -> Tensor:
    """In place, the inclusive cumulative sum over the chunk axis (-3), as slice additions: torch's
    cumsum over an axis that is not the innermost took 1.1 ms where these took 0.3 ms for
    ``[4, 16, 64, 64]`` float32 states (2 cores)."""
    for chunk in range(1, x.shape[-3]):
        x[..., chunk, :, :] += x[..., chunk - 1, :, :]
    return x


def _forward_states(a: Tensor | None, b: Tensor | None, carry: Tensor) -> tuple[Tensor, Tensor]:
    """The state each chunk of a group starts from, ``[..., NC, m, n]``, and the state after the group.

    ``carry`` is ``sum_j a_j b_j^T`` over the keys before the group; the group's chunks add theirs
    one after another (one matmul, one cumulative sum over the chunk axis). Not causal
    (``a is None``): every query sees exactly ``carry``.
    """
    # [..., NC, C, m]^T @ [..., NC, C, n] -> [..., NC, m, n]
    return _forward_sums(None if a is None else outer_sum(a, b), carry)


def _forward_sums(per_chunk: Tensor | None, carry: Tensor) -> tuple[Tensor, Tensor]:
    """``_forward_states`` from the per-chunk sums ``[..., NC, m, n]`` (None: not causal)."""
    if per_chunk is None:
        return carry.unsqueeze(-3), carry
    states = torch.empty_like(per_chunk)
    states[..., :1, :, :] = carry.unsqueeze(-3)
    states[..., 1:, :, :] = per_chunk[..., :-1, :, :]
    _cumsum_chunks_(states)
    return states, states[..., -1, :, :] + per_chunk[..., -1, :, :]


def _reverse_states(a: Tensor, b: Tensor, carry: Tensor, causal: bool) -> tuple[Tensor | None, Tensor]:
    """The reverse of ``_forward_states`` for ``sum_i a_i b_i^T`` over queries: per chunk the sum
    over the later chunks of the group plus ``carry`` (the later groups), and the carry before the
    group."""
    return _reverse_sums(outer_sum(a, b), carry, causal)


def _reverse_sums(per_chunk: Tensor, carry: Tensor, causal: bool) -> tuple[Tensor | None, Tensor]:
    """``_reverse_states`` from the per-chunk sums ``[..., NC, m, n]`` (overwritten), in place as
    total minus inclusive prefix (no flipped copies)."""
    total = per_chunk.sum(-3, keepdim=True)
    if not causal:
        return None, carry + total.squeeze(-3)
    later = _cumsum_chunks_(per_chunk).neg_().add_(total + carry.unsqueeze(-3))
    return later, carry + total.squeeze(-3)


def _diagonal_scores(q: Tensor, k: Tensor) -> Tensor:
    """Scores inside each chunk, masked to ``j <= i``.

    ``[..., NC, C, d] @ [..., NC, d, C] -> [..., NC, C, C]``
    """
    return (q @ k.transpose(-1, -2)).tril_()


def _score_norm(q: Tensor, gq_earlier: Tensor, s: Tensor | None) -> Tensor:
    """``r_i = sqrt(q_i^T G_i q_i)`` as ``[..., NC, C, 1]``, from ``G q`` over the earlier keys and the
    chunk's own scores. ``G`` is positive semi-definite, so a negative sum is rounding: clamp it.

    ``r = 0`` (a zero-padded row of the last chunk, or a query orthogonal to every key) gets tangent 0
    rather than ``sqrt``'s infinite slope times 0 = NaN: the forward-mode pass through the backward
    (``tangent_backward``) differentiates this, and a padded row's NaN would reach ``dk, dv``."""
    squared = _rowdot(gq_earlier, q)
    if s is not None:
        squared += (s * s).sum(-1, keepdim=True)
    return norm_from_squared(squared)


def norm_from_squared(squared: Tensor) -> Tensor:
    """``sqrt`` of a row's ``||s_i||^2``, clamped at 0, with tangent 0 (not NaN) at 0 (``_score_norm``)."""
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1).sqrt(), 0)


def _norm_term_coefficient(r: Tensor, exact: bool) -> Tensor:
    """``kappa`` with ``rho_i = D_i kappa_i`` (backward) and ``Od_i -= kappa_i (s_i . sd_i) O_i`` (JVP).

    exact: ``1 / (N r)``; the seed shortcut (docs/math.md, section 10): ``-1 / (N r^2)``. Both are 0 at
    ``r = 0``, where beta's derivative is the identity (docs/math.md, section 4).
    """
    positive = r > 0
    safe = torch.where(positive, r, torch.ones_like(r))
    coefficient = 1 / ((1 + r) * safe) if exact else -1 / ((1 + r) * safe * safe)
    return torch.where(positive, coefficient, torch.zeros_like(r))


def _prefix(x: Tensor, layout: _Layout, acc: torch.dtype) -> Tensor:
    return x[..., : layout.n_prefix, :].to(acc)


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, chunk_size: int) -> Tensor:
    acc = accumulation_dtype(q.dtype)
    layout = _Layout.of(q.shape[-2], k.shape[-2], causal, chunk_size)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=acc)
    k_prefix, v_prefix = _prefix(k, layout, acc), _prefix(v, layout, acc)
    h, g = outer_sum(k_prefix, v_prefix), outer_sum(k_prefix, k_prefix)
    for group in layout.groups():
        qc = _take(q, group.queries, layout, acc, scale)
        kc = _take(k, group.keys, layout, acc) if causal else None
        vc = _take(v, group.keys, layout, acc) if causal else None
        h_chunks, h = _forward_states(kc, vc, h)
        u = qc @ h_chunks  # [..., NC, C, d] @ [..., NC, d, dv] -> [..., NC, C, dv]
        del h_chunks
        g_chunks, g = _forward_states(kc, kc, g)
        s = _diagonal_scores(qc, kc) if causal else None
        r = _score_norm(qc, qc @ g_chunks, s)
        del g_chunks
        if s is not None:
            u += s @ vc  # [..., NC, C, C] @ [..., NC, C, dv] -> [..., NC, C, dv]
        _put(out, group.queries, u.div_(1 + r), group.length)
    return out


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    grad_out: Tensor,
    scale: float,
    causal: bool,
    grad: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the accumulation dtype (docs/math.md, section 9).

    In score space (scale folded into ``q``) ``ds_ij = alpha_i (g_i . v_j) - rho_i s_ij`` with
    ``alpha_i = a_i = 1 / N_i`` when exact. The seed shortcut's ``ds_ij = D_i s_ij / (r_i^2 N_i)`` is
    the same with ``alpha = 0`` and ``rho_i = -D_i / (r_i^2 N_i)``; ``dv_j = sum_i a_i s_ij g_i`` is
    exact in both modes (the seed changes only the map's derivative, not ``O = w V``).
    """
    exact = grad == "exact"
    acc = accumulation_dtype(q.dtype)
    layout = _Layout.of(q.shape[-2], k.shape[-2], causal, chunk_size)
    dq, dk, dv = (x.new_zeros(x.shape, dtype=acc) for x in (q, k, v))
    k_prefix, v_prefix = _prefix(k, layout, acc), _prefix(v, layout, acc)
    groups = layout.groups()
    # forward states at the start of each group: the prefix and the earlier groups' keys
    h, g = outer_sum(k_prefix, v_prefix), outer_sum(k_prefix, k_prefix)
    starts = []
    for group in groups:
        starts.append((h, g))
        if causal:
            kg, vg = k[..., group.keys, :].to(acc), v[..., group.keys, :].to(acc)
            h, g = h + outer_sum(kg, vg), g + outer_sum(kg, kg)
    # R = sum_i a_i q_i g_i^T and W = sum_i rho_i q_i q_i^T over the queries of later groups
    r_after = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1], dtype=acc)
    w_after = q.new_zeros(*q.shape[:-2], q.shape[-1], q.shape[-1], dtype=acc)
    for group, (h, g) in zip(reversed(groups), reversed(starts), strict=True):
        qc = _take(q, group.queries, layout, acc, scale)
        go, o = _take(grad_out, group.queries, layout, acc), _take(out, group.queries, layout, acc)
        kc = _take(k, group.keys, layout, acc) if causal else None
        vc = _take(v, group.keys, layout, acc) if causal else None
        # row statistics, recomputed exactly as in the forward
        gq = qc @ _forward_states(kc, kc, g)[0]  # G q over earlier keys: [..., NC, C, d]
        s = _diagonal_scores(qc, kc) if causal else None
        r = _score_norm(qc, gq, s)
        a = 1 / (1 + r)
        rho = _rowdot(go, o) * _norm_term_coefficient(r, exact)
        ag = a * go
        # dq_i = alpha_i H_i g_i - rho_i G_i q_i; here the earlier keys, the chunk's own come with ds
        dqc = gq.mul_(-rho)
        if exact:
            dqc += ag @ _forward_states(kc, vc, h)[0].transpose(-1, -2)  # [.., C, dv] @ [.., dv, d]
        r_later, r_after = _reverse_states(qc, ag, r_after, causal)  # [..., NC, d, dv]
        del ag
        w_later, w_after = _reverse_states(qc, rho * qc, w_after, causal)  # [..., NC, d, d]
        if causal:
            dv_chunks = (a * s).transpose(-1, -2) @ go  # [..., NC, C, C]^T @ [..., NC, C, dv]
            dv_chunks += kc @ r_later
            # grouped-query heads: a shared key's gradient is the sum over its query heads
            _put(dv, group.keys, dv_chunks.sum_to_size(vc.shape), group.length)
            del dv_chunks
            ds = s.mul_(-rho)
            if exact:
                ds += (go @ vc.transpose(-1, -2)).tril_().mul_(a)
            dqc += ds @ kc  # [..., NC, C, C] @ [..., NC, C, d]
            dk_chunks = ds.transpose(-1, -2) @ qc
            del ds, s
            dk_chunks -= kc @ w_later  # W is symmetric: (W k_j)^T = k_j^T W
            if exact:
                dk_chunks += vc @ r_later.transpose(-1, -2)
            _put(dk, group.keys, dk_chunks.sum_to_size(kc.shape), group.length)
            del dk_chunks
        _put(dq, group.queries, dqc.mul_(scale), group.length)
    # the prefix keys are seen by every active query
    dk_prefix = -(k_prefix @ w_after)
    if exact:
        dk_prefix += v_prefix @ r_after.transpose(-1, -2)
    dk[..., : layout.n_prefix, :] = dk_prefix.sum_to_size(k_prefix.shape)
    dv[..., : layout.n_prefix, :] = (k_prefix @ r_after).sum_to_size(v_prefix.shape)
    return dq, dk, dv


def _jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    q_dot: Tensor,
    k_dot: Tensor,
    v_dot: Tensor,
    scale: float,
    causal: bool,
    grad: str,
    chunk_size: int,
) -> Tensor:
    """``Od_i = Ud_i / N_i - kappa_i P_i O_i`` with ``P_i = sum_j s_ij sd_ij`` (docs/math.md, sections 9-10).

    exact: ``Ud_i = sum_j (sd_ij v_j + s_ij vd_j)``; seed: ``Ud_i = sum_j s_ij vd_j``, and the
    ``O_i`` term changes sign and scale (see ``_norm_term_coefficient``). Carries ``G``,
    ``Gd = sum_j k_j kd_j^T``, ``sum_j k_j vd_j^T`` and, when exact, ``H`` and ``sum_j kd_j v_j^T``.
    """
    exact = grad == "exact"
    acc = accumulation_dtype(q.dtype)
    layout = _Layout.of(q.shape[-2], k.shape[-2], causal, chunk_size)
    od = q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=acc)
    k_prefix, v_prefix = _prefix(k, layout, acc), _prefix(v, layout, acc)
    k_dot_prefix, v_dot_prefix = _prefix(k_dot, layout, acc), _prefix(v_dot, layout, acc)
    g, g_dot = outer_sum(k_prefix, k_prefix), outer_sum(k_prefix, k_dot_prefix)
    h_vdot = outer_sum(k_prefix, v_dot_prefix)
    h, h_kdot = outer_sum(k_prefix, v_prefix), outer_sum(k_dot_prefix, v_prefix)
    for group in layout.groups():
        qc, qc_dot = (
            _take(q, group.queries, layout, acc, scale),
            _take(q_dot, group.queries, layout, acc, scale),
        )
        o = _take(out, group.queries, layout, acc)
        kc = vc = kc_dot = vc_dot = None
        if causal:
            kc, vc = _take(k, group.keys, layout, acc), _take(v, group.keys, layout, acc)
            kc_dot, vc_dot = _take(k_dot, group.keys, layout, acc), _take(v_dot, group.keys, layout, acc)
        g_chunks, g = _forward_states(kc, kc, g)
        gq = qc @ g_chunks
        del g_chunks
        g_dot_chunks, g_dot = _forward_states(kc, kc_dot, g_dot)
        # P_i = q_i^T G_i qd_i + q_i^T Gd_i q_i over earlier keys
        p = _rowdot(gq, qc_dot) + _rowdot(qc @ g_dot_chunks, qc)
        del g_dot_chunks
        h_vdot_chunks, h_vdot = _forward_states(kc, vc_dot, h_vdot)
        ud = qc @ h_vdot_chunks
        del h_vdot_chunks
        if exact:
            h_chunks, h = _forward_states(kc, vc, h)
            ud += qc_dot @ h_chunks
            del h_chunks
            h_kdot_chunks, h_kdot = _forward_states(kc_dot, vc, h_kdot)
            ud += qc @ h_kdot_chunks
            del h_kdot_chunks
        s = None
        if causal:
            s = _diagonal_scores(qc, kc)
            s_dot = _diagonal_scores(qc_dot, kc).add_(_diagonal_scores(qc, kc_dot))
            p += (s * s_dot).sum(-1, keepdim=True)
            ud += s @ vc_dot
            if exact:
                ud += s_dot @ vc
            del s_dot
        r = _score_norm(qc, gq, s)
        _put(od, group.queries, ud.div_(1 + r).sub_(_norm_term_coefficient(r, exact) * p * o), group.length)
    return od


def _tangent_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    q_dot: Tensor,
    k_dot: Tensor,
    v_dot: Tensor,
    out_dot: Tensor,
    h: Tensor,
    scale: float,
    causal: bool,
    chunk_size: int,
    need_tangent: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor] | None]:
    """The gradient of ``<h, Od>`` (docs/math.md, section 9), in the accumulation dtype: ``(dq, dk,
    dv)`` for the primal inputs and, when ``need_tangent``, ``(dqd, dkd, dvd)`` for the tangents.

    The tangents get ``_backward``'s formulas with ``g = h``; the primal inputs get the tangent of
    those formulas along ``(qd, kd, vd, Od)``, written out: each state has its tangent state, each
    row coefficient its derivative (``rd = P / r`` with ``P_i = sum_j s_ij sd_ij``, ``ad = -a^2 rd``,
    ``kappad = -kappa rd (a + 1 / r)``, ``rhod = (h.Od) kappa + (h.O) kappad``), each diagonal tile
    its tangent tile.

    Every product is one matmul on views of two side-by-side buffers, the keys ``K = [kd | vd | k | v]``
    and the query coefficients ``A = [-rho q | ag | -(rho q)d | agd]``:

    * key states ``Z = k^T K + [kd^T [k | v], 0] = [Gd | Hd | G | H]`` (``Gd = sum k kd^T + kd k^T``);
    * query states ``X = A^T q + [0 ; A[:, :d+e]^T qd] = [-W ; R^T ; -Wd ; Rd^T]``, so that ``K X`` is
      the tangent of ``dk = R v - W k`` and ``[k | v] X[:d+e]`` is ``dk``;
    * diagonal tiles ``ds = A[:, :d+e] [k | v]^T`` and ``dsd = A K^T`` (masked to ``j <= i``).
    """
    acc = accumulation_dtype(q.dtype)
    layout = _Layout.of(q.shape[-2], k.shape[-2], causal, chunk_size)
    d, e = q.shape[-1], v.shape[-1]
    de = d + e
    dq, dk, dv = (x.new_zeros(x.shape, dtype=acc) for x in (q, k, v))
    tangent = tuple(x.new_zeros(x.shape, dtype=acc) for x in (q, k, v)) if need_tangent else None
    keys = (k_dot, v_dot, k, v)  # side by side: K = [kd | vd | k | v], [..., Tk, 2d + 2e]
    prefix = torch.cat([_prefix(x, layout, acc) for x in keys], -1)
    # the key chunks and the key states each chunk starts from, kept for the reverse sweep
    state = _key_states(prefix, d, e)  # [..., d, 2d + 2e]
    groups = layout.groups()
    chunk_states = []
    for group in groups:
        kc = _take(keys, group.keys, layout, acc) if causal else None
        states, state = _forward_sums(None if kc is None else _key_states(kc, d, e), state)
        chunk_states.append((kc, states))  # [..., NC, C, 2d + 2e], [..., NC, d, 2d + 2e]
    del kc, state
    # the query states of the later groups, grouped heads summed
    after = q.new_zeros(*k.shape[:-2], 2 * de, d, dtype=acc)
    for group in reversed(groups):
        kc, states = chunk_states.pop()
        qq = _take((q, q_dot), group.queries, layout, acc, scale)  # [q | qd]
        qc, qc_dot = qq[..., :d], qq[..., d:]
        g = _take(h, group.queries, layout, acc)
        h_out = _rowdot(g, _take(out, group.queries, layout, acc))
        h_out_dot = _rowdot(g, _take(out_dot, group.queries, layout, acc))
        g_dot, h_dot = states[..., :d], states[..., d:de]
        g_state, h_state = states[..., de : de + d], states[..., de + d :]
        gq = qc @ g_state  # [..., NC, C, d] @ [..., NC, d, d] -> [..., NC, C, d]
        gq_dot = qc @ g_dot + qc_dot @ g_state
        s = s_dot = None
        if causal:
            k_dot_c, k_c = kc[..., :d], kc[..., de : de + d]
            s = _diagonal_scores(qc, k_c)
            s_dot = (qc @ k_dot_c.transpose(-1, -2)).add_(qc_dot @ k_c.transpose(-1, -2)).tril_()
        r = _score_norm(qc, gq, s)
        # P_i = q^T G qd + q^T (sum k kd^T) q + own tile = (q . (Gd q + G qd) + qd . G q) / 2 + own tile
        p = _rowdot(qc, gq_dot).add_(_rowdot(qc_dot, gq)).mul_(0.5)
        if causal:
            p += (s * s_dot).sum(-1, keepdim=True)
        positive = r > 0
        safe = torch.where(positive, r, 1)
        r_dot = torch.where(positive, p / safe, 0)
        a = 1 / (1 + r)
        kappa = _norm_term_coefficient(r, True)
        a_dot, kappa_dot = -a * a * r_dot, -kappa * r_dot * (a + 1 / safe)
        rho, rho_dot = h_out * kappa, h_out_dot * kappa + h_out * kappa_dot
        coefficients = qq.new_empty(*qq.shape[:-1], 2 * de)  # A = [-rho q | ag | -(rho q)d | agd]
        ag = coefficients[..., d:de]
        torch.mul(qc, -rho, out=coefficients[..., :d])
        torch.mul(g, a, out=ag)
        torch.mul(qc, -rho_dot, out=coefficients[..., de : de + d]).sub_(rho * qc_dot)
        torch.mul(g, a_dot, out=coefficients[..., de + d :])
        # dq_i = H_i ag_i - rho_i G_i q_i over earlier keys (the chunk's own come with ds), and its tangent
        dq_tangent = (ag @ h_state.transpose(-1, -2)).sub_(rho * gq) if tangent is not None else None
        dq_c = ag @ h_dot.transpose(-1, -2)
        dq_c += coefficients[..., de + d :] @ h_state.transpose(-1, -2)
        dq_c -= rho_dot * gq + rho * gq_dot
        del states, gq, gq_dot
        # X = A^T q + [0 ; A[:, :d+e]^T qd], per chunk, grouped heads summed
        x_chunks = outer_sum(coefficients, qc)  # [..., NC, 2d + 2e, d]
        x_chunks[..., de:, :] += outer_sum(coefficients[..., :de], qc_dot)
        if x_chunks.shape[2] > 1:
            x_chunks = x_chunks.sum(2, keepdim=True)
        later, after = _reverse_sums(x_chunks, after, causal)
        del x_chunks
        if causal:
            kv_c = kc[..., de:]  # [k | v]
            ds = (coefficients[..., :de] @ kv_c.transpose(-1, -2)).tril_()  # [.., C, d+e] @ [.., d+e, C]
            ds_dot = (coefficients @ kc.transpose(-1, -2)).tril_()  # [.., C, 2d+2e] @ [.., 2d+2e, C]
            if tangent is not None:
                dq_tangent += ds @ k_c
            dq_c += ds @ k_dot_c
            dq_c += ds_dot @ k_c
            # keys: the later queries through X, the chunk's own through the tiles (group summed)
            own = _group_sum_tn(ds, qq)  # [ds^T q | ds^T qd]
            dk_c = kc @ later  # [.., C, 2d + 2e] @ [.., 2d + 2e, d]
            dk_c += own[..., d:] + _group_sum_tn(ds_dot, qc)
            r_state, r_dot = later[..., d:de, :].transpose(-1, -2), later[..., de + d :, :].transpose(-1, -2)
            if tangent is not None:
                _put(tangent[1], group.keys, (kv_c @ later[..., :de, :]).add_(own[..., :d]), group.length)
                _put(tangent[2], group.keys, (k_c @ r_state).add_(_group_sum_tn(a * s, g)), group.length)
            dv_c = k_c @ r_dot + k_dot_c @ r_state  # dv = R^T k and its tangent
            dv_c += _group_sum_tn(s_dot.mul_(a).add_(s.mul_(a_dot)), g)
            _put(dk, group.keys, dk_c, group.length)
            _put(dv, group.keys, dv_c, group.length)
        _put(dq, group.queries, dq_c.mul_(scale), group.length)
        if tangent is not None:
            _put(tangent[0], group.queries, dq_tangent.mul_(scale), group.length)
    # the prefix keys are seen by every active query
    if layout.n_prefix:
        k_p, k_dot_p = prefix[..., de : de + d], prefix[..., :d]
        r_state, r_dot = after[..., d:de, :].transpose(-1, -2), after[..., de + d :, :].transpose(-1, -2)
        dk[..., : layout.n_prefix, :] = prefix @ after
        dv[..., : layout.n_prefix, :] = k_p @ r_dot + k_dot_p @ r_state
        if tangent is not None:
            tangent[1][..., : layout.n_prefix, :] = prefix[..., de:] @ after[..., :de, :]
            tangent[2][..., : layout.n_prefix, :] = k_p @ r_state
    return (dq, dk, dv), tangent


def _key_states(keys: Tensor, d: int, e: int) -> Tensor:
    """``[Gd | Hd | G | H]`` of the key rows ``K = [kd | vd | k | v]`` (``[..., n, 2d + 2e]``, or
    chunks of them): ``k^T K`` plus ``kd^T [k | v]`` on the first ``d + e`` columns."""
    de = d + e
    states = outer_sum(keys[..., de : de + d], keys)  # [..., d, 2d + 2e]
    states[..., :de] += outer_sum(keys[..., :d], keys[..., de:])
    return states


def _group_sum_tn(a: Tensor, b: Tensor) -> Tensor:
    """``sum_{g, i} a_gij b_gie`` per chunk, ``[.., G, NC, I, J], [.., G, NC, I, E] -> [.., 1, NC, J,
    E]``: a key's tile term summed over the query heads of its group."""
    if a.shape[-4] == 1 and b.shape[-4] == 1:
        return a.transpose(-1, -2) @ b
    return torch.einsum("...gnij,...gnie->...nje", a, b).unsqueeze(-4)


def _options(problem: Problem, chunk_size: int) -> tuple[float, bool, str, int]:
    if problem.left is not None or problem.right not in (None, 0):
        raise ValueError("the linear-time beta path computes full or causal attention only")
    return problem.scale, problem.causal, problem.grad, chunk_size


def rows_placeholder(q: Tensor) -> Tensor:
    """The row statistic this path does not keep (``r`` is recomputed from ``G q``): no memory."""
    return q.new_zeros(()).expand(*q.shape[:3])


# Grouped-query heads: queries as (B, H_kv, G, T, d) against keys and values (B, H_kv, 1, T, d);
# every state is a key/value head's, products broadcast over the group, and the backward sums a
# shared key's gradient over its group (sum_to_size): the repeated keys are never formed.


def _grouped(x: Tensor, kv_heads: int) -> Tensor:
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


def _ungrouped(x: Tensor, like: Tensor) -> Tensor:
    return x.flatten(1, 2).to(like.dtype)


def forward(problem: Problem, q, k, v, sinks, mask, seed, chunk_size: int = CHUNK_SIZE):
    q5, k5, v5 = _grouped(q, k.shape[1]), k.unsqueeze(2), v.unsqueeze(2)
    out = _forward(q5, k5, v5, *_options(problem, chunk_size)[:2], chunk_size)
    return _ungrouped(out, q), rows_placeholder(q)


def backward(problem: Problem, q, k, v, sinks, mask, seed, out, stat, grad_out, chunk_size: int = CHUNK_SIZE):
    kv = k.shape[1]
    grads = _backward(
        _grouped(q, kv), k.unsqueeze(2), v.unsqueeze(2), _grouped(out, kv), _grouped(grad_out, kv),
        *_options(problem, chunk_size),
    )  # fmt: skip
    dq, dk, dv = grads
    return _ungrouped(dq, q), dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype), None


def jvp(problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot,
        chunk_size: int = CHUNK_SIZE):  # fmt: skip
    kv = k.shape[1]
    out_dot = _jvp(
        _grouped(q, kv), k.unsqueeze(2), v.unsqueeze(2), _grouped(out, kv), _grouped(q_dot, kv),
        k_dot.unsqueeze(2), v_dot.unsqueeze(2), *_options(problem, chunk_size),
    )  # fmt: skip
    return _ungrouped(out_dot, q), rows_placeholder(q)


def tangent_backward(
    problem: Problem, q, k, v, sinks, mask, seed, out, stat, q_dot, k_dot, v_dot, sinks_dot, out_dot, aux, h,
    need_tangent: bool = True, chunk_size: int = CHUNK_SIZE,
):  # fmt: skip
    """The gradient of ``<h, Od>`` for the primal inputs and the tangents (``_tangent_backward``)."""
    kv = k.shape[1]
    if problem.grad != "exact":
        raise ValueError('the tangent backward is defined for grad="exact" only')
    primal, tangent = _tangent_backward(
        _grouped(q, kv), k.unsqueeze(2), v.unsqueeze(2), _grouped(out, kv), _grouped(q_dot, kv),
        k_dot.unsqueeze(2), v_dot.unsqueeze(2), _grouped(out_dot, kv), _grouped(h, kv),
        *_options(problem, chunk_size)[:2], chunk_size, need_tangent,
    )  # fmt: skip

    def ungroup(dq, dk, dv):
        return _ungrouped(dq, q), dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype)

    return (*ungroup(*primal), None, *(ungroup(*tangent) if need_tangent else (None,) * 3), None)


def tangent_backward_through(
    backward_of, problem: Problem, q, k, v, out, q_dot, k_dot, v_dot, out_dot, h, need_tangent: bool
):  # fmt: skip
    """``tangent_backward`` of a linear-time path from its ``backward`` kernel.

    The backward ``(q, k, v, O, h) -> (dq, dk, dv)`` is a pure function of its inputs in torch ops
    (it recomputes the row norms from ``G q``), and the gradient of ``<h, J(x) t>`` with respect to
    ``x`` is its tangent along ``(t, Od)`` (docs/math.md, "Gradients through the JVP"); its value is
    ``J^T h``, the gradient with respect to the tangents. One ``torch.func.jvp`` call gives both, in
    ``O(T d^2)`` time and memory like the backward itself (grouped-query heads as the backward has them).
    The sliding-window form uses it; the chunked form's ``tangent_backward`` is written out (about
    half the cost) and tested against it.
    """

    def vjp_of(q, k, v, out):
        return backward_of(problem, q, k, v, None, None, None, out, None, h)[:3]

    grads, grads_dot = torch.func.jvp(vjp_of, (q, k, v, out), (q_dot, k_dot, v_dot, out_dot))
    tangent = grads if need_tangent else (None,) * 3
    return (*grads_dot, None, *tangent, None)


KERNELS = Kernels("torch", forward, backward, jvp, tangent_backward)


def with_chunk_size(kernels: Kernels, chunk_size: int) -> Kernels:
    """``kernels`` with every kernel's ``chunk_size`` fixed (the default ``CHUNK_SIZE`` otherwise)."""
    if chunk_size == CHUNK_SIZE:
        return kernels
    fix = lambda fn: functools.partial(fn, chunk_size=chunk_size)  # noqa: E731
    return Kernels(
        kernels.backend,
        fix(kernels.forward),
        fix(kernels.backward),
        fix(kernels.jvp),
        fix(kernels.tangent_backward),
    )


def beta_linear_attention(
    problem: Problem, q: Tensor, k: Tensor, v: Tensor, chunk_size: int = CHUNK_SIZE
) -> Tensor:
    """beta attention in ``O(T d^2)`` time and ``O(T d + d^2)`` memory per head (docs/math.md).

    ``problem`` is beta (``grad`` "exact" or "seed") with a full or causal band; returns
    ``(B, H, Tq, dv)`` in the input dtype, computed in float32 for half-precision inputs. Every
    derivative composition of ``normattn.ops.attention.autograd`` is available. ``chunk_size`` is
    the number of positions the quadratic form covers between state updates; any positive value
    gives the same result up to rounding.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return attention_function(with_chunk_size(KERNELS, chunk_size), problem, q, k, v, None, None, None)
