"""Parameters and inputs shared by the tests."""
import math

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_input(shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    """Fresh normal values with no exact zeros, so a dropped element is always visible."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    x[x == 0] = 1
    return x.to(device)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.cpu(), expected.cpu()
    assert torch.equal(actual, expected), "outputs differ from the reference"
    # torch.equal takes -0.0 for +0.0; the signs of zeros must match too.
    zeros = expected == 0
    assert torch.equal(torch.signbit(actual[zeros]), torch.signbit(expected[zeros]))


def with_special_values(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float, 1-D or more) with NaN, infinities, signed zeros, the largest and smallest
    values of its dtype written at its start, middle and end, where vector loops have their
    full and partial steps."""
    info = torch.finfo(x.dtype)
    specials = torch.tensor(
        [math.nan, math.inf, -math.inf, -0.0, 0.0, info.max, -info.max, info.tiny, info.smallest_normal / 8,
         -info.tiny, 1.0 + info.eps / 2, 1.0 + 3 * info.eps / 2],
        dtype=torch.float64,
    ).to(x.dtype)
    flat = x.view(-1)
    n = len(specials)
    for start in (0, flat.numel() // 2, flat.numel() - n):
        flat[start : start + n] = specials
    return x
