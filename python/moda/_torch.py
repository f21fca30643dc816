"""PyTorch front end: the custom ops torch.ops.moda.fwd / bwd / bwd_into, their fake (meta) kernels and the
autograd formula, so that eager mode, autograd and torch.compile all see one opaque operator.

CPU tensors run on libmoda's CPU path, CUDA tensors on its CUDA path on torch's current stream. The fake
kernels allocate exactly what the real ones do (the shared plans of _core), which torch.compile relies on.
"""

import contextlib
from typing import Optional, Tuple

import torch

from . import _core, _lib
from ._lib import MODAError

_DTYPES = {torch.float32: _lib.F32, torch.float16: _lib.F16, torch.bfloat16: _lib.BF16, torch.float64: _lib.F64}


def _needs_copy(x):
    # CUDA kernels read rows as vectors: the C side requires a unit innermost stride there.
    return x.device.type == "cuda" and x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1


def _stride(x):
    """x's strides as the C call will see them, after TorchOps.prepare: what the fake kernels plan with."""
    return _core.strides_in_order(list(x.shape), list(range(x.dim()))) if _needs_copy(x) else list(x.stride())


class TorchOps:
    kind = "torch.Tensor"

    @staticmethod
    def owns(x):
        return isinstance(x, torch.Tensor)

    @staticmethod
    def shape(x):
        return tuple(x.shape)

    @staticmethod
    def stride(x):
        return list(x.stride())

    @staticmethod
    def prepare(x):
        return x.contiguous() if x is not None and _needs_copy(x) else x

    @staticmethod
    def info(x, name):
        code = _DTYPES.get(x.dtype)
        if code is None:
            raise MODAError(_lib.ERR_UNSUPPORTED,
                            "%s has dtype %s; moda takes torch.float32, float16, bfloat16 or float64"
                            % (name, x.dtype))
        if x.device.type == "cuda":
            device = _lib.CUDA
        elif x.device.type == "cpu":
            device = _lib.CPU
        else:
            raise MODAError(_lib.ERR_WRONG_DEVICE,
                            "%s is on device %s; moda runs on the CPU and on CUDA GPUs" % (name, x.device))
        return tuple(x.shape), list(x.stride()), x.data_ptr(), code, device

    @staticmethod
    def empty(shape, stride, like, dtype):
        dt = like.dtype if dtype is None else (torch.float64 if dtype == "f64" else torch.float32)
        return torch.empty_strided(shape, stride, dtype=dt, device=like.device)

    @staticmethod
    def zeros(shape, stride, like):
        return torch.zeros_like(TorchOps.empty(shape, stride, like, None))

    @staticmethod
    def check_writable(x, name):
        pass

    @staticmethod
    def workspace(nbytes, like):
        return torch.empty(int(nbytes), dtype=torch.uint8, device=like.device) if nbytes else None

    @staticmethod
    def pointer(ws):
        return None if ws is None else ws.data_ptr()

    @staticmethod
    def stream(x):
        return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else None

    @staticmethod
    def device_guard(x):
        # libmoda launches on the CUDA runtime's current device, which must be the tensors' device.
        return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _plan_empty(plan, like, dtype=None):
    shape, stride = plan
    return torch.empty_strided(shape, stride, dtype=like.dtype if dtype is None else dtype, device=like.device)


# ---- forward ------------------------------------------------------------------------------------------------

@torch.library.custom_op("moda::fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], kd: Optional[torch.Tensor],
         vd: Optional[torch.Tensor], causal: bool, scale: float, sequence: bool, d0: int, d1: int, chunk: bool,
         chunk_size: int, deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    cfg = _core.Config.from_args(causal, scale, sequence, d0, d1, chunk, chunk_size, deterministic)
    return _core.forward(TorchOps, cfg, q, k, v, kd, vd)


def _shape(x):
    return None if x is None else tuple(x.shape)


@_fwd.register_fake
def _fwd_fake(q, k, v, kd, vd, causal, scale, sequence, d0, d1, chunk, chunk_size, deterministic):
    o_plan, lse_plan = _core.forward_plan(tuple(q.shape), _stride(q), _shape(v), _shape(vd))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _plan_empty(o_plan, q), _plan_empty(lse_plan, q, lse_dtype)


# ---- backward -----------------------------------------------------------------------------------------------

_NONE = (0,)  # shape of the placeholder returned for an absent gradient (custom ops cannot return None)


def _or_empty(x, like):
    return x if x is not None else like.new_empty(_NONE)


@torch.library.custom_op("moda::bwd", mutates_args=())
def _bwd(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], kd: Optional[torch.Tensor],
         vd: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, causal: bool,
         scale: float, sequence: bool, d0: int, d1: int, chunk: bool, chunk_size: int,
         deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _core.Config.from_args(causal, scale, sequence, d0, d1, chunk, chunk_size, deterministic)
    dq, dk, dv, dkd, dvd = _core.backward(TorchOps, cfg, q, k, v, kd, vd, o, lse, do)
    return dq, _or_empty(dk, q), _or_empty(dv, q), _or_empty(dkd, q), _or_empty(dvd, q)


def _like_fake(x, q):
    if x is None:
        return q.new_empty(_NONE)
    return _plan_empty(_core.like_plan(tuple(x.shape), _stride(x)), x)


@_bwd.register_fake
def _bwd_fake(q, k, v, kd, vd, o, lse, do, causal, scale, sequence, d0, d1, chunk, chunk_size, deterministic):
    return _like_fake(q, q), _like_fake(k, q), _like_fake(v, q), _like_fake(kd, q), _like_fake(vd, q)


@torch.library.custom_op("moda::bwd_into", mutates_args=("dkd", "dvd"))
def _bwd_into(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], kd: Optional[torch.Tensor],
              vd: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
              dkd: Optional[torch.Tensor], dvd: Optional[torch.Tensor], accumulate: bool, causal: bool,
              scale: float, sequence: bool, d0: int, d1: int, chunk: bool, chunk_size: int,
              deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _core.Config.from_args(causal, scale, sequence, d0, d1, chunk, chunk_size, deterministic)
    dq, dk, dv, _, _ = _core.backward(TorchOps, cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate)
    return dq, _or_empty(dk, q), _or_empty(dv, q)


@_bwd_into.register_fake
def _bwd_into_fake(q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate, causal, scale, sequence, d0, d1, chunk,
                   chunk_size, deterministic):
    return _like_fake(q, q), _like_fake(k, q), _like_fake(v, q)


# ---- autograd -----------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    q, k, v, kd, vd = inputs[:5]
    o, lse = output
    ctx.save_for_backward(q, k, v, kd, vd, o, lse)
    ctx.args = inputs[5:]
    ctx.present = tuple(x is not None for x in (k, v, kd, vd))
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, kd, vd, o, lse = ctx.saved_tensors
    dq, dk, dv, dkd, dvd = _bwd(q, k, v, kd, vd, o, lse, do, *ctx.args)
    grads = [g if present else None for g, present in zip((dk, dv, dkd, dvd), ctx.present)]
    return (dq, *grads) + (None,) * len(ctx.args)


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- what moda.attention* call --------------------------------------------------------------------------------

def _check(**named):
    # The custom-op schema would reject these with a message about the schema; say it in the API's terms.
    for name, x in named.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                            "q is a torch.Tensor but %s is a %s: pass arrays of one library" % (name, type(x).__name__))


def forward(cfg, q, k, v, kd, vd):
    _check(k=k, v=v, kd=kd, vd=vd)
    return _fwd(q, k, v, kd, vd, *cfg.as_args())


def backward(cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate):
    _check(k=k, v=v, kd=kd, vd=vd, o=o, lse=lse, do=do, dkd=dkd, dvd=dvd)
    if dkd is None and dvd is None and not accumulate:
        dq, dk, dv, dkd, dvd = _bwd(q, k, v, kd, vd, o, lse, do, *cfg.as_args())
        dkd = dkd if kd is not None else None
        dvd = dvd if vd is not None else None
    else:
        if (dkd is None) != (dvd is None) or (dkd is None and kd is not None):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                            "give both dkd and dvd (the buffers to %s the depth gradients)"
                            % ("add" if accumulate else "write"))
        dq, dk, dv = _bwd_into(q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate, *cfg.as_args())
    return dq, (dk if k is not None else None), (dv if v is not None else None), dkd, dvd
