"""Writing bench results: environment header, ratios to baselines, CSV, PNG plots, markdown.

Shared by every bench. Rows are plain dicts; a key a row lacks is written as an empty cell and
left out of plots and ratios. Every output starts with the same header (device, cores,
torch/triton versions, git commit, date), as ``# key: value`` comment lines in CSV files
(``pandas.read_csv(path, comment="#")`` reads them), a list in markdown and the title of plots.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# Keys that hold measurements, never configuration: they are left out when rows are matched to
# their baseline or grouped into plot panels.
METRIC_KEYS = frozenset(
    {
        "ms",
        "ms_min",
        "ms_max",
        "tflops",
        "gbps",
        "peak_mb",
        "tokens_per_s",
        "repeats",
        "status",
        "note",
        "memory_method",
        "first_call_ms",
        "predicted_peak_mb",
    }
)
# Column order for rows from the CUDA benches; other keys follow in the order first seen.
CUDA_COLUMNS = (
    "bench",
    "op",
    "impl",
    "normalizer",
    "causal",
    "pass",
    "T",
    "d",
    "B",
    "H",
    "dtype",
    "ms",
    "tflops",
    "gbps",
    "peak_mb",
    "tokens_per_s",
)
# What each CUDA bench plots against T, and which of its rows are the baseline of the ratios.
CUDA_PLOT_METRIC = {"flash": "tflops", "linear": "ms", "rows": "gbps"}
CUDA_BASELINES = {
    "flash": lambda row: "sdpa" in str(row.get("impl", "")).lower(),
    "linear": lambda row: "sdpa" in str(row.get("impl", "")).lower(),
    "rows": lambda row: str(row.get("impl", "")).lower().startswith("torch"),
}
METRIC_LABELS = {
    "ms": "median time (ms)",
    "tflops": "TFLOP/s",
    "gbps": "GB/s",
    "peak_mb": "peak memory (MiB)",
    "tokens_per_s": "tokens/s",
}
X_KEYS = ("T", "N", "cols", "numel", "size")
# A CUDA row is compared with a baseline row that agrees on those of these keys the row has.
CUDA_MATCH_KEYS = ("bench", "op", "pass", "causal", "d", "B", "H", "dtype", "shape", "dim", *X_KEYS)


# ---------------------------------------------------------------------------------------------
# Environment header


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Untracked files in the package count too: a new backend is code the numbers depend on.
        dirty = git("status", "--porcelain", "--", "normattn")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes in normattn/)" if dirty else "")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def environment_header(device: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """What a reader needs to trust or reproduce a number: machine, versions, commit, date."""
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = cpu_model_name()
    header = {
        "device": f"{device} ({device_name})",
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if device.startswith("cuda") else ""),
        "triton": triton_version(),
        "python": platform.python_version(),
        "git commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    header.update({key: str(value) for key, value in (extra or {}).items()})
    return header


# ---------------------------------------------------------------------------------------------
# Ratios


def _config(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in METRIC_KEYS and "_vs_" not in key}


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if not _is_number(numerator) or not _is_number(denominator) or denominator <= 0:
        return None
    return numerator / denominator


def add_ratios(
    rows: list[dict],
    *,
    is_baseline: Callable[[dict], bool],
    match_keys: Sequence[str],
    name: str,
    time_key: str = "ms",
    memory_key: str = "peak_mb",
) -> None:
    """Add ``speedup_vs_<name>`` and ``memory_saving_vs_<name>`` to every row that has a baseline.

    A row's baseline is a row with ``is_baseline`` true and the same values of the ``match_keys``
    the row has; among several, the one sharing the most other configuration values (for example
    the same normalizer). speedup = baseline time / row time, memory saving = baseline peak / row
    peak: above 1 the row is faster or smaller than its baseline.
    """
    baselines = [row for row in rows if is_baseline(row)]
    for row in rows:
        keys = [key for key in match_keys if key in row]
        candidates = [base for base in baselines if all(base.get(key) == row[key] for key in keys)]
        if not candidates:
            continue
        config = _config(row)
        base = max(candidates, key=lambda b: sum(b.get(k) == v for k, v in config.items()))
        speedup = _ratio(base.get(time_key), row.get(time_key))
        saving = _ratio(base.get(memory_key), row.get(memory_key))
        if speedup is not None:
            row[f"speedup_vs_{name}"] = speedup
        if saving is not None:
            row[f"memory_saving_vs_{name}"] = saving


# ---------------------------------------------------------------------------------------------
# Formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any) -> str:
    """Three significant digits without exponents for the magnitudes a bench produces."""
    if not _is_number(value):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100 or magnitude == 0:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def format_ratio(value: Any) -> str:
    return f"{format_number(value)}x" if _is_number(value) else ""


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    format: Callable[[Any], str] = format_number
    # Where set, the cell is rendered from the whole row (for status-dependent text).
    render: Callable[[dict], str] | None = None

    def cell(self, row: dict) -> str:
        if self.render is not None:
            return self.render(row)
        return self.format(row.get(self.key))


def format_table(rows: Iterable[dict], columns: Sequence[Column], *, markdown: bool) -> str:
    cells = [[column.cell(row) for column in columns] for row in rows]
    titles = [column.title for column in columns]
    if markdown:
        lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines)
    widths = [max([len(title)] + [len(line[i]) for line in cells]) for i, title in enumerate(titles)]
    lines = ["  ".join(title.ljust(width) for title, width in zip(titles, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def ordered_columns(rows: Sequence[dict], preferred: Sequence[str]) -> list[str]:
    """``preferred`` keys that some row has, then every other key in the order first seen."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return [key for key in preferred if key in seen] + [key for key in seen if key not in preferred]


# ---------------------------------------------------------------------------------------------
# Files


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str], header: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        for key, value in header.items():
            out.write(f"# {key}: {value}\n")
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(key) is None else row[key] for key in columns])
    return path


def read_csv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The header and the rows (as strings) of a file written by ``write_csv``."""
    header: dict[str, str] = {}
    body = []
    with open(path, newline="") as source:
        for line in source:
            if line.startswith("# "):
                key, _, value = line[2:].rstrip("\n").partition(": ")
                header[key] = value
            else:
                body.append(line)
    return header, list(csv.DictReader(body))


def header_markdown(header: dict[str, str]) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in header.items())


def header_title(header: dict[str, str]) -> str:
    keys = ("device", "cores", "torch", "triton", "git commit", "date")
    return " | ".join(f"{key}: {header[key]}" for key in keys if key in header)


def write_markdown(
    path: Path, title: str, header: dict[str, str], sections: Sequence[tuple[str, str]]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", header_markdown(header)]
    parts += [f"## {heading}\n\n{body}" for heading, body in sections]
    path.write_text("\n\n".join(parts) + "\n")
    return path


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    note: str = ""
    logy: bool = True


def plot_panels(path: Path, panels: Sequence[Panel], *, title: str, ncols: int) -> Path:
    """Log-log line plots, one per panel, one colour per series name across all panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    figure = Figure(figsize=(5.0 * ncols, 3.8 * nrows + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=8)
    names = sorted({name for panel in panels for name in panel.series})
    palette = [f"C{i % 10}" for i in range(len(names))]
    colors = dict(zip(names, palette, strict=True))
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        for name, points in sorted(panel.series.items()):
            points = sorted((x, y) for x, y in points if _is_number(x) and _is_number(y) and y > 0)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=name, color=colors[name])
        ax.set_xscale("log", base=2)
        if panel.logy:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        if panel.note:
            ax.text(0.01, 0.01, panel.note, transform=ax.transAxes, fontsize=7, va="bottom")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# The CUDA report: rows from normattn.bench.flash, .linear and .rows


def _x_key(rows: Sequence[dict]) -> str | None:
    return next((key for key in X_KEYS if any(_is_number(row.get(key)) for row in rows)), None)


def _series_name(row: dict) -> str:
    """The implementation, with the normalizer in front where the name does not say it."""
    impl = str(row.get("impl", "?"))
    normalizer = row.get("normalizer")
    return impl if normalizer is None or str(normalizer) in impl else f"{normalizer} {impl}"


def _cuda_panels(bench: str, rows: Sequence[dict]) -> list[Panel]:
    x_key = _x_key(rows)
    metric = CUDA_PLOT_METRIC.get(bench, "ms")
    if not any(_is_number(row.get(metric)) for row in rows):
        metric = "ms"
    if x_key is None:
        return []

    def follows_x(key: str) -> bool:
        # A label of the x value (rows' "shape" beside "cols") would give every point its own panel.
        values_at_x: dict[str, set[str]] = {}
        for row in rows:
            values_at_x.setdefault(str(row.get(x_key)), set()).add(str(row.get(key)))
        return len(values_at_x) > 1 and all(len(values) == 1 for values in values_at_x.values())

    varying = [
        key
        for key in ordered_columns(rows, CUDA_COLUMNS)
        if key not in METRIC_KEYS
        and "_vs_" not in key
        and key not in ("impl", "normalizer", "bench", x_key)
        and len({str(row.get(key)) for row in rows}) > 1
        and not follows_x(key)
    ]
    panels: dict[tuple, Panel] = {}
    for row in rows:
        panel_key = tuple(str(row.get(key)) for key in varying)
        title = ", ".join(f"{key}={value}" for key, value in zip(varying, panel_key, strict=True)) or bench
        panel = panels.setdefault(panel_key, Panel(title=title, xlabel=x_key, ylabel=METRIC_LABELS[metric]))
        if _is_number(row.get(metric)):
            panel.series.setdefault(_series_name(row), []).append((row.get(x_key), row.get(metric)))
        elif row.get("status"):
            line = f"{_series_name(row)} {x_key}={row.get(x_key)}: {row['status']}"
            panel.note = f"{panel.note}\n{line}" if panel.note else line
    return list(panels.values())


def _measurements_last(columns: list[str]) -> list[str]:
    """Ratios after the measurements, then the free-text note."""
    ratios = [key for key in columns if "_vs_" in key]
    rest = [key for key in columns if key not in ratios and key != "note"]
    return rest + ratios + (["note"] if "note" in columns else [])


def _short_note(value: Any) -> str:
    text = format_number(value)
    return text if len(text) <= 80 else text[:77] + "..."


def write_cuda_report(
    rows_by_bench: dict[str, list[dict]], out_dir: Path, header: dict[str, str]
) -> tuple[list[Path], str]:
    """CSV of all rows, one PNG per bench and results.md; returns the paths and the summary text.

    Ratios are taken against the baseline rows of the same run: SDPA for flash (and linear, where
    an SDPA row is present), ``torch.*`` rows for the row reductions.
    """
    all_rows: list[dict] = []
    for bench, bench_rows in rows_by_bench.items():
        rows = [{"bench": bench, **row} for row in bench_rows]
        is_baseline = CUDA_BASELINES.get(bench, lambda row: False)
        add_ratios(rows, is_baseline=is_baseline, match_keys=CUDA_MATCH_KEYS, name="baseline")
        all_rows += rows
    columns = _measurements_last(ordered_columns(all_rows, CUDA_COLUMNS))
    paths = [write_csv(out_dir / "bench_cuda.csv", all_rows, columns, header)]
    sections = []
    for bench in rows_by_bench:
        rows = [row for row in all_rows if row["bench"] == bench]
        if not rows:
            sections.append((bench, "no rows"))
            continue
        panels = _cuda_panels(bench, rows)
        if panels:
            paths.append(
                plot_panels(
                    out_dir / f"{bench}.png", panels, title=f"{bench}\n{header_title(header)}", ncols=3
                )
            )
        table_columns = [
            Column(
                key, key, _short_note if key == "note" else format_ratio if "_vs_" in key else format_number
            )
            for key in _measurements_last(ordered_columns(rows, CUDA_COLUMNS))
            if key != "bench"
        ]
        baseline_note = {
            "flash": "speedup_vs_baseline = SDPA time / this time, at the same op, causal, T and d.",
            "linear": "speedup_vs_baseline = SDPA time / this time where an SDPA row is present.",
            "rows": "speedup_vs_baseline = torch.* time / this time for the same op and shape.",
        }.get(bench, "")
        sections.append((bench, f"{baseline_note}\n\n{format_table(rows, table_columns, markdown=True)}"))
    paths.append(write_markdown(out_dir / "results.md", "normattn bench (CUDA)", header, sections))
    summary = "\n\n".join(f"## {heading}\n{body}" for heading, body in sections)
    return paths, summary
