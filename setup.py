"""Builds eplib and its native module eplib._C through CMake.

Environment:
    EPLIB_CUDA=auto|0|1   compile the CUDA kernels: auto (default) when nvcc is found, 1 requires it.
    EPLIB_CUDA_CPU=1      compile the CUDA sources with the host compiler instead, to run on the CPU
                          (csrc/cuda_cpu; no nvcc, no GPU): how CI executes the CUDA kernels.
    EPLIB_CUDA_ARCHS      CUDA architectures, default "80;90".
    EPLIB_DEBUG=1         -O0 -g with assertions.
    EPLIB_SANITIZE        thread, address or undefined: build the native code with that sanitizer.
    CMAKE_GENERATOR       e.g. Ninja; CMake's default otherwise.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    """Path of nvcc from CUDA_HOME, CUDA_PATH, PATH or /usr/local/cuda (torch's order), or None."""
    candidates = [os.path.join(home, "bin", "nvcc") for home in (os.environ.get("CUDA_HOME"),
                                                                  os.environ.get("CUDA_PATH")) if home]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_mode():
    """EPLIB_CUDA: "auto" (default), "0" or "1"."""
    mode = os.environ.get("EPLIB_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"EPLIB_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt rather than by setuptools' compiler."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds eplib._C with CMake, into the place setuptools expects it
    (the source tree for editable installs)."""

    def build_extension(self, ext):
        if os.environ.get("EPLIB_CUDA_CPU", "0") == "1":
            self._cmake(ext, nvcc=None, cuda_cpu=True)
            return
        mode, nvcc = cuda_mode(), find_nvcc()
        if mode == "1" and nvcc is None:
            raise RuntimeError("EPLIB_CUDA=1 but nvcc was not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
        if mode == "0" or nvcc is None:
            self._cmake(ext, nvcc=None)
            return
        try:
            self._cmake(ext, nvcc)
        except subprocess.CalledProcessError:
            if mode == "1":
                raise
            # auto: a toolkit that cannot build (old host compiler, no static cudart) must not
            # stop a CPU install.
            print("eplib: WARNING: the CUDA build failed; building the CPU part only (EPLIB_CUDA=1 makes "
                  "this an error)", flush=True)
            self._cmake(ext, nvcc=None)

    def _cmake(self, ext, nvcc, cuda_cpu=False):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        sanitizer = os.environ.get("EPLIB_SANITIZE", "")
        flavour = ("cuda" if nvcc else "cuda_cpu" if cuda_cpu else "cpu") + (f"-{sanitizer}" if sanitizer else "")
        build_temp = Path(self.build_temp).resolve() / ext.name / flavour
        build_temp.mkdir(parents=True, exist_ok=True)
        debug = os.environ.get("EPLIB_DEBUG", "0") == "1"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{'DEBUG' if debug else 'RELEASE'}={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
            f"-DEPLIB_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DEPLIB_CUDA_CPU={'ON' if cuda_cpu else 'OFF'}",
            f"-DEPLIB_SANITIZE={sanitizer}",
        ]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DEPLIB_CUDA_ARCHS={os.environ.get('EPLIB_CUDA_ARCHS', '80;90')}"]
        cuda = f"ON ({nvcc})" if nvcc else "the CPU execution of the CUDA sources" if cuda_cpu else "OFF"
        print(f"eplib: building _C with CUDA {cuda}", flush=True)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_temp), "--parallel", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("eplib._C")],
    cmdclass={"build_ext": CMakeBuild},
    package_dir={"": "python"},
    packages=find_packages("python"),  # eplib and its subpackages (transports, moe, deep_ep)
)
