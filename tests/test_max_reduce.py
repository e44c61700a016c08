"""Max reduction (docs/math.md, section 2) through ``normattn.max_reduce``: three backends, one contract.

Triton runs under the interpreter on CPU (conftest sets TRITON_INTERPRET=1 without CUDA), so the
shapes here stay small. ``triton-small-tiles`` shrinks the kernels' tiles so the multi-tile paths
(running argmax across tiles, ties split over tiles) run at these sizes too.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jacfwd, jacrev, vjp, vmap

import normattn
from normattn.ops.common import triton_usable

BACKENDS = ("reference", "torch", "triton")
# (shape, dim): rows of length 1, 7, 63, 257, 1000; several axes, non-adjacent, negative, all.
CASES = [
    ((5, 1), -1),
    ((3, 7), 1),
    ((2, 63), -1),
    ((3, 257), 1),
    ((1000,), 0),
    ((4, 3, 5), (0, 2)),
    ((2, 3, 4, 5), (1, 3)),
    ((3, 4, 6), (-1, -3)),
    ((2, 3, 4), (0, 1, 2)),
    ((6, 2, 5), 0),
]


@pytest.fixture(params=["reference", "torch", "triton", "triton-small-tiles"])
def backend(request, monkeypatch):
    """Every backend, and the triton kernels once more with 32-element tiles."""
    if request.param == "triton-small-tiles":
        monkeypatch.setattr("normattn.ops.max_reduce.triton.MAX_TILE", 32)
        return "triton"
    return request.param


def _dims(dim, ndim):
    return tuple(sorted(d % ndim for d in ((dim,) if isinstance(dim, int) else dim)))


def _expected(x, dim, keepdim):
    """Max and first argmax from scratch: reduced axes moved to the end, flattened, argmax."""
    dims = _dims(dim, x.dim())
    kept = [d for d in range(x.dim()) if d not in dims]
    rows = x.permute(*kept, *dims).reshape(*(x.shape[d] for d in kept), -1)
    values, indices = torch.amax(x, dim=dims, keepdim=keepdim), rows.argmax(-1)
    if keepdim:
        indices = indices.reshape(values.shape)
    return values, indices


def _one_hot_grad(x, dim, keepdim, indices, grad_values):
    """``dA[s2, s1] = dB[s2] 1[s1 == m(s2)]`` written out entry by entry from the indices."""
    dims = _dims(dim, x.dim())
    kept = [d for d in range(x.dim()) if d not in dims]
    out = torch.zeros_like(x)
    kept_positions = itertools.product(*(range(x.shape[d]) for d in kept))
    for kept_pos, flat_index, grad in zip(
        kept_positions, indices.reshape(-1).tolist(), grad_values.reshape(-1), strict=True
    ):
        reduced_pos = np.unravel_index(flat_index, [x.shape[d] for d in dims])
        position = [0] * x.dim()
        for d, p in [*zip(kept, kept_pos, strict=True), *zip(dims, reduced_pos, strict=True)]:
            position[d] = int(p)
        out[tuple(position)] = grad
    return out


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", CASES)
def test_matches_expected_values_indices_and_grads(shape, dim, keepdim, backend):
    x = torch.randn(shape, dtype=torch.float32, requires_grad=True)
    values, indices = normattn.max_reduce(x, dim, keepdim, backend=backend)
    want_values, want_indices = _expected(x.detach(), dim, keepdim)
    assert indices.dtype == torch.int64
    assert values.shape == want_values.shape == indices.shape
    assert torch.equal(values, want_values)
    assert torch.equal(indices, want_indices)
    grad_values = torch.randn_like(values)
    (grad_x,) = torch.autograd.grad(values, x, grad_values)
    assert torch.equal(grad_x, _one_hot_grad(x, dim, keepdim, indices, grad_values))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_input(backend, dtype):
    base = torch.randn(6, 9, 10, dtype=dtype)
    x = base.transpose(0, 2)[::2, 1:8].requires_grad_()  # (5, 7, 6), odd strides
    assert not x.is_contiguous()
    for dim in [(0, 2), 1, -1]:
        values, indices = normattn.max_reduce(x, dim, backend=backend)
        want_values, want_indices = _expected(x.detach(), dim, False)
        assert torch.equal(values, want_values) and torch.equal(indices, want_indices)
        grad_values = torch.randn_like(values)
        (grad_x,) = torch.autograd.grad(values, x, grad_values)
        assert torch.equal(grad_x, _one_hot_grad(x, dim, False, indices, grad_values))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_torch_backend_matches_reference(dtype):
    x = torch.randn(4, 33, 5, dtype=dtype, requires_grad=True)
    got = normattn.max_reduce(x, (0, 2), backend="torch")
    ref = normattn.max_reduce(x, (0, 2), backend="reference")
    assert got.values.dtype == dtype
    assert torch.equal(got.values, ref.values) and torch.equal(got.indices, ref.indices)
    grad = torch.randn_like(got.values)
    assert torch.equal(
        torch.autograd.grad(got.values, x, grad)[0], torch.autograd.grad(ref.values, x, grad)[0]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_and_empty_kept_axes(backend):
    scalar = torch.tensor(2.5, requires_grad=True)
    values, indices = normattn.max_reduce(scalar, 0, backend=backend)
    assert values.shape == indices.shape == () and values.item() == 2.5 and indices.item() == 0
    values.backward()
    assert scalar.grad.item() == 1.0
    empty = torch.randn(0, 5, requires_grad=True)
    values, indices = normattn.max_reduce(empty, -1, keepdim=True, backend=backend)
    assert values.shape == indices.shape == (0, 1)
    (grad,) = torch.autograd.grad(values.sum(), empty)
    assert grad.shape == (0, 5)


# ----------------------------------------------------------------------------- ties


def test_ties_first_index_gets_the_whole_gradient(backend):
    # Row 0: the max 5 at flat positions 3 and 40 (different tiles when tiles are small);
    # row 1: all equal; row 2: -inf everywhere (every entry ties).
    x = torch.zeros(3, 4, 12)
    x[0].view(-1)[[3, 40]] = 5.0
    x[1] = 1.0
    x[2] = float("-inf")
    x = x.permute(1, 0, 2).contiguous().permute(1, 0, 2).requires_grad_()  # reduce (1, 2) non-contiguously
    values, indices = normattn.max_reduce(x, (1, 2), backend=backend)
    assert indices.tolist() == [3, 0, 0]
    assert values.tolist() == [5.0, 1.0, float("-inf")]
    values.backward(torch.tensor([2.0, 3.0, 4.0]))
    want = torch.zeros(3, 48)
    want[0, 3], want[1, 0], want[2, 0] = 2.0, 3.0, 4.0
    assert torch.equal(x.grad.reshape(3, 48), want)


def test_torch_amax_splits_ties_evenly_documented_difference():
    """Not a bug: torch.amax shares a tied gradient; max_reduce gives it all to the first index."""
    x = torch.tensor([1.0, 3.0, 0.0, 3.0], requires_grad=True)
    (amax_grad,) = torch.autograd.grad(torch.amax(x, dim=0), x)
    assert amax_grad.tolist() == [0.0, 0.5, 0.0, 0.5]
    for backend in BACKENDS:
        (grad,) = torch.autograd.grad(normattn.max_reduce(x, 0, backend=backend).values, x)
        assert grad.tolist() == [0.0, 1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- NaN


def test_nan_is_the_max_of_its_row(backend):
    nan, inf = float("nan"), float("inf")
    x = torch.randn(4, 40)
    x[0, [5, 30]] = nan  # two NaN: the first wins
    x[1, 0] = inf
    x[1, 33] = nan  # NaN beats +inf even after it
    x[2, :] = nan
    x = x.requires_grad_()
    values, indices = normattn.max_reduce(x, -1, backend=backend)
    torch_max = torch.max(x.detach(), dim=-1)
    assert torch.allclose(values, torch_max.values, equal_nan=True)
    assert indices.tolist() == [5, 33, 0, int(torch_max.indices[3])]
    assert torch.equal(indices, torch_max.indices)
    (grad,) = torch.autograd.grad(values, x, torch.ones(4))
    want = torch.zeros(4, 40)
    want[torch.arange(4), indices] = 1.0
    assert torch.equal(grad, want)


# ----------------------------------------------------------------------------- derivatives


def test_torch_backend_gradcheck_forward_ad_and_batched():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    for dim, keepdim in [((0, 2), False), (-1, True), ((0, 1, 2), False)]:

        def values(t, dim=dim, keepdim=keepdim):
            return normattn.max_reduce(t, dim, keepdim, backend="torch").values

        assert torch.autograd.gradcheck(
            values, (x,), check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
        )
        assert torch.autograd.gradgradcheck(values, (x,))


def test_triton_backend_gradcheck_forward_ad_and_double_backward():
    # (check_batched_grad uses torch's legacy vmap, which ignores autograd.Function vmap rules;
    # the torch.func tests below cover vmap for this backend.)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)

    def values(t):
        return normattn.max_reduce(t, (0, 2), backend="triton").values

    assert torch.autograd.gradcheck(values, (x,), check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(values, (x,), fast_mode=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_jvp_is_the_tangent_at_the_argmax(backend):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    tangent = torch.randn_like(x).transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous
    for dim in [(0, 2), 1]:
        _, indices = normattn.max_reduce(x, dim, backend="reference")

        def f(t, dim=dim):
            return normattn.max_reduce(t, dim, backend=backend).values

        _, got = torch.func.jvp(f, (x,), (tangent,))
        want = torch.func.jvp(
            lambda t, dim=dim: normattn.max_reduce(t, dim, backend="reference").values, (x,), (tangent,)
        )[1]
        assert torch.equal(got, want)
        with fwAD.dual_level():
            dual_out = f(fwAD.make_dual(x, tangent))
            assert torch.equal(fwAD.unpack_dual(dual_out).tangent, want)
        # Independent check: the tangent read at the argmax, by the flat row-major index.
        dims = _dims(dim, 3)
        kept = [d for d in range(3) if d not in dims]
        rows = tangent.permute(*kept, *dims).reshape(*(x.shape[d] for d in kept), -1)
        assert torch.equal(got, rows.gather(-1, indices.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_full_jacobian_by_vmap_of_vjp_is_one_hot(backend):
    """The multi-output loss O[s3]: all cotangents in one vmapped VJP call (docs/math.md, section 2)."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    dims = (0, 2)
    _, indices = normattn.max_reduce(x, dims, backend="reference")

    def f(t):
        return normattn.max_reduce(t, dims, backend=backend).values

    values, vjp_fn = vjp(f, x)
    n_out = values.numel()
    (jacobian,) = vmap(vjp_fn)(torch.eye(n_out, dtype=x.dtype).reshape(n_out, *values.shape))
    one_hot = torch.zeros(n_out, 3, 4, 5, dtype=x.dtype)
    for k in range(n_out):
        i, j = divmod(int(indices[k]), 5)
        one_hot[k, i, k, j] = 1.0
    assert torch.equal(jacobian, one_hot)
    assert torch.equal(jacrev(f)(x), one_hot)
    assert torch.equal(jacfwd(f)(x), one_hot)
    # A loss with many outputs O[s3]: a cotangent dB[s3, s2] is one scatter per s3.
    cotangents = torch.randn(7, n_out, dtype=x.dtype)
    (batched,) = vmap(vjp_fn)(cotangents)
    assert torch.equal(batched, torch.einsum("sk,kabc->sabc", cotangents, one_hot))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_under_vmap_and_second_derivatives(backend):
    batch = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    for in_dim in (0, 2):
        got_values, got_indices = vmap(lambda t: normattn.max_reduce(t, (0, 2), backend=backend), in_dim)(
            batch
        )
        for b in range(batch.shape[in_dim]):
            want_values, want_indices = _expected(batch.select(in_dim, b), (0, 2), False)
            assert torch.equal(got_values[b], want_values) and torch.equal(got_indices[b], want_indices)
    # A nonlinear loss of the max: torch.func.grad and a Hessian (forward over reverse).
    x = batch[0]

    def loss(t, backend):
        return (normattn.max_reduce(t, (0, 2), backend=backend).values ** 3).sum()

    assert torch.equal(torch.func.grad(loss)(x, backend), torch.func.grad(loss)(x, "reference"))
    hessian = torch.func.hessian(loss)(x, backend)
    assert hessian.abs().sum() > 0
    assert torch.allclose(hessian, torch.autograd.functional.hessian(lambda t: loss(t, "reference"), x))


# ----------------------------------------------------------------------------- docs/math.md, section 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_max_shift_has_no_gradient(backend):
    """S = Sp - max(Sp): the gradient through the max is zero, so detaching the shift changes
    nothing (to float64 round-off). The same max gives a nonzero gradient when the loss does not
    go through a softmax, so the agreement is not because the max passes no gradient."""
    scores = torch.randn(6, 37, dtype=torch.float64, requires_grad=True) * 4
    cotangent = torch.randn(6, 37, dtype=torch.float64)

    def grads(loss_of_shifted, detach):
        row_max = normattn.max_reduce(scores, -1, keepdim=True, backend=backend).values
        shifted = scores - (row_max.detach() if detach else row_max)
        return torch.autograd.grad((loss_of_shifted(shifted) * cotangent).sum(), scores)[0]

    softmax = lambda s: torch.softmax(s, dim=-1)
    through_max, detached = grads(softmax, False), grads(softmax, True)
    assert torch.allclose(through_max, detached, rtol=0, atol=1e-15)
    identity = lambda s: s
    assert (grads(identity, False) - grads(identity, True)).abs().max() > 1e-3
    # The max path's own gradient, sum_k dS_ik, is zero to round-off.
    shifted = scores.detach() - normattn.max_reduce(scores.detach(), -1, keepdim=True).values
    probs = torch.softmax(shifted, dim=-1)
    grad_shifted = probs * (cotangent - (probs * cotangent).sum(-1, keepdim=True))
    assert grad_shifted.sum(-1).abs().max() < 1e-14


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected_clearly(monkeypatch):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="out of range"):
        normattn.max_reduce(x, 2)
    with pytest.raises(ValueError, match="out of range"):
        normattn.max_reduce(x, (0, -3))
    with pytest.raises(ValueError, match="repeat"):
        normattn.max_reduce(x, (1, -1))
    with pytest.raises(TypeError, match="dim"):
        normattn.max_reduce(x, ())
    with pytest.raises(TypeError, match="dim"):
        normattn.max_reduce(x, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        normattn.max_reduce(torch.arange(6).reshape(2, 3), -1)
    with pytest.raises(TypeError, match="floating-point"):
        normattn.max_reduce(torch.ones(2, 3, dtype=torch.bool), -1)
    with pytest.raises(TypeError, match="Tensor"):
        normattn.max_reduce([[1.0, 2.0]], -1)
    with pytest.raises(ValueError, match="size 0"):
        normattn.max_reduce(torch.randn(2, 0), -1)
    with pytest.raises(ValueError, match="backend"):
        normattn.max_reduce(x, -1, backend="cuda")
    with pytest.raises(TypeError, match="keepdim"):
        normattn.max_reduce(x, -1, keepdim=1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_usable(x)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        normattn.max_reduce(x, -1, backend="triton")


def test_auto_backend_on_cpu_is_the_torch_backend():
    x = torch.randn(3, 5, requires_grad=True)
    values, _ = normattn.max_reduce(x)
    assert type(values.grad_fn).__name__ == "MaxReduceFunctionBackward"
    assert math.isclose(values.sum().item(), torch.amax(x, -1).sum().item())
