"""dropout_linear and FusedDropoutLinear: F.linear(dropout(input)) with the reference mask, the
unfused pair's values and gradients bit for bit on the CPU, nothing input-sized saved beyond the
input itself, the torch features the other ops keep, and replace_dropout's fusion in
Sequentials and PEFT LoRA adapters."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout as fd

import reference
from helpers import DEVICES, assert_bitwise_equal, random_input

OP = torch.ops.fused_dropout.dropout_linear.default


def operands(shape, out_features=6, dtype=torch.float32, device="cpu", bias=True):
    x = random_input(shape, dtype, device, seed=1).requires_grad_()
    weight = random_input((out_features, shape[-1]), dtype, device, seed=2).requires_grad_()
    b = random_input((out_features,), dtype, device, seed=3).requires_grad_() if bias else None
    return x, weight, b


def grads_of(output, tensors, grad):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(output, tensors, grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(37,), (5, 37), (3, 4, 37), (2, 3, 4, 8)], ids=str)
def test_values_and_gradients_equal_the_unfused_pair_bit_for_bit(device, bias, shape):
    x, weight, b = operands(shape, device=device, bias=bias)
    out = fd.dropout_linear(x, weight, b, 0.3, seed=11, offset=5)
    # The dropped input is the reference mask's, and the output the pair's.
    dropped = reference.dropout(x.detach(), 0.3, 11, 5).to(device)
    assert_bitwise_equal(fd.dropout(x.detach(), 0.3, seed=11, offset=5), dropped)
    x2, w2, b2 = (None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, b))
    want = F.linear(fd.dropout(x2, 0.3, seed=11, offset=5), w2, b2)
    assert_bitwise_equal(out, want)
    grad = random_input(out.shape, device=device, seed=9)
    for got, expected in zip(grads_of(out, (x, weight, b), grad), grads_of(want, (x2, w2, b2), grad)):
        assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("shape, weight_shape", [((0, 5), (3, 5)), ((2, 0), (3, 0)), ((4, 0, 5), (3, 5))], ids=str)
def test_empty_inputs_give_the_pairs_gradients(shape, weight_shape):
    x = random_input(shape).requires_grad_()
    weight = random_input(weight_shape, seed=2).requires_grad_()
    bias = random_input(weight_shape[:1], seed=3).requires_grad_()
    out = fd.dropout_linear(x, weight, bias, 0.5, seed=1)
    want = F.linear(fd.dropout(x, 0.5, seed=1), weight, bias)
    assert_bitwise_equal(out, want)
    grad = torch.ones_like(out)
    for got, expected in zip(grads_of(out, (x, weight, bias), grad), grads_of(want, (x, weight, bias), grad)):
        assert_bitwise_equal(got, expected)


def test_any_layout_and_shared_dims():
    x = random_input((4, 16, 6), seed=1).transpose(1, 2).requires_grad_()  # not contiguous
    weight = random_input((5, 16), seed=2).requires_grad_()
    out = fd.dropout_linear(x, weight, None, 0.5, seed=3, shared_dims=1)
    want = F.linear(fd.dropout(x, 0.5, seed=3, shared_dims=(1,)), weight)
    assert_bitwise_equal(out, want)
    kept = fd.dropout(x.detach(), 0.5, seed=3, shared_dims=(1,)) != 0
    assert torch.equal(kept, kept[:, :1].expand_as(kept))  # one decision per (sample, row)
    grad = random_input(out.shape, seed=4)
    for got, expected in zip(grads_of(out, (x, weight), grad), grads_of(want, (x, weight), grad)):
        assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_against_the_pair(dtype):
    x, weight, b = operands((8, 64), dtype=dtype)
    out = fd.dropout_linear(x, weight, b, 0.2, seed=1)
    want = F.linear(fd.dropout(x, 0.2, seed=1), weight, b)
    torch.testing.assert_close(out, want)
    grad = random_input(out.shape, dtype, seed=4)
    for got, expected in zip(grads_of(out, (x, weight, b), grad), grads_of(want, (x, weight, b), grad)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_and_p0_are_linear(device):
    x, weight, b = operands((3, 9), device=device)
    want = F.linear(x, weight, b)
    assert_bitwise_equal(fd.dropout_linear(x, weight, b, 0.4, training=False), want)
    assert_bitwise_equal(fd.dropout_linear(x, weight, b, 0.0), want)
    # p=1 drops every input element: only the bias is left.
    assert_bitwise_equal(fd.dropout_linear(x, weight, b, 1.0), b.detach().expand(3, 6) + 0 * want.detach())


def test_gradcheck_forward_ad_batched_and_double_backward():
    x, weight, b = operands((4, 2, 7), dtype=torch.float64)

    def fn(x, w, b):
        return fd.dropout_linear(x, w, b, 0.4, seed=7, offset=1)

    assert torch.autograd.gradcheck(fn, (x, weight, b), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, (x, weight, b), check_batched_grad=True)
    jac = torch.func.jacrev(fn, argnums=(0, 1, 2))(x, weight, b)
    jac_fwd = torch.func.jacfwd(fn, argnums=(0, 1, 2), randomness="same")(x, weight, b)
    for a, c in zip(jac, jac_fwd):
        torch.testing.assert_close(a, c)


def test_saves_the_input_itself_and_no_input_sized_copy():
    x = random_input((64, 256)).requires_grad_()
    weight = random_input((32, 256), seed=2).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fd.dropout_linear(x, weight, None, 0.5)
    input_sized = [t for t in saved if t.numel() >= x.numel()]
    assert len(input_sized) == 1 and input_sized[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert sum(t.untyped_storage().nbytes() for t in saved) == (64 * 256 + 32 * 256) * 4 + 16
    # A frozen weight (the base layer's case) needs no input for backward: only the weight and state.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fd.dropout_linear(x, weight.detach(), None, 0.5)
    assert [t.numel() for t in saved] == [32 * 256, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, weight, b = operands((3, 5, 8), device=device)
    torch.library.opcheck(OP, (x, weight, b, 0.3, 5, 0, None, [1]))
    torch.library.opcheck(OP, (x, weight, None, 0.5, 5, 2, None, []))


@pytest.mark.parametrize("randomness", ["same", "different", "error"])
def test_vmap(randomness):
    x = random_input((3, 4, 16))
    weight = random_input((5, 16), seed=2)

    def fn(x):
        return fd.dropout_linear(x, weight, None, 0.5)

    if randomness == "error":
        with pytest.raises(RuntimeError, match="randomness"):
            torch.vmap(fn, randomness=randomness)(x)
        return
    # One input row per sample, the identity as weight: the output is the dropped input.
    eye = torch.eye(16)
    dropped = torch.vmap(lambda x: fd.dropout_linear(x, eye, None, 0.5), randomness=randomness)(x)
    assert torch.equal(dropped[0] != 0, dropped[1] != 0) == (randomness == "same")
    assert torch.vmap(fn, randomness=randomness)(x).shape == (3, 4, 5)
    seeded = torch.vmap(lambda x: fd.dropout_linear(x, weight, None, 0.5, seed=3))(x)
    for i in range(3):
        assert_bitwise_equal(seeded[i], fd.dropout_linear(x[i], weight, None, 0.5, seed=3))


def test_vmap_over_a_weight_per_sample():
    x = random_input((3, 4, 16))
    weights, biases = random_input((3, 5, 16), seed=2), random_input((3, 5), seed=3)
    got = torch.vmap(lambda x, w, b: fd.dropout_linear(x, w, b, 0.5, seed=3))(x, weights, biases)
    for i in range(3):
        torch.testing.assert_close(got[i], fd.dropout_linear(x[i], weights[i], biases[i], 0.5, seed=3))


def test_per_sample_gradients_by_vmap_of_grad():
    x, y = random_input((5, 8)), random_input((5, 3), seed=2)
    params = {"weight": random_input((3, 8), seed=3), "bias": random_input((3,), seed=4)}

    def loss(params, x, y):
        out = fd.dropout_linear(x.unsqueeze(0), params["weight"], params["bias"], 0.3, seed=3)
        return (out - y).square().sum()

    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        one = torch.func.grad(loss)(params, x[i], y[i])
        for name in params:
            torch.testing.assert_close(per_sample[name][i], one[name])


def test_compile_fullgraph_export_and_fake_tensors():
    x, weight, b = operands((4, 32))

    def fn(x, w, b):
        return fd.dropout_linear(x, w, b, 0.25, seed=5)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(compiled(x, weight, b), fn(x, weight, b))
    meta = fd.dropout_linear(x.to("meta"), weight.to("meta"), b.to("meta"), 0.25, seed=5)
    assert meta.device.type == "meta" and meta.shape == (4, 6)

    layer = fd.FusedDropoutLinear(32, 6, p=0.25)
    exported = torch.export.export(layer, (x.detach(),))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert OP in targets
    layer.eval()
    assert_bitwise_equal(torch.export.export(layer, (x.detach(),)).module()(x.detach()), layer(x.detach()))


def test_autocast_follows_linears_rule():
    x, weight, b = operands((8, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fd.dropout_linear(x, weight, b, 0.3, seed=2)
        plain = F.linear(x, weight, b)
    assert out.dtype == plain.dtype == torch.bfloat16
    want = F.linear(fd.dropout(x.bfloat16(), 0.3, seed=2), weight.bfloat16(), b.bfloat16())
    assert_bitwise_equal(out, want)
    out.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((torch.ones(3, 8), torch.ones(6, 7), None, 0.5), RuntimeError, r"weight must be 2-D .* last dim \(8\)"),
        ((torch.ones(3, 8), torch.ones(6, 8), torch.ones(5), 0.5), RuntimeError, r"bias must be 1-D with .*\(6\)"),
        (
            (torch.ones(3, 8), torch.ones(6, 8, dtype=torch.float64), None, 0.5),
            RuntimeError,
            r"weight must have the input's dtype and device \(Float on cpu\), got Double on cpu",
        ),
        (
            (torch.ones(3, 8), torch.ones(6, 8, device="meta"), None, 0.5),
            RuntimeError,
            r"weight must have the input's dtype and device \(Float on cpu\), got Float on meta",
        ),
        ((torch.ones(3, 8), torch.ones(6, 8), None, 1.5), ValueError, r"dropout probability .* got 1.5"),
        ((torch.ones(3, 8), "w", None, 0.5), TypeError, r"dropout_linear: weight must be a Tensor, got str"),
        ((torch.tensor(1.0), torch.ones(6, 1), None, 0.5), RuntimeError, r"input must have at least 1 dim"),
    ],
)
def test_bad_input_is_refused(args, error, message):
    with pytest.raises(error, match=message):
        fd.dropout_linear(*args)


def test_module_is_a_linear_that_loads_a_linears_state_dict():
    linear = nn.Linear(16, 4)
    layer = fd.FusedDropoutLinear(16, 4, p=0.2)
    assert isinstance(layer, nn.Linear)
    layer.load_state_dict(linear.state_dict(), strict=True)
    x = random_input((5, 16))
    layer.eval()
    assert_bitwise_equal(layer(x), linear(x))
    layer.train()
    torch.manual_seed(3)
    scripted = torch.jit.script(layer)(x)
    torch.manual_seed(3)
    assert_bitwise_equal(scripted, layer(x))
    assert repr(layer) == "FusedDropoutLinear(in_features=16, out_features=4, bias=True, p=0.2)"
    shared = fd.FusedDropoutLinear.from_linear(linear, 0.1)
    assert shared.weight is linear.weight and shared.bias is linear.bias
    with pytest.raises(ValueError, match="dropout probability"):
        fd.FusedDropoutLinear(4, 4, p=2.0)


def test_replace_dropout_fuses_dropout_before_linear_in_sequentials():
    class Residual(nn.Sequential):  # its own forward: left alone
        def forward(self, x):
            return self[1](self[0](x)) + x

    model = nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 8), Residual(nn.Dropout(0.2), nn.Linear(8, 8))
    )
    keys = list(model.state_dict())
    weight = model[3].weight
    x = random_input((4, 8))
    model.eval()
    want = model(x)
    fd.replace_dropout(model)
    assert type(model[2]) is nn.Identity and type(model[3]) is fd.FusedDropoutLinear and model[3].p == 0.3
    assert model[3].weight is weight and type(model[1]) is nn.ReLU  # the activation stays apart
    assert type(model[4][0]) is fd.FusedDropout and type(model[4][1]) is nn.Linear
    assert list(model.state_dict()) == keys
    assert_bitwise_equal(model(x), want)
    # Off, or a hook on either module: unfused.
    hooked = nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 8))
    hooked[1].register_forward_hook(lambda *args: None)
    fd.replace_dropout(hooked)
    assert type(hooked[1]) is nn.Linear
    off = fd.replace_dropout(nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 8)), fuse_linears=False)
    assert type(off[1]) is nn.Linear


@pytest.mark.parametrize(
    "name, heads", [("alexnet", 2), ("mobilenet_v2", 1), ("mobilenet_v3_small", 1), ("mnasnet0_5", 1)]
)
def test_replace_dropout_in_torchvision_classifier_heads(name, heads):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)  # ... Dropout, Linear
    state = copy.deepcopy(model.state_dict())
    x = random_input((2, 3, 64, 64))
    model.eval()
    with torch.no_grad():
        want = model(x)
    fd.replace_dropout(model)
    fused = [m for m in model.modules() if isinstance(m, fd.FusedDropoutLinear)]
    assert len(fused) == heads and not any(isinstance(m, (nn.Dropout, fd.FusedDropout)) for m in model.classifier)
    model.load_state_dict(state, strict=True)
    assert list(model.state_dict()) == list(state)
    with torch.no_grad():
        assert_bitwise_equal(model(x), want)
    model.train()
    model(x).logsumexp(1).sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in fused)


def import_peft():
    return pytest.importorskip("peft", reason="peft is not installed")


def lora_llama(lora_dropout=0.1, **lora_kwargs):
    peft = import_peft()
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=targets, init_lora_weights=False, **lora_kwargs
    )
    return base, peft.get_peft_model(copy.deepcopy(base), lora)


def lora_parameters(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def assert_trains_bit_for_bit_as(model, unfused, ids):
    """One training step of each from the same seed: the same loss and LoRA gradients, bit for bit."""
    losses = []
    for m in (model.train(), unfused.train()):
        torch.manual_seed(5)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert_bitwise_equal(losses[0], losses[1])
    fused_grads, unfused_grads = lora_parameters(model), lora_parameters(unfused)
    assert fused_grads and fused_grads.keys() == unfused_grads.keys()
    for name in fused_grads:
        assert_bitwise_equal(fused_grads[name].grad, unfused_grads[name].grad)


def test_lora_adapters_fuse_and_train_as_the_unfused_ones():
    _, model = lora_llama()
    unfused = copy.deepcopy(model)
    fd.replace_dropout(unfused, fuse_linears=False)  # FusedDropout: the same mask, dropped input kept
    keys = list(model.state_dict())
    fd.replace_dropout(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.lora_dropout["default"]) is nn.Identity and type(q.lora_A["default"]) is fd.FusedDropoutLinear
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_trains_bit_for_bit_as(model, unfused, ids)


def small_transformer(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64
        )
        return transformers.BertForMaskedLM._from_config(config, attn_implementation="eager"), ["query", "value"]
    config = transformers.T5Config(
        num_layers=2, d_model=32, num_heads=2, d_ff=64, d_kv=16, vocab_size=64, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration._from_config(config), ["q", "v", "wi", "wo"]


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_lora_on_bert_and_t5_keeps_eval_outputs_and_trains_as_unfused(name):
    peft = import_peft()
    model, targets = small_transformer(name)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_dropout=0.2, target_modules=targets))
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).logits
    unfused = copy.deepcopy(model)
    fd.replace_dropout(unfused, fuse_linears=False, functional=True)
    fd.replace_dropout(model, functional=True)
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    fused = [m for m in model.modules() if isinstance(m, fd.FusedDropoutLinear)]
    assert lora_layers and len(fused) == len(lora_layers)  # one adapter in each
    with torch.no_grad():
        assert_bitwise_equal(model(input_ids=ids, labels=ids).logits, want)
    assert_trains_bit_for_bit_as(model, unfused, ids)


def test_lora_adapters_save_load_and_merge(tmp_path):
    peft = import_peft()
    base, model = lora_llama()
    fd.replace_dropout(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_bitwise_equal(loaded(input_ids=ids).logits, want)
    fd.replace_dropout(loaded)
    assert_bitwise_equal(loaded(input_ids=ids).logits, want)
    model.load_adapter(tmp_path, adapter_name="again")  # into the fused model, as a second adapter
    model.set_adapter("again")
    assert_bitwise_equal(model(input_ids=ids).logits, want)
    model.set_adapter("default")
    merged = model.merge_and_unload()
    assert not any(isinstance(m, fd.FusedDropoutLinear) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_multiple_adapters_fuse_and_dora_is_left_apart_with_a_warning():
    peft = import_peft()
    _, model = lora_llama()
    model.add_adapter("second", peft.LoraConfig(r=2, lora_dropout=0.2, target_modules=["q_proj"]))
    model.add_adapter("dora", peft.LoraConfig(r=2, lora_dropout=0.2, target_modules=["v_proj"], use_dora=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fd.replace_dropout(model, functional=True)
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    v = model.base_model.model.model.layers[1].self_attn.v_proj
    assert type(q.lora_A["second"]) is fd.FusedDropoutLinear and q.lora_A["second"].p == 0.2
    assert type(v.lora_A["dora"]) is nn.Linear and type(v.lora_dropout["dora"]) is fd.FusedDropout
    assert type(v.lora_A["default"]) is fd.FusedDropoutLinear
    messages = " ".join(str(w.message) for w in caught)
    assert "base_model.model.model.layers.1.self_attn.v_proj (dora)" in messages
    model.set_adapter("dora")
    ids = torch.randint(0, 64, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()


def test_lora_on_gpt2s_conv1d_keeps_its_dropout_module():
    # Only LoRA layers on an nn.Linear fuse; on transformers' Conv1D the dropout is swapped alone.
    peft = import_peft()
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=64)
    lora = peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)
    fd.replace_dropout(model, functional=True)
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    assert type(c_attn.lora_dropout["default"]) is fd.FusedDropout and type(c_attn.lora_A["default"]) is nn.Linear


def test_fx_traces_the_module_and_inductor_compiles_it():
    layer = nn.Sequential(fd.FusedDropoutLinear(16, 4, p=0.5))
    x = random_input((3, 16))
    traced = torch.fx.symbolic_trace(layer)
    torch.manual_seed(2)
    want = layer(x)
    torch.manual_seed(2)
    assert_bitwise_equal(traced(x), want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: fd.dropout_linear(t, layer[0].weight, layer[0].bias, 0.5, seed=4))
    assert_bitwise_equal(compiled(x), fd.dropout_linear(x, layer[0].weight, layer[0].bias, 0.5, seed=4))
