"""moda: Mixture-of-Depths Attention (MoDA) for NumPy and PyTorch, over libmoda's C API (ctypes).

Layouts (docs/spec.md): q [B, T, Hq, d], k/v [B, T, Hk, d(v)], kd/vd [B, T, Lcap, Hk, d(v)], o [B, T, Hq, dv],
lse [B, T, Hq] (float32; float64 for float64 inputs). A 5-D q [B, T, Hk, G, d] is accepted too (o and lse are
then [B, T, Hk, G, dv] and [B, T, Hk, G]); moda.folded_view turns the authors' time-folded [B, T*G, Hk, d]
into such a view without copying.

NumPy arrays and torch CPU tensors run on the CPU (float64 runs the float64 reference); torch CUDA tensors run
on the CUDA path on the current stream. Torch calls go through the custom ops torch.ops.moda.* with autograd,
so torch.compile traces through them.
"""

import sys

import numpy as np

from . import _core, _lib
from ._lib import MODAError, library_path

__version__ = "0.1.0"

__all__ = ["attention", "attention_fwd", "attention_bwd", "folded_view", "unfolded_view", "depth_view",
           "cuda_available", "library_version", "library_path", "MODAError", "__version__"]

_torch_frontend = None


def _load_torch():
    global _torch_frontend
    from . import _torch
    _torch_frontend = _torch
    return _torch


# Registering the custom ops while torch.compile traces the first call would break the trace, so register them
# at import when torch is already loaded (the usual order); otherwise on the first torch call.
if "torch" in sys.modules:
    _load_torch()


def _frontend(q):
    if isinstance(q, np.ndarray):
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(q, torch.Tensor):
        return _torch_frontend if _torch_frontend is not None else _load_torch()
    raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                    "q must be a numpy.ndarray or a torch.Tensor, got %s" % type(q).__name__)


def attention_fwd(q, k, v, kd=None, vd=None, *, causal=True, scale=None, sequence=True, depth_range=None,
                  depth_mode="token", chunk_size=64, deterministic=False):
    """MoDA forward: returns (o, lse).

    q [B, T, Hq, d] (or 5-D [B, T, Hk, G, d]); k, v [B, T, Hk, d/dv] (None with sequence=False); kd, vd
    [B, T, Lcap, Hk, d/dv] (None for no depth). causal: sequence keys j <= t. scale: logit scale (None:
    1/sqrt(d)). sequence=False: depth-only attention. depth_range=(d0, d1): visible depth slots (d1=None: all;
    default all). depth_mode "token" (a row sees its own token's slots) or "chunk" (slots of every earlier
    token of its chunk of chunk_size tokens; causal only). deterministic: bitwise-reproducible backward.
    """
    cfg = _core.Config(causal, scale, sequence, depth_range, depth_mode, chunk_size, deterministic)
    fe = _frontend(q)
    if fe is None:
        return _core.forward(_core.NumpyOps, cfg, q, k, v, kd, vd)
    return fe.forward(cfg, q, k, v, kd, vd)


def attention(q, k, v, kd=None, vd=None, *, causal=True, scale=None, sequence=True, depth_range=None,
              depth_mode="token", chunk_size=64, deterministic=False, return_lse=False):
    """MoDA: o = softmax over the sequence keys and the depth keys of each query row, one softmax for both.

    Same arguments as attention_fwd; returns o, or (o, lse) with return_lse=True. With torch tensors the result
    is differentiable with respect to q, k, v, kd and vd (lse is returned without a gradient, as in
    FlashAttention).
    """
    o, lse = attention_fwd(q, k, v, kd, vd, causal=causal, scale=scale, sequence=sequence,
                           depth_range=depth_range, depth_mode=depth_mode, chunk_size=chunk_size,
                           deterministic=deterministic)
    return (o, lse) if return_lse else o


def attention_bwd(q, k, v, kd, vd, o, lse, do, *, causal=True, scale=None, sequence=True, depth_range=None,
                  depth_mode="token", chunk_size=64, deterministic=False, accumulate_depth_grad=False,
                  dkd=None, dvd=None):
    """MoDA backward: returns (dq, dk, dv, dkd, dvd) given the forward's o and lse and do = dL/do.

    The keyword arguments must be those of the forward. dk/dv are None when k/v are, dkd/dvd when kd/vd are.
    dkd/dvd: buffers shaped like kd/vd to write the depth gradients into (only the visible slots are
    touched); with accumulate_depth_grad=True the gradients are added into them (a model accumulating the
    depth gradients of all later layers in one buffer). Without buffers, fresh zero-filled ones are returned.
    """
    cfg = _core.Config(causal, scale, sequence, depth_range, depth_mode, chunk_size, deterministic)
    fe = _frontend(q)
    if fe is None:
        return _core.backward(_core.NumpyOps, cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd,
                              bool(accumulate_depth_grad))
    return fe.backward(cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd, bool(accumulate_depth_grad))


# ---- layout helpers (zero-copy views; work on NumPy arrays and torch tensors) ---------------------------------

def _is_numpy(x):
    return isinstance(x, np.ndarray)


def _transpose(x, a, b):
    return x.swapaxes(a, b) if _is_numpy(x) else x.transpose(a, b)


def _strides(x):
    return [s // x.itemsize for s in x.strides] if _is_numpy(x) else list(x.stride())


def _split_rows(x, n, fn, letter):
    """[B, T*n, Hk, d] -> [B, T, n, Hk, d]; splitting one axis is always a view."""
    if len(x.shape) != 4:
        raise MODAError(_lib.ERR_SHAPE_MISMATCH, "%s takes a 4-D [B, T*%s, Hk, d] array, got shape %s"
                        % (fn, letter, tuple(x.shape)))
    B, Tn, Hk, d = x.shape
    if not isinstance(n, int) or n < 1 or Tn % n != 0:
        raise MODAError(_lib.ERR_SHAPE_MISMATCH,
                        "%s: the folded length %d is not a multiple of %s=%r" % (fn, Tn, letter, n))
    return x.reshape(B, Tn // n, n, Hk, d)


def folded_view(x, G):
    """The authors' time-folded [B, T*G, Hk, d] (row t*G + g holds query head h*G + g of token t) as the 5-D
    view [B, T, Hk, G, d] that moda.attention takes in place of a standard [B, T, Hq, d]. No copy is made: the
    library receives the strides. o, lse and dq come back in the same folded order (see unfolded_view)."""
    return _transpose(_split_rows(x, G, "folded_view", "G"), 2, 3)


def unfolded_view(y):
    """The inverse of folded_view: a 5-D [B, T, Hk, G, d] whose memory is time-folded (for instance the o that
    moda.attention returns for a folded q) as the [B, T*G, Hk, d] array of the authors' layout, without a copy.
    Raises MODAError when the memory is not time-folded."""
    if len(y.shape) != 5:
        raise MODAError(_lib.ERR_SHAPE_MISMATCH,
                        "unfolded_view takes a 5-D [B, T, Hk, G, d] view, got shape %s" % (tuple(y.shape),))
    B, T, Hk, G, d = y.shape
    s = _strides(y)
    if T > 1 and G > 1 and s[1] != G * s[3]:
        raise MODAError(_lib.ERR_LAYOUT, "unfolded_view: this [B, T, Hk, G, d] view is not time-folded "
                        "(stride of T is %d, expected G * stride of G = %d)" % (s[1], G * s[3]))
    z = _transpose(y, 2, 3)
    return z.reshape(B, T * G, Hk, d)


def depth_view(x, L):
    """The authors' depth cache [B, T*L, Hk, d] (row t*L + l is slot l of token t) as kd/vd [B, T, L, Hk, d]
    (a view)."""
    return _split_rows(x, L, "depth_view", "L")


# ---- library ----------------------------------------------------------------------------------------------------

def cuda_available():
    """True when the loaded libmoda has its CUDA backend and sees at least one GPU."""
    return _lib.lib().moda_cuda_device_count() > 0


def library_version():
    """The version string of the loaded libmoda."""
    return _lib.lib().moda_version().decode()
