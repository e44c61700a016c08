"""The training loop: nanoGPT's recipe, resumable bit for bit, single process or DDP under torchrun.

AdamW (weight decay on 2-D weights only), linear warmup then cosine decay to ``min_lr``, gradient
clipping, bfloat16 autocast on CUDA, train/val loss estimated every ``eval_interval`` iterations and
at the last one. Each evaluation writes ``ckpt.pt`` (and ``best.pt`` when the validation loss
improves) atomically, with everything needed to continue (``checkpoint.py``). ``resume=True``
continues from it exactly: on the CPU the losses are bitwise those of an uninterrupted run.
``compile=True`` trains and evaluates through ``torch.compile`` of the model.

Evaluation draws the same ``eval_iters`` batches every time from its own generator, so it touches no
random state the training uses (curves are less noisy, and evaluating more or less often changes
nothing in the run).

Under ``torchrun --nproc_per_node=K`` every process trains on its own batches (seeded by rank)
inside DistributedDataParallel; rank 0 evaluates, logs and writes. Tokens per iteration are
``K * gradient_accumulation_steps * batch_size * block_size``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..bench.memory import peak_memory, reset_peak_memory
from .checkpoint import (
    check_compatible,
    load_checkpoint,
    random_state,
    restore_random_state,
    save_checkpoint,
    write_json,
    write_metrics,
)
from .config import GPTConfig, TrainConfig, UsageError, to_dict
from .data import SPLITS, CharDataset, TextSource, describe, load_data
from .model import GPT
from .plot import plot_losses

PLOT_EVERY_S = 60.0
RUN_FILES = ("config.json", "metrics.jsonl", "ckpt.pt", "best.pt", "loss.png", "summary.json")


@dataclass(frozen=True)
class RunOptions:
    out: Path
    preset: str = "custom"
    data: str | None = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True  # the tqdm bar and log lines


@dataclass
class RunResult:
    out: Path
    step_losses: list[float] = field(default_factory=list)  # one per iteration run in this call
    metrics: list[dict[str, Any]] = field(default_factory=list)  # every evaluation, resumed ones too
    summary: dict[str, Any] = field(default_factory=dict)


# Set-up pieces.


def resolve_device(requested: str, local_rank: int | None = None) -> torch.device:
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {requested} was asked but CUDA is not available to torch {torch.__version__}"
            )
        if local_rank is not None:
            return torch.device("cuda", local_rank)
    return torch.device(requested)


def autocast_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if dtype == torch.float16 and device.type != "cuda":
        raise UsageError("dtype float16 needs CUDA; use float32 or bfloat16 on the CPU")
    return dtype


def learning_rate(it: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_iters``, cosine decay to ``min_lr`` at ``decay_iters``, then flat."""
    if not config.decay_lr:
        return config.learning_rate
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it >= config.decay_iters:
        return config.min_lr
    progress = (it - config.warmup_iters) / (config.decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int


def distributed_from_env() -> Distributed | None:
    """The torchrun environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), or None outside it."""
    if "RANK" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK ({rank}) must be in [0, WORLD_SIZE={world})")
    return Distributed(rank, local_rank, world)


class _Progress:
    """A tqdm bar when tqdm is there and wanted, plain lines otherwise; silent off rank 0."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, mininterval=0.5)
            except ImportError:
                self.bar = None

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, it: int, loss: float, tokens_per_s: float | None) -> None:
        speed = f"{tokens_per_s:,.0f}" if tokens_per_s else "-"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=speed, refresh=False)
        elif self.enabled:
            print(f"iter {it}: loss {loss:.4f}, {speed} tok/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# The run.


def _prepare_out_dir(out: Path, options: RunOptions) -> dict[str, Any] | None:
    """Check the output folder against resume/overwrite; return the checkpoint to resume, if any."""
    ckpt = out / "ckpt.pt"
    if options.resume and options.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if options.resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint {ckpt} to continue")
        return load_checkpoint(ckpt)
    if ckpt.exists() and not options.overwrite:
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite, or another --out"
        )
    return None


def _settle_vocab(model_config: GPTConfig, dataset: CharDataset) -> GPTConfig:
    if model_config.vocab_size is None:
        return replace(model_config, vocab_size=dataset.vocab_size)
    if model_config.vocab_size < dataset.vocab_size:
        raise UsageError(
            f"vocab_size {model_config.vocab_size} is smaller than the text's {dataset.vocab_size} characters"
        )
    return model_config


@dataclass
class RunPlan:
    """Everything ``train`` checks before it writes anything."""

    model_config: GPTConfig
    train_config: TrainConfig
    options: RunOptions
    device: torch.device
    amp_dtype: torch.dtype
    source: TextSource
    dataset: CharDataset
    checkpoint: dict[str, Any] | None
    dist: Distributed | None


def plan_run(model_config: GPTConfig, train_config: TrainConfig, options: RunOptions) -> RunPlan:
    """Validate a run without writing any file (the data encoding cache aside); ``UsageError`` if bad."""
    model_config, train_config = model_config.validate(), train_config.validate()
    dist = distributed_from_env()
    device = resolve_device(options.device, dist.local_rank if dist else None)
    amp_dtype = autocast_dtype(train_config.dtype, device)
    source, dataset = load_data(options.data)
    model_config = _settle_vocab(model_config, dataset)
    for split in SPLITS:
        if dataset.sizes[split] <= model_config.block_size:
            raise UsageError(
                f"the {split} split has {dataset.sizes[split]} characters, not more than block_size "
                f"({model_config.block_size}); use a longer text or a smaller block_size"
            )
    checkpoint = _prepare_out_dir(Path(options.out), options)
    if checkpoint is not None:
        check_compatible(checkpoint, model_config, dataset.sha256, Path(options.out) / "ckpt.pt")
    return RunPlan(model_config, train_config, options, device, amp_dtype, source, dataset, checkpoint, dist)


def train(model_config: GPTConfig, train_config: TrainConfig, options: RunOptions) -> RunResult:
    """Train (or resume) one GPT; writes the run folder ``options.out``. ``UsageError`` for bad input.

    Everything that can be refused is checked (``plan_run``) before the first file is written.
    """
    plan = plan_run(model_config, train_config, options)
    if plan.dist is not None:
        import torch.distributed

        if plan.device.type == "cuda":
            torch.cuda.set_device(plan.device)
        torch.distributed.init_process_group(backend="nccl" if plan.device.type == "cuda" else "gloo")
    try:
        return _run(plan)
    finally:
        if plan.dist is not None:
            torch.distributed.destroy_process_group()


def _run(plan: RunPlan) -> RunResult:
    model_config, cfg, options, device = plan.model_config, plan.train_config, plan.options, plan.device
    amp_dtype, source, dataset, checkpoint, dist = (
        plan.amp_dtype,
        plan.source,
        plan.dataset,
        plan.checkpoint,
        plan.dist,
    )
    plan.checkpoint = None
    out = Path(options.out)
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    data_generator = torch.Generator().manual_seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    reset_peak_memory(device)

    model = GPT(model_config)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_iter, best_val, best_iter, metrics = 0, math.inf, None, []
    elapsed_before, train_time, tokens_seen = 0.0, 0.0, 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_iter, best_val = checkpoint["iter_num"], checkpoint["best_val_loss"]
        best_iter, metrics = checkpoint["best_iter"], list(checkpoint["metrics"])
        elapsed_before, train_time = checkpoint["elapsed_s"], checkpoint["train_time_s"]
        tokens_seen = checkpoint["tokens_seen"]
        restore_random_state(checkpoint, rank, data_generator, device, cfg.seed)
    resumed, checkpoint = checkpoint is not None, None  # drop the CPU copy

    compiled = torch.compile(model) if cfg.compile else model
    train_model = compiled
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            compiled, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype != torch.float32
        else contextlib.nullcontext()
    )
    tokens_per_iter = world * cfg.gradient_accumulation_steps * cfg.batch_size * model_config.block_size
    run_info = {
        "preset": options.preset,
        "attention": model_config.attention,
        "data": {
            "path": str(source.path),
            "sha256": dataset.sha256,
            "verified": source.verified,
            "vocab": dataset.vocab,
            "sizes": dataset.sizes,
        },
    }

    progress = _Progress(options.progress and master, cfg.max_iters, start_iter)
    title = f"{options.preset}: {model_config.attention} attention"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        if options.overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        write_json(
            out / "config.json",
            {
                **run_info,
                "model": to_dict(model_config),
                "train": to_dict(cfg),
                "device": str(device),
                "world_size": world,
                "autocast_dtype": str(amp_dtype).removeprefix("torch."),
                "tokens_per_iter": tokens_per_iter,
                "parameters": model.num_parameters(),
            },
        )
        write_metrics(out / "metrics.jsonl", metrics)
        verb = f"resuming at iteration {start_iter}" if start_iter else "training"
        progress.write(
            f"{verb}: {model_config.attention} attention, {model.num_parameters() / 1e6:.2f}M parameters, "
            f"{device}, {tokens_per_iter:,} tokens/iter; {describe(source)}; writing {out}"
        )

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        compiled.eval()
        losses = {}
        for index, split in enumerate(SPLITS):
            generator = torch.Generator().manual_seed(cfg.seed + 1_000_003 * (index + 1))
            total = torch.zeros((), device=device)
            for _ in range(cfg.eval_iters):
                x, y = dataset.batch(split, cfg.batch_size, model_config.block_size, generator, device)
                with autocast:
                    _, loss = compiled(x, y)
                total += loss.float()
            losses[split] = (total / cfg.eval_iters).item()
        compiled.train()
        return losses

    def write_checkpoint(it: int, improved: bool, elapsed: float) -> None:
        states = [random_state(data_generator, device)]
        if dist is not None:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if not master:
            return
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iter_num": it,
            "best_val_loss": best_val,
            "best_iter": best_iter,
            "metrics": metrics,
            "model_config": to_dict(model_config),
            "train_config": to_dict(cfg),
            **run_info,
            "rng": states,
            "elapsed_s": elapsed,
            "train_time_s": train_time,
            "tokens_seen": tokens_seen,
        }
        save_checkpoint(out, payload, improved)

    session_start = last_plot = time.perf_counter()
    step_losses: list[float] = []
    pending: list[torch.Tensor] = []  # step losses not yet read back: one device sync per log interval
    interval_time, interval_tokens = 0.0, 0  # since the last evaluation
    log_time, log_tokens = 0.0, 0  # since the last log line

    def flush() -> float:
        """Read back the pending losses; the seconds it took count as training time."""
        started = time.perf_counter()
        if pending:
            step_losses.extend(torch.stack(pending).tolist())
            pending.clear()
        return time.perf_counter() - started

    it = start_iter
    try:
        while True:
            already_evaluated = resumed and it == start_iter
            if (it == cfg.max_iters or it % cfg.eval_interval == 0) and not already_evaluated:
                seconds = flush()
                train_time, interval_time = train_time + seconds, interval_time + seconds
                improved = False
                if master:
                    losses = estimate_loss()
                    improved = losses["val"] < best_val
                    if improved:
                        best_val, best_iter = losses["val"], it
                    row = {
                        "iter": it,
                        "train_loss": losses["train"],
                        "val_loss": losses["val"],
                        "lr": learning_rate(it, cfg),
                        "tokens_per_s": interval_tokens / interval_time if interval_tokens else None,
                        "elapsed_s": round(elapsed_before + time.perf_counter() - session_start, 3),
                    }
                    metrics.append(row)
                    progress.write(
                        f"iter {it}: train {row['train_loss']:.4f}, val {row['val_loss']:.4f}, "
                        f"lr {row['lr']:.2e}"
                        + (f", {row['tokens_per_s']:,.0f} tok/s" if row["tokens_per_s"] else "")
                    )
                write_checkpoint(it, improved, elapsed_before + time.perf_counter() - session_start)
                if master:
                    write_metrics(out / "metrics.jsonl", metrics)
                    # The plot is redrawn at the end, and at most once a minute before that.
                    if it >= cfg.max_iters or time.perf_counter() - last_plot > PLOT_EVERY_S:
                        plot_losses(out / "loss.png", {model_config.attention: [metrics]}, title, SPLITS)
                        last_plot = time.perf_counter()
                interval_time, interval_tokens = 0.0, 0
            if it >= cfg.max_iters:
                break

            step_start = time.perf_counter()
            lr = learning_rate(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.gradient_accumulation_steps):
                if dist is not None:
                    train_model.require_backward_grad_sync = micro == cfg.gradient_accumulation_steps - 1
                x, y = dataset.batch("train", cfg.batch_size, model_config.block_size, data_generator, device)
                with autocast:
                    _, loss = train_model(x, y)
                    loss = loss / cfg.gradient_accumulation_steps
                scaler.scale(loss).backward()
                step_loss += loss.detach().float()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            pending.append(step_loss)
            it += 1
            log_now = it % cfg.log_interval == 0 or it == cfg.max_iters
            if log_now:
                flush()
            seconds = time.perf_counter() - step_start
            train_time += seconds
            tokens_seen += tokens_per_iter
            interval_time, interval_tokens = interval_time + seconds, interval_tokens + tokens_per_iter
            log_time, log_tokens = log_time + seconds, log_tokens + tokens_per_iter
            progress.advance()
            if log_now:
                progress.log(it, step_losses[-1], log_tokens / log_time if log_time > 0 else None)
                log_time, log_tokens = 0.0, 0
    finally:
        progress.close()

    summary: dict[str, Any] = {}
    if master:
        peak, peak_kind = peak_memory(device)
        final = metrics[-1] if metrics else {}
        best_row = next((r for r in metrics if r["iter"] == best_iter), {})
        summary = {
            **{k: v for k, v in run_info.items() if k != "data"},
            "seed": cfg.seed,
            "iters": it,
            "final_train_loss": final.get("train_loss"),
            "final_val_loss": final.get("val_loss"),
            "best_train_loss": min((r["train_loss"] for r in metrics), default=None),
            "best_val_loss": best_row.get("val_loss"),
            "best_val_iter": best_iter,
            "train_loss_at_best_val": best_row.get("train_loss"),
            "tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "elapsed_s": round(elapsed_before + time.perf_counter() - session_start, 3),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "parameters": model.num_parameters(),
            "data_verified": source.verified,
        }
        write_json(out / "summary.json", summary)
    return RunResult(out=out, step_losses=step_losses, metrics=metrics, summary=summary)
