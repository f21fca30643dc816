"""What the NumPy and PyTorch front ends share: option resolution, the mapping of user layouts onto the C API's
5-D strided views, output allocation plans, and the two C calls.

An array library plugs in through a small "ops" object (NumpyOps below, TorchOps in _torch.py) that knows how
to read an array's shape/strides/pointer and how to allocate. Nothing here copies an input unless the ops
object says the device needs it (non-unit innermost stride on CUDA, or negative strides in NumPy).
"""

import ctypes
import math
import os

import numpy as np

from . import _lib
from ._lib import MODAError


class Config:
    """The resolved keyword arguments of one call (plain Python values, so the torch custom ops can take them
    as scalars)."""

    __slots__ = ("causal", "sequence", "chunk", "chunk_size", "d0", "d1", "scale", "deterministic")

    def __init__(self, causal=True, scale=None, sequence=True, depth_range=None, depth_mode="token",
                 chunk_size=64, deterministic=False):
        if depth_mode not in ("token", "chunk"):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                            "depth_mode must be 'token' or 'chunk', got %r" % (depth_mode,))
        if depth_range is None:
            d0, d1 = 0, _lib.DEPTH_ALL
        else:
            try:
                d0, d1 = depth_range
            except (TypeError, ValueError):
                raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                                "depth_range must be a pair (d0, d1) of slot indices (d1 may be None for all "
                                "slots), got %r" % (depth_range,)) from None
            if d1 is None:
                d1 = _lib.DEPTH_ALL
            elif not _is_int(d1) or d1 < 0:
                raise MODAError(_lib.ERR_DEPTH_RANGE, "depth_range end must be a non-negative integer or None, got %r" % (d1,))
            if not _is_int(d0) or d0 < 0:
                raise MODAError(_lib.ERR_DEPTH_RANGE, "depth_range start must be a non-negative integer, got %r" % (d0,))
        if not _is_int(chunk_size):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT, "chunk_size must be an integer, got %r" % (chunk_size,))
        if scale is None:
            scale = 0.0
        else:
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise MODAError(_lib.ERR_INVALID_ARGUMENT, "scale must be a number, got %r" % (scale,)) from None
            # The C API reads 0 as "1/sqrt(d)", so an explicit 0 cannot be passed through faithfully.
            if scale == 0.0 or not math.isfinite(scale):
                raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                                "scale must be finite and non-zero (None selects 1/sqrt(d)), got %r" % (scale,))
        self.causal = bool(causal)
        self.sequence = bool(sequence)
        self.chunk = depth_mode == "chunk"
        self.chunk_size = int(chunk_size)
        self.d0 = int(d0)
        self.d1 = int(d1)
        self.scale = scale
        self.deterministic = bool(deterministic)

    def options(self, accumulate=False):
        o = _lib.lib().moda_default_options()
        o.causal = int(self.causal)
        o.sequence = int(self.sequence)
        o.depth_mode = _lib.DEPTH_CHUNK if self.chunk else _lib.DEPTH_TOKEN
        o.chunk_size = self.chunk_size
        o.depth_begin = self.d0
        o.depth_end = self.d1
        o.scale = self.scale
        o.deterministic = int(self.deterministic)
        o.depth_grad_mode = _lib.DEPTH_GRAD_ACCUMULATE if accumulate else _lib.DEPTH_GRAD_OVERWRITE
        return o

    def as_args(self):
        return (self.causal, self.scale, self.sequence, self.d0, self.d1, self.chunk, self.chunk_size,
                self.deterministic)

    @classmethod
    def from_args(cls, causal, scale, sequence, d0, d1, chunk, chunk_size, deterministic):
        c = cls.__new__(cls)
        c.causal, c.scale, c.sequence, c.d0, c.d1 = causal, scale, sequence, d0, d1
        c.chunk, c.chunk_size, c.deterministic = chunk, chunk_size, deterministic
        return c


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ---- layouts -------------------------------------------------------------------------------------------------

def check_ndim(name, shape, allowed, layout):
    if len(shape) not in allowed:
        raise MODAError(_lib.ERR_SHAPE_MISMATCH, "%s must be %s, got a %d-D array of shape %s"
                        % (name, layout, len(shape), tuple(shape)))


Q_LAYOUT = "4-D [B, T, Hq, d] (or 5-D [B, T, Hk, G, d], e.g. moda.folded_view)"


def kv_heads(q_shape, k_shape, kd_shape):
    """Hk: from a 5-D q, else from k, else from kd; with neither, every query head is its own group."""
    if len(q_shape) == 5:
        return q_shape[2]
    if k_shape is not None and len(k_shape) == 4:
        return k_shape[2]
    if kd_shape is not None and len(kd_shape) == 5:
        return kd_shape[3]
    return q_shape[2]


def split_heads(name, shape, stride, hk):
    """The 5-D [B, T, Hk, G, x] view of a q-like operand given as 4-D [B, T, Hq, x] (or already 5-D), and the
    4-D [B, T, Hk, G] view of an lse-like one given as 3-D [B, T, Hq]. Pure stride arithmetic: no copy."""
    shape, stride = list(shape), list(stride)
    if len(shape) == (3 if name == "lse" else 4):
        hq = shape[2]
        if hk <= 0 or hq % hk != 0:
            raise MODAError(_lib.ERR_SHAPE_MISMATCH,
                            "%s has %d heads, which is not a multiple of the %d key/value heads" % (name, hq, hk))
        g = hq // hk
        shape[2:3] = [hk, g]
        stride[2:3] = [g * stride[2], stride[2]]
    return shape, stride


def order_of(shape, stride):
    """Dimensions from outermost to innermost in memory, so that outputs follow the layout of the input they
    belong to (a folded q gives a folded o). The last dimension stays innermost (CUDA needs that), and a
    broadcast input (stride 0) gives the standard order."""
    n = len(shape)
    if any(stride[i] == 0 and shape[i] > 1 for i in range(n)):
        return list(range(n))
    return sorted(range(n - 1), key=lambda i: (-stride[i], i)) + [n - 1]


def strides_in_order(shape, order):
    stride = [0] * len(shape)
    step = 1
    for i in reversed(order):
        stride[i] = step
        step *= shape[i]
    return stride


def forward_plan(q_shape, q_stride, v_shape, vd_shape):
    """(shape, strides) of o and lse for these inputs, shared by the real allocation and torch's fake one."""
    if v_shape is not None:
        dv = v_shape[-1]
    elif vd_shape is not None:
        dv = vd_shape[-1]
    else:
        dv = q_shape[-1]
    order = order_of(q_shape, q_stride)
    o_shape = list(q_shape[:-1]) + [dv]
    lse_shape = list(q_shape[:-1])
    lse_order = [i for i in order if i != len(q_shape) - 1]
    return (o_shape, strides_in_order(o_shape, order)), (lse_shape, strides_in_order(lse_shape, lse_order))


def like_plan(shape, stride):
    return list(shape), strides_in_order(list(shape), order_of(shape, stride))


def lse_is_double(dtype_code):
    # The reference path (float64 inputs) keeps lse in float64 so that gradients stay float64-accurate.
    return dtype_code == _lib.F64


class Operand:
    """One array as the C API sees it: the ctypes moda_tensor plus the Python object that owns the memory."""

    __slots__ = ("owner", "tensor")

    def __init__(self, owner, tensor):
        self.owner = owner
        self.tensor = tensor


def describe(ops, x, name, hk=None):
    if x is None:
        return None
    shape, stride, ptr, dtype, device = ops.info(x, name)
    if name in ("q", "o", "do", "dq", "lse"):
        shape, stride = split_heads(name, shape, stride, hk)
    return Operand(x, _lib.make_tensor(ptr, dtype, device, shape, stride))


def _ref(op):
    return None if op is None else ctypes.byref(op.tensor)


def check_kinds(q, k, v, kd, vd, ops):
    for name, x in (("k", k), ("v", v), ("kd", kd), ("vd", vd)):
        if x is not None and not ops.owns(x):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT, "q is a %s but %s is a %s: pass arrays of one library"
                            % (ops.kind, name, type(x).__name__))
    check_ndim("q", ops.shape(q), (4, 5), Q_LAYOUT)
    for name, x, nd, layout in (("k", k, 4, "[B, T, Hk, d]"), ("v", v, 4, "[B, T, Hk, dv]"),
                                ("kd", kd, 5, "[B, T, Lcap, Hk, d]"), ("vd", vd, 5, "[B, T, Lcap, Hk, dv]")):
        if x is not None:
            check_ndim(name, ops.shape(x), (nd,), "%d-D %s" % (nd, layout))


# ---- per-signature plans ----------------------------------------------------------------------------------------
#
# Everything a call derives from its inputs' shapes, strides, dtypes and devices and from its options (the
# validation above, the 5-D views, the output plans, the moda_tensor descriptors, the moda_options struct) is the
# same for every call with the same signature, so the first call computes it on the full path below and later
# calls reuse it: they read each input's signature and pointer, allocate the outputs, copy the cached descriptors
# with the new pointers in and call the library (which validates every call in full, pointers included). A call
# whose inputs need a copy (ops.prepare) always takes the full path. The backward workspace size is asked every
# call: the CPU one follows the OpenMP thread count.

_PLAN_LIMIT = 256  # distinct signatures kept per entry point; a model has a handful

# MODA_FAST_PATHS: "1" (the default) uses the plans and the eager torch shortcut (_torch.py) for CPU and CUDA
# arrays and tensors, "cpu" for CPU ones only, "0" nowhere. CUDA joined the default after the GPU suite passed
# with it on an H100 (227 passed, 2026-11-23).
FAST_PATHS = os.environ.get("MODA_FAST_PATHS", "1").strip().lower()
PLANS = FAST_PATHS != "0"
FAST_CUDA = FAST_PATHS in ("1", "all", "cuda")


class _Plan:
    __slots__ = ("opts", "templates", "allocs")

    def __init__(self, opts, operands, allocs):
        self.opts = opts
        # moda_tensor descriptors with the data pointer cleared: copied and filled per call
        self.templates = tuple(None if op is None else _template(op.tensor) for op in operands)
        self.allocs = allocs


def _template(t):
    c = _lib.Tensor.from_buffer_copy(t)
    c.data = None
    return bytes(c)


_new_tensor = _lib.Tensor.from_buffer_copy
_byref = ctypes.byref


def _refs(templates, arrays, data_ptr):
    refs = []
    for tpl, x in zip(templates, arrays):
        if tpl is None:
            refs.append(None)
        else:
            t = _new_tensor(tpl)
            t.data = data_ptr(x)
            refs.append(_byref(t))
    return refs


def _signature(array_signature, arrays):
    """The plan key of these operands (None for absent ones), or None when one of them cannot have a plan."""
    sig = []
    for x in arrays:
        if x is None:
            sig.append(None)
        else:
            one = array_signature(x)
            if one is None:
                return None
            sig.append(one)
    return tuple(sig)


def _remember(cache, key, plan):
    if key is not None:
        if len(cache) >= _PLAN_LIMIT:
            cache.clear()
        cache[key] = plan


_FORWARD_PLANS = {}
_BACKWARD_PLANS = {}


# ---- the two C calls -----------------------------------------------------------------------------------------

def forward(ops, cfg, q, k, v, kd, vd):
    """Runs moda_forward; returns (o, lse) allocated by ops."""
    key = _signature(ops.array_signature, (q, k, v, kd, vd)) if PLANS else None
    if key is not None:
        key = (key, cfg.as_args())
        plan = _FORWARD_PLANS.get(key)
        if plan is not None:
            o_spec, lse_spec = plan.allocs
            o = ops.alloc(o_spec)
            lse = ops.alloc(lse_spec)
            refs = _refs(plan.templates, (q, k, v, kd, vd, o, lse), ops.data_ptr)
            with ops.device_guard(q):
                status = _lib.lib().moda_forward(_byref(plan.opts), *refs, ops.stream(q))
            if status:
                _lib.check(status)
            return o, lse
    return _forward_full(ops, cfg, q, k, v, kd, vd, key)


def _forward_full(ops, cfg, q, k, v, kd, vd, key):
    check_kinds(q, k, v, kd, vd, ops)
    given = (q, k, v, kd, vd)
    q, k, v, kd, vd = (ops.prepare(x) for x in given)
    if any(a is not b for a, b in zip(given, (q, k, v, kd, vd))):
        key = None
    hk = kv_heads(ops.shape(q), ops.shape(k) if k is not None else None, ops.shape(kd) if kd is not None else None)
    (o_shape, o_stride), (l_shape, l_stride) = forward_plan(
        ops.shape(q), ops.stride(q), ops.shape(v) if v is not None else None,
        ops.shape(vd) if vd is not None else None)
    tq = describe(ops, q, "q", hk)
    l_dtype = "f64" if lse_is_double(tq.tensor.dtype) else "f32"
    o = ops.empty(o_shape, o_stride, q, None)
    lse = ops.empty(l_shape, l_stride, q, l_dtype)
    args = [tq] + [describe(ops, x, n) for x, n in ((k, "k"), (v, "v"), (kd, "kd"), (vd, "vd"))]
    args += [describe(ops, o, "o", hk), describe(ops, lse, "lse", hk)]
    opts = cfg.options()
    with ops.device_guard(q):
        _lib.check(_lib.lib().moda_forward(ctypes.byref(opts), *[_ref(a) for a in args], ops.stream(q)))
    if key is not None:
        allocs = (ops.alloc_spec(o_shape, o_stride, q, None), ops.alloc_spec(l_shape, l_stride, q, l_dtype))
        _remember(_FORWARD_PLANS, key, _Plan(opts, args, allocs))
    return o, lse


def backward(ops, cfg, q, k, v, kd, vd, o, lse, do, dkd=None, dvd=None, accumulate=False):
    """Runs moda_backward; returns (dq, dk, dv, dkd, dvd) (None for absent operands). dkd/dvd, when given, are
    written in place (added into with accumulate) and returned; otherwise fresh zero-filled ones are, so that
    the slots outside the depth range read as the zero gradient they are."""
    key = _signature(ops.array_signature, (q, k, v, kd, vd, o, lse, do, dkd, dvd)) if PLANS else None
    if key is not None:
        key = (key, cfg.as_args(), accumulate)
        plan = _BACKWARD_PLANS.get(key)
        if plan is not None:
            dq_spec, dk_spec, dv_spec, dkd_spec, dvd_spec = plan.allocs
            dq = ops.alloc(dq_spec)
            dk = None if dk_spec is None else ops.alloc(dk_spec)
            dv = None if dv_spec is None else ops.alloc(dv_spec)
            if dkd_spec is not None:
                dkd = ops.alloc(dkd_spec)
            if dvd_spec is not None:
                dvd = ops.alloc(dvd_spec)
            refs = _refs(plan.templates, (q, k, v, kd, vd, o, lse, do, dq, dk, dv, dkd, dvd), ops.data_ptr)
            L = _lib.lib()
            size = ctypes.c_size_t(0)
            status = L.moda_backward_workspace_size(_byref(plan.opts), *refs[:5], _byref(size))
            if status:
                _lib.check(status)
            size = size.value
            workspace = ops.workspace(size, q)
            with ops.device_guard(q):
                status = L.moda_backward(_byref(plan.opts), *refs, ops.pointer(workspace), size, ops.stream(q))
            if status:
                _lib.check(status)
            return dq, dk, dv, dkd, dvd
    return _backward_full(ops, cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate, key)


def _backward_full(ops, cfg, q, k, v, kd, vd, o, lse, do, dkd, dvd, accumulate, key):
    check_kinds(q, k, v, kd, vd, ops)
    for name, x in (("o", o), ("lse", lse), ("do", do), ("dkd", dkd), ("dvd", dvd)):
        if x is not None and not ops.owns(x):
            raise MODAError(_lib.ERR_INVALID_ARGUMENT, "q is a %s but %s is a %s: pass arrays of one library"
                            % (ops.kind, name, type(x).__name__))
    for name, x in (("o", o), ("lse", lse), ("do", do)):
        if x is None:
            raise MODAError(_lib.ERR_NULL_POINTER, "%s is required by the backward pass" % name)
    check_ndim("o", ops.shape(o), (len(ops.shape(q)),), "shaped like q")
    check_ndim("do", ops.shape(do), (len(ops.shape(q)),), "shaped like o")
    check_ndim("lse", ops.shape(lse), (len(ops.shape(q)) - 1,), "[B, T, Hq] (or [B, T, Hk, G] for a 5-D q)")
    for name, x, buf in (("dkd", dkd, kd), ("dvd", dvd, vd)):
        if x is not None:
            if buf is None:
                raise MODAError(_lib.ERR_INVALID_ARGUMENT, "%s was given but %s is None" % (name, name[1:]))
            check_ndim(name, ops.shape(x), (5,), "5-D like %s" % name[1:])
            ops.check_writable(x, name)
    if accumulate and kd is not None and (dkd is None or dvd is None):
        raise MODAError(_lib.ERR_INVALID_ARGUMENT,
                        "accumulate_depth_grad=True needs the dkd and dvd buffers to add into")
    given = (q, k, v, kd, vd, o, lse, do)
    q, k, v, kd, vd, o, lse, do = (ops.prepare(x) for x in given)
    if any(a is not b for a, b in zip(given, (q, k, v, kd, vd, o, lse, do))):
        key = None
    hk = kv_heads(ops.shape(q), ops.shape(k) if k is not None else None, ops.shape(kd) if kd is not None else None)
    specs = []

    def fresh(plan, like, zero=False):
        specs.append(ops.alloc_spec(*plan, like, None, zero))
        return ops.zeros(*plan, like) if zero else ops.empty(*plan, like, None)

    dq = fresh(like_plan(ops.shape(q), ops.stride(q)), q)
    dk = None if k is None else fresh(like_plan(ops.shape(k), ops.stride(k)), k)
    dv = None if v is None else fresh(like_plan(ops.shape(v), ops.stride(v)), v)
    if k is None:
        specs.insert(1, None)
    if v is None:
        specs.insert(2, None)

    # Overwrite mode writes every visible slot, so fresh depth gradients need zero-filling only when some slots
    # are outside [d0, d1): filling a full range would cost a write of the whole buffer (4.8 GB for S2).
    def fresh_depth_grad(buf):
        lcap = ops.shape(buf)[2]
        covers_all = cfg.d0 == 0 and (cfg.d1 == _lib.DEPTH_ALL or cfg.d1 >= lcap)
        return fresh(like_plan(ops.shape(buf), ops.stride(buf)), buf, zero=not covers_all)
    if dkd is None and kd is not None:
        dkd = fresh_depth_grad(kd)
    else:
        specs.append(None)
    if dvd is None and vd is not None:
        dvd = fresh_depth_grad(vd)
    else:
        specs.append(None)
    ins = [describe(ops, q, "q", hk)] + [describe(ops, x, n) for x, n in ((k, "k"), (v, "v"), (kd, "kd"), (vd, "vd"))]
    ins += [describe(ops, o, "o", hk), describe(ops, lse, "lse", hk), describe(ops, do, "do", hk)]
    outs = [describe(ops, dq, "dq", hk)] + [describe(ops, x, n) for x, n in
                                            ((dk, "dk"), (dv, "dv"), (dkd, "dkd"), (dvd, "dvd"))]
    opts = cfg.options(accumulate)
    L = _lib.lib()
    size = ctypes.c_size_t(0)
    _lib.check(L.moda_backward_workspace_size(ctypes.byref(opts), *[_ref(a) for a in ins[:5]], ctypes.byref(size)))
    workspace = ops.workspace(size.value, q)
    with ops.device_guard(q):
        _lib.check(L.moda_backward(ctypes.byref(opts), *[_ref(a) for a in ins + outs], ops.pointer(workspace),
                                   size.value, ops.stream(q)))
    if key is not None:
        _remember(_BACKWARD_PLANS, key, _Plan(opts, ins + outs, tuple(specs)))
    return dq, dk, dv, dkd, dvd


# ---- NumPy -----------------------------------------------------------------------------------------------------

def numpy_dtype_code(dtype):
    if dtype == np.float32:
        return _lib.F32
    if dtype == np.float16:
        return _lib.F16
    if dtype == np.float64:
        return _lib.F64
    if dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        return _lib.BF16
    return None


class NumpyOps:
    kind = "numpy.ndarray"

    @staticmethod
    def owns(x):
        return isinstance(x, np.ndarray)

    @staticmethod
    def shape(x):
        return x.shape

    @staticmethod
    def stride(x):
        return [s // x.itemsize for s in x.strides]

    @staticmethod
    def prepare(x):
        """The C API takes non-negative element strides over native-endian aligned data; anything else (a
        reversed view, a byte-swapped or unaligned array) is copied."""
        if x is None:
            return None
        ok = (x.dtype.isnative and x.flags.aligned
              and all(s >= 0 and s % x.itemsize == 0 for s in x.strides))
        return x if ok else np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))

    @staticmethod
    def info(x, name):
        code = numpy_dtype_code(x.dtype)
        if code is None:
            raise MODAError(_lib.ERR_UNSUPPORTED,
                            "%s has dtype %s; moda takes float32, float16, float64 or bfloat16 (ml_dtypes)"
                            % (name, x.dtype))
        return x.shape, NumpyOps.stride(x), x.ctypes.data, code, _lib.CPU

    @staticmethod
    def empty(shape, stride, like, dtype):
        dt = like.dtype if dtype is None else (np.float64 if dtype == "f64" else np.float32)
        order = order_of(shape, stride)
        buf = np.empty([shape[i] for i in order], dtype=dt)
        return buf.transpose(np.argsort(order))

    @staticmethod
    def zeros(shape, stride, like):
        x = NumpyOps.empty(shape, stride, like, None)
        x[...] = 0
        return x

    @staticmethod
    def array_signature(x):
        """What a cached plan depends on: shape, byte strides, dtype (byte order included) and the flags that
        NumpyOps.prepare and check_writable read; None (no plan) unless x is a plain ndarray."""
        if type(x) is not np.ndarray:
            return None
        f = x.flags
        return x.shape, x.strides, x.dtype, f.aligned, f.writeable

    @staticmethod
    def alloc_spec(shape, stride, like, dtype, zero=False):
        """What NumpyOps.empty (or zeros) does for these arguments, precomputed for NumpyOps.alloc."""
        dt = like.dtype if dtype is None else (np.float64 if dtype == "f64" else np.float32)
        order = order_of(shape, stride)
        perm = tuple(int(i) for i in np.argsort(order))
        return (tuple(shape[i] for i in order), np.dtype(dt), None if perm == tuple(range(len(perm))) else perm, zero)

    @staticmethod
    def alloc(spec):
        shape, dt, perm, zero = spec
        x = np.zeros(shape, dt) if zero else np.empty(shape, dt)
        return x if perm is None else x.transpose(perm)

    @staticmethod
    def check_writable(x, name):
        if not x.flags.writeable:
            raise MODAError(_lib.ERR_INVALID_ARGUMENT, "%s is read-only, but the depth gradients are written into it" % name)
        if any(s < 0 or s % x.itemsize for s in x.strides) or not x.flags.aligned or not x.dtype.isnative:
            raise MODAError(_lib.ERR_LAYOUT,
                            "%s must have non-negative, element-aligned strides (it is written in place)" % name)

    @staticmethod
    def workspace(nbytes, like):
        return np.empty(max(int(nbytes), 1), dtype=np.uint8) if nbytes else None

    @staticmethod
    def pointer(ws):
        return None if ws is None else ws.ctypes.data

    @staticmethod
    def data_ptr(x):
        return x.ctypes.data

    @staticmethod
    def stream(x):
        return None

    class _NoGuard:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    @staticmethod
    def device_guard(x):
        return NumpyOps._NoGuard()
