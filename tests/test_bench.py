"""``normattn bench``: the CPU run at a tiny size, the memory helpers, the CUDA report on synthetic rows."""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import sys
import types

import pytest
import torch

from normattn.bench import cli, cpu, report, timing

MIB = 2**20


def _float(text: str) -> float:
    return float(text) if text else math.nan


# ---------------------------------------------------------------------------------------------
# The CPU bench end to end


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cpu")
    # One thread: two per case would fight the other test workers for the 2 cores (slow, not wrong).
    argv = ["--device", "cpu", "--T", "32", "--quick", "--repeats", "1", "--threads", "1", "--out", str(out)]
    code = cli.main("bench", argv)
    return code, out


def test_cpu_bench_writes_csv_png_and_markdown(cpu_run):
    code, out = cpu_run
    assert code == 0
    header, rows = report.read_csv(out / "bench_cpu.csv")
    for key in ("device", "cores", "torch", "triton", "git commit", "date"):
        assert header[key], key
    assert header["cores"] == str(os.cpu_count()) and header["torch threads"] == "1"
    for column in ("normalizer", "pass", "T", "backend", "status", "ms", "repeats", "peak_mb"):
        assert column in rows[0]
    expected = {
        (normalizer, pass_name, backend)
        for normalizer in ("softmax", "beta")
        for pass_name in cpu.PASSES
        for backend in ("reference", "torch", "sdpa")
        if normalizer == "softmax" or backend != "sdpa"
    }
    assert {(r["normalizer"], r["pass"], r["backend"]) for r in rows} == expected
    assert len(rows) == len(expected) and all(r["T"] == "32" for r in rows)
    for row in rows:
        if row["backend"] == "sdpa" and row["pass"] == "jvp":
            assert row["status"] in ("ok", "unsupported")  # no forward AD for CPU SDPA in torch 2.13
            continue
        assert row["status"] == "ok", row
        assert _float(row["ms"]) > 0 and row["repeats"] == "1"
        assert _float(row["peak_mb"]) >= 0 and row["memory_method"] in ("hwm", "sampler")
    for row in rows:
        if row["backend"] == "reference":
            assert _float(row["speedup_vs_reference"]) == 1.0
        elif row["status"] == "ok":
            reference = next(
                r
                for r in rows
                if (r["normalizer"], r["pass"], r["backend"]) == (row["normalizer"], row["pass"], "reference")
            )
            ratio = _float(reference["ms"]) / _float(row["ms"])
            assert _float(row["speedup_vs_reference"]) == pytest.approx(ratio, rel=1e-9)
    softmax_torch = [r for r in rows if r["normalizer"] == "softmax" and r["backend"] == "torch"]
    assert all(r["speedup_vs_sdpa"] for r in softmax_torch if r["pass"] != "jvp")
    assert not any(r["speedup_vs_sdpa"] for r in rows if r["normalizer"] == "beta")

    png = (out / "bench_cpu.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    markdown = (out / "results.md").read_text()
    assert "**git commit**" in markdown and "**device**" in markdown
    assert "| normalizer | pass | T | backend | median ms |" in markdown
    assert markdown.count("| softmax |") == 9 and markdown.count("| beta |") == 6
    assert "Targets from the issue" in markdown and "not measured in this run" in markdown


def test_memory_budget_skips_before_running_anything():
    cases = cpu.cases_for([64, 128], ["beta"], ["reference"], repeats=1)
    rows = cpu.run_cpu_bench(cases, memory_budget=1, progress=False)
    assert len(rows) == 6 and all(row["status"] == "skipped (memory)" for row in rows)
    copies = cpu.REFERENCE_SCORE_COPIES["fwd+bwd"]
    fwd_bwd_64 = next(r for r in rows if (r["pass"], r["T"]) == ("fwd+bwd", 64))
    assert fwd_bwd_64["predicted_peak_mb"] == pytest.approx(copies * 4 * 64 * 64 * 4 / MIB)
    table = report.format_table(rows, cpu.TABLE_COLUMNS, markdown=False)
    assert table.count("skipped (memory)") == 6


def test_peak_prediction_scales_a_measured_case():
    case = cpu.Case("torch", "beta", "jvp", 4096)
    assert cpu.predicted_peak_bytes(case, {}) is None  # only the reference has a prior estimate
    assert cpu.predicted_peak_bytes(case, {case.family: (1024, 10.0)}) == pytest.approx(40.0)
    reference = cpu.Case("reference", "beta", "jvp", 4096)
    assert cpu.predicted_peak_bytes(reference, {reference.family: (1024, 10.0)}) == pytest.approx(160.0)


def test_targets_compare_torch_with_the_reference():
    def row(backend, ms, peak):
        return {"normalizer": "beta", "pass": "fwd+bwd", "T": 4096, "backend": backend, "status": "ok",
                "ms": ms, "peak_mb": peak}  # fmt: skip

    rows = [row("reference", 1000.0, 2000.0), row("torch", 50.0, 150.0)]
    report.add_ratios(
        rows, is_baseline=lambda r: r["backend"] == "reference", match_keys=("T",), name="reference"
    )
    line = cpu.TARGETS[0].check(rows)
    assert "speedup 20.0x" in line and "memory saving 13.3x" in line
    assert line.count("NOT met") == 1 and "goal: at least 20x) NOT met" in line


# ---------------------------------------------------------------------------------------------
# Memory and timing helpers


def test_cpu_peak_bytes_sees_a_transient_allocation():
    def transient() -> None:
        buffer = torch.ones(64 * MIB // 4)  # written, so resident; freed before returning
        del buffer

    peak, method, seconds = timing.cpu_peak_bytes(transient)
    assert method in ("hwm", "sampler") and seconds > 0
    assert 60 * MIB <= peak <= 80 * MIB


def test_cpu_peak_bytes_sampler_fallback(monkeypatch):
    monkeypatch.setattr(timing, "_reset_high_water_mark", lambda: False)

    def held() -> None:
        buffer = torch.ones(64 * MIB // 4)
        timing.time.sleep(0.05)
        del buffer

    peak, method, _ = timing.cpu_peak_bytes(held)
    assert method == "sampler" and 60 * MIB <= peak <= 80 * MIB


def test_time_calls_counts_repeats_after_warmup():
    calls = []
    seconds = timing.time_calls(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert timing.median_ms([0.001, 0.003, 0.002]) == pytest.approx(2.0)


def test_a_failing_case_reports_its_error():
    # What the fresh process runs, called here: a second fork server (one per xdist worker) costs
    # seconds, and the CPU run above already goes through run_in_fresh_process.
    receiver, sender = multiprocessing.Pipe(duplex=False)
    try:
        timing._child_main(sender, cpu.measure_case, (cpu.Case("no-such-backend", "beta", "fwd", 8),))
    finally:
        gc.unfreeze()  # _child_main freezes the (throwaway) child's objects; this is pytest's process
    status = receiver.recv()["status"]
    assert status.startswith("failed: ValueError") and "backend" in status


# ---------------------------------------------------------------------------------------------
# CLI errors


def test_cuda_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main("bench", ["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["--device", "tpu"], ["--T", "0"], ["--T", "12,x"], ["--normalizers", "relu"],
     ["--backends", "flash9"], ["--device", "cpu", "--repeats", "0"], ["--device", "cpu", "--dtype", "int8"],
     ["--device", "cpu", "--threads", "0"], ["--passes", "bwd"]],
)  # fmt: skip
def test_bad_options_exit_2(argv, capsys):
    assert cli.main("bench", argv) == 2
    assert "error" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main("bench", ["--help"]) == 0
    assert "--memory-budget-gib" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The CUDA report, from synthetic rows


def _flash_rows():
    rows = []
    for T, sdpa_ms in ((1024, 1.0), (4096, 10.0)):
        rows.append({"op": "fwd", "impl": "sdpa-flash", "normalizer": "softmax", "causal": True, "T": T,
                     "d": 64, "ms": sdpa_ms, "tflops": 100.0, "peak_mb": 40.0})  # fmt: skip
        rows.append({"op": "fwd", "impl": "triton", "normalizer": "softmax", "causal": True, "T": T,
                     "d": 64, "ms": 2 * sdpa_ms, "tflops": 50.0, "peak_mb": 20.0})  # fmt: skip
        rows.append({"op": "fwd", "impl": "triton", "normalizer": "beta", "causal": True, "T": T,
                     "d": 64, "ms": 4 * sdpa_ms, "tflops": 25.0})  # fmt: skip
    return rows


def _rows_rows():
    return [
        {
            "op": op,
            "impl": impl,
            "pass": "fwd",
            "shape": f"64x{cols}",
            "cols": cols,
            "dtype": "float32",
            "ms": ms,
            "gbps": 64 * cols * 4 / (ms * 1e-3) / 1e9,
        }  # fmt: skip
        for op, baseline in (("max_reduce", "torch.max"), ("softmax", "torch.softmax"))
        for cols in (1024, 8192)
        for impl, ms in ((baseline, 0.3), ("triton", 0.1))
    ]


def test_cuda_report_from_synthetic_rows(tmp_path):
    rows_by_bench = {
        "flash": _flash_rows(),
        "linear": [{"impl": "triton-linear", "T": T, "ms": T / 1000} for T in (1024, 4096)],  # no baseline
        "rows": _rows_rows(),
    }
    header = {
        "device": "cuda (Fake GPU)",
        "torch": "2.13.0",
        "triton": "3.9.0",
        "git commit": "abc",
        "date": "d",
    }
    paths, summary = report.write_cuda_report(rows_by_bench, tmp_path, header)
    names = sorted(path.name for path in paths)
    assert names == ["bench_cuda.csv", "flash.png", "linear.png", "results.md", "rows.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in names)
    read_header, rows = report.read_csv(tmp_path / "bench_cuda.csv")
    assert read_header == header and len(rows) == 6 + 2 + 8
    assert list(rows[0])[:6] == ["bench", "op", "impl", "normalizer", "causal", "pass"]
    flash = [r for r in rows if r["bench"] == "flash"]
    for row in flash:
        expected = {"sdpa-flash": 1.0, "triton": 0.5 if row["normalizer"] == "softmax" else 0.25}[row["impl"]]
        assert _float(row["speedup_vs_baseline"]) == pytest.approx(expected)
    softmax_triton = [r for r in flash if r["impl"] == "triton" and r["normalizer"] == "softmax"]
    assert all(_float(r["memory_saving_vs_baseline"]) == pytest.approx(2.0) for r in softmax_triton)
    assert not any(r["memory_saving_vs_baseline"] for r in flash if r["normalizer"] == "beta")
    assert not any(r["speedup_vs_baseline"] for r in rows if r["bench"] == "linear")
    for row in (r for r in rows if r["bench"] == "rows"):
        assert _float(row["speedup_vs_baseline"]) == pytest.approx(
            1.0 if row["impl"].startswith("torch") else 3.0
        )
    markdown = (tmp_path / "results.md").read_text()
    assert "**device**: cuda (Fake GPU)" in markdown
    for heading in ("## flash", "## linear", "## rows"):
        assert heading in markdown and heading in summary
    assert "| op | impl | normalizer | causal | T | d | ms | tflops |" in markdown
    # The rows bench labels each x value with a shape: panels are op x pass, not one per shape.
    assert len(report._cuda_panels("rows", _rows_rows())) == 2
    (flash_panel,) = report._cuda_panels("flash", _flash_rows())  # normalizers share a panel
    assert sorted(flash_panel.series) == ["beta triton", "softmax sdpa-flash", "softmax triton"]


def test_cuda_cli_writes_rows_of_the_three_benches(monkeypatch, tmp_path, capsys):
    calls = []

    def fake(name, result):
        module = types.ModuleType(f"normattn.bench.{name}")

        def bench(*args):
            calls.append((name, args))
            return result

        setattr(module, f"bench_{name}", bench)
        monkeypatch.setitem(sys.modules, module.__name__, module)

    fake("flash", _flash_rows())
    fake("linear", [{"impl": "torch", "T": 256, "ms": 1.5}])
    fake("rows", _rows_rows())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert cli.main("bench", ["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 0
    device = torch.device("cuda")
    assert calls == [
        ("flash", (device, torch.bfloat16, True)),
        ("linear", (device, torch.bfloat16, True)),
        ("rows", (device,)),
    ]
    header, rows = report.read_csv(tmp_path / "bench_cuda.csv")
    assert "Fake GPU" in header["device"] and len(rows) == 6 + 1 + 8
    assert "## flash" in capsys.readouterr().out
    assert cli.main("bench", ["--device", "cuda", "--T", "64"]) == 2  # CPU-only option


def test_numbers_keep_three_significant_digits_without_exponents():
    values = (0.00821, 0.5, 3.14159, 42.42, 1234.4, 7, None, "skipped (memory)")
    assert [report.format_number(v) for v in values] == [
        "0.0082", "0.500", "3.14", "42.4", "1234", "7", "", "skipped (memory)",
    ]  # fmt: skip
    assert report.format_ratio(12.345) == "12.3x" and report.format_ratio(None) == ""
