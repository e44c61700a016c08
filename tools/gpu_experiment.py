"""``make gpu-experiment OUT=dir``: the beta-attention write-up's comparison on one GPU, fitted to a lease.

``normattn compare --preset shakespeare-char --attentions softmax,beta,beta-seed`` trains the three
one after the other; here they train at once on the one GPU, each a ``normattn train`` process
(the same preset, nanoGPT's ``shakespeare_char`` run for 10,000 iterations), into the folder
``normattn compare`` keeps that run in: ``--runs/<attention>/seed-<seed>`` (``--runs`` defaults to
``runs/gpu-experiment``, ignored by git). Every evaluation (250 iterations) checkpoints, and a call
that finds a run's checkpoint resumes it, so the next call on a warm machine continues where the
last stopped. At ``--budget-s`` the trainers are interrupted (SIGINT: the last checkpoint stays
intact). When all three have finished, ``normattn compare ... --resume`` (which then trains
nothing) writes ``compare.md``, ``compare.png`` and ``compare.json``.

Checkpoints (about 130 MB a run) stay on the machine; ``OUT`` gets metrics and summaries only:
``experiment.md`` (progress, final and best losses beside the published numbers), ``metrics.json``
(each run's configuration, evaluations and summary), the three ``compare.*`` once complete and
``log.txt``. ``--dry-run``: the same on the CPU with a tiny model, once for 2 iterations and then
resumed to 4, so CI covers the start, the resume and the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tools.gpu_check import DRY_TRAIN, ROOT, find_data

PRESET = "shakespeare-char"
ATTENTIONS = ("softmax", "beta", "beta-seed")
# The numbers to put ours beside: the write-up's at 10,000 iterations (val), nanoGPT's best softmax.
PUBLISHED_VAL = {"softmax": "1.6204 (write-up, 10,000 it.)", "beta": "1.5550 (write-up, 10,000 it.)"}
NANOGPT_BEST = "nanoGPT shakespeare_char, softmax: best val 1.4697 at about 5,000 iterations"
DEFAULT_RUNS = ROOT / "runs" / "gpu-experiment"
DEFAULT_BUDGET_S = 540.0
GRACE_S = 60.0  # after SIGINT, before SIGKILL
DRY_ITERS = (2, 4)  # a dry run's two calls: a fresh start, then a resume


def run_dir(runs: Path, attention: str) -> Path:
    """Where ``normattn compare --out runs`` keeps (and resumes) this attention's run of the preset's seed,
    so that the compare at the end finds every run finished and trains nothing."""
    from normattn.gpt.compare import run_folder
    from normattn.gpt.config import build_configs

    return run_folder(runs, attention, build_configs(PRESET, attention, {})[1].seed)


def _overrides(data: Path | None, iters: int | None, dry_run: bool) -> list[str]:
    """The options ``normattn train`` and ``normattn compare`` share: the same runs, so compare resumes."""
    options = ["--no-progress"]
    options += ["--max-iters", str(iters)] if iters is not None else []
    options += ["--data", str(data)] if data is not None else []
    if dry_run:
        options += ["--eval-interval", "1", "--eval-iters", "2"]
        options += [
            arg for name, value in DRY_TRAIN.items() for arg in (f"--{name.replace('_', '-')}", value)
        ]
    return options


def train_command(
    attention: str, runs: Path, data: Path | None, iters: int | None, dry_run: bool
) -> list[str]:
    """``normattn train`` for one attention, resuming its checkpoint when there is one."""
    folder = run_dir(runs, attention)
    command = [sys.executable, "-m", "normattn", "train", "--preset", PRESET, "--attention", attention]
    command += ["--out", str(folder)]
    if (folder / "ckpt.pt").is_file():
        command.append("--resume")
    return command + _overrides(data, iters, dry_run)


def compare_command(runs: Path, data: Path | None, iters: int | None, dry_run: bool) -> list[str]:
    """``normattn compare`` over the finished runs: it trains nothing and writes compare.*."""
    command = [sys.executable, "-m", "normattn", "compare", "--preset", PRESET]
    command += ["--attentions", ",".join(ATTENTIONS), "--out", str(runs), "--resume"]
    return command + _overrides(data, iters, dry_run)


def finished(run_dir: Path, iters: int) -> bool:
    """A run that completed ``iters`` iterations (``summary.json`` is written only at the end)."""
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("iters", -1) >= iters


def train_concurrently(
    commands: dict[str, list[str]], logs: Path, budget_s: float, env: dict[str, str] | None = None
) -> dict[str, str]:
    """Start every command at once; interrupt those still running at ``budget_s``; their statuses."""
    processes = {}
    for name, command in commands.items():
        with (logs / f"{name}.log").open("a") as log:
            processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )
    deadline = time.monotonic() + budget_s
    statuses = {}
    for name, process in processes.items():
        try:
            rc = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            statuses[name] = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            statuses[name] = "interrupted at the time budget"
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # the trainer stops and keeps its last checkpoint
    for process in processes.values():
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return statuses


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(runs: Path) -> dict[str, dict]:
    """Each run's configuration, evaluations and summary (None until it finishes)."""
    return {
        name: {
            "config": _read_json(run_dir(runs, name) / "config.json"),
            "metrics": _read_jsonl(run_dir(runs, name) / "metrics.jsonl"),
            "summary": _read_json(run_dir(runs, name) / "summary.json"),
        }
        for name in ATTENTIONS
    }


def _loss(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def progress_table(runs: dict[str, dict], statuses: dict[str, str], target_iters: int) -> str:
    """Markdown: per attention, iterations done, final and best losses, the published numbers."""
    lines = [
        "| attention | iterations | status | final train | final val | best train | best val (iter) "
        "| tokens/s | published val |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, run in runs.items():
        metrics = run["metrics"]
        last = metrics[-1] if metrics else {}
        best = min(metrics, key=lambda row: row["val_loss"], default={})
        speeds = [row["tokens_per_s"] for row in metrics if row.get("tokens_per_s")]
        lines.append(
            f"| {name} | {last.get('iter', 0)} / {target_iters} | {statuses.get(name, '-')} "
            f"| {_loss(last.get('train_loss'))} | {_loss(last.get('val_loss'))} "
            f"| {_loss(min((row['train_loss'] for row in metrics), default=None))} "
            f"| {_loss(best.get('val_loss'))} ({best.get('iter', '-')}) "
            f"| {f'{speeds[-1]:,.0f}' if speeds else '-'} | {PUBLISHED_VAL.get(name, '-')} |"
        )
    return "\n".join(lines)


def write_outputs(out: Path, runs_dir: Path, statuses: dict[str, str], target_iters: int, note: str) -> str:
    """experiment.md and metrics.json in ``out`` (compare.* are copied by the caller); the table."""
    runs = collect(runs_dir)
    table = progress_table(runs, statuses, target_iters)
    text = "\n".join([
        f"# GPU experiment: `normattn compare --preset {PRESET} --attentions {','.join(ATTENTIONS)}`",
        "",
        note,
        "",
        table,
        "",
        f"Published: the write-up's validation losses at 10,000 iterations; {NANOGPT_BEST}. The three runs "
        "train at once on one GPU, so tokens/s (the last evaluation interval's) is a share of the GPU, "
        "not a single run's speed. Best val: the lowest of the evaluations every 250 iterations.",
    ])  # fmt: skip
    (out / "experiment.md").write_text(text + "\n")
    (out / "metrics.json").write_text(json.dumps(runs, indent=1) + "\n")
    return table


def run_call(
    out: Path, runs: Path, budget_s: float, iters: int | None, target: int, dry_run: bool, log: Path
) -> tuple[dict[str, str], bool]:
    """One call: train (or resume) the unfinished runs within the budget, up to ``iters`` (None: the
    preset's); compare once all have reached ``target``."""
    data = find_data(dry_run, runs)
    runs.mkdir(parents=True, exist_ok=True)
    pending = {name: train_command(name, runs, data, iters, dry_run) for name in ATTENTIONS}
    pending = {
        name: command
        for name, command in pending.items()
        if not finished(run_dir(runs, name), iters or target)
    }
    statuses = {name: "finished earlier" for name in ATTENTIONS if name not in pending}
    # a dry run's three trainers share two cores: one thread each
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if dry_run else None
    if pending:
        statuses |= train_concurrently(pending, runs, budget_s, env)
    complete = all(finished(run_dir(runs, name), target) for name in ATTENTIONS)
    if complete:
        with log.open("a") as f:
            command = compare_command(runs, data, iters, dry_run)
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        complete = rc == 0
        for name in ("compare.md", "compare.png", "compare.json"):
            if (runs / name).is_file():
                shutil.copyfile(runs / name, out / name)
    for name in ATTENTIONS:
        train_log = runs / f"{name}.log"
        if train_log.is_file():
            with log.open("a") as f:
                f.write(f"\n===== {name} =====\n{train_log.read_text()[-20000:]}")
            train_log.unlink()
    return statuses, complete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_experiment", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for what comes back (metrics, summaries)"
    )
    parser.add_argument("--runs", type=Path, default=None, help=f"checkpoints (default: {DEFAULT_RUNS})")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="training time in this call")
    parser.add_argument(
        "--dry-run", action="store_true", help="on the CPU: a tiny model, 2 iterations, resumed to 4"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    log.write_text("")
    if args.dry_run:
        runs = args.runs or DEFAULT_RUNS.with_name("gpu-experiment-dry")
        shutil.rmtree(runs, ignore_errors=True)  # each dry run starts fresh, then resumes itself
        target = DRY_ITERS[-1]
        for iters in DRY_ITERS:
            statuses, complete = run_call(args.out, runs, args.budget_s, iters, target, True, log)
    else:
        runs = args.runs or DEFAULT_RUNS
        target = 10_000
        statuses, complete = run_call(args.out, runs, args.budget_s, None, target, False, log)
    note = (
        "All three runs finished; `compare.md` is `normattn compare`'s report."
        if complete
        else f"Unfinished: call `make gpu-experiment` again on the same machine to resume from `{runs}`."
    )
    if args.dry_run:
        note = f"Dry run (CPU, tiny model, {DRY_ITERS[0]} iterations, then resumed to {target}). " + note
    table = write_outputs(args.out, runs, statuses, target, note)
    print(table, flush=True)
    return 0 if all(not status.startswith("failed") for status in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
