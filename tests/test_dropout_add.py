"""dropout_add: residual + dropout(input + bias) in one pass, equal to the unfused ops."""

import pytest
import torch
from torch import nn

import fused_dropout
from fused_dropout import FusedDropout, FusedDropoutAdd

import reference
from helpers import DEVICES, DTYPES, assert_bitwise_equal, random_input, saved_bytes


def unfused(x, residual, p, seed, offset=0, bias=None):
    # The composition the fused op must equal, with the reference mask.
    return residual + reference.dropout(x if bias is None else x + bias, p, seed, offset).to(x.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 9, 33), (4, 1, 4097)], ids=str)
def test_equals_the_unfused_ops_bit_for_bit(device, dtype, with_bias, shape):
    x = random_input(shape, dtype, device, seed=1)
    residual = random_input(shape, dtype, device, seed=2)
    bias = random_input(shape[-1:], dtype, device, seed=3) if with_bias else None
    y = fused_dropout.dropout_add(x, residual, 0.3, bias=bias, seed=11, offset=5)
    assert_bitwise_equal(y, unfused(x, residual, 0.3, 11, 5, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["residual_transposed", "all_channels_last", "input_sliced"])
def test_any_layout(device, layout):
    x = random_input((2, 3, 4, 6), torch.float32, device)
    residual = random_input((2, 3, 4, 6), torch.float32, device, seed=4)
    if layout == "residual_transposed":
        residual = random_input((2, 3, 6, 4), torch.float32, device, seed=4).transpose(2, 3)
    elif layout == "all_channels_last":
        x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    else:
        x = random_input((2, 3, 4, 12), torch.float32, device)[..., ::2]
    bias = random_input((6,), torch.float32, device, seed=5)
    y = fused_dropout.dropout_add(x, residual, 0.5, bias=bias, seed=2)
    assert_bitwise_equal(y, unfused(x, residual, 0.5, 2, 0, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["residual_transposed", "residual_broadcast", "all_channels_last"])
def test_long_runs_in_any_layout(device, dtype, layout):
    # Rows longer than a CPU chunk, in layouts that are not row-major for every operand.
    shape = (4, 48, 30, 40) if layout == "all_channels_last" else (64, 1500)
    x = random_input(shape, dtype, device, seed=1)
    residual = random_input(shape, dtype, device, seed=2)
    if layout == "residual_transposed":
        residual = random_input(shape[::-1], dtype, device, seed=2).t()
    elif layout == "residual_broadcast":
        residual = random_input((1, shape[-1]), dtype, device, seed=2).expand(shape)
    else:
        x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    bias = random_input(shape[-1:], dtype, device, seed=3)
    y = fused_dropout.dropout_add(x, residual, 0.3, bias=bias, seed=5, offset=2**32 - 7)
    assert_bitwise_equal(y, unfused(x, residual, 0.3, 5, 2**32 - 7, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    x = random_input((6, 10), torch.float32, device).requires_grad_(True)
    residual = random_input((6, 10), torch.float32, device, seed=2).requires_grad_(True)
    bias = random_input((10,), torch.float32, device, seed=3).requires_grad_(True)
    y = fused_dropout.dropout_add(x, residual, 0.5, bias=bias)
    grad = random_input((6, 10), torch.float32, device, seed=4)
    y.backward(grad)
    keep = (y - residual).detach() != 0
    expected = torch.where(keep, grad * 2, torch.zeros_like(grad))
    assert torch.equal(residual.grad, grad)
    assert torch.equal(x.grad, expected)
    torch.testing.assert_close(bias.grad, expected.sum(0))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x, residual = (random_input((4, 5), torch.float64, device, seed=s).requires_grad_(True) for s in (1, 2))
    bias = random_input((5,), torch.float64, device, seed=3).requires_grad_(True)
    fn = lambda a, r, b: fused_dropout.dropout_add(a, r, 0.4, bias=b, seed=8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, residual, bias))
    assert torch.autograd.gradgradcheck(fn, (x, residual, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_saves_only_the_random_state(device):

    x = random_input((256, 64), torch.float32, device).requires_grad_(True)
    residual = random_input((256, 64), torch.float32, device)
    assert saved_bytes(lambda t: fused_dropout.dropout_add(t, residual, 0.5), x) == 16


def test_eval_and_p_zero_are_plain_adds():
    x, residual, bias = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)
    assert torch.equal(fused_dropout.dropout_add(x, residual, 0.5, training=False, bias=bias), residual + (x + bias))
    assert torch.equal(fused_dropout.dropout_add(x, residual, 0.0), residual + x)
    module = FusedDropoutAdd(0.5).eval()
    assert repr(module) == "FusedDropoutAdd(p=0.5)"
    assert torch.equal(module(x, residual, bias), residual + (x + bias))


def test_mismatches_are_refused():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"residual must have the input's shape \[3, 4\], got \[4, 3\]"):
        fused_dropout.dropout_add(x, torch.randn(4, 3))
    # A residual of another floating dtype is promoted (test_torch_features.py); others are refused.
    with pytest.raises(RuntimeError, match=r"residual must be float32, float64, float16 or bfloat16, got Int"):
        fused_dropout.dropout_add(x, torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(
        RuntimeError, match=r"bias must be 1-D with the size of the input's last dim \(4\), got shape \[3\]"
    ):
        fused_dropout.dropout_add(x, x, bias=torch.randn(3))
    with pytest.raises(RuntimeError, match=r"bias must have the input's dtype Float, got Half"):
        fused_dropout.dropout_add(x, x, bias=torch.randn(4, dtype=torch.half))
    with pytest.raises(TypeError, match="residual must be a Tensor, got float"):
        fused_dropout.dropout_add(x, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    x, residual = (random_input((3, 8), torch.float32, device, seed=s).requires_grad_(requires_grad) for s in (1, 2))
    bias = random_input((8,), torch.float32, device, seed=3).requires_grad_(requires_grad)
    op = torch.ops.fused_dropout.dropout_add.default
    torch.library.opcheck(op, (x, residual, bias, 0.3, 4, 0, None))
    torch.library.opcheck(op, (x, residual, None, 0.3, 4, 0, None))


class TransformerBlock(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width, bias=False)
        self.bias = nn.Parameter(torch.zeros(width))
        self.drop, self.drop_add = FusedDropout(0.1), FusedDropoutAdd(0.1)

    def forward(self, x):
        hidden = self.drop(torch.relu(self.fc1(self.norm(x))))
        return self.drop_add(self.fc2(hidden), x, self.bias)


def run_block(block, fn, x):
    torch.manual_seed(5)
    block.zero_grad()
    out = fn(x)
    out.square().mean().backward()
    return out.detach(), block.fc1.weight.grad.clone(), block.bias.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_transformer_block_matches_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = TransformerBlock().to(device)
    x = random_input((4, 16, 32), torch.float32, device)
    mode = "reduce-overhead" if device == "cuda" else None  # CUDA graphs where there is a GPU
    compiled = torch.compile(block, fullgraph=True, mode=mode)
    eager = run_block(block, block, x)
    for _ in range(2 if device == "cuda" else 1):  # a graph replay, too
        got = run_block(block, compiled, x)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b)
