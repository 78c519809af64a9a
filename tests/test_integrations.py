"""FusedDropout inside the machinery people train with: replace_dropout on real torchvision
models, activation checkpointing, torch.export, autocast and DistributedDataParallel."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import fused_dropout
from fused_dropout import FusedDropout, FusedDropout2d, replace_dropout

from helpers import DEVICES, free_port, random_input

FUSED_TYPES = (FusedDropout, fused_dropout.FusedDropout1d, FusedDropout2d, fused_dropout.FusedDropout3d)


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "squeezenet1_0", "efficientnet_b0"])
def test_replace_dropout_on_torchvision_models(name):
    torch.manual_seed(0)
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    model = getattr(torchvision.models, name)(weights=None)
    before = {type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    settings = [(m.p, m.inplace) for m in model.modules() if type(m) in (nn.Dropout, nn.Dropout2d)]
    assert settings, f"{name} has no dropout to replace"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert replace_dropout(model, fuse_activations=False) is model  # test_family.py covers the fusion
    assert not any(type(m) in (nn.Dropout, nn.Dropout2d) for m in model.modules()), before
    fused = [m for m in model.modules() if isinstance(m, FUSED_TYPES)]
    assert [(m.p, m.inplace) for m in fused] == settings and all(not m.training for m in fused)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # eval: identical outputs
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


class CustomDropout(nn.Dropout):
    """A user's subclass: its forward may differ, so replace_dropout leaves it alone."""


def test_replace_dropout_keeps_training_mode_and_warns_about_the_rest():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.2, inplace=True), CustomDropout(0.1), nn.Sequential(nn.Dropout2d(0.3))
    )
    model[3].eval()
    with pytest.warns(UserWarning, match=r"left these modules unchanged.*2 \(CustomDropout\)"):
        replace_dropout(model)
    assert isinstance(model[1], FusedDropout) and model[1].inplace and model[1].p == 0.2 and model[1].training
    assert type(model[2]) is CustomDropout
    assert isinstance(model[3][0], FusedDropout2d) and not model[3][0].training
    assert isinstance(replace_dropout(nn.Dropout(0.4)), FusedDropout)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(32, 32), FusedDropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recomputes_the_same_mask(device, use_reentrant):
    torch.manual_seed(0)
    block = Block().to(device)
    x = random_input((16, 32), torch.float32, device).requires_grad_(True)

    def run(checkpointed):
        torch.manual_seed(7)
        block.zero_grad()
        x.grad = None
        out = checkpoint(block, x, use_reentrant=use_reentrant) if checkpointed else block(x)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), block.fc.weight.grad.clone()

    for plain, checkpointed in zip(run(False), run(True)):
        assert torch.equal(plain, checkpointed)


@pytest.mark.parametrize("training", [False, True])
def test_torch_export(training):
    model = nn.Sequential(nn.Linear(8, 8), FusedDropout(0.5)).train(training)
    x = torch.randn(4, 8)
    exported = torch.export.export(model, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("fused_dropout.dropout" in op for op in ops) == training
    if training:
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert torch.equal(exported.module()(x), expected)
    else:
        assert torch.equal(exported.module()(x), model(x))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_dropout_in_its_input_dtype(device):
    model = nn.Sequential(nn.Linear(16, 16), FusedDropout(0.5)).to(device)
    x = random_input((8, 16), torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        hidden = model[0](x)
        torch.manual_seed(3)
        y = model(x)
    assert hidden.dtype == y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].weight.grad is not None


class FunctionalDropout(nn.Module):
    """A layer that calls F.dropout itself, as transformers' attention does."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, self.training)


def _ddp_worker(rank, world, port, results, functional=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same weights on every rank
    dropout = FunctionalDropout() if functional else FusedDropout(0.5)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), dropout, nn.Linear(64, 2))
    if functional:
        fused_dropout.replace_dropout(model, functional=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(100 + rank)  # each rank its own dropout stream
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(256, 20, generator=generator)
    y = (x[:, 0] > 0).long()
    shard = slice(rank * 128, (rank + 1) * 128)
    mask = (ddp.module[2](torch.ones(64)) != 0).tolist()
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(ddp(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    grad = model[0].weight.grad.clone()
    results[rank] = {
        "mask": mask,
        "grad": grad,
        "first": losses[0],
        "last": losses[-1],
        "weight": model[0].weight.detach().clone(),
    }
    dist.destroy_process_group()


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional_mode"])
def test_ddp_two_cpu_ranks(functional):
    port = free_port()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, port, results, functional), nprocs=2, join=True)
    a, b = results[0], results[1]
    assert a["mask"] != b["mask"]  # ranks draw different masks
    assert torch.equal(a["grad"], b["grad"])  # gradients are all-reduced
    assert torch.equal(a["weight"], b["weight"])  # so the replicas stay identical
    assert a["last"] < 0.5 * a["first"] and b["last"] < 0.5 * b["first"]  # and training converges


class LoraLike(nn.Module):
    """A frozen Linear whose output passes a functional dropout (as transformers' attention
    calls F.dropout), beside a trainable dropout + A + B adapter, as a LoRA layer runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(16, 16).requires_grad_(False)
        self.a = fused_dropout.FusedDropoutLinear(16, 4, bias=False, p=0.3)
        self.b = nn.Linear(4, 16)

    def forward(self, x):
        base = nn.functional.dropout(self.base(x), 0.2, self.training)
        return (base + self.b(self.a(x))).square().mean()


def _torch_dropout_calls(run):
    """How many times torch's own dropout kernels (native_dropout, bernoulli) ran in run()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if "bernoulli" in name or "native_dropout" in name:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.calls


def _fsdp2_worker(rank, world, port, results):
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = replace_dropout(LoraLike(), functional=True)
    fully_shard(model.a)
    fully_shard(model.b)
    fully_shard(model)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    torch.manual_seed(100 + rank)  # each rank its own masks
    # Two steps: the first runs the mode over the whole model, the second only where it is needed.
    calls = _torch_dropout_calls(lambda: [model(x).backward() for _ in range(2)])
    results[rank] = {
        "torch_dropout_calls": calls,
        **{name: p.grad.full_tensor() for name, p in model.named_parameters() if p.requires_grad},
    }
    dist.destroy_process_group()


def test_fsdp2_two_cpu_ranks_with_fused_dropout_linear_and_functional_mode():
    pytest.importorskip("torch.distributed.fsdp", reason="torch lacks FSDP2")
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_fsdp2_worker, args=(2, port, results), nprocs=2, join=True)
    # The unsharded model, each rank's batch with that rank's masks, gradients averaged as FSDP's are.
    model = replace_dropout(LoraLike(), functional=True)
    for rank in range(2):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
        torch.manual_seed(100 + rank)
        for _ in range(2):
            (model(x) / 2).backward()
    for rank in range(2):
        assert results[rank]["torch_dropout_calls"] == 0  # the functional call ran fused too
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(results[rank][name], p.grad)


class Classifier(nn.Module):
    """A head with a dropout module before a Linear and a functional dropout in its forward."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))

    def forward(self, x):
        return self.layers(nn.functional.dropout(x, 0.1, self.training))


def test_lightning_trains_the_fused_model_and_its_checkpoint_loads_into_the_stock_one(tmp_path):
    lightning = pytest.importorskip("lightning", reason="lightning is not installed")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = replace_dropout(Classifier(), functional=True)

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    module = Module()
    assert isinstance(module.model.layers[3], fused_dropout.FusedDropoutLinear)
    trainer = lightning.Trainer(
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    calls = _torch_dropout_calls(lambda: trainer.fit(module, data))
    assert calls == 0 and trainer.global_step == 4
    trainer.save_checkpoint(tmp_path / "fused.ckpt")
    state = torch.load(tmp_path / "fused.ckpt", weights_only=True)["state_dict"]
    stock = Classifier()
    stock.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    stock.eval(), module.model.eval()
    assert torch.equal(stock(x), module.model(x))
