"""Every bad input raises moda.MODAError with the status and a message that says what to fix."""

import os
import subprocess
import sys

import numpy as np
import pytest

import moda
from moda_reference import make_inputs



def check(excinfo, status):
    e = excinfo.value
    assert e.status_name == status, (e.status_name, str(e))
    assert isinstance(e, ValueError) and isinstance(e, RuntimeError)
    assert len(e.message) > 20 and status in str(e)


@pytest.fixture
def x(rng):
    return make_inputs(rng, B=2, T=5, Hk=2, G=2, d=4, Lcap=3)


FORWARD_ERRORS = [
    # (what to change, status, words the message must contain)
    (lambda x, kw: x.update(k=x["k"][:, :4]), "MODA_ERR_SHAPE_MISMATCH", r"\bT\b"),
    (lambda x, kw: x.update(v=x["v"][:, :, :1]), "MODA_ERR_SHAPE_MISMATCH", "Hk"),
    (lambda x, kw: x.update(kd=x["kd"][..., :3]), "MODA_ERR_SHAPE_MISMATCH", r"\bd\b"),
    (lambda x, kw: x.update(vd=x["vd"][:, :, :2]), "MODA_ERR_SHAPE_MISMATCH", "Lcap"),
    (lambda x, kw: x.update(q=x["q"][:, :, :3]), "MODA_ERR_SHAPE_MISMATCH", "not a multiple"),
    (lambda x, kw: x.update(q=x["q"][0]), "MODA_ERR_SHAPE_MISMATCH", r"q must be 4-D"),
    (lambda x, kw: x.update(k=x["k"][0]), "MODA_ERR_SHAPE_MISMATCH", r"k must be 4-D"),
    (lambda x, kw: x.update(kd=x["kd"][0]), "MODA_ERR_SHAPE_MISMATCH", r"kd must be 5-D"),
    (lambda x, kw: kw.update(depth_range=(0, 9)), "MODA_ERR_DEPTH_RANGE", "3 slots but the depth range ends at 9"),
    (lambda x, kw: kw.update(depth_range=(2, 1)), "MODA_ERR_DEPTH_RANGE", "reversed"),
    (lambda x, kw: kw.update(depth_range=(-1, 2)), "MODA_ERR_DEPTH_RANGE", "non-negative"),
    (lambda x, kw: kw.update(depth_range=(0, -1)), "MODA_ERR_DEPTH_RANGE", "non-negative"),
    (lambda x, kw: kw.update(depth_range=3), "MODA_ERR_INVALID_ARGUMENT", "pair"),
    (lambda x, kw: (x.update(kd=None, vd=None), kw.update(depth_range=(0, 2))), "MODA_ERR_NULL_POINTER", "kd is required"),
    (lambda x, kw: kw.update(depth_mode="chunk", causal=False), "MODA_ERR_INVALID_ARGUMENT", "causal"),
    (lambda x, kw: kw.update(depth_mode="chunk", chunk_size=0), "MODA_ERR_INVALID_ARGUMENT", "chunk_size"),
    (lambda x, kw: kw.update(chunk_size=2.5), "MODA_ERR_INVALID_ARGUMENT", "chunk_size"),
    (lambda x, kw: kw.update(depth_mode="layer"), "MODA_ERR_INVALID_ARGUMENT", "depth_mode"),
    (lambda x, kw: kw.update(scale=float("nan")), "MODA_ERR_INVALID_ARGUMENT", "finite"),
    (lambda x, kw: kw.update(scale=0), "MODA_ERR_INVALID_ARGUMENT", "non-zero"),
    (lambda x, kw: kw.update(scale="big"), "MODA_ERR_INVALID_ARGUMENT", "number"),
    (lambda x, kw: x.update(q=x["q"].astype(np.int32)), "MODA_ERR_UNSUPPORTED", "int32"),
    (lambda x, kw: x.update(k=x["k"].astype(np.float32)), "MODA_ERR_UNSUPPORTED", "share one dtype"),
    (lambda x, kw: x.update(vd=None), "MODA_ERR_NULL_POINTER", "vd is required"),
    (lambda x, kw: x.update(k=None), "MODA_ERR_NULL_POINTER", "sequence"),
    (lambda x, kw: x.update(q=x["q"].tolist()), "MODA_ERR_INVALID_ARGUMENT", "numpy.ndarray or a torch.Tensor"),
    (lambda x, kw: x.update(v=x["v"].tolist()), "MODA_ERR_INVALID_ARGUMENT", "v is a list"),
]


@pytest.mark.parametrize("change,status,words", FORWARD_ERRORS, ids=[str(i) for i in range(len(FORWARD_ERRORS))])
def test_forward_rejects(x, change, status, words):
    kw = {}
    change(x, kw)
    with pytest.raises(moda.MODAError, match=words) as e:
        moda.attention(x["q"], x["k"], x["v"], x["kd"], x["vd"], **kw)
    check(e, status)


@pytest.fixture
def fwd(x):
    o, lse = moda.attention_fwd(**x)
    return dict(x, o=o, lse=lse, do=np.ones_like(o) * 0.5)


def call_bwd(a, **kw):
    return moda.attention_bwd(a["q"], a["k"], a["v"], a["kd"], a["vd"], a["o"], a["lse"], a["do"], **kw)


BACKWARD_ERRORS = [
    (lambda a, kw: a.update(do=a["do"][:, :4]), "MODA_ERR_SHAPE_MISMATCH", r"\bT\b"),
    (lambda a, kw: a.update(do=a["do"][0]), "MODA_ERR_SHAPE_MISMATCH", "do must be"),
    (lambda a, kw: a.update(lse=a["lse"][..., None]), "MODA_ERR_SHAPE_MISMATCH", "lse must be"),
    (lambda a, kw: a.update(lse=a["lse"].astype(np.float16)), "MODA_ERR_UNSUPPORTED", "lse must be f32"),
    (lambda a, kw: a.update(o=None), "MODA_ERR_NULL_POINTER", "o is required"),
    (lambda a, kw: kw.update(accumulate_depth_grad=True), "MODA_ERR_INVALID_ARGUMENT", "buffers"),
    (lambda a, kw: kw.update(dkd=np.zeros((2, 5, 2, 2, 4)), dvd=np.zeros((2, 5, 3, 2, 4))),
     "MODA_ERR_SHAPE_MISMATCH", "Lcap"),
    (lambda a, kw: kw.update(dkd=np.zeros((2, 5, 3, 2, 4), np.float16), dvd=np.zeros((2, 5, 3, 2, 4))),
     "MODA_ERR_UNSUPPORTED", "dkd must be f64"),
    (lambda a, kw: kw.update(dkd=np.broadcast_to(np.zeros(4), (2, 5, 3, 2, 4)), dvd=np.zeros((2, 5, 3, 2, 4))),
     "MODA_ERR_INVALID_ARGUMENT", "read-only"),
    (lambda a, kw: kw.update(dkd=a["kd"], dvd=np.zeros((2, 5, 3, 2, 4)), accumulate_depth_grad=True),
     "MODA_ERR_OVERLAP", "overlaps"),
    (lambda a, kw: (a.update(kd=None, vd=None), kw.update(dkd=np.zeros((2, 5, 3, 2, 4)))),
     "MODA_ERR_INVALID_ARGUMENT", "kd is None"),
]


@pytest.mark.parametrize("change,status,words", BACKWARD_ERRORS, ids=[str(i) for i in range(len(BACKWARD_ERRORS))])
def test_backward_rejects(fwd, change, status, words):
    kw = {}
    change(fwd, kw)
    with pytest.raises(moda.MODAError, match=words) as e:
        call_bwd(fwd, **kw)
    check(e, status)


def test_failed_call_leaves_depth_buffers_untouched(fwd):
    dkd = np.full(fwd["kd"].shape, 7.0)
    dvd = np.full(fwd["vd"].shape, 7.0)
    fwd["do"] = fwd["do"][:, :, :, :3]  # dv mismatch: found by the library, after the buffers were handed over
    with pytest.raises(moda.MODAError, match="dv") as e:
        call_bwd(fwd, dkd=dkd, dvd=dvd, accumulate_depth_grad=True)
    check(e, "MODA_ERR_SHAPE_MISMATCH")
    assert np.all(dkd == 7.0) and np.all(dvd == 7.0)


def test_error_attributes(x):
    with pytest.raises(ValueError) as e:
        moda.attention(x["q"], x["k"], x["v"], x["kd"], x["vd"], depth_range=(0, 9))
    err = e.value
    assert isinstance(err, moda.MODAError) and isinstance(err, RuntimeError)
    assert err.status == 4 and err.status_name == "MODA_ERR_DEPTH_RANGE"
    assert "depth range" in err.message and str(err).endswith("(MODA_ERR_DEPTH_RANGE)")


def test_missing_library_is_reported(tmp_path):
    code = ("import numpy as np, moda\n"
            "try:\n"
            "    moda.attention(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)))\n"
            "except moda.MODAError as e:\n"
            "    print(e.status_name, e.message)\n")
    env = dict(os.environ, MODA_LIBRARY=str(tmp_path / "nowhere" / "libmoda.so"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(moda.__file__)),
                                                    env.get("PYTHONPATH", "")] if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "MODA_ERR_NOT_BUILT" in out.stdout and "MODA_LIBRARY" in out.stdout, out.stdout + out.stderr


def test_version_and_cuda_query():
    assert moda.__version__ == moda.library_version() == "0.1.0"
    assert isinstance(moda.cuda_available(), bool)
