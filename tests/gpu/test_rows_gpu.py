"""The row kernels (max reduction with argmax, fused row softmax) against torch, forward and backward,
in fp16, bf16 and fp32: rows that share a program, rows of one tile, rows of several tiles."""

from __future__ import annotations

import pytest
import torch
from support import dtype_id, randn, sized

import normattn
from normattn.ops.softmax_rows.triton import softmax_rows_triton

pytestmark = pytest.mark.gpu

# (the interpreter cannot run bf16 kernels: a dry run checks the tests in float32, support.LOW)
DTYPES = sized([torch.float16, torch.bfloat16, torch.float32], [torch.float32])
# (rows, row length): stacked short rows, one tile per row, several tiles per row (4096 a tile)
SHAPES = sized([(65536, 7), (16384, 4096), (512, 32768)], [(64, 7), (4, 4096), (2, 8200)])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_max_reduce_matches_torch(shape, dtype):
    x = randn(*shape, dtype=dtype).requires_grad_()
    values, indices = normattn.max_reduce(x, -1, backend="triton")
    assert not values.isnan().any(), "NaN"
    assert torch.equal(values, torch.amax(x.detach(), -1))
    assert torch.equal(indices, x.detach().argmax(-1))  # torch.argmax returns the first maximum
    grad_values = torch.randn_like(values)
    (grad_x,) = torch.autograd.grad(values, x, grad_values)
    want = torch.zeros_like(x).scatter_(-1, indices.unsqueeze(-1), grad_values.unsqueeze(-1))
    assert torch.equal(grad_x, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_rows_match_torch(shape, dtype):
    x = (4 * randn(*shape, dtype=dtype)).requires_grad_()
    y = softmax_rows_triton(x, -1)
    assert y.dtype == dtype and not y.isnan().any(), "NaN"
    x32 = x.detach().float().requires_grad_()
    want = torch.softmax(x32, -1)
    low = dtype != torch.float32
    torch.testing.assert_close(y.float(), want, rtol=2e-2 if low else 1e-5, atol=1e-5 if low else 1e-7)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    (want_grad,) = torch.autograd.grad(want, x32, grad_y.float())
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(
        grad_x.float(), want_grad, rtol=2e-2 if low else 1e-4, atol=(2e-2 if low else 1e-5) * scale
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_softmax_rows_huge_values_and_minus_inf(dtype):
    x = randn(sized(256, 4), sized(40000, 5000)) * 1e4
    x[0, ::2] = float("-inf")
    x[1] = float("-inf")  # no finite entry: zeros, where torch.softmax gives NaN
    x = x.to(dtype)
    y = softmax_rows_triton(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.equal(y[0, ::2], torch.zeros_like(y[0, ::2]))
    want = torch.softmax(x[2:].float(), -1)
    torch.testing.assert_close(y[2:].float(), want, rtol=2e-2, atol=1e-3 if dtype != torch.float32 else 1e-6)
