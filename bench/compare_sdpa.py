#!/usr/bin/env python3
"""compare_sdpa.py - our CUDA MoDA against PyTorch SDPA (FlashAttention-2 and cuDNN back ends), same process.

For each benchmark shape: torch SDPA on the sequence-only problem (q [B,Hq,T,d], k/v [B,Hk,T,d],
enable_gqa=True, is_causal=True), forward and forward+backward, and our kernel with the depth slots, forward
and forward+backward (when the CUDA backward runs). Our kernel is reached through the python package
(PYTHONPATH=python, MODA_LIBRARY=/path/libmoda.so) when it imports, else through libmoda.so with ctypes
(forward only). Prints a table: times, our/theirs ratios, TFLOP/s, depth GB/s, floor.

usage: python3 bench/compare_sdpa.py --lib build/libmoda.so [--shapes S1,S3] [--reps 30] [--json out.json]
"""
import argparse
import ctypes
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: B, T, Hq, Hk, d, L
    "S1": (1, 16384, 64, 8, 64, 64),
    "S2": (8, 4096, 16, 8, 64, 72),
    "S3": (1, 1024, 64, 8, 64, 64),
    "S4": (1, 16384, 64, 8, 64, 256),
    "S5": (1, 8192, 32, 8, 128, 64),
    "S6": (1, 32768, 64, 8, 64, 64),  # issue 5's long shape; not in the default list
}
PEAK_FLOPS, PEAK_BYTES = 737e12, 2.9e12


def timeit(fn, reps, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("device", ctypes.c_int), ("ndim", ctypes.c_int),
                ("shape", ctypes.c_int64 * 5), ("stride", ctypes.c_int64 * 5)]


class Options(ctypes.Structure):
    _fields_ = [("causal", ctypes.c_int), ("sequence", ctypes.c_int), ("depth_mode", ctypes.c_int),
                ("chunk_size", ctypes.c_int64), ("depth_begin", ctypes.c_int64), ("depth_end", ctypes.c_int64),
                ("scale", ctypes.c_double), ("depth_grad_mode", ctypes.c_int), ("deterministic", ctypes.c_int),
                ("num_threads", ctypes.c_int)]


def ctypes_forward(lib):
    """The small fallback: moda_forward through ctypes on torch tensors (q as 5-D [B,T,Hk,G,d] views)."""
    lib.moda_default_options.restype = Options
    lib.moda_last_error.restype = ctypes.c_char_p
    lib.moda_forward.restype = ctypes.c_int
    code = {torch.bfloat16: 2, torch.float16: 1, torch.float32: 0}

    def view(x, hk=None):
        shape, stride = list(x.shape), list(x.stride())
        if hk is not None:  # [B,T,Hq,d] -> [B,T,Hk,G,d]
            g = shape[2] // hk
            shape = shape[:2] + [hk, g] + shape[3:]
            stride = stride[:2] + [stride[2] * g, stride[2]] + stride[3:]
        t = Tensor()
        t.data, t.dtype, t.device, t.ndim = x.data_ptr(), code[x.dtype], 1, len(shape)
        for i, (s, st) in enumerate(zip(shape, stride)):
            t.shape[i], t.stride[i] = s, st
        return t

    def fwd(q, k, v, kd, vd, o, lse):
        hk = k.shape[2]
        args = [view(q, hk), view(k), view(v), view(kd), view(vd), view(o, hk), view(lse.unsqueeze(-1), hk)]
        args[6].ndim = 4
        opt = lib.moda_default_options()
        st = lib.moda_forward(ctypes.byref(opt), *[ctypes.byref(a) for a in args],
                              ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if st != 0:
            raise RuntimeError("moda_forward: %s" % lib.moda_last_error().decode())
    return fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.environ.get("MODA_LIBRARY", "build/libmoda.so"))
    ap.add_argument("--shapes", default="S1,S2,S3,S4,S5")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-backward", action="store_true")
    a = ap.parse_args()
    os.environ["MODA_LIBRARY"] = os.path.abspath(a.lib)
    moda = None
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        import moda as _m
        moda = _m
        via = "python package"
    except Exception as e:  # the package is optional; the ctypes fallback covers the forward
        via = "ctypes (package import failed: %s)" % e
    lib = ctypes.CDLL(os.path.abspath(a.lib))
    cfwd = ctypes_forward(lib)
    dev = torch.cuda.get_device_name()
    print("compare_sdpa: %s, torch %s, moda via %s" % (dev, torch.__version__, via), flush=True)
    dt = torch.bfloat16
    rows = []
    for name in a.shapes.split(","):
        B, T, Hq, Hk, d, L = SHAPES[name]
        torch.manual_seed(0)
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=dt)
        # SDPA, sequence only, its native [B,H,T,d] layout
        qs, ks, vs = mk(B, Hq, T, d), mk(B, Hk, T, d), mk(B, Hk, T, d)
        r = {"shape": name}
        for be, label in ((SDPBackend.FLASH_ATTENTION, "fa2"), (SDPBackend.CUDNN_ATTENTION, "cudnn")):
            try:
                with sdpa_kernel(be):
                    f = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                    r[label + "_fwd"] = timeit(f, a.reps)
                    if not a.no_backward:
                        qg, kg, vg = [x.clone().requires_grad_() for x in (qs, ks, vs)]
                        do = torch.randn_like(qs)

                        def fb():
                            for x in (qg, kg, vg):
                                x.grad = None  # as a training step does: otherwise each rep adds into .grad
                            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
                            out.backward(do)
                        r[label + "_fb"] = timeit(fb, a.reps)
                        del qg, kg, vg, do
            except Exception as e:
                print("  %s %s: %s" % (name, label, str(e).splitlines()[0]), flush=True)
        del qs, ks, vs
        # ours: standard layout q [B,T,Hq,d], depth [B,T,L,Hk,d]; two input sets in rotation
        sets = [(mk(B, T, Hq, d), mk(B, T, Hk, d), mk(B, T, Hk, d), mk(B, T, L, Hk, d), mk(B, T, L, Hk, d))
                for _ in range(2)]
        o = torch.empty(B, T, Hq, d, device="cuda", dtype=dt)
        lse = torch.empty(B, T, Hq, device="cuda", dtype=torch.float32)
        it = [0]

        def ours():
            s = sets[it[0] % 2]
            it[0] += 1
            cfwd(*s, o, lse)
        r["ours_fwd"] = timeit(ours, a.reps)
        if moda is not None and not a.no_backward:
            try:
                g = [[x.clone().requires_grad_() for x in s] for s in sets]
                do = torch.randn(B, T, Hq, d, device="cuda", dtype=dt)

                def ours_fb():
                    s = g[it[0] % 2]
                    it[0] += 1
                    for x in s:
                        x.grad = None  # otherwise each rep adds into .grad: 4.8 GB of extra traffic on S2's depth
                    out = moda.attention(*s)
                    out.backward(do)
                r["ours_fb"] = timeit(ours_fb, a.reps)
                del g
            except Exception as e:
                print("  %s ours fwd+bwd: %s" % (name, str(e).splitlines()[0]), flush=True)
        del sets, o, lse
        torch.cuda.empty_cache()
        flops = 4.0 * B * Hq * d * (T * (T + 1) / 2 + T * L)
        depth_bytes = 2.0 * 2 * B * T * L * Hk * d
        byts = 2.0 * (2 * B * T * Hq * d + 2 * B * T * Hk * d) + depth_bytes + 4.0 * B * T * Hq
        r.update(flops=flops, depth_bytes=depth_bytes, bytes=byts,
                 floor_ms=1e3 * max(flops / PEAK_FLOPS, byts / PEAK_BYTES))
        rows.append(r)
        print("  %s done: %s" % (name, {k: round(v, 4) for k, v in r.items() if k.endswith(("fwd", "fb"))}), flush=True)

    def f(x):
        return "%.3f" % x if x is not None else "n/a"

    def ratio(a_, b_):
        return "%.2f" % (a_ / b_) if a_ is not None and b_ is not None else "n/a"
    print("\nbf16, median of %d, %s, same process; ours includes the depth slots, SDPA is sequence-only" % (a.reps, dev))
    print("| shape | ours fwd | FA2 fwd | cuDNN fwd | ours/FA2 | ours/cuDNN | TFLOP/s | depth GB/s | floor | ours/floor "
          "| ours fwd+bwd | FA2 fwd+bwd | cuDNN fwd+bwd |")
    print("| --- " * 13 + "|")
    for r in rows:
        o_ = r.get("ours_fwd")
        print("| %s | %s | %s | %s | %s | %s | %.0f | %.0f | %.3f | %s | %s | %s | %s |" % (
            r["shape"], f(o_), f(r.get("fa2_fwd")), f(r.get("cudnn_fwd")), ratio(o_, r.get("fa2_fwd")),
            ratio(o_, r.get("cudnn_fwd")), r["flops"] / o_ / 1e9, r["depth_bytes"] / o_ / 1e6, r["floor_ms"],
            ratio(o_, r["floor_ms"]), f(r.get("ours_fb")), f(r.get("fa2_fb")), f(r.get("cudnn_fb"))))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": dev, "torch": torch.__version__, "via": via, "reps": a.reps, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
