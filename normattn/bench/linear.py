"""Linear-time beta attention bench: chunked kernels against softmax and quadratic beta, and decode.

Training-shaped passes (``op="attention"``): a fixed token budget ``B * T`` and model width
``H * d`` (16384 tokens and width 2048 on CUDA), causal, for ``fwd``, ``fwd+bwd`` and ``jvp``:

* ``beta triton-linear``: the chunked linear-time kernels (``normattn.ops.beta_linear.triton_chunk``);
* ``beta triton``: the quadratic fused flash kernels with the beta normalizer;
* ``beta torch``: the chunked linear-time algorithm in plain PyTorch;
* ``beta reference``: materialized scores and autograd, where its ``O(T^2)`` memory fits;
* ``softmax sdpa-flash``: ``scaled_dot_product_attention`` restricted to its flash backend (the
  baseline of the report's ratios); on the CPU, or in float32, plain SDPA (``softmax sdpa``).

Decode (``op="decode"``, ``pass="decode"``): one generated token per sequence from a context of
``T`` tokens. beta carries the constant-size state ``H, G`` (``beta_decode_triton``, in place);
the plain-torch recurrence (``beta torch-decode``) returns a new state; softmax appends to a KV
cache and attends with one query (``softmax sdpa kv-cache``). For decode,
``peak_mb`` is the persistent state (``H, G`` or the KV cache) plus the step's transient peak, and
``tokens_per_s`` is ``B`` over the step time.

Times are medians: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` repeats on the CPU.
On the CPU the Triton implementations are skipped and the sizes are small. A case that fails or
does not fit gives a row with a ``status`` and a ``note`` instead of a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .timing import cuda_peak_bytes, median_ms, time_calls

PASSES = ("fwd", "fwd+bwd", "jvp")
HEAD_DIMS = (64, 128)
CUDA_TOKENS, CUDA_WIDTH = 16384, 2048
CUDA_T = (1024, 2048, 4096, 8192, 16384, 32768)
CUDA_QUICK_T = (1024, 4096)
CUDA_DECODE_CONTEXTS = (1024, 8192, 32768)
CUDA_DECODE_BATCH = 8
CPU_TOKENS, CPU_WIDTH = 1024, 256
CPU_T = (256, 1024)
CPU_QUICK_T = (256,)
CPU_DECODE_CONTEXTS = (256, 1024)
CPU_DECODE_BATCH = 1
CPU_REPEATS = 5
CROSSOVER_T = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# Peak memory of the materialized reference, in score matrices (B * H * T^2 elements); measured
# on the CPU for normattn.bench.cpu, rounded up. Cases predicted above the free memory are skipped.
REFERENCE_SCORE_COPIES = {"fwd": 8, "fwd+bwd": 12, "jvp": 16}
MIB = 2**20

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Measuring


def _median_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    return median_ms(time_calls(fn, repeats=CPU_REPEATS, warmup=1))


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Transient CUDA peak of one call; None on the CPU (RSS needs a fresh process: bench.cpu)."""
    return cuda_peak_bytes(fn, device) / MIB if device.type == "cuda" else None


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from .cpu import memory_budget_bytes

    return memory_budget_bytes()


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(error: BaseException) -> dict:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return {"status": "skipped (memory)", "note": "out of memory"}
    if isinstance(error, (NotImplementedError, ImportError)):
        status = "unsupported" if isinstance(error, NotImplementedError) else "unavailable"
        return {"status": status, "note": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    return {"status": "failed", "note": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}


# ---------------------------------------------------------------------------------------------
# Implementations


def _sdpa_flash(causal: bool) -> Attend:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


def _normattn(backend: str, causal: bool) -> Attend:
    import normattn

    return lambda q, k, v: normattn.attention(q, k, v, normalizer="beta", causal=causal, backend=backend)


def attention_impls(device: torch.device, dtype: torch.dtype, causal: bool = True) -> dict[str, Attend]:
    """Implementation name -> ``attend(q, k, v)``; Triton ones on CUDA only."""
    impls: dict[str, Attend] = {}
    if device.type == "cuda":
        impls["beta triton-linear"] = _normattn("triton-linear", causal)
        impls["beta triton"] = _normattn("triton", causal)
    impls["beta torch"] = _normattn("torch", causal)
    impls["beta reference"] = _normattn("reference", causal)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        impls["softmax sdpa-flash"] = _sdpa_flash(causal)
    else:
        impls["softmax sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return impls


def _pass_call(attend: Attend, pass_name: str, q: Tensor, k: Tensor, v: Tensor) -> Callable[[], None]:
    """The timed call of one pass, inputs and cotangent/tangents made beforehand."""
    if pass_name == "fwd":

        def call() -> None:
            with torch.no_grad():
                attend(q, k, v)

    elif pass_name == "fwd+bwd":
        leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
        grad_out = torch.randn_like(v)

        def call() -> None:
            torch.autograd.grad(attend(*leaves), leaves, grad_out)

    else:
        tangents = tuple(torch.randn_like(x) for x in (q, k, v))

        def call() -> None:
            torch.func.jvp(attend, (q, k, v), tangents)

    return call


def _reference_fits(pass_name: str, batch: int, heads: int, t: int, dtype: torch.dtype, free: int) -> bool:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return REFERENCE_SCORE_COPIES[pass_name] * batch * heads * t * t * itemsize < 0.8 * free


def _time_attention(
    impl: str, attend: Attend, pass_name: str, batch: int, heads: int, t: int, d: int,
    device: torch.device, dtype: torch.dtype,
) -> dict:  # fmt: skip
    row = {
        "op": "attention", "impl": impl, "normalizer": impl.split()[0], "causal": True, "pass": pass_name,
        "T": t, "d": d, "B": batch, "H": heads, "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    if impl == "beta reference" and not _reference_fits(
        pass_name, batch, heads, t, dtype, _free_bytes(device)
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
    return {**row, "status": "ok", "ms": ms, "tokens_per_s": batch * t / (ms * 1e-3), "peak_mb": peak}


def _attention_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(B, H, T, d) with B * T and H * d fixed (B at least 1 where T exceeds the token budget)."""
    on_cuda = device.type == "cuda"
    tokens, width = (CUDA_TOKENS, CUDA_WIDTH) if on_cuda else (CPU_TOKENS, CPU_WIDTH)
    t_values = (CUDA_QUICK_T if quick else CUDA_T) if on_cuda else (CPU_QUICK_T if quick else CPU_T)
    return [(max(1, tokens // t), width // d, t, d) for d in HEAD_DIMS for t in t_values]


# ---------------------------------------------------------------------------------------------
# Decode


def _beta_decode_step(impl: str) -> Callable[..., Any]:
    """``step(q_t, k_t, v_t, H, G, scale)``: the fused kernel updates ``H, G`` in place, the torch
    recurrence (``recurrent.beta_decode``) returns a new state."""
    if impl == "beta triton-decode":
        from ..ops.beta_linear.triton_decode import beta_decode_triton

        return lambda *args: beta_decode_triton(*args, inplace=True)
    from ..ops.beta_linear.recurrent import BetaState, beta_decode

    return lambda q_t, k_t, v_t, h, g, scale: beta_decode(q_t, k_t, v_t, BetaState(h, g, 0), scale)


def _time_decode(
    impl: str, batch: int, heads: int, context: int, d: int, device: torch.device, dtype: torch.dtype
) -> dict:
    row = {
        "op": "decode", "impl": impl, "normalizer": impl.split()[0], "causal": True, "pass": "decode",
        "T": context, "d": d, "B": batch, "H": heads, "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    scale = 1 / math.sqrt(d)
    try:
        q_t, k_t, v_t = (torch.randn(batch, heads, 1, d, device=device, dtype=dtype) for _ in range(3))
        if impl.startswith("beta"):
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            keys = torch.randn(batch, heads, context - 1, d, device=device, dtype=acc)
            state_h = keys.transpose(-1, -2) @ torch.randn_like(keys)
            state_g = keys.transpose(-1, -2) @ keys
            del keys
            step = _beta_decode_step(impl)
            state_bytes = state_h.nbytes + state_g.nbytes

            def call() -> None:
                step(q_t, k_t, v_t, state_h, state_g, scale)

        else:
            cache_k, cache_v = (
                torch.randn(batch, heads, context, d, device=device, dtype=dtype) for _ in range(2)
            )
            state_bytes = cache_k.nbytes + cache_v.nbytes

            def call() -> None:
                cache_k[:, :, context - 1 :] = k_t
                cache_v[:, :, context - 1 :] = v_t
                F.scaled_dot_product_attention(q_t, cache_k, cache_v, scale=scale)

        with torch.no_grad():
            call()
            ms = _median_ms(call, device)
            transient = _peak_mb(call, device) or 0.0
    except Exception as error:  # a row that says why, instead of a crashed bench
        return {**row, **_failure(error)}
    finally:
        _release(device)
    return {
        **row, "status": "ok", "ms": ms, "tokens_per_s": batch / (ms * 1e-3),
        "peak_mb": state_bytes / MIB + transient,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Public


def bench_linear(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, quick: bool = False
) -> list[dict]:
    """Rows for every (op, impl, pass, T, d): ``ms``, ``tokens_per_s``, ``peak_mb``, ``status``.

    Keys: ``op`` (``attention``/``decode``), ``impl``, ``normalizer``, ``causal``, ``pass``
    (``fwd``/``fwd+bwd``/``jvp``/``decode``), ``T`` (sequence or context length), ``d``, ``B``,
    ``H``, ``dtype``, and ``note`` where a case was not timed. See the module docstring.
    """
    device = torch.device(device)
    if device.type != "cuda" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # half-precision matmuls on the CPU time nothing useful
    rows = []
    impls = attention_impls(device, dtype)
    for batch, heads, t, d in _attention_shapes(device, quick):
        for pass_name in PASSES:
            for impl, attend in impls.items():
                rows.append(_time_attention(impl, attend, pass_name, batch, heads, t, d, device, dtype))
    on_cuda = device.type == "cuda"
    contexts = CUDA_DECODE_CONTEXTS if on_cuda else CPU_DECODE_CONTEXTS
    batch = CUDA_DECODE_BATCH if on_cuda else CPU_DECODE_BATCH
    width = CUDA_WIDTH if on_cuda else CPU_WIDTH
    decode_impls = ("beta triton-decode",) if on_cuda else ()
    decode_impls += ("beta torch-decode", "softmax sdpa kv-cache")
    for d in HEAD_DIMS:
        for context in contexts[:2] if quick else contexts:
            for impl in decode_impls:
                rows.append(_time_decode(impl, batch, width // d, context, d, device, dtype))
    return rows


def find_crossover(
    d: int = 64,
    heads: int | None = None,
    batch: int = 1,
    pass_name: str = "fwd",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    t_values: Sequence[int] = CROSSOVER_T,
) -> dict:
    """The sequence length from which the linear-time beta kernels beat the quadratic ones.

    Times ``backend="triton"`` and ``backend="triton-linear"`` (causal beta, ``heads`` default
    ``2048 // d``) at each T. Returns ``crossover_T``, the first measured T where the linear kernels
    are at least as fast (None if never), ``interpolated_T``, where the log time ratio crosses 0
    between the bracketing measurements (log-linear in T), and the timing ``rows``.
    """
    device = torch.device(device)
    heads = heads or CUDA_WIDTH // d
    impls = {name: attend for name, attend in attention_impls(device, dtype).items() if "triton" in name}
    if len(impls) != 2:
        raise ValueError("find_crossover times the Triton kernels and needs a CUDA device")
    rows, ratios = [], []
    for t in sorted(t_values):
        timed = {
            name: _time_attention(name, attend, pass_name, batch, heads, t, d, device, dtype)
            for name, attend in impls.items()
        }
        rows += timed.values()
        linear, quadratic = timed["beta triton-linear"].get("ms"), timed["beta triton"].get("ms")
        if linear is not None and quadratic is not None:
            ratios.append((t, math.log(linear / quadratic)))
    crossover = next((t for t, log_ratio in ratios if log_ratio <= 0), None)
    interpolated = None
    if ratios and ratios[0][1] <= 0:
        interpolated = float(ratios[0][0])  # already at the shortest T measured: an upper bound
    for (t0, r0), (t1, r1) in zip(ratios, ratios[1:], strict=False):
        if interpolated is None and r0 > 0 >= r1:
            fraction = r0 / (r0 - r1)
            interpolated = math.exp(math.log(t0) + fraction * (math.log(t1) - math.log(t0)))
    return {"crossover_T": crossover, "interpolated_T": interpolated, "rows": rows}
