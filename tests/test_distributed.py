"""The fused ops on DTensors, on two gloo ranks of this machine: a sharded call equals the call
on the full tensor bit for bit, forward and backward, on every placement.

Each test module spawns its ranks once (a few seconds) and runs every case in them; the
parametrized tests below then read each case's outcome, so a failure names its op and
placement.
"""

import os
import subprocess
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_dropout as fd

from helpers import free_port

dtensor = pytest.importorskip("torch.distributed.tensor", reason="torch lacks DTensor")
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402

WORLD = 2
SEED, OFFSET = 1234, 3  # an offset that is not a multiple of 4 moves every Philox group
PLACEMENTS = {"replicate": Replicate(), "shard0": Shard(0), "shard1": Shard(1), "shard_last": Shard(-1)}
# (9, 7, 3): shards of 5 and 4, 4 and 3, 2 and 1; (1, 5, 3): rank 1's shard of dim 0 is empty.
SHAPES = {"even": (4, 6, 8), "uneven": (9, 7, 3), "one_row": (1, 5, 3)}


def _tensor(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _last_dim_vector(shape, seed):
    return _tensor(shape[-1:], seed)


# Each form as f(x, extras, randomness) -> output, with the 1-D extras along the last dim and
# the tensors that line up with x. `randomness` is seed=... or nothing (the default generator).
FORMS = {
    "dropout": lambda x, e, r: fd.dropout(x, 0.4, **r),
    "dropout_shared_dims": lambda x, e, r: fd.dropout(x, 0.4, shared_dims=(1,), **r),
    "dropout2d": lambda x, e, r: fd.dropout2d(x, 0.4, **r),
    "alpha_dropout": lambda x, e, r: fd.alpha_dropout(x, 0.3, training=True, **r),
    "feature_alpha_dropout": lambda x, e, r: fd.feature_alpha_dropout(x, 0.3, training=True, **r),
    "dropout_add": lambda x, e, r: fd.dropout_add(x, e["residual"], 0.4, bias=e["bias"], **r),
    "act_dropout_gelu": lambda x, e, r: fd.act_dropout(x, 0.4, activation="gelu", bias=e["bias"], **r),
    "act_dropout_relu": lambda x, e, r: fd.act_dropout(x, 0.4, activation="relu", **r),
    "stochastic_depth_row": lambda x, e, r: fd.stochastic_depth(x, 0.5, "row", **r),
    "stochastic_depth_unscaled": lambda x, e, r: fd.stochastic_depth(x, 0.5, "row", scale_by_keep=False, **r),
    "drop_path_add": lambda x, e, r: fd.drop_path_add(x, e["residual"], 0.5, **r),
    "dropout_add_layer_norm": lambda x, e, r: fd.dropout_add_layer_norm(
        x, e["residual"], e["weight"], e["bias"], 0.4, **r
    ),
    "dropout_add_rms_norm": lambda x, e, r: fd.dropout_add_rms_norm(x, e["residual"], e["weight"], 0.4, **r),
    "dropout_bfloat16": lambda x, e, r: fd.dropout(x.bfloat16(), 0.4, **r),
    "dropout_add_bfloat16_float32_residual": lambda x, e, r: fd.dropout_add(x.bfloat16(), e["residual"], 0.4, **r),
    "dropout_linear": lambda x, e, r: fd.dropout_linear(x, e["linear_weight"], e["linear_bias"], 0.4, **r),
}
LINED_UP = ("residual",)


def _fails_as_torch_linear(shape):
    """dropout_linear's backward flattens the leading dims as torch's linear does, which DTensor
    refuses for unevenly sharded ones: the check that F.linear fails there with the same error."""

    def check(mesh, placement, error):
        x = distribute_tensor(_tensor(shape, 1), mesh, [placement]).requires_grad_()
        w = distribute_tensor(_tensor((5, shape[-1]), 14), mesh, [Replicate()])
        try:
            nn.functional.linear(x, w).sum().backward()
        except RuntimeError as torch_error:
            return str(torch_error).splitlines()[0] in str(error)
        return False

    return check


DTENSOR_LIMITS = {
    f"dropout_linear-{name}-shard0": _fails_as_torch_linear(SHAPES[name]) for name in ("uneven", "one_row")
}
ALONG_LAST_DIM = ("bias", "weight")


def _extras(shape):
    return {
        "residual": _tensor(shape, 11),
        "bias": _last_dim_vector(shape, 12),
        "weight": _last_dim_vector(shape, 13) + 1,
        "linear_weight": _tensor((5, shape[-1]), 14),
        "linear_bias": _tensor((5,), 15),
    }


def _distribute(extras, mesh, placement):
    """The extras as DTensors: the lined-up ones in the input's placement, the 1-D ones and
    the Linear's parameters replicated (each op's handler shards what it needs)."""
    return {
        name: distribute_tensor(value.clone().requires_grad_(), mesh, [placement if name in LINED_UP else Replicate()])
        for name, value in extras.items()
    }


def _grads(tensors):
    return {name: t.grad for name, t in tensors.items() if t.grad is not None}


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def _compare(case, expected, actual):
    """Bit-equality of every tensor, or a message naming the first that differs. Sums that the
    shards split are equal to float32 rounding only: the norm forms' weight and bias gradients
    (sums over rows) and dropout_linear's products (DTensor's matmul may contract a sharded dim
    as partial sums). A wrong mask there still differs by whole kept values."""
    for name, want in expected.items():
        got = _full(actual.get(name))
        if got is None:
            return f"{case}: no {name}"
        split_sum = name in ("weight", "bias") or case.startswith("dropout_linear")
        rounding_only = split_sum and "shard" in case
        if rounding_only:
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                return f"{case}: {name} differs beyond rounding, max {(got - want).abs().max().item()}"
        elif not torch.equal(got, want):
            return f"{case}: {name} differs at {int((got != want).sum())} of {want.numel()} elements"
    return None


def _run_form(form, x, extras, randomness):
    out = FORMS[form](x, extras, randomness)
    upstream = _tensor(tuple(out.shape), 21)
    if isinstance(out, DTensor):
        upstream = distribute_tensor(upstream, out.device_mesh, [Replicate()])
    (out * upstream).sum().backward()
    return {"output": out, "input_grad": x.grad, **_grads(extras)}


def _placement_cases(mesh, results):
    for form in FORMS:
        for shape_name, shape in SHAPES.items():
            full_input = _tensor(shape, 1)
            plain_extras = {k: v.clone().requires_grad_() for k, v in _extras(shape).items()}
            expected = _run_form(
                form, full_input.clone().requires_grad_(), plain_extras, {"seed": SEED, "offset": OFFSET}
            )
            expected = {k: v.detach() for k, v in expected.items()}
            for placement_name, placement in PLACEMENTS.items():
                case = f"{form}-{shape_name}-{placement_name}"
                try:
                    actual = _run_form(
                        form,
                        distribute_tensor(full_input.clone(), mesh, [placement]).requires_grad_(),
                        _distribute(_extras(shape), mesh, placement),
                        {"seed": SEED, "offset": OFFSET},
                    )
                    results[case] = _compare(case, expected, actual)
                except Exception as error:
                    limit = DTENSOR_LIMITS.get(case)
                    results[case] = None if limit and limit(mesh, placement, error) else traceback.format_exc()


def _unseeded_cases(mesh, results):
    """The default generator, seeded alike on every rank: two calls in a row equal the same two
    calls on the full tensor (so every rank advanced its generator by the full draw)."""
    shape = SHAPES["uneven"]
    full_input = _tensor(shape, 1)
    torch.manual_seed(7)
    expected = [fd.dropout(full_input, 0.5), fd.act_dropout(full_input, 0.5)]
    for placement_name, placement in PLACEMENTS.items():
        case = f"unseeded-{placement_name}"
        try:
            x = distribute_tensor(full_input, mesh, [placement])
            torch.manual_seed(7)
            actual = [fd.dropout(x, 0.5).full_tensor(), fd.act_dropout(x, 0.5).full_tensor()]
            same = all(torch.equal(a, b) for a, b in zip(actual, expected))
            results[case] = None if same else f"{case}: the sharded calls differ from the full ones"
        except Exception:
            results[case] = traceback.format_exc()


# Two mesh dims over the two ranks: one of them has size 1, so each placement pair shards a
# tensor dim once, twice (nested) or along two tensor dims at once.
MESH_2D = {
    "2x1-shard0-shard1": ((2, 1), (Shard(0), Shard(1))),
    "1x2-shard1-shard0": ((1, 2), (Shard(1), Shard(0))),
    "2x1-shard0-shard0": ((2, 1), (Shard(0), Shard(0))),
    "1x2-partial-shard_last": ((1, 2), (Partial(), Shard(-1))),
}


def _mesh_2d_cases(results):
    shape = SHAPES["uneven"]
    full, residual = _tensor(shape, 1), _tensor(shape, 2)
    expected = fd.dropout_add(full, residual, 0.4, seed=SEED, offset=OFFSET)
    meshes = {}
    for name, (mesh_shape, placements) in MESH_2D.items():
        case = f"mesh_2d-{name}"
        try:
            if mesh_shape not in meshes:
                meshes[mesh_shape] = dtensor.init_device_mesh("cpu", mesh_shape)
            mesh = meshes[mesh_shape]
            # Partial over a mesh dim of size 1: its one rank holds the whole sum.
            boxes = [Replicate() if isinstance(p, Partial) else p for p in placements]
            local = distribute_tensor(full, mesh, boxes).to_local()
            x = DTensor.from_local(local, mesh, placements, shape=full.shape, stride=full.stride())
            actual = fd.dropout_add(
                x, distribute_tensor(residual, mesh, [Replicate(), Replicate()]), 0.4, seed=SEED, offset=OFFSET
            )
            results[case] = None if torch.equal(actual.full_tensor(), expected) else f"{case}: differs"
        except Exception:
            results[case] = traceback.format_exc()


def _inplace_cases(mesh, results):
    shape = SHAPES["uneven"]
    full_input = _tensor(shape, 1)
    expected = fd.dropout(full_input.clone(), 0.4, inplace=True, seed=SEED, offset=OFFSET)
    for placement_name, placement in PLACEMENTS.items():
        case = f"inplace-{placement_name}"
        try:
            x = distribute_tensor(full_input.clone(), mesh, [placement])
            local = x.to_local()
            out = fd.dropout(x, 0.4, inplace=True, seed=SEED, offset=OFFSET)
            ok = out is x and torch.equal(x.full_tensor(), expected) and torch.equal(local, x.to_local())
            results[case] = None if ok else f"{case}: in-place dropout on the shards differs from the full call"
        except Exception:
            results[case] = traceback.format_exc()


def _redistribution_cases(mesh, results, rank):
    """Inputs that are redistributed first, operands in other placements, and a plain operand."""
    from torch.distributed.tensor.placement_types import _StridedShard

    full, residual = _tensor((8, 6), 1), _tensor((8, 6), 2)
    parts = [_tensor((8, 6), 30 + r) for r in range(WORLD)]
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    cases = {
        # A Partial input is summed (redistributed to Replicate) before dropout.
        "partial": lambda: (
            fd.dropout(DTensor.from_local(parts[rank], mesh, [Partial()]), 0.4, seed=SEED),
            fd.dropout(parts[0] + parts[1], 0.4, seed=SEED),
        ),
        # Shards that are not boxes are replicated first.
        "strided_shard": lambda: (
            fd.dropout(sharded.redistribute(mesh, [_StridedShard(0, split_factor=2)]), 0.4, seed=SEED),
            fd.dropout(full, 0.4, seed=SEED),
        ),
        # A plain rng_state (a state saved from a plain call) stands for every rank.
        "plain_rng_state": lambda: (
            fd.ops.dropout_replay(distribute_tensor(full, mesh, [Shard(1)]), torch.tensor([SEED, OFFSET]), 0.4),
            fd.ops.dropout_replay(full, torch.tensor([SEED, OFFSET]), 0.4),
        ),
        # A residual sharded along another dim is redistributed to the input's placement.
        "residual_elsewhere": lambda: (
            fd.dropout_add(sharded, distribute_tensor(residual, mesh, [Shard(1)]), 0.4, seed=SEED),
            fd.dropout_add(full, residual, 0.4, seed=SEED),
        ),
    }
    # torch.compile (without fullgraph) breaks the graph at the DTensor handler: each shard still
    # draws its slice.
    compiled = torch.compile(lambda t: fd.dropout(t, 0.4, seed=SEED) * 2, backend="aot_eager")
    cases["compiled"] = lambda: (
        compiled(distribute_tensor(full, mesh, [Shard(1)])),
        fd.dropout(full, 0.4, seed=SEED) * 2,
    )
    for case, run in cases.items():
        try:
            actual, expected = run()
            results[case] = None if torch.equal(actual.full_tensor(), expected) else f"{case}: differs"
        except Exception:
            results[case] = traceback.format_exc()
    # A whole graph cannot hold a shard's window: fullgraph=True fails rather than trace the
    # local call without it.
    case = "compiled_fullgraph_refused"
    fullgraph = torch.compile(lambda t: fd.dropout(t, 0.4, seed=SEED), backend="aot_eager", fullgraph=True)
    try:
        fullgraph(sharded)
        results[case] = f"{case}: a sharded call was traced into a whole graph"
    except Exception as error:
        named = "fused_dropout.dropout" in str(error)
        results[case] = None if named else f"{case}: unclear error: {error}"
    case = "plain_operand"
    results[case] = None
    plain_beside_dtensor = {
        "residual is a torch.Tensor but the input is a DTensor": (sharded, residual),
        "input is a torch.Tensor but another operand is a DTensor": (full, sharded),
    }
    for message, (input, other) in plain_beside_dtensor.items():
        try:
            fd.dropout_add(input, other, 0.4, seed=SEED)
            results[case] = f"{case}: no error for a plain tensor beside a DTensor"
        except TypeError as error:
            if message not in str(error):
                results[case] = f"{case}: unclear message: {error}"


def _rng_check_case(mesh, results, rank):
    """Ranks whose generators disagree: the check mode names them; a seeded call passes."""
    case = "rng_check"
    x = distribute_tensor(_tensor((4, 6), 1), mesh, [Shard(0)])
    try:
        with fd.distributed.checking_rng():
            fd.dropout(x, 0.5, seed=SEED)
            torch.manual_seed(rank)
            fd.dropout(x, 0.5)
        results[case] = f"{case}: no error for generators that disagree"
    except RuntimeError as error:
        message = str(error)
        named = "rank 0 has" in message and "rank 1 has" in message and "torch.manual_seed" in message
        results[case] = None if named else f"{case}: unclear message: {message}"
    except Exception:
        results[case] = traceback.format_exc()


class Block(nn.Module):
    """A pre-norm transformer block: attention, then an MLP, each followed by a dropout and the
    residual add."""

    def __init__(self, width=8, heads=2, hidden=16):
        super().__init__()
        self.head_dim = width // heads
        self.attn_norm = nn.LayerNorm(width)
        self.q, self.k, self.v, self.proj = (nn.Linear(width, width) for _ in range(4))
        self.attn_dropout = fd.FusedDropout(0.3)
        self.mlp_norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)
        self.mlp_dropout = fd.FusedDropout(0.3)

    def heads(self, t):
        """(batch, seq, heads * head_dim) as (batch, heads, seq, head_dim); the heads counted
        from the width, so a rank holding half of them splits its half."""
        return t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def forward(self, x):
        h = self.attn_norm(x)
        attended = nn.functional.scaled_dot_product_attention(
            self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))
        )
        x = x + self.attn_dropout(self.proj(attended.transpose(1, 2).flatten(2)))
        return x + self.mlp_dropout(self.down(self.act(self.up(self.mlp_norm(x)))))


def _two_blocks():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def _masks_of(model):
    masks = []
    for block in model:
        for dropout in (block.attn_dropout, block.mlp_dropout):
            dropout.register_forward_hook(lambda m, i, o: masks.append(_full(o).detach() == 0))
    return masks


def _tensor_parallel_case(mesh, results):
    """Two blocks, Megatron style: attention heads and the MLP's hidden units split by
    ColwiseParallel/RowwiseParallel Linears, norms and dropouts SequenceParallel on DTensor
    activations sharded along the sequence. Loss and gradients equal the unsharded blocks' to
    float32 rounding, and every dropout mask equals theirs bit for bit."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    case = "tensor_parallel"
    try:
        batch = _tensor((2, 6, 8), 40)
        reference = _two_blocks()
        reference_masks = _masks_of(reference)
        sharded = _two_blocks()
        sharded_masks = _masks_of(sharded)
        plan = {}
        for i in range(2):
            for name in ("attn_norm", "mlp_norm", "attn_dropout", "mlp_dropout"):
                plan[f"{i}.{name}"] = SequenceParallel(use_local_output=False)
            for name in ("q", "k", "v"):  # local outputs: each rank's heads
                plan[f"{i}.{name}"] = ColwiseParallel(input_layouts=Shard(1))
            plan[f"{i}.up"] = ColwiseParallel(input_layouts=Shard(1), use_local_output=False)
            for name in ("proj", "down"):
                plan[f"{i}.{name}"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        parallelize_module(sharded, mesh, plan)
        losses = []
        for step in range(2):
            torch.manual_seed(100 + step)
            expected_loss = reference(batch).square().mean()
            expected_loss.backward()
            torch.manual_seed(100 + step)
            loss = sharded(distribute_tensor(batch, mesh, [Shard(1)])).full_tensor().square().mean()
            loss.backward()
            losses.append((loss.item(), expected_loss.item()))
        problems = [f"loss {a} != {b}" for a, b in losses if abs(a - b) > 1e-5 * abs(b)]
        masks = enumerate(zip(sharded_masks, reference_masks))
        problems += [f"mask {i} differs" for i, (a, b) in masks if not torch.equal(a, b)]
        problems += ["a mask dropped nothing" for m in reference_masks if not m.any()]
        for (name, p), (_, q) in zip(sharded.named_parameters(), reference.named_parameters()):
            if not torch.allclose(_full(p.grad), q.grad, rtol=1e-5, atol=1e-6):
                problems.append(f"grad of {name}")
        results[case] = f"{case}: " + "; ".join(problems) if problems else None
    except Exception:
        results[case] = traceback.format_exc()


def _swap_after_parallelize_case(mesh, results):
    """replace_dropout on a model already parallelized, its nn.Dropout under SequenceParallel:
    the FusedDropout keeps the plan's hooks and draws the unsharded model's mask."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    def stock():
        torch.manual_seed(0)
        return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.Dropout(0.3))

    case = "replace_dropout_after_parallelize"
    try:
        reference = fd.replace_dropout(stock())
        sharded = stock()
        plan = {
            "0": SequenceParallel(use_local_output=False),
            "1": ColwiseParallel(input_layouts=Shard(1), use_local_output=False),
            "3": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "4": SequenceParallel(use_local_output=False),
        }
        fd.replace_dropout(parallelize_module(sharded, mesh, plan))
        batch = _tensor((2, 6, 8), 41)
        torch.manual_seed(5)
        expected = reference(batch)
        torch.manual_seed(5)
        actual = sharded(distribute_tensor(batch, mesh, [Shard(1)]))
        ok = (
            isinstance(sharded[4], fd.FusedDropout)
            and actual.placements == (Shard(1),)
            and torch.equal(actual.full_tensor() == 0, expected == 0)
            and torch.allclose(actual.full_tensor(), expected, rtol=1e-5, atol=1e-6)
        )
        results[case] = None if ok else f"{case}: the swapped model differs from the unsharded one"
    except Exception:
        results[case] = traceback.format_exc()


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    mesh = dtensor.DeviceMesh("cpu", list(range(WORLD)))
    outcomes = {}
    _placement_cases(mesh, outcomes)
    _unseeded_cases(mesh, outcomes)
    _inplace_cases(mesh, outcomes)
    _mesh_2d_cases(outcomes)
    _redistribution_cases(mesh, outcomes, rank)
    _rng_check_case(mesh, outcomes, rank)
    _tensor_parallel_case(mesh, outcomes)
    _swap_after_parallelize_case(mesh, outcomes)
    results[rank] = outcomes
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=WORLD, join=True)
    return dict(results)


PLACEMENT_CASES = [f"{f}-{s}-{p}" for f in FORMS for s in SHAPES for p in PLACEMENTS]
OTHER_CASES = (
    [f"unseeded-{p}" for p in PLACEMENTS]
    + [f"inplace-{p}" for p in PLACEMENTS]
    + [f"mesh_2d-{name}" for name in MESH_2D]
    + [
        "partial",
        "strided_shard",
        "plain_rng_state",
        "compiled",
        "compiled_fullgraph_refused",
        "residual_elsewhere",
        "plain_operand",
        "rng_check",
        "tensor_parallel",
        "replace_dropout_after_parallelize",
    ]
)


@pytest.mark.parametrize("case", PLACEMENT_CASES + OTHER_CASES)
def test_two_ranks(outcomes, case):
    for rank in range(WORLD):
        assert outcomes[rank].get(case, f"{case} did not run") is None, outcomes[rank][case]


@pytest.mark.parametrize("first", ["fused_dropout", "torch.distributed.tensor"])
def test_handlers_register_whichever_module_is_imported_first(first):
    """Importing fused_dropout alone does not import DTensor (a second of start-up); the handlers
    are registered when it is imported, before or after fused_dropout."""
    second = "torch.distributed.tensor" if first == "fused_dropout" else "fused_dropout"
    names = sorted(fd.distributed._ELEMENTWISE) + ["norm_backward", "dropout_linear"]
    code = "\n".join(
        [
            "import sys, torch",
            f"import {first}",
            "assert 'torch.distributed.tensor' not in sys.modules" if first == "fused_dropout" else "",
            f"import {second}",
            "from torch.distributed.tensor import DTensor",
            "handlers = DTensor._op_dispatcher._custom_op_handlers",
            f"assert all(getattr(torch.ops.fused_dropout, name).default in handlers for name in {names})",
        ]
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
