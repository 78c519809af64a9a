"""A NumPy reference of the mask rule, written independently of the C++ code.

    r(i) = word (i mod 4) of Philox4x32-10(counter = (lo32(base + i div 4), hi32(base + i div 4), 0, 0),
                                            key     = (lo32(seed), hi32(seed)))
    keep(i) = r(i) < t,  t = round((1 - p) * 2^32)

Every kernel is compared with it bit for bit.
"""

import numpy as np
import torch

_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_SHIFT32 = np.uint64(32)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on arrays of 32-bit words held in uint64; returns four uint64 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.asarray(k0, dtype=np.uint64), np.asarray(k1, dtype=np.uint64)
    for round_index in range(10):
        if round_index:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        product0 = _M0 * c0  # < 2^64: both factors are below 2^32
        product1 = _M1 * c2
        c0, c1, c2, c3 = (
            (product1 >> _SHIFT32) ^ c1 ^ k0,
            product1 & _MASK32,
            (product0 >> _SHIFT32) ^ c3 ^ k1,
            product0 & _MASK32,
        )
    return c0, c1, c2, c3


def mask_words(start: int, stop: int, seed: int, base: int) -> np.ndarray:
    """r(i) for i in [start, stop), as uint64."""
    first_group, end_group = start // 4, (stop + 3) // 4
    with np.errstate(over="ignore"):  # the counter wraps modulo 2^64
        counter = np.uint64((base + first_group) % 2**64) + np.arange(end_group - first_group, dtype=np.uint64)
    seed = seed % 2**64
    words = philox4x32_10(
        counter & _MASK32, counter >> _SHIFT32, 0, 0, np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    )
    flat = np.stack(words, axis=1).reshape(-1)
    return flat[start - 4 * first_group : stop - 4 * first_group]


def threshold(p: float) -> int:
    return int(np.rint((1.0 - p) * 4294967296.0))


def keep_mask(shape, p: float, seed: int, base: int = 0) -> np.ndarray:
    """The boolean mask of the rule, in logical row-major order, shaped like ``shape``."""
    shape = tuple(shape)
    numel = int(np.prod(shape, dtype=np.int64))
    return keep_range(0, numel, p, seed, base).reshape(shape)


def keep_range(start: int, stop: int, p: float, seed: int, base: int = 0) -> np.ndarray:
    """keep(i) for the logical indices i in [start, stop)."""
    return mask_words(start, stop, seed, base) < np.uint64(threshold(p))


def mask_shape(shape, shared_dims=()):
    """The shape the rule indexes: ``shape`` with the shared dims set to 1."""
    shared = {d % len(shape) for d in shared_dims}
    return tuple(1 if d in shared else n for d, n in enumerate(shape))


def dropout(x: torch.Tensor, p: float, seed: int, base: int = 0, shared_dims=()) -> torch.Tensor:
    """The expected output: kept elements cast(acc(x) * scale), dropped ones +0.0.

    Computed with NumPy's mask and torch's elementwise ops on a CPU copy, not with the
    extension's kernels."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p) if p < 1 else 0.0, dtype=torch.float64).to(acc)
    keep = torch.from_numpy(keep_mask(mask_shape(x.shape, shared_dims), p, seed, base)).expand(x.shape)
    scaled = (x.detach().cpu().to(acc) * scale).to(x.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=x.dtype))


ALPHA = 1.7580993408473766  # torch's alpha dropout constant


def alpha_dropout(x: torch.Tensor, p: float, seed: int, base: int = 0, shared_dims=()) -> torch.Tensor:
    """The expected alpha dropout: kept elements a * x + a * alpha * p (the multiply and the
    add each rounded to the accumulation type, then the result to the dtype), dropped ones
    a * alpha * (p - 1); a = 1 / sqrt((alpha^2 p + 1)(1 - p))."""
    a = 1.0 / np.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p)) if p < 1 else 0.0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    a_acc = torch.tensor(a, dtype=torch.float64).to(acc)
    shift = torch.tensor(a * ALPHA * p, dtype=torch.float64).to(acc)
    kept = (x.detach().cpu().to(acc) * a_acc + shift).to(x.dtype)
    dropped = torch.tensor(a * ALPHA * (p - 1.0), dtype=torch.float64).to(x.dtype)
    keep = torch.from_numpy(keep_mask(mask_shape(x.shape, shared_dims), p, seed, base)).expand(x.shape)
    return torch.where(keep, kept, dropped)
