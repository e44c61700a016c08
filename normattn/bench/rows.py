"""Row reductions bench: the Triton max reduction and fused row softmax against torch.

Both ops are memory-bound, so the figure of merit is achieved bandwidth: bytes that must be read
and written (inputs once, outputs once) over the median time. Forward and backward are timed
through autograd for both implementations, so the comparison includes the same dispatch costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .timing import median_ms, time_calls

CUDA_SHAPES = ((16384, 4096), (4096, 32768))
CUDA_DTYPES = (torch.bfloat16, torch.float32)
# The CPU has no Triton timing worth taking (the interpreter); torch only, at small sizes.
CPU_SHAPES = ((1024, 1024), (128, 8192))
CPU_DTYPES = (torch.float32,)


def _median_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    return median_ms(time_calls(fn, repeats=10, warmup=2))


def _impls(device: torch.device) -> dict[str, dict[str, Callable]]:
    """For each op: implementation name -> ``fn(x)`` returning the differentiable output."""
    from ..functional import triton_usable

    impls: dict[str, dict[str, Callable]] = {
        "max_reduce": {"torch.max": lambda x: torch.max(x, dim=-1).values},
        "softmax": {"torch.softmax": lambda x: torch.softmax(x, dim=-1)},
    }
    probe = torch.empty(0, device=device)
    if device.type == "cuda" and triton_usable(probe):
        from ..ops.max_reduce.triton import max_reduce_triton
        from ..ops.softmax_rows.triton import softmax_rows_triton

        impls["max_reduce"]["triton"] = lambda x: max_reduce_triton(x, (x.dim() - 1,), False)[0]
        impls["softmax"]["triton"] = lambda x: softmax_rows_triton(x, -1)
    return impls


def _bytes_moved(op: str, pass_name: str, n_rows: int, row_len: int, element_size: int) -> int:
    matrix = n_rows * row_len * element_size
    per_row = n_rows * (element_size + 8)  # a value and an int64 index per row
    if op == "max_reduce":
        return matrix + per_row if pass_name == "fwd" else per_row + matrix
    # softmax: forward reads x, writes y; backward reads y and dy, writes dx.
    return 2 * matrix if pass_name == "fwd" else 3 * matrix


def _time_passes(fn: Callable, x: Tensor, device: torch.device) -> dict[str, float]:
    """Median ms of the forward ``fn(x)`` and of the backward of its output."""
    out = fn(x)
    grad_out = torch.randn_like(out)
    return {
        "fwd": _median_ms(lambda: fn(x), device),
        "bwd": _median_ms(lambda: torch.autograd.grad(out, x, grad_out, retain_graph=True), device),
    }


def bench_rows(
    device: str | torch.device = "cuda",
    shapes: Sequence[tuple[int, int]] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> list[dict]:
    """Median time and achieved GB/s of each row op, implementation, pass, shape and dtype.

    Rows have the keys ``op`` (``max_reduce``/``softmax``), ``impl`` (``triton``, or the torch
    baseline ``torch.max``/``torch.softmax``), ``pass`` (``fwd``/``bwd``), ``shape``
    (``"NxL"``, reduced over the last axis), ``cols`` (``L``), ``dtype``, ``ms`` and ``gbps``.
    On CUDA, times are ``triton.testing.do_bench`` medians; on the CPU only torch is timed.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    shapes = shapes or (CUDA_SHAPES if on_cuda else CPU_SHAPES)
    dtypes = dtypes or (CUDA_DTYPES if on_cuda else CPU_DTYPES)
    results = []
    for dtype in dtypes:
        for n_rows, row_len in shapes:
            x = torch.randn(n_rows, row_len, device=device, dtype=dtype, requires_grad=True)
            for op, impls in _impls(device).items():
                for impl, fn in impls.items():
                    for pass_name, ms in _time_passes(fn, x, device).items():
                        moved = _bytes_moved(op, pass_name, n_rows, row_len, x.element_size())
                        results.append(
                            {
                                "op": op,
                                "impl": impl,
                                "pass": pass_name,
                                "shape": f"{n_rows}x{row_len}",
                                "cols": row_len,
                                "dtype": str(dtype).removeprefix("torch."),
                                "ms": ms,
                                "gbps": moved / (ms * 1e-3) / 1e9,
                            }
                        )
            del x
            if on_cuda:
                torch.cuda.empty_cache()
    return results
