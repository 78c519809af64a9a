"""Reach into the models people train: timm's DropPath swapped, functional dropout in
transformers' and timm's code routed to the fused ops, and a warning for whatever is left.
Models are built from configs with random weights; nothing is downloaded."""

import copy
import gc
import os
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import fused_dropout as fd

from helpers import assert_bitwise_equal, random_input

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class CountTorchDropout(TorchDispatchMode):
    """Counts the dropout that runs in torch's own kernels: native_dropout, bernoulli, and the
    fused ops, by name."""

    def __init__(self):
        super().__init__()
        self.torch_kernels = 0
        self.fused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "bernoulli" in name or "native_dropout" in name or name.startswith("aten.dropout"):
            self.torch_kernels += 1
        if name.startswith("fused_dropout."):
            self.fused += 1
        return func(*args, **(kwargs or {}))


def training_step(model, run):
    with CountTorchDropout() as count:
        run(model).backward()
    return count


def assert_every_dropout_fused(model, run, steps=3):
    """The first training step runs the mode over the whole model and notes where functional
    dropout is called; the steps after it hook only those modules. Every step must be fused."""
    for step in range(steps):
        count = training_step(model, run)
        assert (count.torch_kernels, count.fused > 0) == (0, True), f"step {step}"


def replaced_quietly(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fd.replace_dropout(model, **kwargs)
    return [str(w.message) for w in caught if "replace_dropout" in str(w.message)]


# timm's DropPath.


def test_fused_drop_path_is_timms_drop_path():
    timm = pytest.importorskip("timm")
    for drop_prob, scale_by_keep in [(0.0, True), (0.25, True), (0.25, False), (1.0, True)]:
        stock = timm.layers.DropPath(drop_prob, scale_by_keep)
        fused = fd.FusedDropPath(drop_prob, scale_by_keep)
        assert repr(fused).split("(", 1)[1] == repr(stock).split("(", 1)[1]
        assert (fused.drop_prob, fused.scale_by_keep) == (stock.drop_prob, stock.scale_by_keep)
        assert fused.state_dict() == stock.state_dict() == {}
        x = random_input((64, 3, 5), torch.float32)
        assert fused.eval()(x) is x
        out = fused.train()(x)
        kept = out.flatten(1).ne(0).all(1)
        dropped = out.flatten(1).eq(0).all(1)
        assert bool((kept | dropped).all()), "one decision per sample"
        scale = 1 / (1 - drop_prob) if scale_by_keep and drop_prob < 1 else 1.0
        # The scale is held in float32, as the mask rule holds it for float32 inputs.
        assert_bitwise_equal(out[kept], x[kept] * torch.tensor(scale, dtype=torch.float32))
        if 0 < drop_prob < 1:
            assert 0 < int(dropped.sum()) < 64


def test_drop_path_without_scaling_replays_its_mask_in_backward():
    x = random_input((16, 7), torch.float64).requires_grad_(True)
    out = fd.stochastic_depth(x, 0.5, "row", scale_by_keep=False, seed=11)
    keep = out.ne(0).all(1, keepdim=True).expand_as(x)
    assert_bitwise_equal(out, torch.where(keep, x, 0.0).detach())
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert_bitwise_equal(grad, keep.double())
    assert torch.autograd.gradcheck(
        lambda t: fd.stochastic_depth(t, 0.5, "row", scale_by_keep=False, seed=11), (x,), check_forward_ad=True
    )


TIMM_MODELS = {
    "vit_tiny_patch16_224": {},
    "deit_tiny_patch16_224": {},
    "convnext_atto": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    # Swin-T's blocks, at a width and depth a CPU test affords.
    "swin_tiny_patch4_window7_224": dict(
        img_size=64, window_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)
    ),
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_lose_every_torch_dropout(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    config = TIMM_MODELS[name]
    stock = timm.create_model(name, pretrained=False, drop_path_rate=0.1, drop_rate=0.2, num_classes=10, **config)
    size = config.get("img_size", 224)
    x = random_input((2, 3, size, size), torch.float32)
    model = copy.deepcopy(stock)
    fd.replace_dropout(model, functional=True)
    drop_paths = [m for m in model.modules() if isinstance(m, fd.FusedDropPath)]
    assert drop_paths or name.startswith("mobilenet"), "timm's DropPath was not swapped"
    assert not any(type(m).__name__ == "DropPath" for m in model.modules())
    # eval outputs are the stock model's, and the state_dict loads strictly both ways
    stock.eval(), model.eval()
    assert_bitwise_equal(model(x), stock(x))
    model.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(model.state_dict(), strict=True)
    stock.train(), model.train()
    assert training_step(stock, lambda m: m(x).sum()).torch_kernels > 0
    assert_every_dropout_fused(model, lambda m: m(x).sum(), steps=2)


def test_a_module_registered_twice_is_replaced_once_in_both_places():
    timm = pytest.importorskip("timm")
    shared = timm.layers.DropPath(0.2)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    fd.replace_dropout(model)
    assert isinstance(model[1], fd.FusedDropPath) and model[1] is model[3]


def test_what_is_left_is_named_once():
    timm = pytest.importorskip("timm")

    class MyDropout(nn.Dropout):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.DropBlock2d(0.1), MyDropout(0.2), nn.Dropout(0.1))
    messages = replaced_quietly(model)
    assert len(messages) == 1
    assert "1 (DropBlock2d)" in messages[0] and "2 (MyDropout)" in messages[0]
    assert isinstance(model[3], fd.FusedDropout)


# Functional dropout, reached.


@pytest.mark.parametrize(
    "call,fused",
    [
        (lambda x: F.dropout(x, 0.3), lambda x: fd.dropout(x, 0.3)),
        (lambda x: F.dropout(x, p=0.3, training=True), lambda x: fd.dropout(x, 0.3)),
        (lambda x: F.dropout2d(x, 0.3), lambda x: fd.dropout2d(x, 0.3)),
        (lambda x: F.alpha_dropout(x, 0.3, True), lambda x: fd.alpha_dropout(x, 0.3, True)),
        (lambda x: F.feature_alpha_dropout(x, 0.3, True), lambda x: fd.feature_alpha_dropout(x, 0.3, True)),
        (lambda x: F.dropout(x.clone(), 0.3, inplace=True), lambda x: fd.dropout(x.clone(), 0.3, inplace=True)),
    ],
)
def test_functional_mode_answers_torchs_dropout_with_the_fused_op(call, fused):
    x = random_input((4, 6, 5, 3), torch.float32)
    with fd.functional_mode():
        torch.manual_seed(0)
        routed = call(x)
        assert torch.equal(F.relu(x), x.clamp_min(0))  # other calls pass through
    torch.manual_seed(0)
    assert_bitwise_equal(routed, fused(x))


def test_functional_mode_keeps_torchs_semantics():
    x = random_input((8, 8), torch.float32)
    with fd.functional_mode():
        assert F.dropout(x, 0.5, training=False) is x
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
            F.dropout(x, 1.5)
        with CountTorchDropout() as count:
            F.dropout(x, 0.5)
    assert count.torch_kernels == 0 and count.fused == 1


def test_functional_mode_compiles_without_a_graph_break():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            return F.dropout(self.linear(x), 0.3, self.training)

    model = nn.Sequential(Block(), Block(), nn.Linear(8, 8))
    fd.replace_dropout(model, functional=True)
    x = random_input((4, 8), torch.float32)
    # Compiled before and after the eager step that narrows the hooks to the two Blocks; the
    # eager run draws the fused masks, so equal outputs mean the compiled graph does too.
    for hooked in (["Block", "Linear", "Sequential"], ["Block"]):
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.manual_seed(0)
        out = compiled(x)
        assert _hooked(model) == hooked, "compiling learns nothing"
        torch.manual_seed(0)
        assert_bitwise_equal(out, model(x))


def test_a_copy_learns_on_its_own_and_a_deleted_model_is_freed_at_once():
    model = nn.Sequential(nn.Linear(8, 8), _Head(0.3), nn.Linear(8, 8))
    fd.replace_dropout(model, functional=True)
    copied = copy.deepcopy(model)
    x = random_input((4, 8), torch.float32)
    assert_every_dropout_fused(copied, lambda m: m(x).sum())
    assert _hooked(copied) == ["_Head"] and _hooked(model) == ["Linear", "Sequential", "_Head"]
    assert_every_dropout_fused(model, lambda m: m(x).sum())
    # The hooks hold no reference back to the model: without a cycle, deleting it frees it.
    gc.disable()
    try:
        freed = weakref.ref(model)
        del model
        assert freed() is None
    finally:
        gc.enable()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_refuses_the_mode_and_scripts_the_model_without_it():
    model = nn.Sequential(nn.Linear(8, 8), _Head(0.3))
    fd.replace_dropout(model, functional=True)
    with pytest.raises(RuntimeError, match="Hook"):
        torch.jit.script(model)  # scripted code runs no torch function mode: not silently unfused
    fd.remove_functional_mode(model)
    x = random_input((4, 8), torch.float32)
    torch.manual_seed(0)
    scripted = torch.jit.script(model)(x)
    torch.manual_seed(0)
    assert_bitwise_equal(scripted, model(x))


def test_export_of_a_model_with_functional_dropout():
    class Block(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.3, True) * 2

    model = Block()
    fd.replace_dropout(model, functional=True)
    program = torch.export.export(model, (random_input((4, 8), torch.float32),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any("fused_dropout" in t for t in targets), targets
    assert not any("native_dropout" in t or "bernoulli" in t for t in targets)


def _gpt2(layers=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=2, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").train()


def _loss(ids):
    return lambda model: model(input_ids=ids, labels=ids).loss


def test_gpt2_eager_attention_dropout_is_reached_and_removable():
    model = _gpt2()
    ids = torch.randint(0, 128, (2, 16))
    assert training_step(model, _loss(ids)).torch_kernels == 7
    messages = replaced_quietly(model)
    assert any("functional=True" in m for m in messages)
    assert training_step(model, _loss(ids)).torch_kernels == 2  # the attention dropout, in F.dropout
    keys = list(model.state_dict())
    fd.replace_dropout(model, functional=True)
    assert_every_dropout_fused(model, _loss(ids))
    assert list(model.state_dict()) == keys
    fd.remove_functional_mode(model)
    assert training_step(model, _loss(ids)).torch_kernels == 2


def test_gradient_checkpointing_recomputes_the_same_masks():
    ids = torch.randint(0, 128, (2, 16))
    plain = _gpt2()
    fd.replace_dropout(plain, functional=True)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    late = copy.deepcopy(plain)  # checkpointing turned on after the step that narrows the hooks
    for step in range(2):
        if step == 1:
            late.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        grads = []
        for model in (plain, checkpointed, late):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5 + step)
            count = training_step(model, _loss(ids))
            assert count.torch_kernels == 0
            grads.append([p.grad.clone() for p in model.parameters()])
        for ours in grads[1:]:
            for a, b in zip(grads[0], ours):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_functional_dropout_in_a_function_checkpointed_inside_a_module_is_refused(use_reentrant):
    class Inner(nn.Module):
        # Checkpoints a function of its own: recomputed in backward with no module call around it.
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            return checkpoint(self.branch, x, use_reentrant=use_reentrant)

        def branch(self, x):
            return F.dropout(self.linear(x), 0.5, self.training) * 2

    model = nn.Sequential(nn.Linear(8, 8), Inner())
    fd.replace_dropout(model, functional=True)
    x = random_input((4, 8), torch.float32).requires_grad_(True)
    message = "Inner's forward calls torch.nn.functional.dropout inside a function that torch.utils.checkpoint"
    with pytest.raises(RuntimeError, match=message):
        model(x)
    fd.remove_functional_mode(model)
    model(x).sum().backward()  # torch's dropout, recomputed by torch: consistent


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_checkpointed_module_recomputes_the_forwards_mask(use_reentrant):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = _Head(0.5)

        def forward(self, x):
            return checkpoint(self.head, x, use_reentrant=use_reentrant) * 2

    model = Outer()
    fd.replace_dropout(model, functional=True)
    x = random_input((4, 8), torch.float32).requires_grad_(True)
    for step in range(3):  # the learning forward, then the narrowed ones
        model.zero_grad(set_to_none=True)
        count = training_step(model, lambda m: m(x).sum())
        assert count.torch_kernels == 0, f"step {step}"
        out = model(x)  # the next draw; its gradient below is of the same mask
        model.zero_grad(set_to_none=True)
        out.sum().backward()
        kept = out.ne(0).to(out.dtype)
        torch.testing.assert_close(model.head.linear.bias.grad, (kept * 4).sum(0), rtol=0, atol=1e-6)


class _ModeProbe:
    """Records, per class, how many torch function modes are active when a module's forward
    starts (a pre-hook registered after replace_dropout's runs after it)."""

    def __init__(self, model):
        self.seen = {}
        for module in model.modules():
            module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.seen[type(module).__name__] = torch._C._len_torch_function_stack()


def _hooked(model):
    return sorted({type(m).__name__ for m in model.modules() if m._forward_pre_hooks})


def test_the_mode_runs_only_where_functional_dropout_is_called():
    transformers = pytest.importorskip("transformers")
    model = _gpt2()
    fd.replace_dropout(model, functional=True)
    ids = torch.randint(0, 128, (2, 16))
    assert len(_hooked(model)) > 5  # until the first training forward, every module
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(_hooked(model)) > 5, "an eval forward calls no dropout: it must not narrow"
    model.train()
    training_step(model, _loss(ids))
    assert _hooked(model) == ["GPT2Attention"]
    assert all(
        isinstance(m, transformers.models.gpt2.modeling_gpt2.GPT2Attention)
        for m in model.modules()
        if m._forward_pre_hooks
    )
    probe = _ModeProbe(model)
    training_step(model, _loss(ids))
    assert probe.seen["GPT2Attention"] == 1 and probe.seen["GPT2MLP"] == probe.seen["GPT2Model"] == 0
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert probe.seen["GPT2Attention"] == 0, "in eval the mode is not entered"


class _Head(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.linear(x), self.p, self.training)


def test_learning_takes_a_whole_training_forward_and_starts_over_on_replace():
    model = nn.Sequential(nn.Linear(8, 8), _Head(0.3), nn.ReLU())
    fd.replace_dropout(model, functional=True)
    with pytest.raises(RuntimeError):
        model(random_input((4, 3), torch.float32))  # raises before any dropout call
    model[1](random_input((4, 8), torch.float32))  # a submodule on its own does not end learning
    assert len(_hooked(model)) == 4
    x = random_input((4, 8), torch.float32)
    assert_every_dropout_fused(model, lambda m: m(x).sum())
    assert _hooked(model) == ["_Head"]
    # A module added later is not hooked until replace_dropout runs again, which learns anew.
    model.append(_Head(0.2))
    assert training_step(model, lambda m: m(x).sum()).torch_kernels == 1
    fd.replace_dropout(model, functional=True)
    assert_every_dropout_fused(model, lambda m: m(x).sum())
    assert _hooked(model) == ["_Head"] and model[3]._forward_pre_hooks
    fd.remove_functional_mode(model)
    assert _hooked(model) == [] and training_step(model, lambda m: m(x).sum()).torch_kernels == 2


def _transformers_model(transformers, name):
    """A small model of the family, eager attention, and its training loss."""
    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    ids = torch.randint(1, 128, (2, 16))
    if name == "bert":
        config = transformers.BertConfig(vocab_size=128, **small)
        return transformers.BertForMaskedLM._from_config(config, attn_implementation="eager"), _loss(ids)
    if name == "t5":
        config = transformers.T5Config(
            num_layers=2, d_model=64, num_heads=2, d_ff=128, d_kv=32, vocab_size=128, decoder_start_token_id=0
        )
        return transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="eager"), _loss(ids)
    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=128, attention_dropout=0.1, **small)
        return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager"), _loss(ids)
    dropouts = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=3, **dropouts, **small)
    model = transformers.ViTForImageClassification._from_config(config, attn_implementation="eager")
    pixels = random_input((2, 3, 32, 32), torch.float32)
    return model, lambda m: m(pixel_values=pixels, labels=torch.tensor([0, 2])).loss


@pytest.mark.parametrize("name", ["bert", "t5", "llama", "vit"])
def test_transformers_models_lose_every_torch_dropout(name):
    transformers = pytest.importorskip("transformers")
    model, loss = _transformers_model(transformers, name)
    model.train()
    assert training_step(model, loss).torch_kernels > 0
    fd.replace_dropout(model, functional=True)
    assert_every_dropout_fused(model, loss)


def test_peft_lora_dropout_is_swapped_when_replaced_after_get_peft_model():
    peft = pytest.importorskip("peft")
    model = _gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(model, config)
    fd.replace_dropout(model, functional=True)
    lora_dropouts = [m for name, m in model.named_modules() if "lora_dropout" in name and not len(m._modules)]
    assert lora_dropouts and all(isinstance(m, fd.FusedDropout) for m in lora_dropouts)
    ids = torch.randint(0, 128, (2, 16))
    assert_every_dropout_fused(model, _loss(ids))
