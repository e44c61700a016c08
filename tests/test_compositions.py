"""Every composition of derivatives through normattn.attention: exact, or a clear error. Never wrong.

Each composition is computed on the backend under test and on the reference backend (materialized
attention, plain autograd); the test passes when the two agree or the backend raises, and fails on
any other number.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import UGLY_SHAPES, attend, gradcheck, inputs, shape_id
from torch.func import grad, jvp, vjp, vmap

import normattn
from normattn.normalizers import NORMALIZERS
from normattn.ops.attention import blockwise
from normattn.ops.beta_linear import chunk
from normattn.ops.triton_utils import override_tiles

NAMES = sorted(NORMALIZERS)
# every normalizer on the two kernel backends, and beta's two linear-time paths (the torch
# backend computes beta in linear time where the call allows it, so its beta case is the linear one)
CASES = [(name, backend) for name in NAMES for backend in ("torch", "triton")] + [("beta", "triton-linear")]
# a JVP of a JVP (second-order forward mode) is the one composition no backend implements
RAISES = {"jvp_of_jvp"}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 4)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 4)
    with override_tiles(16, 16):
        yield


def _inputs(seed, kv_heads=2):
    """q (1, 2, 6, 4) and k, v with ``kv_heads`` heads."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64, generator=g)
    return [q, *(torch.randn(1, kv_heads, 6, 4, dtype=torch.float64, generator=g) for _ in range(2))]


def _compositions(f, kv_heads=2):
    x, t, t2 = _inputs(1, kv_heads), _inputs(2, kv_heads), _inputs(3, kv_heads)
    c = _inputs(4)[0]

    def loss(q, k, v):
        return (f(q, k, v) * c).sum()

    def double_backward():
        xs = [a.clone().requires_grad_() for a in x]
        g = torch.autograd.grad(loss(*xs), xs, create_graph=True)
        return torch.autograd.grad(sum((gi * ti).sum() for gi, ti in zip(g, t)), xs)

    def backward_of_jvp():
        xs = [a.clone().requires_grad_() for a in x]
        ts = [a.clone().requires_grad_() for a in t]
        o, od = jvp(f, tuple(xs), tuple(ts))
        return torch.autograd.grad((od * c).sum() + (o * o).sum(), xs + ts)

    def forward_ad():
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level():
            duals = [fwad.make_dual(a, b) for a, b in zip(x, t)]
            return fwad.unpack_dual(f(*duals)).tangent

    batched = [torch.stack([a, 0.5 * a]) for a in x + t]
    return {
        "grad": lambda: grad(loss, argnums=(0, 1, 2))(*x),
        "vjp": lambda: vjp(f, *x)[1](c),
        "jvp": lambda: jvp(f, tuple(x), tuple(t)),
        "forward_ad": forward_ad,
        "double_backward": double_backward,
        "backward_of_jvp": backward_of_jvp,
        "grad_of_jvp": lambda: grad(lambda *a: (jvp(f, a[:3], a[3:])[1] * c).sum(), argnums=tuple(range(6)))(
            *x, *t
        ),
        "jvp_of_grad": lambda: jvp(lambda *a: grad(loss, argnums=(0, 1, 2))(*a), tuple(x), tuple(t))[1],
        "jvp_of_jvp": lambda: jvp(lambda *a: jvp(f, a, tuple(t))[1], tuple(x), tuple(t2))[1],
        "vjp_of_vjp": lambda: vjp(lambda *a: vjp(f, *a)[1](c), *x)[1](tuple(t)),
        "vmap": lambda: vmap(f)(*batched[:3]),
        "vmap_grad": lambda: vmap(grad(loss, argnums=(0, 1, 2)))(*batched[:3]),
        "vmap_jvp": lambda: vmap(lambda *a: jvp(f, a[:3], a[3:])[1])(*batched),
        "vmap_vjp": lambda: vmap(lambda *a: vjp(f, *a)[1](c))(*batched[:3]),
    }


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [leaf for item in result for leaf in _flat(item)]


def _attention(backend, normalizer, **options):
    return lambda q, k, v: normattn.attention(q, k, v, normalizer=normalizer, backend=backend, **options)


def _check_compositions(reference, candidate, backend):
    outcomes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, run in candidate.items():
            want = _flat(reference[name]())
            try:
                got = _flat(run())
            except (NotImplementedError, RuntimeError) as error:
                message = str(error)
                # a clear error names the backend (ours) or the unsupported transform (torch's)
                assert backend in message or "vmap" in message, f"{name}: unclear error: {message}"
                outcomes[name] = "raises"
                continue
            assert len(got) == len(want), name
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"{backend} {name}: wrong")
            outcomes[name] = "exact"
    return outcomes


OPTIONS = {
    "causal": dict(causal=True),
    "window+mask+gqa": dict(
        window=(2, 1),
        enable_gqa=True,
        attn_mask=torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3,
    ),
    # the torch backend's own window paths: PyTorch's fused kernel on the band (softmax) and the
    # linear-time window form (beta); the Triton kernels take it as the window above
    "causal-window+gqa": dict(causal=True, window=(3, None), enable_gqa=True),
    "causal+gqa": dict(causal=True, enable_gqa=True),  # the linear-time chunked form shares key states
}


@pytest.mark.parametrize("options", list(OPTIONS), ids=str)
@pytest.mark.parametrize(("normalizer", "backend"), CASES, ids=lambda x: str(x))
def test_every_composition_is_exact_or_raises(normalizer, backend, options):
    kwargs = dict(OPTIONS[options])
    if backend == "triton-linear" and options not in ("causal", "causal+gqa"):
        pytest.skip("the linear-time form takes no window or general mask (a ValueError, tested elsewhere)")
    if backend == "triton" and options in ("causal-window+gqa", "causal+gqa"):
        pytest.skip("the Triton kernels take grouped heads and windows in the window+mask+gqa case")
    kv_heads = 1 if kwargs.get("enable_gqa") else 2
    reference = _compositions(_attention("reference", normalizer, **kwargs), kv_heads)
    candidate = _compositions(_attention(backend, normalizer, **kwargs), kv_heads)
    outcomes = _check_compositions(reference, candidate, backend)
    assert {name for name, outcome in outcomes.items() if outcome == "raises"} == RAISES, outcomes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seed_mode_first_derivatives_only(backend):
    """grad="seed" defines the shortcut VJP and JVP; differentiating them again is a clear error."""
    f = _attention(backend, "beta", grad="seed", window=(3, None))
    x, t = _inputs(1), _inputs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.func.jvp(f, tuple(x), tuple(t))  # first order works
        with pytest.raises(NotImplementedError, match='grad="seed" defines first derivatives only'):
            torch.func.grad(lambda *a: torch.func.jvp(f, a[:3], a[3:])[1].sum(), argnums=0)(*x, *t)


# Every ugly shape on the reference and torch backends; the interpreted Triton kernels (which pay per
# launch) take the single-element one and the one with Tq != Tk, a partial tile and dv != d.
MAP_CASES = [
    (name, backend, shape)
    for name in NAMES
    for backend, shapes in (
        ("reference", UGLY_SHAPES),
        ("torch", UGLY_SHAPES),
        ("triton", (UGLY_SHAPES[0], UGLY_SHAPES[4])),
    )
    for shape in shapes
] + [("beta", "triton-linear", shape) for shape in (UGLY_SHAPES[0], UGLY_SHAPES[4])]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    ("normalizer", "backend", "shape"), MAP_CASES, ids=lambda x: x if isinstance(x, str) else shape_id(x)
)
def test_gradcheck_of_the_map_to_output_and_tangent(normalizer, backend, causal, shape, monkeypatch):
    """float64 gradcheck of ``(q, k, v, qd, kd, vd) -> (O, Od)`` on the ugly shapes (non-contiguous
    inputs, ``Tq != Tk``, ``dv != d``): the tangent output's derivatives."""
    if max(shape[3:5]) > 16:  # tiles that leave a partial tile at every ugly length, but not thousands
        monkeypatch.setattr(blockwise, "QUERY_BLOCK", 32)
        monkeypatch.setattr(blockwise, "KEY_BLOCK", 16)
    primals = inputs(shape)
    if NORMALIZERS[normalizer].sinks:
        primals.append(torch.randn(shape[1], dtype=torch.float64))
    tangents = [torch.randn_like(x) for x in primals]
    f = attend(backend, normalizer, causal=causal)
    n = len(primals)

    def output_and_tangent(*args):
        return torch.func.jvp(f, args[:n], args[n:])

    interpreted = backend.startswith("triton")
    tiles = (128, 64) if max(shape[3:5]) > 16 else (16, 16)
    with override_tiles(*tiles):
        assert gradcheck(output_and_tangent, (*primals, *tangents), interpreted=interpreted, forward_ad=False)


class _Block(torch.nn.Module):
    """qkv projection, attention, output projection: the block of a consistency-model step."""

    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width, dtype=torch.float64)
        self.proj = torch.nn.Linear(width, width, dtype=torch.float64)

    def forward(self, x, backend, normalizer):
        b, t, width = x.shape
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in self.qkv(x).split(width, -1))
        o = normattn.attention(q, k, v, normalizer=normalizer, causal=True, backend=backend)
        return self.proj(o.transpose(1, 2).reshape(b, t, width))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", ["torch", "triton-linear"])
def test_linear_beta_gradient_through_the_jvp_with_a_padded_last_chunk(backend, causal):
    """T = chunk + 1 leaves 63 zero rows in the last chunk: their norm r = 0 must not turn into NaN
    (sqrt's infinite slope times 0) in the forward-mode pass through the backward."""
    t = chunk.CHUNK_SIZE + 1
    primals = inputs((1, 2, 2, t, t, 8, 8))
    tangents = [torch.randn_like(x) for x in primals]
    weights = [torch.randn(1, 2, t, 8, dtype=torch.float64) for _ in range(2)]

    def loss_gradients(backend):
        f = attend(backend, "beta", causal=causal)
        xs = [x.detach().requires_grad_() for x in (*primals, *tangents)]
        out, out_dot = jvp(f, tuple(xs[:3]), tuple(xs[3:]))
        return torch.autograd.grad((out * weights[0]).sum() + (out_dot * weights[1]).sum(), xs)

    for got, want in zip(loss_gradients(backend), loss_gradients("reference"), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("normalizer", "backend"), CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("use_tangent", [False, True], ids=["dy-detached", "dy"])
def test_jvp_training_step(normalizer, backend, use_tangent):
    """``y, dy = jvp(block, x, tx)``, a loss on ``y`` and ``dy``: parameter gradients within 1e-10
    of the reference backend's."""
    block = _Block()
    x, tx = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)

    def parameter_grads(backend):
        y, dy = jvp(lambda x: block(x, backend, normalizer), (x,), (tx,))
        loss = (y**2).mean() + ((dy if use_tangent else dy.detach()) ** 2).mean()
        return torch.autograd.grad(loss, list(block.parameters()))

    want = parameter_grads("reference")
    got = parameter_grads(backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
