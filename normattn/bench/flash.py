"""Fused flash kernels bench: ``backend="triton"`` against PyTorch's SDPA, on FlashAttention's shapes.

Shapes (FlashAttention's benchmark): ``B * T = 16384`` tokens, ``H = 2048 / d`` heads,
``d`` in {64, 128}, ``T`` from 512 to 16384, causal and not. Rows, all ``op="attention"``:

* softmax ``triton`` (``fwd``, ``fwd+bwd``) against ``sdpa-flash``
  (``scaled_dot_product_attention`` restricted to ``SDPBackend.FLASH_ATTENTION``);
* softmax ``triton`` ``jvp`` (``torch.func.jvp`` through the fused forward-and-tangent kernel)
  against ``sdpa-math`` ``jvp`` (``torch.func.jvp`` of SDPA under ``SDPBackend.MATH``, the only
  SDPA backend with forward-mode AD; it materializes ``T x T`` and is skipped where it cannot fit);
* beta ``triton`` (``fwd``, ``fwd+bwd``, ``jvp``), to compare with the softmax rows above and
  with beta ``reference`` (materialized scores and autograd, where it fits).

FLOPs: forward ``4 B H T^2 d`` (halved when causal), backward 2.5x forward (``fwd+bwd`` = 3.5x),
JVP 3x forward. ``ms`` is the ``triton.testing.do_bench`` median, ``peak_mb`` the CUDA caching
allocator's high-water mark of one call beyond what was allocated before it. A case that fails or
does not fit gives a row with a ``status`` and a ``note`` instead of a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import (
    Attend,
    _failure,
    _median_ms,
    _pass_call,
    _peak_mb,
    _reference_fits,
    _release,
    _sdpa_flash,
)

HEAD_DIMS = (64, 128)
TOKENS, WIDTH = 16384, 2048
T_VALUES = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_T_VALUES = (1024, 4096)
# Work of each pass in forward passes (FlashAttention's convention).
PASS_FLOPS = {"fwd": 1.0, "fwd+bwd": 3.5, "jvp": 3.0}
# Implementations that materialize the T x T scores; skipped where their predicted peak cannot fit.
MATERIALIZING = ("sdpa-math", "reference")


def _sdpa_math(causal: bool) -> Attend:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


def _normattn(normalizer: str, backend: str, causal: bool) -> Attend:
    import normattn

    return lambda q, k, v: normattn.attention(q, k, v, normalizer=normalizer, causal=causal, backend=backend)


def _cases(causal: bool) -> list[tuple[str, str, str, Attend]]:
    """(normalizer, impl, pass, attend) for one causal setting."""
    cases = []
    for pass_name in ("fwd", "fwd+bwd", "jvp"):
        cases.append(("softmax", "triton", pass_name, _normattn("softmax", "triton", causal)))
        if pass_name == "jvp":
            cases.append(("softmax", "sdpa-math", pass_name, _sdpa_math(causal)))
        else:
            cases.append(("softmax", "sdpa-flash", pass_name, _sdpa_flash(causal)))
        cases.append(("beta", "triton", pass_name, _normattn("beta", "triton", causal)))
        cases.append(("beta", "reference", pass_name, _normattn("beta", "reference", causal)))
    return cases


def forward_flops(batch: int, heads: int, t: int, d: int, causal: bool) -> float:
    """``4 B H T^2 d``: two ``T x T x d`` matmuls; half of the pairs when causal."""
    return 4.0 * batch * heads * t * t * d / (2.0 if causal else 1.0)


def _time_case(
    normalizer: str, impl: str, pass_name: str, attend: Attend, batch: int, heads: int, t: int, d: int,
    causal: bool, device: torch.device, dtype: torch.dtype,
) -> dict:  # fmt: skip
    row = {
        "op": "attention", "impl": impl, "normalizer": normalizer, "causal": causal, "pass": pass_name,
        "T": t, "d": d, "B": batch, "H": heads, "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    if impl in MATERIALIZING and not _reference_fits(
        pass_name, batch, heads, t, dtype, torch.cuda.mem_get_info(device)[0]
    ):
        return {**row, "status": "skipped (memory)", "note": "predicted O(T^2) peak above free memory"}
    try:
        q, k, v = (torch.randn(batch, heads, t, d, device=device, dtype=dtype) for _ in range(3))
        call = _pass_call(attend, pass_name, q, k, v)
        call()  # compile / warm up, and fail early
        ms = _median_ms(call, device)
        peak = _peak_mb(call, device)
    except Exception as error:  # a row that says why, instead of a crashed bench
        return {**row, **_failure(error)}
    finally:
        _release(device)
    flops = PASS_FLOPS[pass_name] * forward_flops(batch, heads, t, d, causal)
    return {**row, "status": "ok", "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_mb": peak}


def bench_flash(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, quick: bool = False
) -> list[dict]:
    """Rows for every (normalizer, impl, pass, causal, T, d): ``ms``, ``tflops``, ``peak_mb``, ``status``.

    Keys: ``op`` (``"attention"``), ``impl`` (``triton``, ``sdpa-flash``, ``sdpa-math``,
    ``reference``), ``normalizer``, ``causal``, ``pass`` (``fwd``/``fwd+bwd``/``jvp``), ``T``,
    ``d``, ``B``, ``H``, ``dtype``, and ``note`` where a case was not timed (see the module
    docstring). ``quick`` times T in {1024, 4096} only. Needs a CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"bench_flash times Triton kernels and needs a CUDA device, got {device}")
    rows = []
    for d in HEAD_DIMS:
        for t in QUICK_T_VALUES if quick else T_VALUES:
            batch, heads = max(1, TOKENS // t), WIDTH // d
            for causal in (False, True):
                for normalizer, impl, pass_name, attend in _cases(causal):
                    shape = (batch, heads, t, d, causal)
                    rows.append(_time_case(normalizer, impl, pass_name, attend, *shape, device, dtype))
    return rows


__all__ = ["bench_flash", "forward_flops"]
