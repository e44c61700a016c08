"""torch.compile of normattn.attention: forward and backward with fullgraph=True on every backend,
and every torch.func transform traced around it exact or an error, never a different number."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import attend

import normattn
from normattn.normalizers import NORMALIZERS
from normattn.ops.attention import triton as flash
from normattn.ops.beta_linear import triton_chunk

NAMES = sorted(NORMALIZERS)
CASES = [(n, b) for n in NAMES for b in ("reference", "torch", "triton")] + [("beta", "triton-linear")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def _inputs(kv_heads=2, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 12, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, 12, 8, generator=g) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _forward_backward(f, inputs):
    out = f(*inputs)
    return [out, *torch.autograd.grad(out.square().sum(), inputs)]


@pytest.mark.parametrize(("name", "backend"), CASES, ids=str)
def test_fullgraph_forward_and_backward(name, backend):
    """Traced with AOTAutograd (``aot_eager``): the whole call is one graph, forward and backward."""
    options = dict(causal=True, window=(5, None)) if backend != "triton-linear" else dict(causal=True)
    f = attend(backend, name, **options)
    inputs = _inputs()
    want = _forward_backward(f, inputs)
    got = _forward_backward(torch.compile(f, fullgraph=True, backend="aot_eager"), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax"])
def test_inductor_on_the_cpu(name):
    """The torch backend's tiles compiled by Inductor, with a mask, grouped heads and sinks."""
    mask = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.2
    sinks = torch.zeros(2, requires_grad=True) if NORMALIZERS[name].sinks else None

    def f(q, k, v):
        return normattn.attention(
            q, k, v, normalizer=name, attn_mask=mask, enable_gqa=True, sinks=sinks, backend="torch"
        )

    inputs = _inputs(kv_heads=1)
    want = _forward_backward(f, inputs)
    got = _forward_backward(torch.compile(f, fullgraph=True), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _transforms(f, inputs, tangents):
    def loss(*x):
        return f(*x).square().sum()

    batched = [torch.stack([x, 0.5 * x]) for x in inputs]
    return {
        "jvp": lambda: torch.func.jvp(f, tuple(inputs), tuple(tangents))[1],
        "grad": lambda: torch.func.grad(loss, argnums=(0, 1, 2))(*inputs),
        "vmap": lambda: torch.func.vmap(f)(*batched),
        "jvp_of_grad": lambda: torch.func.jvp(
            lambda *x: torch.func.grad(loss, argnums=(0, 1, 2))(*x), tuple(inputs), tuple(tangents)
        )[1],
    }


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks", "fullgraph"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_func_transforms_inside_compile_are_exact_or_raise(backend, fullgraph):
    f = attend(backend, "softmax", causal=True)
    inputs = [x.detach() for x in _inputs()]
    tangents = [torch.randn_like(x) for x in inputs]
    eager = _transforms(f, inputs, tangents)
    for name, run in _transforms(f, inputs, tangents).items():
        want = run() if name != "jvp_of_grad" else eager[name]()
        torch._dynamo.reset()
        try:
            got = torch.compile(run, fullgraph=fullgraph, backend="aot_eager")()
        except Exception as error:  # noqa: BLE001 - any error is fine; a wrong number is not
            assert str(error), name
            continue
        got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} under torch.compile")


def test_seed_mode_under_compile_keeps_the_shortcut():
    """grad="seed" breaks the graph: compiled code differentiates by the shortcut, as eager code does."""
    f = attend("torch", "beta", causal=True, grad="seed")
    inputs = _inputs()
    want = _forward_backward(f, inputs)
    got = _forward_backward(torch.compile(f, backend="aot_eager"), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    tangents = [torch.randn_like(x) for x in inputs]
    detached = [x.detach() for x in inputs]
    jvp = lambda *x: torch.func.jvp(f, x, tuple(tangents))[1]  # noqa: E731
    torch.testing.assert_close(torch.compile(jvp, backend="aot_eager")(*detached), jvp(*detached))


def _flash_config():
    spec = NORMALIZERS["softmax"]
    return (spec.kernel, spec.shift_floor, spec.normalized, spec.alpha, 0.5, 0.0, 2**31 - 1, 0, 0.0, False)


def test_bare_ops_refuse_forward_mode_instead_of_dropping_it():
    """PyTorch drops tangents through custom ops; ours raise instead (and keep their backward)."""
    import torch.autograd.forward_ad as fwad

    q, k, v = (x.detach().contiguous() for x in _inputs())
    with fwad.dual_level():
        with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
            flash.flash_forward_op(fwad.make_dual(q, q), k, v, None, None, None, *_flash_config())
        with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
            triton_chunk.forward_op(fwad.make_dual(q, q), k, v, 0.5, True, 16)
    o, stat = flash.flash_forward_op(q, k, v, None, None, None, *_flash_config())
    leaf = o.detach().requires_grad_()
    out = flash.flash_backward_op(
        q, k, v, None, None, None, leaf, stat, torch.ones_like(o), *_flash_config()
    )[0]
    with pytest.raises(NotImplementedError, match="no reverse-mode derivative"):
        out.sum().backward()


def test_chunk_ops_pass_opcheck():
    q, k, v = (x.detach().contiguous() for x in _inputs())
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(triton_chunk.forward_op, (q, k, v, 0.5, True, 16), test_utils=tests)
    o, r = triton_chunk.forward_op(q, k, v, 0.5, True, 16)
    torch.library.opcheck(
        triton_chunk.backward_op,
        (q, k, v, o, r, torch.ones_like(o), 0.5, True, False, 16),
        test_utils=tests[:2],
    )
    torch.library.opcheck(
        triton_chunk.jvp_op, (q, k, v, o, r, q, k, v, 0.5, True, False, 16), test_utils=tests[:2]
    )
    assert math.isfinite(o.sum().item())
