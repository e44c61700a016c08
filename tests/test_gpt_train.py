"""Training end to end on a small synthetic text: learning, exact resume, DDP, compile, CLI, sample,
compare."""

from __future__ import annotations

import json
import math
import random
import socket
import statistics
import sys
from pathlib import Path

import pytest
import torch

from normattn import cli as top_cli
from normattn.gpt import cli as gpt_cli
from normattn.gpt.checkpoint import load_checkpoint
from normattn.gpt.config import UsageError, build_configs
from normattn.gpt.train import RunOptions, train

TINY = {
    "n_layer": "2",
    "n_head": "2",
    "n_embd": "32",
    "block_size": "32",
    "batch_size": "8",
    "eval_iters": "3",
    "log_interval": "4",
    "warmup_iters": "4",
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Words from a small vocabulary with a fixed order: something a tiny model learns in seconds."""
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "dog", "ran", "far", "away"]
    lines = []
    for _ in range(600):
        start = rng.randrange(len(words))
        lines.append(" ".join(words[(start + i) % len(words)] for i in range(rng.randint(3, 7))) + ".")
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core runner: one thread avoids OpenMP oversubscription (10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMATTN_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("NORMATTN_DATA_DIR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _configs(attention="softmax", **overrides):
    return build_configs(
        "shakespeare-char-cpu", attention, {**TINY, **{k: str(v) for k, v in overrides.items()}}
    )


def _train(out: Path, text_file: Path, attention="softmax", resume=False, **overrides):
    model_config, train_config = _configs(attention, **overrides)
    options = RunOptions(
        out=out, preset="test", data=str(text_file), device="cpu", resume=resume, progress=False
    )
    return train(model_config, train_config, options)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "attention", ["softmax", "beta", "beta-seed", "softmax-sinks", "sigmoid", "softpick"]
)
def test_loss_falls_and_the_run_folder_is_complete(tmp_path, text_file, attention, capsys):
    out = tmp_path / attention
    result = _train(
        out, text_file, attention, max_iters=40, eval_interval=15, learning_rate="1e-2", min_lr="1e-3"
    )
    rows = _metrics(out)
    assert [r["iter"] for r in rows] == [0, 15, 30, 40]  # the last iteration is always evaluated
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.7, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.7
    assert set(rows[-1]) == {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}
    assert rows[0]["tokens_per_s"] is None and rows[-1]["tokens_per_s"] > 0
    assert len(result.step_losses) == 40
    for name in ("config.json", "metrics.jsonl", "ckpt.pt", "best.pt", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp*"))
    config = json.loads((out / "config.json").read_text())
    assert config["attention"] == attention and config["model"]["vocab_size"] == 18
    checkpoint = load_checkpoint(out / "ckpt.pt")
    assert checkpoint["iter_num"] == 40 and all(t.device.type == "cpu" for t in checkpoint["model"].values())
    best = load_checkpoint(out / "best.pt")
    assert best["best_val_loss"] == min(r["val_loss"] for r in rows) == result.summary["best_val_loss"]
    # The trained model samples through the CLI (beta: the recurrent state; sigmoid: the full forward;
    # the others: the KV cache).
    assert (
        gpt_cli.main("sample", ["--ckpt", str(out), "--prompt", "the ", "--tokens", "30", "--device", "cpu"])
        == 0
    )
    sampled = capsys.readouterr().out
    assert sampled.startswith("the ") and len(sampled.rstrip("\n")) >= 30


def test_resume_is_bitwise_exact(tmp_path, text_file):
    """2N iterations in one go == N, then resumed for N more: the same losses to the bit (dropout on
    the residual stream and the attention weights, so the random states must be restored too)."""
    settings = {"dropout": "0.1", "eval_interval": "4", "lr_decay_iters": "12", "learning_rate": "5e-3"}
    full = _train(tmp_path / "full", text_file, max_iters=12, **settings)
    first = _train(tmp_path / "split", text_file, max_iters=6, **settings)
    second = _train(tmp_path / "split", text_file, max_iters=12, resume=True, **settings)
    assert len(full.step_losses) == 12 and len(first.step_losses) == 6 and len(second.step_losses) == 6
    assert first.step_losses + second.step_losses == full.step_losses  # float equality, no tolerance
    assert len(set(full.step_losses)) == 12
    full_rows = {r["iter"]: r for r in _metrics(tmp_path / "full")}
    split_rows = {r["iter"]: r for r in _metrics(tmp_path / "split")}
    assert [r["iter"] for r in _metrics(tmp_path / "split")] == [0, 4, 6, 8, 12]
    for it in (0, 4, 8, 12):
        assert (split_rows[it]["train_loss"], split_rows[it]["val_loss"]) == (
            full_rows[it]["train_loss"],
            full_rows[it]["val_loss"],
        )
    a, b = (load_checkpoint(p / "ckpt.pt") for p in (tmp_path / "full", tmp_path / "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # What the run draws from, and nothing else: torch's generators (dropout) and the batch sampler's.
    assert [set(state) for state in b["rng"]] == [{"torch", "cuda", "data"}]


def test_a_killed_run_loses_only_the_work_since_its_checkpoint(tmp_path, text_file, monkeypatch):
    settings = {"dropout": "0.1", "eval_interval": "4", "learning_rate": "5e-3"}
    full = _train(tmp_path / "full", text_file, max_iters=12, **settings)
    clip = torch.nn.utils.clip_grad_norm_
    steps = []

    def killed_at_step_ten(*args, **kwargs):
        steps.append(None)
        if len(steps) == 11:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", killed_at_step_ten)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "killed", text_file, max_iters=12, **settings)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert load_checkpoint(tmp_path / "killed" / "ckpt.pt")["iter_num"] == 8
    assert [r["iter"] for r in _metrics(tmp_path / "killed")] == [0, 4, 8]
    resumed = _train(tmp_path / "killed", text_file, max_iters=12, resume=True, **settings)
    assert resumed.step_losses == full.step_losses[8:]
    assert _metrics(tmp_path / "killed")[-1]["val_loss"] == _metrics(tmp_path / "full")[-1]["val_loss"]


def test_checkpoint_write_is_atomic(tmp_path, text_file, monkeypatch):
    out = tmp_path / "run"
    _train(out, text_file, max_iters=4, eval_interval=4)
    before = (out / "ckpt.pt").read_bytes()

    def crash_mid_write(payload, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        _train(out, text_file, max_iters=8, eval_interval=4, resume=True)
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.glob(".*tmp*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_code_path_single_process_gloo(tmp_path, text_file, monkeypatch):
    plain = _train(tmp_path / "plain", text_file, max_iters=6, eval_interval=3, gradient_accumulation_steps=2)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    ddp = _train(tmp_path / "ddp", text_file, max_iters=6, eval_interval=3, gradient_accumulation_steps=2)
    assert not torch.distributed.is_initialized()  # torn down afterwards
    torch.testing.assert_close(ddp.step_losses, plain.step_losses, rtol=1e-6, atol=0)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 1
    assert len(load_checkpoint(tmp_path / "ddp" / "ckpt.pt")["rng"]) == 1


def test_compile_trains_to_the_eager_losses(tmp_path, text_file, monkeypatch):
    """``normattn train --compile true`` on the CPU: torch.compile of the model, the losses of the
    uncompiled run from the same seed (to rounding: compiled kernels may order sums differently)."""
    import torch._inductor.config

    # Compiling in this process: a pool of compile workers costs more than it saves on 2 cores.
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    tiny = {**TINY, "n_layer": "1", "eval_iters": "1", "max_iters": "3", "eval_interval": "3"}
    _train(tmp_path / "eager", text_file, **tiny)
    torch._dynamo.reset()
    argv = [arg for name, value in tiny.items() for arg in (f"--{name}", value)]
    argv += ["--preset", "shakespeare-char-cpu", "--data", str(text_file), "--device", "cpu"]
    argv += ["--out", str(tmp_path / "compiled"), "--no-progress", "--compile", "true"]
    assert top_cli.main(["train", *argv]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["train"]["compile"] is True
    compiled_rows, eager_rows = _metrics(tmp_path / "compiled"), _metrics(tmp_path / "eager")
    assert [r["iter"] for r in compiled_rows] == [r["iter"] for r in eager_rows] == [0, 3]
    for compiled, plain in zip(compiled_rows, eager_rows, strict=True):
        for key in ("train_loss", "val_loss"):
            assert math.isfinite(compiled[key]) and abs(compiled[key] - plain[key]) <= 1e-4, (
                key,
                compiled,
                plain,
            )
    assert eager_rows[1]["train_loss"] != eager_rows[0]["train_loss"]  # the three steps did train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    model_config, train_config = _configs(max_iters=3, eval_interval=3)
    train(model_config, train_config, RunOptions(out=out, data=str(text_file), device="cpu", progress=False))
    return out


def _error(capsys, command: str, argv: list[str]) -> str:
    assert top_cli.main([command, *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normattn: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "gpt-17"], "unknown preset 'gpt-17'"),
        (["--attention", "relu"], "unknown attention 'relu'"),
        (["--n_layer", "abc"], "--n_layer expects an integer"),
        (["--max-iters", "1.5"], "--max_iters expects an integer"),
        (["--block_size", "0"], "block_size must be an integer >= 1"),
        (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4)"),
        (["--dropout", "-0.1"], "dropout must be in [0, 1)"),
        (["--data", "/nonexistent/words.txt"], "data file /nonexistent/words.txt does not exist"),
        (["--data", "/"], "is a directory"),
        (["--frobnicate", "3"], "unrecognized arguments: --frobnicate"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    ],
)
def test_train_errors_are_one_line_and_write_nothing(tmp_path, text_file, capsys, argv, message):
    out = tmp_path / "never"
    base = [
        "--preset",
        "shakespeare-char-cpu",
        "--data",
        str(text_file),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    line = _error(capsys, "train", base + argv)
    assert message in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_without_cuda(tmp_path, text_file, capsys):
    line = _error(
        capsys, "train", ["--data", str(text_file), "--device", "cuda", "--out", str(tmp_path / "x")]
    )
    assert "--device cuda was asked but CUDA is not available" in line
    assert not (tmp_path / "x").exists()


def test_resume_errors(tmp_path, finished_run, text_file, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()}
    base = ["--preset", "shakespeare-char-cpu", "--data", str(text_file), "--out", str(finished_run)]
    tiny = [arg for name, value in TINY.items() for arg in (f"--{name}", value)]
    line = _error(capsys, "train", [*base, *tiny, "--n_layer", "3", "--resume"])
    assert "is from another config: n_layer=2 there, 3 here" in line
    line = _error(capsys, "train", [*base, *tiny, "--attention", "beta", "--resume"])
    assert "normalizer='softmax' there, 'beta' here" in line
    other_text = tmp_path / "other.txt"
    other_text.write_text(text_file.read_text() + "the cat.\n")
    line = _error(
        capsys, "train", [*base, *tiny, "--data", str(other_text), "--resume", "--vocab_size", "18"]
    )
    assert "trained on another text" in line
    assert "already holds a run" in _error(capsys, "train", [*base, *tiny])
    assert "no checkpoint" in _error(capsys, "train", [*base[:-1], str(tmp_path / "empty"), "--resume"])
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()} == before
    not_a_checkpoint = tmp_path / "ckpt-dir"
    not_a_checkpoint.mkdir()
    torch.save({"hello": 1}, not_a_checkpoint / "ckpt.pt")
    assert "not a normattn training checkpoint" in _error(
        capsys, "train", [*base[:-1], str(not_a_checkpoint), "--resume"]
    )


def test_resume_finished_run_with_more_iterations(finished_run, text_file, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    result = _train(out, text_file, max_iters=5, eval_interval=3, resume=True)
    assert len(result.step_losses) == 2
    assert [r["iter"] for r in _metrics(out)] == [0, 3, 5]


def test_sample_errors(tmp_path, finished_run, capsys):
    assert "does not exist" in _error(capsys, "sample", ["--ckpt", str(tmp_path / "nope.pt")])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    assert "cannot read checkpoint" in _error(capsys, "sample", ["--ckpt", str(garbage)])
    line = _error(capsys, "sample", ["--ckpt", str(finished_run), "--prompt", "XYZ", "--device", "cpu"])
    assert "not in the training vocabulary: 'XYZ'" in line
    assert "--temperature must be >= 0" in _error(
        capsys, "sample", ["--ckpt", str(finished_run), "--temperature", "-1"]
    )
    assert "the following arguments are required: --ckpt" in _error(capsys, "sample", [])


def test_sample_is_reproducible(finished_run, capsys):
    argv = ["--ckpt", str(finished_run / "ckpt.pt"), "--tokens", "25", "--seed", "3", "--device", "cpu"]
    outputs = []
    for _ in range(2):
        assert top_cli.main(["sample", *argv]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 1 + 25 + 1  # prompt "\n", 25 tokens, print's "\n"


def test_compare_errors_write_nothing(tmp_path, text_file, capsys):
    out = tmp_path / "cmp"
    base = [
        "--preset",
        "shakespeare-char-cpu",
        "--data",
        str(text_file),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert "unknown attention 'relu'" in _error(capsys, "compare", [*base, "--attentions", "softmax,relu"])
    assert "names an attention twice" in _error(capsys, "compare", [*base, "--attentions", "beta,beta"])
    assert "n_layer must be" in _error(capsys, "compare", [*base, "--n_layer", "0"])
    assert "--seeds must be >= 1" in _error(capsys, "compare", [*base, "--seeds", "0"])
    assert not out.exists()


def _compare_argv(out: Path, text_file: Path, attentions: str, *extra: str) -> list[str]:
    tiny = [arg for name, value in TINY.items() for arg in (f"--{name}", value)]
    argv = ["--preset", "shakespeare-char-cpu", "--attentions", attentions, "--data", str(text_file)]
    return [
        *argv,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--eval_interval",
        "2",
        "--no-progress",
        *tiny,
        *extra,
    ]


def _table_rows(table: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table that follows the line starting with ``heading``."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 4  # blank, header, rule
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_compare_with_seeds_reports_mean_and_std(tmp_path, text_file, capsys):
    out = tmp_path / "cmp"
    argv = _compare_argv(out, text_file, "beta-seed,softmax", "--max-iters", "4", "--seeds", "2")
    assert top_cli.main(["compare", *argv]) == 0
    table = (out / "compare.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert f"Command: `normattn compare {' '.join(argv)}`" in table
    summaries = {
        (name, seed): json.loads((out / name / f"seed-{seed}" / "summary.json").read_text())
        for name in ("beta-seed", "softmax")
        for seed in (1337, 1338)
    }
    assert all(s["iters"] == 4 and s["seed"] == seed for (_, seed), s in summaries.items())
    assert summaries["softmax", 1337]["final_val_loss"] != summaries["softmax", 1338]["final_val_loss"]
    means = _table_rows(table, "Per attention")
    assert [row[:2] for row in means] == [["beta-seed", "2"], ["softmax", "2"]]
    for row in means:
        values = [summaries[row[0], seed]["final_val_loss"] for seed in (1337, 1338)]
        assert row[2] == f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    assert [means[0][-1], means[1][-1]] == ["-", "1.6204"]  # the write-up's softmax val loss
    every_run = _table_rows(table, "Every run")
    assert [row[:2] for row in every_run] == [
        ["beta-seed", "1337"],
        ["beta-seed", "1338"],
        ["softmax", "1337"],
        ["softmax", "1338"],
    ]
    assert (
        every_run[2][3] == f"{summaries['softmax', 1337]['final_val_loss']:.4f}" and "MiB" in every_run[0][6]
    )
    assert "custom text `words.txt`" in table
    assert (out / "compare.png").stat().st_size > 1000
    report = json.loads((out / "compare.json").read_text())
    assert [a["attention"] for a in report["attentions"]] == ["beta-seed", "softmax"]
    assert len(report["runs"]) == 4


def test_compare_resumes_and_overwrites_every_run(tmp_path, text_file, capsys):
    out = tmp_path / "cmp"
    argv = _compare_argv(out, text_file, "softmax", "--seeds", "2")
    assert top_cli.main(["compare", *argv, "--max-iters", "2"]) == 0
    folders = [out / "softmax" / f"seed-{seed}" for seed in (1337, 1338)]
    assert "already holds a run" in _error(capsys, "compare", [*argv, "--max-iters", "4"])
    summaries = [(folder / "summary.json").read_bytes() for folder in folders]
    assert top_cli.main(["compare", *argv, "--max-iters", "2", "--resume"]) == 0  # nothing left to train
    assert [(folder / "summary.json").read_bytes() for folder in folders] == summaries
    assert top_cli.main(["compare", *argv, "--max-iters", "4", "--resume"]) == 0
    assert all([r["iter"] for r in _metrics(folder)] == [0, 2, 4] for folder in folders)
    assert top_cli.main(["compare", *argv, "--max-iters", "2", "--overwrite"]) == 0
    assert all([r["iter"] for r in _metrics(folder)] == [0, 2] for folder in folders)


def test_usage_error_is_what_the_api_raises(tmp_path, text_file):
    with pytest.raises(UsageError, match="smaller than the text's 18 characters"):
        _train(tmp_path / "x", text_file, max_iters=1, vocab_size=10)
    with pytest.raises(UsageError, match="not more than block_size"):
        _train(tmp_path / "x", text_file, max_iters=1, block_size=5000)
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["softmax", "beta", "beta-seed"])
def test_cuda_bf16_training_resume_and_sampling(tmp_path, text_file, attention, capsys):
    model_config, train_config = _configs(attention, max_iters=40, eval_interval=20, learning_rate="1e-2")
    options = RunOptions(out=tmp_path / "run", data=str(text_file), device="cuda", progress=False)
    result = train(model_config, train_config, options)
    rows = _metrics(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["autocast_dtype"] == "bfloat16"
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.7
    assert result.summary["peak_memory_kind"] == "CUDA allocated" and result.summary["peak_memory_bytes"] > 0
    model_config, train_config = _configs(attention, max_iters=50, eval_interval=20, learning_rate="1e-2")
    resumed = train(model_config, train_config, RunOptions(**{**options.__dict__, "resume": True}))
    assert len(resumed.step_losses) == 10
    assert (
        gpt_cli.main("sample", ["--ckpt", str(tmp_path / "run"), "--tokens", "20", "--device", "cuda"]) == 0
    )
    assert len(capsys.readouterr().out) >= 20


def test_without_tqdm_and_matplotlib(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model_config, train_config = _configs(max_iters=4, eval_interval=4)
    options = RunOptions(out=tmp_path / "run", data=str(text_file), device="cpu", progress=True)
    train(model_config, train_config, options)
    printed = capsys.readouterr().out
    assert "iter 4: loss" in printed and "iter 4: train" in printed
    assert (tmp_path / "run" / "ckpt.pt").is_file() and not (tmp_path / "run" / "loss.png").exists()
