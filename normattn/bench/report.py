"""Writing a run: its environment, ratios to baselines of the same run, CSV, PNG and results.md."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

from .measure import METHOD

# Columns that say which case a row is: a ratio's baseline agrees with the row on those present.
KEY_COLUMNS = ["stage", "op", "pass", "T", "causal", "window", "d", "B", "H", "n_rows", "dtype"]
# One plot panel per combination of those of these that vary; one line per backend and normalizer.
PANEL_COLUMNS = ["stage", "op", "d", "causal", "window", "pass"]
# The results table: these columns where some row has a value.
TABLE_COLUMNS = [
    "stage", "op", "backend", "normalizer", "pass", "T", "causal", "window", "d", "n_rows", "median_ms",
    "iqr_ms", "repeats", "tflops", "gbps", "tokens_per_s", "peak_mib", "state_mib", "speedup_vs_reference",
    "memory_saving_vs_reference", "speedup_vs_sdpa", "speedup_vs_baseline", "note",
]  # fmt: skip


def environment(device: torch.device) -> dict[str, str]:
    """What a reader needs to trust or reproduce a number: machine, versions, commit, date, load."""
    git = ["git", "describe", "--always", "--dirty"]  # "-dirty": uncommitted changes to tracked files
    try:
        commit = subprocess.run(
            git, cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    on_cuda = device.type == "cuda"
    return {
        "device": f"{device} ({torch.cuda.get_device_name(device) if on_cuda else (models or ['?'])[0]})",
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if on_cuda else ""),
        "triton": triton_version,
        "python": platform.python_version(),
        "git commit": commit.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "load average (1, 5, 15 min) at start": ", ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def add_ratio(
    df: pd.DataFrame, name: str, baseline: pd.Series, column: str = "median_ms", same_normalizer: bool = False
) -> None:
    """``df[name]`` = the baseline row's ``column`` / the row's, the baseline row being the measured row
    of the mask ``baseline`` that agrees with the row on ``KEY_COLUMNS`` (and the normalizer if
    ``same_normalizer``). Above 1, the row is faster (smaller) than its baseline."""
    keys = [key for key in KEY_COLUMNS if key in df] + (["normalizer"] if same_normalizer else [])
    base = df[baseline & (df["status"] == "ok")].drop_duplicates(keys)
    base = base[[*keys, column]].rename(columns={column: "_base"})
    measured = df[column].where(df[column] > 0)  # no ratio to a zero (a peak under one page)
    df[name] = df[keys].merge(base, on=keys, how="left")["_base"].to_numpy() / measured.to_numpy()


def add_window_cost(df: pd.DataFrame) -> None:
    """``window_vs_causal_calls``: a windowed case's time over ``T / T'`` calls of the same case
    without a window at ``T'`` (the sliding-window issue's "within 1.5x of 16 T = 1024 calls")."""
    if (df["window"] == "").all():
        return
    family = ["backend", "normalizer", "pass", "causal"]
    plain = df[df["window"] == ""][[*family, "T", "median_ms"]]
    both = df.merge(plain.rename(columns={"T": "_T", "median_ms": "_ms"}), on=family, how="left")
    cost = both["median_ms"] / (both["_ms"] * both["T"] / both["_T"])
    df["window_vs_causal_calls"] = cost.where(df["window"] != "").to_numpy()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(
        lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in df.itertuples(index=False)]
    )


def plot_times(df: pd.DataFrame, path: Path, title: str) -> Path:
    """Median time against T, log-log: a panel per varying ``PANEL_COLUMNS``, a colour per line."""
    measured = df[df["status"] == "ok"]
    panel_keys = [key for key in PANEL_COLUMNS if key in df and df[key].nunique() > 1] or ["pass"]
    panels = list(measured.groupby(panel_keys, sort=False))
    labels = list(dict.fromkeys(measured["backend"] + " " + measured["normalizer"]))
    ncols, nrows = max(1, min(4, len(panels))), max(1, math.ceil(len(panels) / 4))
    figure = Figure(figsize=(4.6 * ncols, 3.6 * nrows + 0.7), layout="constrained")
    figure.suptitle(title, fontsize=8)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (panel_key, panel) in zip(axes, panels):
        for (backend, normalizer), line in panel.groupby(["backend", "normalizer"], sort=False):
            label = f"{backend} {normalizer}"
            line = line.sort_values("T")
            ax.plot(line["T"], line["median_ms"], "o-", label=label, color=f"C{labels.index(label) % 10}")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="median ms")
        ax.set_xticks(sorted(set(panel["T"])), [str(T) for T in sorted(set(panel["T"]))])
        ax.set_xticks([], minor=True)
        ax.set_title(", ".join(f"{key}={value}" for key, value in zip(panel_keys, panel_key)), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.savefig(path, dpi=110)
    return path


def write_report(
    df: pd.DataFrame, out_dir: Path, name: str, header: dict[str, str], command: str, method: str,
    sections: Sequence[tuple[str, str]] = (),
) -> tuple[list[Path], str]:  # fmt: skip
    """``bench_<name>.csv``, ``bench_<name>.png`` and ``results.md``; returns the paths and the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"bench_{name}.csv", index=False)
    png = plot_times(df, out_dir / f"bench_{name}.png", f"normattn bench {name}: {header.get('git commit')}")
    # The table's note: the status of a case without measurements, then why.
    notes = df["status"].where(df["status"] != "ok", "").str.cat(df["note"].fillna(""), sep=" ").str.strip()
    shown = df.assign(note=notes)
    table = markdown_table(shown[[c for c in TABLE_COLUMNS if c in df and shown[c].map(_cell).ne("").any()]])
    parts = [
        f"# normattn bench ({name})",
        "\n".join(f"- **{key}**: {value}" for key, value in header.items()),
        f"## Command\n\n```\n{command}\n```",
        f"## How it was measured\n\n{METHOD}\n{method}",
        f"## Results\n\n{table}",
        *(f"## {heading}\n\n{body}" for heading, body in sections),
    ]
    (out_dir / "results.md").write_text("\n\n".join(parts) + "\n")
    return [out_dir / f"bench_{name}.csv", png, out_dir / "results.md"], table
