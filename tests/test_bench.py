"""``normattn bench``: a tiny CPU run end to end, the CUDA stages' dry run under the Triton interpreter,
the peak-memory helpers, cases that raise, and the command line's errors."""

from __future__ import annotations

import inspect
import math
import shlex

import pandas as pd
import pytest
import torch

import normattn
from normattn.bench import cli, cpu, measure, memory, report
from normattn.ops.common import triton_usable

MIB = 2**20
# One thread: two per case would fight the other test workers for the cores (slow, not wrong).
CPU_ARGV = shlex.split("--device cpu --T 16 --passes fwd jvp+bwd --case-budget-s 0.01 --threads 1")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cpu")
    code = cli.main("bench", [*CPU_ARGV, "--out", str(out)])
    return code, out, pd.read_csv(out / "bench_cpu.csv", keep_default_na=False, na_values=[""])


def test_cpu_run_has_a_row_per_case_of_every_registered_normalizer(cpu_run):
    code, _, df = cpu_run
    assert code == 0
    cases = set(zip(df["backend"], df["normalizer"], df["pass"]))
    for normalizer in normattn.NORMALIZERS:  # the reference computes every normalizer
        assert {("reference", normalizer, "fwd"), ("reference", normalizer, "jvp+bwd")} <= cases
    assert ("sdpa", "softmax", "fwd") in cases and ("sdpa-math", "softmax", "jvp+bwd") in cases
    assert not {("sdpa", "softmax", "jvp+bwd"), ("sdpa-math", "softmax", "fwd")} & cases
    assert len(cases) == len(df) and set(df["T"]) == {16} and set(df["causal"]) == {True}
    # every backend differentiates every pass, jvp+bwd included
    assert set(df["status"]) == {"ok"}, df[df["status"] != "ok"][["backend", "normalizer", "pass", "note"]]
    assert (df["median_ms"] > 0).all() and (df["repeats"] >= 1).all()
    assert (df["peak_mib"] >= 0).all() and (df["iqr_ms"] >= 0).all()


def test_cpu_run_ratios_use_baselines_of_the_same_run(cpu_run):
    _, _, df = cpu_run
    by_case = df.set_index(["backend", "normalizer", "pass"])["median_ms"]
    peaks = df.set_index(["backend", "normalizer", "pass"])["peak_mib"]
    for row in df[df["status"] == "ok"].to_dict("records"):
        reference = ("reference", row["normalizer"], row["pass"])
        sdpa = ("sdpa-math" if row["pass"] == "jvp+bwd" else "sdpa", "softmax", row["pass"])
        assert row["speedup_vs_reference"] == pytest.approx(by_case[reference] / row["median_ms"])
        saving = peaks[reference] / row["peak_mib"] if row["peak_mib"] > 0 else math.nan
        assert row["memory_saving_vs_reference"] == pytest.approx(saving, nan_ok=True)
        assert row["speedup_vs_sdpa"] == pytest.approx(by_case[sdpa] / row["median_ms"])
    assert (df.loc[df["backend"] == "reference", "speedup_vs_reference"] == 1).all()


def test_cpu_run_writes_a_plot_and_a_report_with_environment_and_command(cpu_run):
    _, out, df = cpu_run
    assert (out / "bench_cpu.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "results.md").read_text()
    for key in ("device", "cores", "torch threads", "torch", "triton", "python", "git commit", "date"):
        assert f"- **{key}**: " in markdown
    assert "load average" in markdown and "memory budget GiB" in markdown
    assert "normattn bench " + " ".join(CPU_ARGV) in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| backend | normalizer | pass | T | causal | median_ms | iqr_ms |")
    assert "speedup_vs_reference" in table[0] and "window" not in table[0]  # empty columns left out
    assert len(table) == 1 + len(df)


def test_window_cost_is_in_calls_of_the_window_free_length():
    rows = [("torch", "beta", 1024, "", 10.0), ("torch", "beta", 16384, "512,0", 200.0)]
    rows += [("torch", "softmax", 1024, "", 5.0), ("torch", "softmax", 16384, "512,0", 40.0)]
    df = pd.DataFrame(rows, columns=["backend", "normalizer", "T", "window", "median_ms"])
    df["pass"], df["causal"] = "fwd", True
    report.add_window_cost(df)
    assert df["window_vs_causal_calls"].tolist()[1::2] == [200 / (16 * 10), 40 / (16 * 5)]
    assert df["window_vs_causal_calls"][::2].isna().all()


def test_peak_memory_sees_a_transient_allocation_after_a_reset():
    device = torch.device("cpu")
    earlier = torch.ones(128 * MIB // 4)  # an earlier, larger peak, which the reset must forget
    del earlier
    memory.reset_peak_memory(device)
    start, kind = memory.peak_memory(device)
    buffer = torch.ones(64 * MIB // 4)  # written, so resident; freed before the peak is read
    del buffer
    peak, _ = memory.peak_memory(device)
    assert kind == "peak RSS" and 60 * MIB <= peak - start <= 80 * MIB


def test_peak_memory_is_a_drop_in_for_the_gpt_trainers_copy():
    from normattn.gpt import train

    for name in ("reset_peak_memory", "peak_memory"):
        assert inspect.signature(getattr(memory, name)) == inspect.signature(getattr(train, name))
    assert memory.peak_memory(torch.device("cpu"))[1] == train.peak_memory(torch.device("cpu"))[1]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotImplementedError("no tangent backward\nsecond line"), "unsupported"),
        (RuntimeError("boom"), "failed"),
    ],
)
def test_a_case_that_raises_is_a_row_with_its_error_and_no_time(error, status):
    calls = []

    def call() -> None:
        calls.append(1)
        raise error

    row = measure.measured_row(lambda: call, torch.device("cpu"), budget_s=1.0)
    first_line = str(error).splitlines()[0]
    assert row == {"status": status, "note": f"{type(error).__name__}: {first_line}"} and calls == [1]


def test_cases_predicted_above_the_memory_budget_are_skipped_unrun():
    cases = cpu.cpu_cases([64, 128], ["reference"], ["beta"], ["fwd+bwd"])
    df = cpu.run_cpu(
        [c for c in cases if c["backend"] == "reference"], torch.float32, 1.0, 1, memory_budget=1
    )
    assert list(df["status"]) == ["skipped (memory)"] * 2 and df["median_ms"].isna().all()
    predicted = cpu.QUADRATIC_PEAK_SCORES["fwd+bwd"] * cpu.BATCH * cpu.HEADS * 64**2 * 4 / MIB
    assert df["note"][0] == f"predicted peak {predicted:.0f} MiB > budget 0 MiB"


def test_cuda_dry_run_under_the_interpreter(tmp_path):
    if not triton_usable(torch.empty(0)):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    assert cli.main("bench", ["--device", "cuda", "--dry-run", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "bench_cuda.csv", keep_default_na=False, na_values=[""])
    assert list(dict.fromkeys(df["stage"])) == ["flash", "linear", "window", "decode", "rows"]
    assert set(df["status"]) == {"ok"}, df[df["status"] != "ok"][["stage", "backend", "normalizer", "note"]]
    flash = df[df["stage"] == "flash"]
    assert set(flash.loc[flash["backend"] == "triton", "normalizer"]) == set(normattn.NORMALIZERS)
    baselines = set(zip(flash["backend"], flash["pass"])) - {("triton", p) for p in measure.PASSES}
    assert baselines == {
        ("sdpa-flash", "fwd"),
        ("sdpa-flash", "fwd+bwd"),
        ("sdpa-math", "jvp"),
        ("sdpa-math", "jvp+bwd"),
    }
    measured = flash[flash["status"] == "ok"]
    assert (measured["tflops"] > 0).all()
    assert (measured.loc[measured["backend"] != "triton", "speedup_vs_baseline"] == 1).all()
    assert set(df.loc[df["stage"] == "linear", "backend"]) == {"triton-linear", "triton", "sdpa-flash"}
    window = df[df["stage"] == "window"]
    windows = window["window"].fillna("")  # the CSV's empty cell reads back as NaN
    assert set(window["normalizer"]) == set(normattn.NORMALIZERS) and set(windows) == {"", "8,0"}
    assert window["window_vs_causal_calls"].notna().tolist() == (windows != "").tolist()
    assert (window["window_vs_causal_calls"].dropna() > 0).all()
    decode = df[df["stage"] == "decode"].set_index("backend")
    assert decode.loc["sdpa-kv-cache", "state_mib"] == pytest.approx(1 * 2 * 2 * 64 * 16 * 4 / MIB)
    assert decode.loc["beta_decode", "tokens_per_s"] > 0
    rows = df[df["stage"] == "rows"]
    assert set(zip(rows["op"], rows["backend"])) == {
        ("max", "triton"),
        ("max", "torch.amax"),
        ("softmax", "triton"),
        ("softmax", "torch.softmax"),
    }
    assert (rows["gbps"] > 0).all()
    markdown = (tmp_path / "results.md").read_text()
    assert (
        "Crossover: smallest T where triton-linear beat SDPA" in markdown
        and "| beta | fwd | 16 |" in markdown
    )


def test_a_stage_past_its_time_budget_skips_its_cases():
    from normattn.bench.cuda import CudaConfig, run_decode

    df = run_decode(CudaConfig.tiny(stage_budget_s=0))
    assert list(df["status"]) == ["skipped (time budget)"] * 2 and df["median_ms"].isna().all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["--device", "cpu", "--T", "0"], "--T must be positive"),
        (["--device", "cpu", "--T", "x"], "invalid int value"),
        (["--device", "cpu", "--normalizers", "relu"], "invalid choice: 'relu'"),
        (["--device", "cpu", "--backends", "flash9"], "invalid choice: 'flash9'"),
        (["--device", "cpu", "--passes", "bwd"], "invalid choice: 'bwd'"),
        (["--device", "cpu", "--dtype", "bfloat16"], "--dtype bfloat16 is not for --device cpu"),
        (["--device", "cpu", "--dry-run"], "--dry-run does not apply to --device cpu"),
        (["--device", "cuda", "--threads", "2"], "--threads does not apply to --device cuda"),
        (["--device", "cpu", "--cases", "window", "--T", "64"], "--cases window has its own T"),
        (["--device", "cuda"], "needs CUDA"),
    ],
)  # fmt: skip
def test_bad_options_exit_2_with_a_clear_message(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main("bench", argv) == 2
    err = capsys.readouterr().err
    assert "normattn bench: error: " in err and message in err


def test_triton_backends_on_the_cpu_need_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main("bench", ["--device", "cpu", "--backends", "triton"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    assert cli.main("bench", ["--help"]) == 0
    out = capsys.readouterr().out
    assert all(option in out for option in ("--cases", "--dry-run", "--memory-budget-gib", "--causal"))
