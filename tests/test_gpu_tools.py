"""The CPU-testable parts of the GPU tools (``tools/``): the static check's covering set, recording and
verdicts; the GPU proof's log parsing, targets, time limits and summary; the experiment's resume and
interruption. ``make gpu-static`` and the dry runs of ``make gpu-check`` / ``gpu-experiment`` (in CI)
exercise the rest end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tools/ is a folder of the repository, not of the installed package
    sys.path.insert(0, str(ROOT))

import normattn  # noqa: E402
from normattn.ops.triton_utils import _GPU_TILES  # noqa: E402
from tools import gpu_check, gpu_experiment, gpu_static  # noqa: E402

PTXAS_OK = """ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
"""
PTXAS_SPILLS = PTXAS_OK.replace(
    "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
    "40 bytes stack frame, 36 bytes spill stores, 44 bytes spill loads",
).replace("168", "255")


# -- gpu_static ---------------------------------------------------------------------------------


def test_ptxas_report_is_read():
    assert gpu_static.parse_ptxas_log(PTXAS_OK) == {
        "registers": 168,
        "stack": 0,
        "spill_stores": 0,
        "spill_loads": 0,
    }
    spills = gpu_static.parse_ptxas_log(PTXAS_SPILLS)
    assert (spills["registers"], spills["spill_stores"], spills["spill_loads"]) == (255, 36, 44)
    with pytest.raises(ValueError, match="no register"):
        gpu_static.parse_ptxas_log("ptxas info: nothing")


def _spec(usage: dict) -> gpu_static.Spec:
    return gpu_static.Spec(
        "m._fwd_kernel", "{}", gpu_static.Case("flash", "forward", "r", "softmax"), usage=usage
    )


def test_verdicts_fail_spills_shared_memory_and_errors():
    fine = {
        "registers": 255,
        "stack": 0,
        "spill_stores": 0,
        "spill_loads": 0,
        "shared": gpu_static.SHARED_LIMIT_BYTES,
    }
    assert gpu_static._verdict(_spec(fine)) == "ok"
    assert "spills 8/0 B" in gpu_static._verdict(_spec(fine | {"spill_stores": 8}))
    assert "shared" in gpu_static._verdict(_spec(fine | {"shared": gpu_static.SHARED_LIMIT_BYTES + 1}))
    assert gpu_static._verdict(_spec({"error": "CompilationError: x"})).startswith("FAIL (CompilationError")


def test_covering_set_follows_the_registry_and_the_tile_table():
    cases = gpu_static.covering_set()
    flash = [c for c in cases if c.family == "flash"]
    kernel_names = {name for name, spec in normattn.NORMALIZERS.items() if spec.kernel is not None}
    for op in gpu_static.FLASH_OPS:
        of_op = [c for c in flash if c.op == op]
        assert {c.normalizer for c in of_op} >= kernel_names
        assert {c.head_dim for c in of_op} >= set(gpu_static.HEAD_DIMS)
        assert {c.dtype for c in of_op} == set(gpu_static.DTYPES)
        assert {f for c in of_op for f in c.features} == set(gpu_static.FEATURES)
    # sinks only where the registry allows them, the seed gradient only for beta
    assert all(c.normalizer == "softmax" for c in flash if "sinks" in c.features)
    assert all(c.normalizer == "beta" for c in flash if "seed" in c.features)
    # every tile-table row's largest head dim, with every feature at once
    worst = {(c.op, c.dtype, c.head_dim) for c in flash if c.rule == "tile row, all features"}
    kinds = {"fwd": "forward", "jvp": "jvp", "dkdv": "backward", "tangent_dq": "tangent"}
    for (kind, wide), rows in _GPU_TILES.items():
        if kind in kinds:
            for max_d, _ in rows:
                assert (kinds[kind], "float32" if wide else "bfloat16", max_d) in worst


def test_sinks_and_seed_are_asked_of_the_library():
    assert "sinks" in gpu_static.accepted_features("softmax") and "seed" not in gpu_static.accepted_features(
        "softmax"
    )
    assert "seed" in gpu_static.accepted_features("beta") and "sinks" not in gpu_static.accepted_features(
        "beta"
    )


def test_recording_lists_every_kernel_with_the_library_tiles():
    """In a process of its own: the kernels must be real JIT functions, not the interpreter's."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tools.gpu_static", "--list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # the forward kernel at d=128 in bf16 gets the table's fwd tiles, as a GPU launch would
    fwd = _GPU_TILES[("fwd", False)]
    tiles = next(t for max_d, t in fwd if max_d >= 128)
    line = next(
        x
        for x in lines
        if x.startswith("_fwd_kernel flash forward softmax bfloat16 d=128 [every normalizer]")
    )
    assert (
        f"BLOCK_M={tiles.block_m} BLOCK_N={tiles.block_n} warps={tiles.num_warps} stages={tiles.num_stages}"
        in line
    )
    assert {x.split()[0] for x in lines[1:]} >= {"_fwd_kernel", "_jvp_kernel", "_dq_kernel", "_dkdv_kernel"}


def test_table_has_failures_first(tmp_path):
    ok = _spec({"registers": 100, "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 1024})
    bad = _spec({"registers": 255, "stack": 8, "spill_stores": 8, "spill_loads": 8, "shared": 1024})
    for spec in (ok, bad):
        signature = {"signature": {"NORM": "constexpr"}, "constant_keys": [[0]], "constant_vals": [0]}
        spec.data = json.dumps(signature | {"options": {"num_warps": 8, "num_stages": 2}})
    rows = gpu_static.table_rows([ok, bad], "3.9.0")
    csv_path, md_path = gpu_static.write_table(rows, tmp_path, {"failures": "1"}, missing=["m._new_kernel"])
    text = md_path.read_text()
    assert text.index("## Kernels no case launches") < text.index("## Failures (1)") < text.index("## Every")
    assert pd.read_csv(csv_path)["status"].tolist() == ["ok", "FAIL (spills 8/8 B)"]
    assert gpu_static.summary(rows)["spilling specializations"] == "1"


# -- gpu_check ----------------------------------------------------------------------------------

PYTEST_XDIST = """[gw0] [ 33%] PASSED tests/gpu/test_rows_gpu.py::test_max[64x7-bfloat16]
[gw1] [ 66%] FAILED tests/gpu/test_flash_gpu.py::test_flash_rule[softmax-full-16-bfloat16]
[gw0] [100%] SKIPPED tests/gpu/test_rows_gpu.py::test_other
=========================== short test summary info ============================
FAILED tests/gpu/test_flash_gpu.py::test_flash_rule[softmax-full-16-bfloat16] - AssertionError: dq: NaN
"""
PYTEST_PLAIN = "tests/gpu/test_rows_gpu.py::test_max[64x7-bfloat16] PASSED                     [ 50%]\n"


def test_pytest_outcomes_are_read_with_and_without_xdist():
    outcomes, messages = gpu_check.parse_pytest_log(PYTEST_XDIST)
    failing = "tests/gpu/test_flash_gpu.py::test_flash_rule[softmax-full-16-bfloat16]"
    assert outcomes == {
        "tests/gpu/test_rows_gpu.py::test_max[64x7-bfloat16]": "PASSED",
        failing: "FAILED",
        "tests/gpu/test_rows_gpu.py::test_other": "SKIPPED",
    }
    assert messages == {failing: "AssertionError: dq: NaN"}
    assert gpu_check.parse_pytest_log(PYTEST_PLAIN)[0] == {
        "tests/gpu/test_rows_gpu.py::test_max[64x7-bfloat16]": "PASSED"
    }
    markdown = gpu_check.correctness_markdown(outcomes, messages, {"status": "failed (rc 1)"})
    assert "1 failed, 1 passed, 1 skipped" in markdown and "dq: NaN" in markdown


def _bench_rows() -> pd.DataFrame:
    def row(stage, backend, pass_name, T, median_ms, speedup=float("nan"), tflops=float("nan")):
        case = {"stage": stage, "backend": backend, "pass": pass_name, "T": T, "status": "ok"}
        return case | {"median_ms": median_ms, "speedup_vs_baseline": speedup, "tflops": tflops}

    return pd.DataFrame([
        row("flash", "triton", "fwd", 8192, 2.0, speedup=1.1, tflops=500.0),
        row("flash", "sdpa-flash", "fwd", 8192, 2.2),
        row("flash", "triton", "fwd+bwd", 8192, 8.0),
        row("flash", "sdpa-flash", "fwd+bwd", 8192, 6.2),
        row("flash", "triton", "jvp", 8192, 3.0, speedup=3.0),
        row("flash", "triton", "fwd", 1024, 1.0, speedup=0.1),  # another T: not read
        row("linear", "triton-linear", "fwd+bwd", 16384, 1.0, speedup=6.0),
        row("decode", "beta_decode", "decode", 32768, 0.01, speedup=20.0),
    ])  # fmt: skip


def test_targets_are_read_at_their_sequence_length():
    values = gpu_check.measured_targets(_bench_rows(), 8192, 16384)
    # backward: (6.2 - 2.2) / (8.0 - 2.0) for SDPA over ours
    assert values == pytest.approx([1.1, 500.0, 4.0 / 6.0, 3.0, 6.0, 20.0])
    verdicts = [gpu_check.verdict(v, t.required) for v, t in zip(values, gpu_check.TARGETS, strict=True)]
    assert verdicts == ["met", "met", "missed by 17%", "missed by 14%", "met", "met"]
    assert gpu_check.verdict(float("nan"), 1.0) == "not measured"


def test_summary_without_measurements_says_not_measured(tmp_path):
    table = gpu_check.write_summary(
        tmp_path, False, [("env", "ok", 3.0), ("speed", "timed out after 150 s", 150.0)]
    )
    assert "| speed | timed out after 150 s | 150 |" in table
    assert table.count("not measured") == len(gpu_check.TARGETS)
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check: summary")


def test_a_stage_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    command = ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]  # a shell whose child sleeps
    with (tmp_path / "log").open("w") as log:
        assert gpu_check._run_bounded(command, log, dict(os.environ), 1).startswith("timed out")
    child = int(pid_file.read_text())
    for _ in range(100):  # the killed child is gone once init has reaped it
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the stage's child {child} survived its limit")
    with (tmp_path / "log").open("w") as log:
        assert gpu_check._run_bounded(
            [sys.executable, "-c", "raise SystemExit(3)"], log, dict(os.environ), 30
        ) == ("failed (rc 3)")


def test_training_data_falls_back_to_a_stand_in_only_in_a_dry_run(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMATTN_DATA_DIR", raising=False)
    monkeypatch.setattr(gpu_check, "CARRIED_DATA", tmp_path / "absent")
    assert gpu_check.find_data(False, tmp_path) is None
    stand_in = gpu_check.find_data(True, tmp_path)
    assert stand_in is not None and len(stand_in.read_text()) > 1000
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / gpu_check.DATA_NAME).write_text("text")
    monkeypatch.setenv("NORMATTN_DATA_DIR", str(tmp_path / "data"))
    assert gpu_check.find_data(False, tmp_path) == tmp_path / "data" / gpu_check.DATA_NAME


def test_output_files_fit_what_a_device_call_returns():
    assert len(gpu_check.OUT_FILES) <= 8
    assert all(name.replace(".", "").replace("_", "").isalnum() for name in gpu_check.OUT_FILES)


# -- gpu_experiment -----------------------------------------------------------------------------


def test_a_run_with_a_checkpoint_is_resumed(tmp_path):
    command = gpu_experiment.train_command("beta", tmp_path, None, None, dry_run=False)
    assert "--resume" not in command and command[command.index("--attention") + 1] == "beta"
    (tmp_path / "beta").mkdir()
    (tmp_path / "beta" / "ckpt.pt").write_bytes(b"")
    assert "--resume" in gpu_experiment.train_command("beta", tmp_path, None, None, dry_run=False)


def test_finished_means_summary_at_the_target(tmp_path):
    assert not gpu_experiment.finished(tmp_path, 4)
    (tmp_path / "summary.json").write_text(json.dumps({"iters": 2}))
    assert not gpu_experiment.finished(tmp_path, 4)
    (tmp_path / "summary.json").write_text(json.dumps({"iters": 4}))
    assert gpu_experiment.finished(tmp_path, 4)


def test_trainers_past_the_budget_are_interrupted(tmp_path):
    """SIGINT (what lets normattn train keep its checkpoint), not a kill: the handler runs."""
    catches = (
        "import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *_: sys.exit(130))\ntime.sleep(60)"
    )
    commands = {"quick": [sys.executable, "-c", "pass"], "slow": [sys.executable, "-c", catches]}
    statuses = gpu_experiment.train_concurrently(commands, tmp_path, budget_s=3)
    assert statuses == {"quick": "ok", "slow": "interrupted at the time budget"}


def test_progress_table_puts_published_numbers_beside_ours():
    metrics = [
        {"iter": 0, "train_loss": 4.2, "val_loss": 4.3, "tokens_per_s": None},
        {"iter": 250, "train_loss": 1.9, "val_loss": 2.0, "tokens_per_s": 1000.0},
        {"iter": 500, "train_loss": 1.5, "val_loss": 2.1, "tokens_per_s": 1200.0},
    ]
    runs = {name: {"metrics": metrics if name == "softmax" else []} for name in gpu_experiment.ATTENTIONS}
    table = gpu_experiment.progress_table(runs, {"softmax": "interrupted at the time budget"}, 10_000)
    softmax = next(line for line in table.splitlines() if line.startswith("| softmax"))
    assert (
        "500 / 10000" in softmax and "2.1000" in softmax and "2.0000 (250)" in softmax and "1.6204" in softmax
    )
    assert "1,200" in softmax
    assert next(line for line in table.splitlines() if line.startswith("| beta |")).count("-") >= 4
