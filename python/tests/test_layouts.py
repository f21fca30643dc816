"""Strided inputs reach the C library as strides (no copy), the time-folded layout round-trips, and in-place
depth-gradient buffers are written where they live."""

import numpy as np
import pytest

import moda
from moda import _lib
from moda_reference import backward, forward, make_inputs


class Spy:
    """Records the moda_tensor views handed to a C entry point."""

    def __init__(self, monkeypatch, name):
        lib = _lib.lib()
        self.real = getattr(lib, name)
        self.calls = []
        monkeypatch.setattr(lib, name, self)

    def __call__(self, *args):
        self.calls.append([getattr(a, "_obj", None) for a in args])
        return self.real(*args)

    def tensor(self, i, call=-1):
        return self.calls[call][i]


FWD = {"q": 1, "k": 2, "v": 3, "kd": 4, "vd": 5, "o": 6, "lse": 7}


def _strides(a):
    return [s // a.itemsize for s in a.strides]


def test_fused_qkv_slices_and_transposed_k_are_passed_without_copy(rng, monkeypatch):
    B, T, Hk, G, d = 2, 5, 2, 2, 8
    qkv = rng.standard_normal((B, T, Hk * G + 2 * Hk, d))  # one projection output, sliced per head group
    q, k, v = qkv[:, :, :Hk * G], qkv[:, :, Hk * G:Hk * G + Hk], qkv[:, :, Hk * G + Hk:]
    k = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # stored [B, Hk, T, d]
    kd = rng.standard_normal((B, T, 3, Hk, d))
    vd = np.asfortranarray(rng.standard_normal((B, T, 3, Hk, d)))  # every stride reversed
    spy = Spy(monkeypatch, "moda_forward")
    o, lse = moda.attention_fwd(q, k, v, kd, vd)
    for name, a in (("q", q), ("k", k), ("v", v), ("kd", kd), ("vd", vd)):
        t = spy.tensor(FWD[name])
        assert t.data == a.ctypes.data, name + " was copied"
        if name == "q":
            assert list(t.stride)[:5] == [_strides(a)[0], _strides(a)[1], G * _strides(a)[2], _strides(a)[2], 1]
        else:
            assert list(t.stride)[:a.ndim] == _strides(a), name
    o_ref, lse_ref = forward(q, k, v, kd, vd)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12, atol=1e-12)


def test_broadcast_stride_zero_inputs(rng):
    x = make_inputs(rng, Hk=3, G=1)
    k1 = rng.standard_normal(x["k"].shape[:2] + (1, x["k"].shape[3]))
    x["k"] = np.broadcast_to(k1, x["k"].shape)  # read-only, stride 0 over the heads
    o = moda.attention(**x)
    np.testing.assert_allclose(o, forward(**x)[0], rtol=1e-12, atol=1e-12)


def test_negative_strides_are_copied_and_still_correct(rng):
    x = make_inputs(rng)
    x["q"] = x["q"][:, ::-1]
    x["kd"] = x["kd"][:, :, ::-1]
    o = moda.attention(**x)
    np.testing.assert_allclose(o, forward(**x)[0], rtol=1e-12, atol=1e-12)


def test_five_d_q_is_taken_as_is(rng):
    x = make_inputs(rng, Hk=2, G=3)
    q5 = x["q"].reshape(2, 6, 2, 3, 8)
    o5, lse5 = moda.attention_fwd(q5, x["k"], x["v"], x["kd"], x["vd"])
    o, lse = moda.attention_fwd(**x)
    assert o5.shape == (2, 6, 2, 3, 8) and lse5.shape == (2, 6, 2, 3)
    np.testing.assert_array_equal(o5.reshape(o.shape), o)
    np.testing.assert_array_equal(lse5.reshape(lse.shape), lse)


def test_folded_view_round_trip(rng):
    B, T, Hk, G, d = 2, 4, 3, 2, 5
    folded = rng.standard_normal((B, T * G, Hk, d))
    v = moda.folded_view(folded, G)
    assert v.shape == (B, T, Hk, G, d) and np.shares_memory(v, folded)
    for b, t, h, g in np.ndindex(B, T, Hk, G):
        np.testing.assert_array_equal(v[b, t, h, g], folded[b, t * G + g, h])
    back = moda.unfolded_view(v)
    assert back.shape == folded.shape and np.shares_memory(back, folded)
    np.testing.assert_array_equal(back, folded)
    with pytest.raises(moda.MODAError, match="not time-folded"):
        moda.unfolded_view(rng.standard_normal((B, T, Hk, G, d)))
    with pytest.raises(moda.MODAError, match="multiple"):
        moda.folded_view(folded, 3)


def test_attention_on_the_folded_layout_without_copies(rng, monkeypatch):
    B, T, Hk, G, d, L = 2, 5, 2, 3, 8, 4
    q_folded = rng.standard_normal((B, T * G, Hk, d))
    k, v = rng.standard_normal((2, B, T, Hk, d))
    kd_folded, vd_folded = rng.standard_normal((2, B, T * L, Hk, d))  # the authors' depth cache
    q, kd, vd = moda.folded_view(q_folded, G), moda.depth_view(kd_folded, L), moda.depth_view(vd_folded, L)
    assert np.shares_memory(kd, kd_folded)
    spy = Spy(monkeypatch, "moda_forward")
    o, lse = moda.attention_fwd(q, k, v, kd, vd)
    t = spy.tensor(FWD["q"])
    assert t.data == q_folded.ctypes.data
    assert list(t.stride) == [T * G * Hk * d, G * Hk * d, d, Hk * d, 1]
    # o comes back in the folded order too, so the authors' code can take it as [B, T*G, Hk, dv]
    o_folded = moda.unfolded_view(o)
    assert np.shares_memory(o_folded, o) and o_folded.flags.c_contiguous
    q_std = np.ascontiguousarray(q).reshape(B, T, Hk * G, d)
    o_ref, lse_ref = forward(q_std, k, v, kd, vd)
    np.testing.assert_allclose(o.reshape(B, T, Hk * G, d), o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse.reshape(B, T, Hk * G), lse_ref, rtol=1e-12, atol=1e-12)
    # the backward takes the same views; dq has q's folded layout
    do = rng.standard_normal(o.shape)
    dq, dk, dv, dkd, dvd = moda.attention_bwd(q, k, v, kd, vd, o, lse, do)
    want = backward(q_std, k, v, kd, vd, np.ascontiguousarray(do).reshape(B, T, Hk * G, d))
    np.testing.assert_allclose(dq, want[0].reshape(B, T, Hk, G, d), rtol=1e-10, atol=1e-11)
    assert moda.unfolded_view(dq).flags.c_contiguous
    for g, w in zip((dk, dv, dkd, dvd), want[1:]):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11)


def test_depth_gradient_buffers_are_written_in_place(rng):
    """Overwrite touches only the visible slots; accumulate adds into them; both through strided views."""
    x = make_inputs(rng, Lcap=5)
    kw = dict(depth_range=(1, 4))
    o, lse = moda.attention_fwd(**x, **kw)
    do = rng.standard_normal(o.shape)
    want = backward(**x, do=do, d0=1, d1=4)
    # dkd lives inside a larger buffer (every other head of a 2*Hk-head allocation)
    big = np.full(x["kd"].shape[:3] + (2 * x["kd"].shape[3], x["kd"].shape[4]), np.nan)
    dkd = big[:, :, :, ::2]
    dvd = np.full(x["vd"].shape, np.nan)
    res = moda.attention_bwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], o, lse, do, dkd=dkd, dvd=dvd, **kw)
    assert res[3] is dkd and res[4] is dvd
    np.testing.assert_allclose(dkd[:, :, 1:4], want[3][:, :, 1:4], rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(dvd[:, :, 1:4], want[4][:, :, 1:4], rtol=1e-10, atol=1e-11)
    assert np.all(np.isnan(dkd[:, :, [0, 4]])) and np.all(np.isnan(dvd[:, :, [0, 4]]))
    assert np.all(np.isnan(big[:, :, :, 1::2])), "wrote outside the view"
    # accumulate: a second layer's gradients add to what is there
    base_k = rng.standard_normal(x["kd"].shape)
    base_v = rng.standard_normal(x["vd"].shape)
    dkd, dvd = base_k.copy(), base_v.copy()
    moda.attention_bwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], o, lse, do, accumulate_depth_grad=True,
                       dkd=dkd, dvd=dvd, **kw)
    np.testing.assert_allclose(dkd - base_k, want[3], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dvd - base_v, want[4], rtol=1e-9, atol=1e-11)
    # without buffers, fresh zero-filled ones: the hidden slots read as the zero gradient they are
    _, _, _, dkd, dvd = moda.attention_bwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], o, lse, do, **kw)
    np.testing.assert_allclose(dkd, want[3], rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(dvd, want[4], rtol=1e-10, atol=1e-11)
