"""The autograd and tensor-subsystem contract: in-place version counters and leaf rules,
forward-mode AD, vmap randomness, torch's math-bit views, argument rules in every mode,
TorchScript and rank. Each behaves as torch's own dropout does."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout

import reference
from helpers import DEVICES, assert_bitwise_equal, random_input

SEED = 1234


def expected_dropout(x, p, seed, shared_dims=()):
    return reference.dropout(x, p, seed, shared_dims=shared_dims).to(x.device)


# 1. In place: the version counter, the leaf rules, inference tensors; all before any write.


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_bumps_the_version_so_a_saved_tensor_is_caught(device):
    a = torch.ones(4, device=device, requires_grad=True)
    b = torch.full((4,), 2.0, device=device)
    y = a * b  # saves b
    version = b._version
    fused_dropout.dropout(b, 0.5, inplace=True)
    assert b._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", [False, True])
def test_inplace_on_a_leaf_that_requires_grad_raises_before_writing(device, view):
    w = random_input((8,), torch.float32, device).requires_grad_(True)
    before = w.detach().clone()
    message = "a view of a leaf Variable" if view else "a leaf Variable that requires grad"
    with pytest.raises(RuntimeError, match=message):
        fused_dropout.dropout(w[:4] if view else w, 0.5, inplace=True)
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_an_inference_tensor_raises_before_writing(device):
    with torch.inference_mode():
        t = random_input((16,), torch.float32, device)
    before = t.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        fused_dropout.dropout(t, 0.5, inplace=True)
    assert torch.equal(t, before)
    with torch.inference_mode():  # inside inference mode it is allowed, as for torch
        fused_dropout.dropout(t, 0.5, inplace=True, seed=SEED)
    assert_bitwise_equal(t, expected_dropout(before, 0.5, SEED))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_under_no_grad_on_a_leaf_is_allowed_as_in_torch(device):
    w = random_input((64,), torch.float32, device).requires_grad_(True)
    before = w.detach().clone()
    with torch.no_grad():
        fused_dropout.dropout(w, 0.5, inplace=True, seed=SEED)
        F.dropout(w.clone(), 0.5, inplace=True)  # torch allows it too
    assert_bitwise_equal(w.detach(), expected_dropout(before, 0.5, SEED))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_a_view_of_a_non_leaf_flows_gradients_to_the_base(device):
    x = random_input((6, 10), torch.float64, device).requires_grad_(True)
    h = x * 1.0
    fused_dropout.dropout(h[:, 2:7], 0.5, inplace=True, seed=SEED)
    h.sum().backward()
    keep = reference.keep_mask((6, 5), 0.5, SEED)
    expected = torch.ones(6, 10, dtype=torch.float64)
    expected[:, 2:7] = torch.from_numpy(keep).double() * 2
    assert torch.equal(x.grad.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_a_negative_view(device):
    x = random_input((37,), torch.float32, device)
    original = x.clone()
    fused_dropout.dropout(torch._neg_view(x), 0.5, inplace=True, seed=SEED)
    assert torch.equal(x, -expected_dropout(-original, 0.5, SEED))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_a_conjugate_view_of_a_real_tensor(device):
    x = random_input((37,), torch.float32, device)
    original = x.clone()
    fused_dropout.dropout(x.conj(), 0.5, inplace=True, seed=SEED)
    assert_bitwise_equal(x, expected_dropout(original, 0.5, SEED))


# 3. Forward-mode AD: the tangent is mask * tangent * scale.


def _masked(v, p, seed, shared_dims=()):
    keep = torch.from_numpy(reference.keep_mask(reference.mask_shape(v.shape, shared_dims), p, seed))
    return torch.where(keep.to(v.device), v / (1 - p), torch.zeros((), dtype=v.dtype, device=v.device))


@pytest.mark.parametrize("device", DEVICES)
def test_jvp_of_dropout(device):
    x = random_input((5, 9), torch.float64, device)
    v = random_input((5, 9), torch.float64, device, seed=1)
    out, tangent = torch.func.jvp(lambda t: fused_dropout.dropout(t, 0.5, seed=3), (x,), (v,))
    assert torch.equal(out, expected_dropout(x, 0.5, 3))
    assert torch.allclose(tangent, _masked(v, 0.5, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad_of_dropout_add_with_bias(device):
    import torch.autograd.forward_ad as fwAD

    x, r = random_input((4, 6), torch.float64, device), random_input((4, 6), torch.float64, device, seed=1)
    b = random_input((6,), torch.float64, device, seed=2)
    tx, tr, tb = (random_input(t.shape, torch.float64, device, seed=10 + i) for i, t in enumerate((x, r, b)))
    with fwAD.dual_level():
        out = fused_dropout.dropout_add(
            fwAD.make_dual(x, tx), fwAD.make_dual(r, tr), 0.4, bias=fwAD.make_dual(b, tb), seed=5
        )
        tangent = fwAD.unpack_dual(out).tangent
    assert torch.allclose(tangent, tr + _masked(tx + tb, 0.4, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad_in_place_masks_the_tangent(device):
    import torch.autograd.forward_ad as fwAD

    x, v = random_input((50,), torch.float64, device), random_input((50,), torch.float64, device, seed=1)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.clone(), v.clone())  # in place, as torch does, the tangent is updated too
        fused_dropout.dropout(dual, 0.5, inplace=True, seed=7)
        primal, tangent = fwAD.unpack_dual(dual)
    assert torch.equal(primal, expected_dropout(x, 0.5, 7))
    assert torch.allclose(tangent, _masked(v, 0.5, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_jacfwd_and_hessian(device):
    x = random_input((7,), torch.float64, device)
    keep = torch.from_numpy(reference.keep_mask((7,), 0.5, 9)).double().to(device)
    jac = torch.func.jacfwd(lambda t: fused_dropout.dropout(t, 0.5, seed=9))(x)
    assert torch.allclose(jac, torch.diag(keep * 2))
    hess = torch.func.hessian(lambda t: (fused_dropout.dropout(t, 0.5, seed=9) ** 2).sum())(x)
    assert torch.allclose(hess, torch.diag(keep * 8))  # d2/dx2 of (2 k x)^2


def _gradcheck(fn, inputs):
    return torch.autograd.gradcheck(
        fn,
        inputs,
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_every_op_with_forward_ad_and_batched_grad(device):
    x = random_input((4, 3, 5), torch.float64, device).requires_grad_(True)
    r = random_input((4, 3, 5), torch.float64, device, seed=1).requires_grad_(True)
    b = random_input((5,), torch.float64, device, seed=2).requires_grad_(True)
    assert _gradcheck(lambda t: fused_dropout.dropout(t, 0.4, seed=17), (x,))
    assert _gradcheck(lambda t: fused_dropout.dropout(t, 0.4, seed=17, shared_dims=(2,)), (x,))
    assert _gradcheck(lambda t: fused_dropout.dropout2d(t, 0.4, seed=17), (x,))
    assert _gradcheck(lambda t: fused_dropout.dropout(t * 1.0, 0.4, inplace=True, seed=17), (x,))
    assert _gradcheck(lambda t, u, c: fused_dropout.dropout_add(t, u, 0.4, bias=c, seed=17), (x, r, b))
    assert _gradcheck(lambda t, u: fused_dropout.dropout_add(t, u, 0.4, training=False), (x, r))
    rng_state = torch.tensor([3, 1], dtype=torch.int64, device=device)
    assert _gradcheck(lambda t: fused_dropout.ops.dropout_replay(t, rng_state, 0.4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fused_dropout.dropout(t, 0.4, seed=17), (x,))


# 4. vmap: the three randomness modes, through batching rules.


def test_vmap_refuses_randomness_by_default():
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.vmap(lambda t: fused_dropout.dropout(t, 0.5))(torch.ones(4, 256))
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.vmap(lambda t: fused_dropout.dropout_add(t, t, 0.5))(torch.ones(4, 256))


def test_vmap_with_a_seed_is_a_plain_function():
    x = random_input((3, 40), torch.float32)
    out = torch.vmap(lambda t: fused_dropout.dropout(t, 0.5, seed=SEED))(x)
    for row in range(3):
        assert_bitwise_equal(out[row], expected_dropout(x[row], 0.5, SEED))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_same_gives_every_sample_the_unbatched_mask(device):
    x = random_input((4, 3, 50), torch.float32, device)
    torch.manual_seed(0)
    out = torch.vmap(lambda t: fused_dropout.dropout(t, 0.5), randomness="same")(x)
    torch.manual_seed(0)
    single = fused_dropout.dropout(torch.ones(3, 50, device=device), 0.5)
    for row in range(4):
        assert torch.equal(out[row] != 0, single != 0)
    assert torch.equal(out[out != 0], (x * 2)[out != 0])


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_different_gives_each_sample_its_own_mask(device):
    x = random_input((6, 500), torch.float32, device)
    torch.manual_seed(0)
    out = torch.vmap(lambda t: fused_dropout.dropout(t, 0.5), randomness="different", in_dims=1, out_dims=1)(x.T)
    torch.manual_seed(0)
    whole = fused_dropout.dropout(torch.ones(6, 500, device=device), 0.5)  # one mask over the batch, batch dim first
    assert torch.equal((out != 0).T, whole != 0)
    assert len({tuple((out[:, i] != 0).tolist()) for i in range(6)}) == 6


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_of_grad_replays_each_samples_mask(randomness):
    x = random_input((5, 30), torch.float64)

    def loss(t):
        return (fused_dropout.dropout(t, 0.5) * t).sum()

    torch.manual_seed(0)
    grads = torch.vmap(torch.func.grad(loss), randomness=randomness)(x)
    torch.manual_seed(0)
    outs = torch.vmap(lambda t: fused_dropout.dropout(t, 0.5), randomness=randomness)(x)
    keep = (outs != 0).double()
    assert torch.allclose(grads, 2 * keep * x * 2)  # d/dt of (2 k t) t = 4 k t


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_of_inplace_and_dropout_add(randomness):
    x = random_input((4, 64), torch.float32)
    r = random_input((4, 64), torch.float32, seed=1)
    b = random_input((4, 64), torch.float32, seed=2)
    torch.manual_seed(0)
    inplace = torch.vmap(lambda t: fused_dropout.dropout(t.clone(), 0.5, inplace=True), randomness=randomness)(x)
    torch.manual_seed(0)
    outofplace = torch.vmap(lambda t: fused_dropout.dropout(t, 0.5), randomness=randomness)(x)
    assert torch.equal(inplace, outofplace)
    torch.manual_seed(0)
    added = torch.vmap(lambda t, u, c: fused_dropout.dropout_add(t, u, 0.5, bias=c), randomness=randomness)(x, r, b)
    assert torch.equal(added, r + outofplace.ne(0) * (x + b) * 2)


# 6-8. Argument rules in every mode, as torch's.


@pytest.mark.parametrize("training,p", [(True, 0.5), (False, 0.5), (True, 0.0)])
@pytest.mark.parametrize(
    "residual_shape,bias_shape,dtype",
    [
        ((5,), None, None),
        ((1, 5), None, None),
        ((3, 4, 5), None, None),
        ((4, 5), (1, 5), None),
        ((4, 5), (5,), torch.float64),
    ],
)
def test_dropout_add_checks_its_arguments_in_every_mode(training, p, residual_shape, bias_shape, dtype):
    x = random_input((4, 5), torch.float32)
    residual = random_input(residual_shape, dtype if bias_shape is None and dtype else torch.float32)
    bias = None if bias_shape is None else random_input(bias_shape, dtype or torch.float32)
    with pytest.raises(RuntimeError, match="fused_dropout::dropout_add: (residual|bias) must"):
        fused_dropout.dropout_add(x, residual, p, training, bias=bias)


@pytest.mark.parametrize("p", [torch.tensor(0.5), True, 1, torch.tensor(0.25, dtype=torch.float64)])
def test_p_is_accepted_as_torch_accepts_it(p):
    x = random_input((64,), torch.float32)
    expected = expected_dropout(x, float(p), SEED)
    assert_bitwise_equal(fused_dropout.dropout(x, p, seed=SEED), expected)
    assert_bitwise_equal(fused_dropout.dropout(x.clone(), p, inplace=True, seed=SEED), expected)
    assert fused_dropout.FusedDropout(p).p is p


@pytest.mark.parametrize(
    "p,error",
    [
        (1.5, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        (torch.tensor(2.0), ValueError),
        ("a", TypeError),
        (torch.tensor([0.5, 0.5]), RuntimeError),
    ],
)
def test_p_is_refused_as_torch_refuses_it(p, error):
    if not (isinstance(p, float) and p != p):  # torch lets NaN through to its kernel; it is refused here
        with pytest.raises(error):
            F.dropout(torch.ones(3), p)
    with pytest.raises(error):
        fused_dropout.dropout(torch.ones(3), p)
    with pytest.raises(error):
        fused_dropout.FusedDropout(p)


@pytest.mark.parametrize(
    "fn,torch_fn,shape",
    [
        (fused_dropout.dropout2d, F.dropout2d, ()),
        (fused_dropout.dropout2d, F.dropout2d, (4,)),
        (fused_dropout.dropout3d, F.dropout3d, ()),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_feature_dropout_needs_two_dims(fn, torch_fn, shape, training):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions in the input"):
            torch_fn(torch.ones(shape), 0.5, True)
        with pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions in the input"):
            fn(torch.ones(shape), 0.5, training)


@pytest.mark.parametrize(
    "fn,torch_fn,ndim",
    [
        (fused_dropout.dropout2d, F.dropout2d, 2),
        (fused_dropout.dropout2d, F.dropout2d, 5),
        (fused_dropout.dropout3d, F.dropout3d, 1),
        (fused_dropout.dropout3d, F.dropout3d, 3),
    ],
)
def test_feature_dropout_warns_and_shares_as_torch(fn, torch_fn, ndim):
    # Thousands of elements: a dim torch does not share is never constant by chance.
    x = torch.ones((round(4096 ** (1 / ndim)),) * ndim)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        out = fn(x, 0.5, seed=SEED)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch_out = torch_fn(x, 0.5)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    # torch's mask is constant over the same dims as ours.
    shared = tuple(d for d in range(ndim) if torch.equal(torch_out, torch_out.amax(d, keepdim=True).expand_as(x)))
    for d in range(ndim):
        if d in shared and (out.amax(d) != out.amin(d)).any():
            pytest.fail(f"dim {d} is shared by torch, not here")


# 9. TorchScript.


def test_modules_script():
    model = nn.Sequential(
        nn.Linear(8, 16),
        fused_dropout.FusedDropout(0.5),
        nn.Unflatten(1, (4, 2, 2)),
        fused_dropout.FusedDropout2d(0.5),
        fused_dropout.FusedDropout(0.5, inplace=True),
        nn.Flatten(),
    )
    scripted = torch.jit.script(model)
    x = random_input((3, 8), torch.float32)
    torch.manual_seed(0)  # three dropouts in a row on 48 elements: a fixed draw, so never all zeros
    model.eval(), scripted.eval()
    assert torch.equal(scripted(x), model(x))
    scripted.train()
    out = scripted(x)
    assert (out == 0).any() and (out != 0).any()
    add = torch.jit.script(fused_dropout.FusedDropoutAdd(0.5).eval())
    assert torch.equal(add(x, x), x + x)


# 10. Rank: torch's limit.


@pytest.mark.parametrize("ndim", [26, 40, 64])
def test_up_to_64_dims(ndim):
    shape = [1] * ndim
    shape[3], shape[-1], shape[-3] = 3, 5, 2
    x = random_input(shape, torch.float32)
    assert_bitwise_equal(fused_dropout.dropout(x, 0.5, seed=SEED), expected_dropout(x, 0.5, SEED))
    permuted = x.transpose(-1, 3)
    assert_bitwise_equal(fused_dropout.dropout(permuted, 0.5, seed=SEED), expected_dropout(permuted, 0.5, SEED))


# The next holes of the same kind.


def test_functionalize_of_inplace_dropout():
    x = random_input((4, 6), torch.float32)

    def f(t):
        h = t * 1.0
        fused_dropout.dropout(h[1:], 0.5, inplace=True, seed=SEED)
        return h

    out = torch.func.functionalize(f)(x)
    assert torch.equal(out, f(x))


def test_checkpoint_non_reentrant_with_inplace():
    from torch.utils.checkpoint import checkpoint

    x = random_input((8, 16), torch.float64).requires_grad_(True)

    def block(t):
        h = t * 2.0
        fused_dropout.dropout(h, 0.5, inplace=True)
        return h.sin()

    torch.manual_seed(0)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    grad_ckpt = x.grad.clone()
    x.grad = None
    torch.manual_seed(0)
    block(x).sum().backward()
    assert torch.equal(grad_ckpt, x.grad)


def test_compile_inplace_on_a_view():
    def f(t):
        h = t * 1.0
        fused_dropout.dropout(h[:, 1:3], 0.5, inplace=True, seed=SEED)
        return h

    x = random_input((4, 5), torch.float32)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4).as_strided((3, 4), (1, 3))
        y = fused_dropout.dropout(x, 0.5)
        z = fused_dropout.dropout(x.clone(), 0.5, inplace=True)
        w = fused_dropout.dropout_add(x, x, 0.5)
    assert y.shape == z.shape == w.shape == (3, 4) and y.stride() == (1, 3)
