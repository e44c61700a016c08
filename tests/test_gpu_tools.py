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
import torch

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


def _data(**constants) -> str:
    """A specialization as Triton serializes it: constexprs by position, and the launch options."""
    names = list(constants)
    return json.dumps({
        "name": "m.kernel",
        "signature": {"Q": "*bf16", "T_Q": "i32"} | dict.fromkeys(names, "constexpr"),
        "constant_keys": [[2 + i] for i in range(len(names))],
        "constant_vals": list(constants.values()),
        "options": {"num_warps": 8, "num_stages": 2},
    })  # fmt: skip


def _spec(usage: dict, kernel: str = "_fwd_kernel", dtype: str = "bfloat16", d: int = 128, **constants):
    """A compiled flash specialization at head dim ``d`` with ``usage`` as ptxas reported it."""
    case = gpu_static.Case("flash", "forward", "r", "softmax", dtype, d, d)
    data = _data(BLOCK_M=16, BLOCK_N=16, BLOCK_D=d, BLOCK_DV=d, TANGENT=False, **constants)
    return gpu_static.Spec(f"m.{kernel}", data, case, usage=usage)


FINE = {"registers": 255, "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 1024}


def test_constexprs_are_read_from_the_specialization():
    spec = _spec(FINE, d=64, NORM=3)
    assert spec.constants == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 64, "BLOCK_DV": 64, "TANGENT": False,
                              "NORM": 3}  # fmt: skip
    assert gpu_static._tiles(spec) == "BLOCK_M=16 BLOCK_N=16 warps=8 stages=2"
    # the tile-table row: kind (tangent_ in front when TANGENT), operand width, the row's largest d
    assert gpu_static.tile_row(spec) == ("fwd", False, 64)
    assert gpu_static.tile_row(_spec(FINE, "_dq_kernel", "float32", 72)) == ("dq", True, 128)
    assert gpu_static.tile_row(_spec(FINE, "_dkdv_kernel", d=256)) == ("dkdv", False, 256)
    tangent = _spec(FINE, "_dkdv_kernel", d=128)
    tangent.data = _data(BLOCK_D=128, BLOCK_DV=128, TANGENT=True)
    assert gpu_static.tile_row(tangent) == ("tangent_dkdv", False, 128)
    assert gpu_static.tile_row(_spec(FINE, "_beta_decode_kernel")) is None


def test_verdicts_fail_spills_shared_memory_and_errors():
    assert gpu_static._verdict(_spec(FINE | {"shared": gpu_static.SHARED_LIMIT_BYTES})) == "ok"
    assert gpu_static._verdict(_spec(FINE | {"spill_stores": 8})) == "FAIL (spills 8/0 B)"
    assert gpu_static._verdict(_spec(FINE | {"spill_loads": 4})) == "FAIL (spills 0/4 B)"
    too_much = _spec(FINE | {"shared": gpu_static.SHARED_LIMIT_BYTES + 1024})
    assert gpu_static._verdict(too_much) == "FAIL (shared 228 KiB > 227 KiB)"
    assert gpu_static._verdict(_spec({"error": "CompilationError: x"})) == "FAIL (CompilationError: x)"


def test_known_rows_are_reported_and_must_keep_failing():
    kind, wide, d = ("jvp", True, 128)
    assert (kind, wide, d) in gpu_static.KNOWN_PROBLEM_ROWS
    spilling = _spec(FINE | {"spill_stores": 500}, "_jvp_kernel", "float32", d)
    assert gpu_static._verdict(spilling) == "known: spills 500/0 B"
    # the same spill in bf16 is another tile row, not a known one
    assert gpu_static._verdict(_spec(FINE | {"spill_stores": 500}, "_jvp_kernel", "bfloat16", d)).startswith(
        "FAIL"
    )
    # a compile error is never known
    assert gpu_static._verdict(_spec({"error": "E"}, "_jvp_kernel", "float32", d)) == "FAIL (E)"
    # the chunked beta kernels are known by kernel, operand width and head dim
    linear = _spec(FINE | {"spill_stores": 56}, "_beta_chunk_bwd_kernel", "float16", 24)
    linear.case = gpu_static.Case("linear", "backward", "r", "beta", "float16", 24, 24)
    assert gpu_static.known_key(linear) == ("_beta_chunk_bwd_kernel", False, 24)
    assert gpu_static._verdict(linear) == "known: spills 56/0 B"
    linear.case = gpu_static.Case("linear", "backward", "r", "beta", "float16", 32, 32)
    assert gpu_static._verdict(linear) == "FAIL (spills 56/0 B)"
    # a known row where nothing fails any more, or that no case checks, is stale
    fixed = _spec(FINE, "_jvp_kernel", "float32", d)
    stale = gpu_static.stale_known_rows([spilling])
    assert (kind, wide, d) not in stale and len(stale) == len(gpu_static.KNOWN_PROBLEMS) - 1
    assert (kind, wide, d) in gpu_static.stale_known_rows([fixed])


def test_covering_set_follows_the_registry_and_the_tile_table():
    from normattn.ops.triton_utils import block

    cases = gpu_static.covering_set()
    flash = [c for c in cases if c.family == "flash"]
    kernel_names = {name for name, spec in normattn.NORMALIZERS.items() if spec.kernel is not None}
    assert kernel_names >= {"softmax", "beta", "sigmoid", "softpick"}
    second_order = set().union(*(gpu_static.second_order_features(n) for n in kernel_names))
    assert "seed" not in second_order and {"mask", "dropout", "gqa"} <= second_order
    for op in gpu_static.FLASH_OPS:
        of_op = [c for c in flash if c.op == op]
        assert {c.normalizer for c in of_op} >= kernel_names, op
        assert {c.dtype for c in of_op} == set(gpu_static.DTYPES), op
        features = second_order if op == "tangent" else set(gpu_static.FEATURES)
        assert {f for c in of_op for f in c.features} == features, op
        # a padded head dim (one that ends no tile row) in each row, and a value dim of its own
        between = {c.head_dim for c in of_op if c.rule == "head dim between rows"}
        assert {64 if d <= 64 else block(d) for d in between} == {64, 128, 256}, op
        assert not between & {64, 128, 256}, op
        assert any(c.value_dim < c.head_dim for c in of_op), op
    # between them, the ops see every head dim the issue names
    assert {c.head_dim for c in flash} >= set(gpu_static.HEAD_DIMS) >= {16, 24, 72, 80, 256}
    # sinks only where the registry allows them, the seed gradient only for beta
    assert all(c.normalizer == "softmax" for c in flash if "sinks" in c.features)
    assert all(c.normalizer == "beta" for c in flash if "seed" in c.features)
    # every tile-table row at its largest head dim, with every feature its normalizer takes
    worst = {(c.op, c.dtype, c.head_dim): c for c in flash if c.rule.startswith("tile row") and c.features}
    ops = {"fwd": "forward", "jvp": "jvp", "dkdv": "backward", "dq": "backward"}
    ops |= {"tangent_dkdv": "tangent", "tangent_dq": "tangent"}
    for (kind, wide), rows in _GPU_TILES.items():
        for max_d, _ in rows:
            for dtype in ("float32", "float64") if wide else ("bfloat16",):
                case = worst[(ops[kind], dtype, max_d)]
                takes = gpu_static.second_order_features if kind.startswith("tangent") else None
                want = (takes or gpu_static.accepted_features)(case.normalizer)
                assert set(case.features) == set(want), case
    # the other kernel families: both linear modes, every decode and row dtype
    linear = [c for c in cases if c.family == "linear"]
    assert {(c.op, c.causal) for c in linear} >= {(op, m) for op in gpu_static.LINEAR_OPS for m in (0, 1)}
    assert {c.dtype for c in cases if c.family == "decode"} == set(gpu_static.DTYPES)
    assert {(c.op, c.dtype) for c in cases if c.family == "rows"} == {
        (op, dtype) for op in ("max", "softmax") for dtype in gpu_static.DTYPES
    }


def test_sinks_and_seed_are_asked_of_the_library():
    softmax, beta = gpu_static.accepted_features("softmax"), gpu_static.accepted_features("beta")
    assert "sinks" in softmax and "seed" not in softmax
    assert "seed" in beta and "sinks" not in beta


def _run_tool(code: str) -> subprocess.CompletedProcess:
    """``code`` in a process of its own: the kernels must be real JIT functions, not the interpreter's."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_recording_launches_every_kernel_with_the_library_tiles():
    result = _run_tool("import sys; from tools import gpu_static; sys.exit(gpu_static.main(['--list']))")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # every Triton kernel of normattn.ops is launched by some case
    names = {name.rsplit(".", 1)[1] for name in _library_kernel_names()}
    assert len(names) >= 14 and {line.split()[0] for line in lines[1:]} == names
    # the forward kernel at d=128 in bf16 gets the table's fwd tiles, as a GPU launch would
    tiles = next(t for max_d, t in _GPU_TILES[("fwd", False)] if max_d >= 128)
    line = next(x for x in lines if x.startswith("_fwd_kernel flash forward") and " bfloat16 d=128 " in x)
    assert line.endswith(
        f"BLOCK_M={tiles.block_m} BLOCK_N={tiles.block_n} warps={tiles.num_warps} stages={tiles.num_stages}"
    )


def _library_kernel_names() -> list[str]:
    result = _run_tool(
        "from tools import gpu_static; gpu_static.use_sm90_driver(); "
        "print(*gpu_static.library_kernels(), sep='\\n')"
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


# main() end to end with a stand-in compiler: usage that is fine except on the known rows (where the
# real compile spills), and, with --fresh, one unexpected spill.
FAKE_COMPILE = """
import sys
from tools import gpu_static as g

def fake_compile(specs, jobs):
    spill = "--fresh" in sys.argv
    for spec in specs:
        if not spec.usage:
            known = g.known_key(spec) in g.KNOWN_PROBLEMS
            stores = 8 if known or (spill and spec.kernel.endswith("_beta_decode_kernel")) else 0
            spec.usage = {"registers": 99, "stack": stores, "spill_stores": stores, "spill_loads": 0,
                          "shared": 1024, "compile_s": 0.0}
            print("fake-compiled", spec.kernel)

g.compile_all = fake_compile
sys.exit(g.main(sys.argv[1:]))
"""


def test_main_fails_on_an_unexpected_spill_and_reuses_its_table(tmp_path):
    def main(*args: str) -> subprocess.CompletedProcess:
        script = tmp_path / "fake.py"
        script.write_text(FAKE_COMPILE)
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, str(script), "--out", str(tmp_path / "out"), "--jobs", "1", *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first = main()
    assert first.returncode == 0, first.stdout + first.stderr
    table = pd.read_csv(tmp_path / "out" / "static.csv")
    assert len(table) == first.stdout.count("fake-compiled ") > 100
    assert set(table["verdict"].str.split(":").str[0]) == {"ok", "known"}
    assert {"kernel", "normalizer", "dtype", "head_dim", "variant", "registers", "spill_stores",
            "shared_bytes", "verdict", "compiler", "key"} <= set(table.columns)  # fmt: skip
    text = (tmp_path / "out" / "static.md").read_text()
    assert "- **compiler**: Triton " in text and "`make gpu-static`" in text
    # a second run reuses every row, compiles nothing and leaves both files as they were
    md_before = text
    second = main()
    assert second.returncode == 0 and "fake-compiled" not in second.stdout, second.stdout + second.stderr
    assert "unchanged" in second.stdout and (tmp_path / "out" / "static.md").read_text() == md_before
    # an unexpected spill fails the run, and says where
    spilled = main("--fresh")
    assert spilled.returncode == 1 and "FAIL: _beta_decode_kernel" in spilled.stdout
    table = pd.read_csv(tmp_path / "out" / "static.csv")
    decode = table[table["kernel"] == "_beta_decode_kernel"]
    assert len(decode) == 4 and decode["verdict"].str.startswith("FAIL (spills 8/0 B)").all()
    assert "## Failures (4)" in (tmp_path / "out" / "static.md").read_text()


def test_reuse_takes_only_rows_of_the_same_key(tmp_path):
    compiler = "triton 9, ptxas 9, sm_90"
    a, b = _spec({}), _spec({}, d=64)
    rows = gpu_static.table_rows([_spec(FINE | {"registers": 77, "compile_s": 3.0})], compiler)
    (tmp_path / "static.csv").write_text(gpu_static.render_csv(rows))
    gpu_static.reuse([a, b], tmp_path / "static.csv", compiler)
    assert a.reused and a.usage["registers"] == 77 and not b.reused and not b.usage
    c = _spec({})
    gpu_static.reuse([c], tmp_path / "static.csv", "triton 10, ptxas 9, sm_90")  # another compiler
    assert not c.reused


def test_table_lists_failures_first(tmp_path):
    ok = _spec({"registers": 100, "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 1024})
    bad = _spec({"registers": 255, "stack": 8, "spill_stores": 8, "spill_loads": 8, "shared": 1024}, d=64)
    rows = gpu_static.table_rows([ok, bad], "triton 3.9.0, ptxas x, sm_90")
    header = {"failures": "1", "date": "today"}
    assert gpu_static.write_table(rows, tmp_path, header, missing=["m._new_kernel"])
    text = (tmp_path / "static.md").read_text()
    assert text.index("## Kernels no case launches") < text.index("## Failures (1)") < text.index("## Every")
    # head dim 64 sorts first (by label); the verdicts, as the CSV holds them
    assert pd.read_csv(tmp_path / "static.csv")["verdict"].tolist() == ["FAIL (spills 8/8 B)", "ok"]
    assert gpu_static.summary(rows)["spilling specializations (known ones included)"] == "1"
    # only the volatile header lines differ: nothing is rewritten; a changed row is
    assert not gpu_static.write_table(rows, tmp_path, header | {"date": "tomorrow"}, ["m._new_kernel"])
    rows[0]["registers"] = 254
    assert gpu_static.write_table(rows, tmp_path, header, ["m._new_kernel"])


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
    def row(stage, backend, pass_name, T, median_ms, speedup=float("nan"), tflops=float("nan"), **more):
        case = {"stage": stage, "backend": backend, "pass": pass_name, "T": T, "status": "ok"}
        return case | {"median_ms": median_ms, "speedup_vs_baseline": speedup, "tflops": tflops} | more

    return pd.DataFrame([
        row("flash", "triton", "fwd", 8192, 2.0, speedup=1.1, tflops=500.0),
        row("flash", "sdpa-flash", "fwd", 8192, 2.2),
        row("flash", "triton", "fwd+bwd", 8192, 8.0),
        row("flash", "sdpa-flash", "fwd+bwd", 8192, 6.2),
        row("flash", "triton", "jvp", 8192, 3.0, speedup=3.0),
        row("flash", "triton", "fwd", 1024, 1.0, speedup=0.1),  # another T: not read
        row("linear", "triton-linear", "fwd+bwd", 16384, 1.0, speedup=6.0),
        row("decode", "beta_decode", "decode", 32768, 0.01, speedup=20.0),
        row("window", "triton", "fwd+bwd", 16384, 1.0, normalizer="beta", window_vs_causal_calls=1.0),
        row("window", "triton", "fwd+bwd", 16384, 1.0, normalizer="softmax", window_vs_causal_calls=2.0),
    ])  # fmt: skip


def test_targets_are_read_at_their_sequence_length():
    values = gpu_check.measured_targets(_bench_rows(), 8192, 16384, 16384)
    # backward: (6.2 - 2.2) / (8.0 - 2.0) for SDPA over ours; window: softmax's, 2x the 16 calls' time
    assert values == pytest.approx([1.1, 500.0, 4.0 / 6.0, 3.0, 6.0, 20.0, 0.5])
    verdicts = [gpu_check.verdict(v, t.required) for v, t in zip(values, gpu_check.TARGETS, strict=True)]
    assert verdicts == ["met", "met", "missed by 17%", "missed by 14%", "met", "met", "missed by 25%"]
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
    stand_in = gpu_check.find_data(True, tmp_path / "runs" / "not-made-yet")
    assert stand_in is not None and len(stand_in.read_text()) > 1000
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / gpu_check.DATA_NAME).write_text("text")
    monkeypatch.setenv("NORMATTN_DATA_DIR", str(tmp_path / "data"))
    assert gpu_check.find_data(False, tmp_path) == tmp_path / "data" / gpu_check.DATA_NAME


def test_output_files_fit_what_a_device_call_returns():
    assert len(gpu_check.OUT_FILES) <= 8
    assert all(name.replace(".", "").replace("_", "").isalnum() for name in gpu_check.OUT_FILES)


# -- gpu_experiment -----------------------------------------------------------------------------


def test_a_run_with_a_checkpoint_is_resumed_where_compare_finds_it(tmp_path):
    command = gpu_experiment.train_command("beta", tmp_path, None, None, dry_run=False)
    assert "--resume" not in command and command[command.index("--attention") + 1] == "beta"
    # the folder `normattn compare --out tmp_path` trains (and resumes) beta's run in
    folder = tmp_path / "beta" / "seed-1337"
    assert command[command.index("--out") + 1] == str(folder) == str(gpu_experiment.run_dir(tmp_path, "beta"))
    folder.mkdir(parents=True)
    (folder / "ckpt.pt").write_bytes(b"")
    assert "--resume" in gpu_experiment.train_command("beta", tmp_path, None, None, dry_run=False)
    # compare gets the same overrides as the trainers, so that it resumes their runs
    train = gpu_experiment.train_command("beta", tmp_path, Path("d.txt"), 4, dry_run=True)
    compare = gpu_experiment.compare_command(tmp_path, Path("d.txt"), 4, dry_run=True)
    assert (
        "--resume" in compare
        and train[train.index("--no-progress") :] == compare[compare.index("--no-progress") :]
    )


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


# -- tests/gpu ----------------------------------------------------------------------------------


def test_gpu_suite_covers_every_kernel_normalizer_dtype_and_feature():
    """What ``make gpu-check`` runs on a GPU (``tests/gpu -m "not slow"``, collected here without the
    dry run's sizes): every normalizer causal and full in bf16 and fp16 at d = 64 and 128, an ugly
    shape with Tq != Tk, each feature, the linear kernels, the decode step and the row kernels."""
    env = {k: v for k, v in os.environ.items() if k != "NORMATTN_GPU_DRY_RUN"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/gpu", "--collect-only", "-q", "-m", "not slow",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    ids = {line.split("/")[-1] for line in result.stdout.splitlines() if "::" in line}
    normalizers = [name for name, spec in normattn.NORMALIZERS.items() if spec.kernel is not None]
    assert {"softmax", "beta", "sigmoid", "softpick"} <= set(normalizers)
    flash, linear = "test_flash_gpu.py::", "test_beta_linear_gpu.py::"
    for name in normalizers:
        for mode in ("full", "causal"):
            for d in (64, 128):
                for dtype in ("bfloat16", "float16"):
                    assert f"{flash}test_flash_rule[{name}-{mode}-{d}-{dtype}]" in ids
                    assert f"{linear}test_flash_rule[{mode}-{d}-{dtype}-exact]" in ids
            assert f"{flash}test_flash_rule_ugly_shape[{name}-{mode}]" in ids
        for feature in ("gqa", "mask", "dropout", "window"):
            assert f"{flash}test_feature[{feature}-{name}]" in ids
    assert {f"{flash}test_feature[sinks-softmax]", f"{flash}test_feature[seed-beta]"} <= ids
    assert f"{flash}test_every_feature_at_once[softmax]" in ids  # sinks, GQA, mask, dropout, window
    assert any(i.startswith(f"{linear}test_decode_step_matches_torch_recurrence[") for i in ids)
    for test in ("test_max_reduce_matches_torch", "test_softmax_rows_match_torch"):
        assert {i for i in ids if i.startswith(f"test_rows_gpu.py::{test}[")}, test
    # the shapes behind the ids: Tq != Tk and a padded head dim with a value dim of its own
    flash_tests = _gpu_test_module("test_flash_gpu")
    _, _, _, t_q, t_k, d, dv = flash_tests.UGLY
    assert t_q != t_k and d not in (64, 128) and dv != d and t_q % 16 and t_k % 16
    ugly_linear = [i for i in ids if i.startswith(f"{linear}test_flash_rule_ugly_shape[")]
    shapes = [tuple(map(int, i.split("[")[1].rstrip("]").split("x"))) for i in ugly_linear]
    assert {s[2] < s[3] for s in shapes} == {True, False}  # Tq < Tk and Tq > Tk


def _gpu_test_module(name: str):
    """A module of tests/gpu, imported under a name of its own (its ``support`` import included)."""
    import importlib.util

    folder = str(ROOT / "tests" / "gpu")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"_gpu_tools_{name}", f"{folder}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def test_the_flash_rule_covers_the_jvp_and_its_gradient():
    """check_flash_rule compares every derivative the kernels compute, second order by default."""
    support = _gpu_test_module("support")
    assert {"out", "dq", "dk", "dv", "jvp"} == set(support.FIRST_ORDER)
    assert {"jvp.dq", "jvp.dk", "jvp.dv", "jvp.dqd", "jvp.dkd", "jvp.dvd"} == set(support.SECOND_ORDER)
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64) for _ in "qkv")
    result = support.derivatives(
        lambda q, k, v: normattn.attention(q, k, v, backend="reference"),
        (q, k, v), torch.randn(1, 2, 8, 16, dtype=torch.float64), [torch.randn_like(x) for x in (q, k, v)],
    )  # fmt: skip
    assert set(result) == set(support.FIRST_ORDER + support.SECOND_ORDER)
