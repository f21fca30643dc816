#!/usr/bin/env bash
# The Python tests on a machine with an NVIDIA GPU and PyTorch: the NumPy tests, the torch CPU tests and the
# `gpu` tests (CUDA tensors against plain PyTorch float64, torch.compile with inductor, training on the GPU).
# No pip install: the package is imported from python/ and the library from $MODA_LIBRARY.
#
#   MODA_LIBRARY=build/libmoda.so PYTHONPATH=python bash python/tests/run_gpu_tests.sh [pytest arguments]
#
# Without MODA_LIBRARY the library target is built first with CUDA into build-python-gpu/.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}

if [[ -z "${MODA_LIBRARY:-}" ]]; then
    cmake -S "$root" -B "$root/build-python-gpu" -DCMAKE_BUILD_TYPE=Release -DMODA_CUDA=ON \
        -DMODA_BUILD_MODEL=OFF -DMODA_BUILD_TESTS=OFF -DMODA_BUILD_TOOLS=OFF
    cmake --build "$root/build-python-gpu" --target moda -j "$(nproc)"
    MODA_LIBRARY="$root/build-python-gpu/libmoda.so"
fi
export MODA_LIBRARY=$(cd "$(dirname "$MODA_LIBRARY")" && pwd)/$(basename "$MODA_LIBRARY")
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Refuse to report a green run that skipped the GPU: check that torch and libmoda both see the device.
"$python" - <<'PY'
import torch, moda
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert moda.cuda_available(), "libmoda at %s has no CUDA backend or sees no GPU" % moda.library_path()
print("moda %s, libmoda %s at %s; torch %s on %s" % (moda.__version__, moda.library_version(), moda.library_path(),
      torch.__version__, torch.cuda.get_device_name()))
PY

exec "$python" -m pytest "$here" -v -rs -p no:cacheprovider "$@"
