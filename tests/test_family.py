"""The rest of the dropout family: activation + dropout and alpha dropout, their gradients,
their drop-in modules, and replace_dropout's activation fusion."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout

import reference
from helpers import ACTIVATIONS, DEVICES, DTYPES, TORCH_ACTIVATIONS, assert_bitwise_equal, random_input, saved_bytes

SEED = 4242


def expected_act_dropout(x, bias, p, activation, seed):
    """dropout(act(x + bias)) composed from torch's ops and the reference mask."""
    pre = x if bias is None else x + bias
    return reference.dropout(TORCH_ACTIVATIONS[activation](pre.cpu()), p, seed)


# Activation + dropout.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_act_dropout_matches_the_composition(device, dtype, activation, layout):
    x = random_input((3, 5, 4, 16), dtype, device) * 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bias = random_input((16,), dtype, device, seed=1)
    out = fused_dropout.act_dropout(x, 0.3, activation=activation, bias=bias, seed=SEED)
    expected = expected_act_dropout(x, bias, 0.3, activation, SEED)
    assert out.stride() == x.stride()
    keep = torch.from_numpy(reference.keep_mask(x.shape, 0.3, SEED))
    assert torch.equal(out.cpu()[~keep], torch.zeros_like(out.cpu()[~keep]))  # dropped: exactly +0
    assert not torch.signbit(out.cpu()[~keep]).any()
    if activation in ("relu", "squared_relu"):  # no transcendental function: the same bits as torch
        assert_bitwise_equal(out, expected)
    else:
        torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("activation,max_abs_error", [("gelu", 4e-6), ("gelu_tanh", 1e-6), ("silu", 4e-6)])
def test_act_dropout_error_bound_in_float32(activation, max_abs_error):
    # The stated bound: over a million float32 inputs spanning the activations' curved range,
    # kept values are within torch's default float32 tolerance of torch's activation times the
    # scale, with the measured largest absolute error below max_abs_error. (In gelu's far
    # negative tail both torch and this kernel lose relative accuracy to the cancellation in
    # 1 + erf, so the bound is absolute.) silu is within 2 ulp everywhere.
    x = torch.linspace(-12, 12, 2**20)
    out = fused_dropout.act_dropout(x, 0.5, activation=activation, seed=SEED)
    expected = expected_act_dropout(x, None, 0.5, activation, SEED)
    torch.testing.assert_close(out, expected)
    assert (out - expected).abs().max().item() < max_abs_error
    if activation == "silu":
        spacing = torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs()
        assert ((out - expected).abs() <= 2 * spacing).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_dropout_gradients(device, activation):
    x = random_input((6, 8), torch.float64, device).requires_grad_(True)
    b = random_input((8,), torch.float64, device, seed=1).requires_grad_(True)
    if activation in ("relu", "squared_relu"):  # keep gradcheck's steps away from the kink at 0
        x.data += torch.sign(x.data) * 0.1
    assert torch.autograd.gradcheck(
        lambda t, c: fused_dropout.act_dropout(t, 0.4, activation=activation, bias=c, seed=SEED),
        (x, b),
        check_forward_ad=True,
        check_batched_grad=True,
    )
    assert torch.autograd.gradgradcheck(
        lambda t, c: fused_dropout.act_dropout(t, 0.4, activation=activation, bias=c, seed=SEED), (x, b)
    )


def test_act_dropout_saves_the_input_and_the_state_only():
    x = random_input((64, 32), torch.float32).requires_grad_(True)
    b = random_input((32,), torch.float32, seed=1).requires_grad_(True)
    saved = saved_bytes(lambda t: fused_dropout.act_dropout(t, 0.5, activation="gelu", bias=b), x)
    assert saved == x.numel() * 4 + b.numel() * 4 + 16
    unfused = saved_bytes(lambda t: F.dropout(F.gelu(t + b), 0.5), x)
    assert unfused > saved


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_dropout_in_eval_is_torchs_activation(activation):
    x = random_input((5, 7), torch.bfloat16)
    b = random_input((7,), torch.bfloat16, seed=1)
    expected = TORCH_ACTIVATIONS[activation](x + b)
    assert torch.equal(fused_dropout.act_dropout(x, 0.5, False, activation=activation, bias=b), expected)
    assert torch.equal(fused_dropout.act_dropout(x, 0.0, activation=activation, bias=b), expected)


def test_act_dropout_bad_arguments():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'gelu', .*got 'tanh'"):
        fused_dropout.act_dropout(x, 0.5, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_dropout.act_dropout(x, 0.5, False, activation="tanh")
    for training in (True, False):
        with pytest.raises(RuntimeError, match=r"bias must be 1-D with the size of the input's last dim \(6\)"):
            fused_dropout.act_dropout(x, 0.5, training, bias=torch.randn(5))
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
        fused_dropout.act_dropout(x, 1.5)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_dropout.FusedActDropout("tanh")


def test_fused_act_dropout_module_in_eval_equals_the_pair():
    x = random_input((4, 10), torch.float32)
    for act, name in [
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.ReLU(), "relu"),
        (nn.SiLU(), "silu"),
    ]:
        module = fused_dropout.FusedActDropout(name, 0.2).eval()
        assert torch.equal(module(x), nn.Sequential(act, nn.Dropout(0.2)).eval()(x))
    assert repr(fused_dropout.FusedActDropout("gelu", 0.1)) == "FusedActDropout(activation='gelu', p=0.1)"


# Alpha dropout.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_alpha_dropout_matches_the_reference(device, dtype, p):
    x = random_input((7, 33), dtype, device)
    out = fused_dropout.alpha_dropout(x, p, True, seed=SEED)
    expected = reference.alpha_dropout(x, p, SEED)
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_alpha_dropout_shares_the_mask_per_channel(device):
    x = random_input((4, 6, 5, 5), torch.float32, device)
    out = fused_dropout.feature_alpha_dropout(x, 0.5, True, seed=SEED)
    assert_bitwise_equal(out, reference.alpha_dropout(x, 0.5, SEED, shared_dims=(2, 3)).to(device))
    with pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions"):
        fused_dropout.feature_alpha_dropout(torch.randn(5), 0.5, True)


def test_alpha_dropout_keeps_selu_mean_and_variance():
    # SELU outputs of normal inputs have mean 0 and variance 1; alpha dropout keeps both. Over
    # 2^22 elements the standard errors are about 5e-4 (mean) and 8e-4 (variance); bounds of
    # 6 standard errors give a false-failure rate below 1e-8. torch's own alpha dropout is
    # held to the same bounds, as a check of the check.
    x = F.selu(torch.randn(2**22, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for out in (fused_dropout.alpha_dropout(x, 0.3, True, seed=SEED), F.alpha_dropout(x, 0.3, True)):
        assert abs(out.mean().item()) < 6 * 5e-4
        assert abs(out.var().item() - 1) < 6 * 8e-4


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_dropout_gradient_is_a_on_kept_elements(device):
    x = random_input((50,), torch.float64, device).requires_grad_(True)
    fused_dropout.alpha_dropout(x, 0.2, True, seed=SEED).sum().backward()
    a = 1 / math.sqrt((reference.ALPHA**2 * 0.2 + 1) * 0.8)
    keep = torch.from_numpy(reference.keep_mask((50,), 0.2, SEED)).to(device)
    assert torch.allclose(x.grad, keep.double() * a)
    y = random_input((5, 6), torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: fused_dropout.alpha_dropout(t, 0.3, True, seed=SEED),
        (y,),
        check_forward_ad=True,
        check_batched_grad=True,
    )


def test_alpha_modules_are_drop_ins():
    for ours, theirs in [
        (fused_dropout.FusedAlphaDropout(0.3), nn.AlphaDropout(0.3)),
        (fused_dropout.FusedFeatureAlphaDropout(0.3, True), nn.FeatureAlphaDropout(0.3, True)),
    ]:
        assert repr(ours).replace("Fused", "") == repr(theirs)
        x = random_input((2, 3, 4), torch.float32)
        assert ours.eval()(x) is x
    with pytest.raises(ValueError):
        fused_dropout.FusedAlphaDropout(1.5)


def test_inplace_alpha_dropout():
    x = random_input((40,), torch.float32)
    expected = fused_dropout.alpha_dropout(x, 0.4, True, seed=SEED)
    y = x.clone()
    assert fused_dropout.alpha_dropout(y, 0.4, True, True, seed=SEED) is y
    assert torch.equal(y, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "shared"])
def test_act_dropout_backward_matches_torchs_autograd(device, dtype, activation, layout):
    # The one-pass backward against torch's autograd of the composition it replaces: the
    # reference mask times the scale times torch's activation of x + bias.
    shape, shared = (3, 5, 4, 16), [1] if layout == "shared" else []
    x = random_input(shape, dtype, device) * 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    b = random_input((16,), dtype, device, seed=1).requires_grad_(True)
    out = fused_dropout.ops.act_dropout(x, b, 0.3, activation, SEED, 0, None, shared)[0]
    grad = random_input(shape, dtype, device, seed=2)
    got = torch.autograd.grad(out, (x, b), grad)

    xc, bc = x.detach().cpu().requires_grad_(True), b.detach().cpu().requires_grad_(True)
    keep = torch.from_numpy(reference.keep_mask(reference.mask_shape(shape, shared), 0.3, SEED)).expand(shape)
    scale = torch.tensor(1 / 0.7, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)
    # dropout's rounding of the gradient (cast(grad * scale) where kept), then act' at x + b.
    masked = torch.where(keep, (grad.cpu().to(scale.dtype) * scale).to(dtype), torch.zeros((), dtype=dtype))
    want = torch.autograd.grad(TORCH_ACTIVATIONS[activation](xc + bc), (xc, bc), masked)
    assert got[0].stride() == x.stride()
    torch.testing.assert_close(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1])


def _ops_run_by(fn):
    """The fused_dropout ops that fn() dispatches to, by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fused_dropout":
                seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_dropout_backward_is_one_op_unless_differentiated(activation):
    x = random_input((8, 16), torch.float64).requires_grad_(True)
    b = random_input((16,), torch.float64, seed=1).requires_grad_(True)
    out = fused_dropout.act_dropout(x, 0.4, activation=activation, bias=b, seed=SEED)
    grad = random_input((8, 16), torch.float64, seed=2)
    ran = _ops_run_by(lambda: torch.autograd.grad(out, (x, b), grad, retain_graph=True))
    assert ran == ["act_dropout_backward"]
    # With create_graph the gradient must itself be differentiable: the composition of
    # differentiable ops runs, and gives the same values.
    one_pass = torch.autograd.grad(out, (x, b), grad, retain_graph=True)
    ran = _ops_run_by(lambda: torch.autograd.grad(out, (x, b), grad, create_graph=True))
    assert "act_dropout_backward" not in ran and "dropout_replay" in ran
    composed = torch.autograd.grad(out, (x, b), grad, create_graph=True)
    for a, c in zip(one_pass, composed):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_act_dropout_backward_of_a_sum(device, activation):
    # out.sum().backward() hands backward an expanded gradient (every stride 0).
    x = random_input((4, 6, 40), torch.float32, device).requires_grad_(True)
    b = random_input((40,), torch.float32, device, seed=1).requires_grad_(True)
    fused_dropout.act_dropout(x, 0.3, activation=activation, bias=b, seed=SEED).sum().backward()
    keep = torch.from_numpy(reference.keep_mask(x.shape, 0.3, SEED))
    xc, bc = x.detach().cpu().requires_grad_(True), b.detach().cpu().requires_grad_(True)
    (TORCH_ACTIVATIONS[activation](xc + bc) * keep * torch.tensor(1 / 0.7)).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xc.grad)
    torch.testing.assert_close(b.grad.cpu(), bc.grad)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_act_dropout_on_many_cpu_blocks_with_a_bias_that_requires_grad(activation):
    # Large enough that the CPU's activation blocks run on worker threads, where the ATen
    # steps inside the kernel must still run below autograd (the bias is a leaf here).
    x = random_input((512, 1024), torch.float32).requires_grad_(True)
    b = random_input((1024,), torch.float32, seed=1).requires_grad_(True)
    out = fused_dropout.act_dropout(x, 0.3, activation=activation, bias=b, seed=SEED)
    torch.testing.assert_close(out, expected_act_dropout(x.detach(), b.detach(), 0.3, activation, SEED))
    out.sum().backward()
    keep = torch.from_numpy(reference.keep_mask(x.shape, 0.3, SEED))
    xc, bc = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    (TORCH_ACTIVATIONS[activation](xc + bc) * keep * torch.tensor(1 / 0.7)).sum().backward()
    torch.testing.assert_close(x.grad, xc.grad)
    torch.testing.assert_close(b.grad, bc.grad)


def test_act_dropout_backward_with_batched_grads():
    x = random_input((6, 16), torch.float32).requires_grad_(True)
    b = random_input((16,), torch.float32, seed=1).requires_grad_(True)
    out = fused_dropout.act_dropout(x, 0.4, activation="gelu", bias=b, seed=SEED)
    grads = random_input((3, 6, 16), torch.float32, seed=2)
    batched = torch.autograd.grad(out, (x, b), grads, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        single = torch.autograd.grad(out, (x, b), grads[i], retain_graph=True)
        torch.testing.assert_close(batched[0][i], single[0])
        torch.testing.assert_close(batched[1][i], single[1])


def test_act_dropout_backward_bad_arguments():
    x = random_input((4, 8), torch.float32)
    state = torch.tensor([1, 0])
    backward = fused_dropout.ops.act_dropout_backward
    with pytest.raises(RuntimeError, match=r"grad must have the input's shape \[4, 8\], got \[4, 7\]"):
        backward(x[:, :7], x, None, state, 0.5, "gelu")
    with pytest.raises(RuntimeError, match="grad must have the input's dtype Float, got Double"):
        backward(x.double(), x, None, state, 0.5, "gelu")
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh'"):
        backward(x, x, None, state, 0.5, "tanh")
    with pytest.raises(RuntimeError, match=r"bias must be 1-D with the size of the input's last dim \(8\)"):
        backward(x, x, x[0, :3], state, 0.5, "gelu")
    with pytest.raises(RuntimeError, match="rng_state must be an int64 tensor of shape"):
        backward(x, x, None, state.int(), 0.5, "gelu")


# The torch machinery, for the new ops.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_the_family(device, requires_grad):
    x = random_input((3, 5, 8), torch.float32, device).requires_grad_(requires_grad)
    bias = random_input((8,), torch.float32, device, seed=1).requires_grad_(requires_grad)
    ops = torch.ops.fused_dropout
    torch.library.opcheck(ops.alpha_dropout.default, (x, 0.3, 5, 0, None, [2]))
    for activation in ACTIVATIONS:
        torch.library.opcheck(ops.act_dropout.default, (x, bias, 0.3, activation, 5, 0, None))
    rng_state = torch.tensor([7, 1], dtype=torch.int64, device=device)
    torch.library.opcheck(ops.dropout_replay.default, (x, rng_state, 0.3, [], 1.25))
    grad = random_input((3, 5, 8), torch.float32, device, seed=2)
    for activation in ACTIVATIONS:
        torch.library.opcheck(ops.act_dropout_backward.default, (grad, x, bias, rng_state, 0.3, activation, [1]))


def test_compile_and_vmap_the_family():
    x = random_input((4, 16), torch.float32)
    b = random_input((16,), torch.float32, seed=1)

    def f(t):
        return fused_dropout.alpha_dropout(fused_dropout.act_dropout(t, 0.2, bias=b, seed=1), 0.1, True, seed=2)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
    torch.manual_seed(0)
    same = torch.vmap(lambda t: fused_dropout.act_dropout(t, 0.5, activation="relu"), randomness="same")(x)
    torch.manual_seed(0)
    single = fused_dropout.act_dropout(torch.ones(16), 0.5, activation="relu")
    assert torch.equal(same != 0, (single != 0).expand(4, 16) & (x > 0))


# replace_dropout with activation fusion.


def test_replace_dropout_fuses_activation_dropout_pairs_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    stock = nn.Sequential(
        nn.Linear(8, 32),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(32, 32),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Linear(32, 8),
        nn.Dropout(0.1),
        nn.SELU(),
        nn.AlphaDropout(0.1),
    )
    keys = list(stock.state_dict().keys())
    fused = fused_dropout.replace_dropout(_copy(stock))
    kinds = [type(m).__name__ for m in fused]
    assert kinds == [
        "Linear",
        "FusedActDropout",
        "Identity",
        "Linear",
        "ReLU",  # its dropout goes with the Linear after it (test_dropout_linear.py)
        "Identity",
        "FusedDropoutLinear",
        "FusedDropout",
        "SELU",
        "FusedAlphaDropout",
    ]
    assert list(fused.state_dict().keys()) == keys
    fused.load_state_dict(stock.state_dict())
    x = random_input((3, 8), torch.float32)
    stock.eval(), fused.eval()
    assert torch.equal(fused(x), stock(x))
    unfused = fused_dropout.replace_dropout(_copy(stock), fuse_activations=False)  # one for one
    assert [type(m).__name__ for m in unfused][1:3] == ["GELU", "FusedDropout"]
    linears_only = fused_dropout.replace_dropout(_copy(stock), fuse_activations=False, fuse_linears=True)
    assert [type(m).__name__ for m in linears_only][1:4] == ["GELU", "Identity", "FusedDropoutLinear"]


def test_replace_dropout_fuses_torchvisions_mlp_block():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    block = torchvision.models.vision_transformer.MLPBlock(16, 64, 0.1)
    fused = fused_dropout.replace_dropout(_copy(block))
    assert [type(m).__name__ for m in fused] == ["Linear", "FusedActDropout", "Identity", "Linear", "FusedDropout"]
    x = random_input((2, 5, 16), torch.float32)
    assert torch.equal(fused.eval()(x), block.eval()(x))


def _copy(model):
    import copy

    return copy.deepcopy(model)
