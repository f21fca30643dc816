import os
import zlib

import numpy as np
import pytest


def pytest_report_header(config):
    import moda
    try:
        return "moda %s, libmoda %s at %s" % (moda.__version__, moda.library_version(), moda.library_path())
    except moda.MODAError as e:
        return "moda %s: %s" % (moda.__version__, e)


@pytest.fixture
def rng(request):
    # A fresh stream per test (spec.md §4: fresh random inputs), reproducible from the test's name.
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("MODA_TEST_SEED", "0"))
    return np.random.default_rng(seed)
