"""Train one GPT per attention and put their losses side by side.

The attentions train one after the other in this process, each into ``OUT/<attention>/``, an
ordinary run folder (``normattn train`` would write the same); peak memory is reset between them.
The report is ``OUT/compare.md`` (a table, with the second note's numbers beside ours) and
``OUT/compare.png`` (every validation curve on one plot).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, UsageError, build_configs, parse_attention
from .train import RunOptions, _write_json, plan_run, plot_losses, train

NOTE_PRESET = "shakespeare-char"


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


def report(
    out: Path, preset: str, attentions: list[str], command: str, header: str
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Write ``compare.md``, ``compare.png`` and ``compare.json`` from the run folders under ``out``."""
    runs = {name: _read_run(out / name) for name in attentions}
    note = PRESETS[NOTE_PRESET].reference
    lines = [
        f"# Attention comparison: preset `{preset}`",
        "",
        f"Command: `{command}`",
        "",
        header,
        "",
        "| attention | final train | final val | best train | best val (iter) | tokens/s | peak memory "
        "| wall time | note train | note val |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (summary, _) in runs.items():
        note_train, note_val = note.get(name, (None, None))
        lines.append(
            f"| {name} | {_number(summary['final_train_loss'])} | {_number(summary['final_val_loss'])} "
            f"| {_number(summary['best_train_loss'])} "
            f"| {_number(summary['best_val_loss'])} ({summary['best_val_iter']}) "
            f"| {_number(summary['tokens_per_s'], 0, thousands=True)} "
            f"| {_format_bytes(summary['peak_memory_bytes'], summary['peak_memory_kind'])} "
            f"| {_format_seconds(summary['elapsed_s'])} | {_number(note_train)} | {_number(note_val)} |"
        )
    reference = PRESETS[NOTE_PRESET]
    lines += [
        "",
        "Losses are mean cross-entropy in nats per character over the same `eval_iters` batches at every "
        "evaluation; *best* is the lowest over the evaluations; tokens/s counts training steps only. "
        "*wall time* includes evaluation and checkpointing. *peak memory*: the CUDA allocator's peak on a "
        "GPU; on the CPU the process's peak resident memory during the run, torch itself included.",
        "",
        f"*note*: the second note's final numbers (the beta-attention write-up) for preset `{NOTE_PRESET}` "
        f"({reference.model.n_layer} layers x {reference.model.n_head} heads x {reference.model.n_embd}, "
        f"context {reference.model.block_size}, {reference.train.max_iters} iterations on a GPU; "
        "its beta model was trained with exact autograd, our `beta`). "
        + (
            "They are directly comparable with ours."
            if preset == NOTE_PRESET
            else "This preset is smaller and shorter, so they are for scale, not for a match."
        ),
        "",
    ]
    text = "\n".join(lines)
    (out / "compare.md").write_text(text, encoding="utf-8")
    _write_json(out / "compare.json", {name: summary for name, (summary, _) in runs.items()})
    plot_losses(
        out / "compare.png",
        {name: metrics for name, (_, metrics) in runs.items()},
        f"{preset}: validation loss",
        ("val",),
    )
    return text, {name: summary for name, (summary, _) in runs.items()}


def compare(
    preset: str,
    attentions: list[str],
    overrides: dict[str, str],
    options: RunOptions,
    command: str = "normattn compare",
) -> str:
    """Train every attention in ``attentions`` under ``options.out/<attention>``; return compare.md."""
    if not attentions:
        raise UsageError("--attentions must name at least one attention")
    if len(set(attentions)) != len(attentions):
        raise UsageError(f"--attentions names an attention twice: {','.join(attentions)}")
    for name in attentions:
        parse_attention(name)
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    # Check every run before the first one starts, so a bad value never leaves half the comparison.
    plans = {}
    for name in attentions:
        model_config, train_config = build_configs(preset, name, overrides)
        run_options = replace(
            options, out=out / name, resume=options.resume and (out / name / "ckpt.pt").is_file()
        )
        plans[name] = plan_run(model_config, train_config, run_options)
        plans[name].checkpoint = None  # train() loads it again; keep one in memory at a time
    first = plans[attentions[0]]
    for name, plan in plans.items():
        if options.progress:
            print(f"== {name} ==", flush=True)
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
    text, _ = report(out, preset, attentions, command, header)
    return text
