"""``make gpu-check OUT=dir``: the GPU proof in one time-boxed command (README, "GPU").

Stages, each in its own process with its own time limit, each writing to ``OUT`` as it finishes
(a run killed midway still returns what it finished):

0. ``warm`` (in the background from the start): compiles, many processes at once, the kernels the
   speed and training stages will launch, slowest first, into Triton's on-disk cache;
1. ``env``: GPU, driver, versions, commit; a bf16 matmul and a copy measure the two ceilings;
2. ``correctness``: ``pytest tests/gpu -m "not slow"`` on every core (FlashAttention's error rule in
   bf16/fp16 for every kernel, normalizer and feature, the JVP and its gradient; NaN fails);
3. ``speed``: the bench's CUDA stages side by side (``normattn.bench.cuda``): softmax forward,
   backward and JVP against SDPA, beta quadratic and linear with the crossover, a sliding window
   against causal calls, decode, row kernels;
4. ``training``: 50 iterations of ``shakespeare-char`` per attention, tokens/s.

Then ``summary.md`` checks the targets (H100/H200, bf16, d=128), and a short table is printed last.
``OUT`` receives at most 8 plain files (the lease's limit): env.json, correctness.md, bench_cuda.csv,
bench_cuda.png, results.md, training.csv, summary.md, log.txt.

``--dry-run`` runs every stage on the CPU (tiny shapes through the Triton interpreter, a few training
iterations) and writes the same files: CI runs it, so the plumbing is never what fails on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480.0  # the whole command, cold: 8 minutes
ATTENTIONS = ("softmax", "beta", "beta-seed")
TRAIN_ITERS = 50
DRY_TRAIN_ITERS = 4
# Seconds a stage keeps for itself after its subprocess's limit, to write what it has.
MARGIN_S = 15.0
TRAIN_PRESET = "shakespeare-char"
DATA_NAME = "tinyshakespeare.txt"
# Where a device call finds Tiny Shakespeare: $NORMATTN_DATA_DIR, or this ignored folder it carries.
CARRIED_DATA = ROOT / "runs" / "data"
# A dry run's model: small enough for a few iterations on two cores in seconds.
DRY_TRAIN = {
    "n_layer": "1",
    "n_head": "2",
    "n_embd": "32",
    "block_size": "32",
    "batch_size": "4",
    "device": "cpu",
}
OUT_FILES = ("env.json", "correctness.md", "bench_cuda.csv", "bench_cuda.png", "results.md", "training.csv")
OUT_FILES += ("summary.md", "log.txt")


@dataclass(frozen=True)
class Context:
    """What every stage process is told."""

    out: Path
    scratch: Path  # large or intermediate files that never go back (pytest logs, training runs)
    dry_run: bool
    commit: str

    def argv(self) -> list[str]:
        flags = ["--out", str(self.out), "--scratch", str(self.scratch), "--commit", self.commit]
        return flags + (["--dry-run"] if self.dry_run else [])


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: float
    run: Callable[[Context, float], bool]  # in the stage's own process, told its limit; True: all good
    about: str


# --------------------------------------------------------------------------------------------
# Stage 0: warm Triton's cache
# --------------------------------------------------------------------------------------------


def _bench_config(dry_run: bool, **changes):
    """The speed stage's ``CudaConfig`` (``CudaConfig.tiny`` in a dry run)."""
    from dataclasses import replace

    from normattn.bench.cuda import CudaConfig

    return replace(CudaConfig.tiny() if dry_run else CudaConfig(), **changes)


# The speed stage's (backend, normalizer, pass, with the window stage's window): the calls that launch
# every kernel it times.
WARM_ATTENTION = (
    ("triton", "softmax", "fwd+bwd", False),
    ("triton", "softmax", "jvp", False),
    ("triton", "beta", "fwd+bwd", False),
    ("triton-linear", "beta", "fwd+bwd", False),
    ("triton", "softmax", "fwd+bwd", True),
    ("triton", "beta", "fwd+bwd", True),
)


def warm_jobs(dry_run: bool) -> list[tuple[str, tuple]]:
    """``(kind, arguments)`` of every warm-up, the longest compiles first."""
    jobs: list[tuple[str, tuple]] = [("train", (name,)) for name in ATTENTIONS]
    jobs += [("attention", case) for case in WARM_ATTENTION]
    return jobs + [("decode", ()), ("rows", ())]


def run_warm_job(job: tuple[str, tuple], dry_run: bool, scratch: str) -> str:
    """One warm-up in a worker process: the call compiles its kernels; the result is thrown away."""
    import torch

    from normattn.bench.measure import attend_fn, pass_call

    kind, args = job
    start = time.perf_counter()
    if kind == "train":
        run_dir = Path(scratch) / f"warm-{args[0]}"
        _train(args[0], run_dir, dry_run, iters=1, timeout_s=None)
    else:
        config = _bench_config(dry_run)
        T, d = config.T_values[0], config.head_dims[0]
        B, H = config.batch, config.heads
        if kind == "attention":
            backend, normalizer, pass_name, windowed = args
            qkv = [config.randn(B, H, T, d) for _ in "qkv"]
            window = config.window_cases[-1][1] if windowed else None
            pass_call(attend_fn(backend, normalizer, causal=True, window=window), pass_name, qkv)()
        elif kind == "decode":
            import normattn

            with torch.no_grad():
                _, state = normattn.beta_prefill(*(config.randn(B, H, T, d) for _ in "qkv"))
                normattn.beta_decode(*(config.randn(B, H, 1, d) for _ in "qkv"), state)
        else:
            from normattn.ops.common import triton_usable
            from normattn.ops.softmax_rows.triton import softmax_rows_triton

            for n_rows, length in config.row_shapes:
                x = config.randn(n_rows, length)
                if triton_usable(x):
                    import normattn

                    pass_call(
                        lambda t: normattn.max_reduce(t, dim=-1, backend="triton").values, "fwd+bwd", [x]
                    )()
                    pass_call(lambda t: softmax_rows_triton(t, -1), "fwd+bwd", [x])()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return f"warm {kind} {' '.join(map(str, args))}: {time.perf_counter() - start:.1f} s"


def stage_warm(ctx: Context, limit_s: float) -> bool:
    import concurrent.futures
    import multiprocessing

    jobs = warm_jobs(ctx.dry_run)
    workers = 2 if ctx.dry_run else max(1, min(len(jobs), (os.cpu_count() or 2) // 2))
    pool_context = multiprocessing.get_context("spawn")  # CUDA needs fresh processes
    with concurrent.futures.ProcessPoolExecutor(workers, pool_context) as pool:
        futures = [pool.submit(run_warm_job, job, ctx.dry_run, str(ctx.scratch)) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            try:
                print(future.result(), flush=True)
            except Exception as error:  # a failed warm-up only costs the later stage its compile time
                print(f"warm-up failed: {type(error).__name__}: {error}", flush=True)
    return True


# --------------------------------------------------------------------------------------------
# Stage 1: environment and ceilings
# --------------------------------------------------------------------------------------------


def _nvidia_smi(field: str) -> str:
    try:
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (
        result.stdout.strip().splitlines()[0]
        if result.returncode == 0 and result.stdout.strip()
        else "unknown"
    )


def stage_env(ctx: Context, limit_s: float) -> bool:
    import torch

    from normattn.bench.measure import measure
    from normattn.bench.report import environment

    device = torch.device("cpu" if ctx.dry_run else "cuda")
    env = environment(device)
    if ctx.commit:
        env["git commit"] = ctx.commit
    env["dry run"] = str(ctx.dry_run)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "driver": _nvidia_smi("driver_version"),
            "compute capability": f"{props.major}.{props.minor}",
            "multiprocessors": str(props.multi_processor_count),
            "memory GiB": f"{props.total_memory / 2**30:.1f}",
        }
    n = 256 if ctx.dry_run else 8192
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in "ab")
    matmul_ms = measure(lambda: torch.mm(a, b), device, 0.5)["median_ms"]
    env["bf16 matmul TFLOP/s (ceiling)"] = f"{2 * n**3 / (1e-3 * matmul_ms) / 1e12:.1f} at {n}^3 {dtype}"
    copy_bytes = (8 if ctx.dry_run else 2048) * 2**20
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    copy_ms = measure(lambda: target.copy_(source), device, 0.5)["median_ms"]
    env["copy GB/s (ceiling, read + write)"] = (
        f"{2 * copy_bytes / (1e-3 * copy_ms) / 1e9:.0f} at {copy_bytes >> 20} MiB"
    )
    (ctx.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    return True


# --------------------------------------------------------------------------------------------
# Stage 2: correctness
# --------------------------------------------------------------------------------------------

RESULT_LINE = re.compile(
    r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*?(tests/\S+::\S+)|(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
)
FAILURE_LINE = re.compile(r"^(FAILED|ERROR) (tests/\S+::\S+)(?: - (.*))?$")


def parse_pytest_log(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """``(outcome per test id, failure message per test id)`` from ``pytest -v -rfE`` output, with or
    without xdist; a killed run gives what it printed so far."""
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    for line in text.splitlines():
        failure = FAILURE_LINE.match(line.strip())
        if failure:
            outcomes[failure.group(2)] = failure.group(1)
            messages[failure.group(2)] = (failure.group(3) or "").strip()
            continue
        match = RESULT_LINE.search(line)
        if match:
            outcome, test = (
                (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
            )
            outcomes.setdefault(test, outcome)
    return outcomes, messages


def correctness_markdown(outcomes: dict[str, str], messages: dict[str, str], header: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    failed = {test: outcome for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")}
    lines = ["# Correctness: tests/gpu (not slow)", ""]
    lines += [f"- **{key}**: {value}" for key, value in header.items()]
    lines += [
        "- **outcomes**: " + (", ".join(f"{n} {o.lower()}" for o, n in sorted(counts.items())) or "none")
    ]
    if failed:
        lines += ["", "## Failures", "", "| test | outcome | message |", "|---|---|---|"]
        lines += [
            f"| `{t}` | {o} | {messages.get(t, '').replace('|', '/')} |" for t, o in sorted(failed.items())
        ]
    lines += ["", "## Every test", "", "| test | outcome |", "|---|---|"]
    lines += [f"| `{t}` | {o} |" for t, o in sorted(outcomes.items())]
    return "\n".join(lines) + "\n"


def kernel_usage_section(paths: list[Path]) -> str:
    """The kernels the tests compiled on this machine, as the test workers recorded them."""
    rows = []
    for path in paths:
        with path.open() as f:
            rows += list(csv.DictReader(f))
    if not rows:
        return ""
    columns = list(rows[0])
    unique = {tuple(row[c] for c in columns): row for row in rows}
    lines = [
        "",
        "## Kernels compiled by the tests (this machine's Triton: registers, spills, shared bytes)",
        "",
    ]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(key) + " |" for key in sorted(unique)]
    return "\n".join(lines) + "\n"


def stage_correctness(ctx: Context, limit_s: float) -> bool:
    """Run the subset; write correctness.md; True if every test passed."""
    log = ctx.scratch / "pytest.log"
    usage_dir = ctx.scratch / "kernel-usage"
    usage_dir.mkdir(exist_ok=True)
    workers = "2" if ctx.dry_run else str(max(2, min(16, (os.cpu_count() or 4) - 2)))
    command = [
        sys.executable, "-m", "pytest", "tests/gpu", "-m", "not slow", "-n", workers, "-v", "-rfE",
        "-p", "no:cacheprovider", "--timeout", str(int(limit_s)),
    ]  # fmt: skip
    env = {**os.environ, "NORMATTN_KERNEL_USAGE_DIR": str(usage_dir)}
    start = time.monotonic()
    with log.open("w") as f:
        status = _run_bounded(command, f, env, max(1.0, limit_s - MARGIN_S))
    text = log.read_text()
    sys.stdout.write(text[-20000:])
    outcomes, messages = parse_pytest_log(text)
    header = {
        "command": " ".join(command[2:]),
        "status": status,
        "seconds": f"{time.monotonic() - start:.0f}",
        "device": "cpu (dry run: Triton interpreter, tiny sizes)" if ctx.dry_run else "cuda",
    }
    markdown = correctness_markdown(outcomes, messages, header) + kernel_usage_section(
        sorted(usage_dir.glob("*.csv"))
    )
    (ctx.out / "correctness.md").write_text(markdown)
    return (
        status == "ok"
        and bool(outcomes)
        and all(o in ("PASSED", "SKIPPED", "XFAIL") for o in outcomes.values())
    )


# --------------------------------------------------------------------------------------------
# Stage 3: speed
# --------------------------------------------------------------------------------------------

# (bench stage, its CudaConfig changes, its share of the speed stage's time)
SPEED_STAGES = (
    ("flash", {"normalizers": ("softmax",), "passes": ("fwd", "fwd+bwd", "jvp"), "head_dims": (128,)}, 0.4),
    ("linear", {"normalizers": ("beta",), "passes": ("fwd", "fwd+bwd"), "head_dims": (128,)}, 0.3),
    ("window", {"normalizers": ("softmax", "beta"), "passes": ("fwd", "fwd+bwd"), "head_dims": (128,)}, 0.1),
    ("decode", {"head_dims": (128,)}, 0.05),
    ("rows", {}, 0.15),
)


def stage_speed(ctx: Context, limit_s: float) -> bool:
    import pandas as pd
    import torch

    from normattn.bench import cuda
    from normattn.bench.report import environment, write_report

    functions = {
        "flash": cuda.run_flash,
        "linear": cuda.run_linear,
        "window": cuda.run_window,
        "decode": cuda.run_decode,
        "rows": cuda.run_rows,
    }
    header = environment(torch.device("cpu" if ctx.dry_run else "cuda"))
    if ctx.commit:
        header["git commit"] = ctx.commit
    frames = []
    for name, changes, share in SPEED_STAGES:
        if ctx.dry_run:  # the tiny config's own head dim
            changes = {key: value for key, value in changes.items() if key != "head_dims"}
        config = _bench_config(ctx.dry_run, **changes, stage_budget_s=share * limit_s)
        frames.append(functions[name](config))
        df = pd.concat(frames, ignore_index=True)
        settings = {"dtype": config.dtype, "B, H": f"{config.batch}, {config.heads}", "T": config.T_values}
        write_report(
            df, ctx.out, "cuda", header | {key: str(value) for key, value in settings.items()},
            "make gpu-check (tools/gpu_check.py, stage speed)", cuda.METHOD, cuda.crossover_sections(df),
        )  # fmt: skip
    return bool(frames) and (pd.concat(frames)["status"] != "failed").all()


# --------------------------------------------------------------------------------------------
# Stage 4: training throughput
# --------------------------------------------------------------------------------------------


def find_data(dry_run: bool, scratch: Path) -> Path | None:
    """Tiny Shakespeare ($NORMATTN_DATA_DIR, or runs/data carried to the device); a dry run without it
    trains on a stand-in text."""
    for folder in (os.environ.get("NORMATTN_DATA_DIR"), CARRIED_DATA):
        if folder and (Path(folder) / DATA_NAME).is_file():
            return Path(folder) / DATA_NAME
    if not dry_run:
        return None
    stand_in = scratch / "stand-in.txt"
    if not stand_in.exists():
        scratch.mkdir(parents=True, exist_ok=True)  # a fresh clone has no runs/ yet
        words = [
            "to",
            "be",
            "or",
            "not",
            "to",
            "be",
            "that",
            "is",
            "the",
            "question",
            "whether",
            "tis",
            "nobler",
            "in",
            "the",
            "mind",
        ]
        stand_in.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 40)
    return stand_in


def train_command(attention: str, run_dir: Path, data: Path | None, dry_run: bool, iters: int) -> list[str]:
    """``normattn train`` for a throughput run: the preset, ``iters`` iterations, evaluations at the ends."""
    command = [sys.executable, "-m", "normattn", "train", "--preset", TRAIN_PRESET, "--attention", attention]
    command += ["--out", str(run_dir), "--overwrite", "--no-progress", "--max-iters", str(iters)]
    command += ["--eval-interval", str(iters), "--eval-iters", "1" if dry_run else "10"]
    if data is not None:
        command += ["--data", str(data)]
    if dry_run:
        command += [
            arg for name, value in DRY_TRAIN.items() for arg in (f"--{name.replace('_', '-')}", value)
        ]
    return command


def _train(attention: str, run_dir: Path, dry_run: bool, iters: int, timeout_s: float | None) -> dict:
    """One ``normattn train`` subprocess; its summary.json, with ``status``."""
    data = find_data(dry_run, run_dir.parent)
    if data is None:
        return {"status": f"no {DATA_NAME}: set NORMATTN_DATA_DIR or carry {CARRIED_DATA.relative_to(ROOT)}"}
    command = train_command(attention, run_dir, data, dry_run, iters)
    with (run_dir.parent / f"train-{attention}.log").open("w") as log:
        status = _run_bounded(command, log, os.environ.copy(), timeout_s)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {**summary, "status": status}


TRAINING_COLUMNS = ["attention", "status", "iters", "tokens_per_s", "final_train_loss", "final_val_loss"]
TRAINING_COLUMNS += ["elapsed_s", "peak_memory_mib"]


def stage_training(ctx: Context, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s - MARGIN_S
    iters = DRY_TRAIN_ITERS if ctx.dry_run else TRAIN_ITERS
    rows = []
    for attention in ATTENTIONS:
        left = deadline - time.monotonic()
        if left <= 0:
            rows.append({"attention": attention, "status": "skipped (time limit)"})
        else:
            summary = _train(attention, ctx.scratch / f"train-{attention}", ctx.dry_run, iters, left)
            peak = summary.get("peak_memory_bytes")
            rows.append({
                "attention": attention, **{c: summary.get(c) for c in TRAINING_COLUMNS[1:-1]},
                "peak_memory_mib": None if peak is None else round(peak / 2**20),
            })  # fmt: skip
            print(rows[-1], flush=True)
        with (ctx.out / "training.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, TRAINING_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return all(row["status"] == "ok" for row in rows)


# --------------------------------------------------------------------------------------------
# Targets and summary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    what: str
    required: float
    unit: str  # "x" (a ratio) or "TFLOP/s"


TARGETS = (
    Target("softmax forward vs SDPA flash (T=8k)", 1.0, "x"),
    Target("softmax forward TFLOP/s (T=8k)", 450.0, "TFLOP/s"),
    Target("softmax backward vs SDPA flash (T=8k)", 0.8, "x"),
    Target("softmax JVP vs torch.func.jvp over math SDPA (T=8k)", 3.5, "x"),
    Target("beta linear fwd+bwd vs SDPA flash softmax (T=16k)", 5.0, "x"),
    Target("beta decode step vs KV-cache softmax step (32k context)", 10.0, "x"),
    # the window's cost at most 1.5x that of 16 causal T=1k calls, as a speed: 16 calls' time / the window's
    Target("softmax fwd+bwd, window (512, 0) at 16k vs 16 causal 1k calls", 0.67, "x"),
)


def measured_targets(df, flash_T: int, linear_T: int, window_T: int) -> list[float]:
    """The value of each of ``TARGETS`` in a bench table (NaN where not measured). The backward is
    ``fwd+bwd`` minus ``fwd``, for ours and for SDPA's."""

    def value(stage: str, backend: str, pass_name: str, T: int | None, column: str, normalizer=None) -> float:
        rows = df[(df["stage"] == stage) & (df["backend"] == backend) & (df["pass"] == pass_name)]
        if normalizer is not None:
            rows = rows[rows["normalizer"] == normalizer]
        rows = rows[rows["status"] == "ok"]
        if T is not None:
            rows = rows[rows["T"] == T]
        return float(rows[column].iloc[0]) if len(rows) and column in rows else math.nan

    def ms(backend: str, pass_name: str) -> float:
        return value("flash", backend, pass_name, flash_T, "median_ms")

    backward_ours = ms("triton", "fwd+bwd") - ms("triton", "fwd")
    backward_sdpa = ms("sdpa-flash", "fwd+bwd") - ms("sdpa-flash", "fwd")
    return [
        value("flash", "triton", "fwd", flash_T, "speedup_vs_baseline"),
        value("flash", "triton", "fwd", flash_T, "tflops"),
        backward_sdpa / backward_ours if backward_ours > 0 else math.nan,
        value("flash", "triton", "jvp", flash_T, "speedup_vs_baseline"),
        value("linear", "triton-linear", "fwd+bwd", linear_T, "speedup_vs_baseline"),
        value("decode", "beta_decode", "decode", None, "speedup_vs_baseline"),
        1 / value("window", "triton", "fwd+bwd", window_T, "window_vs_causal_calls", "softmax"),
    ]


def verdict(measured: float, required: float) -> str:
    if math.isnan(measured):
        return "not measured"
    if measured >= required:
        return "met"
    return f"missed by {100 * (1 - measured / required):.0f}%"


def target_rows(out: Path, dry_run: bool) -> list[tuple[str, str, str, str]]:
    """``(target, measured, required, verdict)`` from bench_cuda.csv (a dry run checks its largest T)."""
    csv_path = out / "bench_cuda.csv"
    values = [math.nan] * len(TARGETS)
    if csv_path.exists():
        import pandas as pd

        df = pd.read_csv(csv_path)
        largest = (
            int(df["T"][df["stage"] == "flash"].max()) if dry_run and (df["stage"] == "flash").any() else 8192
        )
        window_T = int(df["T"][df["stage"] == "window"].max()) if (df["stage"] == "window").any() else 16384
        values = measured_targets(df, largest, largest if dry_run else 16384, window_T)
    return [
        (
            t.what,
            "-" if math.isnan(v) else f"{v:.2f} {t.unit}",
            f">= {t.required:g} {t.unit}",
            verdict(v, t.required),
        )
        for t, v in zip(TARGETS, values, strict=True)
    ]


def write_summary(out: Path, dry_run: bool, stages: list[tuple[str, str, float]]) -> str:
    """summary.md: machine, versions, stage statuses, targets, training; returns the short table."""
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    keys = ("gpu", "device", "driver", "torch", "triton", "python", "git commit", "date", "dry run",
            "bf16 matmul TFLOP/s (ceiling)", "copy GB/s (ceiling, read + write)")  # fmt: skip
    lines = ["# GPU check: summary", ""] + [f"- **{k}**: {env[k]}" for k in keys if k in env]
    if dry_run:
        lines += ["", "Dry run: CPU, Triton interpreter, tiny shapes; targets are read at the largest T run."]
    stage_table = ["| stage | status | seconds |", "|---|---|---:|"]
    stage_table += [f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in stages]
    target_table = ["| target | measured | required | verdict |", "|---|---:|---:|---|"]
    target_table += [f"| {' | '.join(row)} |" for row in target_rows(out, dry_run)]
    lines += [
        "",
        "## Stages",
        "",
        *stage_table,
        "",
        "## Targets (bf16, d=128, causal, same run)",
        "",
        *target_table,
    ]
    training = out / "training.csv"
    if training.exists():
        with training.open() as f:
            rows = list(csv.DictReader(f))
        iters = DRY_TRAIN_ITERS if dry_run else TRAIN_ITERS
        lines += ["", f"## Training throughput ({TRAIN_PRESET}, {iters} iterations)", ""]
        lines += ["| " + " | ".join(TRAINING_COLUMNS) + " |", "|" + "---|" * len(TRAINING_COLUMNS)]
        lines += ["| " + " | ".join(row.get(c) or "" for c in TRAINING_COLUMNS) + " |" for row in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return "\n".join(stage_table + [""] + target_table)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def _run_bounded(command: list[str], log, env: dict[str, str], timeout_s: float | None) -> str:
    """Run ``command`` (output to ``log``) in its own process group; ``ok``, ``failed (rc N)`` or
    ``timed out after N s`` (the whole group is killed)."""
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        rc = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return f"timed out after {timeout_s:.0f} s"
    return "ok" if rc == 0 else f"failed (rc {rc})"


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


STAGES = (
    Stage("warm", 200, stage_warm, "compile the speed and training kernels into Triton's cache"),
    Stage("env", 40, stage_env, "GPU, driver, versions, commit, matmul and copy ceilings"),
    Stage("correctness", 170, stage_correctness, "pytest tests/gpu -m 'not slow'"),
    Stage("speed", 150, stage_speed, "bench: flash, linear, window, decode, rows"),
    Stage("training", 90, stage_training, f"{TRAIN_ITERS} iterations of {TRAIN_PRESET} per attention"),
)


def stage_environment(ctx: Context) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if ctx.dry_run:
        env |= {"TRITON_INTERPRET": "1", "NORMATTN_GPU_DRY_RUN": "1"}
    return env


def orchestrate(ctx: Context, total_s: float) -> int:
    """Every stage within ``total_s``; returns 0 when every stage finished and every test passed."""
    deadline = time.monotonic() + total_s
    log_path = ctx.out / "log.txt"
    env = stage_environment(ctx)
    stages = {stage.name: stage for stage in STAGES}
    results: list[tuple[str, str, float]] = []

    def command(stage: Stage, limit: float) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tools.gpu_check",
            "--stage",
            stage.name,
            "--limit-s",
            f"{limit:.0f}",
            *ctx.argv(),
        ]

    warm = stages["warm"]
    warm_log = (ctx.scratch / "warm.log").open("w")
    warm_started = time.monotonic()
    warm_process = subprocess.Popen(
        command(warm, warm.limit_s),
        stdout=warm_log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    print(
        f"gpu-check: {'dry run, ' if ctx.dry_run else ''}writing {ctx.out}; warm-up in the background",
        flush=True,
    )

    def finish_warm() -> None:
        left = max(1.0, warm.limit_s - (time.monotonic() - warm_started))
        try:
            rc = warm_process.wait(timeout=min(left, max(1.0, deadline - time.monotonic())))
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            _kill_group(warm_process)
            status = "stopped at its limit"
        warm_log.close()
        _append(log_path, "warm", (ctx.scratch / "warm.log").read_text())
        results.append(("warm", status, time.monotonic() - warm_started))

    for name in ("env", "correctness", "warm", "speed", "training"):
        if name == "warm":
            finish_warm()
            continue
        stage = stages[name]
        limit = min(stage.limit_s, deadline - time.monotonic())
        start = time.monotonic()
        if limit < 5:
            status = "skipped (total time limit)"
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {stage.about} (limit {limit:.0f} s)", flush=True)
            with (ctx.scratch / f"{name}.log").open("w") as f:
                status = _run_bounded(command(stage, limit), f, env, limit)
            _append(log_path, name, (ctx.scratch / f"{name}.log").read_text())
        results.append((name, status, time.monotonic() - start))
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: {status} ({time.monotonic() - start:.0f} s)", flush=True
        )
        write_summary(ctx.out, ctx.dry_run, results)
    table = write_summary(ctx.out, ctx.dry_run, results)
    print("\n" + table, flush=True)
    return 0 if all(status == "ok" for _, status, _ in results) else 1


def _append(path: Path, stage: str, text: str) -> None:
    with path.open("a") as f:
        f.write(f"\n===== {stage} =====\n{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the (at most 8) result files")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: the interpreter, tiny shapes")
    parser.add_argument("--commit", default="", help="the commit under test (a device copy has no .git)")
    parser.add_argument("--total-s", type=float, default=TOTAL_BUDGET_S, help="the whole run's limit")
    parser.add_argument("--stage", choices=[s.name for s in STAGES], help=argparse.SUPPRESS)
    parser.add_argument("--limit-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage:  # one stage, in the process the orchestrator started for it
        ctx = Context(args.out, args.scratch, args.dry_run, args.commit)
        stage = next(s for s in STAGES if s.name == args.stage)
        return 0 if stage.run(ctx, args.limit_s) else 1
    for name in OUT_FILES:
        (args.out / name).unlink(missing_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        return orchestrate(Context(args.out.resolve(), scratch, args.dry_run, args.commit), args.total_s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
