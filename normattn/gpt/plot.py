"""Loss curves: one run's train and validation losses, or several attentions' mean over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import atomic_replace

Metrics = list[dict[str, Any]]


def _mean_and_std(runs: list[Metrics], key: str) -> tuple[list[int], list[float], list[float]]:
    """Iterations every run evaluated, the mean of ``key`` there and its sample standard deviation."""
    by_run = [{r["iter"]: r[key] for r in rows if r.get(key) is not None} for rows in runs]
    iters = sorted(set.intersection(*(set(values) for values in by_run)))
    means, stds = [], []
    for it in iters:
        values = [values[it] for values in by_run]
        mean = sum(values) / len(values)
        means.append(mean)
        spread = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        stds.append(spread**0.5)
    return iters, means, stds


def plot_losses(path: Path, curves: dict[str, list[Metrics]], title: str, splits: tuple[str, ...]) -> bool:
    """Loss curves, one line per (label, split): the mean over the label's runs, with a band of one
    standard deviation either side when there are several. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"train": "--", "val": "-"}
    seeds = max(len(runs) for runs in curves.values())
    for index, (label, runs) in enumerate(curves.items()):
        color = f"C{index}" if len(curves) > 1 else None
        for split in splits:
            iters, means, stds = _mean_and_std(runs, f"{split}_loss")
            if not iters:
                continue
            name = split if len(curves) == 1 else f"{label} {split}"
            (line,) = ax.plot(iters, means, styles[split], color=color, label=name)
            if len(runs) > 1:
                low = [m - s for m, s in zip(means, stds, strict=True)]
                high = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(iters, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(title if seeds == 1 else f"{title}\nmean of {seeds} seeds, band: ±1 standard deviation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_replace(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return True
