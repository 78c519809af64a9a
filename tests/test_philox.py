import numpy as np
import pytest
import torch

import fused_dropout

import reference
from helpers import DEVICES

# Random123's published known-answer vectors for Philox4x32-10.
KNOWN_ANSWERS = [
    (
        (0x00000000, 0x00000000, 0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_known_answer_vectors(device):
    counter = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], device=device)
    key = torch.tensor([k for _, k, _ in KNOWN_ANSWERS], device=device)
    expected = torch.tensor([r for _, _, r in KNOWN_ANSWERS])
    torch.testing.assert_close(fused_dropout.philox4x32_10(counter, key).cpu(), expected, rtol=0, atol=0)


def test_numpy_reference_passes_known_answer_vectors():
    for counter, key, expected in KNOWN_ANSWERS:
        words = reference.philox4x32_10(*counter, *key)
        assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_random_counters_and_keys_match_reference(device):
    rng = np.random.default_rng(1234)
    counter = rng.integers(0, 2**32, size=(1000, 4), dtype=np.uint64)
    key = rng.integers(0, 2**32, size=(1000, 2), dtype=np.uint64)
    expected = np.stack(reference.philox4x32_10(*counter.T, *key.T), axis=1)
    got = fused_dropout.philox4x32_10(
        torch.from_numpy(counter.astype(np.int64)).to(device), torch.from_numpy(key.astype(np.int64)).to(device)
    )
    np.testing.assert_array_equal(got.cpu().numpy().astype(np.uint64), expected)


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(RuntimeError, match=r"counter must be int64 of shape \[N, 4\], got Int"):
        fused_dropout.philox4x32_10(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"key must be int64 of shape \[N, 2\] with N = 2"):
        fused_dropout.philox4x32_10(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
