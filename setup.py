"""Build driver: `pip install -e .` runs CMake (CMakeLists.txt) to build the module fastst._C.

Environment switches: FASTST_FORCE_CPU=1 (skip CUDA), FASTST_CUDA_ARCHS (default
"80-real;90-real;90-virtual"), FASTST_DEBUG=1, CMAKE_BUILD_PARALLEL_LEVEL (default: all cores),
CUDA_HOME (where nvcc lives; its CUDA major version should match torch.version.cuda, since the
runtime is linked statically and needs a driver for that version: README "CUDA build"; CMake warns
when they differ, shown by `pip install -v`).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if os.environ.get('FASTST_DEBUG') else 'Release'}",
        ]
        if shutil.which("ninja") or _pip_ninja():
            args.append("-GNinja")
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
        if nvcc is not None and nvcc.exists() and "CMAKE_CUDA_COMPILER" not in os.environ:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True, env=env)


def _pip_ninja() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


setup(ext_modules=[CMakeExtension("fastst._C")], cmdclass={"build_ext": CMakeBuild})
