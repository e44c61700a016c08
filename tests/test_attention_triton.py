"""What is particular to the Triton flash kernels: their custom ops, determinism, tile edges.

Correctness against the reference for every normalizer and feature is in test_attention.py,
test_features.py and test_compositions.py, which run the Triton backend too.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, all_derivatives, attend, inputs

from normattn.normalizers import NORMALIZERS
from normattn.ops.attention import triton as flash
from normattn.ops.triton_utils import override_tiles

NAMES = sorted(NORMALIZERS)


def _config(name: str, causal: bool = True, dropout_p: float = 0.0) -> tuple:
    spec = NORMALIZERS[name]
    floor = spec.shift_floor if spec.shifted else math.nan
    right = 0 if causal else 2**31 - 1
    return (
        spec.kernel,
        floor,
        spec.normalized,
        spec.alpha,
        0.5,
        spec.resolve(9),
        2**31 - 1,
        right,
        dropout_p,
        False,
    )


@pytest.mark.parametrize("name", NAMES)
def test_custom_ops_pass_opcheck(name):
    """Schema, fake (meta) implementation and autograd registration of every custom op."""
    q, k, v = (x.contiguous() for x in inputs((1, 2, 1, 7, 9, 8, 4)))
    sinks = torch.randn(1, 2, dtype=torch.float64) if NORMALIZERS[name].sinks else None
    mask = torch.rand(1, 1, 7, 9) > 0.3
    seed = torch.tensor(5, dtype=torch.int64)
    config = _config(name, dropout_p=0.2)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(flash.flash_forward_op, (q, k, v, sinks, mask, seed, *config), test_utils=tests)
    o, stat = flash.flash_forward_op(q, k, v, sinks, mask, seed, *config)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    sinks_dot = None if sinks is None else torch.randn_like(sinks)
    jvp_args = (q, k, v, sinks, mask, seed, o, stat, *tangents, sinks_dot, *config)
    torch.library.opcheck(flash.flash_jvp_op, jvp_args, test_utils=tests[:2])
    od, mu = flash.flash_jvp_op(*jvp_args)
    grad_out = torch.randn_like(o)
    torch.library.opcheck(
        flash.flash_backward_op,
        (q, k, v, sinks, mask, seed, o, stat, grad_out, *config),
        test_utils=tests[:2],
    )
    for need_tangent in (False, True):
        args = (
            q,
            k,
            v,
            sinks,
            mask,
            seed,
            o,
            stat,
            *tangents,
            sinks_dot,
            od,
            mu,
            grad_out,
            need_tangent,
            *config,
        )
        torch.library.opcheck(flash.flash_tangent_backward_op, args, test_utils=tests[:2])


def test_the_bare_forward_op_is_differentiable():
    """For callers of the op itself: its registered backward is the backward kernel's."""
    q, k, v = (x.contiguous().requires_grad_() for x in inputs((1, 2, 2, 7, 9, 8, 4)))
    config = _config("softmax", causal=True)
    out, _ = flash.flash_forward_op(q, k, v, None, None, None, *config)
    want = attend("reference", causal=True, scale=0.5)(q, k, v)
    torch.testing.assert_close(out, want, **F64)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    for a, b in zip(got, torch.autograd.grad(want, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    """No atomics: two backward passes (and gradients of the JVP's output) agree bit for bit."""
    q, k, v = inputs((1, 4, 2, 40, 40, 16, 16))

    def run():
        g = torch.Generator().manual_seed(0)
        h = attend("triton", name, causal=True, enable_gqa=True, dropout_p=0.1, generator=g)
        cotangent = torch.ones(1, 4, 40, 16, dtype=torch.float64)
        primals = (q, k, v)
        return all_derivatives(h, primals, cotangent, primals)

    with override_tiles(16, 16):
        first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("tiles", "t_q", "t_k"), [((16, 32), 45, 71), ((32, 16), 71, 45)], ids=["Tq<Tk", "Tq>Tk"]
)
@pytest.mark.parametrize("window", [None, (9, 3)], ids=["causal", "window"])
def test_tile_edges_under_a_band(tiles, t_q, t_k, window):
    """BLOCK_M != BLOCK_N both ways, the band's diagonal shifted both ways: every masked/unmasked split."""
    q, k, v = inputs((1, 2, 2, t_q, t_k, 24, 16))
    options = dict(causal=True, window=window)
    cotangent = torch.randn(1, 2, t_q, 16, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    want = all_derivatives(attend("reference", "softpick", **options), (q, k, v), cotangent, tangents)
    with override_tiles(*tiles):
        got = all_derivatives(attend("triton", "softpick", **options), (q, k, v), cotangent, tangents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)
