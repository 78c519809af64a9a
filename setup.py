"""Build of the fused_dropout extension against the installed torch.

CUDA kernels are built whenever torch is a CUDA build and a CUDA toolkit is found, with or
without a GPU on this machine. Environment:
    FORCE_CUDA=1          build the CUDA kernels, fail if that is impossible
    FUSED_DROPOUT_CPU_ONLY=1   never build the CUDA kernels
    CUDA_HOME             the toolkit (default: found from nvcc, else /usr/local/cuda)
    TORCH_CUDA_ARCH_LIST  target GPUs (default "8.0;9.0": A100, H100/H200)
    DEBUG=1               -O0 -g
"""

import glob
import os
import shutil
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The CUDA toolkit, or None. A `nvcc` on PATH may be a wrapper script, so the toolkit
    is accepted only where bin/nvcc and include/cuda_runtime.h sit side by side."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if (
            candidate
            and (Path(candidate) / "bin" / "nvcc").exists()
            and (Path(candidate) / "include" / "cuda_runtime.h").exists()
        ):
            return str(Path(candidate).resolve())
    return None


def pip_cuda_include_dirs():
    """Headers ATen's CUDA headers include (cuSPARSE, cuBLAS, cuRAND, ...) that a bare toolkit
    may lack but torch's pip dependencies ship under nvidia/*/include."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted({str(Path(d).resolve()) for d in dirs if os.path.isdir(d)})


def choose_cuda():
    if flag("FUSED_DROPOUT_CPU_ONLY"):
        return None, "FUSED_DROPOUT_CPU_ONLY is set"
    if torch.version.cuda is None:
        if flag("FORCE_CUDA"):
            sys.exit("fused_dropout setup: FORCE_CUDA=1 but the installed torch is a CPU-only build")
        return None, "torch %s is a CPU-only build" % torch.__version__
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if flag("FORCE_CUDA"):
            sys.exit("fused_dropout setup: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return None, "no CUDA toolkit found (set CUDA_HOME to build the CUDA kernels)"
    return cuda_home, "torch CUDA %s, toolkit %s" % (torch.version.cuda, cuda_home)


def extensions():
    debug = flag("DEBUG")
    cuda_home, reason = choose_cuda()
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("cpu/*.cpp")
    )
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is a header template over OpenMP: without -fopenmp it runs serially.
    cxx_flags += ["-fopenmp"]
    link_flags = ["-fopenmp"]
    # The C++ standard is left to torch.utils.cpp_extension: it matches the installed torch.
    include_dirs = [str(CSRC)]

    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported; point it at the
        # real toolkit before building.
        import torch.utils.cpp_extension as cpp_extension

        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("cuda/*.cu"))
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr"]
        include_dirs += pip_cuda_include_dirs()
        print(
            "fused_dropout setup: building CPU + CUDA kernels (%s; TORCH_CUDA_ARCH_LIST=%s%s)"
            % (reason, os.environ["TORCH_CUDA_ARCH_LIST"], "; DEBUG" if debug else ""),
            flush=True,
        )
        ext = CUDAExtension(
            "fused_dropout._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FUSED_DROPOUT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        print("fused_dropout setup: building CPU kernels only (%s)" % reason, flush=True)
        ext = CppExtension(
            "fused_dropout._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
