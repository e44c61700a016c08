"""Finding, verifying, encoding and batching the text."""

from __future__ import annotations

import io
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from normattn.gpt import data
from normattn.gpt.config import UsageError

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / data.TINY_SHAKESPEARE_NAME


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test reads the real cache or data folder unless it says so, and nothing downloads."""
    monkeypatch.setenv("NORMATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NORMATTN_DATA_DIR", raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_custom_text_is_encoded_split_and_cached(tmp_path):
    text = "hello world, héllo wörld!\n" * 40
    source, dataset = data.load_data(_write(tmp_path / "my.txt", text))
    assert not source.verified and "checksum skipped" in data.describe(source)
    assert dataset.vocab == "".join(sorted(set(text)))
    cut = int(len(text) * 0.9)
    assert dataset.sizes == {"train": cut, "val": len(text) - cut}
    train = np.memmap(dataset.path("train"), dtype=np.uint16, mode="r")
    val = np.memmap(dataset.path("val"), dtype=np.uint16, mode="r")
    vocabulary = dataset.vocabulary
    assert vocabulary.decode(train.tolist()) == text[:cut] and vocabulary.decode(val.tolist()) == text[cut:]
    assert dataset.folder == tmp_path / "my.txt.normattn-char"
    # Encoded once: a second load reuses the files.
    stamp = dataset.path("train").stat().st_mtime_ns
    _, again = data.load_data(tmp_path / "my.txt")
    assert again.path("train").stat().st_mtime_ns == stamp
    # A changed text is encoded again.
    _write(tmp_path / "my.txt", text + "xyz")
    _, changed = data.load_data(tmp_path / "my.txt")
    assert "z" in changed.vocab and changed.sizes["train"] + changed.sizes["val"] == len(text) + 3


def test_read_only_folder_encodes_into_the_cache(tmp_path, monkeypatch):
    text_path = _write(tmp_path / "t.txt", "abcabcabd" * 30)
    beside = tmp_path / ("t.txt" + data.ENCODED_SUFFIX)
    write = data._atomic_write

    def read_only_beside_text(path, payload):
        if path.parent == beside:
            raise PermissionError(13, "Permission denied")
        write(path, payload)

    monkeypatch.setattr(data, "_atomic_write", read_only_beside_text)
    source, dataset = data.load_data(text_path)
    assert dataset.folder == tmp_path / "cache" / "encoded" / source.sha256[:16]
    assert data.load_data(text_path)[1].folder == dataset.folder  # and found there again


def test_batches_are_shifted_windows_and_reproducible(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(2000))
    _, dataset = data.load_data(_write(tmp_path / "abc.txt", text))
    x, y = dataset.batch("train", 5, 16, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal((x + 1) % 26, y)
    x2, _ = dataset.batch("train", 5, 16, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(x, x2)


def test_vocabulary_round_trip_and_unknown_characters(tmp_path):
    _, dataset = data.load_data(_write(tmp_path / "v.txt", "to be or not to be\n" * 20))
    vocabulary = dataset.vocabulary
    assert len(vocabulary) == dataset.vocab_size == 8
    assert vocabulary.decode(vocabulary.encode("not to be")) == "not to be"
    with pytest.raises(UsageError, match="not in the training vocabulary: 'iquz'"):
        vocabulary.encode("quiz")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: p, "is a directory"),
        (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00abc" * 10) and p / "bin.txt", "not UTF-8"),
        (lambda p: (p / "one.txt").write_text("a") and p / "one.txt", "too short"),
    ],
)
def test_unusable_files(tmp_path, setup, message):
    with pytest.raises(UsageError, match=message):
        data.load_data(setup(tmp_path))


def test_unreadable_file(tmp_path, monkeypatch):
    path = _write(tmp_path / "secret.txt", "abc" * 50)
    read_bytes = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UsageError, match="cannot read data file .*secret.txt: Permission denied"):
        data.load_data(path)


def test_data_dir_copy_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    _write(tmp_path / data.TINY_SHAKESPEARE_NAME, "First Citizen:\nnot quite the real thing\n")
    monkeypatch.setenv("NORMATTN_DATA_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="does not match Tiny Shakespeare's sha256"):
        data.resolve_text()
    assert not (tmp_path / (data.TINY_SHAKESPEARE_NAME + data.ENCODED_SUFFIX)).exists()


def test_cached_copy_with_wrong_checksum_is_refused(tmp_path):
    (tmp_path / "cache").mkdir()
    _write(tmp_path / "cache" / data.TINY_SHAKESPEARE_NAME, "x")
    with pytest.raises(UsageError, match=r"\(the cache\) does not match"):
        data.resolve_text()


def test_failed_download_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError) as info:
        data.resolve_text()
    message = str(info.value)
    assert data.TINY_SHAKESPEARE_URL in message and "no network in tests" in message and "--data" in message
    assert not (tmp_path / "cache" / data.TINY_SHAKESPEARE_NAME).exists()


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_with_wrong_checksum_saves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: _Response(b"a captive portal page"))
    with pytest.raises(UsageError, match="does not match Tiny Shakespeare's sha256.*nothing was saved"):
        data.resolve_text()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.skipif(not SHARED_TEXT.is_file(), reason="the shared Tiny Shakespeare copy is not here")
def test_download_path_with_the_real_bytes(tmp_path, monkeypatch):
    payload = SHARED_TEXT.read_bytes()
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return _Response(payload)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    source = data.resolve_text()
    assert urls == [data.TINY_SHAKESPEARE_URL]
    assert source.verified and source.origin == "downloaded"
    assert source.path == tmp_path / "cache" / data.TINY_SHAKESPEARE_NAME
    assert data.resolve_text().origin == "the cache"  # found there next time, no second download
    assert len(urls) == 1


@pytest.mark.skipif(not SHARED_TEXT.is_file(), reason="the shared Tiny Shakespeare copy is not here")
def test_real_tiny_shakespeare_through_the_data_dir(tmp_path, monkeypatch):
    # A link, so the encoding is written beside it in tmp_path and never into the shared folder.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / data.TINY_SHAKESPEARE_NAME).symlink_to(SHARED_TEXT)
    monkeypatch.setenv("NORMATTN_DATA_DIR", str(tmp_path / "data"))
    source, dataset = data.load_data()
    assert source.verified and source.origin == "$NORMATTN_DATA_DIR"
    assert source.sha256 == data.TINY_SHAKESPEARE_SHA256
    assert dataset.vocab_size == 65
    assert dataset.sizes == {"train": 1003854, "val": 111540}
    meta = json.loads((dataset.folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["sha256"] == data.TINY_SHAKESPEARE_SHA256
    # The same file passed with --data is recognised as Tiny Shakespeare.
    assert data.resolve_text(SHARED_TEXT).verified
