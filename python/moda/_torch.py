"""PyTorch front end: the custom ops torch.ops.moda.fwd / bwd / bwd_into, their fake (meta) kernels and the
autograd formula, so that eager mode, autograd and torch.compile all see one opaque operator.

CPU tensors run on libmoda's CPU path, CUDA tensors on its CUDA path on torch's current stream. The fake
kernels allocate exactly what the real ones do (the shared plans of _core), which torch.compile relies on.
Plain eager calls, which nothing observes, skip the dispatcher (see "eager calls without the dispatcher").
"""

import contextlib
import os
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
    def array_signature(x):
        """What a cached plan depends on (see _core): shape, strides, dtype and device; None (no plan) for
        non-tensors, and for CUDA tensors under MODA_FAST_PATHS=cpu."""
        if not isinstance(x, torch.Tensor) or (x.is_cuda and not _core.FAST_CUDA):
            return None
        return x.shape, x.stride(), x.dtype, x.device

    @staticmethod
    def alloc_spec(shape, stride, like, dtype, zero=False):
        dt = like.dtype if dtype is None else (torch.float64 if dtype == "f64" else torch.float32)
        return tuple(shape), tuple(stride), dt, like.device, zero

    @staticmethod
    def alloc(spec):
        shape, stride, dt, device, zero = spec
        x = torch.empty_strided(shape, stride, dtype=dt, device=device)
        return x.zero_() if zero else x

    @staticmethod
    def check_writable(x, name):
        pass

    @staticmethod
    def workspace(nbytes, like):
        return torch.empty(int(nbytes), dtype=torch.uint8, device=like.device) if nbytes else None

    @staticmethod
    def pointer(ws):
        return None if ws is None else ws.data_ptr()

    data_ptr = torch.Tensor.data_ptr

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


# ---- eager calls without the dispatcher -------------------------------------------------------------------------
#
# Going through torch.ops.moda.* costs more host time than the rest of a call (the Python autograd kernel of
# torch.library, default filling, two trips through the dispatcher per op). In plain eager mode nothing observes
# that trip, so moda.attention calls libmoda from an autograd.Function instead. Whenever something could observe
# or needs the operator (torch.compile / export tracing, a dispatch or torch-function mode such as FakeTensorMode
# or FlopCounterMode, a functorch transform, a tensor subclass, a device other than cpu/cuda), the call goes
# through the custom op as before. CUDA tensors skip it under MODA_FAST_PATHS=cpu (see _core); with
# MODA_FAST_PATHS=0 or MODA_TORCH_EAGER=0 every call goes through the custom ops.

_EAGER = _core.PLANS and os.environ.get("MODA_TORCH_EAGER", "1") != "0"
_PLAIN = (torch.Tensor, torch.nn.Parameter)
try:
    _is_compiling = torch.compiler.is_compiling
    _dispatch_modes = torch._C._len_torch_dispatch_stack
    _function_modes = torch._C._is_torch_function_mode_enabled
    _functorch_level = torch._C._functorch.peek_interpreter_stack
    _bump_version = torch.autograd.graph.increment_version
except AttributeError:  # an older torch without these hooks: always take the custom ops
    _EAGER = False


def _eager(*tensors):
    if not _EAGER or _is_compiling() or _dispatch_modes() or _function_modes() or _functorch_level() is not None:
        return False
    for x in tensors:
        if x is not None and (type(x) not in _PLAIN or not (x.is_cpu or (x.is_cuda and _core.FAST_CUDA))):
            return False
    return True


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


class _Attention(torch.autograd.Function):
    """The eager twin of torch.ops.moda.fwd with its autograd formula (_setup_context/_backward above)."""

    @staticmethod
    def forward(ctx, cfg, q, k, v, kd, vd):
        o, lse = _core.forward(TorchOps, cfg, q, k, v, kd, vd)
        ctx.save_for_backward(q, k, v, kd, vd, o, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, kd, vd, o, lse = ctx.saved_tensors
        if torch.is_grad_enabled() or not _eager(do):  # create_graph=True: as the custom op's formula does
            dq, dk, dv, dkd, dvd = _bwd(q, k, v, kd, vd, o, lse, do, *ctx.cfg.as_args())
            dk, dv, dkd, dvd = (g if x is not None else None for g, x in zip((dk, dv, dkd, dvd), (k, v, kd, vd)))
        else:
            dq, dk, dv, dkd, dvd = _core.backward(TorchOps, ctx.cfg, q, k, v, kd, vd, o, lse, do)
        return None, dq, dk, dv, dkd, dvd


# ---- what moda.attention* call --------------------------------------------------------------------------------

def _check(**named):
    # The custom-op schema would reject these with a message about the schema; say it in the API's terms.
    for name, x in named.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                            "q is a torch.Tensor but %s is a %s: pass arrays of one library" % (name, type(x).__name__))


def forward(cfg, q, k, v, kd, vd):
    _check(k=k, v=v, kd=kd, vd=vd)
    if _eager(q, k, v, kd, vd):
        if _needs_grad(q, k, v, kd, vd):
            return _Attention.apply(cfg, q, k, v, kd, vd)
        return _core.forward(TorchOps, cfg, q, k, v, kd, vd)
    return _fwd(q, k, v, kd, vd, *cfg.as_args())


def backward(cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate):
    _check(k=k, v=v, kd=kd, vd=vd, o=o, lse=lse, do=do, dkd=dkd, dvd=dvd)
    # The ops have no autograd formula of their own, so a call that autograd would record keeps to them.
    direct = _eager(q, k, v, kd, vd, o, lse, do, dkd, dvd) and not _needs_grad(q, k, v, kd, vd, o, lse, do, dkd,
                                                                               dvd)
    if dkd is None and dvd is None and not accumulate:
        if direct:
            return _core.backward(TorchOps, cfg, q, k, v, kd, vd, o, lse, do)
        dq, dk, dv, dkd, dvd = _bwd(q, k, v, kd, vd, o, lse, do, *cfg.as_args())
        dkd = dkd if kd is not None else None
        dvd = dvd if vd is not None else None
    else:
        if (dkd is None) != (dvd is None) or (dkd is None and kd is not None):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                            "give both dkd and dvd (the buffers to %s the depth gradients)"
                            % ("add" if accumulate else "write"))
        if direct:
            dq, dk, dv, _, _ = _core.backward(TorchOps, cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate)
            for x in (dkd, dvd):  # what mutates_args does for the custom op: autograd sees the in-place write
                if x is not None:
                    _bump_version(x)
            return dq, dk, dv, dkd, dvd
        dq, dk, dv = _bwd_into(q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate, *cfg.as_args())
    return dq, (dk if k is not None else None), (dv if v is not None else None), dkd, dvd
