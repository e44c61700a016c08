"""Fused row softmax kernel (Triton, interpreter on CPU) against torch.softmax, both modes.

The ``tiles`` fixture runs cases again with 128-element tiles, so the two-pass (online max and sum)
path is covered at interpreter-sized rows, not only the one-tile path.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jacfwd, jacrev, vjp, vmap

from normattn.ops.softmax_rows.triton import softmax_rows_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}
# (shape, dim): rows of length 1, 7, 63, 257, 1000; softmax over a middle and a first axis.
CASES = [
    ((5, 1), -1),
    ((3, 7), 1),
    ((2, 63), -1),
    ((3, 257), -1),
    ((2, 1000), 1),
    ((2, 9, 4), 1),
    ((33, 3), 0),
]


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        monkeypatch.setattr("normattn.ops.max_reduce.triton.MAX_TILE", 128)


def _check_against_torch(x, dim):
    x = x.detach().requires_grad_()
    reference = x.detach().clone().requires_grad_()
    y = softmax_rows_triton(x, dim)
    want = torch.softmax(reference, dim)
    assert y.shape == want.shape and y.dtype == want.dtype
    torch.testing.assert_close(y, want, **TOL[x.dtype])
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    (want_grad,) = torch.autograd.grad(want, reference, grad_y)
    torch.testing.assert_close(grad_x, want_grad, **TOL[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", CASES)
def test_matches_torch_softmax(shape, dim, dtype, tiles):
    _check_against_torch(torch.randn(shape, dtype=dtype) * 3, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_input(dtype):
    x = torch.randn(12, 40, 6, dtype=dtype).transpose(0, 2)[:, 3:30:2]  # (6, 14, 12), odd strides
    assert not x.is_contiguous()
    for dim in (-1, 1, 0):
        _check_against_torch(x, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_values_and_minus_inf_entries(dtype, tiles):
    x = torch.randn(4, 200, dtype=dtype) * 1e4
    x[0] = -x[0].abs()
    x[0, 5] = 1e4
    x[0, 150] = 1e4  # a tie at the max, in a later tile when tiles are small
    x[1, ::3] = float("-inf")
    x[2, :-1] = float("-inf")  # one finite entry: probability 1
    x[3] = -1e4
    _check_against_torch(x, -1)
    y = softmax_rows_triton(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1, ::3], torch.zeros_like(y[1, ::3]))
    assert y[2, -1].item() == 1.0
    assert y[0, 5].item() == pytest.approx(0.5) and y[0, 150].item() == pytest.approx(0.5)


def test_row_of_minus_inf_gives_zeros_not_nan(tiles):
    """Documented difference: torch.softmax returns NaN for a row with no finite entry."""
    x = torch.full((2, 20), float("-inf"), requires_grad=True)
    with torch.no_grad():
        x[1, 4] = 0.0
    y = softmax_rows_triton(x)
    assert torch.isnan(torch.softmax(x.detach(), -1)[0]).all()
    assert torch.equal(y[0], torch.zeros(20))
    assert y[1, 4].item() == 1.0
    (grad,) = torch.autograd.grad(y, x, torch.randn(2, 20))
    assert torch.equal(grad, torch.zeros(2, 20))


def test_gradcheck_with_forward_ad(tiles):
    x = torch.randn(2, 150, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: softmax_rows_triton(t, -1), (x,), check_forward_ad=True, fast_mode=True
    )


def test_double_backward():
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda t: softmax_rows_triton(t, 0), (x,), check_fwd_over_rev=True, fast_mode=True
    )


def test_jvp_matches_torch():
    x = torch.randn(4, 3, 37, dtype=torch.float64)
    tangent = torch.randn_like(x).transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous
    for dim in (-1, 1):
        _, got = torch.func.jvp(lambda t, dim=dim: softmax_rows_triton(t, dim), (x,), (tangent,))
        _, want = torch.func.jvp(lambda t, dim=dim: torch.softmax(t, dim), (x,), (tangent,))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        with fwAD.dual_level():
            dual = softmax_rows_triton(fwAD.make_dual(x, tangent), dim)
            torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, want, rtol=1e-12, atol=1e-14)


def test_torch_func_transforms_match_torch():
    """vmap of the VJP (whole Jacobian), jacfwd, vmap of the forward, grad and Hessian."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    for dim in (-1, 1):

        def ours(t, dim=dim):
            return softmax_rows_triton(t, dim)

        def theirs(t, dim=dim):
            return torch.softmax(t, dim)

        want = jacrev(theirs)(x)
        y, vjp_fn = vjp(ours, x)
        (jacobian,) = vmap(vjp_fn)(torch.eye(y.numel(), dtype=x.dtype).reshape(-1, *y.shape))
        torch.testing.assert_close(jacobian.reshape(want.shape), want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(jacfwd(ours)(x), want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(vmap(ours, in_dims=1)(x[:, :, :4]), vmap(theirs, in_dims=1)(x[:, :, :4]))
        small = x[0, :2]

        def loss(t, fn):
            return (fn(t) ** 3).sum()

        torch.testing.assert_close(torch.func.grad(loss)(x, ours), torch.func.grad(loss)(x, theirs))
        torch.testing.assert_close(
            torch.func.hessian(loss)(small, ours), torch.func.hessian(loss)(small, theirs)
        )


def test_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        softmax_rows_triton(torch.arange(4))
    with pytest.raises(TypeError, match="dim"):
        softmax_rows_triton(torch.randn(2, 3), (0, 1))
    with pytest.raises(ValueError, match="out of range"):
        softmax_rows_triton(torch.randn(2, 3), 2)
