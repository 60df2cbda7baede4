"""Native extensions of pyprune; all metadata lives in pyproject.toml.

    pyprune._C       CPU kernels (csrc/cpu), always built.
    pyprune._C_cuda  CUDA kernels (csrc/cuda), built when nvcc is found.
                     PYPRUNE_CUDA=1 requires it, PYPRUNE_CUDA=0 skips it.

Build against the torch already installed:  pip install -e . --no-build-isolation
"""

import glob
import os
import shlex
import shutil

from setuptools import setup

# torch.utils.cpp_extension reads CUDA_HOME once, at import. Without it, torch guesses
# from the nvcc on PATH, and a wrapper script at /usr/local/bin/nvcc makes it guess
# /usr/local, where there is no libcudart to link against.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    raise SystemExit(
        f"pyprune: cannot import torch ({exc}). The native extensions compile against the "
        "installed torch: first `pip install torch==2.14.1`, then "
        "`pip install -e . --no-build-isolation`."
    ) from exc


def _sources(*patterns: str) -> list[str]:
    # Relative paths: setuptools rejects absolute ones; pip runs setup.py from this folder.
    return sorted(f for p in patterns for f in glob.glob(p))


def _require_cxx() -> None:
    # Without this check a missing compiler surfaces as a long ninja/distutils traceback.
    # torch and setuptools compile with $CXX, else `c++`.
    cxx = os.environ.get("CXX")
    names = [shlex.split(cxx)[0]] if cxx else ["c++", "g++"]
    if not any(shutil.which(n) for n in names):
        raise SystemExit(
            f"pyprune: no C++ compiler found (looked for {' or '.join(names)}"
            f"{' from $CXX' if cxx else ' on PATH'}). The native extension needs a C++20 compiler "
            "with OpenMP, such as g++ >= 10: on Debian/Ubuntu `apt-get install g++`, on "
            "Fedora/RHEL `dnf install gcc-c++`; or point $CXX at one."
        )


def _nvcc() -> str | None:
    # Same lookup torch does (CUDA_HOME/bin/nvcc), plus PATH for a toolkit torch did not find.
    in_home = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return in_home if in_home and os.path.exists(in_home) else shutil.which("nvcc")


def _want_cuda() -> bool:
    flag = os.environ.get("PYPRUNE_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    problem = None
    if _nvcc() is None:
        problem = "nvcc was not found on PATH or in $CUDA_HOME/bin"
    elif not CUDA_HOME:
        problem = "nvcc is on PATH but torch found no CUDA toolkit; set CUDA_HOME to it"
    elif torch.version.cuda is None:
        problem = f"the installed torch {torch.__version__} is a CPU-only build"
    if problem and flag in ("1", "true", "yes", "on"):
        raise SystemExit(
            f"pyprune: PYPRUNE_CUDA=1 but {problem}. "
            "Unset PYPRUNE_CUDA (or set it to 0) to build the CPU extension only."
        )
    if problem and _nvcc() is not None:  # no nvcc at all is the ordinary CPU-only case
        print(f"pyprune: skipping the CUDA extension: {problem}.")
    return problem is None


class BuildExt(BuildExtension):
    def run(self) -> None:
        _require_cxx()
        super().run()


# Python's CFLAGS carry -g: debug info for torch's headers makes each .so ~11 MB instead of
# ~0.3 MB and the compile ~40% slower. Drop -g0 here to debug the native code.
CXX_FLAGS = ["-O3", "-g0"]

ext_modules = [
    CppExtension(
        "pyprune._C",
        _sources("csrc/cpu/*.cpp"),
        # No -std: torch adds -std=c++20, which its headers require (they reject C++17).
        extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp"]},
        extra_link_args=["-fopenmp"],
        libraries=["z"],  # zlib: the .ppz head (docs/format.md, version 2)
    )
]

if _want_cuda():
    ext_modules.append(
        CUDAExtension(
            "pyprune._C_cuda",
            _sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu"),
            extra_compile_args={
                "cxx": CXX_FLAGS,
                # Only the GPUs we target (A100, H100) plus PTX for newer ones: each extra
                # -gencode adds a full device compile to every .cu file. Passing any "arch"
                # flag stops torch from adding its own list.
                "nvcc": [
                    "-O3",
                    "-gencode=arch=compute_80,code=sm_80",
                    "-gencode=arch=compute_90,code=sm_90",
                    "-gencode=arch=compute_90,code=compute_90",
                ],
            },
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)})
