"""Loads the compiled extension, with one clear error for each way that can fail: no build
(a source tree), or a build for another torch than the one running."""

import importlib
import os

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def load_extension():
    """The ``fused_dropout._C`` module, after checking it was built for this torch."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        build_info = importlib.import_module("fused_dropout._build_info")
    except ModuleNotFoundError:
        build_info = None
    if build_info is not None:
        built = (build_info.TORCH_VERSION, build_info.TORCH_CUDA_VERSION)
        running = (torch.__version__, torch.version.cuda)
        if built != running:
            raise ImportError(
                f"fused_dropout was compiled against torch {built[0]} (CUDA {built[1]}), but torch "
                f"{running[0]} (CUDA {running[1]}) is running; a C++ extension only loads with the torch it was "
                f"built for. Rebuild it against this torch, from the fused_dropout source tree:\n    {REBUILD}"
            )
    try:
        return importlib.import_module("fused_dropout._C")
    except ImportError as error:
        if build_info is None and not any(name.startswith("_C.") for name in os.listdir(package_dir)):
            raise ImportError(
                f"fused_dropout is being imported from {package_dir}, a source tree with no compiled extension "
                "in it (is the current directory the repository root?). Build it in place with\n"
                "    pip install --no-build-isolation -e .\n"
                "or import the installed package from outside the source tree."
            ) from error
        raise ImportError(
            f"fused_dropout's compiled extension in {package_dir} failed to load ({error}). It was most likely "
            f"built for another torch or CUDA than the running torch {torch.__version__}; rebuild it:\n"
            f"    {REBUILD}"
        ) from error
