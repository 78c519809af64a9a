"""Masks shared over dims: channel-wise dropout (CNNs) and dropout locked over time (RNNs)."""

import warnings

import pytest
import torch
from torch import nn

import fused_dropout
from fused_dropout import FusedDropout1d, FusedDropout2d, FusedDropout3d

import reference
from helpers import DEVICES, DTYPES, assert_bitwise_equal, random_input

CASES = [
    ((4, 6, 5, 7), (2, 3)),  # dropout2d: (N, C, H, W)
    ((3, 5, 2, 3, 4), (2, 3, 4)),  # dropout3d
    ((9, 4, 33), (0,)),  # locked over time: (T, B, H)
    ((9, 4, 33), (-3,)),  # the same, counted from the end
    ((2, 3, 4), (0, 2)),  # two non-adjacent shared dims
    ((5, 1, 7), (1,)),  # sharing a size-1 dim changes nothing
    ((6, 0, 3), (2,)),  # empty
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,shared_dims", CASES, ids=str)
def test_shared_mask_matches_reference(device, dtype, shape, shared_dims):
    x = random_input(shape, dtype, device, seed=3)
    y = fused_dropout.dropout(x, 0.4, seed=21, offset=2**32 - 3, shared_dims=shared_dims)
    assert_bitwise_equal(y, reference.dropout(x, 0.4, 21, 2**32 - 3, shared_dims))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_shared_mask_follows_logical_index_in_any_layout(device, layout):
    x = random_input((4, 6, 5, 7), torch.float32, device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.permute(0, 1, 3, 2)
    y = fused_dropout.dropout(x, 0.5, seed=4, shared_dims=(2, 3))
    assert_bitwise_equal(y, reference.dropout(x, 0.5, 4, 0, (2, 3)))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_channels_are_zeroed_and_backward_matches(device):
    x = random_input((8, 16, 5, 5), torch.float32, device).requires_grad_(True)
    y = FusedDropout2d(0.5)(x)
    per_channel = (y != 0).reshape(8, 16, 25)
    assert torch.equal(per_channel.all(-1), per_channel.any(-1))  # all or nothing per channel
    assert per_channel.any() and not per_channel.all()
    grad = random_input(x.shape, torch.float32, device, seed=5)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(y != 0, grad * 2, torch.zeros_like(grad)))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_shared_dims(device):
    x = random_input((3, 4, 5), torch.float64, device).requires_grad_(True)
    fn = lambda t: fused_dropout.dropout(t, 0.3, seed=2, shared_dims=(0,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_with_shared_dims(device):
    x = random_input((4, 6, 5, 7), torch.float32, device)
    expected = reference.dropout(x, 0.3, 9, 0, (2, 3))
    fused_dropout.dropout(x, 0.3, inplace=True, seed=9, shared_dims=(2, 3))
    assert_bitwise_equal(x, expected)


@pytest.mark.parametrize(
    "fused_cls,torch_cls,shape",
    [
        (FusedDropout1d, nn.Dropout1d, (4, 8, 10)),
        (FusedDropout1d, nn.Dropout1d, (8, 10)),
        (FusedDropout2d, nn.Dropout2d, (4, 8, 3, 3)),
        (FusedDropout3d, nn.Dropout3d, (4, 8, 2, 3, 3)),
        (FusedDropout3d, nn.Dropout3d, (8, 2, 3, 3)),
    ],
)
def test_modules_drop_the_same_units_as_torch(fused_cls, torch_cls, shape):
    x = random_input(shape, torch.float32)
    ours, theirs = fused_cls(0.5), torch_cls(0.5)
    assert repr(ours) == repr(theirs).replace("Dropout", "FusedDropout")
    y, z = ours(x), theirs(x)
    # Same granularity: where torch's mask is constant, ours is constant too.
    channel_dims = tuple(range(2 if len(shape) in (3, 5) or fused_cls is FusedDropout2d else 1, len(shape)))
    for out in (y, z):
        kept = out != 0
        assert torch.equal(kept.all(channel_dims), kept.any(channel_dims))
    ours.eval()
    assert ours(x) is x


def test_shape_rules_and_warnings_follow_torch():
    with pytest.raises(RuntimeError, match="dropout1d: Expected 2D or 3D input, but received a 4D input"):
        fused_dropout.dropout1d(torch.randn(2, 3, 4, 5))
    for ours, theirs, ndim in [
        (fused_dropout.dropout2d, nn.functional.dropout2d, 5),
        (fused_dropout.dropout2d, nn.functional.dropout2d, 2),
        (fused_dropout.dropout3d, nn.functional.dropout3d, 3),
    ]:
        messages = []
        for fn in (ours, theirs):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn(torch.randn([3] * ndim))
            messages.append([str(w.message) for w in caught])
        assert messages[0] == messages[1] and "which is deprecated" in messages[0][0]
    with pytest.warns(UserWarning, match="Received a 3D input to dropout2d"):
        y = fused_dropout.dropout2d(torch.ones(4, 6, 10), 0.5)
    assert torch.equal((y != 0).all(-1), (y != 0).any(-1))  # (N, C, L) channel-wise


def test_bad_shared_dims_are_refused():
    x = torch.randn(2, 3)
    with pytest.raises(IndexError, match=r"shared_dims must name dims of the 2-D input, in \[-2, 2\), got 2"):
        fused_dropout.dropout(x, 0.5, shared_dims=(2,))
    with pytest.raises(ValueError, match="shared_dims names dim 1 twice"):
        fused_dropout.dropout(x, 0.5, shared_dims=(1, -1))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_shared_dims(device):
    x = random_input((3, 4, 5), torch.float32, device).requires_grad_(True)
    torch.library.opcheck(torch.ops.fused_dropout.dropout.default, (x, 0.3, 5, 0, None, [0, 2]))
    state = torch.tensor([5, 0], device=device)
    torch.library.opcheck(torch.ops.fused_dropout.dropout_replay.default, (x, state, 0.3, [1]))
