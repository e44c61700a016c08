"""``make gpu-static``: compile the library's Triton kernels for sm_90 on this CPU machine and check
each specialization's registers, spills and shared memory against the H100/H200 limits.

No GPU is needed. A stand-in driver tells Triton the current target is ``cuda:90`` (what an H100 or
H200 reports); the library's own launchers then run on meta tensors that report ``is_cuda``, so
every launch argument, constexpr, tile and launch option is the one a real GPU call would get
(``_Launch``, ``triton_utils.tiles``, ``block``, ``dot_precision``, the registry's
``Normalizer.kernel`` ids, the public API's checks). Each launch is recorded instead of compiled
(Triton's ``jit_cache_hook``), the distinct specializations are compiled in parallel (``--jobs``)
with Triton's own ``preload``, and ``ptxas -v``'s report of that very compile gives registers,
spill stores and loads; Triton's metadata gives the dynamic shared memory.

Which calls: ``covering_set`` (its docstring says how they are chosen). Every ``*_kernel`` of
``normattn.ops`` must be launched by some call, so a new kernel without a case fails the check.

Fails (exit 1) on any spill or any shared memory above 227 KiB (the most one block may opt into on
an H100 or H200) outside ``KNOWN_PROBLEMS``, on a known problem that no longer fails, on a compile
error, or on a kernel no case launches. Writes ``static.md`` and ``static.csv`` to ``--out``.

Reuse: a row of the earlier ``static.csv`` whose key is the spec's (``Spec.key``: Triton's hash of the
kernel's source and everything it calls, line numbers included; the specialization with its tiles,
constexprs and launch options; the Triton and ptxas versions) gives its usage without a compile, so
``make gpu-static`` (and CI) compiles only what changed; ``--fresh`` compiles everything. A run whose
table says what the earlier one said leaves both files untouched. Triton 3.9's bundled ptxas (CUDA
13) compiles here; the lent GPU machine has Triton 3.6, whose ptxas may allocate registers
differently.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import datetime
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHARED_LIMIT_BYTES = 227 * 1024
COMPUTE_CAPABILITY = 90
# Head dims 16..256: the tile rows' ends (64, 128, 256) and those between, whose tiles are padded.
HEAD_DIMS = (16, 24, 32, 64, 72, 80, 96, 128, 192, 256)
BASE_HEAD_DIM, BASE_DTYPE, BASE_NORMALIZER = 128, "bfloat16", "softmax"
DTYPES = ("bfloat16", "float16", "float32", "float64")
# The dtypes of the tile table's 4/8-byte rows, each checked at every such row's end.
WIDE_DTYPES = ("float32", "float64")
# Launch shapes: a bench-sized call (B, H, T), 4 query heads per key/value head when grouped.
BATCH, HEADS, KV_HEADS, TOKENS = 4, 16, 4, 4096
DROPOUT_P = 0.1
# Row-kernel shapes (rows, row length): stacked short rows, one tile per row, several tiles per row.
ROW_SHAPES = ((65536, 7), (16384, 4096), (4096, 32768))
FLASH_OPS = ("forward", "jvp", "backward", "tangent")
# The tile-table kinds (``triton_utils.tiles``) of the kernels each flash op launches.
FLASH_KINDS = {
    "forward": ("fwd",),
    "jvp": ("jvp",),
    "backward": ("dkdv", "dq"),
    "tangent": ("tangent_dkdv", "tangent_dq"),
}
# The flash kernels and their tile-table kind (with ``tangent_`` in front when TANGENT is on).
FLASH_KERNELS = {"_fwd_kernel": "fwd", "_jvp_kernel": "jvp", "_dkdv_kernel": "dkdv", "_dq_kernel": "dq"}
# Rows of the tile table (kernel kind, 4/8-byte operands, the row's largest head dim) that no tile
# the table may hold fixes under Triton 3.9 for sm_90: tried down to 16 x 16 with 2 to 16 warps and
# 1 to 3 stages, with every feature on (docs/results/gpu-static/tiles.md). Their kernels need a
# change (fewer tiles alive at once, or the head dim in chunks), not a tile. ("dq", True, 128): fp32
# is clean at 16 x 32, but fp64 sigmoid spills 28 B there, and every smaller tile spills for some
# normalizer in fp32 or fp64. Their specializations read "known: ..." and do not fail the check; a
# row here where nothing fails any more does.
KNOWN_PROBLEM_ROWS = {
    ("tangent_dkdv", False, 256), ("tangent_dq", False, 256),
    ("fwd", True, 256), ("jvp", True, 128), ("jvp", True, 256), ("dq", True, 128), ("dkdv", True, 256),
    ("dq", True, 256), ("tangent_dkdv", True, 128), ("tangent_dkdv", True, 256),
    ("tangent_dq", True, 128), ("tangent_dq", True, 256),
}  # fmt: skip
# The chunked beta kernels (kernel, 4/8-byte operands, head dim) that spill with the launch shapes of
# triton_chunk.FWD_LAUNCH/BWD_LAUNCH: the causal backward at head dims padded within a feature tile
# (2-byte at 24 and 72, 4/8-byte at 40: 16 to 170 B at 255 registers; dims that fill their tiles,
# 16 to 256, are clean) and the fp32 forward at 72 (60 B). Narrower tiles or fewer stages move the
# spill to other dims rather than remove it.
KNOWN_LINEAR_PROBLEMS = {
    ("_beta_chunk_bwd_kernel", False, 24), ("_beta_chunk_bwd_kernel", False, 72),
    ("_beta_chunk_bwd_kernel", True, 40), ("_beta_chunk_fwd_kernel", True, 72),
}  # fmt: skip
KNOWN_PROBLEMS = KNOWN_PROBLEM_ROWS | KNOWN_LINEAR_PROBLEMS
LINEAR_OPS = ("forward", "backward", "jvp")
# Feature names of a call; which normalizer accepts "sinks" and "seed" is asked of the library.
FEATURES = ("mask", "dropout", "gqa", "sinks", "seed")
DEFAULT_OUT = Path("docs/results/gpu-static")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Case:
    """One launcher call: which kernels it launches follows from the library, not from here."""

    family: str  # flash, linear, decode or rows
    op: str  # flash: forward, jvp, backward, tangent, tangent-primal; linear: forward, backward, jvp; ...
    rule: str  # the covering rule that chose it
    normalizer: str = ""
    dtype: str = BASE_DTYPE
    head_dim: int = BASE_HEAD_DIM
    value_dim: int = BASE_HEAD_DIM
    features: tuple[str, ...] = ()
    causal: bool = True
    rows: tuple[int, int] = (0, 0)

    @property
    def dims(self) -> str:
        """``d`` or ``d/dv`` (query/key and value head dims); empty for the row kernels."""
        if self.family == "rows":
            return ""
        return str(self.head_dim) + (f"/{self.value_dim}" if self.value_dim != self.head_dim else "")

    @property
    def variant(self) -> str:
        """What else the call switches on: its features, causal or full (linear), the row shape."""
        parts = []
        if self.family == "linear":
            parts.append("causal" if self.causal else "full")
        if self.family == "rows":
            parts.append("x".join(map(str, self.rows)))
        return "+".join(parts + list(self.features)) or "-"

    @property
    def label(self) -> str:
        parts = [self.family, self.op, self.normalizer, self.dtype, f"d={self.dims}" if self.dims else ""]
        return " ".join([p for p in parts if p] + ([] if self.variant == "-" else [self.variant]))


@dataclass
class Spec:
    """One distinct kernel specialization: Triton's serialized compile request and its first case."""

    kernel: str
    data: str  # Triton's specialization_data JSON (what ``JITFunction.preload`` takes)
    case: Case
    source: str = ""  # Triton's hash of the kernel's source and everything it calls
    cases: int = 1  # how many cases launched this same specialization
    usage: dict = field(default_factory=dict)
    reused: bool = False  # usage read from an earlier table instead of compiled

    def key(self, compiler: str) -> str:
        """What decides the compile's output: source, specialization, options, compiler versions."""
        digest = hashlib.sha256(f"{compiler}|{self.source}|{_without_paths(self.data)}".encode())
        return digest.hexdigest()[:24]

    @property
    def constants(self) -> dict:
        """The kernel's named constexprs (integer arguments Triton specialised to 1 left out)."""
        data = json.loads(self.data)
        names = list(data["signature"])
        declared = {name for name, kind in data["signature"].items() if kind == "constexpr"}
        values = {names[key[0]]: value for key, value in zip(data["constant_keys"], data["constant_vals"])}
        return {name: value for name, value in values.items() if name in declared and name.isupper()}

    @property
    def options(self) -> dict:
        return json.loads(self.data)["options"]


# --------------------------------------------------------------------------------------------
# The covering set
# --------------------------------------------------------------------------------------------


def accepted_features(normalizer: str) -> tuple[str, ...]:
    """The features a normalizer takes, asked of the public API (a refusal is a ValueError)."""
    import torch

    import normattn

    x = torch.zeros(1, 2, 4, 16)
    accepted = []
    for feature in FEATURES:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # grad="seed" warns that it is a shortcut
                normattn.attention(
                    x, x[:, :1], x[:, :1], backend="torch", **_feature_options(feature, x, normalizer)
                )
        except ValueError:
            continue
        accepted.append(feature)
    return tuple(accepted)


def _feature_options(feature: str, q, normalizer: str) -> dict:
    """``normattn.attention`` keywords switching one feature on (``q`` gives shapes and device)."""
    import torch

    options = {"normalizer": normalizer, "enable_gqa": True}
    if feature == "mask":
        options["attn_mask"] = torch.ones(1, 1, q.shape[2], q.shape[2], dtype=torch.bool, device=q.device)
    elif feature == "dropout":
        options["dropout_p"] = DROPOUT_P
    elif feature == "sinks":
        options["sinks"] = torch.zeros(q.shape[1], device=q.device)
    elif feature == "seed":
        options["grad"] = "seed"
    return options


def second_order_features(normalizer: str) -> tuple[str, ...]:
    """The features the gradient of a JVP's output takes (the seed gradient has no second order)."""
    import torch

    import normattn

    x = torch.zeros(1, 2, 4, 16)
    allowed = []
    for feature in accepted_features(normalizer):
        options = _feature_options(feature, x, normalizer)

        def attend(q, k, v, options=options):
            return normattn.attention(q, k, v, backend="torch", **options)

        primals = (x, x[:, :1], x[:, :1])
        tangents = tuple(p.clone().requires_grad_() for p in primals)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, out_dot = torch.func.jvp(attend, primals, tangents)
                torch.autograd.grad(out_dot.sum(), tangents)
        except NotImplementedError:
            continue
        allowed.append(feature)
    return tuple(allowed)


def tile_rows(op: str) -> dict[bool, list[int]]:
    """Per operand width (False: 2-byte dtypes, True: 4 and 8), the largest head dim of each row of
    the tile table that the kernels of flash ``op`` use."""
    from normattn.ops.triton_utils import _GPU_TILES

    rows: dict[bool, set[int]] = {False: set(), True: set()}
    for kind in FLASH_KINDS[op]:
        for wide in rows:
            rows[wide].update(max_d for max_d, _ in _GPU_TILES[(kind, wide)])
    return {wide: sorted(dims) for wide, dims in rows.items()}


def between_head_dims() -> list[list[int]]:
    """The head dims of ``HEAD_DIMS`` that end no tile row, grouped by padded width class (up to 64,
    up to 128, up to 256): the padded tiles whose columns are masked."""
    from normattn.ops.triton_utils import block

    classes: dict[int, list[int]] = {}
    row_ends = {d for op in FLASH_OPS for dims in tile_rows(op).values() for d in dims}
    for d in HEAD_DIMS:
        if d not in row_ends:
            classes.setdefault(next(end for end in sorted(row_ends) if block(d) <= end), []).append(d)
    return [classes[end] for end in sorted(classes)]


def covering_set() -> list[Case]:
    """The calls whose kernels are compiled, chosen from the library's tables.

    Flash kernels, per op (forward, JVP, backward, gradient of the JVP's output): the worst case of
    every row of the tile table (``triton_utils._GPU_TILES``) the op's kernels use, every feature a
    normalizer takes at once (mask, dropout, grouped-query heads, and sinks or the seed gradient
    where the library accepts them) at the row's largest head dim, 2-byte rows in bf16 and 4/8-byte
    rows in float32 and in float64; then one head dim between the rows' ends per padded
    width (16/24/32, 72/80/96 with a value dim of 64, 192; a different one per op), without
    features, the first in fp16. The registry's normalizers with Triton helpers take turns over
    these cases, so every op sees each of them, with features and without, and every dtype. Once:
    the gradient of the JVP's output without the tangents' gradients. The band (causal, windows) is
    a run-time argument: no case of its own. Linear-time beta, per op: bf16 causal at d=128, fp16
    full attention at d=80 (value dim 64), bf16 causal at d=24 and 72 (padded within a feature
    tile), fp32 causal at d=256 with the seed gradient where it applies and at d=40 and 72, fp64
    causal at d=24 and full at d=128. Decode: d = 64 (bf16), 80/40 (fp16), 128 (fp64), 256 (fp32). Row
    kernels: each row shape in fp32, each other dtype at the several-tile shape.
    """
    from normattn.normalizers import NORMALIZERS
    from normattn.ops.triton_utils import block

    names = [name for name, spec in NORMALIZERS.items() if spec.kernel is not None]
    features = {name: accepted_features(name) for name in names}
    second_order = {name: second_order_features(name) for name in names}
    between = between_head_dims()
    cases: list[Case] = []
    for index, op in enumerate(FLASH_OPS):
        takes = second_order if op == "tangent" else features
        turn = iter(names * 4)  # the normalizers in turn over the op's cases
        rows = tile_rows(op)
        for wide, dims in rows.items():
            for d in dims:
                for dtype in WIDE_DTYPES if wide else (BASE_DTYPE,):
                    name = next(turn)
                    rule = f"tile row ({'4/8' if wide else '2'}-byte, d <= {d}), all features"
                    shape = {"dtype": dtype, "head_dim": d, "value_dim": d}
                    cases.append(Case("flash", op, rule, name, features=takes[name], **shape))
        for position, dims in enumerate(between):
            d = dims[index % len(dims)]
            dtype = "float16" if position == 0 else BASE_DTYPE
            value_dim = 64 if block(d) == 128 else d
            shape = {"dtype": dtype, "head_dim": d, "value_dim": value_dim}
            cases.append(Case("flash", op, "head dim between rows", next(turn), **shape))
    cases.append(Case("flash", "tangent-primal", "once", BASE_NORMALIZER))
    for op in LINEAR_OPS:
        seed = () if op == "forward" else ("seed",)
        cases += [
            Case("linear", op, "base", "beta"),
            Case("linear", op, "fp16, full, masked dims", "beta", "float16", 80, 64, causal=False),
            Case("linear", op, "padded in one tile", "beta", "bfloat16", 24, 24),
            Case("linear", op, "padded, several tiles", "beta", "bfloat16", 72, 72),
            Case("linear", op, "fp32, widest, seed", "beta", "float32", 256, 256, features=seed),
            Case("linear", op, "fp32, padded", "beta", "float32", 40, 40),
            Case("linear", op, "fp32, padded, several tiles", "beta", "float32", 72, 72),
            Case("linear", op, "fp64, narrow", "beta", "float64", 24, 24),
            Case("linear", op, "fp64, full", "beta", "float64", 128, 128, causal=False),
        ]
    for d, dv, dtype in (
        (64, 64, "bfloat16"),
        (80, 40, "float16"),
        (128, 128, "float64"),
        (256, 256, "float32"),
    ):
        cases.append(Case("decode", "step", "every width and dtype", "beta", dtype, d, dv))
    for op in ("max", "softmax"):
        cases += [Case("rows", op, "every row shape", dtype="float32", rows=shape) for shape in ROW_SHAPES]
        others = [dtype for dtype in DTYPES if dtype != "float32"]
        cases += [Case("rows", op, "every dtype", dtype=dtype, rows=ROW_SHAPES[-1]) for dtype in others]
    return list(dict.fromkeys(cases))


# --------------------------------------------------------------------------------------------
# Recording the launches of a case
# --------------------------------------------------------------------------------------------


class _Sm90Driver:
    """What Triton asks of the active driver to specialize and compile (never to launch)."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", COMPUTE_CAPABILITY, 32)


def use_sm90_driver() -> None:
    """Make Triton compile for sm_90 here; it must import the kernels un-interpreted."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("gpu_static compiles real kernels: unset TRITON_INTERPRET")
    # Triton 3.9 warns that it keeps FP fusion on by default; the GPU run keeps the same default.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from triton.runtime.driver import driver

    driver.set_active(_Sm90Driver())


def kernel_modules() -> list:
    """Every module of ``normattn.ops`` (the kernels are found by name in them)."""
    import normattn.ops

    names = [info.name for info in pkgutil.walk_packages(normattn.ops.__path__, "normattn.ops.")]
    return [importlib.import_module(name) for name in names]


def library_kernels() -> dict[str, object]:
    """``module.name -> JITFunction`` of every ``*_kernel`` the ops modules define."""
    from triton.runtime.jit import JITFunction

    kernels = {}
    for module in kernel_modules():
        for name, value in vars(module).items():
            if (
                name.endswith("_kernel")
                and isinstance(value, JITFunction)
                and value.fn.__module__ == module.__name__
            ):
                kernels[f"{module.__name__}.{name}"] = value
    return kernels


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](...)`` records the specialization."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)


@contextlib.contextmanager
def recording(kernels: dict[str, object]) -> Iterator[list[tuple[str, str]]]:
    """Replace every kernel by a recorder; yields the list of ``(kernel, specialization JSON)``."""
    from triton import knobs

    launches: list[tuple[str, str]] = []

    def hook(*, fn, compile, **_) -> bool:
        launches.append((f"{fn.module}.{fn.name}", compile["specialization_data"]))
        return True  # recorded: skip the compile

    previous_hook, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    modules = {name: importlib.import_module(name.rsplit(".", 1)[0]) for name in kernels}
    for name, kernel in kernels.items():
        setattr(modules[name], name.rsplit(".", 1)[1], _Recorder(kernel))
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        for name, kernel in kernels.items():
            setattr(modules[name], name.rsplit(".", 1)[1], kernel)


class _CudaMeta(torch.Tensor):
    """A meta tensor (no memory) that answers ``is_cuda``: the launchers take their GPU branch."""

    @property
    def is_cuda(self) -> bool:
        return True


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta").as_subclass(_CudaMeta)


def _public_problem(case: Case, backend: str):
    """``(problem, q, k, v, sinks, mask, seed)`` as ``normattn.attention`` hands them to its backend."""
    import torch

    import normattn
    from normattn import dispatch

    dtype = getattr(torch, case.dtype)
    kv_heads = KV_HEADS if "gqa" in case.features else HEADS
    q = _meta(BATCH, HEADS, TOKENS, case.head_dim, dtype=dtype)
    k = _meta(BATCH, kv_heads, TOKENS, case.head_dim, dtype=dtype)
    v = _meta(BATCH, kv_heads, TOKENS, case.value_dim, dtype=dtype)
    options = {"normalizer": case.normalizer, "causal": case.causal, "backend": backend}
    for feature in case.features:
        options |= _feature_options(feature, q, case.normalizer)
    handed: list[tuple] = []
    run, dispatch.run = dispatch.run, lambda _backend, *call: handed.append(call) or call[1]
    try:
        normattn.attention(q, k, v, **options)
    finally:
        dispatch.run = run
    return handed[0]


def _flash_launches(case: Case, start_recording: Callable[[], None]) -> None:
    """The launcher calls of a flash op; only those after ``start_recording()`` are the case's."""
    from normattn.ops.attention import triton as flash

    problem, q, k, v, sinks, mask, seed = _public_problem(case, "triton")
    config = flash._config(problem)
    # the ops' fake (meta) implementations give the saved outputs without launching anything
    o, stat = flash.flash_forward_op(q, k, v, sinks, mask, seed, *config)
    tangents = [x.new_empty(x.shape) for x in (q, k, v)] + [
        None if sinks is None else sinks.new_empty(sinks.shape)
    ]
    od, mu = flash.flash_jvp_op(q, k, v, sinks, mask, seed, o, stat, *tangents, *config)
    start_recording()
    if case.op == "forward":
        flash.flash_forward(q, k, v, sinks, mask, seed, *config)
    elif case.op == "jvp":
        flash.flash_jvp(q, k, v, sinks, mask, seed, o, stat, *tangents, *config)
    elif case.op == "backward":
        flash.flash_backward(q, k, v, sinks, mask, seed, o, stat, o.new_empty(o.shape), *config)
    else:
        need_tangent = case.op == "tangent"
        h = o.new_empty(o.shape)
        flash.flash_tangent_backward(
            q, k, v, sinks, mask, seed, o, stat, *tangents, od, mu, h, need_tangent, *config
        )


def _linear_launches(case: Case, start_recording: Callable[[], None]) -> None:
    """The chunked kernels' launchers themselves: the custom ops around them would take their fake
    (meta) implementations and launch nothing."""
    from normattn.ops.beta_linear import triton_chunk

    problem, q, k, v, *_ = _public_problem(case, "triton-linear")
    tangents = [x.new_empty(x.shape) for x in (q, k, v)]
    shape = (problem.scale, problem.causal)
    chunk, seed = triton_chunk.CHUNK_SIZE, "seed" in case.features
    o, r = triton_chunk.forward_op(q, k, v, *shape, chunk)  # fake: the saved outputs, no launch
    start_recording()
    if case.op == "forward":
        triton_chunk._forward(q, k, v, *shape, chunk)
    elif case.op == "backward":
        triton_chunk._backward(q, k, v, o, r, o.new_empty(o.shape), *shape, seed, chunk)
    else:
        triton_chunk._jvp(q, k, v, o, r, *tangents, *shape, seed, chunk)


def _decode_launches(case: Case, start_recording: Callable[[], None]) -> None:
    import torch

    from normattn.ops.beta_linear.triton_decode import beta_decode_triton
    from normattn.ops.common import accumulation_dtype

    dtype = getattr(torch, case.dtype)
    q, k = (_meta(BATCH, HEADS, 1, case.head_dim, dtype=dtype) for _ in "qk")
    v = _meta(BATCH, HEADS, 1, case.value_dim, dtype=dtype)
    state_dtype = accumulation_dtype(dtype)
    h = _meta(BATCH, HEADS, case.head_dim, case.value_dim, dtype=state_dtype)
    g = _meta(BATCH, HEADS, case.head_dim, case.head_dim, dtype=state_dtype)
    start_recording()
    beta_decode_triton(q, k, v, h, g, inplace=True)


def _rows_launches(case: Case, start_recording: Callable[[], None]) -> None:
    """The row kernels' custom ops run their own implementation (``_init_fn``), not the fake one."""
    import torch

    from normattn.ops.max_reduce.triton import max_reduce_rows_bwd, max_reduce_rows_fwd
    from normattn.ops.softmax_rows.triton import softmax_rows_bwd, softmax_rows_fwd

    x = _meta(*case.rows, dtype=getattr(torch, case.dtype))
    start_recording()
    if case.op == "max":
        values, indices = max_reduce_rows_fwd._init_fn(x)
        max_reduce_rows_bwd._init_fn(values, indices, case.rows[1])
    else:
        softmax_rows_bwd._init_fn(softmax_rows_fwd._init_fn(x), x)


LAUNCHES = {
    "flash": _flash_launches,
    "linear": _linear_launches,
    "decode": _decode_launches,
    "rows": _rows_launches,
}


def record_specs(cases: list[Case]) -> tuple[list[Spec], list[str]]:
    """The distinct specializations the cases launch, and the kernels none of them launches."""
    kernels = library_kernels()
    specs: dict[tuple[str, str], Spec] = {}
    with recording(kernels) as launches:
        for case in cases:
            LAUNCHES[case.family](case, launches.clear)
            for kernel, data in launches:
                key = (kernel, _without_paths(data))
                if key in specs:
                    specs[key].cases += 1
                else:
                    specs[key] = Spec(kernel, data, case, kernels[kernel].cache_key)
    launched = {spec.kernel for spec in specs.values()}
    return list(specs.values()), sorted(set(kernels) - launched)


def _without_paths(data: str) -> str:
    """The specialization without the library file paths that Triton's options carry."""
    payload = json.loads(data)
    payload["options"].pop("extern_libs", None)
    return json.dumps(payload, sort_keys=True)


# --------------------------------------------------------------------------------------------
# Compiling and reading the resource report
# --------------------------------------------------------------------------------------------


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ``ptxas -v`` (the last function it reports)."""
    registers = PTXAS_REGISTERS.findall(log)
    frames = PTXAS_FRAME.findall(log)
    if not registers or not frames:
        raise ValueError(f"no register or spill report in the ptxas log:\n{log}")
    stack, stores, loads = map(int, frames[-1])
    return {"registers": int(registers[-1]), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh: every compile runs ptxas and reports
    use_sm90_driver()
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True


def compile_spec(data: str) -> dict:
    """Compile one specialization for sm_90: registers, spills (bytes), shared memory, seconds."""
    name = json.loads(data)["name"]
    module, attribute = name.rsplit(".", 1)
    kernel = getattr(importlib.import_module(module), attribute)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.preload(data)
    except Exception as error:  # a row that says why, instead of a crashed check
        message = (str(error).strip().splitlines() or [""])[0]
        return {"error": f"{type(error).__name__}: {message[:300]}", "compile_s": time.perf_counter() - start}
    return {
        **parse_ptxas_log(log.getvalue()),
        "shared": int(compiled.metadata.shared),
        "compile_s": time.perf_counter() - start,
    }


def _cost(spec: Spec) -> tuple:
    """Longest compiles first (tangent, JVP, backward flash kernels; wide heads), for a short tail."""
    order = ("tangent", "jvp", "backward", "forward")
    op = next((i for i, word in enumerate(order) if spec.case.op.startswith(word)), len(order))
    return (spec.case.family != "flash", op, -spec.case.head_dim, spec.case.dtype)


# The usage fields and their columns in static.csv.
USAGE_COLUMNS = {"registers": "registers", "stack": "stack", "spill_stores": "spill_stores"}
USAGE_COLUMNS |= {"spill_loads": "spill_loads", "shared": "shared_bytes"}


def reuse(specs: list[Spec], table: Path, compiler: str) -> None:
    """Take the usage of every spec whose key an earlier ``static.csv`` holds with a compiled result:
    the same source, specialization, options and compiler give the same binary."""
    if not table.is_file():
        return
    with table.open() as f:
        earlier = {row["key"]: row for row in csv.DictReader(f) if row.get("key") and row.get("registers")}
    for spec in specs:
        row = earlier.get(spec.key(compiler))
        if row is not None:
            spec.usage = {name: int(row[column]) for name, column in USAGE_COLUMNS.items()} | {
                "compile_s": 0.0
            }
            spec.reused = True


def compile_all(specs: list[Spec], jobs: int) -> None:
    """Fill the ``usage`` of every spec without one, ``jobs`` compiles at a time in fresh processes."""
    pending = [spec for spec in specs if not spec.usage]
    if not pending:
        return
    with tempfile.TemporaryDirectory(prefix="gpu-static-cache-") as cache_dir:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, context, _init_worker, (cache_dir,)) as pool:
            ordered = sorted(pending, key=_cost)
            futures = {pool.submit(compile_spec, spec.data): spec for spec in ordered}
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                spec = futures[future]
                spec.usage = future.result()
                print(
                    f"[{done}/{len(pending)}] {_short(spec.kernel)} {spec.case.label}: {_verdict(spec)}",
                    flush=True,
                )


# --------------------------------------------------------------------------------------------
# Verdicts and the table
# --------------------------------------------------------------------------------------------


def _short(kernel: str) -> str:
    return kernel.rsplit(".", 1)[1]


def tile_row(spec: Spec) -> tuple[str, bool, int] | None:
    """The tile-table row a flash kernel's specialization was launched with: (kind, 4/8-byte operands,
    the row's largest head dim); None for the other kernels."""
    from normattn.ops.triton_utils import _GPU_TILES

    constants, name = spec.constants, _short(spec.kernel)
    if name not in FLASH_KERNELS:
        return None
    kind = ("tangent_" if constants.get("TANGENT") else "") + FLASH_KERNELS[name]
    wide = spec.case.dtype not in ("bfloat16", "float16")
    width = max(constants["BLOCK_D"], constants["BLOCK_DV"])
    rows = _GPU_TILES[(kind, wide)]
    return kind, wide, next((max_d for max_d, _ in rows if width <= max_d), rows[-1][0])


def problems(spec: Spec) -> list[str]:
    """What is wrong with a compiled specialization: spills, too much shared memory, an error."""
    usage = spec.usage
    if "error" in usage:
        return [usage["error"]]
    found = []
    if usage["spill_stores"] or usage["spill_loads"]:
        found.append(f"spills {usage['spill_stores']}/{usage['spill_loads']} B")
    if usage["shared"] > SHARED_LIMIT_BYTES:
        found.append(f"shared {usage['shared'] / 1024:.0f} KiB > {SHARED_LIMIT_BYTES // 1024} KiB")
    return found


def known_key(spec: Spec) -> tuple[str, bool, int] | None:
    """Where ``KNOWN_PROBLEMS`` looks a specialization up: its tile-table row (flash kernels), or
    (kernel, 4/8-byte operands, head dim) for the chunked beta kernels; None for the others."""
    if spec.case.family == "linear":
        return _short(spec.kernel), spec.case.dtype not in ("bfloat16", "float16"), spec.case.head_dim
    return tile_row(spec)


def _verdict(spec: Spec) -> str:
    found = problems(spec)
    if not found:
        return "ok"
    known = known_key(spec) in KNOWN_PROBLEMS and "error" not in spec.usage
    return ("known: " if known else "FAIL (") + ", ".join(found) + ("" if known else ")")


def stale_known_rows(specs: list[Spec]) -> list[tuple[str, bool, int]]:
    """Entries of ``KNOWN_PROBLEMS`` that no specialization checks, or where nothing fails any more."""
    failing = {known_key(spec) for spec in specs if problems(spec)}
    return sorted(row for row in KNOWN_PROBLEMS if row not in failing)


# The tile constexprs: shown in the tiles column, and left out of the constexprs column with the
# padded head dims.
SHOWN_TILES = ("BLOCK_M", "BLOCK_N", "BT", "BK", "BV", "BLOCK_ROWS", "BLOCK_COLS")
TILE_NAMES = {*SHOWN_TILES, "BLOCK_D", "BLOCK_DV"}


def _tiles(spec: Spec) -> str:
    constants, options = spec.constants, spec.options
    blocks = [f"{name}={constants[name]}" for name in SHOWN_TILES if name in constants]
    return " ".join(blocks + [f"warps={options['num_warps']}", f"stages={options['num_stages']}"])


COLUMNS = [
    "kernel", "family", "op", "normalizer", "dtype", "head_dim", "variant", "tiles", "registers",
    "spill_stores", "spill_loads", "stack", "shared_bytes", "verdict", "rule", "constexprs", "compiler",
    "key",
]  # fmt: skip
# The markdown leaves out what only the CSV needs (the full constexprs, the compiler, the reuse key).
MARKDOWN_COLUMNS = [c for c in COLUMNS if c not in ("family", "constexprs", "compiler", "key")]


def _order(spec: Spec) -> tuple:
    case = spec.case
    family = ("flash", "linear", "decode", "rows").index(case.family)
    dtype = DTYPES.index(case.dtype)
    return (family, _short(spec.kernel), case.op, dtype, case.head_dim, case.value_dim, case.rows, case.label)


def table_rows(specs: list[Spec], compiler: str) -> list[dict]:
    """One row per specialization, in a fixed order (kernel family, kernel, op, dtype, head dim)."""
    rows = []
    for spec in sorted(specs, key=_order):
        constants = {k: v for k, v in spec.constants.items() if k not in TILE_NAMES}
        usage = spec.usage
        rows.append({
            "kernel": _short(spec.kernel),
            "family": spec.case.family,
            "op": spec.case.op,
            "normalizer": spec.case.normalizer or "-",
            "dtype": spec.case.dtype,
            "head_dim": spec.case.dims or "-",
            "variant": spec.case.variant,
            "tiles": _tiles(spec),
            "registers": usage.get("registers", ""),
            "spill_stores": usage.get("spill_stores", ""),
            "spill_loads": usage.get("spill_loads", ""),
            "stack": usage.get("stack", ""),
            "shared_bytes": usage.get("shared", ""),
            "verdict": _verdict(spec),
            "rule": spec.case.rule,
            "constexprs": " ".join(f"{k}={_value(v)}" for k, v in constants.items()),
            "compiler": compiler,
            "key": spec.key(compiler),
        })  # fmt: skip
    return rows


def _value(value: object) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def _ptxas_version() -> str:
    from triton import knobs

    try:
        tool = knobs.nvidia.ptxas_blackwell if COMPUTE_CAPABILITY >= 90 else knobs.nvidia.ptxas
        output = subprocess.run([tool.path, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.SubprocessError, AttributeError):
        return "unknown"
    return (re.findall(r"release [\d.]+", output) or ["unknown"])[0]


def _commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Header entries that change with every compile but say nothing about the kernels: a run whose table
# differs from the committed one only in these leaves the files alone (a cached run writes nothing).
VOLATILE = ("git commit", "date", "compiled / reused from the earlier table", "duration")


def markdown_table(rows: list[dict], columns: list[str] = MARKDOWN_COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows])


def render_markdown(rows: list[dict], header: dict[str, str], missing: list[str]) -> str:
    """static.md: how to read it, the header, failures, known problems, then every row."""
    failures = [row for row in rows if row["verdict"].startswith("FAIL")]
    known = [row for row in rows if row["verdict"].startswith("known")]
    parts = [
        "# Static check: the Triton kernels compiled for sm_90 (H100/H200) on a CPU machine",
        "Written by `make gpu-static` (`tools/gpu_static.py`). Registers, spill bytes and the stack frame "
        "are `ptxas -v`'s report of Triton's own compile; shared memory is Triton's metadata (dynamic "
        "shared memory per block). A verdict is `ok`, `known: ...` (one of `KNOWN_PROBLEMS` in "
        "tools/gpu_static.py, listed below; why in `tiles.md`) or `FAIL (...)`, which fails the make "
        "target, as does a known problem that no longer fails. `static.csv` "
        "holds the same rows with every constexpr, the compiler and the key a later run reuses the "
        "row by.",
        "\n".join(f"- **{key}**: {value}" for key, value in header.items()),
        "## How the specializations are chosen\n\n" + " ".join((covering_set.__doc__ or "").split()),
    ]
    if missing:
        parts.append("## Kernels no case launches\n\n" + "\n".join(f"- `{name}`" for name in missing))
    if failures:
        parts.append(f"## Failures ({len(failures)})\n\n" + markdown_table(failures))
    if known:
        rows_text = ", ".join(
            f"{k} {'4/8' if w else '2'}-byte d<={d}" for k, w, d in sorted(KNOWN_PROBLEM_ROWS)
        )
        linear_text = ", ".join(
            f"{k} {'4/8' if w else '2'}-byte d={d}" for k, w, d in sorted(KNOWN_LINEAR_PROBLEMS)
        )
        intro = (
            f"Flash tile-table rows no tile fixes ({rows_text}; see tiles.md) and chunked beta "
            f"launches that spill at padded head dims ({linear_text}); `KNOWN_PROBLEMS` in "
            "tools/gpu_static.py says why.\n\n"
        )
        parts.append(f"## Known problems ({len(known)})\n\n" + intro + markdown_table(known))
    parts.append(f"## Every specialization ({len(rows)})\n\n" + markdown_table(rows))
    return "\n\n".join(parts) + "\n"


def render_csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _stable(markdown: str) -> str:
    return "\n".join(
        line for line in markdown.splitlines() if not any(line.startswith(f"- **{k}**") for k in VOLATILE)
    )


def write_table(
    rows: list[dict], out: Path, header: dict[str, str], missing: list[str], force: bool = False
) -> bool:
    """Write ``static.csv`` and ``static.md`` to ``out``, unless both would say what they say already
    (apart from the ``VOLATILE`` header lines) and not ``force``. True if written."""
    csv_path, md_path = out / "static.csv", out / "static.md"
    csv_text, md_text = render_csv(rows), render_markdown(rows, header, missing)
    if (
        not force
        and csv_path.is_file()
        and md_path.is_file()
        and csv_path.read_text() == csv_text
        and _stable(md_path.read_text()) == _stable(md_text)
    ):
        return False
    out.mkdir(parents=True, exist_ok=True)
    csv_path.write_text(csv_text)
    md_path.write_text(md_text)
    return True


def summary(rows: list[dict]) -> dict[str, str]:
    compiled = [row for row in rows if row["registers"] != ""]

    def most(column: str) -> str:
        row = max(compiled, key=lambda r: r[column], default=None)
        if row is None:
            return "-"
        where = " ".join(row[c] for c in ("kernel", "op", "normalizer", "dtype"))
        return f"{row[column]} ({where} d={row['head_dim']})"

    return {
        "max registers": most("registers"),
        "spilling specializations (known ones included)": str(
            sum(1 for r in compiled if r["spill_stores"] or r["spill_loads"])
        ),
        "max shared memory (bytes)": most("shared_bytes"),
        "known problems (KNOWN_PROBLEMS)": str(sum(1 for r in rows if r["verdict"].startswith("known"))),
        "failures": str(sum(1 for row in rows if row["verdict"].startswith("FAIL"))),
    }


def _command(argv: list[str]) -> str:
    return " ".join(["python -m tools.gpu_static", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_static", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="compile everything, reusing no row of the earlier static.csv"
    )
    parser.add_argument("--list", action="store_true", help="print the specializations, compile nothing")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    start = time.monotonic()
    use_sm90_driver()
    import triton

    cases = covering_set()
    specs, missing = record_specs(cases)
    kernel_count = len({spec.kernel for spec in specs})
    print(f"{len(cases)} cases launch {len(specs)} distinct specializations of {kernel_count} kernels")
    for name in missing:
        print(f"FAIL: kernel {name} is launched by no case of the covering set")
    if args.list:
        for spec in sorted(specs, key=_cost):
            print(f"{_short(spec.kernel)} {spec.case.label} [{spec.case.rule}] {_tiles(spec)}")
        return 0 if not missing else 1
    ptxas = _ptxas_version()
    compiler = f"triton {triton.__version__}, ptxas {ptxas}, sm_{COMPUTE_CAPABILITY}"
    if not args.fresh:
        reuse(specs, args.out / "static.csv", compiler)
    reused = sum(1 for spec in specs if spec.reused)
    print(f"compiling {len(specs) - reused}, reusing {reused} from {args.out / 'static.csv'}", flush=True)
    compile_all(specs, max(1, args.jobs))
    rows = table_rows(specs, compiler)
    header = {
        "command": f"`make gpu-static` (`{_command([a for a in argv if a != '--fresh'])}`); "
        "`--fresh` recompiles every row",
        "target": f"sm_{COMPUTE_CAPABILITY} (H100/H200), at most {SHARED_LIMIT_BYTES} bytes of shared memory",
        "compiler": f"Triton {triton.__version__}, ptxas {ptxas} (Triton's bundled one); "
        "the lent GPU machine runs Triton 3.6",
        "git commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cases / distinct specializations / kernels": f"{len(cases)} / {len(specs)} / {kernel_count}",
        "compiled / reused from the earlier table": f"{len(specs) - reused} / {reused}",
        "duration": f"{time.monotonic() - start:.0f} s with {args.jobs} parallel compiles",
        **summary(rows),
    }
    stale = stale_known_rows(specs)
    header["known rows that no longer fail (drop them)"] = ", ".join(map(str, stale)) or "none"
    written = write_table(rows, args.out, header, missing, force=args.fresh)
    for key, value in header.items():
        print(f"{key}: {value}")
    for row in rows:
        if row["verdict"].startswith("FAIL"):
            print(f"FAIL: {row['kernel']} {row['op']} {row['normalizer']} {row['dtype']} d={row['head_dim']} "
                  f"{row['variant']}: {row['verdict']}")  # fmt: skip
    for row in stale:
        print(f"FAIL: {row} is in KNOWN_PROBLEMS but nothing there fails (or no case checks it): drop it")
    print(
        f"wrote {args.out / 'static.csv'} and {args.out / 'static.md'}"
        if written
        else f"{args.out / 'static.csv'} and static.md unchanged"
    )
    return 0 if header["failures"] == "0" and not missing and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
