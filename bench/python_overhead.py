"""Per-call CPU overhead of the Python package (ctypes, option/shape plumbing, torch dispatch and autograd).

The problem is tiny (default B=1 T=4 Hq=2 Hk=1 d=8, 2 depth slots) and runs on libmoda's CPU backend, so the C
work is a few microseconds (the libmoda rows time it) and the rest of the wall time per call is the binding's
overhead. On a GPU the same overhead is
paid per call on the host (no synchronisation is involved), and it dominates whenever a call's GPU work is small.

    PYTHONPATH=python MODA_LIBRARY=build/libmoda.so python3 bench/python_overhead.py [--iters N] [--repeats R]
        [--device cuda]

With --device cuda the torch rows use bfloat16 CUDA tensors (the numpy and libmoda rows stay on the CPU) and the
time includes the queued kernels (synchronised once per repeat); compare MODA_FAST_PATHS=1 with the default.

Prints the median over R repeats of (wall time of N calls) / N, in microseconds, per path. torch paths are
skipped when torch is not installed.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

import moda


def per_call_us(fn, iters, repeats, warmup, sync):
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()  # CUDA: the queued kernels are part of the time (with a tiny problem the host time dominates)
        samples.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(samples), min(samples)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--shape", default="1,4,2,1,8,2", help="B,T,Hq,Hk,d,L")
    ap.add_argument("--device", default="cpu", help="device of the torch tensors: cpu or cuda (dtype bfloat16 there)")
    a = ap.parse_args()
    B, T, Hq, Hk, d, L = (int(x) for x in a.shape.split(","))

    rng = np.random.default_rng(0)
    arrays = {
        "q": rng.standard_normal((B, T, Hq, d), dtype=np.float32),
        "k": rng.standard_normal((B, T, Hk, d), dtype=np.float32),
        "v": rng.standard_normal((B, T, Hk, d), dtype=np.float32),
        "kd": rng.standard_normal((B, T, L, Hk, d), dtype=np.float32),
        "vd": rng.standard_normal((B, T, L, Hk, d), dtype=np.float32),
    }
    rows = []

    sync = [lambda: None]

    def bench(name, fn):
        med, best = per_call_us(fn, a.iters, a.repeats, a.warmup, sync[0])
        rows.append((name, med, best))

    npx = arrays
    o, lse = moda.attention_fwd(**npx)
    do = np.ones_like(o)

    # The floor: libmoda's own entry points called through ctypes with the arguments of one real call (captured
    # with a spy), i.e. the C work plus ctypes' argument conversion.
    from moda import _lib
    lib = _lib.lib()
    captured = {}

    def spy(name):
        real = getattr(lib, name)

        def call(*args):
            captured[name] = args
            return real(*args)
        return real, call

    reals = {}
    for name in ("moda_forward", "moda_backward"):
        reals[name], wrapper = spy(name)
        setattr(lib, name, wrapper)
    kept = moda.attention_fwd(**npx), moda.attention_bwd(*npx.values(), o, lse, do)  # noqa: F841 (keeps buffers)
    for name, real in reals.items():
        setattr(lib, name, real)
    fwd_args, bwd_args = captured["moda_forward"], list(captured["moda_backward"])
    # the call's workspace is gone: give the raw calls one of the same size
    ws = np.empty(max(int(bwd_args[15]), 1), dtype=np.uint8)
    bwd_args[14] = ws.ctypes.data if bwd_args[15] else None
    bench("libmoda moda_forward (ctypes, numpy args)", lambda: lib.moda_forward(*fwd_args))
    bench("libmoda moda_backward (ctypes, numpy args)", lambda: lib.moda_backward(*bwd_args))
    bench("numpy attention_fwd", lambda: moda.attention_fwd(**npx))
    bench("numpy attention_bwd", lambda: moda.attention_bwd(*npx.values(), o, lse, do))

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
        if a.device == "cuda":
            tx = {n: torch.from_numpy(x).to("cuda", torch.bfloat16) for n, x in arrays.items()}
            sync[0] = torch.cuda.synchronize
        else:
            tx = {n: torch.from_numpy(x) for n, x in arrays.items()}
        tg = {n: x.clone().requires_grad_(True) for n, x in tx.items()}
        with torch.no_grad():
            to, tl = moda.attention_fwd(**tx)
        tdo = torch.ones_like(to)

        def fwd_nograd():
            with torch.no_grad():
                moda.attention(**tg)

        def fwd_grad():
            moda.attention(**tg)

        def fwd_bwd():
            moda.attention(**tg).backward(tdo)

        bench("torch attention (no_grad)", fwd_nograd)
        bench("torch attention (grad, fwd only)", fwd_grad)
        bench("torch attention fwd+bwd (autograd)", fwd_bwd)
        bench("torch attention_fwd", lambda: moda.attention_fwd(**tx))
        bench("torch attention_bwd", lambda: moda.attention_bwd(*tx.values(), to, tl, tdo))
        # What autograd costs on its own, for scale: an autograd.Function with moda's inputs, outputs and saved
        # tensors that only allocates (the floor of any Python-level operator with this signature).
        class Null(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, kd, vd):
                o, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, kd, vd, o, lse)
                ctx.mark_non_differentiable(lse)
                return o, lse

            @staticmethod
            def backward(ctx, do, dlse):
                return tuple(torch.empty_like(t) for t in ctx.saved_tensors[:5])

        bench("torch floor: null autograd.Function fwd+bwd", lambda: Null.apply(*tg.values())[0].backward(tdo))

    print("host %s, %d cores; %s" % (cpu_name(), os.cpu_count() or 0,
                                     torch.cuda.get_device_name() if a.device == "cuda" else "no GPU used"))
    print("moda %s, libmoda %s at %s; torch %s (tensors on %s); shape B,T,Hq,Hk,d,L=%s; %d iters x %d repeats; "
          "MODA_FAST_PATHS=%s" % (moda.__version__, moda.library_version(), moda.library_path(),
                                  torch.__version__ if torch is not None else "absent", a.device, a.shape, a.iters,
                                  a.repeats, os.environ.get("MODA_FAST_PATHS", "(default)")))
    print("%-40s %12s %12s" % ("path", "median us", "best us"))
    for name, med, best in rows:
        print("%-40s %12.1f %12.1f" % (name, med, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
