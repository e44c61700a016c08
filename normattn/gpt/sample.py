"""Text from a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import configs_from_checkpoint, load_checkpoint
from .config import UsageError
from .data import Vocabulary
from .model import GPT
from .train import resolve_device


def checkpoint_path(ckpt: str | Path) -> Path:
    """A checkpoint file, or a run folder: its ``best.pt``, else its ``ckpt.pt``."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        for name in ("best.pt", "ckpt.pt"):
            if (path / name).is_file():
                return path / name
        raise UsageError(f"{path} holds no checkpoint (best.pt or ckpt.pt)")
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    return path


def load_model(ckpt: str | Path, device: torch.device) -> tuple[GPT, Vocabulary]:
    """The model of a checkpoint, in eval mode on ``device``, and its vocabulary."""
    path = checkpoint_path(ckpt)
    payload = load_checkpoint(path)
    model_config, _ = configs_from_checkpoint(payload)
    model = GPT(model_config)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), Vocabulary(payload["data"]["vocab"])


def sample(
    ckpt: str | Path,
    prompt: str = "\n",
    tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    device: str = "auto",
    num_samples: int = 1,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (``tokens`` characters each, prompt included)."""
    if tokens < 0:
        raise UsageError(f"--tokens must be >= 0, got {tokens}")
    if not temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {num_samples}")
    if not prompt:
        raise UsageError("--prompt must not be empty")
    target = resolve_device(device)
    model, vocabulary = load_model(ckpt, target)
    ids = vocabulary.encode(prompt)
    generator = torch.Generator(device=target).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=target)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [vocabulary.decode(row) for row in out.tolist()]
