"""What real models pass: grouped-query heads, boolean masks, sliding windows, dropout, sinks.

Softmax is checked against PyTorch's math SDPA in float64 (values, gradients, and ``torch.func.jvp``
against ``jvp`` of math SDPA); every normalizer against the independent materialized reference and
by float64 gradcheck, each feature alone and combined.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    F64,
    UGLY_SHAPES,
    all_derivatives,
    attend,
    attention_ref,
    call_with_defaults,
    gradcheck,
    inputs,
    shape_id,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import normattn
from normattn.normalizers import NORMALIZERS
from normattn.ops.attention import blockwise
from normattn.ops.triton_utils import override_tiles

NAMES = sorted(NORMALIZERS)
KERNEL_BACKENDS = ("torch", "triton")
# Tq != Tk with a partial tile, dv != d: the ugly shape the interpreter can afford for every normalizer
TRITON_UGLY_SHAPE = (2, 1, 1, 7, 63, 24, 16)


def _band_mask(t_q, t_k, causal=False, window=None):
    """The boolean mask SDPA needs for our band (bottom-right aligned)."""
    i, j = torch.arange(t_q)[:, None], torch.arange(t_k)[None, :]
    off = t_k - t_q
    keep = torch.ones(t_q, t_k, dtype=torch.bool)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is not None:
        keep &= j >= i + off - left
    if right is not None:
        keep &= j <= i + off + right
    return keep


def _random_mask(shape, masked_fraction, generator=None):
    """A random mask with every row keeping at least one key (SDPA gives NaN on empty rows)."""
    mask = torch.rand(shape, generator=generator) >= masked_fraction
    mask[..., 0] = True
    return mask


def _sdpa_math(q, k, v, mask, enable_gqa):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


SDPA_CASES = {
    "gqa2": dict(heads=(4, 2)),
    "gqa4": dict(heads=(4, 1)),
    "mha-as-gqa": dict(heads=(4, 4)),
    "random-90%": dict(mask="random"),
    "key-padding": dict(mask="padding"),
    "padding+causal": dict(mask="padding", causal=True),
    "random+causal+gqa": dict(mask="random", causal=True, heads=(4, 2)),
    "window": dict(window=(5, 3)),
    "causal-window": dict(window=(6, None), causal=True),
    "window+padding+gqa": dict(window=(4, 0), mask="padding", heads=(4, 2)),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(SDPA_CASES), ids=str)
def test_softmax_matches_math_sdpa(case, backend):
    spec = SDPA_CASES[case]
    h, h_kv = spec.get("heads", (2, 2))
    b, t_q, t_k = 2, 37, 45
    q, k, v = inputs((b, h, h_kv, t_q, t_k, 24, 16))
    mask = None
    if spec.get("mask") == "random":
        mask = _random_mask((b, h, t_q, t_k), 0.9)
    elif spec.get("mask") == "padding":
        lengths = torch.tensor([t_k, t_k - 11])
        mask = (torch.arange(t_k)[None, :] < lengths[:, None])[:, None, None, :]
    causal, window = spec.get("causal", False), spec.get("window")
    band = _band_mask(t_q, t_k, causal, window)
    full = band if mask is None else band & mask
    full = full & full.any(-1, keepdim=True) | (~full.any(-1, keepdim=True) & (torch.arange(t_k) == t_k - 1))
    # rows the band leaves empty get key Tk-1 back in both, so SDPA stays finite
    ours_mask = full.expand(b, h, t_q, t_k) if (mask is not None or window is not None) else None
    kwargs = dict(enable_gqa=h != h_kv)
    f = (
        attend(backend, "softmax", attn_mask=ours_mask, causal=False, **kwargs)
        if ours_mask is not None
        else attend(backend, "softmax", causal=causal, **kwargs)
    )
    cotangent = torch.randn(b, h, t_q, v.shape[-1], dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    sdpa_mask = full if ours_mask is not None else band
    want = all_derivatives(
        lambda q, k, v: _sdpa_math(q, k, v, sdpa_mask, h != h_kv), (q, k, v), cotangent, tangents
    )
    with override_tiles(16, 16):
        got = all_derivatives(f, (q, k, v), cotangent, tangents)
    for what, a, c in zip(("out", "dq", "dk", "dv", "jvp"), got, want):
        torch.testing.assert_close(a, c, **F64, msg=what)


def test_window_and_mask_combine_with_causal_by_and():
    q, k, v = inputs((1, 2, 2, 20, 20, 8, 8))
    mask = _random_mask((1, 1, 20, 20), 0.5)
    combined = normattn.attention(q, k, v, causal=True, window=(3, 2), attn_mask=mask, backend="torch")
    explicit = normattn.attention(q, k, v, attn_mask=mask & _band_mask(20, 20, True, (3, 2)), backend="torch")
    torch.testing.assert_close(combined, explicit, **F64)


# -- every normalizer, every feature, against the independent reference and by gradcheck --------

FEATURES = {
    "gqa": dict(heads=(4, 2)),
    "mask": dict(mask=0.6),
    "window": dict(window=(4, 2)),
    "causal-window": dict(causal=True, window=(5, None)),
    "all": dict(heads=(4, 2), mask=0.5, causal=True, window=(6, None)),
}


def _feature_call(name, feature, backend, shape=(2, 4, 4, 19, 23, 6, 5)):
    spec = FEATURES[feature]
    h, h_kv = spec.get("heads", (2, 2))
    b, _, _, t_q, t_k, d, dv = shape
    q, k, v = inputs((b, h, h_kv, t_q, t_k, d, dv))
    mask = None
    if "mask" in spec:
        mask = torch.rand(b, 1, t_q, t_k) >= spec["mask"]  # rows may end up empty: they give 0
    options = dict(
        attn_mask=mask, causal=spec.get("causal", False), window=spec.get("window"), enable_gqa=h != h_kv
    )
    primals = [q, k, v]
    if NORMALIZERS[name].sinks:
        primals.append(torch.randn(h, dtype=torch.float64))
    return attend(backend, name, **options), primals, options


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name", NAMES)
def test_features_match_the_definition(name, feature, backend, monkeypatch):
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 8)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 8)
    f, primals, options = _feature_call(name, feature, backend)
    q, k, v, *sinks = primals
    mask = options["attn_mask"]
    ref = attention_ref(
        q, k, v, name, causal=options["causal"], window=options["window"], sinks=sinks[0] if sinks else None,
        attn_mask=None if mask is None else mask.expand(q.shape[0], q.shape[1], -1, -1),
    )  # fmt: skip
    cotangent = torch.randn_like(ref)
    tangents = [torch.randn_like(x) for x in primals]
    want = all_derivatives(attend("reference", name, **options), primals, cotangent, tangents)
    torch.testing.assert_close(want[0], ref, **F64)
    with override_tiles(16, 16):
        got = all_derivatives(f, primals, cotangent, tangents)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, **F64)


@pytest.mark.parametrize(
    ("backend", "shape"),
    [("torch", shape) for shape in UGLY_SHAPES] + [("triton", TRITON_UGLY_SHAPE)],
    ids=lambda x: x if isinstance(x, str) else shape_id(x),
)
@pytest.mark.parametrize("name", NAMES)
def test_all_features_gradcheck_on_ugly_shapes(name, backend, shape, monkeypatch):
    """GQA, a random mask, causal and a window at once, on the ugly lengths and head dims (random
    projections; the Triton interpreter takes one of them, the torch backend all)."""
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 32)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 16)
    f, primals, _ = _feature_call(name, "all", backend, shape=shape)
    with override_tiles(32, 16):
        assert gradcheck(f, primals, fast=True, interpreted=backend == "triton")


@pytest.mark.parametrize("backend", ("reference", *KERNEL_BACKENDS))
@pytest.mark.parametrize("feature", ["gqa", "mask", "window", "all"])
@pytest.mark.parametrize("name", NAMES)
def test_features_gradcheck(name, feature, backend):
    f, primals, _ = _feature_call(name, feature, backend, shape=(1, 4, 4, 7, 9, 3, 2))
    with override_tiles(16, 16):
        assert gradcheck(f, primals, interpreted=backend == "triton")


# -- grouped-query heads and broadcast masks cost no repeated memory ----------------------------


@pytest.mark.parametrize(
    ("backend", "name"),
    [("torch", "sigmoid"), ("torch", "beta"), ("triton", "sigmoid"), ("triton-linear", "beta")],
    ids=str,
)
def test_kernels_never_repeat_keys_or_expand_masks(backend, name, monkeypatch):
    """The kernel backends use the shared key/value heads and the broadcast mask in place (the
    torch backend's beta is its linear-time path here: a key-padding mask)."""
    for method in ("repeat_interleave", "repeat", "contiguous"):
        original = getattr(torch.Tensor, method)

        def refuse(self, *args, _original=original, _name=method, **kwargs):
            if self.dim() == 4 and self.shape[-2] == 23:  # a key, value or mask tensor of this call
                raise AssertionError(f"{_name} on a (.., Tk, ..) tensor")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, refuse)
    q, k, v = inputs((2, 4, 2, 19, 23, 8, 8), transposed=False)
    mask = (torch.arange(23) < 20)[None, None, None, :].expand(2, 1, 1, 23)
    out = normattn.attention(q, k, v, attn_mask=mask, enable_gqa=True, backend=backend, normalizer=name)
    monkeypatch.undo()
    want = attention_ref(q, k, v, name, attn_mask=mask)
    torch.testing.assert_close(out, want, **F64)


def test_blockwise_key_gradients_are_formed_for_the_shared_heads_only(monkeypatch):
    """The torch backend's backward and gradient of the JVP accumulate ``dk, dv`` (and the tangents')
    in buffers of the ``H_kv`` heads, not one per query head that is summed afterwards."""
    buffers = []
    original = blockwise._Call.key_zeros
    monkeypatch.setattr(
        blockwise._Call, "key_zeros", lambda self, width: buffers.append(original(self, width)) or buffers[-1]
    )
    q, k, v = inputs((2, 8, 2, 19, 23, 8, 6))
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    cotangent = torch.randn(2, 8, 19, 6, dtype=torch.float64)

    def derivatives(backend):
        f = attend(backend, "sigmoid", causal=True, enable_gqa=True)
        tangent_loss = lambda *x: torch.func.jvp(f, x[:3], x[3:])[1].square().sum()  # noqa: E731
        tangent_grads = torch.func.grad(tangent_loss, argnums=tuple(range(6)))(q, k, v, *tangents)
        return all_derivatives(f, (q, k, v), cotangent, tangents) + list(tangent_grads)

    got = derivatives("torch")
    assert buffers and all(b.shape[1:3] == (2, 1) for b in buffers)
    for a, c in zip(got, derivatives("reference"), strict=True):
        torch.testing.assert_close(a, c, **F64)


def test_a_broadcast_mask_stays_a_view():
    from normattn import _checks

    q, k = torch.randn(8, 4, 512, 16), torch.randn(8, 4, 1024, 16)
    mask = torch.ones(8, 1, 1, 1024, dtype=torch.bool)
    view = _checks.attn_mask(mask, q, k)
    assert view.shape == (8, 1, 512, 1024) and view.untyped_storage().nbytes() == 8 * 1024


# -- skipping the tiles a band or a mask hides ----------------------------------------------------


def test_blockwise_visits_only_the_tiles_a_window_lets_it_see(monkeypatch):
    """Cost grows with T * window, not T^2: count the score elements the blockwise kernels form."""
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 64)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 64)
    formed = []
    original = blockwise._Call.scores
    monkeypatch.setattr(
        blockwise._Call,
        "scores",
        lambda self, rows, keys: (
            formed.append((rows.stop - rows.start) * (keys.stop - keys.start)) or original(self, rows, keys)
        ),
    )
    t, w = 2048, 128
    q, k, v = inputs((1, 1, 1, t, t, 8, 8), transposed=False)
    # sigmoid: plain softmax on a band goes to PyTorch's fused kernel (the next test)
    normattn.attention(q, k, v, normalizer="sigmoid", causal=True, window=(w, None), backend="torch")
    # the band, plus at most two edge tiles per row block
    assert t * w <= sum(formed) <= t * (w + 2 * 64) * 1.1
    formed.clear()
    padding = (torch.arange(t) < 256)[None, None, None, :]  # only the first 256 keys exist
    normattn.attention(q, k, v, attn_mask=padding, backend="torch")
    assert t * 256 <= sum(formed) <= t * 256 * 1.1


@pytest.mark.parametrize(
    "t_q, t_k, causal, window",
    [(2048, 2048, True, (128, None)), (2048, 2048, False, (100, 27)), (700, 2048, True, (128, None))],
    ids=str,
)
def test_fused_softmax_on_a_band_sees_only_the_band(t_q, t_k, causal, window, monkeypatch):
    """Softmax on a band runs PyTorch's fused CPU kernel in row chunks, each against only the keys
    its rows can see: the work grows with T * window, and values and gradients stay exact."""
    formed = []
    original = blockwise._fused_band_chunks

    def counted(problem, q, k):
        for rows, keys, mask, is_causal in original(problem, q, k):
            formed.append((rows.stop - rows.start) * (keys.stop - keys.start))
            yield rows, keys, mask, is_causal

    monkeypatch.setattr(blockwise, "_fused_band_chunks", counted)
    q, k, v = inputs((1, 2, 2, t_q, t_k, 8, 8), transposed=False)
    f = attend("torch", "softmax", causal=causal, window=window)
    f(q, k, v)
    width = window[0] + (window[1] or 0) + 1
    assert t_q * width <= sum(formed) <= t_q * (width + blockwise.FUSED_BAND_ROWS)
    cotangent = torch.randn(1, 2, t_q, 8, dtype=torch.float64)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    got = all_derivatives(f, (q, k, v), cotangent, tangents)
    reference = attend("reference", "softmax", causal=causal, window=window)
    want = all_derivatives(reference, (q, k, v), cotangent, tangents)
    for what, a, c in zip(("out", "dq", "dk", "dv", "jvp"), got, want):
        torch.testing.assert_close(a, c, **F64, msg=what)


# -- dropout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ("reference", *KERNEL_BACKENDS))
def test_dropout_keeps_w_over_1_minus_p_and_drops_about_p(backend):
    """With v = I the output is the dropped weight matrix itself."""
    p, t = 0.3, 64
    q = torch.randn(1, 2, t, 8, dtype=torch.float64)
    k = torch.randn(1, 2, t, 8, dtype=torch.float64)
    eye = torch.eye(t, dtype=torch.float64).expand(1, 2, t, t)
    weights = normattn.attention(q, k, eye, backend="reference")
    with override_tiles(16, 16):
        dropped = normattn.attention(
            q, k, eye, dropout_p=p, generator=torch.Generator().manual_seed(1), backend=backend
        )
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), **F64)
    assert abs((~kept).double().mean().item() - p) < 0.02


def test_dropout_is_the_same_on_every_backend_for_the_same_generator_state():
    q, k, v = inputs((2, 4, 2, 33, 41, 8, 8))
    results = []
    for backend in ("reference", *KERNEL_BACKENDS):
        with override_tiles(16, 16):
            generator = torch.Generator().manual_seed(7)
            out = normattn.attention(
                q, k, v, dropout_p=0.4, generator=generator, enable_gqa=True, backend=backend,
                normalizer="softpick", causal=True,
            )  # fmt: skip
        results.append(out)
    for out in results[1:]:
        torch.testing.assert_close(out, results[0], **F64)


def test_dropout_advances_the_generator_and_repeats_for_equal_states():
    q, k, v = inputs((1, 2, 2, 16, 16, 8, 8))
    g = torch.Generator().manual_seed(3)
    first = normattn.attention(q, k, v, dropout_p=0.5, generator=g, backend="torch")
    second = normattn.attention(q, k, v, dropout_p=0.5, generator=g, backend="torch")
    again = normattn.attention(
        q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(3), backend="torch"
    )
    assert not torch.equal(first, second) and torch.equal(first, again)
    no_dropout = normattn.attention(q, k, v, backend="torch")
    assert torch.equal(normattn.attention(q, k, v, dropout_p=0.0, backend="torch"), no_dropout)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_mean_converges_to_the_dropout_free_output(backend):
    q, k, v = inputs((1, 1, 1, 8, 8, 4, 4))
    g = torch.Generator().manual_seed(0)
    outs = torch.stack(
        [normattn.attention(q, k, v, dropout_p=0.5, generator=g, backend=backend) for _ in range(800)]
    )
    exact = normattn.attention(q, k, v, backend=backend)
    spread = outs.std(0) / 800**0.5
    assert ((outs.mean(0) - exact).abs() <= 5 * spread + 1e-9).all()


@pytest.mark.parametrize("backend", ("reference", *KERNEL_BACKENDS))
@pytest.mark.parametrize("name", NAMES)
def test_dropout_backward_and_jvp_regenerate_the_forward_masks(name, backend):
    """gradcheck of a function that reseeds its generator on every call: a backward or JVP that
    drew other bits than its forward would not be the derivative of the function."""
    q, k, v = inputs((1, 2, 2, 9, 11, 4, 3))

    def f(q, k, v):
        g = torch.Generator().manual_seed(11)
        return normattn.attention(
            q, k, v, normalizer=name, dropout_p=0.3, generator=g, causal=True, backend=backend
        )

    with override_tiles(16, 16):
        assert gradcheck(f, (q, k, v), interpreted=backend == "triton")


# -- the linear-time paths --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton-linear"])
def test_linear_beta_takes_gqa_and_key_padding(backend):
    q, k, v = inputs((2, 4, 2, 21, 21, 8, 6))
    padding = (torch.arange(21)[None, :] < torch.tensor([21, 15])[:, None])[:, None, None, :]
    f = attend(backend, "beta", causal=True, attn_mask=padding, enable_gqa=True)
    want = attention_ref(q, k, v, "beta", causal=True, attn_mask=padding.expand(2, 4, 21, 21))
    torch.testing.assert_close(f(q, k, v), want, **F64)
    assert gradcheck(f, (q, k, v), fast=True)


# -- bad input ----------------------------------------------------------------------------------

GOOD = dict(q=(2, 4, 5, 8), k=(2, 4, 6, 8), v=(2, 4, 6, 4))


def _call(**kwargs):
    return call_with_defaults(GOOD, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (
            dict(attn_mask=torch.ones(3, 1, 5, 6, dtype=torch.bool)),
            ValueError,
            r"attn_mask of shape \(3, 1, 5, 6\) is not broadcastable to .*\(2, 4, 5, 6\)",
        ),
        (dict(attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError, r"attn_mask of shape \(5, 7\)"),
        (
            dict(attn_mask=torch.zeros(5, 6)),
            TypeError,
            r"attn_mask must be a boolean tensor.*torch.float32.*pass a boolean mask",
        ),
        (
            dict(attn_mask=torch.ones(5, 6, dtype=torch.bool, device="meta")),
            ValueError,
            r"attn_mask is on meta, but q is on cpu",
        ),
        (dict(window=(-1, 2)), ValueError, r"window's left bound must be >= 0, got -1"),
        (dict(window=(1, -2)), ValueError, r"window's right bound must be >= 0, got -2"),
        (dict(window=3), TypeError, r"window must be a pair \(left, right\)"),
        (dict(window=(1.5, None)), TypeError, r"window's left bound must be an int >= 0 or None, got 1.5"),
        (dict(window=(1, 2, 3)), TypeError, r"window must be a pair"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
        (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float"),
        (dict(generator=3), TypeError, r"generator must be a torch.Generator"),
        (
            dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 4), enable_gqa=True),
            ValueError,
            r"multiple of the key/value heads \(3\)",
        ),
        (
            dict(k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 4)),
            ValueError,
            r"q has 4 heads but k and v have 2: pass enable_gqa=True",
        ),
        (dict(enable_gqa=1), TypeError, r"enable_gqa must be a bool"),
        (
            dict(normalizer="beta", backend="triton-linear", attn_mask=torch.ones(5, 6, dtype=torch.bool)),
            ValueError,
            r'backend="triton-linear": a general attn_mask.*use backend="triton" or "torch"',
        ),
        (
            dict(normalizer="beta", backend="triton-linear", dropout_p=0.1),
            ValueError,
            r'backend="triton-linear": dropout.*use backend="triton" or "torch"',
        ),
        (
            dict(normalizer="beta", backend="triton-linear", window=(2, 0)),
            ValueError,
            r'backend="triton-linear": this backend has no linear-time sliding window.*"torch"',
        ),
    ],
)
def test_bad_input(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**kwargs)


def test_generator_on_another_device():
    q, k, v = (torch.randn(shape, device="meta") for shape in (GOOD["q"], GOOD["k"], GOOD["v"]))
    with pytest.raises(ValueError, match=r"generator is on cpu, but the inputs are on meta"):
        normattn.attention(q, k, v, dropout_p=0.1, generator=torch.Generator())
