"""ctypes declarations of include/moda.h and the loading of libmoda.so.

The library is loaded on first use, not at import, so that `import moda` (and the pure-Python helpers such as
folded_view) work before a library is built, and so that MODA_LIBRARY can be set after import.
"""

import ctypes
import os
import threading

MAX_DIMS = 5

# moda_dtype / moda_device / moda_depth_mode / moda_depth_grad_mode (moda.h)
F32, F16, BF16, F64 = 0, 1, 2, 3
CPU, CUDA = 0, 1
DEPTH_TOKEN, DEPTH_CHUNK = 0, 1
DEPTH_GRAD_OVERWRITE, DEPTH_GRAD_ACCUMULATE = 0, 1
DEPTH_ALL = -1

OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_NULL_POINTER = 2
ERR_SHAPE_MISMATCH = 3
ERR_DEPTH_RANGE = 4
ERR_UNSUPPORTED = 5
ERR_NOT_BUILT = 6
ERR_LAYOUT = 10

# The names moda_status_string() returns; used for errors raised before the library is involved (and when the
# library cannot be loaded at all).
STATUS_NAMES = {
    0: "MODA_OK",
    1: "MODA_ERR_INVALID_ARGUMENT",
    2: "MODA_ERR_NULL_POINTER",
    3: "MODA_ERR_SHAPE_MISMATCH",
    4: "MODA_ERR_DEPTH_RANGE",
    5: "MODA_ERR_UNSUPPORTED",
    6: "MODA_ERR_NOT_BUILT",
    7: "MODA_ERR_WRONG_DEVICE",
    8: "MODA_ERR_OVERLAP",
    9: "MODA_ERR_OVERFLOW",
    10: "MODA_ERR_LAYOUT",
    11: "MODA_ERR_WORKSPACE",
    12: "MODA_ERR_OUT_OF_MEMORY",
    13: "MODA_ERR_DEVICE_FAILURE",
    14: "MODA_ERR_IO",
    15: "MODA_ERR_CORRUPT",
}


class MODAError(ValueError, RuntimeError):
    """An error reported by libmoda (or by the binding before it calls libmoda).

    Attributes: `status` (the moda_status number), `status_name` ("MODA_ERR_SHAPE_MISMATCH"), `message`
    (moda_last_error()'s text). It is both a ValueError and a RuntimeError so that callers may catch either.
    """

    def __init__(self, status, message):
        self.status = int(status)
        self.status_name = STATUS_NAMES.get(self.status, "MODA_ERR_%d" % self.status)
        self.message = message
        super().__init__("%s (%s)" % (message, self.status_name))


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("device", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * MAX_DIMS),
        ("stride", ctypes.c_int64 * MAX_DIMS),
    ]


class Options(ctypes.Structure):
    _fields_ = [
        ("causal", ctypes.c_int),
        ("sequence", ctypes.c_int),
        ("depth_mode", ctypes.c_int),
        ("chunk_size", ctypes.c_int64),
        ("depth_begin", ctypes.c_int64),
        ("depth_end", ctypes.c_int64),
        ("scale", ctypes.c_double),
        ("depth_grad_mode", ctypes.c_int),
        ("deterministic", ctypes.c_int),
        ("num_threads", ctypes.c_int),
    ]


def make_tensor(data, dtype, device, shape, stride):
    t = Tensor()
    t.data = data
    t.dtype = dtype
    t.device = device
    t.ndim = len(shape)
    for i, (n, s) in enumerate(zip(shape, stride)):
        t.shape[i] = int(n)
        t.stride[i] = int(s)
    return t


_PT = ctypes.POINTER(Tensor)
_PO = ctypes.POINTER(Options)
_SIGNATURES = {
    "moda_last_error": (ctypes.c_char_p, []),
    "moda_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "moda_version": (ctypes.c_char_p, []),
    "moda_cuda_device_count": (ctypes.c_int, []),
    "moda_default_options": (Options, []),
    "moda_forward": (ctypes.c_int, [_PO, _PT, _PT, _PT, _PT, _PT, _PT, _PT, ctypes.c_void_p]),
    "moda_backward_workspace_size": (ctypes.c_int, [_PO, _PT, _PT, _PT, _PT, _PT, ctypes.POINTER(ctypes.c_size_t)]),
    "moda_backward": (ctypes.c_int, [_PO] + [_PT] * 13 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
}


class _Library:
    """The loaded libmoda: one attribute per C function. Calls look the function up at call time, so tests can
    replace an attribute with a spy."""

    def __init__(self, path):
        self.path = path
        self.cdll = ctypes.CDLL(path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.cdll, name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)


_lock = threading.Lock()
_loaded = None


def library_path():
    """The libmoda.so this process uses: $MODA_LIBRARY when set, else the one bundled in the package."""
    env = os.environ.get("MODA_LIBRARY")
    if env:
        return os.path.abspath(env)
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "libmoda.so")


def lib():
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                path = library_path()
                if not os.path.exists(path):
                    raise MODAError(
                        ERR_NOT_BUILT,
                        "libmoda.so not found at %s: install the package with `pip install ./python` (which builds "
                        "it) or set MODA_LIBRARY to the path of a built libmoda.so" % path,
                    )
                try:
                    _loaded = _Library(path)
                except (OSError, AttributeError) as e:
                    raise MODAError(ERR_NOT_BUILT, "cannot load libmoda from %s: %s" % (path, e)) from None
    return _loaded


def check(status):
    """Raises MODAError carrying moda_last_error() unless status is MODA_OK."""
    if status != OK:
        L = lib()
        message = L.moda_last_error().decode("utf-8", "replace")
        err = MODAError(status, message or "libmoda call failed")
        name = L.moda_status_string(status)
        if name:
            err.status_name = name.decode()
            err.args = ("%s (%s)" % (err.message, err.status_name),)
        raise err
