"""What the GPU tests share: where they run, their sizes, and FlashAttention's error rule over every
derivative the kernels compute.

They run on a CUDA device, or, with ``NORMATTN_GPU_DRY_RUN=1``, on the CPU through the Triton
interpreter at tiny sizes (``make gpu-check DRY_RUN=1``: the GPU proof's plumbing, checked in CI).
Sizes come from :func:`sized`. Without CUDA and without the dry run the root conftest skips them.
``make gpu-check`` runs the tests not marked ``slow``: its correctness stage's subset.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from helpers import assert_flash_rule
from torch import Tensor

import normattn

DRY_RUN = os.environ.get("NORMATTN_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
# The root conftest's reason for skipping a test that needs CUDA (a dry run lifts it).
NO_CUDA_REASON = "needs a CUDA device"
# Every registry normalizer with Triton helpers: what backend="triton" runs.
KERNEL_NORMALIZERS = [name for name, spec in normattn.NORMALIZERS.items() if spec.kernel is not None]
FIRST_ORDER = ("out", "dq", "dk", "dv", "jvp")
# The gradient of <h, jvp output> for the primals and for their tangents.
SECOND_ORDER = ("jvp.dq", "jvp.dk", "jvp.dv", "jvp.dqd", "jvp.dkd", "jvp.dvd")


def sized(gpu, dry):
    """``gpu`` on a GPU, ``dry`` in a dry run (the interpreter pays per tile: everything is tiny)."""
    return dry if DRY_RUN else gpu


# Half precision is what the kernels are for. The Triton interpreter cannot run them in bf16 (numpy
# has no bfloat16: the CPU suite runs backend="triton" in float32 only), so a dry run, which checks
# the tests' plumbing rather than the kernels' rounding, runs them in float32.
LOW_PRECISION = sized([torch.bfloat16, torch.float16], [torch.float32])
LOW = LOW_PRECISION[0]  # the dtype of the tests that take one
# 4-byte operands take their own tiles and chunks on a GPU (tile table, triton_chunk); a dry run
# already runs everything in float32.
WIDE = sized([torch.float32], [])
HEAD_DIMS = sized([64, 128], [16])
# The normalizers the flash tests run: every one on a GPU; a dry run checks the tests' code with two.
NORMALIZERS = sized(KERNEL_NORMALIZERS, ["softmax", "beta"])


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def derivatives(
    attend: Callable[..., Tensor],
    primals: Sequence[Tensor],
    cotangent: Tensor,
    tangents: Sequence[Tensor],
    second_order: bool = True,
) -> dict[str, Tensor]:
    """The output, its gradients, the JVP and (``second_order``) the gradient of ``<h, jvp>``."""
    leaves = [x.detach().requires_grad_() for x in primals]
    out = attend(*leaves)
    grads = torch.autograd.grad(out, leaves, cotangent)
    primals_2 = tuple(x.detach().requires_grad_(second_order) for x in primals)
    tangents_2 = tuple(t.detach().requires_grad_(second_order) for t in tangents)
    _, out_dot = torch.func.jvp(attend, primals_2, tangents_2)
    result = dict(zip(FIRST_ORDER, (out.detach(), *grads, out_dot.detach()), strict=True))
    if second_order:
        h = torch.randn(out_dot.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        second = torch.autograd.grad((out_dot * h.to(out_dot)).sum(), primals_2 + tangents_2)
        result |= dict(zip(SECOND_ORDER, second, strict=True))
    return result


def check_flash_rule(
    attend: Callable[[str], Callable[..., Tensor]],
    primals: Sequence[Tensor],
    second_order: bool = True,
    backend: str = "triton",
) -> None:
    """FlashAttention's rule for every derivative: the kernels' error against float64 at most 2x
    (output) or 3x (derivatives) that of plain PyTorch (``backend="reference"``) in the same dtype,
    plus a floor of 1e-5 of the largest true value. ``attend(backend)`` is ``f(q, k, v)``. NaN fails."""
    dtype = primals[0].dtype
    generator = torch.Generator().manual_seed(0)
    draw = lambda x: torch.randn(x.shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q, _, v = primals
    cotangent = draw(torch.empty(*q.shape[:3], v.shape[-1]))
    tangents = [draw(x) for x in primals]

    def run(which: str, precision: torch.dtype) -> dict[str, Tensor]:
        cast = [x.detach().to(precision) for x in primals]
        return derivatives(
            attend(which), cast, cotangent.to(cast[0]), [t.to(cast[0]) for t in tangents], second_order
        )

    ours, plain, truth = run(backend, dtype), run("reference", dtype), run("reference", torch.float64)
    for name, want in truth.items():
        got = ours[name]
        assert got.dtype == dtype and got.shape == want.shape, name
        assert not got.isnan().any(), f"{name}: NaN in the {backend} result"
        floor = 1e-5 * want.abs().max().item() + 1e-7
        assert_flash_rule([got], [plain[name]], [want], [name], floor)


def compiled_kernels() -> list[dict[str, object]]:
    """The ``normattn.ops`` kernels this process compiled and loaded, as Triton reports them after a
    launch: registers, spills, shared memory, warps and stages (none when the interpreter ran them).

    Reads Triton's per-device kernel caches; where a Triton version keeps them elsewhere, nothing."""
    import importlib
    import pkgutil

    import normattn.ops

    rows = []
    for info in pkgutil.walk_packages(normattn.ops.__path__, "normattn.ops."):
        module = importlib.import_module(info.name)
        for name, kernel in vars(module).items():
            caches = getattr(kernel, "device_caches", None)
            if not name.endswith("_kernel") or not isinstance(caches, dict):
                continue
            for entry in caches.values():
                for compiled in entry[0].values():
                    metadata = getattr(compiled, "metadata", None)
                    if getattr(compiled, "n_regs", None) is None or metadata is None:
                        continue
                    rows.append({
                        "kernel": name,
                        "warps": metadata.num_warps,
                        "stages": metadata.num_stages,
                        "registers": compiled.n_regs,
                        "spills": compiled.n_spills,
                        "shared_bytes": metadata.shared,
                    })  # fmt: skip
    return rows
