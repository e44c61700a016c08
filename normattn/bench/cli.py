"""``normattn bench``: time and measure every attention backend on the CPU or a CUDA device."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

CUDA_DTYPES = ("bfloat16", "float16", "float32")
CPU_DTYPES = ("float32", "float64")
CPU_ONLY_OPTIONS = (
    "T",
    "normalizers",
    "passes",
    "repeats",
    "backends",
    "case_budget_s",
    "memory_budget_gib",
    "threads",
)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(valid: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in valid]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(valid)}, got {text!r}"
            )
        return list(dict.fromkeys(names))

    return parse


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def build_parser(prog: str = "normattn bench") -> argparse.ArgumentParser:
    from .cpu import BACKEND_NORMALIZERS, DEFAULT_BACKENDS, DEFAULT_T, NORMALIZERS, PASSES, QUICK_T

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time forward, forward+backward and JVP of the attention backends and measure "
        "their peak memory; writes a CSV, PNG plots and results.md to --out.",
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: bench_results/<cpu|cuda>)")
    parser.add_argument(
        "--quick", action="store_true", help=f"small sizes (CPU: T={','.join(map(str, QUICK_T))})"
    )
    parser.add_argument("--dtype", help=f"CPU: {'/'.join(CPU_DTYPES)}; CUDA: {'/'.join(CUDA_DTYPES)}")
    cpu = parser.add_argument_group("CPU only")
    cpu.add_argument(
        "--T", type=_positive_ints, help=f"sequence lengths (default: {','.join(map(str, DEFAULT_T))})"
    )
    cpu.add_argument("--normalizers", type=_names(NORMALIZERS), help="default: softmax,beta")
    cpu.add_argument("--passes", type=_names(PASSES), help=f"default: {','.join(PASSES)}")
    cpu.add_argument(
        "--backends",
        type=_names(tuple(BACKEND_NORMALIZERS)),
        help=f"default: {','.join(DEFAULT_BACKENDS)} (sdpa is torch's, softmax only); triton ones "
        "need TRITON_INTERPRET=1 on the CPU and then time the interpreter",
    )
    cpu.add_argument("--repeats", type=int, help="timed repeats per case (default: 10, --quick: 3)")
    cpu.add_argument(
        "--case-budget-s",
        type=float,
        help="fewer repeats (at least 1) where they would take longer than this (default: 10, --quick: 2)",
    )
    cpu.add_argument(
        "--threads", type=int, help="torch.set_num_threads in each case (default: torch's default)"
    )
    cpu.add_argument(
        "--memory-budget-gib",
        type=float,
        help="skip cases predicted to need more (default: 60%% of the memory available at start)",
    )
    return parser


def _error(message: str) -> int:
    print(f"normattn bench: error: {message}", file=sys.stderr)
    return 2


def _run_cpu(args: argparse.Namespace) -> int:
    from . import cpu, report

    dtype = args.dtype or "float32"
    if dtype not in CPU_DTYPES:
        return _error(f"--dtype on the CPU must be one of {', '.join(CPU_DTYPES)}, got {dtype!r}")
    if args.repeats is not None and args.repeats < 1:
        return _error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        return _error("--threads must be at least 1")
    backends = args.backends or list(cpu.DEFAULT_BACKENDS)
    if any(name.startswith("triton") for name in backends) and os.environ.get("TRITON_INTERPRET") != "1":
        return _error("triton backends on the CPU need TRITON_INTERPRET=1 (and then time the interpreter)")
    repeats = args.repeats or (3 if args.quick else 10)
    case_budget_s = args.case_budget_s if args.case_budget_s is not None else (2.0 if args.quick else 10.0)
    if args.memory_budget_gib is not None:
        memory_budget = int(args.memory_budget_gib * 2**30)
    else:
        memory_budget = cpu.memory_budget_bytes()
    cases = cpu.cases_for(
        args.T or (cpu.QUICK_T if args.quick else cpu.DEFAULT_T),
        args.normalizers or list(cpu.NORMALIZERS),
        backends,
        args.passes or list(cpu.PASSES),
        dtype=dtype,
        repeats=repeats,
        case_budget_s=case_budget_s,
        threads=args.threads,
    )
    if not cases:
        return _error("no case to run: the backends chosen compute none of the normalizers chosen")
    out_dir = args.out or Path("bench_results/cpu")
    extra = {"memory budget": f"{memory_budget / 2**30:.1f} GiB"}
    if args.threads is not None:
        extra["torch threads"] = str(args.threads)
    header = report.environment_header("cpu", extra)  # before the run: its date is the start
    start_load = os.getloadavg()[0]
    start = time.monotonic()
    rows = cpu.run_cpu_bench(cases, memory_budget)
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    header["duration"] = f"{minutes} min {seconds} s"
    # Other processes on the cores slow every number down; a reader should know how busy it was.
    end_load = os.getloadavg()[0]
    header["load average (1 min)"] = f"{start_load:.2f} at start, {end_load:.2f} at end"
    method = cpu.method_text(repeats, case_budget_s, memory_budget, args.threads)
    if max(start_load, end_load) > (os.cpu_count() or 1):
        method += (
            f"\n- The machine was busy (load average {start_load:.1f} at start, {end_load:.1f} at end, "
            f"{os.cpu_count()} cores): absolute times are inflated, small ones most. The backends of one "
            "(normalizer, pass, T) run back to back, so their ratios are the more trustworthy numbers."
        )
    paths, text = cpu.write_cpu_report(rows, out_dir, header, method)
    print(report.header_title(header))
    print(text)
    print("\nwrote " + ", ".join(str(path) for path in paths))
    return 0


def _run_cuda(args: argparse.Namespace) -> int:
    from . import report

    if not torch.cuda.is_available():
        return _error(f"--device {args.device} needs a CUDA device, and torch.cuda.is_available() is False")
    given = [f"--{name.replace('_', '-')}" for name in CPU_ONLY_OPTIONS if getattr(args, name) is not None]
    if given:
        return _error(f"{', '.join(given)} apply to --device cpu only")
    dtype_name = args.dtype or "bfloat16"
    if dtype_name not in CUDA_DTYPES:
        return _error(f"--dtype on CUDA must be one of {', '.join(CUDA_DTYPES)}, got {dtype_name!r}")
    device = torch.device(args.device)
    dtype = getattr(torch, dtype_name)
    from .flash import bench_flash
    from .linear import bench_linear
    from .rows import bench_rows

    rows_by_bench = {
        "flash": bench_flash(device, dtype, args.quick),
        "linear": bench_linear(device, dtype, args.quick),
        "rows": bench_rows(device),
    }
    header = report.environment_header(args.device, {"dtype": dtype_name, "quick": args.quick})
    paths, summary = report.write_cuda_report(rows_by_bench, args.out or Path("bench_results/cuda"), header)
    print(report.header_title(header))
    print(summary)
    print("\nwrote " + ", ".join(str(path) for path in paths))
    return 0


def main(command: str = "bench", argv: Sequence[str] | None = None) -> int:
    """Entry point used by ``normattn.cli``; returns the exit code (2 for usage errors)."""
    parser = build_parser(f"normattn {command}")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.device == "cpu":
        return _run_cpu(args)
    return _run_cuda(args)


if __name__ == "__main__":
    sys.exit(main())
