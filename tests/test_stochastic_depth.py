"""Stochastic depth and its fused residual form: the mask rule with one decision per sample,
drop-ins for torchvision's StochasticDepth, and replace_dropout on real torchvision models."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_dropout

import reference
from helpers import DEVICES, DTYPES, assert_bitwise_equal, random_input

SEED = 77


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_is_dropout_with_the_mask_shared_per_sample(device, dtype, mode, layout):
    x = random_input((9, 3, 4, 5), dtype, device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = fused_dropout.stochastic_depth(x, 0.4, mode, seed=SEED)
    dims = tuple(range(1, 4)) if mode == "row" else tuple(range(4))
    assert_bitwise_equal(out, reference.dropout(x, 0.4, SEED, shared_dims=dims))
    assert_bitwise_equal(out, fused_dropout.dropout(x, 0.4, seed=SEED, shared_dims=dims))
    assert out.stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_drop_path_add_equals_the_unfused_composition(device):
    x = random_input((6, 7, 7, 16), torch.bfloat16, device)
    residual = random_input((6, 7, 7, 16), torch.bfloat16, device, seed=1)
    gamma = random_input((16,), torch.bfloat16, device, seed=2)
    out = fused_dropout.drop_path_add(x, residual, 0.5, scale=gamma, seed=SEED)
    dropped = fused_dropout.stochastic_depth(x * gamma, 0.5, "row", seed=SEED)
    assert_bitwise_equal(out, residual + dropped)
    channels_first = random_input((6, 16, 7, 7), torch.float32, device)
    gamma_cf = random_input((16, 1, 1), torch.float32, device, seed=3)
    out = fused_dropout.drop_path_add(channels_first, channels_first, 0.5, scale=gamma_cf, mode="batch", seed=SEED)
    expected = channels_first + fused_dropout.stochastic_depth(channels_first * gamma_cf, 0.5, "batch", seed=SEED)
    assert_bitwise_equal(out, expected)
    assert torch.equal(fused_dropout.drop_path_add(x, residual, 0.5, False, scale=gamma), residual + x * gamma)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", [1, 3, 8, 17, 1024])
@pytest.mark.parametrize("misaligned", [False, True])
def test_per_sample_masks_on_every_row_length(device, dtype, row, misaligned):
    # Rows shorter than a 16-byte step take the strided walk on CUDA, longer ones the
    # row-shared kernel, whose steps can straddle two rows; an offset view takes its
    # unaligned form. Forward (plain and with residual and bias) and backward, bit for bit.
    storage = random_input((37 * row + 1,), dtype, device)
    x = (storage[1:] if misaligned else storage[:-1]).view(37, row).requires_grad_(True)
    residual = random_input((37, row), dtype, device, seed=1)
    bias = random_input((row,), dtype, device, seed=2)
    out = fused_dropout.stochastic_depth(x, 0.4, "row", seed=SEED)
    assert_bitwise_equal(out, reference.dropout(x, 0.4, SEED, shared_dims=(1,)))
    grad = random_input((37, row), dtype, device, seed=3)
    (x_grad,) = torch.autograd.grad(out, x, grad)
    assert_bitwise_equal(x_grad, reference.dropout(grad, 0.4, SEED, shared_dims=(1,)))
    added = fused_dropout.ops.dropout_add(x.detach(), residual, bias, 0.4, SEED, 0, None, (1,))[0]
    pre = (x.detach().cpu() + bias.cpu()).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (residual.cpu().to(acc) + reference.dropout(pre, 0.4, SEED, shared_dims=(1,)).to(acc)).to(dtype)
    assert_bitwise_equal(added, expected)


_NO_READ_OF_DROPPED_SAMPLES = """
import ctypes, mmap, sys
import torch, fused_dropout

libc = ctypes.CDLL(None, use_errno=True)
PROT_NONE, PROT_READ_WRITE = 0, 3
page, rows = mmap.PAGESIZE, 32
row = page // 4
# Each sample of the branch fills exactly one page of a page-aligned slice.
storage = torch.randn(rows * row + row)
start = (-storage.data_ptr() % page) // 4
branch = storage[start : start + rows * row].view(rows, row)
residual = torch.randn(rows, row)
expected = fused_dropout.drop_path_add(branch, residual, 0.5, seed=7)
# A dropped sample's output is residual + 0.0; a kept one's differs (the branch is random).
dropped = [i for i in range(rows) if torch.equal(expected[i], residual[i] + 0.0)]
for i in dropped:
    assert libc.mprotect(ctypes.c_void_p(branch[i].data_ptr()), page, PROT_NONE) == 0
out = fused_dropout.drop_path_add(branch, residual, 0.5, seed=7)
for i in dropped:
    libc.mprotect(ctypes.c_void_p(branch[i].data_ptr()), page, PROT_READ_WRITE)
assert torch.equal(out, expected)
print(len(dropped), "of", rows, "samples dropped and not read")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses mprotect")
def test_a_dropped_sample_costs_no_read_of_its_branch():
    # The branch of every dropped sample lies on pages made unreadable: a read of one ends
    # the process. (The CUDA kernel's source gets the same check in test_cuda_kernel_on_host.)
    # Run from tests/, so that `python -c` imports the package the tests import, not a source
    # tree in the current directory.
    run = subprocess.run(
        [sys.executable, "-c", _NO_READ_OF_DROPPED_SAMPLES],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    dropped = int(run.stdout.split()[0])
    assert 0 < dropped < 32, run.stdout


def test_drop_path_add_gradients():
    x = random_input((8, 5), torch.float64).requires_grad_(True)
    r = random_input((8, 5), torch.float64, seed=1).requires_grad_(True)
    gamma = random_input((5,), torch.float64, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, g: fused_dropout.drop_path_add(a, b, 0.5, scale=g, seed=SEED),
        (x, r, gamma),
        check_forward_ad=True,
        check_batched_grad=True,
    )


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"p": 1.5, "mode": "row"}, ValueError, "drop probability has to be between 0 and 1, but got 1.5"),
        ({"p": 0.5, "mode": "col"}, ValueError, "mode has to be either 'batch' or 'row', but got col"),
    ],
)
def test_bad_arguments_get_torchvisions_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_dropout.stochastic_depth(torch.randn(4, 3), **kwargs)
    with pytest.raises(error, match=message):
        fused_dropout.drop_path_add(torch.randn(4, 3), torch.randn(4, 3), **kwargs)


def test_whole_samples_are_dropped_at_the_rate_p():
    # 4000 samples at p = 0.3: the count of dropped samples is binomial; a two-sided test at
    # a false-failure rate of 1e-6.
    stats = pytest.importorskip("scipy.stats", reason="scipy is not installed")
    out = fused_dropout.stochastic_depth(torch.ones(4000, 3, 2), 0.3, "row", seed=SEED)
    dropped = out.eq(0).all(-1).all(-1)
    assert torch.equal(dropped | out.eq(1 / 0.7).all(-1).all(-1), torch.ones(4000, dtype=torch.bool))
    assert stats.binomtest(int(dropped.sum()), 4000, 0.3).pvalue > 1e-6


def test_module_is_a_drop_in_for_torchvision():
    torchvision = pytest.importorskip("torchvision")
    ours, theirs = fused_dropout.FusedStochasticDepth(0.2, "row"), torchvision.ops.StochasticDepth(0.2, "row")
    assert repr(ours).replace("Fused", "") == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = random_input((4, 3), torch.float32)
    ours.eval()
    assert ours(x) is x


def _swapped_kinds(model):
    return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("fused_dropout")})


@pytest.mark.parametrize("train", [False, pytest.param(True, id="train")])
@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("convnext_tiny", {"stochastic_depth_prob": 0.2}, 32),
        ("swin_t", {}, 32),
        ("vit_b_16", {"dropout": 0.1, "image_size": 32}, 32),
        pytest.param("efficientnet_b0", {}, 32, marks=pytest.mark.heavy),
        pytest.param("mobilenet_v3_small", {}, 32, marks=pytest.mark.heavy),
        pytest.param("vgg11", {}, 32, marks=pytest.mark.heavy),
    ],
)
def test_replace_dropout_on_torchvision_models(name, kwargs, size, train, request):
    if train and request.node.get_closest_marker("heavy") and not request.config.getoption("--runslow"):
        pytest.skip("slow: training steps of this model take tens of seconds on a CPU (run with --runslow)")
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    if name == "vit_b_16":  # a ViT-B/16 block structure at a size that runs fast on a CPU
        stock = models.VisionTransformer(
            image_size=32,
            patch_size=16,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            dropout=0.1,
            num_classes=10,
        )
    elif name == "vgg11":
        stock = models.vgg11(weights=None, num_classes=10)
        stock.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    else:
        stock = getattr(models, name)(weights=None, num_classes=10, **kwargs)
    fused = fused_dropout.replace_dropout(_copy(stock))
    kinds = _swapped_kinds(fused)
    assert kinds, "nothing was swapped"
    leftover = [
        type(m).__name__
        for m in fused.modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth"
    ]
    assert leftover == []
    x = torch.randn(4, 3, size, size)
    stock.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), stock(x))
    if not train:
        return
    fused.train()
    optimizer = torch.optim.Adam(fused.parameters(), lr=1e-3)
    target = torch.tensor([1, 7, 3, 3])
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(fused(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def _copy(model):
    import copy

    return copy.deepcopy(model)
