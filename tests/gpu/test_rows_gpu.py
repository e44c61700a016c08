"""GPU tests of the row kernels (max reduction, fused row softmax) at large shapes, fp16/bf16/fp32."""

from __future__ import annotations

import pytest
import torch

import normattn
from normattn.ops.softmax_rows.triton import softmax_rows_triton

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (shape, dim): one long row per program, many short rows per program, several non-adjacent axes.
MAX_CASES = [((4096, 32768), -1), ((16384, 4096), 1), ((65536, 7), -1), ((64, 300, 257), (0, 2))]
SOFTMAX_CASES = [((4096, 32768), -1), ((16384, 4096), -1), ((65536, 7), 1), ((1000, 513), 0)]


def _first_argmax_rows(x, dims):
    kept = [d for d in range(x.dim()) if d not in dims]
    return x.permute(*kept, *dims).reshape(*(x.shape[d] for d in kept), -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", MAX_CASES)
def test_max_reduce_triton_matches_torch(shape, dim, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
    dims = tuple(sorted(d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)))
    values, indices = normattn.max_reduce(x, dim, backend="triton")
    rows = _first_argmax_rows(x.detach(), dims)
    # Low precision ties often at these sizes: torch.argmax is documented to return the first.
    assert torch.equal(indices, rows.argmax(-1))
    assert torch.equal(values, torch.amax(x.detach(), dim=dims))
    grad_values = torch.randn_like(values)
    (grad_x,) = torch.autograd.grad(values, x, grad_values)
    want = torch.zeros_like(rows).scatter_(-1, indices.unsqueeze(-1), grad_values.unsqueeze(-1))
    assert torch.equal(_first_argmax_rows(grad_x, dims), want)
    torch_values, torch_indices = normattn.max_reduce(x, dim, backend="torch")
    assert torch.equal(values, torch_values) and torch.equal(indices, torch_indices)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_reduce_triton_nan_ties_and_non_contiguous(dtype):
    base = torch.randn(3000, 5000, device="cuda", dtype=dtype)
    x = base.t()[:, ::3]  # (5000, 1000), column-major and strided
    x[7, 900] = float("nan")
    x[7, 950] = float("nan")
    x[11] = 1.0
    x[12] = float("-inf")
    values, indices = normattn.max_reduce(x, -1, keepdim=True, backend="triton")
    assert torch.allclose(values, torch.max(x, dim=-1, keepdim=True).values, equal_nan=True)
    # First position holding the row's max (NaN for a row with one), without trusting torch's ties.
    is_max = (x == values) | (x.isnan() & values.isnan())
    assert torch.equal(indices, is_max.int().argmax(-1, keepdim=True))
    assert indices[7, 0] == 900 and indices[11, 0] == 0 and indices[12, 0] == 0


def test_max_reduce_triton_full_jacobian_by_vmap_of_vjp():
    x = torch.randn(64, 33, device="cuda")
    values, vjp_fn = torch.func.vjp(lambda t: normattn.max_reduce(t, -1, backend="triton").values, x)
    (jacobian,) = torch.func.vmap(vjp_fn)(torch.eye(64, device="cuda"))
    one_hot = torch.zeros(64, 64, 33, device="cuda")
    rows = torch.arange(64, device="cuda")
    one_hot[rows, rows, x.argmax(-1)] = 1.0
    assert torch.equal(jacobian, one_hot)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES)
def test_softmax_rows_triton_matches_torch(shape, dim, dtype):
    x = (torch.randn(shape, device="cuda", dtype=dtype) * 4).requires_grad_()
    y = softmax_rows_triton(x, dim)
    x32 = x.detach().float().requires_grad_()
    want = torch.softmax(x32, dim)
    assert y.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-5}
    torch.testing.assert_close(y.float(), want, **tol)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    (want_grad,) = torch.autograd.grad(want, x32, grad_y.float())
    scale = want_grad.abs().max().item()
    low = dtype != torch.float32
    torch.testing.assert_close(
        grad_x.float(), want_grad, rtol=2e-2 if low else 1e-4, atol=(2e-2 if low else 1e-5) * scale
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_triton_huge_values_and_minus_inf(dtype):
    x = torch.randn(256, 40000, device="cuda", dtype=torch.float32) * 1e4
    x[0, ::2] = float("-inf")
    x[1] = float("-inf")  # no finite entry: zeros, where torch.softmax gives NaN
    x = x.to(dtype)
    y = softmax_rows_triton(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.equal(y[0, ::2], torch.zeros_like(y[0, ::2]))
    want = torch.softmax(x[2:].float(), -1)
    torch.testing.assert_close(y[2:].float(), want, rtol=2e-2, atol=1e-3 if dtype != torch.float32 else 1e-6)
    sums = torch.cat([y[:1], y[2:]]).float().sum(-1)
    torch.testing.assert_close(
        sums, torch.ones_like(sums), rtol=0, atol=2e-2 if dtype != torch.float32 else 1e-4
    )
