"""Train one GPT per attention and seed, and put their losses side by side.

The runs train one after the other in this process, each into ``OUT/<attention>/seed-<seed>/``, an
ordinary run folder (``normattn train --seed <seed>`` would write the same); peak memory is reset
between them. With ``seeds=N`` every attention trains with the seeds ``seed, seed + 1, ...,
seed + N - 1``, so the spread over seeds shows how large a difference between attentions must be
to be more than seed noise. The report is ``OUT/compare.md`` (the command, then the mean and standard
deviation per attention with the beta-attention write-up's numbers beside them, then every run),
``OUT/compare.png`` (mean validation curves with a band of one standard deviation) and
``OUT/compare.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..bench.report import markdown_table
from .checkpoint import write_json
from .config import PRESETS, UsageError, build_configs, parse_attention
from .plot import plot_losses
from .train import RunOptions, plan_run, train

# The preset the beta-attention write-up ran, whose final losses the report shows beside ours.
WRITE_UP_PRESET = "shakespeare-char"
# What the report averages over seeds: summary.json key -> column name.
AVERAGED = {"final_val_loss": "final val", "best_val_loss": "best val", "final_train_loss": "final train"}


def _format_bytes(count: int | None, kind: str) -> str:
    if count is None:
        return "-"
    return f"{count / 2**20:,.0f} MiB ({kind})"


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{rest}s"


def _number(value: float | None, digits: int = 4, thousands: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads()
    return f"CPU ({model}, {os.cpu_count()} cores, torch using {threads} thread{'s' * (threads != 1)})"


def _read_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    metrics = [
        json.loads(line)
        for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if line
    ]
    return summary, metrics


def run_folder(out: Path, attention: str, seed: int) -> Path:
    return out / attention / f"seed-{seed}"


def _mean_std(mean: float, std: float) -> str:
    """``mean ± std``; the mean alone where one seed gives no standard deviation."""
    return _number(mean) if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per attention, in the order first seen: the number of runs, the mean and the sample standard
    deviation (``ddof=1``; NaN for one run) of each ``AVERAGED`` loss, mean tokens/s and wall time."""
    grouped = runs.groupby("attention", sort=False)
    table = grouped[list(AVERAGED)].agg(["mean", "std"])
    table.columns = [f"{key}_{stat}" for key, stat in table.columns]
    table["runs"] = grouped.size()
    table["tokens_per_s"] = grouped["tokens_per_s"].mean()
    table["elapsed_s"] = grouped["elapsed_s"].mean()
    return table.reset_index()


def report(
    out: Path, preset: str, attentions: list[str], seeds: list[int], command: str, header: str
) -> tuple[str, pd.DataFrame]:
    """Write ``compare.md``, ``compare.png`` and ``compare.json`` from the run folders under ``out``."""
    read = {(name, seed): _read_run(run_folder(out, name, seed)) for name in attentions for seed in seeds}
    runs = pd.DataFrame(
        [{**summary, "attention": name, "seed": seed} for (name, seed), (summary, _) in read.items()]
    )
    stats = summarize(runs)
    write_up = PRESETS[WRITE_UP_PRESET]
    means = pd.DataFrame(
        {
            "attention": stats["attention"],
            "runs": stats["runs"].astype(str),
            **{
                label: [
                    _mean_std(m, s) for m, s in zip(stats[f"{key}_mean"], stats[f"{key}_std"], strict=True)
                ]
                for key, label in AVERAGED.items()
            },
            "tokens/s": [_number(v, 0, thousands=True) for v in stats["tokens_per_s"]],
            "wall time per run": [_format_seconds(v) for v in stats["elapsed_s"]],
            "write-up val": [
                _number(write_up.reference.get(name, (None, None))[1]) for name in stats["attention"]
            ],
        }
    )
    every_run = pd.DataFrame(
        {
            "attention": runs["attention"],
            "seed": runs["seed"].astype(str),
            "final train": [_number(v) for v in runs["final_train_loss"]],
            "final val": [_number(v) for v in runs["final_val_loss"]],
            "best val (iter)": [
                f"{_number(v)} ({it})"
                for v, it in zip(runs["best_val_loss"], runs["best_val_iter"], strict=True)
            ],
            "tokens/s": [_number(v, 0, thousands=True) for v in runs["tokens_per_s"]],
            "peak memory": [
                _format_bytes(b, k)
                for b, k in zip(runs["peak_memory_bytes"], runs["peak_memory_kind"], strict=True)
            ],
            "wall time": [_format_seconds(v) for v in runs["elapsed_s"]],
        }
    )
    spread = (
        f"mean ± sample standard deviation over the {len(seeds)} seeds {', '.join(map(str, seeds))}"
        if len(seeds) > 1
        else f"one seed ({seeds[0]}): no standard deviation; `--seeds N` gives one"
    )
    lines = [
        f"# Attention comparison: preset `{preset}`",
        "",
        header,
        "",
        f"Command: `{command}`",
        "",
        f"Per attention ({spread}):",
        "",
        markdown_table(means),
        "",
        "Every run:",
        "",
        markdown_table(every_run),
        "",
        "Losses are mean cross-entropy in nats per character over the same `eval_iters` batches at every "
        "evaluation; *best* is the lowest over the evaluations; tokens/s counts training steps only. "
        "*wall time* includes evaluation and checkpointing. *peak memory*: the CUDA allocator's peak on a "
        "GPU; on the CPU the process's peak resident memory during the run, torch itself included.",
        "",
        f"*write-up val*: the final validation loss of the beta-attention write-up for preset "
        f"`{WRITE_UP_PRESET}` ({write_up.model.n_layer} layers x {write_up.model.n_head} heads x "
        f"{write_up.model.n_embd}, context {write_up.model.block_size}, {write_up.train.max_iters} "
        "iterations on a GPU; its beta model was trained with exact autograd, our `beta`). "
        + (
            "They are directly comparable with ours."
            if preset == WRITE_UP_PRESET
            else "This preset is smaller and shorter, so they are for scale, not for a match."
        ),
        "",
    ]
    text = "\n".join(lines)
    (out / "compare.md").write_text(text, encoding="utf-8")
    write_json(
        out / "compare.json",
        {"attentions": stats.to_dict("records"), "runs": runs.to_dict("records")},
    )
    plot_losses(
        out / "compare.png",
        {name: [read[name, seed][1] for seed in seeds] for name in attentions},
        f"{preset}: validation loss",
        ("val",),
    )
    return text, stats


def compare(
    preset: str,
    attentions: list[str],
    overrides: dict[str, str],
    options: RunOptions,
    command: str = "normattn compare",
    seeds: int = 1,
) -> str:
    """Train every attention in ``attentions`` with ``seeds`` seeds under ``options.out``; return
    compare.md."""
    if not attentions:
        raise UsageError("--attentions must name at least one attention")
    if len(set(attentions)) != len(attentions):
        raise UsageError(f"--attentions names an attention twice: {','.join(attentions)}")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    for name in attentions:
        parse_attention(name)
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    first_seed = build_configs(preset, attentions[0], overrides)[1].seed
    seed_list = [first_seed + offset for offset in range(seeds)]
    # Check every run before the first one starts, so a bad value never leaves half the comparison.
    plans, finished = {}, {}
    for name in attentions:
        for seed in seed_list:
            model_config, train_config = build_configs(preset, name, {**overrides, "seed": str(seed)})
            folder = run_folder(out, name, seed)
            run_options = replace(
                options, out=folder, resume=options.resume and (folder / "ckpt.pt").is_file()
            )
            plan = plans[name, seed] = plan_run(model_config, train_config, run_options)
            # A resumed run that had already finished keeps its summary (a rerun would report the
            # memory and time of a session that trained nothing).
            finished[name, seed] = (
                plan.checkpoint is not None
                and plan.checkpoint["iter_num"] >= train_config.max_iters
                and (folder / "summary.json").is_file()
            )
            plan.checkpoint = None  # train() loads it again; keep one in memory at a time
    first = plans[attentions[0], first_seed]
    for (name, seed), plan in plans.items():
        if options.progress:
            print(
                f"== {name}, seed {seed}" + (": finished already" * finished[name, seed]) + " ==", flush=True
            )
        if not finished[name, seed]:
            train(plan.model_config, plan.train_config, plan.options)
    m, t = first.model_config, first.train_config
    device = describe_device(first.device)
    source = first.source
    data_label = (
        "Tiny Shakespeare (sha256 verified)" if source.verified else f"custom text `{source.path.name}`"
    )
    header = (
        f"Model: {m.n_layer} layers x {m.n_head} heads x {m.n_embd}, context {m.block_size}, "
        f"dropout {m.dropout}, batch {t.batch_size}, {t.max_iters} iterations, lr {t.learning_rate:g} "
        f"-> {t.min_lr:g}, backend {m.backend}. Device: {device}, torch {torch.__version__}. "
        f"Data: {data_label}."
    )
    text, _ = report(out, preset, attentions, seed_list, command, header)
    return text
