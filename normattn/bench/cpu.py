"""CPU bench: forward, forward+backward and JVP time and peak memory of every attention backend.

Each case (backend, normalizer, pass, T) runs in a fresh process (``timing.run_in_fresh_process``):
a tiny call at T=16 creates one-time state, then one full-size call is measured for peak RSS
(``timing.cpu_peak_bytes``) and doubles as the warm-up, then the timed repeats follow. The
materialized reference needs O(T^2) memory, so a case whose predicted peak exceeds the memory
budget is not run and reads "skipped (memory)".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import report, timing

PASSES = ("fwd", "fwd+bwd", "jvp")
NORMALIZERS = ("softmax", "beta")
DEFAULT_T = (256, 1024, 4096, 8192)
QUICK_T = (256, 1024)
DEFAULT_BACKENDS = ("reference", "torch", "sdpa")
# sdpa is torch.nn.functional.scaled_dot_product_attention: a second softmax baseline, not a
# normattn backend; the triton ones run on the CPU only through the (slow) interpreter.
BACKEND_NORMALIZERS = {
    "reference": NORMALIZERS,
    "torch": NORMALIZERS,
    "sdpa": ("softmax",),
    "triton": NORMALIZERS,
    "triton-linear": ("beta",),
}
BATCH, HEADS, HEAD_DIM = 1, 4, 64
WARMUP_T = 16
MIB = 2**20
# Peak bytes of the materialized reference in units of one score matrix (B * H * T^2 * itemsize),
# measured here for fwd / fwd+bwd / jvp: softmax 3.2 / 6.3 / 9.1 at T=1024 and 3.1 / 3.2 / 6.1 at
# T=2048; beta 2.3 / 7.4 / 8.1 and 2.2 / 6.2 / 6.1 (small T pay more for malloc's heap), rounded
# up. Used only before a smaller T of the same case has been measured; after that the measured
# peak is scaled by T^2.
REFERENCE_SCORE_COPIES = {"fwd": 8, "fwd+bwd": 12, "jvp": 16}
MEMORY_BUDGET_FRACTION = 0.6


@dataclass(frozen=True)
class Case:
    backend: str
    normalizer: str
    pass_name: str
    T: int
    dtype: str = "float32"
    causal: bool = True
    repeats: int = 10
    case_budget_s: float = 10.0
    threads: int | None = None  # torch.set_num_threads in the case's process; None keeps torch's default

    @property
    def family(self) -> tuple[str, str, str]:
        return self.backend, self.normalizer, self.pass_name


# ---------------------------------------------------------------------------------------------
# In the child process


def _attend(backend: str, normalizer: str, causal: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    if backend == "sdpa":
        import torch.nn.functional as F

        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    import normattn

    return lambda q, k, v: normattn.attention(q, k, v, normalizer=normalizer, causal=causal, backend=backend)


def _make_call(case: Case, T: int) -> Callable[[], None]:
    """The measured call, its inputs made beforehand; it returns nothing so its outputs die in it."""
    attend = _attend(case.backend, case.normalizer, case.causal)
    generator = torch.Generator().manual_seed(T)
    dtype = getattr(torch, case.dtype)

    def randn() -> Tensor:
        return torch.randn(BATCH, HEADS, T, HEAD_DIM, generator=generator, dtype=dtype)

    q, k, v = randn(), randn(), randn()
    if case.pass_name == "fwd":

        def call() -> None:
            with torch.no_grad():
                attend(q, k, v)

    elif case.pass_name == "fwd+bwd":
        leaves = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
        grad_out = randn()

        def call() -> None:
            torch.autograd.grad(attend(*leaves), leaves, grad_out)

    else:
        tangents = (randn(), randn(), randn())

        def call() -> None:
            torch.func.jvp(attend, (q, k, v), tangents)

    return call


def measure_case(case: Case) -> dict:
    """Peak memory and median time of one case; runs in a fresh process.

    The call measured for memory is a full-size call after the tiny one, so it is the warm-up of
    the timed repeats. Where it alone took longer than the case budget, it is the only time sample
    (the allocator does not cache CPU memory, so later calls would not run warmer) and the row says
    so; otherwise up to ``case.repeats`` repeats follow, as many as fit in the budget (at least 1).
    """
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    try:
        _make_call(case, min(case.T, WARMUP_T))()
    except NotImplementedError as error:
        return {"status": "unsupported", "note": str(error).splitlines()[0][:200]}
    except ImportError as error:
        return {"status": "unavailable", "note": f"{type(error).__name__}: {error}"}
    call = _make_call(case, case.T)
    peak_bytes, method, first_call_s = timing.cpu_peak_bytes(call)
    result = {"status": "ok", "first_call_ms": 1e3 * first_call_s}
    if first_call_s >= case.case_budget_s:
        seconds = [first_call_s]
        result["note"] = "timed once: the memory-measurement call (slower than the case budget)"
    else:
        repeats = min(case.repeats, max(1, math.floor(case.case_budget_s / first_call_s)))
        seconds = timing.time_calls(call, repeats=repeats, warmup=0)
    result.update(
        ms=timing.median_ms(seconds),
        ms_min=1e3 * min(seconds),
        ms_max=1e3 * max(seconds),
        repeats=len(seconds),
        peak_mb=peak_bytes / MIB,
        memory_method=method,
    )
    return result


# ---------------------------------------------------------------------------------------------
# In the parent process


def memory_budget_bytes() -> int:
    """A share of the memory available now (and of the cgroup limit, where there is one)."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            available = min(available, int(limit))
    except OSError:
        pass
    return int(MEMORY_BUDGET_FRACTION * available)


def predicted_peak_bytes(case: Case, measured: dict[tuple, tuple[int, float]]) -> float | None:
    """The measured peak of the same backend, normalizer and pass at a smaller T, scaled by T^2 for
    the materialized reference and by T for the others (blockwise and chunked backends keep no
    T x T matrix); for the reference, its score-matrix count when nothing was measured yet."""
    quadratic = case.backend == "reference"
    if case.family in measured:
        smaller_T, peak = measured[case.family]
        return peak * (case.T / smaller_T) ** (2 if quadratic else 1)
    if quadratic:
        itemsize = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
        return REFERENCE_SCORE_COPIES[case.pass_name] * BATCH * HEADS * case.T**2 * itemsize
    return None


def cases_for(
    T_values: Sequence[int],
    normalizers: Sequence[str],
    backends: Sequence[str],
    passes: Sequence[str] = PASSES,
    **options,
) -> list[Case]:
    """Every combination, ordered so that the backends of one (normalizer, T, pass) run back to back
    (their ratios then see the same machine load) and each T after the smaller ones (whose peaks
    predict its memory)."""
    return [
        Case(backend, normalizer, pass_name, T, **options)
        for normalizer in normalizers
        for T in sorted(T_values)
        for pass_name in passes
        for backend in backends
        if normalizer in BACKEND_NORMALIZERS[backend]
    ]


def run_cpu_bench(cases: Sequence[Case], memory_budget: int, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    measured: dict[tuple, tuple[int, float]] = {}
    out_of_memory: set[tuple] = set()
    rows = []
    bar = tqdm(cases, desc="normattn bench cpu", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(f"{case.normalizer} {case.pass_name} T={case.T} {case.backend}")
        row = {
            "normalizer": case.normalizer,
            "pass": case.pass_name,
            "T": case.T,
            "backend": case.backend,
            "B": BATCH,
            "H": HEADS,
            "d": HEAD_DIM,
            "causal": case.causal,
            "dtype": case.dtype,
        }
        predicted = predicted_peak_bytes(case, measured)
        if case.family in out_of_memory or (predicted is not None and predicted > memory_budget):
            row["status"] = "skipped (memory)"
            if predicted is not None:
                row["predicted_peak_mb"] = predicted / MIB
        else:
            row.update(timing.run_in_fresh_process(measure_case, case))
            if row["status"] == "ok":
                measured[case.family] = (case.T, row["peak_mb"] * MIB)
            elif "died" in row["status"]:
                out_of_memory.add(case.family)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Target:
    """A goal from the issue for backend="torch", against the reference of the same run."""

    normalizer: str
    pass_name: str
    T: int
    min_speedup: float
    min_memory_saving: float

    def check(self, rows: Sequence[dict]) -> str:
        name = f'{self.normalizer} "torch" {self.pass_name} T={self.T}'
        row = next(
            (
                r
                for r in rows
                if (r["backend"], r["normalizer"], r["pass"], r["T"]) == ("torch", *self.family)
            ),
            None,
        )
        if row is None:
            return f"- {name}: not measured in this run"
        speedup = row.get("speedup_vs_reference")
        saving = row.get("memory_saving_vs_reference")
        if speedup is None or saving is None:
            return f"- {name}: no reference measurement to compare with (torch: {row['status']})"
        time_goal = (
            f"at least {self.min_speedup:g}x faster"
            if self.min_speedup >= 1
            else f"within {1 / self.min_speedup:g}x of its time"
        )
        time_met = "met" if speedup >= self.min_speedup else "NOT met"
        memory_met = "met" if saving >= self.min_memory_saving else "NOT met"
        return (
            f"- {name}: speedup {report.format_ratio(speedup)} (goal: {time_goal}) {time_met}; "
            f"memory saving {report.format_ratio(saving)} (goal: at least {self.min_memory_saving:g}x) "
            f"{memory_met}"
        )

    @property
    def family(self) -> tuple[str, str, int]:
        return self.normalizer, self.pass_name, self.T


# The issue: beta "torch" fwd+bwd at T=4096 >= 10x faster and >= 20x less peak memory than the
# reference; softmax "torch" at T=8192 within 2x of the reference's time with >= 10x less memory
# (no pass named, so every pass is checked).
TARGETS = (
    Target("beta", "fwd+bwd", 4096, 10, 20),
    *(Target("softmax", pass_name, 8192, 0.5, 10) for pass_name in PASSES),
)

CSV_COLUMNS = (
    "normalizer",
    "pass",
    "T",
    "backend",
    "B",
    "H",
    "d",
    "causal",
    "dtype",
    "status",
    "ms",
    "ms_min",
    "ms_max",
    "repeats",
    "first_call_ms",
    "peak_mb",
    "memory_method",
    "predicted_peak_mb",
    "speedup_vs_reference",
    "memory_saving_vs_reference",
    "speedup_vs_sdpa",
    "memory_saving_vs_sdpa",
    "note",
)


def _time_cell(row: dict) -> str:
    return report.format_number(row.get("ms")) if row["status"] == "ok" else row["status"]


def _memory_cell(row: dict) -> str:
    if row["status"] == "ok":
        return report.format_number(row.get("peak_mb"))
    if row.get("predicted_peak_mb") is not None:
        return f"(~{report.format_number(row['predicted_peak_mb'])} predicted)"
    return ""


TABLE_COLUMNS = (
    report.Column("normalizer", "normalizer"),
    report.Column("pass", "pass"),
    report.Column("T", "T"),
    report.Column("backend", "backend"),
    report.Column("ms", "median ms", render=_time_cell),
    report.Column("repeats", "repeats"),
    report.Column("peak_mb", "peak MiB", render=_memory_cell),
    report.Column("speedup_vs_reference", "speedup vs ref", report.format_ratio),
    report.Column("memory_saving_vs_reference", "mem saving vs ref", report.format_ratio),
    report.Column("speedup_vs_sdpa", "speedup vs SDPA", report.format_ratio),
    report.Column("memory_saving_vs_sdpa", "mem saving vs SDPA", report.format_ratio),
)

METHOD = """\
- Causal attention, B={B}, H={H}, d={d}, float32 inputs from `torch.randn`; every normattn backend is
  called through `normattn.attention(..., backend=...)`; `sdpa` is
  `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, a second softmax baseline.
- Passes: `fwd` (under `torch.no_grad()`), `fwd+bwd` (forward, then `torch.autograd.grad` of q, k, v
  with a random output gradient), `jvp` (`torch.func.jvp` with random tangents for q, k, v).
- Each case runs in a fresh process: one call at T={warmup_T} creates one-time state, one full-size
  call is measured for peak memory and is the warm-up, then the timed repeats follow
  (`time.perf_counter`, {threads} torch threads). `median ms` is their median; `repeats` is how many
  ran: up to {repeats}, fewer (at least 1) where they would take more than {budget:g} s. A case whose
  memory-measurement call alone took longer than {budget:g} s is timed by that one call (CPU memory
  is not cached, so a second call would not run warmer); the CSV's `note` says so.
- `peak MiB`: peak RSS during the call minus RSS just before it (kernel high-water mark reset via
  `/proc/self/clear_refs`; see `normattn/bench/timing.py`), output tensors included.
- speedup = reference (or SDPA) median time / this backend's; mem saving = reference (or SDPA)
  peak / this backend's peak; above 1 is better. Reference and SDPA come from the same run.
- Cases whose predicted peak (the same case at a smaller T, scaled by T^2 for the reference and by
  T for the others) exceeds the memory budget of {budget_gib:.1f} GiB (60% of the memory available at
  the start) are "skipped (memory)"."""


def write_cpu_report(
    rows: list[dict], out_dir: Path, header: dict[str, str], method: str
) -> tuple[list[Path], str]:
    """CSV, PNG and results.md in ``out_dir``; returns the paths and the text table with targets."""
    for baseline in ("reference", "sdpa"):
        report.add_ratios(
            rows,
            is_baseline=lambda row, name=baseline: row["backend"] == name and row["status"] == "ok",
            match_keys=("normalizer", "pass", "T"),
            name=baseline,
        )
    columns = [key for key in CSV_COLUMNS if any(key in row for row in rows)]
    paths = [report.write_csv(out_dir / "bench_cpu.csv", rows, columns, header)]

    normalizers = list(dict.fromkeys(row["normalizer"] for row in rows))
    passes = [pass_name for pass_name in PASSES if any(row["pass"] == pass_name for row in rows)]
    panels = []
    for metric, label in (("ms", "median time (ms)"), ("peak_mb", "peak memory (MiB)")):
        for normalizer in normalizers:
            for pass_name in passes:
                selected = [r for r in rows if (r["normalizer"], r["pass"]) == (normalizer, pass_name)]
                panel = report.Panel(f"{normalizer} {pass_name}: {label.split(' (')[0]}", "T", label)
                for row in selected:
                    if row["status"] == "ok":
                        panel.series.setdefault(row["backend"], []).append((row["T"], row[metric]))
                not_measured: dict[tuple[str, str], list[str]] = {}
                for row in selected:
                    if row["status"] != "ok":
                        not_measured.setdefault((row["backend"], row["status"]), []).append(str(row["T"]))
                panel.note = "\n".join(
                    f"{backend}: {status} (T={', '.join(t_values)})"
                    for (backend, status), t_values in not_measured.items()
                )
                panels.append(panel)
    title = f"causal attention, B={BATCH}, H={HEADS}, d={HEAD_DIM}\n{report.header_title(header)}"
    paths.append(report.plot_panels(out_dir / "bench_cpu.png", panels, title=title, ncols=len(passes)))

    targets = "\n".join(target.check(rows) for target in TARGETS)
    table_md = report.format_table(rows, TABLE_COLUMNS, markdown=True)
    sections = [("How it was measured", method), ("Results", table_md), ("Targets from the issue", targets)]
    paths.append(report.write_markdown(out_dir / "results.md", "normattn bench (CPU)", header, sections))
    text = (
        report.format_table(rows, TABLE_COLUMNS, markdown=False) + "\n\nTargets from the issue:\n" + targets
    )
    return paths, text


def method_text(repeats: int, case_budget_s: float, memory_budget: int, threads: int | None) -> str:
    return METHOD.format(
        threads="default" if threads is None else threads,
        B=BATCH,
        H=HEADS,
        d=HEAD_DIM,
        warmup_T=WARMUP_T,
        repeats=repeats,
        budget=case_budget_s,
        budget_gib=memory_budget / 2**30,
    )
