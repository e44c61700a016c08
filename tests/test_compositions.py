"""Every composition of derivatives through normattn.attention: exact, or a clear error. Never wrong.

Each composition is computed on the backend under test and on the reference backend (materialized
attention, plain autograd); the test passes when the two agree or the backend raises, and fails on
any other number.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

import normattn

CASES = [
    ("softmax", "torch"),
    ("softmax", "triton"),
    ("beta", "torch"),
    ("beta", "triton"),
    ("beta", "triton-linear"),
]


def _inputs(seed, shape=(1, 2, 6, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=torch.float64, generator=g) for _ in range(3)]


def _compositions(f):
    x, t, t2, c = _inputs(1), _inputs(2), _inputs(3), _inputs(4)[0]

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
    }


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [leaf for item in result for leaf in _flat(item)]


def _attention(backend, normalizer):
    return lambda q, k, v: normattn.attention(q, k, v, normalizer=normalizer, causal=True, backend=backend)


@pytest.mark.parametrize(("normalizer", "backend"), CASES, ids=lambda x: str(x))
def test_every_composition_is_exact_or_raises(normalizer, backend):
    reference = _compositions(_attention("reference", normalizer))
    candidate = _compositions(_attention(backend, normalizer))
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
    # first-order derivatives must always work
    for name in ("grad", "vjp", "jvp", "forward_ad"):
        assert outcomes[name] == "exact", (name, outcomes)


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


@pytest.mark.parametrize(("normalizer", "backend"), CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("use_tangent", [False, True], ids=["dy-detached", "dy"])
def test_jvp_training_step(normalizer, backend, use_tangent):
    """``y, dy = jvp(block, x, tx)``, loss on ``y`` and ``dy``: parameter gradients exact or an error."""
    block = _Block()
    x, tx = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)

    def parameter_grads(backend):
        y, dy = jvp(lambda x: block(x, backend, normalizer), (x,), (tx,))
        loss = (y**2).mean() + ((dy if use_tangent else dy.detach()) ** 2).mean()
        return torch.autograd.grad(loss, list(block.parameters()))

    want = parameter_grads("reference")
    try:
        got = parameter_grads(backend)
    except NotImplementedError as error:
        assert use_tangent and backend in str(error)
        return
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
