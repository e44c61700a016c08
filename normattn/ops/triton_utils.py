"""What every Triton kernel of normattn shares: tile loads and stores, the tiling and precision policy,
and the one way kernels are launched: as ``torch.library`` custom ops.

* ``load_tile``/``store_tile``: a 2-d tile of a strided tensor, masked to its valid rows and columns.
* ``block``: head dims pad to the next power of two, at least 16 (the smallest tensor-core K).
* ``dot_precision``: 16-bit inputs multiply on the tensor cores in their own dtype with float32
  accumulation; float32 inputs use 3xTF32 on a GPU (float32-level accuracy, tensor-core speed);
  float64 is exact ("ieee"). The interpreter always computes exactly.
* ``tiles``: one table of launch shapes per kernel kind, padded head dim and operand width, chosen
  by compiling for sm_90 and reading registers, spills and shared memory (``make gpu-static``);
  tests shrink every tile with ``override_tiles`` so that the interpreter crosses many tile edges.
* ``guard_derivatives``: every launcher is a custom op (its fake implementation lets
  ``torch.compile`` trace it; the dispatcher unwraps ``torch.func``'s wrapped tensors before a
  kernel sees a pointer). PyTorch gives a custom op no forward-mode rule and silently drops
  tangents through it, so each op also gets an autograd kernel that raises for any derivative it
  does not define: a derivative the op cannot give is an error, never a zero.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, rows_ok, cols, cols_ok, stride_row, stride_col):
    """``ptr[rows, cols]`` as a ``[len(rows), len(cols)]`` tile, 0 outside the valid rows and columns."""
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=rows_ok[:, None] & cols_ok[None, :],
        other=0.0,
    )


@triton.jit
def store_tile(ptr, value, rows, rows_ok, cols, cols_ok, stride_row, stride_col):
    tl.store(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
        value.to(ptr.dtype.element_ty),
        mask=rows_ok[:, None] & cols_ok[None, :],
    )


def block(dim: int, cap: int | None = None) -> int:
    """The tile width of a feature axis of length ``dim``: a power of two >= 16 (and <= ``cap``)."""
    width = max(16, triton.next_power_of_2(dim))
    return width if cap is None else min(width, cap)


def dot_precision(dtype: torch.dtype, on_gpu: bool) -> str:
    if dtype == torch.float64 or not on_gpu:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def accumulates_in_fp64(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


@dataclass(frozen=True)
class Tiles:
    """A launch shape: ``block_m`` query rows and ``block_n`` keys per tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def options(self, on_gpu: bool) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages} if on_gpu else {}


_override: Tiles | None = None


@contextlib.contextmanager
def override_tiles(block_m: int, block_n: int) -> Iterator[None]:
    """Force every kernel's tile sizes (tests use tiny tiles so the interpreter sees many tiles)."""
    global _override
    previous, _override = _override, Tiles(block_m, block_n)
    try:
        yield
    finally:
        _override = previous


# (kernel kind, 4- or 8-byte operands) -> ((largest padded head dim, tiles), ...). Kinds: "fwd", "jvp"
# (the forward pass with the tangent's operands), "dkdv"/"dq" (backward: a key tile resident while
# query tiles stream, and the reverse), "tangent_dkdv"/"tangent_dq" (the gradient of the JVP's
# output: twice the operands and accumulators of the backward, hence smaller tiles).
_GPU_TILES: dict[tuple[str, bool], tuple[tuple[int, Tiles], ...]] = {
    ("fwd", False): ((64, Tiles(128, 64, 8, 3)), (128, Tiles(128, 32, 8, 3)), (256, Tiles(32, 64, 8, 2))),
    ("jvp", False): ((64, Tiles(128, 32, 8, 2)), (128, Tiles(32, 32, 8, 2)), (256, Tiles(32, 16, 8, 2))),
    ("dkdv", False): ((64, Tiles(32, 64, 8, 3)), (128, Tiles(32, 32, 8, 2)), (256, Tiles(16, 32, 8, 2))),
    ("dq", False): ((64, Tiles(128, 32, 8, 3)), (128, Tiles(64, 32, 8, 2)), (256, Tiles(32, 32, 8, 2))),
    ("tangent_dkdv", False): (
        (64, Tiles(32, 32, 8, 2)),
        (128, Tiles(32, 16, 8, 1)),
        (256, Tiles(16, 16, 8, 1)),
    ),
    ("tangent_dq", False): (
        (64, Tiles(32, 32, 8, 2)),
        (128, Tiles(16, 32, 8, 1)),
        (256, Tiles(16, 16, 8, 1)),
    ),
    ("fwd", True): ((64, Tiles(32, 32, 8, 2)), (128, Tiles(16, 32, 4, 2)), (256, Tiles(16, 16, 8, 2))),
    ("jvp", True): ((128, Tiles(16, 16, 8, 2)), (256, Tiles(16, 16, 8, 1))),
    ("dkdv", True): ((128, Tiles(16, 16, 8, 1)), (256, Tiles(16, 16, 8, 1))),
    ("dq", True): ((64, Tiles(16, 32, 8, 2)), (128, Tiles(16, 32, 8, 2)), (256, Tiles(16, 16, 8, 2))),
    ("tangent_dkdv", True): ((128, Tiles(16, 16, 8, 1)), (256, Tiles(16, 16, 8, 1))),
    ("tangent_dq", True): ((128, Tiles(16, 16, 8, 1)), (256, Tiles(16, 16, 8, 1))),
}
KERNEL_KINDS = tuple(sorted({kind for kind, _ in _GPU_TILES}))
# Widest head the GPU tile table is sized for.
MAX_HEAD_DIM = 256


def tiles(kind: str, block_d: int, dtype: torch.dtype, on_gpu: bool) -> Tiles:
    """The launch shape of kernel ``kind`` for a padded head dim ``block_d``."""
    if _override is not None:
        return _override
    if not on_gpu:
        # the interpreter pays per tile operation, not per element: big tiles mean fewer Python steps
        return Tiles(128, 128)
    by_head_dim = _GPU_TILES[(kind, dtype.itemsize > 2)]
    return next((t for max_d, t in by_head_dim if block_d <= max_d), by_head_dim[-1][1])


# -- custom ops: derivatives they define, errors for the rest -------------------------------------

_NO_DERIVATIVE = (
    "normattn::{op} has no {mode}-mode derivative of its own (PyTorch would silently drop it through a "
    "custom op): differentiate normattn.attention, which has them all"
)
# op name -> (setup_context, backward) for the ops that define a first-order backward
_BACKWARDS: dict[str, tuple[Callable, Callable]] = {}


def _call_below_autograd(op_name: str, args: tuple):
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(torch.ops.normattn, op_name)(*args)


class _OpCall(torch.autograd.Function):
    """A custom op as autograd sees it: its registered backward, or an error."""

    @staticmethod
    def forward(op_name, *args):
        return _call_below_autograd(op_name, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]
        if ctx.op_name in _BACKWARDS:
            _BACKWARDS[ctx.op_name][0](ctx, inputs[1:], output)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.op_name not in _BACKWARDS:
            raise NotImplementedError(_NO_DERIVATIVE.format(op=ctx.op_name, mode="reverse"))
        return None, *_BACKWARDS[ctx.op_name][1](ctx, *grads)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_NO_DERIVATIVE.format(op=ctx.op_name, mode="forward"))


_LIBRARY = torch.library.Library("normattn", "FRAGMENT")


def guard_derivatives(op, setup_context: Callable | None = None, backward: Callable | None = None) -> None:
    """Give the custom op ``op`` (namespace ``normattn``) an autograd kernel: ``backward`` (with
    ``setup_context``, as for ``register_autograd``) if given, an error for every other derivative."""
    if backward is not None:
        _BACKWARDS[op._name] = (setup_context, backward)
    with warnings.catch_warnings():  # it replaces custom_op's default autograd kernel, on purpose
        warnings.simplefilter("ignore", UserWarning)
        _LIBRARY.impl(op._name, lambda *args, _name=op._name: _OpCall.apply(_name, *args), "Autograd")
