"""Loads the compiled extension, with one clear error for each way that can fail: no build
(a source tree), or a build for another torch than the one running."""

import glob
import importlib
import os
import sys

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _has_build(package_dir: str) -> bool:
    return bool(glob.glob(os.path.join(package_dir, "_C.*")))


def _installed_elsewhere(package_dir: str):
    """Another fused_dropout package with a compiled extension on sys.path, or None."""
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "fused_dropout")
        if os.path.realpath(candidate) != os.path.realpath(package_dir) and _has_build(candidate):
            return candidate
    return None


def _source_tree_error(package_dir: str) -> ImportError:
    installed = _installed_elsewhere(package_dir)
    if installed is not None:
        return ImportError(
            f"fused_dropout is being imported from {package_dir}, a source tree with no compiled extension, "
            f"which shadows the installed package in {installed} because its parent directory comes first on "
            "sys.path (the current directory, for `python -c` and `python -m`). Run from another directory, "
            "or build the source tree in place with\n    pip install --no-build-isolation -e ."
        )
    return ImportError(
        f"fused_dropout is being imported from {package_dir}, a source tree with no compiled extension "
        "in it (is the current directory the repository root?). Build it in place with\n"
        "    pip install --no-build-isolation -e .\n"
        "or import the installed package from outside the source tree."
    )


def load_extension():
    """The ``fused_dropout._C`` module, after checking it was built for this torch."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        build_info = importlib.import_module("fused_dropout._build_info")
    except ModuleNotFoundError:
        build_info = None
    # A build info file without a build beside it is a leftover in a source tree (the
    # extension lives elsewhere, if anywhere): the import below says which.
    if build_info is not None and _has_build(package_dir):
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
        if not _has_build(package_dir):
            raise _source_tree_error(package_dir) from error
        raise ImportError(
            f"fused_dropout's compiled extension in {package_dir} failed to load ({error}). It was most likely "
            f"built for another torch or CUDA than the running torch {torch.__version__}; rebuild it:\n"
            f"    {REBUILD}"
        ) from error
