"""What the benches measure (``METHOD``) and how, shared by the CPU run and the CUDA stages."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.benchmark import Timer

import normattn

from .memory import peak_memory, reset_peak_memory

PASSES = ("fwd", "fwd+bwd", "jvp", "jvp+bwd")
SDPA_KERNELS = {"sdpa": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-math": SDPBackend.MATH}
MIB = 2**20
ERROR_STATUS = {NotImplementedError: "unsupported", torch.cuda.OutOfMemoryError: "skipped (memory)"}
METHOD = """\
- `normattn.attention(q, k, v, normalizer=..., causal=..., backend=...)` for each normalizer of
  `normattn.NORMALIZERS` a backend accepts, against SDPA: `sdpa` (default kernel), `sdpa-flash`, `sdpa-math`
  (the only one with forward AD). Passes: `fwd` (no_grad), `fwd+bwd` (`autograd.grad` of q, k, v), `jvp`
  (`torch.func.jvp`), `jvp+bwd` (`autograd.grad` of `(o * g1).sum() + (o_dot * g2).sum()` for q, k, v and
  their tangents). A case that raises is not timed (`unsupported`, `skipped (memory)`, `failed` + note).
- Ratios: baseline median (or peak) / this one, against the baseline of the same run, pass, T and shape."""


def sdpa_baseline(pass_name: str, fast: str = "sdpa") -> str:
    """SDPA's flash kernels have no forward-mode AD: the JVP passes compare with its math kernel."""
    return "sdpa-math" if pass_name.startswith("jvp") else fast


def attend_fn(backend: str, normalizer: str, causal: bool, window: tuple[int, int] | None = None) -> Callable:
    """``attend(q, k, v)`` of a normattn backend, or of an SDPA baseline (softmax, any ``normalizer``)."""
    if backend in SDPA_KERNELS:
        kernel = SDPA_KERNELS[backend]

        def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with contextlib.nullcontext() if kernel is None else sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    options = {"normalizer": normalizer, "causal": causal, "backend": backend}
    if window is not None:  # only when set: the default cases run on a normattn without the keyword
        options["window"] = window
    return lambda q, k, v: normattn.attention(q, k, v, **options)


def supports(backend: str, normalizer: str, device: torch.device) -> bool:
    """False where the backend refuses the normalizer (``triton-linear`` is beta only)."""
    x = torch.zeros(1, 1, 4, 4, device=device)
    try:
        with torch.no_grad():
            attend_fn(backend, normalizer, causal=True)(x, x, x)
    except ValueError:
        return False
    return True


def pass_call(fn: Callable[..., Tensor], pass_name: str, inputs: Sequence[Tensor]) -> Callable[[], None]:
    """The timed call of one pass of ``fn(*inputs)``; it returns nothing, so its outputs die in it."""
    if pass_name not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")
    primals = tuple(x.detach().requires_grad_(pass_name.endswith("bwd")) for x in inputs)
    tangents = tuple(torch.randn_like(x).requires_grad_(pass_name == "jvp+bwd") for x in inputs)
    cotangents: list[Tensor] = []

    def random_like(out: Tensor) -> list[Tensor]:
        # Made in the first call, an untimed warm-up, where the output's shape is known.
        if not cotangents:
            cotangents.extend(torch.randn_like(out) for _ in range(2))
        return cotangents

    def call() -> None:
        if pass_name == "fwd":
            with torch.no_grad():
                fn(*primals)
        elif pass_name == "fwd+bwd":
            out = fn(*primals)
            torch.autograd.grad(out, primals, random_like(out)[0])
        elif pass_name == "jvp":
            torch.func.jvp(fn, primals, tangents)
        else:
            out, out_dot = torch.func.jvp(fn, primals, tangents)
            g1, g2 = random_like(out)
            torch.autograd.grad((out * g1).sum() + (out_dot * g2).sum(), primals + tangents)

    return call


def measure(call: Callable[[], None], device: torch.device, budget_s: float) -> dict[str, float]:
    """Median and IQR time (ms), timed calls and peak memory (MiB above the start) of ``call()``.

    CPU: ``Timer.adaptive_autorange`` (its first calls warm up; it stops at IQR/median < 0.1 or ``budget_s``),
    the peak spanning all calls. CUDA: a warm-up call (Triton compiles) gives the peak, without
    ``do_bench``'s cache-flush buffer; ``triton.testing.do_bench`` times over ``budget_s``."""
    reset_peak_memory(device)
    start, _ = peak_memory(device)
    if device.type == "cuda":
        import triton.testing

        call()
        torch.cuda.synchronize(device)
        peak, _ = peak_memory(device)
        median_ms = triton.testing.do_bench(call, rep=1e3 * budget_s, return_mode="median")
        timing = {"median_ms": float(median_ms), "iqr_ms": math.nan, "repeats": math.nan}
    else:
        # Timer runs on one thread unless told: the threads this process is set to use.
        timer = Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
        result = timer.adaptive_autorange(min_run_time=0.01, max_run_time=budget_s)
        peak, _ = peak_memory(device)
        repeats = result.number_per_run * len(result.raw_times)
        timing = {"median_ms": 1e3 * result.median, "iqr_ms": 1e3 * result.iqr, "repeats": repeats}
    peak_mib = math.nan if peak is None or start is None else max(0, peak - start) / MIB
    return {**timing, "peak_mib": peak_mib}


def measured_row(make_call: Callable[[], Callable[[], None]], device: torch.device, budget_s: float) -> dict:
    """``measure(make_call())`` with status ``ok``, or the status and error of a case that raised."""
    try:
        return {"status": "ok", **measure(make_call(), device, budget_s)}
    except Exception as error:  # a row that says why, instead of a crashed bench
        status = next((s for kind, s in ERROR_STATUS.items() if isinstance(error, kind)), "failed")
        lines = str(error).strip().splitlines() or [""]
        return {"status": status, "note": f"{type(error).__name__}: {lines[0][:200]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
