"""``normattn bench``: time every attention backend on the CPU or a CUDA device; CSV, PNG, markdown."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import normattn

from .measure import PASSES

CPU_DTYPES, CUDA_DTYPES = ("float32", "float64"), ("bfloat16", "float16")
CAUSAL = {"yes": (True,), "no": (False,), "both": (True, False)}
CPU_ONLY = ("cases", "backends", "threads", "memory_budget_gib")
CUDA_ONLY = ("dry_run",)
CUDA_QUICK_T = (1024, 4096)


def build_parser(prog: str = "normattn bench") -> argparse.ArgumentParser:
    from .cpu import ALL_BACKENDS, CASE_SETS, DEFAULT_BACKENDS, DEFAULT_T, QUICK_T

    parser = argparse.ArgumentParser(prog=prog, description="Time attention backends against SDPA.")
    add = parser.add_argument
    add("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    add("--out", type=Path, help="output folder (default: bench_results/<cpu|cuda>)")
    add("--quick", action="store_true", help=f"small T: CPU {QUICK_T}, CUDA {CUDA_QUICK_T}")
    add("--T", type=int, nargs="+", help=f"sequence lengths (CPU default: {DEFAULT_T})")
    add("--causal", choices=CAUSAL, default="yes", help="causal mask, none, or both (default: yes)")
    add("--normalizers", nargs="+", choices=normattn.NORMALIZERS, help="default: all in the registry")
    add("--passes", nargs="+", choices=PASSES, help="default: all")
    add("--dtype", choices=CPU_DTYPES + CUDA_DTYPES, help="default: float32 on the CPU, bfloat16 on CUDA")
    add("--case-budget-s", type=float, help="timing seconds per case (CPU: at most 5, --quick 1; CUDA 0.1)")
    cpu = parser.add_argument_group("CPU only").add_argument
    cpu("--cases", choices=CASE_SETS, help="case set; window: causal T=1024 vs T=16384 with window=(512, 0)")
    cpu("--backends", nargs="+", choices=ALL_BACKENDS, help=f"default: {' '.join(DEFAULT_BACKENDS)}")
    cpu("--threads", type=int, help="torch threads (default: torch's)")
    cpu("--memory-budget-gib", type=float, help="skip cases predicted to need more (60%% of what is free)")
    cuda = parser.add_argument_group("CUDA only").add_argument
    cuda("--dry-run", action="store_true", default=None, help="on the CPU, tiny, with TRITON_INTERPRET=1")
    return parser


def _usage_error(args: argparse.Namespace) -> str | None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        return f"--device must be cpu, cuda or cuda:N, got {args.device!r}"
    on_cpu, interpreted = args.device == "cpu", os.environ.get("TRITON_INTERPRET") == "1"
    for name in CUDA_ONLY if on_cpu else CPU_ONLY:
        if getattr(args, name) is not None:
            return f"--{name.replace('_', '-')} does not apply to --device {args.device}"
    for name in ("T", "case_budget_s", "threads", "memory_budget_gib"):
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {value}"
    if args.dtype in (CUDA_DTYPES if on_cpu else ("float64",)):
        return f"--dtype {args.dtype} is not for --device {args.device}"
    if on_cpu and any(backend.startswith("triton") for backend in args.backends or ()) and not interpreted:
        return "triton backends on the CPU need TRITON_INTERPRET=1 (and then time the interpreter)"
    if args.dry_run and not interpreted:
        return "--dry-run runs the Triton kernels on the CPU and needs TRITON_INTERPRET=1"
    if not on_cpu and not args.dry_run and not torch.cuda.is_available():
        return f"--device {args.device} needs CUDA, and torch.cuda.is_available() is False"
    if args.cases == "window" and args.T is not None:
        return "--cases window has its own T (1024 and 16384): leave out --T"
    return None


def _run_cpu(args: argparse.Namespace) -> tuple:
    from . import cpu

    T_values = args.T or (cpu.QUICK_T if args.quick else cpu.DEFAULT_T)
    cases = cpu.cpu_cases(
        T_values, args.backends, args.normalizers, args.passes, CAUSAL[args.causal], args.cases
    )
    budget_s = args.case_budget_s or (1.0 if args.quick else 5.0)
    dtype = getattr(torch, args.dtype or "float32")
    gib = args.memory_budget_gib or cpu.memory_budget_bytes() / 2**30
    df = cpu.run_cpu(cases, dtype, budget_s, args.threads, int(gib * 2**30))
    threads = args.threads or torch.get_num_threads()
    settings = {"dtype": dtype, "torch threads": threads, "case budget s": budget_s}
    settings["memory budget GiB"] = f"{gib:.1f}"
    return "cpu", df, settings, cpu.METHOD, []


def _run_cuda(args: argparse.Namespace) -> tuple:
    from . import cuda

    config = cuda.CudaConfig.tiny() if args.dry_run else cuda.CudaConfig(device=args.device)
    quick_T = CUDA_QUICK_T if args.quick and not args.dry_run else None
    given = {
        "dtype": args.dtype and getattr(torch, args.dtype),
        "T_values": args.T or quick_T,
        "causal": CAUSAL[args.causal],
        "passes": args.passes,
        "normalizers": args.normalizers,
        "case_budget_s": args.case_budget_s,
    }
    config = dataclasses.replace(config, **{key: value for key, value in given.items() if value is not None})
    df = cuda.run_cuda(config)
    return "cuda", df, dataclasses.asdict(config), cuda.METHOD, cuda.crossover_sections(df)


def main(command: str = "bench", argv: Sequence[str] | None = None) -> int:
    """Entry point used by ``normattn.cli``; returns the exit code (2 for usage errors)."""
    from .report import environment, write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(f"normattn {command}")
    try:
        args = parser.parse_args(argv)
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        error = _usage_error(args)
        if error:
            parser.error(error)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    header = environment(torch.device("cpu" if args.dry_run else args.device))  # at the start: its date
    start = time.monotonic()
    name, df, settings, method, sections = (_run_cpu if args.device == "cpu" else _run_cuda)(args)
    header |= {key: str(value) for key, value in settings.items()}
    header["duration"] = "{} min {} s".format(*divmod(round(time.monotonic() - start), 60))
    header["load average at end"] = f"{os.getloadavg()[0]:.2f}"
    out, command_line = args.out or Path("bench_results") / name, shlex.join(["normattn", command, *argv])
    paths, table = write_report(df, out, name, header, command_line, method, sections)
    print(f"{table}\n\nwrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
