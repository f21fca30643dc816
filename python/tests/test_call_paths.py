"""The binding's fast paths (per-signature plans in _core, the eager autograd.Function in _torch) give what the
full paths give, keep the binding's own checks, and step aside whenever something must see the custom ops."""

import numpy as np
import pytest

import moda
from moda import _core
from moda_reference import backward, forward, make_inputs, ref_kwargs

PATHS = ["fresh", "cached"]


@pytest.fixture
def empty_plans(monkeypatch):
    monkeypatch.setattr(_core, "PLANS", True)
    monkeypatch.setattr(_core, "_FORWARD_PLANS", {})
    monkeypatch.setattr(_core, "_BACKWARD_PLANS", {})


KWS = [{}, dict(depth_range=(1, 3)), dict(sequence=False), dict(depth_mode="chunk", chunk_size=2, causal=True)]


@pytest.mark.parametrize("kw", KWS, ids=["default", "range", "depth_only", "chunk"])
def test_cached_plans_match_the_reference_on_fresh_data(rng, empty_plans, kw):
    sizes = dict(Lcap=4, sequence=kw.get("sequence", True))
    for call in range(3):  # the first call fills the plans, the later ones use them (on new data each time)
        x = make_inputs(rng, **sizes)
        o, lse = moda.attention_fwd(**x, **kw)
        want_o, want_lse = forward(**x, **ref_kwargs(kw))
        np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
        do = rng.standard_normal(o.shape)
        got = moda.attention_bwd(*x.values(), o, lse, do, **kw)
        want = backward(*x.values(), do, **ref_kwargs(kw))
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11)
        assert len(_core._FORWARD_PLANS) == 1 and len(_core._BACKWARD_PLANS) == 1


def test_cached_plan_outputs_follow_the_input_layout(rng, empty_plans):
    x = make_inputs(rng, B=1, T=4, Hk=1, G=2)
    folded = np.ascontiguousarray(np.swapaxes(x["q"].reshape(1, 4, 1, 2, 8), 2, 3)).reshape(1, 8, 1, 8)
    q5 = moda.folded_view(folded, 2)  # 5-D with time-folded strides: o must come back folded on every call
    outs = [moda.attention_fwd(q5, x["k"], x["v"], x["kd"], x["vd"]) for _ in range(2)]
    assert outs[0][0].strides == outs[1][0].strides and outs[0][1].strides == outs[1][1].strides
    moda.unfolded_view(outs[1][0])  # raises unless the cached plan kept the folded memory order
    np.testing.assert_array_equal(outs[0][0], outs[1][0])


def test_cached_plan_keeps_the_binding_checks(rng, empty_plans):
    x = make_inputs(rng, Lcap=3)
    o, lse = moda.attention_fwd(**x)
    do = rng.standard_normal(o.shape)
    dkd, dvd = np.zeros_like(x["kd"]), np.zeros_like(x["vd"])
    moda.attention_bwd(*x.values(), o, lse, do, dkd=dkd, dvd=dvd)  # fills the plan for this signature
    dkd.flags.writeable = False
    with pytest.raises(moda.MODAError, match="read-only") as e:
        moda.attention_bwd(*x.values(), o, lse, do, dkd=dkd, dvd=dvd)
    assert e.value.status_name == "MODA_ERR_INVALID_ARGUMENT"
    # the library's own checks run on every call: a depth range past the slots fails after a cached success
    moda.attention_fwd(**x, depth_range=(0, 3))
    with pytest.raises(moda.MODAError) as e:
        moda.attention_fwd(**x, depth_range=(0, 9))
    assert e.value.status_name == "MODA_ERR_DEPTH_RANGE"


def test_cached_plan_does_not_skip_copies(rng, empty_plans):
    x = make_inputs(rng)
    want = forward(**x)[0]
    for _ in range(2):
        np.testing.assert_allclose(moda.attention_fwd(**x)[0], want, rtol=1e-12, atol=1e-12)
    # same shape, but a reversed view and a byte-swapped array: both are copied on every call
    rev = {n: a[:, ::-1].copy()[:, ::-1] for n, a in x.items()}
    swapped = dict(x, q=x["q"].astype(x["q"].dtype.newbyteorder()))
    for _ in range(2):
        np.testing.assert_allclose(moda.attention_fwd(**rev)[0], want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(moda.attention_fwd(**swapped)[0], want, rtol=1e-12, atol=1e-12)


# ---- torch ----------------------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _tensors(torch, rng, grad, **sizes):
    return {n: None if a is None else torch.tensor(a).requires_grad_(grad)
            for n, a in make_inputs(rng, **sizes).items()}


@pytest.mark.torch
@pytest.mark.parametrize("kw", KWS, ids=["default", "range", "depth_only", "chunk"])
def test_torch_eager_path_matches_the_custom_op_bitwise(rng, monkeypatch, kw):
    torch = _torch()
    from moda import _torch as mt
    x = _tensors(torch, rng, True, Lcap=4, sequence=kw.get("sequence", True))
    results = []
    for eager in (False, True, True):
        monkeypatch.setattr(mt, "_EAGER", eager)
        for t in x.values():
            if t is not None:
                t.grad = None
        o, lse = moda.attention(**x, **kw, deterministic=True, return_lse=True)
        assert lse.grad_fn is None and not lse.requires_grad
        (o * torch.arange(o.numel(), dtype=o.dtype).reshape(o.shape)).sum().backward()
        results.append([o.detach(), lse] + [None if t is None else t.grad for t in x.values()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b)


@pytest.mark.torch
def test_torch_no_grad_and_attention_bwd_direct(rng):
    torch = _torch()
    x = _tensors(torch, rng, True)
    with torch.no_grad():
        o, lse = moda.attention_fwd(**x)
    assert not o.requires_grad
    want = forward(**{n: t.detach().numpy() for n, t in x.items()})
    np.testing.assert_allclose(o.numpy(), want[0], rtol=1e-12, atol=1e-12)
    do = torch.randn_like(o)
    got = moda.attention_bwd(*(t.detach() for t in x.values()), o, lse, do)
    ref = backward(*(t.detach().numpy() for t in x.values()), do.numpy())
    for g, w in zip(got, ref):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-10, atol=1e-11)


@pytest.mark.torch
@pytest.mark.parametrize("eager", [False, True])
def test_torch_depth_grad_buffers_bump_the_version_counter(rng, monkeypatch, eager):
    torch = _torch()
    from moda import _torch as mt
    monkeypatch.setattr(mt, "_EAGER", eager)
    x = _tensors(torch, rng, False)
    o, lse = moda.attention_fwd(**x)
    dkd, dvd = torch.zeros_like(x["kd"]), torch.zeros_like(x["vd"])
    before = dkd._version, dvd._version
    res = moda.attention_bwd(*x.values(), o, lse, torch.randn_like(o), dkd=dkd, dvd=dvd, accumulate_depth_grad=True)
    assert res[3] is dkd and res[4] is dvd
    assert dkd._version > before[0] and dvd._version > before[1]


@pytest.mark.torch
def test_torch_modes_still_see_the_custom_ops(rng):
    torch = _torch()
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = _tensors(torch, rng, True)
    with Record() as rec:
        o = moda.attention(**x)
        o.sum().backward()
    assert "moda.fwd.default" in rec.ops and "moda.bwd.default" in rec.ops
    with Record() as rec:
        with torch.no_grad():
            o, lse = moda.attention_fwd(**x)
        moda.attention_bwd(*(t.detach() for t in x.values()), o, lse, torch.ones_like(o))
    assert "moda.fwd.default" in rec.ops and "moda.bwd.default" in rec.ops


@pytest.mark.torch
def test_torch_meta_tensors_take_the_fake_kernel():
    torch = _torch()
    q = torch.empty(1, 4, 2, 8, device="meta")
    k = v = torch.empty(1, 4, 1, 8, device="meta")
    o, lse = moda.attention_fwd(q, k, v)
    assert o.device.type == "meta" and tuple(o.shape) == (1, 4, 2, 8) and tuple(lse.shape) == (1, 4, 2)


# ---- CUDA (fast paths on by default since the GPU suite passed with them) -----------------------------------------------------------------

def _cuda_ok():
    try:
        import torch
        return torch.cuda.is_available() and moda.cuda_available()
    except (ImportError, moda.MODAError):
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA device and a libmoda built with CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_fast_paths_match_the_custom_ops_bitwise(rng, monkeypatch, dtype):
    torch = _torch()
    from moda import _torch as mt
    monkeypatch.setattr(_core, "PLANS", True)
    monkeypatch.setattr(_core, "_FORWARD_PLANS", {})
    monkeypatch.setattr(_core, "_BACKWARD_PLANS", {})
    x = {n: torch.tensor(a, dtype=getattr(torch, dtype), device="cuda").requires_grad_(True)
         for n, a in make_inputs(rng, B=2, T=70, Hk=2, G=4, d=64, Lcap=5).items()}
    kw = dict(depth_range=(1, 4), deterministic=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were written on the current stream
    results = []
    for fast, stream in ((False, None), (True, None), (True, None), (True, side)):
        monkeypatch.setattr(_core, "FAST_CUDA", fast)
        monkeypatch.setattr(mt, "_EAGER", True)
        for t in x.values():
            t.grad = None
        with torch.cuda.stream(stream):  # None: the current stream
            o, lse = moda.attention(**x, **kw, return_lse=True)
            (o.float() * torch.linspace(-1, 1, o.numel(), device="cuda").reshape(o.shape)).sum().backward()
            with torch.no_grad():
                o2, lse2 = moda.attention_fwd(**x, **kw)
            grads = moda.attention_bwd(*(t.detach() for t in x.values()), o2, lse2, torch.ones_like(o2), **kw)
        torch.cuda.synchronize()
        results.append([o.detach(), lse, o2, lse2, *grads] + [t.grad for t in x.values()])
    assert _core._FORWARD_PLANS and _core._BACKWARD_PLANS  # the fast runs used plans
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
