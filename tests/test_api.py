"""The public surface: nn.Dropout compatibility, errors, registered ops, torch.compile."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import fused_dropout
from fused_dropout import FusedDropout, ops

from helpers import DEVICES, assert_bitwise_equal, random_input

P_MESSAGE = "dropout probability has to be between 0 and 1, but got {}"


@pytest.mark.parametrize("p", [-0.1, 1.5, math.inf])
def test_bad_p_raises_torch_message(p):
    x = torch.randn(4)
    expected = re.escape(P_MESSAGE.format(p))
    with pytest.raises(ValueError, match=expected):
        nn.functional.dropout(x, p)  # the message users know ...
    with pytest.raises(ValueError, match=expected):
        nn.Dropout(p)
    with pytest.raises(ValueError, match=expected):
        fused_dropout.dropout(x, p)  # ... is the one they get
    with pytest.raises(ValueError, match=expected):
        FusedDropout(p)
    with pytest.raises(ValueError, match=re.escape("dropout probability has to be between 0 and 1, but got")):
        torch.ops.fused_dropout.dropout(x, p)  # the op checks too


@pytest.mark.parametrize(
    "p,error", [("0.5", TypeError), (None, TypeError), (-1, ValueError), (2, ValueError), (math.nan, ValueError)]
)
def test_p_of_another_type_gets_the_full_check(p, error):
    # The common call (a float p in range) skips the slow checks; every other p is checked,
    # and refused with torch's error type (and words, for a value out of range).
    for call in (lambda x: fused_dropout.dropout(x, p), lambda x: fused_dropout.dropout_add(x, x, p)):
        with pytest.raises(error, match=re.escape(P_MESSAGE.format(p)) if error is ValueError else None):
            call(torch.randn(4))


@pytest.mark.parametrize("p", [0, 1, np.float32(0.25), np.float64(0.25)])
def test_p_of_another_number_type_works(p):
    x = random_input((64,), torch.float32, "cpu")
    expected = fused_dropout.dropout(x, float(p), seed=3)
    assert_bitwise_equal(fused_dropout.dropout(x, p, seed=3), expected)
    assert_bitwise_equal(fused_dropout.dropout_add(x, x, p, seed=3), fused_dropout.dropout_add(x, x, float(p), seed=3))


def test_nan_p_is_a_value_error():
    # torch lets NaN through nn.Dropout and fails later with a RuntimeError; here the
    # constructor and the function refuse it with the same ValueError as any other bad p.
    with pytest.raises(ValueError, match=re.escape(P_MESSAGE.format(math.nan))):
        FusedDropout(math.nan)
    with pytest.raises(ValueError, match=re.escape(P_MESSAGE.format(math.nan))):
        fused_dropout.dropout(torch.randn(4), math.nan)


@pytest.mark.parametrize(
    "dtype,name",
    [
        (torch.int64, "Long"),
        (torch.int32, "Int"),
        (torch.bool, "Bool"),
        (torch.complex64, "ComplexFloat"),
        (torch.uint8, "Byte"),
    ],
)
def test_unsupported_dtype_is_named(dtype, name):
    x = torch.ones(4, dtype=dtype)
    expected = f"input must be float32, float64, float16 or bfloat16, got {name}"
    with pytest.raises(RuntimeError, match="fused_dropout::dropout: " + expected):
        fused_dropout.dropout(x, 0.5)
    # In place, the message names the public function, not the op that draws the state.
    in_place = f"^dropout: input must be float32, float64, float16 or bfloat16, got {dtype}$"
    with pytest.raises(RuntimeError, match=in_place):
        fused_dropout.dropout(x, 0.5, inplace=True)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
        ({"seed": 2**64}, ValueError, r"seed must be in \[0, 2\*\*64\), got 18446744073709551616"),
        ({"seed": 1.5}, TypeError, r"seed must be an int, got float 1.5"),
        ({"seed": True}, TypeError, r"seed must be an int, got bool True"),
        ({"seed": 1, "offset": -3}, ValueError, r"offset must be in \[0, 2\*\*64\), got -3"),
        ({"offset": 3}, ValueError, r"offset is only used together with seed, but got offset=3 and seed=None"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "pass either seed or generator, not both"),
        ({"generator": 5}, TypeError, "generator must be a torch.Generator, got int"),
    ],
)
def test_bad_randomness_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_dropout.dropout(torch.randn(4), 0.5, **kwargs)


def test_input_must_be_a_tensor():
    with pytest.raises(TypeError, match="input must be a Tensor, got list"):
        fused_dropout.dropout([1.0, 2.0], 0.5)


def test_inplace_on_overlapping_memory_is_refused():
    x = torch.randn(1, 4).expand(3, 4)
    with pytest.raises(RuntimeError, match=r"in-place dropout needs an input whose elements do not share memory"):
        fused_dropout.dropout(x, 0.5, inplace=True)


def test_too_many_dims_is_refused():
    # torch itself stops at 64 dims; the op's own check names the limit too.
    with pytest.raises(RuntimeError, match="64"):
        fused_dropout.dropout(torch.randn([1] * 65), 0.5)


def test_bad_rng_state_is_refused():
    x = torch.randn(4)
    with pytest.raises(
        RuntimeError, match=r"rng_state must be an int64 tensor of shape \[2\] \(seed, base\), got Int of shape \[2\]"
    ):
        ops.dropout_replay(x, torch.zeros(2, dtype=torch.int32), 0.5)
    with pytest.raises(RuntimeError, match=r"got Long of shape \[3\]"):
        ops.dropout_replay(x, torch.zeros(3, dtype=torch.int64), 0.5)


@pytest.mark.cuda
def test_device_mismatches_are_refused():
    x = torch.randn(4, device="cuda")
    with pytest.raises(RuntimeError, match="rng_state must be on the input's device cuda:0, got cpu"):
        ops.dropout_replay(x, torch.zeros(2, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match="generator"):
        fused_dropout.dropout(x, 0.5, generator=torch.Generator("cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_identity_cases_return_the_input(device):
    x = random_input((10,), torch.float32, device)
    assert fused_dropout.dropout(x, 0.5, training=False) is x
    assert fused_dropout.dropout(x, 0.0) is x
    assert fused_dropout.dropout(x, 0.0, inplace=True) is x
    assert fused_dropout.dropout(x, 1.0, training=False, inplace=True) is x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)])
def test_empty_tensors(device, shape):
    x = torch.empty(shape, device=device, requires_grad=True)
    y = fused_dropout.dropout(x, 0.5)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_module_matches_nn_dropout_surface():
    for args, kwargs in [((), {}), ((0.2,), {}), ((0.7,), {"inplace": True})]:
        ours, theirs = FusedDropout(*args, **kwargs), nn.Dropout(*args, **kwargs)
        assert repr(ours) == repr(theirs).replace("Dropout", "FusedDropout")
        assert ours.state_dict() == theirs.state_dict() == {}
        assert (ours.p, ours.inplace) == (theirs.p, theirs.inplace)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))
    fused = nn.Sequential(nn.Linear(4, 4), FusedDropout(0.3))
    fused.load_state_dict(model.state_dict())  # checkpoints load across the swap


@pytest.mark.parametrize("device", DEVICES)
def test_module_train_and_eval(device):
    m = FusedDropout(0.5)
    x = random_input((1000,), torch.float32, device)
    y = m(x)
    assert (y == 0).any() and set(torch.unique(y[y != 0] / x[y != 0]).tolist()) == {2.0}
    m.eval()
    assert m(x) is x
    inplace = FusedDropout(0.5, inplace=True)
    z = x.clone()
    assert inplace(z) is z and (z == 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_every_op(device, requires_grad):
    x = random_input((3, 5, 4), torch.float32, device).requires_grad_(requires_grad)
    channels_last = random_input((2, 3, 4, 5), torch.float32, device).contiguous(memory_format=torch.channels_last)
    channels_last.requires_grad_(requires_grad)
    ops = torch.ops.fused_dropout
    for args in [(x, 0.3, 5, 2, None), (channels_last, 0.6, 1, 0, None), (x, 0.0, 3, 0, None), (x, 1.0, 3, 0, None)]:
        torch.library.opcheck(ops.dropout.default, args)
    rng_state = torch.tensor([7, 1], dtype=torch.int64, device=device)
    torch.library.opcheck(ops.dropout_replay.default, (x, rng_state, 0.3))
    target = random_input((3, 5, 4), torch.float32, device)
    torch.library.opcheck(ops.dropout_state.default, (target, 5, 0, None, [1]))
    torch.library.opcheck(ops.dropout_replay_.default, (target, rng_state, 0.3, [2]))
    residual = random_input((3, 5, 4), torch.float32, device, seed=3).requires_grad_(requires_grad)
    bias = random_input((4,), torch.float32, device, seed=4).requires_grad_(requires_grad)
    torch.library.opcheck(ops.dropout_add.default, (x, residual, bias, 0.3, 5, 0, None, [1]))
    counter = torch.randint(0, 2**32, (6, 4), dtype=torch.int64, device=device)
    key = torch.randint(0, 2**32, (6, 2), dtype=torch.int64, device=device)
    torch.library.opcheck(ops.philox4x32_10.default, (counter, key))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_the_default_generator(device):
    # Random calls: the schema, fake kernel and autograd registration checks, without the
    # ones that compare two random calls' outputs.
    x = random_input((6, 7), torch.float32, device).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.fused_dropout.dropout.default,
        (x, 0.5, None, 0, None),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), FusedDropout(0.5), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(8, 16)
    compiled = torch.compile(model, fullgraph=True, backend=backend)

    def run(m):
        torch.manual_seed(3)
        model.zero_grad()
        out = m(x)
        out.square().sum().backward()
        return out.detach(), model.fc1.weight.grad.clone()

    eager_out, eager_grad = run(model)
    compiled_out, compiled_grad = run(compiled)
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_grad, eager_grad)
    # Two calls are never merged into one: each draws its own mask.
    assert not torch.equal(compiled(x), compiled(x))


def test_compiled_graph_never_merges_two_calls():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="inductor")
    def twice(x):
        return fused_dropout.dropout(x, 0.5) - fused_dropout.dropout(x, 0.5)

    assert (twice(torch.ones(4096)) != 0).any()


def test_torch_compile_fullgraph_with_inplace_dropout():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), FusedDropout(0.5, inplace=True))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8)
    results = []
    for fn in (model, compiled):
        torch.manual_seed(1)
        model.zero_grad()
        out = fn(x)
        out.sum().backward()
        results.append((out.detach(), model[0].weight.grad.clone()))
    for eager, compiled_result in zip(*results):
        assert torch.equal(eager, compiled_result)
