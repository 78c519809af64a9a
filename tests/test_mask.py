"""Every kernel against the NumPy reference of the mask rule, bit for bit."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fused_dropout

import reference
from helpers import (
    DEVICES,
    DTYPES,
    INNER_LOOP_OFFSET,
    INNER_LOOP_OPS,
    INNER_LOOP_SEED,
    INNER_LOOP_SHAPE,
    assert_bitwise_equal,
    inner_loop_inputs,
    random_input,
)

SHAPES = [(), (1,), (3,), (4,), (5,), (17,), (4097,), (7, 11), (31, 37), (2, 3, 5, 7), (0,), (3, 0, 2)]
# (p, seed, offset): seeds over the full unsigned 64-bit range; offsets that make the 64-bit
# counter carry into its high word, and wrap modulo 2^64, inside one call.
RANDOMNESS = [
    (0.5, 0, 0),
    (0.1, 1, 7),
    (0.9, 2**63 + 5, 2**32 - 3),
    (1 / 3, 2**64 - 1, 2**64 - 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p,seed,offset", RANDOMNESS)
def test_output_matches_reference(device, dtype, shape, p, seed, offset):
    x = random_input(shape, dtype, device, seed=len(shape))
    y = fused_dropout.dropout(x, p, seed=seed, offset=offset)
    assert_bitwise_equal(y, reference.dropout(x, p, seed, offset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [16 * 4 * 3 + 5, 1024 * 9 + 1, 4 * 8192 * 3 + 13, 2**20 + 3])
def test_long_tensors_cross_batch_vector_and_thread_boundaries(device, numel):
    # 16 groups per AVX-512 step, 256 per batch, 8192 per parallel task on the CPU; many
    # blocks and a partial last step on CUDA.
    x = random_input((numel,), torch.float32, device, seed=numel)
    for seed, offset in [(99, 0), (5, 2**32 - 100)]:
        y = fused_dropout.dropout(x, 0.25, seed=seed, offset=offset)
        assert_bitwise_equal(y, reference.dropout(x, 0.25, seed, offset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 1e-9, 0.5, 1 - 1e-9, 1.0, 0.2, 0.7])
def test_keep_mask_matches_reference(device, p):
    shape = (13, 29)
    np.testing.assert_array_equal(
        fused_dropout.keep_mask(shape, p, seed=42, offset=3, device=device).cpu().numpy(),
        reference.keep_mask(shape, p, 42, 3),
    )


def test_threshold_is_rounded_and_compared_in_64_bits():
    # p = 0 keeps every word, including 0xFFFFFFFF; p = 1 keeps none, including 0.
    assert reference.threshold(0.0) == 2**32 and reference.threshold(1.0) == 0
    assert fused_dropout.keep_mask((4096,), 0.0, seed=3).all()
    assert not fused_dropout.keep_mask((4096,), 1.0, seed=3).any()


def layouts(device):
    base = random_input((4, 6, 5, 8), torch.float32, device, seed=7)
    return {
        "permuted": base.permute(2, 0, 3, 1),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": base[:, ::2, 1:, ::3],
        "transposed_2d": base.reshape(24, 40).t(),
        "expanded": random_input((1, 6, 1, 8), torch.float32, device).expand(4, 6, 5, 8),
        "misaligned": base.reshape(-1)[1:],  # contiguous, but not 16-byte aligned
        "offset_view": base.reshape(-1)[3:].reshape(-1, 11)[:, 1:9],
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layout", ["permuted", "channels_last", "sliced", "transposed_2d", "expanded", "misaligned", "offset_view"]
)
def test_mask_follows_logical_index_in_every_layout(device, layout):
    x = layouts(device)[layout]
    y = fused_dropout.dropout(x, 0.4, seed=11, offset=5)
    assert_bitwise_equal(y, reference.dropout(x, 0.4, 11, 5))


def long_run_layouts(dtype, device):
    """Layouts whose merged inner runs are longer than a CPU chunk (1024 elements), with
    rows enough for several parallel tasks: each run is split, and each task starts mid-way."""
    image = random_input((4, 48, 30, 40), dtype, device, seed=5)
    return {
        "channels_last": (image.contiguous(memory_format=torch.channels_last), ()),
        "dropout2d": (image, (2, 3)),  # one word per run
        "dropout2d_channels_last": (image.contiguous(memory_format=torch.channels_last), (2, 3)),
        "locked_over_time": (random_input((20, 8, 1500), dtype, device, seed=6), (0,)),
        "transposed": (random_input((3000, 70), dtype, device, seed=7).t(), ()),
        "sliced": (random_input((64, 4000), dtype, device, seed=8)[:, ::2], ()),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layout", ["channels_last", "dropout2d", "dropout2d_channels_last", "locked_over_time", "transposed", "sliced"]
)
def test_long_runs_in_any_layout_match_reference(device, dtype, layout):
    x, shared_dims = long_run_layouts(dtype, device)[layout]
    y = fused_dropout.dropout(x, 0.3, seed=2**40 + 9, offset=2**32 - 100, shared_dims=shared_dims)
    assert_bitwise_equal(y, reference.dropout(x, 0.3, 2**40 + 9, 2**32 - 100, shared_dims))


@pytest.mark.parametrize("device", DEVICES)
def test_output_keeps_memory_format(device):
    x = random_input((2, 3, 4, 5), torch.float32, device).contiguous(memory_format=torch.channels_last)
    y = fused_dropout.dropout(x, 0.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    permuted = random_input((3, 4, 5), torch.float32, device).permute(2, 0, 1)
    assert fused_dropout.dropout(permuted, 0.5).stride() == permuted.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["permuted", "channels_last", "sliced", "misaligned", "offset_view"])
def test_inplace_matches_out_of_place_and_leaves_the_rest_alone(device, layout):
    x = layouts(device)[layout]
    expected = reference.dropout(x, 0.3, 8, 0)
    base = x._base if x._base is not None else x
    base_before = base.clone()
    out = fused_dropout.dropout(x, 0.3, inplace=True, seed=8)
    assert out.data_ptr() == x.data_ptr()
    assert_bitwise_equal(x, expected)
    # Elements of the base tensor outside the view are untouched.
    untouched = torch.ones_like(base, dtype=torch.bool)
    view_of_mask = untouched.as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset())
    view_of_mask.fill_(False)
    assert torch.equal(base[untouched], base_before[untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropped_nan_and_inf_become_positive_zero(device, dtype):
    x = torch.tensor([math.nan, math.inf, -math.inf, -0.0, -1.0] * 40, dtype=dtype, device=device)
    y = fused_dropout.dropout(x, 0.5, seed=1)
    keep = torch.from_numpy(reference.keep_mask(x.shape, 0.5, 1)).to(device)
    assert keep.any() and not keep.all()
    dropped = y[~keep]
    assert torch.equal(dropped, torch.zeros_like(dropped)) and not torch.signbit(dropped).any()
    kept_expected = (x.to(torch.float64) * 2).to(dtype)[keep]
    torch.testing.assert_close(y[keep], kept_expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
def test_cpu_and_cuda_are_bit_identical_for_the_same_seed(dtype, layout):
    x = random_input((8, 16, 7, 9), dtype, "cpu", seed=3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "misaligned":
        x = x.reshape(-1)[1:]
    y_cpu = fused_dropout.dropout(x, 0.37, seed=2024, offset=9)
    y_cuda = fused_dropout.dropout(x.cuda(), 0.37, seed=2024, offset=9)
    assert torch.equal(y_cpu, y_cuda.cpu())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", INNER_LOOP_OPS)
def test_cpu_inner_loops_agree_with_reference(dtype, op, tmp_path):
    # The CPU kernel picks AVX-512 loops where the CPU has them, else portable ones; run
    # each in a fresh process, since the choice is made once per process. Both must give the
    # same bits, NaNs included, and match the reference. p = 0.3 makes the scale inexact, so
    # the conversions' rounding is exercised.
    outputs = {}
    for disable_avx512 in ("0", "1"):
        env = dict(os.environ, FUSED_DROPOUT_DISABLE_AVX512=disable_avx512)
        out_file = tmp_path / f"out{disable_avx512}"
        probe = os.path.join(os.path.dirname(__file__), "inner_loop_probe.py")
        subprocess.run([sys.executable, probe, dtype, op, str(out_file)], env=env, cwd=tmp_path, check=True)
        outputs[disable_avx512] = out_file.read_bytes()
    assert outputs["0"] == outputs["1"], "the AVX-512 and portable loops give different bits"

    dtype = getattr(torch, dtype)
    x, r, b = inner_loop_inputs(dtype, op)
    if op == "dropout":
        expected = reference.dropout(x, 0.3, INNER_LOOP_SEED, INNER_LOOP_OFFSET)
    elif op == "replay_from_float":  # converted to the dtype, then dropped
        expected = reference.dropout(x.to(dtype), 0.3, INNER_LOOP_SEED, INNER_LOOP_OFFSET)
    else:  # each step rounded to the dtype, as the unfused ops would; the sum to the residual's
        biased = (x.float() + b.float()).to(x.dtype) if op != "dropout_add_no_bias" else x
        dropped = reference.dropout(biased, 0.3, INNER_LOOP_SEED, INNER_LOOP_OFFSET)
        expected = (r.float() + dropped.float()).to(r.dtype)
    actual = torch.frombuffer(bytearray(outputs["0"]), dtype=torch.uint8).view(expected.dtype).view(INNER_LOOP_SHAPE)
    nan = torch.isnan(expected)
    assert nan.any() and torch.equal(torch.isnan(actual), nan)
    # NaN payloads differ between torch's conversions, so the NaNs are compared by position.
    assert_bitwise_equal(actual[~nan], expected[~nan])


# A shard's mask window (fused_dropout/distributed.py sets it for DTensor shards): each op called
# on a piece of a tensor, with the window of the piece's place in the whole, gives exactly that
# piece of the op on the whole tensor. Here without DTensor, on every device's kernels.
WINDOW_SHAPE = (9, 7, 6)
WINDOW_OPS = {
    "dropout": lambda x, r, b, g, s, **k: fused_dropout.ops.dropout(x, 0.4, 77, 3, **k)[0],
    "dropout_shared_dims": lambda x, r, b, g, s, **k: fused_dropout.ops.dropout(x, 0.4, 77, 3, shared_dims=(1,), **k)[
        0
    ],
    "alpha_dropout": lambda x, r, b, g, s, **k: fused_dropout.ops.alpha_dropout(x, 0.3, 77, 3, **k)[0],
    "dropout_add": lambda x, r, b, g, s, **k: fused_dropout.ops.dropout_add(x, r, b, 0.4, 77, 3, **k)[0],
    "act_dropout_gelu": lambda x, r, b, g, s, **k: fused_dropout.ops.act_dropout(x, b, 0.4, "gelu", 77, 3, **k)[0],
    "act_dropout_relu": lambda x, r, b, g, s, **k: fused_dropout.ops.act_dropout(x, b, 0.4, "relu", 77, 3, **k)[0],
    "dropout_replay": lambda x, r, b, g, s, **k: fused_dropout.ops.dropout_replay(x, s, 0.4),
    "act_dropout_backward": lambda x, r, b, g, s, **k: fused_dropout.ops.act_dropout_backward(g, x, b, s, 0.4, "gelu"),
    "dropout_add_layer_norm": lambda x, r, b, g, s, **k: fused_dropout.ops.dropout_add_norm(
        x, r, None, b, 0.4, 1e-5, False, None, 77, 3
    )[0],
}


def _pieces(dim: int):
    """Two uneven pieces of WINDOW_SHAPE along `dim`: index tuples and their origins."""
    cut = WINDOW_SHAPE[dim] // 2 + 1
    for start, stop in ((0, cut), (cut, WINDOW_SHAPE[dim])):
        index = [slice(None)] * len(WINDOW_SHAPE)
        index[dim] = slice(start, stop)
        origin = [0] * len(WINDOW_SHAPE)
        origin[dim] = start
        yield tuple(index), origin


# The norm needs whole rows: its DTensor handler never cuts the last dim.
WINDOW_CASES = [(op, dim) for op in WINDOW_OPS for dim in range(3) if not (op.endswith("norm") and dim == 2)]


@pytest.mark.parametrize("op, dim", WINDOW_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_window_draws_its_piece_of_the_whole_mask(device, op, dim):
    x, r, g = (random_input(WINDOW_SHAPE, torch.float32, device, seed=s) for s in (1, 2, 3))
    b = random_input(WINDOW_SHAPE[-1:], torch.float32, device, seed=4)
    state = torch.tensor([77, 3], device=device)
    whole = WINDOW_OPS[op](x, r, b, g, state)
    for index, origin in _pieces(dim):
        piece_bias = b[index[-1]].contiguous()
        parts = (x[index].contiguous(), r[index].contiguous(), piece_bias, g[index].contiguous(), state)
        fused_dropout._C.set_mask_window(list(WINDOW_SHAPE), origin)
        try:
            piece = WINDOW_OPS[op](*parts)
        finally:
            fused_dropout._C.set_mask_window(None, None)
        assert_bitwise_equal(piece, whole[index])


@pytest.mark.parametrize("device", DEVICES)
def test_an_unseeded_window_advances_the_generator_by_the_whole_draw(device):
    """Every shard of an unseeded call draws the whole tensor's state, so the ranks' generators
    stay together: after a piece's call the generator is where the whole call leaves it."""
    x = random_input(WINDOW_SHAPE, torch.float32, device)
    torch.manual_seed(5)
    whole = fused_dropout.ops.dropout(x, 0.5)[0]
    after_whole = fused_dropout.ops.dropout(x, 0.5)[1]
    for index, origin in _pieces(1):
        torch.manual_seed(5)
        fused_dropout._C.set_mask_window(list(WINDOW_SHAPE), origin)
        try:
            piece = fused_dropout.ops.dropout(x[index].contiguous(), 0.5)[0]
        finally:
            fused_dropout._C.set_mask_window(None, None)
        assert_bitwise_equal(piece, whole[index])
        assert torch.equal(fused_dropout.ops.dropout(x, 0.5)[1], after_whole)


def test_a_window_that_does_not_hold_the_input_is_refused():
    fused_dropout._C.set_mask_window([4, 6], [3, 0])
    try:
        with pytest.raises(RuntimeError, match=r"window in the whole DTensor .* does not hold the local input"):
            fused_dropout.ops.dropout(torch.randn(2, 6), 0.5, seed=1)
    finally:
        fused_dropout._C.set_mask_window(None, None)
