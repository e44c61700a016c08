"""The CUDA stages ``run_flash``, ``run_linear``, ``run_window``, ``run_decode`` and ``run_rows``:
functions of a ``CudaConfig`` returning one row per case (a DataFrame). Each runs on its own (a
time-boxed GPU session calls them one by one) and, with ``CudaConfig.tiny()``, on the CPU under
``TRITON_INTERPRET=1``."""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import normattn
from normattn.ops.common import triton_usable

from . import report
from .measure import MIB, PASSES, attend_fn, measured_row, pass_call, sdpa_baseline, supports

BASELINES = ("sdpa-flash", "sdpa-math", "sdpa-kv-cache", "torch.amax", "torch.softmax")
# A pass's work in forward passes (FlashAttention's: a backward is 2.5 forwards; a JVP carries a
# tangent through each of a forward's products, 3 forwards; its backward 2.5x that again).
PASS_FLOPS = {"fwd": 1.0, "fwd+bwd": 3.5, "jvp": 3.0, "jvp+bwd": 10.5}
# Input-sized matrices a row op must read and write per pass.
ROW_MATRICES = {"max fwd": 1, "max fwd+bwd": 2, "softmax fwd": 2, "softmax fwd+bwd": 5}
# Every stage's columns, so that stages concatenate and an empty stage still has them.
COLUMNS = [
    "stage", "op", "backend", "normalizer", "pass", "T", "causal", "window", "d", "B", "H", "n_rows", "dtype",
    "status", "median_ms", "iqr_ms", "repeats", "peak_mib", "state_mib", "note",
]  # fmt: skip
METHOD = """\
- CUDA: `triton.testing.do_bench` medians; `peak_mib`: the allocator's peak in the warm-up call.
  `vs_baseline`: `sdpa-flash`, `sdpa-math` (JVP passes), `sdpa-kv-cache` or torch. `tflops`: `4 B H T^2 d`
  per forward (half if causal) x 1 / 3.5 / 3 / 10.5 for fwd / fwd+bwd / jvp / jvp+bwd; `gbps`: a row op's
  input-sized matrices read and written."""

MakeCall = Callable[["CudaConfig", dict], Callable[[], None]]  # builds a case's timed call


@dataclass(frozen=True)
class CudaConfig:
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    batch: int = 4
    heads: int = 16
    head_dims: tuple[int, ...] = (128, 64)  # run_linear and run_decode take the first
    T_values: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    causal: tuple[bool, ...] = (True,)
    passes: tuple[str, ...] = PASSES
    normalizers: tuple[str, ...] | None = None  # None: every one in normattn.NORMALIZERS
    # (T, window) of the window stage: the window's cost against T / T' causal calls of the first T'
    window_cases: tuple[tuple[int, tuple[int, int] | None], ...] = ((1024, None), (16384, (512, 0)))
    decode_context: int = 32768
    row_shapes: tuple[tuple[int, int], ...] = ((16384, 4096), (4096, 32768))  # (rows, row length)
    case_budget_s: float = 0.1  # do_bench's window per case (CPU: adaptive_autorange's limit)
    stage_budget_s: float | None = None  # cases not started within it read "skipped (time budget)"

    @classmethod
    def tiny(cls, **changes) -> CudaConfig:
        """The dry run: every stage on the CPU, tiny shapes, float32, few repeats."""
        tiny = cls(device="cpu", dtype=torch.float32, batch=1, heads=2, head_dims=(16,), T_values=(16, 32))
        tiny = replace(tiny, window_cases=((16, None), (48, (8, 0))), decode_context=64)
        return replace(tiny, row_shapes=((8, 64),), case_budget_s=0.01, **changes)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def supported(self, backend: str) -> list[str]:
        """The normalizers asked for (default: the registry's) that ``backend`` accepts."""
        names = self.normalizers or normattn.NORMALIZERS
        return [name for name in names if supports(backend, name, torch.device(self.device))]


def _run(stage: str, cases: list[dict], make_call: MakeCall, config: CudaConfig) -> pd.DataFrame:
    device, dtype = torch.device(config.device), str(config.dtype).removeprefix("torch.")
    deadline = time.monotonic() + (math.inf if config.stage_budget_s is None else config.stage_budget_s)
    rows = []
    for case in tqdm(cases, desc=f"normattn bench {stage}", unit="case"):
        if time.monotonic() >= deadline:
            result = {"status": "skipped (time budget)"}
        else:
            result = measured_row(functools.partial(make_call, config, case), device, config.case_budget_s)
        rows.append({"stage": stage, **case, "dtype": dtype, **result})
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    report.add_ratio(df, "speedup_vs_baseline", df["backend"].isin(BASELINES))
    return df


def _attention_call(config: CudaConfig, case: dict) -> Callable[[], None]:
    qkv = [config.randn(case["B"], case["H"], case["T"], case["d"]) for _ in "qkv"]
    attend = attend_fn(case["backend"], case["normalizer"], case["causal"], case.get("window"))
    return pass_call(attend, case["pass"], qkv)


def _attention_stage(stage: str, config: CudaConfig, subjects, passes, head_dims, causal) -> pd.DataFrame:
    """Every (d, mask, T, pass) and ``subjects(pass) -> [(backend, normalizer)]``."""
    cases = []
    for d, is_causal, T, pass_name in itertools.product(head_dims, causal, config.T_values, passes):
        shape = {"pass": pass_name, "T": T, "causal": is_causal, "d": d, "B": config.batch, "H": config.heads}
        cases += [{"backend": b, "normalizer": n, **shape} for b, n in subjects(pass_name)]
    return _run(stage, cases, _attention_call, config)


def run_flash(config: CudaConfig = CudaConfig()) -> pd.DataFrame:
    """Every normalizer's ``triton`` kernels against SDPA, every pass, d and mask; with ``tflops``."""
    names = config.supported("triton")

    def subjects(pass_name: str) -> list[tuple[str, str]]:
        return [("triton", name) for name in names] + [(sdpa_baseline(pass_name, "sdpa-flash"), "softmax")]

    df = _attention_stage("flash", config, subjects, config.passes, config.head_dims, config.causal)
    forward_flops = 4.0 * df["B"] * df["H"] * df["T"] ** 2 * df["d"] / df["causal"].map({True: 2, False: 1})
    df["tflops"] = df["pass"].map(PASS_FLOPS) * forward_flops / (1e-3 * df["median_ms"]) / 1e12
    return df


def run_linear(config: CudaConfig = CudaConfig()) -> pd.DataFrame:
    """Causal ``fwd`` and ``fwd+bwd`` of ``triton-linear`` and ``triton`` against SDPA flash softmax."""
    names = config.supported("triton-linear")
    subjects = [(backend, name) for name in names for backend in ("triton-linear", "triton")]
    subjects.append(("sdpa-flash", "softmax"))
    passes = [pass_name for pass_name in config.passes if pass_name in ("fwd", "fwd+bwd")]
    return _attention_stage("linear", config, lambda _: subjects, passes, config.head_dims[:1], (True,))


def run_window(config: CudaConfig = CudaConfig()) -> pd.DataFrame:
    """Causal ``fwd`` and ``fwd+bwd`` of ``triton`` with a sliding window against causal calls without
    one (``window_vs_causal_calls``: the window's cost in calls of the first T, covering its T)."""
    passes = [pass_name for pass_name in config.passes if pass_name in ("fwd", "fwd+bwd")]
    d = config.head_dims[0]
    grid = itertools.product(config.window_cases, passes, config.supported("triton"))
    shape = {"causal": True, "d": d, "B": config.batch, "H": config.heads}
    cases = [
        {"backend": "triton", "normalizer": name, "pass": pass_name, "T": T, "window": window, **shape}
        for (T, window), pass_name, name in grid
    ]
    df = _run("window", cases, _attention_call, config)
    df["window"] = df["window"].map(lambda w: f"{w[0]},{w[1]}" if isinstance(w, tuple) else "")
    report.add_window_cost(df)
    return df


def linear_crossover(df: pd.DataFrame) -> pd.DataFrame:
    """Per normalizer, pass and d of the ``linear`` stage: the smallest T where ``triton-linear`` beat
    SDPA (NaN: at none)."""
    rows = df[(df["stage"] == "linear") & (df["backend"] == "triton-linear")]
    wins = (
        rows["T"]
        .where(rows["speedup_vs_baseline"] > 1)
        .groupby([rows["normalizer"], rows["pass"], rows["d"]])
    )
    return wins.min().rename("crossover_T").reset_index()


def crossover_sections(df: pd.DataFrame) -> list[tuple[str, str]]:
    """The results.md section of ``linear_crossover``, where a ``linear`` stage ran."""
    crossover = linear_crossover(df)
    title = "Crossover: smallest T where triton-linear beat SDPA"
    return [] if crossover.empty else [(title, report.markdown_table(crossover))]


def _decode_call(config: CudaConfig, case: dict) -> Callable[[], None]:
    B, H, T, d = case["B"], case["H"], case["T"], case["d"]
    if case["backend"] == "beta_decode":
        with torch.no_grad():
            _, state = normattn.beta_prefill(*(config.randn(B, H, T, d) for _ in "qkv"))
        step = [config.randn(B, H, 1, d) for _ in "qkv"]
        return pass_call(lambda q, k, v: normattn.beta_decode(q, k, v, state)[0], "fwd", step)
    cache_k, cache_v = config.randn(B, H, T, d), config.randn(B, H, T, d)
    query = [config.randn(B, H, 1, d)]
    return pass_call(lambda q: F.scaled_dot_product_attention(q, cache_k, cache_v), "fwd", query)


def run_decode(config: CudaConfig = CudaConfig()) -> pd.DataFrame:
    """One ``beta_decode`` step after ``decode_context`` tokens against one SDPA KV-cache step;
    ``state_mib``: beta's d x d states H and G (at least fp32) against the K and V cache."""
    B, H, T, d = config.batch, config.heads, config.decode_context, config.head_dims[0]
    itemsize = config.randn(0).element_size()
    shape = {"pass": "decode", "T": T, "d": d, "B": B, "H": H}
    beta_state_mib, kv_cache_mib = (
        B * H * 2 * d * d * max(4, itemsize) / MIB,
        B * H * 2 * T * d * itemsize / MIB,
    )
    cases = [
        {"backend": "beta_decode", "normalizer": "beta", "state_mib": beta_state_mib, **shape},
        {"backend": "sdpa-kv-cache", "normalizer": "softmax", "state_mib": kv_cache_mib, **shape},
    ]
    df = _run("decode", cases, _decode_call, config)
    df["tokens_per_s"] = B / (1e-3 * df["median_ms"])
    return df


def run_rows(config: CudaConfig = CudaConfig()) -> pd.DataFrame:
    """The Triton row kernels against torch over the last axis, ``fwd`` and ``fwd+bwd``; with ``gbps``."""
    ops: dict[tuple[str, str], Callable] = {
        ("max", "torch.amax"): lambda x: torch.amax(x, dim=-1),
        ("softmax", "torch.softmax"): lambda x: torch.softmax(x, dim=-1),
    }
    if triton_usable(torch.empty(0, device=config.device)):
        from normattn.ops.softmax_rows.triton import softmax_rows_triton

        ops[("max", "triton")] = lambda x: normattn.max_reduce(x, dim=-1, backend="triton").values
        ops[("softmax", "triton")] = lambda x: softmax_rows_triton(x, -1)
    grid = itertools.product(config.row_shapes, sorted(ops), ("fwd", "fwd+bwd"))
    cases = [
        {"op": op, "backend": backend, "normalizer": "", "pass": pass_name, "T": length, "n_rows": n_rows}
        for (n_rows, length), (op, backend), pass_name in grid
    ]

    def make_call(config: CudaConfig, case: dict) -> Callable[[], None]:
        x = config.randn(case["n_rows"], case["T"])
        return pass_call(ops[case["op"], case["backend"]], case["pass"], [x])

    df = _run("rows", cases, make_call, config)
    matrix_bytes = df["n_rows"] * df["T"] * config.randn(0).element_size()
    df["gbps"] = (
        (df["op"] + " " + df["pass"]).map(ROW_MATRICES) * matrix_bytes / (1e-3 * df["median_ms"]) / 1e9
    )
    return df


def run_cuda(config: CudaConfig = CudaConfig()) -> pd.DataFrame:
    """All five stages, one after the other, in one DataFrame."""
    stages = (run_flash, run_linear, run_window, run_decode, run_rows)
    return pd.concat([stage(config) for stage in stages], ignore_index=True)
