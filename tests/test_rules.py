"""Every output rule against an independent reference: the rules of csrc/rules.h against
torch's own activations and derivatives on the CPU, every form bit for bit against the NumPy
mask and float64 math over a sweep of p, special values (NaN, infinities, signed zeros,
subnormals) through every form, and every vmap randomness mode for every op."""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import include_paths

import fused_dropout as fd

import reference
from helpers import ACTIVATIONS, TORCH_ACTIVATIONS, random_input, with_special_values

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261130
P_SWEEP = [0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99]


def assert_same_values(actual, expected):
    """Bit for bit, NaN equal to NaN, and the signs of zeros alike."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    assert torch.equal(actual[~nan], expected[~nan]), "values differ"
    zeros = expected == 0
    assert torch.equal(torch.signbit(actual[zeros]), torch.signbit(expected[zeros])), "signs of zeros differ"


def assert_close_with_specials(actual, expected, ulps, scale=None):
    """Within `ulps` units in the last place of `scale` (default: the expected value) where
    finite; NaN and infinities exactly where the reference has them."""
    assert actual.dtype == expected.dtype
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN positions differ"
    inf = torch.isinf(expected)
    assert torch.equal(actual[inf], expected[inf]), "infinities differ"
    finite = torch.isfinite(expected)
    scale = expected.abs() if scale is None else torch.nan_to_num(scale.abs(), nan=0.0) + expected.abs()
    tolerance = ulps * torch.finfo(expected.dtype).eps * scale[finite] + torch.finfo(expected.dtype).tiny
    assert ((actual[finite] - expected[finite]).abs() <= tolerance).all(), "values differ by more than the ulps"


# The rules of rules.h, on the CPU, against torch.


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    library = tmp_path_factory.mktemp("rules") / "rules_on_host.so"
    build = subprocess.run(
        [
            compiler,
            "-O1",
            "-std=c++20",
            "-shared",
            "-fPIC",
            f"-I{ROOT / 'csrc'}",
            *(f"-I{p}" for p in include_paths()),
            str(ROOT / "tests" / "rules_on_host.cpp"),
            "-o",
            str(library),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return ctypes.CDLL(str(library))


def _pointer(array):
    return array.ctypes.data_as(ctypes.c_void_p)


def rule_forward(rules, activation, x):
    array = np.ascontiguousarray(x.numpy())
    out = np.empty_like(array)
    fn = rules.activation_forward_f32 if array.dtype == np.float32 else rules.activation_forward_f64
    fn(ctypes.c_int(ACTIVATIONS.index(activation)), _pointer(array), _pointer(out), ctypes.c_int64(array.size))
    return torch.from_numpy(out)


def rule_backward(rules, activation, grad, x):
    g, a = np.ascontiguousarray(grad.numpy()), np.ascontiguousarray(x.numpy())
    out = np.empty_like(a)
    fn = rules.activation_backward_f32 if a.dtype == np.float32 else rules.activation_backward_f64
    fn(ctypes.c_int(ACTIVATIONS.index(activation)), _pointer(g), _pointer(a), _pointer(out), ctypes.c_int64(a.size))
    return torch.from_numpy(out)


def _grid(dtype):
    # Where the activations bend (around 0), their tails, and the special values.
    x = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64), random_input((999,), torch.float64) * 4])
    return with_special_values(x.to(dtype))


# The smooth activations are compared to a few ulps of the input's size, not the output's:
# gelu's 1 + erf(x / sqrt 2) cancels for negative x, so two erf implementations (libm's, Sleef's
# in torch's CPU kernels, CUDA's) that agree to an ulp give tails that differ relatively by
# far more. Huge and infinite inputs are left out for them: torch's CPU gelu overflows in an
# intermediate product at the dtype's largest values and gives NaN at inf, where the rule
# gives x. The ReLU forms are exact everywhere.
SMOOTH_ULPS = 16


def _compared(activation, x):
    if activation in ("relu", "squared_relu"):
        return torch.ones_like(x, dtype=torch.bool)
    return (x.abs() <= 1e4) | torch.isnan(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_rule_is_torchs_activation(rules, activation, dtype):
    x = _grid(dtype)
    expected = TORCH_ACTIVATIONS[activation](x)
    actual = rule_forward(rules, activation, x)
    if activation in ("relu", "squared_relu"):
        assert_same_values(actual, expected)
    else:
        keep = _compared(activation, x)
        assert_close_with_specials(actual[keep], expected[keep], SMOOTH_ULPS, scale=x[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_rules_derivative_is_torchs(rules, activation, dtype):
    x = _grid(dtype)
    grad = random_input(x.shape, dtype, seed=1)
    leaf = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(TORCH_ACTIVATIONS[activation](leaf), leaf, grad)[0]
    actual = rule_backward(rules, activation, grad, x)
    keep = _compared(activation, x)
    if activation == "relu":
        assert_same_values(actual, expected)
    else:
        # act'(x) * dy: an ulp of dy * (1 + |x|) bounds the derivative's rounding.
        scale = grad[keep].abs() * (1 + x[keep].abs())
        assert_close_with_specials(actual[keep], expected[keep], SMOOTH_ULPS, scale=scale)


# Every form, bit for bit against the reference, over a sweep of p.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_alpha_dropout_over_a_sweep_of_p(dtype):
    x = random_input((7, 37), dtype)
    for p in P_SWEEP:
        assert_same_values(fd.alpha_dropout(x, p, True, seed=SEED), reference.alpha_dropout(x, p, SEED))
        dims = (1,)
        assert_same_values(
            fd.alpha_dropout(x, p, True, seed=SEED, shared_dims=dims),
            reference.alpha_dropout(x, p, SEED, shared_dims=dims),
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_dropout_and_dropout_add_over_a_sweep_of_p(dtype):
    x = random_input((7, 37), dtype)
    r = random_input((7, 37), dtype, seed=1)
    b = random_input((37,), dtype, seed=2)
    for p in P_SWEEP:
        dropped = reference.dropout(x, p, SEED)
        assert_same_values(fd.dropout(x, p, seed=SEED), dropped)
        assert_same_values(fd.dropout_add(x, r, p, seed=SEED), r + dropped)
        assert_same_values(fd.dropout_add(x, r, p, bias=b, seed=SEED), r + reference.dropout(x + b, p, SEED))
        assert_same_values(fd.act_dropout(x, p, activation="relu", seed=SEED), reference.dropout(F.relu(x), p, SEED))


# Special values through every form.


@pytest.fixture
def special():
    return with_special_values(random_input((6, 40), torch.float32))


def test_special_values_through_dropout_and_dropout_add(special):
    assert_same_values(fd.dropout(special, 0.4, seed=SEED), reference.dropout(special, 0.4, SEED))
    residual = with_special_values(random_input((6, 40), torch.float32, seed=3).flip(1))
    assert_same_values(
        fd.dropout_add(special, residual, 0.4, seed=SEED), residual + reference.dropout(special, 0.4, SEED)
    )
    per_sample = fd.drop_path_add(special, residual, 0.5, seed=SEED)
    assert_same_values(per_sample, residual + reference.dropout(special, 0.5, SEED, shared_dims=(1,)))


def test_special_values_through_alpha_dropout(special):
    assert_same_values(fd.alpha_dropout(special, 0.4, True, seed=SEED), reference.alpha_dropout(special, 0.4, SEED))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_special_values_through_act_dropout(special, activation):
    out = fd.act_dropout(special, 0.4, activation=activation, seed=SEED)
    expected = reference.dropout(TORCH_ACTIVATIONS[activation](special), 0.4, SEED)
    if activation in ("relu", "squared_relu"):
        assert_same_values(out, expected)
    else:
        keep = _compared(activation, special)
        assert_close_with_specials(out[keep], expected[keep], SMOOTH_ULPS, scale=special[keep])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shared_dims", [(), (1,), (0,)], ids=str)
def test_special_values_through_act_dropouts_backward(special, activation, shared_dims):
    grad = random_input(special.shape, torch.float32, seed=4)
    state = torch.tensor([SEED, 0])
    out = fd.ops.act_dropout_backward(grad, special, None, state, 0.4, activation, shared_dims)
    # torch's composition: the gradient through the mask, then the activation's derivative.
    leaf = special.clone().requires_grad_(True)
    masked = reference.dropout(grad, 0.4, SEED, shared_dims=shared_dims)
    expected = torch.autograd.grad(TORCH_ACTIVATIONS[activation](leaf), leaf, masked)[0]
    # A dropped element's gradient is 0 * act'(input), which is NaN where act'(input) is not
    # finite (squared ReLU at inf, every smooth form at NaN): the kernel must read the input
    # of dropped elements too.
    if activation in ("relu", "squared_relu"):
        assert_same_values(out, expected)
    else:
        keep = _compared(activation, special)
        scale = masked[keep].abs() * (1 + special[keep].abs())
        assert_close_with_specials(out[keep], expected[keep], SMOOTH_ULPS, scale=scale)


# Every vmap randomness mode for every op.

# Each op on one (32, 8) sample: 32 decisions or more per sample for every op but the one
# shared over dim 0 (8), so that 16 samples under randomness="different" show 16 distinct
# masks (8 for that one). The test draws from a fixed seed, so it cannot fail by chance.
VMAP_OPS = {
    "dropout": (lambda t: fd.dropout(t, 0.5), 16),
    "dropout inplace": (lambda t: fd.dropout(t * 1.0, 0.5, inplace=True), 16),
    "dropout shared": (lambda t: fd.dropout(t, 0.5, shared_dims=(0,)), 8),
    "dropout2d": (lambda t: fd.dropout2d(t.reshape(4, 8, 8), 0.5).reshape(t.shape), 16),
    "alpha_dropout": (lambda t: fd.alpha_dropout(t, 0.5, True), 16),
    "feature_alpha_dropout": (lambda t: fd.feature_alpha_dropout(t.reshape(4, 8, 8), 0.5, True).reshape(t.shape), 16),
    "act_dropout": (lambda t: fd.act_dropout(t, 0.5, activation="relu"), 16),
    "act_dropout bias": (lambda t: fd.act_dropout(t, 0.5, activation="relu", bias=torch.ones(8)), 16),
    "dropout_add": (lambda t: fd.dropout_add(t, torch.zeros_like(t), 0.5), 16),
    "stochastic_depth": (lambda t: fd.stochastic_depth(t, 0.5, "row"), 16),
    "drop_path_add": (lambda t: fd.drop_path_add(t, torch.zeros_like(t), 0.5), 16),
}


def _kept(out):
    # Which elements survived: the inputs are positive, and alpha dropout's dropped value is
    # negative, so kept is "positive" for every op.
    return out > 0


@pytest.mark.parametrize("name", sorted(VMAP_OPS))
def test_every_op_in_every_vmap_randomness_mode(name):
    op, min_distinct = VMAP_OPS[name]
    torch.manual_seed(0)
    batch = torch.rand(16, 32, 8) + 0.5
    with pytest.raises(RuntimeError, match="randomness"):
        torch.vmap(op)(batch)
    same = _kept(torch.vmap(op, randomness="same")(batch))
    assert all(torch.equal(same[0], same[i]) for i in range(16)), "randomness='same' must share one mask"
    assert same[0].any() and not same[0].all()
    different = _kept(torch.vmap(op, randomness="different")(batch))
    distinct = {tuple(different[i].flatten().tolist()) for i in range(16)}
    assert len(distinct) >= min_distinct, "randomness='different' must give samples their own masks"


# drop_path_add against a reference that shares nothing with stochastic_depth.


@pytest.mark.parametrize("mode,mask_shape", [("row", (9, 1, 1)), ("batch", (1, 1, 1))])
def test_drop_path_add_drops_whole_samples_or_the_whole_batch(mode, mask_shape):
    x = random_input((9, 5, 3), torch.float64)
    residual = random_input((9, 5, 3), torch.float64, seed=1)
    keep = torch.from_numpy(reference.keep_mask(mask_shape, 0.5, SEED)).expand(x.shape)
    expected = residual + torch.where(keep, x * 2.0, torch.zeros(()).double())
    assert_same_values(fd.drop_path_add(x, residual, 0.5, mode=mode, seed=SEED), expected)
    assert_same_values(fd.stochastic_depth(x, 0.5, mode, seed=SEED), torch.where(keep, x * 2.0, 0.0).double())
    assert math.isfinite(expected.sum().item())
