"""The CPU run: time and peak RSS of every (backend, normalizer, pass, T), one fresh process per case
(forked from a server that imported torch and normattn but computed nothing), so that a case's peak
RSS is free of what earlier cases left in the heap. Cases predicted to exceed the memory budget are
skipped."""

from __future__ import annotations

import ctypes
import gc
import itertools
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

import normattn

from .measure import MIB, PASSES, SDPA_KERNELS, attend_fn, measured_row, pass_call, sdpa_baseline, supports
from .report import add_ratio, add_window_cost

BATCH, HEADS, HEAD_DIM = 1, 4, 64
DEFAULT_T, QUICK_T = (256, 1024, 4096, 8192), (256, 1024)
DEFAULT_BACKENDS, ALL_BACKENDS = ("reference", "torch"), ("reference", "torch", "triton", "triton-linear")
# Named case sets of (T, window) pairs, causal; None: the T values asked for, without a window.
CASE_SETS = {"default": None, "window": ((1024, None), (16384, (512, 0)))}
WARMUP_T = 16
# Peak of the paths that materialize T x T scores, in score matrices (B*H*T^2 elements) per pass,
# the most measured at T=1024-2048, rounded up; used until a smaller T of the same case is measured.
QUADRATIC_BACKENDS = ("reference", "sdpa-math")
QUADRATIC_PEAK_SCORES = {"fwd": 8, "fwd+bwd": 18, "jvp": 14, "jvp+bwd": 22}
MEMORY_BUDGET_FRACTION = 0.6
# Imported once by the fork server rather than by every case (the first backward imports sympy,
# the first torch.func.jvp torch._dynamo: seconds each); importing computes nothing.
PRELOAD = ["torch.fx.experimental.symbolic_shapes", "torch._dynamo", "normattn.bench.cpu"]
CASE_COLUMNS = ["backend", "normalizer", "pass", "T", "causal", "window"]
COLUMNS = [*CASE_COLUMNS, "status", "median_ms", "iqr_ms", "repeats", "peak_mib", "note"]
METHOD = f"""\
- CPU, B={BATCH}, H={HEADS}, d={HEAD_DIM}, a fresh process per case: `Timer.adaptive_autorange` medians and
  IQRs; `peak_mib`: peak RSS above the RSS before (VmHWM reset via `/proc/self/clear_refs`). `vs_reference`:
  the same normalizer's; `vs_sdpa`: softmax SDPA (`sdpa-math` for JVP passes) for every normalizer;
  `window_vs_causal_calls`: a windowed case's time over that of T/T' causal calls of the window-free T'."""


def cpu_cases(
    T_values: Sequence[int],
    backends: Sequence[str] | None = None,
    normalizers: Sequence[str] | None = None,
    passes: Sequence[str] | None = None,
    causal: Sequence[bool] = (True,),
    case_set: str | None = None,
) -> list[dict]:
    """Every supported (backend, normalizer) of the registry (None: defaults) and, without a window, each
    pass's SDPA baseline. The cases of one (T, pass) run back to back (their ratios see the same load),
    each T after the smaller ones (whose peaks predict its memory)."""
    names = normalizers or list(normattn.NORMALIZERS)
    cpu = torch.device("cpu")
    subjects = [(b, n) for b in backends or DEFAULT_BACKENDS for n in names if supports(b, n, cpu)]
    sizes = CASE_SETS[case_set or "default"] or [(T, None) for T in sorted(T_values)]
    causal = causal if CASE_SETS[case_set or "default"] is None else (True,)
    cases = []
    for is_causal, (T, window), pass_name in itertools.product(causal, sizes, passes or PASSES):
        baseline = [(sdpa_baseline(pass_name), "softmax")] if window is None else []
        for backend, normalizer in subjects + baseline:
            cases.append(dict(zip(CASE_COLUMNS, (backend, normalizer, pass_name, T, is_causal, window))))
    return cases


def measure_case(case: dict, dtype: torch.dtype, budget_s: float, threads: int | None) -> dict:
    """In the fresh process: the case's measurements, or why there are none."""
    if threads is not None:
        torch.set_num_threads(threads)
    attend = attend_fn(case["backend"], case["normalizer"], case["causal"], case["window"])

    def call_at(T: int) -> Callable[[], None]:
        call = pass_call(
            attend, case["pass"], [torch.randn(BATCH, HEADS, T, HEAD_DIM, dtype=dtype) for _ in "qkv"]
        )
        # Free heap pages back to the kernel: the measured call's allocations must show as new pages.
        gc.collect()
        getattr(ctypes.CDLL(None), "malloc_trim", lambda _: None)(0)  # glibc only
        return call

    cpu = torch.device("cpu")
    warm_up = measured_row(lambda: call_at(min(case["T"], WARMUP_T)), cpu, budget_s=0.01)
    return warm_up if warm_up["status"] != "ok" else measured_row(lambda: call_at(case["T"]), cpu, budget_s)


def memory_budget_bytes() -> int:
    """A share of the memory available now (and of the cgroup limit, where there is one)."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    meminfo, limit = Path("/proc/meminfo"), Path("/sys/fs/cgroup/memory.max")
    for line in meminfo.read_text().splitlines() if meminfo.exists() else []:
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if limit.exists() and limit.read_text().strip().isdigit():
        available = min(available, int(limit.read_text()))
    return int(MEMORY_BUDGET_FRACTION * available)


def run_cpu(
    cases: Sequence[dict], dtype: torch.dtype, budget_s: float, threads: int | None, memory_budget: int
) -> pd.DataFrame:
    """One row per case: its ``COLUMNS`` (status ``ok``, ``unsupported``, ``skipped (memory)`` or
    ``failed``) and its ratios to the baselines of the same run."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    itemsize = torch.empty((), dtype=dtype).element_size()
    measured: dict[tuple, tuple[int, float]] = {}  # the case without T -> (T, peak bytes) measured
    rows = []
    for case in tqdm(cases, desc="normattn bench cpu", unit="case"):
        T, quadratic = case["T"], case["backend"] in QUADRATIC_BACKENDS
        family = tuple(value for key, value in case.items() if key != "T")
        if family in measured:  # a smaller T's peak, scaled by T^2 for materialized scores, else by T
            predicted = measured[family][1] * (T / measured[family][0]) ** (2 if quadratic else 1)
        else:
            predicted = quadratic * QUADRATIC_PEAK_SCORES[case["pass"]] * BATCH * HEADS * T**2 * itemsize
        if predicted > memory_budget:
            note = f"predicted peak {predicted / MIB:.0f} MiB > budget {memory_budget / MIB:.0f} MiB"
            rows.append({**case, "status": "skipped (memory)", "note": note})
            continue
        try:
            with ProcessPoolExecutor(1, mp_context=context) as fresh_process:
                result = fresh_process.submit(measure_case, case, dtype, budget_s, threads).result()
        except BrokenProcessPool:
            result = {"status": "failed", "note": "the case's process died (out of memory?)"}
            measured[family] = (T, math.inf)  # a larger T of the case would die too
        if result["status"] == "ok":
            measured[family] = (T, result["peak_mib"] * MIB)
        rows.append({**case, **result})
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    df["window"] = df["window"].map(lambda w: f"{w[0]},{w[1]}" if isinstance(w, tuple) else "")
    reference = df["backend"] == "reference"
    add_ratio(df, "speedup_vs_reference", reference, same_normalizer=True)
    add_ratio(df, "memory_saving_vs_reference", reference, "peak_mib", same_normalizer=True)
    add_ratio(df, "speedup_vs_sdpa", df["backend"].isin(SDPA_KERNELS))
    add_window_cost(df)
    return df
