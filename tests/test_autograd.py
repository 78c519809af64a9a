"""Backward regenerates the forward's mask from rng_state; nothing else is saved."""

import pytest
import torch

import fused_dropout
from fused_dropout import ops

from helpers import DEVICES, DTYPES, random_input, saved_bytes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grad_is_grad_output_times_mask_times_scale(device, dtype, layout):
    x = random_input((4, 3, 5, 7), dtype, device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    p = 0.3
    y = fused_dropout.dropout(x, p)  # default generator: backward must replay this very mask
    grad_output = random_input(x.shape, dtype, device, seed=1)
    y.backward(grad_output)
    keep = y.detach() != 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1 / (1 - p), dtype=torch.float64).to(acc)
    expected = torch.where(keep, (grad_output.to(acc) * scale).to(dtype), torch.zeros((), dtype=dtype, device=device))
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device):
    x = random_input((5, 7), torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fused_dropout.dropout(t, 0.4, seed=17), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fused_dropout.dropout(t, 0.4, seed=17), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_uses_the_same_mask(device):
    x = random_input((257,), torch.float64, device).requires_grad_(True)
    y = fused_dropout.dropout(x, 0.5)
    (grad_x,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)  # 2 * y * mask * 2
    (grad_grad,) = torch.autograd.grad(grad_x.sum(), x)  # 2 * mask * 2 * mask * 2
    keep = (y != 0).double()
    assert torch.equal(grad_x.detach(), 2 * y.detach() * keep * 2)
    assert torch.equal(grad_grad, keep * 8)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_under_autograd(device):
    w = random_input((300,), torch.float32, device, seed=2)
    x = random_input((300,), torch.float32, device).requires_grad_(True)
    h = x * 1.0
    out = fused_dropout.dropout(h, 0.5, inplace=True)
    assert out is h
    (out * w).sum().backward()
    keep = h.detach() != 0
    assert torch.equal(x.grad, torch.where(keep, w * 2, torch.zeros_like(w)))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_a_leaf_that_requires_grad_is_refused(device):
    x = random_input((10,), torch.float32, device).requires_grad_(True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fused_dropout.dropout(x, 0.5, inplace=True)


@pytest.mark.parametrize("device", DEVICES)
def test_p_one_gives_zeros_and_zero_gradients(device):
    x = random_input((64,), torch.float32, device).requires_grad_(True)
    y = fused_dropout.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y)) and not torch.signbit(y).any()
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_saves_sixteen_bytes_per_call(device):
    x = random_input((1 << 16,), torch.float32, device).requires_grad_(True)
    assert saved_bytes(lambda t: fused_dropout.dropout(t, 0.5), x) == 16
    assert saved_bytes(lambda t: fused_dropout.dropout(t * 1.0, 0.5, inplace=True), x) == 16
    # nn.Dropout keeps a mask per element: one byte (CUDA) or a full float (CPU).
    assert saved_bytes(lambda t: torch.nn.functional.dropout(t, 0.5), x) >= x.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_replay_of_rng_state_reproduces_the_output(device):
    x = random_input((33, 17), torch.float32, device)
    y, rng_state = ops.dropout(x, 0.25)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and rng_state.device == x.device
    assert torch.equal(ops.dropout_replay(x, rng_state, 0.25), y)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_a_view_under_autograd(device):
    x = random_input((6, 10), torch.float32, device).requires_grad_(True)
    h = x * 1.0
    view = h[:, 2:7]
    fused_dropout.dropout(view, 0.5, inplace=True)
    h.sum().backward()
    keep = view.detach() != 0
    expected = torch.ones_like(x)
    expected[:, 2:7] = torch.where(keep, 2.0, 0.0)
    assert torch.equal(x.grad, expected)
