"""moda with PyTorch: the custom ops, autograd, torch.compile and a small training run.

Marks: `torch` needs only torch (CPU tensors run libmoda's CPU path); `gpu` needs a CUDA device and a libmoda
built with CUDA (tests/run_gpu_tests.sh). Without torch the whole file is skipped.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moda  # noqa: E402  (after torch, so the custom ops register at import)
import torch_reference  # noqa: E402
from moda import _lib  # noqa: E402
from moda_reference import backward as np_backward  # noqa: E402
from moda_reference import forward as np_forward  # noqa: E402
from moda_reference import make_inputs, ref_kwargs  # noqa: E402


def _cuda_ok():
    try:
        return torch.cuda.is_available() and moda.cuda_available()
    except moda.MODAError:
        return False


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA device and a libmoda built with CUDA")
DEVICES = [pytest.param("cpu", marks=pytest.mark.torch),
           pytest.param("cuda", marks=[gpu, needs_cuda])]


def tensors(rng, device="cpu", dtype=torch.float64, grad=False, **sizes):
    out = {}
    for n, a in make_inputs(rng, **sizes).items():
        out[n] = None if a is None else torch.tensor(a, dtype=dtype, device=device).requires_grad_(grad)
    return out


def np64(x):
    return None if x is None else x.detach().to("cpu", torch.float64).numpy()


CASES = [
    ("causal", {}, {}),
    ("noncausal", {}, dict(causal=False)),
    ("chunk", dict(T=7), dict(depth_mode="chunk", chunk_size=3)),
    ("depth_only", dict(sequence=False), dict(sequence=False)),
    ("depth_range", dict(Lcap=4), dict(depth_range=(1, 3))),
    ("no_depth", dict(depth=False), {}),
    ("gqa3", dict(G=3, Hk=1), {}),
    ("dv_ne_d", dict(d=8, dv=4), {}),
    ("scale", {}, dict(scale=0.3)),
]
IDS = [c[0] for c in CASES]


def _grads(x):
    return [None if t is None else t.grad for t in x.values()]


# ---- CPU (torch only) -----------------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("name,sizes,kw", CASES, ids=IDS)
def test_torch_reference_agrees_with_numpy_reference(rng, name, sizes, kw):
    """The oracle of the GPU tests is itself checked here against the NumPy oracle."""
    x = tensors(rng, grad=True, **sizes)
    o, lse = torch_reference.attention(**x, **kw)
    o_np, lse_np = np_forward(**{n: np64(t) for n, t in x.items()}, **ref_kwargs(kw))
    np.testing.assert_allclose(np64(o), o_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np64(lse), lse_np, rtol=1e-12, atol=1e-12)
    do = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    o.backward(do)
    want = np_backward(**{n: np64(t) for n, t in x.items()}, do=np64(do), **ref_kwargs(kw))
    for g, w in zip(_grads(x), want):
        if w is not None:
            np.testing.assert_allclose(np64(g), w, rtol=1e-10, atol=1e-11)


@pytest.mark.torch
@pytest.mark.parametrize("name,sizes,kw", CASES, ids=IDS)
def test_gradcheck_float64_cpu(rng, name, sizes, kw):
    tiny = dict(B=1, T=sizes.get("T", 4), Hk=sizes.get("Hk", 1), G=sizes.get("G", 2), d=3,
                dv=2 if "dv" in sizes else None, Lcap=sizes.get("Lcap", 2),
                sequence=sizes.get("sequence", True), depth=sizes.get("depth", True))
    x = tensors(rng, grad=True, **tiny)
    names = [n for n, t in x.items() if t is not None]

    def f(*args):
        kwargs = dict(x)
        kwargs.update(zip(names, args))
        return moda.attention(**kwargs, **kw)

    assert torch.autograd.gradcheck(f, [x[n] for n in names], eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_dtypes_forward_and_autograd(rng, dtype):
    x = tensors(rng, dtype=dtype, grad=True, d=16, T=9)
    o, lse = moda.attention(**x, return_lse=True)
    assert o.dtype == dtype and o.device.type == "cpu"
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not lse.requires_grad
    bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    ref = np_forward(**{n: np64(t) for n, t in x.items()})
    assert rel(o, ref[0]) < bound
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    o.backward(do)
    want = np_backward(**{n: np64(t) for n, t in x.items()}, do=np64(do))
    for g, w, t in zip(_grads(x), want, x.values()):
        assert g.dtype == dtype and g.shape == t.shape
        assert rel(g, w) < 2 * bound


def rel(got, want):
    got = np64(got) if isinstance(got, torch.Tensor) else got
    assert np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.torch
def test_opcheck_custom_ops(rng):
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    x = tensors(rng, grad=True, T=5, d=4)
    cfg = moda._core.Config(depth_range=(1, 3))
    torch.library.opcheck(torch.ops.moda.fwd.default, (x["q"], x["k"], x["v"], x["kd"], x["vd"], *cfg.as_args()))
    q5 = moda.folded_view(torch.randn(2, 5 * 2, 2, 4, dtype=torch.float64), 2).requires_grad_(True)
    torch.library.opcheck(torch.ops.moda.fwd.default, (q5, None, None, x["kd"], x["vd"], True, 0.5, False, 0, -1,
                                                       True, 2, False))
    with torch.no_grad():
        o, lse = moda.attention_fwd(**x, depth_range=(1, 3))
    do = torch.randn_like(o)
    ins = [t.detach() for t in x.values()]
    torch.library.opcheck(torch.ops.moda.bwd.default, (*ins, o, lse, do, *cfg.as_args()))
    dkd, dvd = torch.zeros_like(ins[3]), torch.zeros_like(ins[4])
    torch.library.opcheck(torch.ops.moda.bwd_into.default, (*ins, o, lse, do, dkd, dvd, True, *cfg.as_args()))


@pytest.mark.torch
def test_attention_bwd_with_torch_buffers(rng):
    x = {n: t for n, t in tensors(rng, Lcap=4).items()}
    kw = dict(depth_range=(1, 3))
    o, lse = moda.attention_fwd(**x, **kw)
    do = torch.randn_like(o)
    want = np_backward(**{n: np64(t) for n, t in x.items()}, do=np64(do), d0=1, d1=3)
    dq, dk, dv, dkd, dvd = moda.attention_bwd(*x.values(), o, lse, do, **kw)
    for g, w in zip((dq, dk, dv, dkd, dvd), want):
        np.testing.assert_allclose(np64(g), w, rtol=1e-10, atol=1e-11)
    base = torch.randn_like(x["kd"]), torch.randn_like(x["vd"])
    bk, bv = base[0].clone(), base[1].clone()
    res = moda.attention_bwd(*x.values(), o, lse, do, accumulate_depth_grad=True, dkd=bk, dvd=bv, **kw)
    assert res[3] is bk and res[4] is bv
    np.testing.assert_allclose(np64(bk - base[0]), want[3], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np64(bv - base[1]), want[4], rtol=1e-9, atol=1e-11)


@pytest.mark.torch
def test_torch_strided_inputs_are_not_copied(rng, monkeypatch):
    B, T, Hk, G, d = 2, 5, 2, 2, 8
    qkv = torch.randn(B, T, Hk * G + 2 * Hk, d, dtype=torch.float64)
    q, k, v = qkv[:, :, :Hk * G], qkv[:, :, Hk * G:Hk * G + Hk], qkv[:, :, Hk * G + Hk:]
    kd = torch.randn(B, 3, T, Hk, d, dtype=torch.float64).transpose(1, 2)  # slot-major storage
    vd = torch.randn(B, T, 3, Hk, d, dtype=torch.float64)
    calls = []
    real = _lib.lib().moda_forward

    def spy(*args):
        calls.append([getattr(a, "_obj", None) for a in args])
        return real(*args)

    monkeypatch.setattr(_lib.lib(), "moda_forward", spy)
    o = moda.attention(q, k, v, kd, vd)
    for i, t in ((1, q), (2, k), (3, v), (4, kd), (5, vd)):
        assert calls[-1][i].data == t.data_ptr()
    assert list(calls[-1][4].stride) == list(kd.stride())
    np.testing.assert_allclose(np64(o), np_forward(*(np64(t) for t in (q, k, v, kd, vd)))[0], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.torch
def test_broadcast_key_gets_summed_gradient(rng):
    """k shared by every head (expand: stride 0) is read in place; its gradient is the sum over the heads."""
    x = tensors(rng, Hk=3, G=1)
    k1 = x["k"][:, :, :1].clone().requires_grad_(True)
    x["k"] = k1.expand(-1, -1, 3, -1)
    assert x["k"].stride(2) == 0
    o = moda.attention(**x)
    do = torch.randn_like(o)
    o.backward(do)
    want = np_backward(**{n: np64(t) for n, t in x.items()}, do=np64(do))
    np.testing.assert_allclose(np64(k1.grad), want[1].sum(axis=2, keepdims=True), rtol=1e-10, atol=1e-11)
    torch.library.opcheck(torch.ops.moda.fwd.default, (x["q"], x["k"], x["v"], None, None, True, 0.0, True, 0, -1,
                                                       False, 64, False))


@pytest.mark.torch
def test_torch_folded_view_round_trip():
    x = torch.randn(2, 4 * 3, 2, 5)
    y = moda.folded_view(x, 3)
    assert y.shape == (2, 4, 2, 3, 5) and y.data_ptr() == x.data_ptr()
    assert torch.equal(y[1, 2, 1, 0], x[1, 2 * 3 + 0, 1])
    z = moda.unfolded_view(y)
    assert z.data_ptr() == x.data_ptr() and torch.equal(z, x)
    with pytest.raises(moda.MODAError, match="not time-folded"):
        moda.unfolded_view(torch.randn(2, 4, 2, 3, 5))


@pytest.mark.torch
def test_torch_errors_raise_moda_error(rng):
    x = tensors(rng)
    with pytest.raises(moda.MODAError, match="k has T = 5") as e:  # raised inside the custom op
        moda.attention(x["q"], x["k"][:, :5], x["v"], x["kd"], x["vd"])
    assert e.value.status_name == "MODA_ERR_SHAPE_MISMATCH"
    with pytest.raises(moda.MODAError, match="k is a ndarray"):
        moda.attention(x["q"], np64(x["k"]), x["v"], x["kd"], x["vd"])
    with pytest.raises(moda.MODAError, match="k is a Tensor"):
        moda.attention(np64(x["q"]), x["k"], np64(x["v"]))
    with pytest.raises(moda.MODAError, match="dtype torch.int32"):
        moda.attention(x["q"].int(), x["k"], x["v"])


@pytest.mark.torch
def test_torch_compile_traces_through_the_custom_op_cpu(rng):
    """fullgraph=True: the whole call, forward and backward, is one graph around the custom ops."""
    x = tensors(rng, dtype=torch.float32, grad=True)

    def step(q, k, v, kd, vd):
        o = moda.attention(q, k, v, kd, vd, depth_mode="chunk", chunk_size=2)
        return (o * o).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*x.values())
    loss.backward()
    got = [g.clone() for g in _grads(x)]
    for t in x.values():
        t.grad = None
    want_loss = step(*x.values())
    want_loss.backward()
    assert torch.allclose(loss, want_loss)
    for g, w in zip(got, _grads(x)):
        assert torch.equal(g, w)


# ---- CPU and CUDA ---------------------------------------------------------------------------------------------

def _within_policy(got, want64, same, guide):
    """spec.md §4: max error at most 2x the same-precision version's plus 1e-5, or the guide's relative L2."""
    got, want64, same = (t.detach().to("cpu", torch.float64) for t in (got, want64, same))
    assert torch.isfinite(got).all(), "NaN or Inf"
    err = (got - want64).abs().max().item()
    err_same = (same - want64).abs().max().item()
    rel_l2 = ((got - want64).norm() / want64.norm().clamp_min(1e-30)).item()
    return err <= 2 * err_same + 1e-5 or rel_l2 <= guide, "max err %.3g (same-precision %.3g), rel L2 %.3g" % (
        err, err_same, rel_l2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name,sizes,kw", CASES, ids=IDS)
def test_against_pytorch_float64(rng, device, dtype, name, sizes, kw):
    dtype = getattr(torch, dtype)
    guide = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    sizes = dict(sizes, d=sizes.get("d", 64), dv=sizes.get("dv", None) and 32, T=sizes.get("T", 33))
    x = tensors(rng, device=device, dtype=dtype, grad=True, **sizes)
    try:
        o, lse = moda.attention(**x, **kw, return_lse=True)
    except moda.MODAError as e:
        if e.status_name == "MODA_ERR_UNSUPPORTED" and device == "cuda":
            pytest.skip("the CUDA path does not take this: %s" % e.message)
        raise
    assert o.device == x["q"].device and o.dtype == dtype
    do = torch.randn(o.shape, device=device, dtype=torch.float32, generator=None).to(dtype)
    o.backward(do)
    got = [o, lse] + _grads(x)

    def ref(dt):
        xr = {n: None if t is None else t.detach().to(dt).requires_grad_(True) for n, t in x.items()}
        ro, rlse = torch_reference.attention(**xr, **kw, dtype=dt)
        ro.backward(do.to(dt))
        return [ro, rlse] + [None if t is None else t.grad for t in xr.values()]

    want, same = ref(torch.float64), ref(dtype)
    names = ["o", "lse", "dq", "dk", "dv", "dkd", "dvd"]
    for n, g, w, s in zip(names, got, want, same):
        if w is None:
            assert g is None, n
            continue
        ok, msg = _within_policy(g, w, s, guide if n in ("o", "lse") else 2 * guide)
        assert ok, "%s %s: %s" % (n, dtype, msg)


# ---- training ---------------------------------------------------------------------------------------------------

class MoDABlockLM(torch.nn.Module):
    """Two attention layers; layer 1 attends, under one softmax, to the sequence and to the keys/values that
    layer 0 wrote for the same token (its depth memory)."""

    def __init__(self, vocab=32, dim=64, Hk=2, G=2, d=16, layers=2):
        super().__init__()
        self.Hk, self.G, self.d = Hk, G, d
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(layers))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, (Hk * G + 2 * Hk) * d) for _ in range(layers))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(Hk * G * d, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, attn_dtype):
        B, T = tokens.shape
        Hk, G, d = self.Hk, self.G, self.d
        x = self.embed(tokens)
        depth_k, depth_v = [], []
        for norm, qkv, proj in zip(self.norms, self.qkv, self.proj):
            h = qkv(norm(x)).view(B, T, Hk * G + 2 * Hk, d).to(attn_dtype)
            q, k, v = h[:, :, :Hk * G], h[:, :, Hk * G:Hk * G + Hk], h[:, :, Hk * G + Hk:]
            if depth_k:
                kd, vd = torch.stack(depth_k, dim=2), torch.stack(depth_v, dim=2)  # [B, T, L, Hk, d]
                o = moda.attention(q, k, v, kd, vd)
            else:
                o = moda.attention(q, k, v)
            depth_k.append(k)
            depth_v.append(v)
            x = x + proj(o.reshape(B, T, Hk * G * d).float())
        return self.head(x)


@pytest.mark.parametrize("device", DEVICES)
def test_two_layer_moda_block_trains(device):
    torch.manual_seed(0)
    model = MoDABlockLM().to(device)
    attn_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokens = torch.randint(0, 32, (4, 24), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        logits = model(tokens[:, :-1], attn_dtype)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert math.isfinite(losses[-1])


# ---- CUDA only ----------------------------------------------------------------------------------------------------

@gpu
@needs_cuda
def test_cuda_runs_on_the_current_stream_and_copies_only_non_unit_inner_strides(rng):
    x = tensors(rng, device="cuda", dtype=torch.bfloat16, d=64, T=40)
    want = moda.attention(**x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = moda.attention(**x)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)
    # q with a non-unit innermost stride (the C side needs 1 on CUDA): copied, same answer
    q_t = x["q"].detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_t.stride(-1) != 1
    close = dict(rtol=1e-2, atol=1e-2)  # another kernel path may round differently; a layout bug is O(1)
    torch.testing.assert_close(moda.attention(q_t, *[x[n] for n in ("k", "v", "kd", "vd")]), want, **close)
    # the time-folded layout on the GPU
    B, T, Hq, d = x["q"].shape
    G = Hq // x["k"].shape[2]
    q_f = x["q"].detach().reshape(B, T, Hq // G, G, d).transpose(2, 3).reshape(B, T * G, Hq // G, d).contiguous()
    o_f = moda.attention(moda.folded_view(q_f, G), *[x[n] for n in ("k", "v", "kd", "vd")])
    torch.testing.assert_close(o_f.reshape(B, T, Hq, d), want, **close)


@gpu
@needs_cuda
def test_torch_compile_inductor_cuda(rng):
    x = tensors(rng, device="cuda", dtype=torch.bfloat16, grad=True, d=64, T=64)

    def step(q, k, v, kd, vd):
        o = moda.attention(q * 0.5, k, v, kd, vd)
        return (o.float() ** 2).mean()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(*x.values())
    loss.backward()
    got = [g.clone() for g in _grads(x)]
    for t in x.values():
        t.grad = None
    want = step(*x.values())
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-2, atol=1e-3)
    for g, w in zip(got, _grads(x)):
        assert torch.allclose(g.float(), w.float(), rtol=2e-2, atol=1e-3)
