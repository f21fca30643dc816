"""Build step of the moda package: compiles libmoda with CMake from the repository root (one level up) and
bundles the shared library as moda/lib/libmoda.so. Only the library target is built.

Environment:
  MODA_CMAKE_ARGS   extra CMake arguments, e.g. "-DMODA_CUDA=OFF" (CUDA is built when nvcc is found)
  MODA_SOURCE_DIR   the repository root, when this folder is not inside it
  MODA_BUILD_DIR    a CMake build folder to (re)use instead of a fresh one under build/
"""

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        source = os.path.abspath(os.environ.get("MODA_SOURCE_DIR") or os.path.join(HERE, os.pardir))
        if not os.path.exists(os.path.join(source, "CMakeLists.txt")) or \
                not os.path.exists(os.path.join(source, "include", "moda.h")):
            sys.exit("moda: the libmoda sources were not found at %s; build from the repository "
                     "(pip install ./python) or set MODA_SOURCE_DIR" % source)
        build = os.path.abspath(os.environ.get("MODA_BUILD_DIR") or os.path.join(self.build_temp_dir(), "cmake"))
        os.makedirs(build, exist_ok=True)
        configure = ["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                     "-DMODA_CUDA=AUTO", "-DMODA_BUILD_TESTS=OFF", "-DMODA_BUILD_TOOLS=OFF", "-DMODA_BUILD_MODEL=OFF"]
        # Later -D arguments win, so the user's MODA_CMAKE_ARGS override the defaults above; the defaults are
        # always passed so that a reused build folder does not keep an earlier install's choices.
        configure += shlex.split(os.environ.get("MODA_CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        self.announce("moda: " + " ".join(configure), level=2)
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", build, "--target", "moda", "-j", jobs])
        built = os.path.join(build, "libmoda.so")
        if not os.path.exists(built):
            sys.exit("moda: CMake finished but %s is missing" % built)
        dest = os.path.join(self.build_lib, "moda", "lib")
        os.makedirs(dest, exist_ok=True)
        # Copy the file the symlink chain (libmoda.so -> .so.0 -> .so.0.1.0) ends at, under the name the
        # loader looks for.
        shutil.copyfile(os.path.realpath(built), os.path.join(dest, "libmoda.so"))

    def build_temp_dir(self):
        return self.get_finalized_command("build").build_temp


class BinaryDistribution(Distribution):
    """The wheel carries a native library, so it is tagged for this platform."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
