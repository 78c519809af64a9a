"""The edges of the torch contract where a drop-in must not give a silently wrong result:
TorchScript, FX, meta and fake tensors, torch.func transforms, argument types, mixed
precision. Each test compares with torch's own behaviour or an independent reference."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout as fd

import reference
from helpers import DEVICES, assert_bitwise_equal, random_input, with_special_values

SEED = 4321


# TorchScript: every exported module scripts, to its own op, and computes what eager computes.

MODULES = [
    (lambda: fd.FusedDropout(0.4), (6, 8), "fused_dropout::dropout"),
    (lambda: fd.FusedDropout(0.4, inplace=True), (6, 8), "fused_dropout::dropout_replay_"),
    (lambda: fd.FusedDropout1d(0.4), (3, 4, 5), "fused_dropout::dropout"),
    (lambda: fd.FusedDropout2d(0.4), (3, 4, 5, 2), "fused_dropout::dropout"),
    (lambda: fd.FusedDropout3d(0.4), (3, 4, 5, 2, 2), "fused_dropout::dropout"),
    (lambda: fd.FusedAlphaDropout(0.4), (6, 8), "fused_dropout::alpha_dropout"),
    (lambda: fd.FusedAlphaDropout(0.4, inplace=True), (6, 8), "fused_dropout::alpha_dropout"),
    (lambda: fd.FusedFeatureAlphaDropout(0.4), (3, 4, 5, 2), "fused_dropout::alpha_dropout"),
    (lambda: fd.FusedActDropout("gelu", 0.4), (6, 8), "fused_dropout::act_dropout"),
    (lambda: fd.FusedActDropout("squared_relu", 0.4), (6, 8), "fused_dropout::act_dropout"),
    (lambda: fd.FusedStochasticDepth(0.4, "row"), (6, 8), "fused_dropout::dropout"),
    (lambda: fd.FusedStochasticDepth(0.4, "batch"), (6, 8), "fused_dropout::dropout"),
    (lambda: fd.FusedDropoutLinear(8, 3, p=0.4), (6, 8), "fused_dropout::dropout_linear"),
    (lambda: fd.FusedDropoutAddLayerNorm(8, p=0.4), (6, 8), "fused_dropout::dropout_add_norm"),
    (lambda: fd.FusedDropoutAddLayerNorm(8, p=0.4, prenorm=True), (6, 8), "fused_dropout::dropout_add_norm"),
    (lambda: fd.FusedDropoutAddRMSNorm(8, p=0.4), (6, 8), "fused_dropout::dropout_add_norm"),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("make,shape,op", MODULES, ids=[m[2].split("::")[1] + str(i) for i, m in enumerate(MODULES)])
@pytest.mark.parametrize("training", [True, False])
def test_every_module_scripts_to_its_own_op_and_matches_eager(make, shape, op, training):
    module = make().train(training)
    scripted = torch.jit.script(module)
    assert op in str(scripted.inlined_graph)
    x = random_input(shape, torch.float32)
    torch.manual_seed(0)
    eager = module(x.clone())
    torch.manual_seed(0)
    script = scripted(x.clone())
    for got, want in zip(script, eager) if isinstance(eager, tuple) else [(script, eager)]:
        assert_bitwise_equal(got, want)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_scripted_alpha_dropout_is_alpha_dropout():
    x = random_input((64, 32), torch.float32)
    out = torch.jit.script(fd.FusedAlphaDropout(0.5))(x)
    # Alpha dropout never writes a zero: dropped elements take a * alpha * (p - 1).
    assert not (out == 0).any()
    channels = torch.jit.script(fd.FusedFeatureAlphaDropout(0.5))(random_input((4, 16, 5, 3), torch.float32))
    dropped = channels == channels.flatten(2)[..., :1].unsqueeze(-1)
    # Whole channels are dropped together: each channel is all dropped or all kept.
    per_channel = dropped.flatten(2).all(-1) | (~dropped).flatten(2).any(-1)
    assert per_channel.all()
    constant = channels.flatten(2)
    assert ((constant.amax(-1) == constant.amin(-1)).sum() > 0).item()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_replace_dropout_keeps_a_scriptable_model_scriptable():
    torchvision = pytest.importorskip("torchvision")
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.GELU(),
        nn.Dropout(0.3),
        torchvision.ops.StochasticDepth(0.2, "row"),
        nn.AlphaDropout(0.1),
    )
    torch.jit.script(model)
    fd.replace_dropout(model)
    assert isinstance(model[1], fd.FusedActDropout) and isinstance(model[3], fd.FusedStochasticDepth)
    scripted = torch.jit.script(model)
    x = random_input((4, 8), torch.float32)
    torch.manual_seed(0)
    eager = model(x)
    torch.manual_seed(0)
    assert_bitwise_equal(scripted(x), eager)


# FX: every public function traces as one call node.

FUNCTIONS = [
    (lambda x: fd.dropout(x, 0.3), fd.dropout),
    (lambda x: fd.dropout1d(x, 0.3), fd.dropout1d),
    (lambda x: fd.dropout2d(x.unsqueeze(-1), 0.3), fd.dropout2d),
    (lambda x: fd.dropout3d(x.unsqueeze(-1).unsqueeze(-1), 0.3), fd.dropout3d),
    (lambda x: fd.alpha_dropout(x, 0.3, True), fd.alpha_dropout),
    (lambda x: fd.feature_alpha_dropout(x, 0.3, True), fd.feature_alpha_dropout),
    (lambda x: fd.act_dropout(x, 0.3, activation="silu"), fd.act_dropout),
    (lambda x: fd.dropout_add(x, x, 0.3), fd.dropout_add),
    (lambda x: fd.stochastic_depth(x, 0.3, "row"), fd.stochastic_depth),
    (lambda x: fd.drop_path_add(x, x, 0.3), fd.drop_path_add),
]


@pytest.mark.parametrize("call,function", FUNCTIONS, ids=[f[1].__name__ for f in FUNCTIONS])
def test_fx_traces_each_function_as_one_call(call, function):
    class Block(nn.Module):
        def forward(self, x):
            return call(x)

    traced = torch.fx.symbolic_trace(Block())
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert function in targets
    x = random_input((3, 4, 5), torch.float32)
    torch.manual_seed(0)
    expected = call(x)
    torch.manual_seed(0)
    assert_bitwise_equal(traced(x), expected)


@pytest.mark.parametrize("make,shape,op", MODULES[:-2], ids=[m[2] + str(i) for i, m in enumerate(MODULES[:-2])])
def test_fx_traces_each_module(make, shape, op):
    module = make()
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Identity(), module))
    assert sum(n.op == "call_module" or n.op == "call_function" for n in traced.graph.nodes) >= 1
    x = random_input(shape, torch.float32)
    torch.manual_seed(0)
    expected = module(x.clone())
    torch.manual_seed(0)
    assert_bitwise_equal(traced(x.clone()), expected)


# Meta tensors beside real ones are refused, never read.


META_CALLS = {
    "act_dropout bias": lambda x, m: fd.act_dropout(x, 0.5, bias=m(6)),
    "act_dropout bias eval": lambda x, m: fd.act_dropout(x, 0.5, False, bias=m(6)),
    "dropout_add residual": lambda x, m: fd.dropout_add(x, m(4, 6), 0.5),
    "dropout_add bias": lambda x, m: fd.dropout_add(x, x, 0.5, bias=m(6)),
    "drop_path_add residual": lambda x, m: fd.drop_path_add(x, m(4, 6), 0.5),
    "dropout_replay rng_state": lambda x, m: fd.ops.dropout_replay(x, m(2, dtype=torch.int64), 0.5),
    "act_dropout_backward rng_state": lambda x, m: fd.ops.act_dropout_backward(
        x, x, None, m(2, dtype=torch.int64), 0.5, "relu"
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(META_CALLS))
def test_a_meta_tensor_beside_a_real_input_is_refused(device, name):
    x = random_input((4, 6), torch.float32, device)

    def meta(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device="meta")

    with pytest.raises(RuntimeError, match="meta"):
        META_CALLS[name](x, meta)


def test_all_meta_inputs_give_meta_outputs():
    x = torch.empty(4, 6, device="meta").t()
    y = fd.dropout(x, 0.5)
    assert y.device.type == "meta" and y.shape == x.shape and y.stride() == x.stride()
    assert fd.dropout_add(x, x.to(torch.float64), 0.5).dtype == torch.float64
    assert fd.act_dropout(x, 0.5, bias=torch.empty(4, device="meta")).shape == x.shape


# Fake tensors and compiled programs are refused with eager's message.

BAD_CALLS = {
    "int64 input": (lambda x: fd.dropout(x.long(), 0.5), "input must be float32, float64, float16 or bfloat16"),
    "residual shape": (lambda x: fd.dropout_add(x, x[:2], 0.5), "residual must have the input's shape"),
    "residual dtype": (lambda x: fd.dropout_add(x, x.long(), 0.5), "residual must be float32"),
    "bias length": (lambda x: fd.dropout_add(x, x, 0.5, bias=x[0, :3]), "bias must be 1-D"),
    "act bias length": (lambda x: fd.act_dropout(x, 0.5, bias=x[0, :3]), "bias must be 1-D"),
    "act bias dtype": (lambda x: fd.act_dropout(x, 0.5, bias=x[0].double()), "bias must have the input's dtype"),
    "activation": (lambda x: fd.act_dropout(x, 0.5, activation="tanh"), "activation must be one of"),
    "shared dim": (lambda x: fd.dropout(x, 0.5, shared_dims=(5,)), "shared_dims must name dims"),
    "alpha shared dim": (lambda x: fd.alpha_dropout(x, 0.5, True, shared_dims=(-3,)), "shared_dims must name dims"),
    "replay state": (lambda x: fd.ops.dropout_replay(x, x[:, :2].long(), 0.5), "rng_state must be an int64"),
}


def _eager_message(call):
    with pytest.raises(Exception) as eager:
        call(random_input((4, 6), torch.float32))
    return eager


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_fake_tensors_are_refused_with_eagers_message(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, message = BAD_CALLS[name]
    eager = _eager_message(call)
    assert message in str(eager.value)
    with FakeTensorMode():
        with pytest.raises(type(eager.value)) as fake:
            call(torch.empty(4, 6))
    assert str(fake.value).splitlines()[0] == str(eager.value).splitlines()[0]


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_meta_tensors_are_refused_with_eagers_message(name):
    call, message = BAD_CALLS[name]
    eager = _eager_message(call)
    with pytest.raises(type(eager.value)) as meta:
        call(torch.empty(4, 6, device="meta"))
    assert str(meta.value).splitlines()[0] == str(eager.value).splitlines()[0]


@pytest.mark.parametrize("name", ["residual shape", "act bias dtype", "activation", "shared dim"])
def test_a_compiled_program_fails_at_trace_time_with_eagers_message(name):
    call, message = BAD_CALLS[name]
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager", dynamic=True)
    with pytest.raises(Exception, match=message):
        compiled(random_input((4, 6), torch.float32))


def test_compile_with_dynamic_shapes_runs_the_checks_symbolically():
    torch._dynamo.reset()

    def f(x, r, b):
        return fd.dropout_add(x, r, 0.5, bias=b, seed=SEED)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (3, 5, 8):
        x, r, b = random_input((rows, 6)), random_input((rows, 6), seed=1), random_input((6,), seed=2)
        assert_bitwise_equal(compiled(x, r, b), f(x, r, b))


# torch.func: Jacobians and Hessians of act_dropout.


@pytest.mark.parametrize("activation", ["gelu", "silu", "squared_relu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_jacobians_and_hessians_of_act_dropout(activation, with_bias):
    x = random_input((3, 5), torch.float64)
    bias = random_input((5,), torch.float64, seed=3) if with_bias else None

    def ours(t):
        return fd.act_dropout(t, 0.4, activation=activation, bias=bias, seed=7)

    mask = reference.keep_mask((3, 5), 0.4, 7).astype(np.float64)
    keep = torch.from_numpy(mask) / 0.6
    act = {
        "gelu": F.gelu,
        "silu": F.silu,
        "squared_relu": lambda t: F.relu(t) ** 2,
    }[activation]

    def composed(t):
        return act(t if bias is None else t + bias) * keep

    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(ours)(x), transform(composed)(x))
    torch.testing.assert_close(
        torch.func.hessian(lambda t: ours(t).sum())(x), torch.func.hessian(lambda t: composed(t).sum())(x)
    )
    cotangents = random_input((4, 3, 5), torch.float64, seed=5)
    _, vjp = torch.func.vjp(ours, x)
    _, vjp_ref = torch.func.vjp(composed, x)
    torch.testing.assert_close(torch.func.vmap(vjp)(cotangents), torch.func.vmap(vjp_ref)(cotangents))


# Arguments as users type them.


@pytest.mark.parametrize("shared", [0, -1, np.int64(0), torch.tensor(1)])
def test_an_int_shared_dim_is_one_dim_on_every_path(shared):
    x = random_input((6, 8), torch.float32)
    dim = int(shared)
    expected = reference.dropout(x, 0.5, SEED, shared_dims=(dim,))
    assert_bitwise_equal(fd.dropout(x, 0.5, seed=SEED, shared_dims=shared), expected)
    assert_bitwise_equal(fd.ops.dropout(x, 0.5, SEED, 0, None, shared)[0], expected)
    torch.manual_seed(0)
    unseeded = fd.dropout(x, 0.5, shared_dims=shared)
    torch.manual_seed(0)
    assert_bitwise_equal(unseeded, fd.dropout(x, 0.5, shared_dims=(dim,)))
    assert torch.equal(fd.keep_mask((6, 8), 0.5, seed=SEED, shared_dims=shared), expected != 0)
    alpha = fd.alpha_dropout(x, 0.5, True, seed=SEED, shared_dims=shared)
    assert_bitwise_equal(alpha, reference.alpha_dropout(x, 0.5, SEED, shared_dims=(dim,)))


@pytest.mark.parametrize("seed", [np.int64(3), np.uint64(2**63 + 5), torch.tensor(11)])
def test_seeds_are_taken_as_operator_index_takes_them(seed):
    x = random_input((4, 9), torch.float32)
    expected = reference.dropout(x, 0.3, int(seed), base=int(np.int64(2)))
    assert_bitwise_equal(fd.dropout(x, 0.3, seed=seed, offset=np.int64(2)), expected)
    assert_bitwise_equal(fd.act_dropout(x, 0.3, activation="relu", seed=seed, offset=2), F.relu(expected))


def test_a_seed_out_of_range_names_the_function():
    with pytest.raises(ValueError, match=r"^act_dropout: seed must be in \[0, 2\*\*64\), got -1$"):
        fd.act_dropout(torch.ones(3), 0.5, seed=-1)
    with pytest.raises(TypeError, match="^stochastic_depth: seed must be an int, got str 'a'$"):
        fd.stochastic_depth(torch.ones(3), 0.5, "row", seed="a")


NOT_TENSORS = {
    "stochastic_depth": (lambda: fd.stochastic_depth([1.0, 2.0], 0.5, "row"), "stochastic_depth: input"),
    "drop_path_add input": (lambda: fd.drop_path_add([1.0], torch.ones(1), 0.5), "drop_path_add: input"),
    "drop_path_add residual": (lambda: fd.drop_path_add(torch.ones(1), [1.0], 0.5), "drop_path_add: residual"),
    "drop_path_add scale": (lambda: fd.drop_path_add(torch.ones(2), torch.ones(2), 0.5, scale=[1.0]), "scale"),
    "feature_alpha_dropout": (lambda: fd.feature_alpha_dropout([[1.0]], 0.5, True), "feature_alpha_dropout: input"),
    "act_dropout bias eval": (lambda: fd.act_dropout(torch.ones(2), 0.5, False, bias=[1.0, 2.0]), "bias"),
    "act_dropout bias": (lambda: fd.act_dropout(torch.ones(2), 0.5, bias=[1.0, 2.0]), "act_dropout: bias"),
    "dropout2d": (lambda: fd.dropout2d([[1.0]], 0.5), "dropout2d: input"),
    "dropout_add": (lambda: fd.dropout_add(torch.ones(2), (1.0, 2.0), 0.5), "dropout_add: residual"),
}


@pytest.mark.parametrize("name", sorted(NOT_TENSORS))
def test_a_non_tensor_argument_is_a_type_error_naming_it(name):
    call, words = NOT_TENSORS[name]
    with pytest.raises(TypeError, match=words):
        call()


def test_drop_path_add_scale_that_does_not_broadcast_is_named():
    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match=r"drop_path_add: scale of shape \[4\] must broadcast"):
        fd.drop_path_add(x, x, 0.5, scale=torch.ones(4))


@pytest.mark.parametrize("training,p", [(True, 0.5), (False, 0.5), (True, 0.0)])
def test_act_dropout_checks_its_bias_dtype_in_every_mode(training, p):
    x = random_input((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match="act_dropout: bias must have the input's dtype Float, got Double"):
        fd.act_dropout(x, p, training, bias=torch.ones(4, dtype=torch.float64))


def test_in_place_dropout_of_an_int_tensor_names_dropout():
    with pytest.raises(RuntimeError, match="^dropout: input must be"):
        fd.dropout(torch.ones(4, dtype=torch.int32), 0.5, inplace=True)


# Backward with a bias and an empty last dim: empty gradients, as torch's composition gives.


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (2, 0, 0)])
def test_backward_with_a_bias_and_empty_tensors(shape):
    x = torch.zeros(shape, requires_grad=True)
    bias = torch.zeros(shape[-1], requires_grad=True)
    for out in (
        fd.act_dropout(x, 0.5, bias=bias),
        fd.dropout_add(x, x.detach(), 0.5, bias=bias),
    ):
        gx, gb = torch.autograd.grad(out.sum(), (x, bias))
        assert gx.shape == x.shape and gb.shape == bias.shape
        assert not gb.any()


# Mixed precision: a float32 residual stream beside a bfloat16 or float16 branch.

MIXED = [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_dtype,residual_dtype", MIXED, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dropout_add_with_a_residual_of_another_dtype_is_torchs_composition(
    device, input_dtype, residual_dtype, with_bias
):
    x = random_input((5, 7), input_dtype, device).requires_grad_(True)
    residual = random_input((5, 7), residual_dtype, device, seed=1).requires_grad_(True)
    bias = random_input((7,), input_dtype, device, seed=2).requires_grad_(True) if with_bias else None
    out = fd.dropout_add(x, residual, 0.4, bias=bias, seed=SEED)

    # torch's composition: dropout in the input's dtype, the sum in the promoted one.
    xr, rr = x.detach().clone().requires_grad_(True), residual.detach().clone().requires_grad_(True)
    br = bias.detach().clone().requires_grad_(True) if with_bias else None
    pre = xr if br is None else xr + br
    keep = torch.from_numpy(reference.keep_mask((5, 7), 0.4, SEED)).to(device)
    dropped = torch.where(keep, pre * (1 / 0.6), torch.zeros((), dtype=input_dtype, device=device))
    dropped = fd.dropout(pre, 0.4, seed=SEED)
    expected = rr + dropped
    assert out.dtype == torch.promote_types(input_dtype, residual_dtype)
    assert_bitwise_equal(out, expected)

    grad = random_input((5, 7), out.dtype, device, seed=3)
    got = torch.autograd.grad(out, [t for t in (x, residual, bias) if t is not None], grad)
    want = torch.autograd.grad(expected, [t for t in (xr, rr, br) if t is not None], grad)
    for g, w in zip(got[:2], want[:2]):
        assert_bitwise_equal(g, w)
    if with_bias:
        torch.testing.assert_close(got[2], want[2])
    # The float64 reference: the mask's scale on every kept element.
    assert torch.equal(dropped != 0, keep & (pre != 0))


@pytest.mark.parametrize("input_dtype,residual_dtype", MIXED, ids=str)
@pytest.mark.parametrize("shape", [(3, 100_003), (257, 1031)], ids=str)
def test_a_residual_of_another_dtype_in_one_pass_across_batches_and_threads(input_dtype, residual_dtype, shape):
    # Long rows, odd widths and a bias: every batch of words, row segment and thread's range of
    # the CPU's one-pass kernel, against the composition (and a strided residual, which takes it).
    x = random_input(shape, input_dtype)
    residual = random_input(shape, residual_dtype, seed=1)
    bias = random_input(shape[-1:], input_dtype, seed=2)
    for b in (None, bias):
        expected = residual + fd.dropout(x if b is None else x + b, 0.3, seed=SEED, offset=3)
        assert_bitwise_equal(fd.dropout_add(x, residual, 0.3, bias=b, seed=SEED, offset=3), expected)
    strided = random_input(shape[::-1], residual_dtype, seed=1).t()
    expected = strided + fd.dropout(x, 0.3, seed=SEED, offset=3)
    assert_bitwise_equal(fd.dropout_add(x, strided, 0.3, seed=SEED, offset=3), expected)


def test_autocast_residual_stream_in_float32():
    lin = nn.Linear(8, 8)
    x = random_input((4, 8), torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        branch = lin(x)
        out = fd.dropout_add(branch, x, 0.1, seed=SEED)
        expected = x + fd.dropout(branch, 0.1, seed=SEED)
        path = fd.drop_path_add(branch, x, 0.5, seed=SEED)
        path_expected = x + fd.stochastic_depth(branch, 0.5, "row", seed=SEED)
    assert branch.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(path, path_expected)


def test_opcheck_of_a_residual_of_another_dtype():
    x = random_input((4, 6), torch.bfloat16).requires_grad_(True)
    residual = random_input((4, 6), torch.float32, seed=1).requires_grad_(True)
    bias = random_input((6,), torch.bfloat16, seed=2)
    for args in ((x, residual, None, 0.3, SEED), (x, residual, bias, 0.3, SEED), (x.detach(), residual, None, 0.3)):
        torch.library.opcheck(torch.ops.fused_dropout.dropout_add.default, args)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_of_a_residual_of_another_dtype(with_bias):
    x = random_input((3, 4), torch.float32).requires_grad_(True)
    residual = random_input((3, 4), torch.float64, seed=1).requires_grad_(True)
    bias = random_input((4,), torch.float32, seed=2) if with_bias else None

    def f(t, r):
        return fd.dropout_add(t, r, 0.4, bias=bias, seed=SEED)

    # float32 input: only the residual's gradient is checked numerically; the input's is
    # the mask times the scale, checked against the composition above.
    assert torch.autograd.gradcheck(lambda r: f(x.detach(), r), (residual,), check_forward_ad=True)
    gx = torch.autograd.grad(f(x, residual).sum(), x)[0]
    keep = torch.from_numpy(reference.keep_mask((3, 4), 0.4, SEED))
    assert torch.equal(gx, torch.where(keep, torch.tensor(1 / 0.6, dtype=torch.float32), 0.0))
    assert math.isfinite(gx.sum().item())


# The backward of a residual of another dtype: dropout_replay converts the gradient to the
# input's dtype in the same pass (dtype=), which equals the conversion then the replay.

REPLAY_DTYPES = [
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.float32),
    (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_dtype,dtype", REPLAY_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "shared_dims", "long"])
def test_replay_into_another_dtype_is_the_conversion_then_the_replay(device, input_dtype, dtype, layout):
    shape = (3, 100_003) if layout == "long" else (6, 35)
    x = with_special_values(random_input(shape, input_dtype, device))
    dims = [0] if layout == "shared_dims" else []
    if layout == "transposed":
        x = random_input(shape[::-1], input_dtype, device).t()
    state = torch.tensor([SEED, 7], device=device)
    for scale in (None, 1.75):
        got = fd.ops.dropout_replay(x, state, 0.3, dims, scale, dtype=dtype)
        expected = fd.ops.dropout_replay(x.to(dtype), state, 0.3, dims, scale)
        assert got.dtype == dtype and got.stride() == expected.stride()
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got), nan)
        assert_bitwise_equal(got[~nan], expected[~nan])


@pytest.mark.parametrize("input_dtype,residual_dtype", MIXED, ids=str)
def test_backward_of_a_residual_of_another_dtype_is_one_replay(input_dtype, residual_dtype):
    # The input's gradient is one dropout_replay from the output's dtype to the input's: the
    # wider gradient is read once, with no conversion op before it. (A residual that needs a
    # gradient gets grad_output, converted to its dtype by the autograd engine, as torch's
    # composition does.)
    shape = (257, 1031)
    x = random_input(shape, input_dtype).requires_grad_(True)
    residual = random_input(shape, residual_dtype, seed=1)
    out = fd.dropout_add(x, residual, 0.3, seed=SEED, offset=3)
    grad = random_input(shape, out.dtype, seed=2)
    ran = _aten_and_fused_ops_run_by(lambda: torch.autograd.grad(out, x, grad, retain_graph=True))
    assert ran == ["fused_dropout.dropout_replay"]
    (gx,) = torch.autograd.grad(out, x, grad)
    assert gx.dtype == input_dtype
    assert_bitwise_equal(gx, fd.ops.dropout_replay(grad.to(input_dtype), torch.tensor([SEED, 3]), 0.3))


def _aten_and_fused_ops_run_by(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("aten", "fused_dropout") and func.namespace + "." + func.__name__ not in _VIEWS:
                seen.append(f"{func.namespace}.{func.__name__.split('.')[0]}")
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


_VIEWS = {"aten.detach.default", "aten.alias.default"}


@pytest.mark.cuda
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "misaligned"])
def test_a_float32_residual_stream_gives_the_same_bits_on_cpu_and_cuda(input_dtype, layout):
    # The CUDA one-pass launches (a float32 residual and output beside a 2-byte input; the
    # float32 gradient replayed into the input's dtype) against the CPU's, forward and backward.
    def operand(dtype, seed, device):
        if layout == "transposed":
            return random_input((70, 33), dtype, seed=seed).to(device).t()
        if layout == "misaligned":  # one element past an aligned start, on the device itself
            return random_input((33 * 70 + 1,), dtype, seed=seed).to(device)[1:].view(33, 70)
        return random_input((33, 70), dtype, seed=seed).to(device)

    outputs = {}
    for device in ("cpu", "cuda"):
        x, residual, grad = (operand(t, k, device) for k, t in enumerate((input_dtype, torch.float32, torch.float32)))
        bias = random_input((70,), input_dtype, seed=3).to(device)
        out = fd.dropout_add(x, residual, 0.3, bias=bias, seed=SEED, offset=5)
        state = torch.tensor([SEED, 5], device=device)
        outputs[device] = (out.cpu(), fd.ops.dropout_replay(grad, state, 0.3, dtype=input_dtype).cpu())
    for cpu, cuda in zip(outputs["cpu"], outputs["cuda"]):
        assert_bitwise_equal(cuda, cpu)


@pytest.mark.parametrize("input_dtype,dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_autograd_of_a_replay_into_another_dtype(input_dtype, dtype):
    # The conversion then the replay: its gradient is the replay then the conversion back,
    # its tangent the conversion then the replay, bit for bit, in both directions of width.
    state = torch.tensor([SEED, 5])
    x = random_input((7, 9), input_dtype).requires_grad_(True)
    out = fd.ops.dropout_replay(x, state, 0.4, dtype=dtype)
    xr = x.detach().clone().requires_grad_(True)
    expected = fd.ops.dropout_replay(xr.to(dtype), state, 0.4)
    assert_bitwise_equal(out, expected)
    grad = random_input((7, 9), dtype, seed=1)
    assert_bitwise_equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, xr, grad)[0])
    tangent = random_input((7, 9), input_dtype, seed=2)
    _, jvp = torch.func.jvp(lambda t: fd.ops.dropout_replay(t, state, 0.4, dtype=dtype), (x.detach(),), (tangent,))
    _, jvp_expected = torch.func.jvp(
        lambda t: fd.ops.dropout_replay(t.to(dtype), state, 0.4), (x.detach(),), (tangent,)
    )
    assert_bitwise_equal(jvp, jvp_expected)


def test_gradcheck_of_a_replay_with_a_dtype():
    # float64 both ways: gradcheck and gradgradcheck, with forward AD and batched grads.
    state = torch.tensor([SEED, 5])
    x = random_input((4, 5), torch.float64).requires_grad_(True)

    def f(t):
        return fd.ops.dropout_replay(t, state, 0.4, dtype=torch.float64)

    assert torch.autograd.gradcheck(f, (x,), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x,))


def test_opcheck_and_vmap_of_a_replay_into_another_dtype():
    x = random_input((4, 6), torch.float32).requires_grad_(True)
    state = torch.tensor([SEED, 2])
    for args in ((x, state, 0.3, [], None, torch.bfloat16), (x, state, 0.3, [1], 2.0, torch.float16)):
        torch.library.opcheck(torch.ops.fused_dropout.dropout_replay.default, args)
    batch = random_input((3, 4, 6), torch.float32)
    per_sample = torch.func.vmap(lambda t: fd.ops.dropout_replay(t, state, 0.3, dtype=torch.bfloat16))(batch)
    for i in range(3):
        assert_bitwise_equal(per_sample[i], fd.ops.dropout_replay(batch[i], state, 0.3, dtype=torch.bfloat16))


def test_a_replay_into_a_dtype_that_is_not_floating_is_refused():
    x = random_input((4, 6), torch.float32)
    for device in ("cpu", "meta"):
        with pytest.raises(RuntimeError, match="dtype must be float32, float64, float16 or bfloat16, got Int"):
            fd.ops.dropout_replay(x.to(device), torch.tensor([1, 2], device=device), 0.3, dtype=torch.int32)


# replace_dropout changes nothing a model computes.


class UsesTheActivationTwice(nn.Sequential):
    def forward(self, x):
        h = self[0](x)
        return self[1](h) + h


class OrderedSubclass(nn.Sequential):
    """A Sequential subclass that keeps nn.Sequential's forward: safe to fuse."""


def test_a_sequential_with_its_own_forward_is_not_fused():
    model = UsesTheActivationTwice(nn.ReLU(), nn.Dropout(0.5))
    fd.replace_dropout(model)
    assert type(model[0]) is nn.ReLU and type(model[1]) is fd.FusedDropout
    x = random_input((8, 16), torch.float32)
    torch.manual_seed(0)
    out = model(x)
    torch.manual_seed(0)
    assert_bitwise_equal(out, fd.dropout(F.relu(x), 0.5) + F.relu(x))


def test_a_sequential_subclass_with_sequentials_forward_is_fused():
    model = OrderedSubclass(nn.GELU(), nn.Dropout(0.5))
    fd.replace_dropout(model)
    assert type(model[0]) is fd.FusedActDropout and type(model[1]) is nn.Identity


@pytest.mark.parametrize("dropout", [nn.Dropout2d(0.5), nn.AlphaDropout(0.5), nn.Dropout1d(0.5)], ids=str)
def test_activation_fusion_takes_plain_dropout_only(dropout):
    model = nn.Sequential(nn.ReLU(), dropout)
    fd.replace_dropout(model)
    assert type(model[0]) is nn.ReLU and type(model[1]) is not nn.Identity


def test_hooks_on_a_replaced_module_keep_running():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    seen = []
    handles = [
        model[1].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__))),
        model[1].register_forward_hook(lambda m, args, out: seen.append(("post", type(m).__name__))),
    ]
    fd.replace_dropout(model)
    model(random_input((2, 4), torch.float32))
    assert seen == [("pre", "FusedDropout"), ("post", "FusedDropout")]
    for handle in handles:
        handle.remove()
    seen.clear()
    model(random_input((2, 4), torch.float32))
    assert seen == []


def test_a_hooked_pair_is_not_fused_and_its_hooks_see_what_they_saw():
    model = nn.Sequential(nn.GELU(), nn.Dropout(0.5))
    activations = []
    model[0].register_forward_hook(lambda m, args, out: activations.append(out))
    fd.replace_dropout(model)
    assert type(model[0]) is nn.GELU and type(model[1]) is fd.FusedDropout
    x = random_input((3, 5), torch.float32)
    model(x)
    assert_bitwise_equal(activations[0], F.gelu(x))
