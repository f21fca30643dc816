"""A float64 NumPy implementation of docs/spec.md, written for clarity: the oracle of the Python tests.

Layouts as moda's: q [B, T, Hq, d] (or 5-D [B, T, Hk, G, d]), k/v [B, T, Hk, d(v)], kd/vd [B, T, Lcap, Hk, d(v)].
"""

import numpy as np


def _q5(x, Hk):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 5:
        return x
    B, T, Hq, d = x.shape
    return x.reshape(B, T, Hk, Hq // Hk, d)


def _keys(t, T, Lcap, causal, sequence, d0, d1, chunk, chunk_size):
    """The visible keys of row t: sequence positions j, then depth slots (t', l), in one list."""
    seq = list(range(t + 1 if causal else T)) if sequence else []
    u0 = (t // chunk_size) * chunk_size if chunk else t
    depth = [(u, l) for u in range(u0, t + 1) for l in range(d0, d1)]
    return seq, depth


def _resolve(q, k, kd, vd, v, d1, scale):
    Hk = k.shape[2] if k is not None else (kd.shape[3] if kd is not None else q.shape[2])
    q5 = _q5(q, Hk)
    Lcap = kd.shape[2] if kd is not None else 0
    d1 = Lcap if d1 is None else d1
    d = q5.shape[-1]
    dv = v.shape[-1] if v is not None else (vd.shape[-1] if vd is not None else d)
    s = 1.0 / np.sqrt(d) if scale is None else scale
    return Hk, q5, Lcap, d1, dv, s


def _gather(k, v, kd, vd, b, h, seq, depth):
    K = [k[b, j, h] for j in seq] + [kd[b, u, l, h] for u, l in depth]
    V = [v[b, j, h] for j in seq] + [vd[b, u, l, h] for u, l in depth]
    return np.array(K, dtype=np.float64), np.array(V, dtype=np.float64)


def _rows(B, T, Hk, Lcap, k, v, kd, vd, causal, sequence, d0, d1, chunk, chunk_size):
    """Every (b, t, h) whose row has keys, with its key list and the gathered keys/values."""
    for b in range(B):
        for t in range(T):
            seq, depth = _keys(t, T, Lcap, causal, sequence, d0, d1, chunk, chunk_size)
            if seq or depth:
                for h in range(Hk):
                    yield (b, t, h, seq, depth) + _gather(k, v, kd, vd, b, h, seq, depth)


def forward(q, k, v, kd=None, vd=None, causal=True, scale=None, sequence=True, d0=0, d1=None, chunk=False,
            chunk_size=64):
    """Returns (o, lse) in q's layout (4-D q: o [B,T,Hq,dv], lse [B,T,Hq]), float64."""
    Hk, q5, Lcap, d1, dv, s = _resolve(q, k, kd, vd, v, d1, scale)
    B, T, _, G, d = q5.shape
    o = np.zeros((B, T, Hk, G, dv))
    lse = np.full((B, T, Hk, G), -np.inf)
    for b, t, h, seq, depth, K, V in _rows(B, T, Hk, Lcap, k, v, kd, vd, causal, sequence, d0, d1, chunk,
                                           chunk_size):
        z = s * q5[b, t, h] @ K.T  # [G, n]: one softmax over sequence and depth keys together
        m = z.max(axis=1, keepdims=True)
        e = np.exp(z - m)
        o[b, t, h] = (e / e.sum(axis=1, keepdims=True)) @ V
        lse[b, t, h] = m[:, 0] + np.log(e.sum(axis=1))
    if np.ndim(q) == 4:
        return o.reshape(B, T, Hk * G, dv), lse.reshape(B, T, Hk * G)
    return o, lse


def backward(q, k, v, kd, vd, do, causal=True, scale=None, sequence=True, d0=0, d1=None, chunk=False,
             chunk_size=64):
    """Returns (dq, dk, dv, dkd, dvd) (None for absent inputs), float64, from the spec's formulas."""
    Hk, q5, Lcap, d1, dv, s = _resolve(q, k, kd, vd, v, d1, scale)
    B, T, _, G, d = q5.shape
    do5 = _q5(do, Hk)
    o5, lse = forward(q5, k, v, kd, vd, causal, scale, sequence, d0, d1, chunk, chunk_size)
    dq = np.zeros_like(q5)
    dk = None if k is None else np.zeros(k.shape)
    dvv = None if v is None else np.zeros(v.shape)
    dkd = None if kd is None else np.zeros(kd.shape)
    dvd = None if vd is None else np.zeros(vd.shape)
    for b, t, h, seq, depth, K, V in _rows(B, T, Hk, Lcap, k, v, kd, vd, causal, sequence, d0, d1, chunk,
                                           chunk_size):
        P = np.exp(s * q5[b, t, h] @ K.T - lse[b, t, h][:, None])
        dO = do5[b, t, h]
        delta = (dO * o5[b, t, h]).sum(axis=1, keepdims=True)
        dz = P * (dO @ V.T - delta)
        dq[b, t, h] = s * dz @ K
        gK = s * dz.T @ q5[b, t, h]
        gV = P.T @ dO
        for i, j in enumerate(seq):
            dk[b, j, h] += gK[i]
            dvv[b, j, h] += gV[i]
        for i, (u, l) in enumerate(depth, start=len(seq)):
            dkd[b, u, l, h] += gK[i]
            dvd[b, u, l, h] += gV[i]
    if np.ndim(q) == 4:
        dq = dq.reshape(np.shape(q))
    return dq, dk, dvv, dkd, dvd


# ---- test inputs ----------------------------------------------------------------------------------------------

def make_inputs(rng, B=2, T=6, Hk=2, G=2, d=8, dv=None, Lcap=3, sequence=True, depth=True, dtype=np.float64):
    """Fresh random normal inputs (never zeros, which hide unwritten outputs) in the standard layouts."""
    dv = d if dv is None else dv

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return dict(q=r(B, T, Hk * G, d), k=r(B, T, Hk, d) if sequence else None, v=r(B, T, Hk, dv) if sequence else None,
        kd=r(B, T, Lcap, Hk, d) if depth else None, vd=r(B, T, Lcap, Hk, dv) if depth else None)


def ref_kwargs(kw):
    """moda.attention keyword arguments -> forward()/backward() keyword arguments."""
    out = dict(causal=kw.get("causal", True), scale=kw.get("scale"), sequence=kw.get("sequence", True),
               chunk=kw.get("depth_mode", "token") == "chunk", chunk_size=kw.get("chunk_size", 64))
    if kw.get("depth_range") is not None:
        out["d0"], out["d1"] = kw["depth_range"]
    return out


def f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def rel_l2(got, want):
    got, want = f64(got), f64(want)
    assert np.all(np.isfinite(got)), "non-finite values in the result"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
