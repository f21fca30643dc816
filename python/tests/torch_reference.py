"""spec.md in plain PyTorch (dense masks), differentiable by autograd: the oracle of the torch tests.

With dtype=torch.float64 it is the float64 reference; with a storage dtype it is the "straightforward
same-precision version" of spec.md §4 (products in that dtype, softmax state in float32), whose error against
float64 sets the tolerance of the implementation under test.
"""

import math

import torch


def attention(q, k, v, kd=None, vd=None, causal=True, scale=None, sequence=True, depth_range=None,
              depth_mode="token", chunk_size=64, dtype=torch.float64):
    """q [B,T,Hq,d], k/v [B,T,Hk,d(v)], kd/vd [B,T,Lcap,Hk,d(v)] -> (o [B,T,Hq,dv] in dtype, lse [B,T,Hq] f32/f64)."""
    cast = [None if x is None else x.to(dtype) for x in (q, k, v, kd, vd)]
    q, k, v, kd, vd = cast
    B, T, Hq, d = q.shape
    Hk = k.shape[2] if k is not None else kd.shape[3]
    G = Hq // Hk
    dv = v.shape[-1] if v is not None else vd.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    soft = torch.float64 if dtype == torch.float64 else torch.float32
    q5 = q.reshape(B, T, Hk, G, d)
    t = torch.arange(T, device=q.device)
    logits, values, masks = [], [], []
    if sequence:
        z = torch.einsum("bthgd,bjhd->bthgj", q5, k).to(soft) * s  # [B,T,Hk,G,T]
        seen = (t[None, :] <= t[:, None]) if causal else torch.ones(T, T, dtype=torch.bool, device=q.device)
        logits.append(z)
        masks.append(seen[None, :, None, None, :].expand(z.shape))
        values.append(("seq", v))
    if kd is not None:
        L = kd.shape[2]
        d0, d1 = (0, L) if depth_range is None else (depth_range[0], L if depth_range[1] is None else depth_range[1])
        z = torch.einsum("bthgd,bulhd->bthgul", q5, kd).to(soft) * s  # every token's slots; masked below
        u0 = (t // chunk_size) * chunk_size if depth_mode == "chunk" else t
        tok = (t[None, :] >= u0[:, None]) & (t[None, :] <= t[:, None])  # [t, u]
        lvis = (torch.arange(L, device=q.device) >= d0) & (torch.arange(L, device=q.device) < d1)
        seen = tok[:, :, None] & lvis[None, None, :]  # [t, u, l]
        logits.append(z.reshape(B, T, Hk, G, T * L))
        masks.append(seen.reshape(T, T * L)[None, :, None, None, :].expand(B, T, Hk, G, T * L))
        values.append(("depth", vd))
    z = torch.cat(logits, dim=-1)
    mask = torch.cat(masks, dim=-1)
    z = z.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    p = p.masked_fill(~mask, 0.0).to(dtype)  # rows with no key get p = 0: O = 0, LSE = -inf
    o = torch.zeros(B, T, Hk, G, dv, dtype=soft, device=q.device)
    start = 0
    for kind, val in values:
        if kind == "seq":
            o = o + torch.einsum("bthgj,bjhe->bthge", p[..., start:start + T], val).to(soft)
            start += T
        else:
            L = val.shape[2]
            pd = p[..., start:start + T * L].reshape(B, T, Hk, G, T, L)
            o = o + torch.einsum("bthgul,bulhe->bthge", pd, val).to(soft)
            start += T * L
    return o.to(dtype).reshape(B, T, Hq, dv), lse.reshape(B, T, Hq)
