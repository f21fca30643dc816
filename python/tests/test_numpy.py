"""moda on NumPy arrays (the CPU path) against the float64 NumPy reference of spec.md and against finite
differences."""

import numpy as np
import pytest

import moda
from moda_reference import backward, f64, forward, make_inputs, ref_kwargs, rel_l2

# (name, input sizes, moda keyword arguments): every feature of spec.md §2 at least once.
CASES = [
    ("causal", {}, {}),
    ("noncausal", {}, dict(causal=False)),
    ("chunk", dict(T=7), dict(depth_mode="chunk", chunk_size=3)),
    ("chunk1", {}, dict(depth_mode="chunk", chunk_size=1)),
    ("chunk_range", dict(T=7, Lcap=4), dict(depth_mode="chunk", chunk_size=4, depth_range=(1, 3))),
    ("depth_only", dict(sequence=False), dict(sequence=False)),
    ("depth_only_chunk", dict(sequence=False, T=5), dict(sequence=False, depth_mode="chunk", chunk_size=2)),
    ("depth_range", dict(Lcap=4), dict(depth_range=(1, 3))),
    ("depth_range_open_end", dict(Lcap=4), dict(depth_range=(2, None))),
    ("depth_range_empty", {}, dict(depth_range=(2, 2))),
    ("no_depth", dict(depth=False), {}),
    ("no_depth_noncausal", dict(depth=False), dict(causal=False)),
    ("mha", dict(G=1, Hk=3), {}),
    ("gqa3", dict(G=3, Hk=1), {}),
    ("dv_ne_d", dict(d=8, dv=5), {}),
    ("dv_ne_d_depth_only", dict(d=6, dv=3, sequence=False), dict(sequence=False)),
    ("scale", {}, dict(scale=0.37)),
    ("empty_rows", dict(sequence=False), dict(sequence=False, depth_range=(1, 1))),
]
IDS = [c[0] for c in CASES]


def run(inputs, kw, dtype=None):
    x = inputs if dtype is None else {n: None if a is None else a.astype(dtype) for n, a in inputs.items()}
    o, lse = moda.attention_fwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], **kw)
    return x, o, lse


@pytest.mark.parametrize("name,sizes,kw", CASES, ids=IDS)
def test_forward_float64_matches_reference(rng, name, sizes, kw):
    x = make_inputs(rng, **sizes)
    _, o, lse = run(x, kw)
    o_ref, lse_ref = forward(**x, **ref_kwargs(kw))
    assert o.shape == o_ref.shape and o.dtype == np.float64
    assert lse.shape == lse_ref.shape and lse.dtype == np.float64
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12, atol=1e-12)
    if name == "empty_rows":  # spec.md §2: a row with no keys gets O = 0 and LSE = -inf
        assert np.all(o == 0) and np.all(lse == -np.inf)


@pytest.mark.parametrize("name,sizes,kw", CASES, ids=IDS)
def test_backward_float64_matches_reference(rng, name, sizes, kw):
    x = make_inputs(rng, **sizes)
    _, o, lse = run(x, kw)
    do = rng.standard_normal(o.shape)
    got = moda.attention_bwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], o, lse, do, **kw)
    want = backward(**x, do=do, **ref_kwargs(kw))
    for n, g, w in zip(("dq", "dk", "dv", "dkd", "dvd"), got, want):
        if w is None:
            assert g is None, n
            continue
        assert g.shape == w.shape and g.dtype == np.float64, n
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11, err_msg=n)


def test_attention_returns_o_or_o_and_lse(rng):
    x = make_inputs(rng)
    o = moda.attention(**x)
    o2, lse = moda.attention(**x, return_lse=True)
    np.testing.assert_array_equal(o, o2)
    assert lse.shape == x["q"].shape[:3]


FD_CASES = [c for c in CASES if c[0] in ("causal", "noncausal", "chunk", "depth_only", "depth_range", "gqa3",
                                         "dv_ne_d", "scale")]


@pytest.mark.parametrize("name,sizes,kw", FD_CASES, ids=[c[0] for c in FD_CASES])
def test_gradients_match_central_differences(rng, name, sizes, kw):
    tiny = dict(B=1, T=5 if "T" in sizes else 4, Hk=1, G=sizes.get("G", 2), d=3, Lcap=sizes.get("Lcap", 3),
                sequence=sizes.get("sequence", True))
    if "dv" in sizes:
        tiny["dv"] = 2
    x = make_inputs(rng, **tiny)
    w = None

    def loss():
        o, _ = moda.attention_fwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], **kw)
        return float(np.sum(o * w))

    o, lse = moda.attention_fwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], **kw)
    w = rng.standard_normal(o.shape)
    grads = dict(zip(("q", "k", "v", "kd", "vd"),
                     moda.attention_bwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], o, lse, w, **kw)))
    eps = 1e-6
    for n, a in x.items():
        if a is None:
            continue
        fd = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            keep = a[idx]
            a[idx] = keep + eps
            up = loss()
            a[idx] = keep - eps
            down = loss()
            a[idx] = keep
            fd[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[n], fd, rtol=1e-6, atol=1e-8, err_msg="d" + n)


# ---- storage dtypes: the CPU fast path against float64 on the same (rounded) inputs -------------------------------

def _dtypes():
    out = [pytest.param(np.float32, 1e-5, id="f32"), pytest.param(np.float16, 2e-3, id="f16")]
    try:
        import ml_dtypes
        out.append(pytest.param(ml_dtypes.bfloat16, 1e-2, id="bf16"))
    except ImportError:
        out.append(pytest.param(None, 0, id="bf16", marks=pytest.mark.skip(reason="ml_dtypes is not installed")))
    return out


DTYPE_CASES = [c for c in CASES if c[0] in ("causal", "noncausal", "chunk", "depth_only", "depth_range", "gqa3",
                                            "dv_ne_d", "no_depth")]


@pytest.mark.parametrize("dtype,bound", _dtypes())
@pytest.mark.parametrize("name,sizes,kw", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_storage_dtypes_within_spec_bounds(rng, name, sizes, kw, dtype, bound):
    sizes = dict(sizes, d=sizes.get("d", 16))
    x = make_inputs(rng, T=9, **{k: v for k, v in sizes.items() if k != "T"})
    xs, o, lse = run(x, kw, dtype)
    assert o.dtype == np.dtype(dtype) and lse.dtype == np.float32
    exact = {n: f64(a) for n, a in xs.items()}  # the reference sees exactly the rounded inputs
    o_ref, lse_ref = forward(**exact, **ref_kwargs(kw))
    assert rel_l2(o, o_ref) < bound, "o"
    assert rel_l2(lse, lse_ref) < bound, "lse"
    do = rng.standard_normal(o.shape).astype(dtype)
    got = moda.attention_bwd(xs["q"], xs["k"], xs["v"], xs["kd"], xs["vd"], o, lse, do, **kw)
    want = backward(**exact, do=f64(do), **ref_kwargs(kw))
    for n, g, w in zip(("dq", "dk", "dv", "dkd", "dvd"), got, want):
        if w is not None:
            assert g.dtype == np.dtype(dtype), n
            # The backward starts from the rounded o, so it gets twice the forward's allowance.
            assert rel_l2(g, w) < 2 * bound, n


def test_float32_depth_gradient_accumulator_for_f16(rng):
    """dkd/dvd may be float32 when the inputs are f16/bf16 (moda.h): a model accumulating across layers."""
    x = {n: a.astype(np.float16) for n, a in make_inputs(rng, d=16).items()}
    o, lse = moda.attention_fwd(**x)
    do = rng.standard_normal(o.shape).astype(np.float16)
    base_k = rng.standard_normal(x["kd"].shape).astype(np.float32)
    base_v = rng.standard_normal(x["vd"].shape).astype(np.float32)
    dkd, dvd = base_k.copy(), base_v.copy()
    _, _, _, rk, rv = moda.attention_bwd(x["q"], x["k"], x["v"], x["kd"], x["vd"], o, lse, do,
                                         accumulate_depth_grad=True, dkd=dkd, dvd=dvd)
    assert rk is dkd and rv is dvd
    want = backward(**{n: f64(a) for n, a in x.items()}, do=f64(do))
    assert rel_l2(dkd - base_k, want[3]) < 4e-3
    assert rel_l2(dvd - base_v, want[4]) < 4e-3
