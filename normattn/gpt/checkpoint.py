"""Checkpoints and the other run files: atomic writes, save, load, and what an exact resume restores.

A checkpoint holds the model, optimizer and loss-scaler states, the iteration, the best validation
loss, the configs, the data set's identity, the metrics so far, and the random states a run draws
from: torch's default generator (dropout, on the CPU and on CUDA) and the batch sampler's generator
(the data position), one set per process. Restoring them continues a run exactly: on the CPU the
losses are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import GPTConfig, TrainConfig, UsageError, from_dict, to_dict

CHECKPOINT_FORMAT = 1


def atomic_replace(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)``, then rename over ``path``: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    atomic_replace(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8"))


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_replace(
        path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    )


def random_state(data_generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random state a training process draws from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "data": data_generator.get_state(),
    }


def restore_random_state(
    checkpoint: dict[str, Any], rank: int, data_generator: torch.Generator, device: torch.device, seed: int
) -> None:
    """Process ``rank``'s random states as the checkpoint saved them."""
    states = checkpoint["rng"]
    if rank >= len(states):  # more processes than when saved: the new ones start fresh streams
        data_generator.manual_seed(seed + rank + 7919 * checkpoint["iter_num"])
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    data_generator.set_state(state["data"])


def save_checkpoint(out: Path, payload: dict[str, Any], improved: bool) -> None:
    """``out/ckpt.pt``, and a copy as ``out/best.pt`` when the validation loss ``improved``."""
    atomic_replace(out / "ckpt.pt", lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp))
    if improved:
        atomic_replace(out / "best.pt", lambda tmp: shutil.copyfile(out / "ckpt.pt", tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``train``, loaded onto the CPU; ``UsageError`` for anything else."""
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(
            f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a normattn training checkpoint")
    return payload


def configs_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[GPTConfig, TrainConfig]:
    """The configs a checkpoint was trained with; fields it predates take their defaults."""
    return (
        from_dict(GPTConfig, checkpoint["model_config"]),
        from_dict(TrainConfig, checkpoint["train_config"]),
    )


def check_compatible(
    checkpoint: dict[str, Any], model_config: GPTConfig, data_sha256: str, path: Path
) -> None:
    """Refuse to resume a checkpoint of another model or another text."""
    saved, _ = configs_from_checkpoint(checkpoint)
    for name, value in to_dict(model_config).items():
        if getattr(saved, name) != value:
            raise UsageError(
                f"checkpoint {path} is from another config: {name}={getattr(saved, name)!r} there, "
                f"{value!r} here"
            )
    if checkpoint["data"]["sha256"] != data_sha256:
        raise UsageError(
            f"checkpoint {path} was trained on another text (sha256 {checkpoint['data']['sha256'][:12]}...)"
        )
