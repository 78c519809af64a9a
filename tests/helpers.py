"""Parameters and inputs shared by the tests."""

import math

import pytest
import torch
import torch.nn.functional as F

# act_dropout's activations (in rules.h's Activation order) and torch's own function for each.
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "squared_relu"]
TORCH_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "squared_relu": lambda x: torch.square(F.relu(x)),
}

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
        [
            math.nan,
            math.inf,
            -math.inf,
            -0.0,
            0.0,
            info.max,
            -info.max,
            info.tiny,
            info.smallest_normal / 8,
            -info.tiny,
            1.0 + info.eps / 2,
            1.0 + 3 * info.eps / 2,
        ],
        dtype=torch.float64,
    ).to(x.dtype)
    flat = x.view(-1)
    n = len(specials)
    for start in (0, flat.numel() // 2, flat.numel() - n):
        flat[start : start + n] = specials
    return x


# The CPU inner-loop agreement check (test_mask.py): its inputs and calls, shared with the
# probe script that runs them in a fresh process.
INNER_LOOP_SHAPE = (4 * 8192 * 2 // 63 + 1, 63)  # several parallel tasks, rows that do not align with them
INNER_LOOP_SEED, INNER_LOOP_OFFSET = 2**63 + 1, 2**32 - 40


# The ops of the check: each loop of the table in csrc/cpu/simd.h. "float_residual": dropout_add
# with a float32 residual; "replay_from_float": a float32 input replayed into the dtype.
INNER_LOOP_OPS = ["dropout", "dropout_add", "dropout_add_no_bias", "float_residual", "replay_from_float"]


def inner_loop_inputs(dtype: torch.dtype, op: str = "dropout"):
    """x, residual, bias with special values where the vector loops have full and partial steps."""
    shapes = [INNER_LOOP_SHAPE, INNER_LOOP_SHAPE, INNER_LOOP_SHAPE[-1:]]
    x_dtype = torch.float32 if op == "replay_from_float" else dtype
    r_dtype = torch.float32 if op == "float_residual" else dtype
    x, r, b = (random_input(s, t, seed=k) for k, (s, t) in enumerate(zip(shapes, (x_dtype, r_dtype, dtype))))
    return with_special_values(x), with_special_values(r.flip(0)), b


def inner_loop_call(op: str, dtype: torch.dtype, x, r, b):
    import fused_dropout

    kwargs = dict(seed=INNER_LOOP_SEED, offset=INNER_LOOP_OFFSET)
    if op == "dropout":
        return fused_dropout.dropout(x, 0.3, **kwargs)
    if op == "replay_from_float":
        state = torch.tensor([INNER_LOOP_SEED - 2**64, INNER_LOOP_OFFSET])
        return fused_dropout.ops.dropout_replay(x, state, 0.3, dtype=dtype)
    return fused_dropout.dropout_add(x, r, 0.3, bias=None if op == "dropout_add_no_bias" else b, **kwargs)


def saved_bytes(fn, x):
    """Bytes autograd saves for backward during fn(x)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x)
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
