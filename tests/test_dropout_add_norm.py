"""dropout_add_layer_norm and dropout_add_rms_norm: h = residual + dropout(input) with the
reference mask, bit for bit, and the norm of h against torch's layer_norm and rms_norm
computed in float64; gradients by gradcheck and gradgradcheck; the torch features the other
ops keep."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout as fd

import reference
from helpers import DEVICES, DTYPES, assert_bitwise_equal, random_input

# One output ulp of the dtype at the norm's scale (outputs are O(1..4)), with room for the
# accumulation order: the kernel's row sums against torch's float64 reference.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def expected_h(x, residual, p, seed, offset=0, shared_dims=(), residual_dtype=None):
    """h from the reference mask: the sum in float32 (float64 where an operand is), rounded once."""
    dropped = reference.dropout(x, p, seed, offset, shared_dims).to(x.device)
    if residual is None:
        return dropped.to(residual_dtype or x.dtype)
    h_dtype = residual_dtype or torch.promote_types(x.dtype, residual.dtype)
    wide = torch.promote_types(
        torch.promote_types(x.dtype, residual.dtype), torch.promote_types(h_dtype, torch.float32)
    )
    return (residual.to(wide) + dropped.to(wide)).to(h_dtype)


def torch_norm(h, weight, bias, eps, rms):
    """torch's own norm of h in float64."""
    w = None if weight is None else weight.double()
    if rms:
        return F.rms_norm(h.double(), h.shape[-1:], w, eps)
    return F.layer_norm(h.double(), h.shape[-1:], w, None if bias is None else bias.double(), eps)


def call(rms, x, residual, weight, bias, p, **kwargs):
    if rms:
        return fd.dropout_add_rms_norm(x, residual, weight, p, **kwargs)
    return fd.dropout_add_layer_norm(x, residual, weight, bias, p, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 768), (2, 4097), (4, 1, 33)], ids=str)
def test_h_bit_for_bit_and_the_norm_as_torch(device, dtype, rms, shape):
    x = random_input(shape, dtype, device, seed=1)
    residual = random_input(shape, dtype, device, seed=2)
    weight = random_input(shape[-1:], dtype, device, seed=3)
    bias = None if rms else random_input(shape[-1:], dtype, device, seed=4)
    out, h = call(rms, x, residual, weight, bias, 0.3, seed=11, offset=5, eps=1e-5, prenorm=True)
    assert_bitwise_equal(h, expected_h(x, residual, 0.3, 11, 5))
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), torch_norm(h, weight, bias, 1e-5, rms), rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_mixed_precision_residual_stream(device, rms):
    # bfloat16 activations, float32 residual stream: h stays float32, the output bfloat16.
    x = random_input((4, 6, 256), torch.bfloat16, device, seed=1)
    residual = random_input((4, 6, 256), torch.float32, device, seed=2)
    weight = random_input((256,), torch.bfloat16, device, seed=3)
    out, h = call(rms, x, residual, weight, None, 0.2, seed=3, prenorm=True, residual_dtype=torch.float32)
    assert h.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert_bitwise_equal(h, expected_h(x, residual, 0.2, 3, residual_dtype=torch.float32))
    eps = 1e-5 if not rms else torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.double(), torch_norm(h, weight, None, eps, rms), rtol=0, atol=3e-2)
    # A bfloat16 residual kept as float32: no rounding of the sum to bfloat16.
    residual16 = residual.to(torch.bfloat16)
    _, h32 = call(rms, x, residual16, weight, None, 0.2, seed=3, prenorm=True, residual_dtype=torch.float32)
    assert_bitwise_equal(h32, expected_h(x, residual16, 0.2, 3, residual_dtype=torch.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,residual_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("width", [1, 7, 768, 4100, 8192, 8200, 20000])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_the_cuda_kernel_at_every_width(dtype, residual_dtype, width, rms):
    # Rows kept on chip (up to 8192 wide) and rows read back, 16-byte and one-element steps: h
    # bit for bit with the CPU's, the statistics and the output with torch's norm.
    x = random_input((5, width), dtype, seed=1)
    residual = random_input((5, width), residual_dtype or dtype, seed=2)
    weight = random_input((width,), dtype, seed=3)
    bias = None if rms else random_input((width,), dtype, seed=4)
    kwargs = dict(seed=11, offset=5, eps=1e-5, prenorm=True, residual_dtype=residual_dtype)
    cuda = [t.cuda() if t is not None else None for t in (x, residual, weight, bias)]
    out, h = call(rms, *cuda, 0.3, **kwargs)
    _, h_cpu = call(rms, x, residual, weight, bias, 0.3, **kwargs)
    assert_bitwise_equal(h.cpu(), h_cpu)
    torch.testing.assert_close(
        out.cpu().double(), torch_norm(h_cpu, weight, bias, 1e-5, rms), rtol=0, atol=TOLERANCE[dtype] * 2
    )


@pytest.mark.parametrize("device", DEVICES)
def test_any_layout_no_residual_and_drop_path(device):
    x = random_input((6, 5, 40), torch.float32, device).transpose(0, 1)  # not contiguous
    residual = random_input((5, 6, 40), torch.float32, device, seed=2)
    out, h = fd.dropout_add_layer_norm(x, residual, None, None, 0.5, seed=7, shared_dims=(1, 2), prenorm=True)
    assert_bitwise_equal(h, expected_h(x, residual, 0.5, 7, shared_dims=(1, 2)))
    # Drop path: each sample's branch whole or not at all.
    dropped = h - residual
    assert all(bool((d == 0).all()) or bool((d != 0).all()) for d in dropped)
    torch.testing.assert_close(out.double(), torch_norm(h, None, None, 1e-5, False), rtol=0, atol=2e-5)
    out, h = fd.dropout_add_layer_norm(x, None, None, None, 0.5, seed=7, prenorm=True)
    assert_bitwise_equal(h, expected_h(x, None, 0.5, 7))
    assert_bitwise_equal(out, fd.dropout_add_layer_norm(x.contiguous(), None, None, None, 0.5, seed=7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_eval_and_p0_are_the_plain_norm(device, rms):
    x = random_input((3, 64), torch.float32, device)
    residual = random_input((3, 64), torch.float32, device, seed=2)
    weight = random_input((64,), torch.float32, device, seed=3)
    state = torch.get_rng_state()
    for kwargs in ({"training": False}, {}):
        p = 0.0 if kwargs == {} else 0.7
        out = call(rms, x, residual, weight, None, p, **kwargs)
        want = F.rms_norm(residual + x, (64,), weight) if rms else F.layer_norm(residual + x, (64,), weight)
        torch.testing.assert_close(out, want, rtol=0, atol=2e-6)
    assert torch.equal(torch.get_rng_state(), state), "eval and p=0 draw no random state"


def test_rms_norm_default_eps_is_torchs():
    x = torch.full((2, 32), 1e-4) + random_input((2, 32)) * 1e-6
    torch.testing.assert_close(fd.dropout_add_rms_norm(x, None, None, 0.0), F.rms_norm(x, (32,)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gradcheck_forward_ad_batched_and_double_backward(rms):
    x = random_input((3, 4, 16), torch.float64).requires_grad_()
    residual = random_input((3, 4, 16), torch.float64, seed=2).requires_grad_()
    weight = random_input((16,), torch.float64, seed=3).requires_grad_()
    bias = random_input((16,), torch.float64, seed=4).requires_grad_()
    if rms:
        args = (x, residual, weight)

        def fn(x, r, w):
            return fd.dropout_add_rms_norm(x, r, w, 0.4, seed=9, prenorm=True)
    else:
        args = (x, residual, weight, bias)

        def fn(x, r, w, b):
            return fd.dropout_add_layer_norm(x, r, w, b, 0.4, seed=9, prenorm=True)

    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, args)


def test_backward_against_the_composition():
    x = random_input((5, 48), torch.float64).requires_grad_()
    residual = random_input((5, 48), torch.float64, seed=2).requires_grad_()
    weight = random_input((48,), torch.float64, seed=3).requires_grad_()
    bias = random_input((48,), torch.float64, seed=4).requires_grad_()
    out, h = fd.dropout_add_layer_norm(x, residual, weight, bias, 0.3, seed=4, prenorm=True)
    grads = torch.autograd.grad((out * out).sum() + (h * 3).sum(), (x, residual, weight, bias))
    h_ref = residual + fd.dropout(x, 0.3, seed=4)
    out_ref = F.layer_norm(h_ref, (48,), weight, bias)
    want = torch.autograd.grad((out_ref * out_ref).sum() + (h_ref * 3).sum(), (x, residual, weight, bias))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected)


def test_saves_h_and_row_statistics_not_a_mask():
    x = random_input((64, 256), torch.float32).requires_grad_()
    residual = random_input((64, 256), torch.float32, seed=2)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fd.dropout_add_layer_norm(x, residual, None, None, 0.5)
    assert sum(storages.values()) == 64 * 256 * 4 + 2 * 64 * 4 + 16


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = random_input((3, 5, 8), torch.float32, device).requires_grad_()
    residual = random_input((3, 5, 8), torch.float32, device, seed=2).requires_grad_()
    weight = random_input((8,), torch.float32, device, seed=3).requires_grad_()
    op = torch.ops.fused_dropout.dropout_add_norm.default
    torch.library.opcheck(op, (x, residual, weight, None, 0.3, 1e-5, False, None, 5, 0, None, [1]))
    torch.library.opcheck(op, (x, None, weight, None, 0.3, 1e-6, True, torch.float64, 5, 0, None, []))
    h = random_input((3, 5, 8), torch.float64, device, seed=4)
    mean, rstd = h.mean(-1), h.var(-1, unbiased=False).add(1e-5).rsqrt()
    grad = random_input((3, 5, 8), torch.float32, device, seed=5)
    for rms in (False, True):
        torch.library.opcheck(
            torch.ops.fused_dropout.norm_backward.default, (grad, h, weight.detach(), mean, rstd, rms)
        )


def test_the_one_pass_backward_equals_the_composition():
    # norm_backward's CPU kernel (no create_graph) against the differentiable composition
    # the same backward runs under create_graph.
    for dtype, residual_dtype in ((torch.float32, None), (torch.bfloat16, torch.float32), (torch.float64, None)):
        x = random_input((33, 96), dtype).requires_grad_()
        residual = random_input((33, 96), dtype, seed=2).requires_grad_()
        weight = random_input((96,), dtype, seed=3).requires_grad_()
        bias = random_input((96,), dtype, seed=4).requires_grad_()
        out, h = fd.dropout_add_layer_norm(
            x, residual, weight, bias, 0.3, seed=2, prenorm=True, residual_dtype=residual_dtype
        )
        grad = random_input((33, 96), dtype, seed=6)
        fast = torch.autograd.grad(out, (x, residual, weight, bias), grad, retain_graph=True)
        slow = torch.autograd.grad(out, (x, residual, weight, bias), grad, create_graph=True)
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("randomness", ["same", "different", "error"])
def test_vmap(randomness):
    x = random_input((3, 4, 16), torch.float32)
    residual = random_input((3, 4, 16), torch.float32, seed=2)

    def fn(x, r):
        return fd.dropout_add_layer_norm(x, r, None, None, 0.5)

    if randomness == "error":
        with pytest.raises(RuntimeError, match="randomness"):
            torch.vmap(fn, randomness=randomness)(x, residual)
        return

    def dropped(x, r):
        return fd.dropout_add_layer_norm(x, r, None, None, 0.5, prenorm=True)[1] - r

    kept = torch.vmap(dropped, randomness=randomness)(x, residual) != 0
    # "same": one mask for every sample; "different": each sample its own.
    assert torch.equal(kept[0], kept[1]) == (randomness == "same")
    assert torch.vmap(fn, randomness=randomness)(x, residual).shape == x.shape
    # Seeded: every sample gets the unbatched call's mask.
    seeded = torch.vmap(lambda x, r: fd.dropout_add_layer_norm(x, r, None, None, 0.5, seed=3))(x, residual)
    for i in range(3):
        assert_bitwise_equal(seeded[i], fd.dropout_add_layer_norm(x[i], residual[i], None, None, 0.5, seed=3))


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_vmap_over_a_weight_and_bias_per_sample(rms):
    x = random_input((3, 4, 16)).requires_grad_()
    residual = random_input((3, 4, 16), seed=2)
    weights = random_input((3, 16), seed=3).requires_grad_()
    biases = None if rms else random_input((3, 16), seed=4)

    def fn(x, r, w, b):
        return call(rms, x, r, w, b, 0.5, seed=3, eps=1e-5)

    got = torch.vmap(fn, in_dims=(0, 0, 0, None if rms else 0))(x, residual, weights, biases)
    want = torch.stack([fn(x[i], residual[i], weights[i], None if rms else biases[i]) for i in range(3)])
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, weights))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (x, weights))):
        torch.testing.assert_close(g, w)


def test_compile_fullgraph_and_fake_tensors():
    x = random_input((4, 32), torch.float32)
    residual = random_input((4, 32), torch.float32, seed=2)
    weight = random_input((32,), torch.float32, seed=3)

    def fn(x, r, w):
        return fd.dropout_add_layer_norm(x, r, w, None, 0.25, seed=5, prenorm=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, residual, weight), fn(x, residual, weight)):
        assert_bitwise_equal(got, want)
    meta = fd.dropout_add_layer_norm(x.to("meta"), residual.to("meta"), weight.to("meta"), None, 0.25, seed=5)
    assert meta.device.type == "meta" and meta.shape == x.shape


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"weight": torch.ones(7)}, RuntimeError, r"weight must be 1-D with the size of the input's last dim \(8\)"),
        ({"bias": torch.ones(2, 8)}, RuntimeError, r"bias must be 1-D"),
        ({"residual": torch.ones(3, 9)}, RuntimeError, r"residual must have the input's shape"),
        ({"p": 1.5}, ValueError, r"dropout probability has to be between 0 and 1, but got 1.5"),
        ({"eps": -1.0}, ValueError, r"eps must be a non-negative number, got -1"),
        ({"residual_dtype": torch.int32}, RuntimeError, r"residual_dtype must be float32"),
        ({"weight": torch.ones(8, dtype=torch.int64)}, RuntimeError, r"weight must be float32"),
        ({"seed": -1}, ValueError, r"dropout_add_layer_norm: seed must be in \[0, 2\*\*64\)"),
        ({"residual": "x"}, TypeError, r"dropout_add_layer_norm: residual must be a Tensor or None, got str"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_bad_input_is_refused_in_every_mode(kwargs, error, message, training):
    args = {"residual": None, "weight": None, "bias": None, "p": 0.5, **kwargs}
    extra = {k: args.pop(k) for k in ("eps", "residual_dtype", "seed") if k in args}
    with pytest.raises(error, match=message):
        fd.dropout_add_layer_norm(
            torch.ones(3, 8), args["residual"], args["weight"], args["bias"], args["p"], training, **extra
        )


def test_rms_norm_takes_no_bias():
    with pytest.raises(ValueError, match="RMSNorm takes no bias"):
        fd.ops.dropout_add_norm(torch.ones(2, 4), None, None, torch.ones(4), 0.5, 1e-6, True, None, 1, 0, None, [])


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_modules_load_a_norms_state_dict_and_match_it_in_eval(rms):
    torch.manual_seed(0)
    stock = nn.RMSNorm(48) if rms else nn.LayerNorm(48)
    with torch.no_grad():
        for param in stock.parameters():
            param.normal_()
    fused = fd.FusedDropoutAddRMSNorm(48, p=0.1) if rms else fd.FusedDropoutAddLayerNorm(48, p=0.1)
    fused.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(fused.state_dict(), strict=True)
    x, residual = random_input((5, 48)), random_input((5, 48), seed=2)
    fused.eval()
    torch.testing.assert_close(fused(x, residual), stock(residual + x), rtol=0, atol=2e-6)
    fused.train()
    out = fused(x, residual)
    out.sum().backward()
    assert fused.weight.grad is not None
    with pytest.raises(ValueError, match="normalized_shape must be an int or a 1-tuple"):
        (fd.FusedDropoutAddRMSNorm if rms else fd.FusedDropoutAddLayerNorm)((4, 48))


def test_replace_dropout_fuse_norms_in_a_vit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    stock = torchvision.models.VisionTransformer(32, 8, 2, 2, 64, 128, dropout=0.1, num_classes=10)
    fused = torchvision.models.VisionTransformer(32, 8, 2, 2, 64, 128, dropout=0.1, num_classes=10)
    fused = fd.replace_dropout(fused, fuse_norms=True)
    fused.load_state_dict(stock.state_dict(), strict=True)
    assert all(type(block).__name__ == "FusedNormEncoderBlock" for block in fused.encoder.layers)
    images = random_input((3, 3, 32, 32))
    stock.eval()
    fused.eval()
    torch.testing.assert_close(fused(images), stock(images), rtol=0, atol=1e-5)
    fused.train()
    fused(images).sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
    stock.load_state_dict(fused.state_dict(), strict=True)
    # A hooked ln_2 keeps its block as it was.
    hooked = torchvision.models.VisionTransformer(32, 8, 1, 2, 64, 128, dropout=0.1)
    hooked.encoder.layers[0].ln_2.register_forward_hook(lambda *args: None)
    fd.replace_dropout(hooked, fuse_norms=True)
    assert type(hooked.encoder.layers[0]).__name__ == "EncoderBlock"


def test_export():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = fd.FusedDropoutAddLayerNorm(16, p=0.2, prenorm=True)

        def forward(self, x, r):
            return self.norm(x, r)

    block = Block()
    x, residual = random_input((2, 3, 16)), random_input((2, 3, 16), seed=2)
    exported = torch.export.export(block, (x, residual))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.fused_dropout.dropout_add_norm.default in targets
    block.eval()
    for got, want in zip(torch.export.export(block, (x, residual)).module()(x, residual), block(x, residual)):
        assert_bitwise_equal(got, want)
