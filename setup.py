"""Build of the fused_dropout extension against the installed torch.

The extension links against the torch it is compiled with, so it is built against the torch
already installed: ``pip install --no-build-isolation .``. In an isolated build (plain
``pip install .``) torch is absent, and the build stops at once with that command rather
than fetching a second torch it could not load beside the user's.

CUDA kernels are built whenever torch is a CUDA build and a CUDA toolkit is found, with or
without a GPU on this machine. The configuration chosen is recorded in
fused_dropout/_build_info.py, which the package checks against the running torch at import
(``python -m fused_dropout --info`` prints it). Environment:
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

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_INFO = ROOT / "fused_dropout" / "_build_info.py"
# Commands that compile the extension; the others (sdist, egg_info, dist_info) need no torch.
COMPILING = {"build", "build_ext", "bdist_wheel", "develop", "editable_wheel", "install"}

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ModuleNotFoundError:
    torch = None


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


BUILD_CONFIG = {}


def write_build_info(path, cuda_home, cpu_only_reason):
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda_home else ""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        "# Written by setup.py at build time: what this build of the extension was compiled against.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {cuda_home is not None!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"CPU_ONLY_REASON = {cpu_only_reason!r}\n"
    )


def extensions():
    debug = flag("DEBUG")
    cuda_home, reason = choose_cuda()
    # Every form's files and the shared ones: a new form is new files under csrc/ops/.
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is a header template over OpenMP: without -fopenmp it runs serially.
    cxx_flags += ["-fopenmp"]
    # The AVX-512 file passes __m512 values between its own inline functions only; GCC notes
    # that such an ABI differs from a non-AVX-512 one, which concerns no caller here.
    cxx_flags += ["-Wno-psabi"]
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
        sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr"]
        include_dirs += pip_cuda_include_dirs()
        print(
            "fused_dropout setup: building CPU + CUDA kernels (%s; TORCH_CUDA_ARCH_LIST=%s%s)"
            % (reason, os.environ["TORCH_CUDA_ARCH_LIST"], "; DEBUG" if debug else ""),
            flush=True,
        )
        BUILD_CONFIG.update(cuda_home=cuda_home, cpu_only_reason=None)
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
        BUILD_CONFIG.update(cuda_home=None, cpu_only_reason=reason)
        ext = CppExtension(
            "fused_dropout._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext]


def main():
    compiling = bool(COMPILING.intersection(sys.argv[1:]))
    if torch is None:
        if compiling:
            sys.exit(
                "fused_dropout setup: torch is not importable here. The extension is compiled against the "
                "torch you have installed, so build it in your environment, not in pip's isolated one:\n"
                "    pip install --no-build-isolation .\n"
                "(install torch first: https://pytorch.org/get-started/)"
            )
        setup()  # an sdist or metadata: no compiler, no torch
        return

    class BuildWithInfo(BuildExtension.with_options(use_ninja=True)):
        """Writes _build_info.py beside the extension it describes: into the build folder, and
        into the source tree only when the extension goes there too (an editable or in-place
        build), so that a plain install leaves the source tree as it was."""

        def run(self):
            super().run()
            write_build_info(Path(self.build_lib) / "fused_dropout" / "_build_info.py", **BUILD_CONFIG)
            if self.inplace or getattr(self, "editable_mode", False):
                write_build_info(BUILD_INFO, **BUILD_CONFIG)

    setup(
        ext_modules=extensions() if compiling else [],
        cmdclass={"build_ext": BuildWithInfo},
    )


main()
