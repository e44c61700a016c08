"""Character-level text data: find the text, verify it, encode it once, draw batches from it.

Tiny Shakespeare is looked for in this order: ``--data PATH``, ``$NORMATTN_DATA_DIR``, the user cache
directory (``$NORMATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/normattn``, else ``~/.cache/normattn``),
and finally downloaded into that cache. Every copy found by name must match the sha256 of the
canonical text (``TINY_SHAKESPEARE_SHA256``, that of char-rnn's ``input.txt``, which nanoGPT and the
beta-attention write-up train on). A file given with ``--data`` may be any UTF-8 text: it is used
as it is, and the checksum is only reported.

The text is encoded once, first 90% for training and last 10% for validation, to ``uint16``
``train.bin`` / ``val.bin`` plus ``meta.json`` (the vocabulary), in a folder beside the text, or in
the cache directory where the text's folder is read-only. Batches are read through ``np.memmap``.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import UsageError

TINY_SHAKESPEARE_NAME = "tinyshakespeare.txt"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9
ENCODED_SUFFIX = ".normattn-char"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class TextSource:
    path: Path
    sha256: str
    verified: bool  # the sha256 is Tiny Shakespeare's
    origin: str  # where it was found, for the log


def user_cache_dir() -> Path:
    if os.environ.get("NORMATTN_CACHE_DIR"):
        return Path(os.environ["NORMATTN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "normattn"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"data file {path} is a directory, not a text file") from None
    except OSError as e:
        raise UsageError(f"cannot read data file {path}: {e.strerror or e}") from None


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _verified_copy(path: Path, origin: str) -> TextSource:
    digest = _sha256(_read_bytes(path))
    if digest != TINY_SHAKESPEARE_SHA256:
        raise UsageError(
            f"{path} ({origin}) does not match Tiny Shakespeare's sha256 {TINY_SHAKESPEARE_SHA256[:12]}... "
            f"(got {digest[:12]}...); replace or delete it, or pass it with --data to use it as custom text"
        )
    return TextSource(path, digest, True, origin)


def download_tiny_shakespeare(destination: Path) -> None:
    """Fetch the canonical text, check its sha256, and only then move it into ``destination``."""
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UsageError(
            f"Tiny Shakespeare was not found locally and downloading {TINY_SHAKESPEARE_URL} failed "
            f"({reason}); pass --data PATH or put {TINY_SHAKESPEARE_NAME} in $NORMATTN_DATA_DIR"
        ) from None
    digest = _sha256(payload)
    if digest != TINY_SHAKESPEARE_SHA256:
        raise UsageError(
            f"the download from {TINY_SHAKESPEARE_URL} does not match Tiny Shakespeare's sha256 "
            f"(got {digest[:12]}...); nothing was saved"
        )
    try:
        _atomic_write(destination, payload)
    except OSError as e:
        raise UsageError(f"cannot save the download to {destination}: {e.strerror or e}") from None


def resolve_text(data: str | os.PathLike[str] | None = None) -> TextSource:
    """Find the training text (module docstring for the order); raise ``UsageError`` when impossible."""
    if data is not None:
        path = Path(data).expanduser()
        if not path.exists():
            raise UsageError(f"data file {path} does not exist")
        digest = _sha256(_read_bytes(path))
        return TextSource(path, digest, digest == TINY_SHAKESPEARE_SHA256, "--data")
    data_dir = os.environ.get("NORMATTN_DATA_DIR")
    if data_dir:
        candidate = Path(data_dir).expanduser() / TINY_SHAKESPEARE_NAME
        if candidate.exists():
            return _verified_copy(candidate, "$NORMATTN_DATA_DIR")
    cached = user_cache_dir() / TINY_SHAKESPEARE_NAME
    if cached.exists():
        return _verified_copy(cached, "the cache")
    download_tiny_shakespeare(cached)
    return _verified_copy(cached, "downloaded")


def describe(source: TextSource) -> str:
    if source.verified:
        return f"Tiny Shakespeare from {source.origin}: {source.path} (sha256 verified)"
    return f"custom text {source.path} (sha256 {source.sha256[:12]}..., Tiny Shakespeare checksum skipped)"


def _atomic_write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Vocabulary:
    """Characters <-> token ids (the sorted distinct characters of the text)."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self._index = {ch: i for i, ch in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self._index})
        if unknown:
            raise UsageError(f"characters not in the training vocabulary: {''.join(unknown)!r}")
        return [self._index[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class CharDataset:
    """An encoded text: its vocabulary and the ``uint16`` token files of both splits."""

    def __init__(self, folder: Path, meta: dict) -> None:
        self.folder = folder
        self.vocab: str = meta["vocab"]
        self.vocabulary = Vocabulary(self.vocab)
        self.sha256: str = meta["sha256"]
        self.sizes: dict[str, int] = meta["sizes"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def path(self, split: str) -> Path:
        return self.folder / f"{split}.bin"

    def batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows: inputs and next-token targets, ``(B, block_size)`` each."""
        # A fresh memmap per batch keeps the pages from piling up (as nanoGPT does).
        tokens = np.memmap(self.path(split), dtype=np.uint16, mode="r")
        starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
        windows = np.stack([tokens[i : i + block_size + 1] for i in starts]).astype(np.int64)
        xy = torch.from_numpy(windows)
        x, y = xy[:, :-1], xy[:, 1:]
        if device.type == "cuda":
            return (
                x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True),
            )
        return x.contiguous(), y.contiguous()


def _load_encoded(folder: Path, sha256: str) -> CharDataset | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        dataset = CharDataset(folder, meta)
        complete = all(dataset.path(s).stat().st_size == 2 * dataset.sizes[s] for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dataset if complete and dataset.sha256 == sha256 else None


def _encode_into(folder: Path, text: str, sha256: str) -> CharDataset:
    vocab = "".join(sorted(set(text)))
    if len(vocab) > np.iinfo(np.uint16).max + 1:
        raise UsageError(f"the text has {len(vocab)} distinct characters, more than uint16 tokens can hold")
    ids = np.array(Vocabulary(vocab).encode(text), dtype=np.uint16)
    cut = int(len(ids) * TRAIN_FRACTION)
    parts = {"train": ids[:cut], "val": ids[cut:]}
    meta = {"vocab": vocab, "sha256": sha256, "sizes": {s: int(len(p)) for s, p in parts.items()}}
    for split, part in parts.items():
        _atomic_write(folder / f"{split}.bin", part.tobytes())
    # meta.json last: its presence says the folder is complete.
    _atomic_write(folder / "meta.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    return CharDataset(folder, meta)


def encoded_folders(source: TextSource) -> list[Path]:
    """Where the encoding is cached: beside the text, else in the user cache."""
    return [
        source.path.parent / (source.path.name + ENCODED_SUFFIX),
        user_cache_dir() / "encoded" / source.sha256[:16],
    ]


def prepare(source: TextSource) -> CharDataset:
    """The encoded dataset of ``source``, encoding it on first use."""
    folders = encoded_folders(source)
    for folder in folders:
        found = _load_encoded(folder, source.sha256)
        if found is not None:
            return found
    raw = _read_bytes(source.path)
    if _sha256(raw) != source.sha256:
        raise UsageError(f"data file {source.path} changed while it was being read; try again")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {source.path} is not UTF-8 text (byte {e.start})") from None
    if len(text) < 2:
        raise UsageError(f"data file {source.path} is too short to train on ({len(text)} characters)")
    errors = []
    for folder in folders:
        try:
            return _encode_into(folder, text, source.sha256)
        except OSError as e:
            errors.append(f"{folder}: {e.strerror or e}")
    raise UsageError("cannot write the encoded data anywhere (" + "; ".join(errors) + ")")


def load_data(data: str | os.PathLike[str] | None = None) -> tuple[TextSource, CharDataset]:
    source = resolve_text(data)
    return source, prepare(source)
