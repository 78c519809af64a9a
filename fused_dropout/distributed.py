"""The fused ops on DTensors: each shard draws its slice of the mask the whole tensor draws.

The mask of an element is a function of its row-major index in the whole tensor's mask shape
(docs/design.md, "The mask rule"), so a shard needs nothing from the other ranks to draw its
part: its local call runs under a *mask window* (the whole tensor's sizes and the shard's first
index along each dim), and the kernels index the whole mask from there. ``full_tensor()`` of a
sharded call then equals the call on the full tensor bit for bit, on any placement, and the
backward replays the same slices whatever placement the gradient arrives in.

What each op's handler does (docs/design.md, "Distributed"):

- ``Replicate`` and ``Shard(d)`` (even or uneven) run as they are. ``Partial`` and
  ``_StridedShard`` (shards that are not boxes) are redistributed to ``Replicate`` first, and
  the normalizing ops also replicate a sharded last dim.
- Operands that line up with the input (a residual, the input of a backward) are
  redistributed to the input's placements; a bias or norm weight along the last dim is sharded
  as that dim is. Outputs keep the input's placements; ``rng_state`` is replicated.
- Randomness: a seeded call needs nothing more. An unseeded call draws ``(seed, base)`` from the
  default generator of each rank, and every rank advances it by the whole tensor's draw. The
  ranks of the mesh must therefore agree on the generator's state, the precondition of
  DTensor's own random ops: call ``torch.manual_seed`` with the same seed on every rank.
  ``FUSED_DROPOUT_CHECK_RNG=1`` (or ``with checking_rng():``) verifies that with one all-gather
  of the 16-byte state per call and raises an error naming the ranks that disagree.

The handlers are registered with DTensor when ``torch.distributed.tensor`` is imported, before
or after ``fused_dropout``; importing ``fused_dropout`` does not import it.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import threading
import warnings

import torch

from . import _C

_DTENSOR_MODULE = "torch.distributed.tensor"

# Per op: the argument whose shape the mask has (before shared dims), the arguments that line
# up with it elementwise, the 1-D arguments along its last dim, and whether the last dim must
# be whole on every rank (a norm over it).
_ELEMENTWISE = {
    "dropout": ("input", (), (), False),
    "alpha_dropout": ("input", (), (), False),
    "dropout_state": ("input", (), (), False),
    "dropout_replay": ("input", (), (), False),
    "dropout_replay_": ("input", (), (), False),
    "dropout_add": ("input", ("residual",), ("bias",), False),
    "act_dropout": ("input", (), ("bias",), False),
    "act_dropout_backward": ("grad", ("input",), ("bias",), False),
    "dropout_add_norm": ("input", ("residual",), ("weight", "bias"), True),
}

_check_rng = threading.local()


@contextlib.contextmanager
def checking_rng(enabled: bool = True):
    """Within the block, every random fused op on a DTensor checks that all ranks of the mesh
    drew the same ``(seed, base)``, as ``FUSED_DROPOUT_CHECK_RNG=1`` does for a whole run."""
    previous = getattr(_check_rng, "enabled", None)
    _check_rng.enabled = enabled
    try:
        yield
    finally:
        _check_rng.enabled = previous


def _rng_check_enabled() -> bool:
    enabled = getattr(_check_rng, "enabled", None)
    return os.environ.get("FUSED_DROPOUT_CHECK_RNG") == "1" if enabled is None else enabled


@contextlib.contextmanager
def _mask_window(sizes, origin):
    """The fused ops called in the block index the mask of a whole tensor of `sizes` from a
    shard whose first element sits at `origin` (csrc/checks.h, MaskWindow)."""
    _C.set_mask_window(list(sizes), list(origin))
    try:
        yield
    finally:
        _C.set_mask_window(None, None)


def _register():
    from torch._guards import detect_fake_mode
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._redistribute import redistribute_local_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    def contiguous_strides(shape):
        strides, step = [], 1
        for size in reversed(shape):
            strides.append(step)
            step *= max(size, 1)
        return tuple(reversed(strides))

    def box_placements(placements, ndim, whole_last_dim):
        """Placements where every shard is a box: Shard(d) kept (the last dim only if it need
        not be whole), anything else replicated."""
        boxed = []
        for placement in placements:
            keep = type(placement) is Shard and not (whole_last_dim and placement.dim % ndim == ndim - 1)
            boxed.append(Shard(placement.dim % ndim) if keep else Replicate())
        return tuple(boxed)

    def vector_placements(placements, ndim):
        """A 1-D operand along the last dim: sharded where that dim is."""
        return tuple(Shard(0) if isinstance(p, Shard) and p.dim == ndim - 1 else Replicate() for p in placements)

    def plain_beside_dtensor(op_name, plain, dtensor):
        return TypeError(
            f"fused_dropout::{op_name}: {plain} is a torch.Tensor but {dtensor} is a DTensor; pass a DTensor "
            "(DTensor.from_local or distribute_tensor) for every tensor operand"
        )

    def local(op_name, name, value, mesh, placements):
        """The local tensor of `value` in `placements`, redistributing it if it is elsewhere."""
        if not isinstance(value, DTensor):
            if isinstance(value, torch.Tensor):
                raise plain_beside_dtensor(op_name, name, "the input")
            return value
        if value.device_mesh != mesh:
            raise ValueError(
                f"fused_dropout::{op_name}: {name} is on device mesh {value.device_mesh}, the input on {mesh}; "
                "they must share one mesh"
            )
        if tuple(value.placements) == tuple(placements):
            return value._local_tensor
        target = DTensorSpec(mesh, tuple(placements), tensor_meta=value._spec.tensor_meta)
        return redistribute_local_tensor(value._local_tensor, value._spec, target)

    def wrap(local_tensor, mesh, placements, shape, stride=None):
        meta = TensorMeta(torch.Size(shape), stride or contiguous_strides(shape), local_tensor.dtype)
        return DTensor(local_tensor, DTensorSpec(mesh, tuple(placements), tensor_meta=meta), requires_grad=False)

    def check_rng_agreement(op_name, mesh, rng_state):
        """Raises if the ranks of `mesh` hold different states: one all-gather over all ranks
        where the mesh spans them, else one per mesh dim."""
        import torch.distributed as dist

        spans_world = mesh.size() == dist.get_world_size()
        for group in [dist.group.WORLD] if spans_world else [mesh.get_group(d) for d in range(mesh.ndim)]:
            gathered = [torch.empty_like(rng_state) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, rng_state.contiguous(), group=group)
            states = [tuple(int(v) for v in state.tolist()) for state in gathered]
            if len(set(states)) > 1:
                ranks = dist.get_process_group_ranks(group)
                held = ", ".join(f"rank {rank} has {state}" for rank, state in zip(ranks, states))
                raise RuntimeError(
                    f"fused_dropout::{op_name} on a DTensor: the ranks of the mesh drew different random states "
                    f"(seed, base): {held}. An unseeded call draws from each rank's default generator, so every "
                    "rank must call torch.manual_seed with the same seed (or pass the same seed= or generator "
                    "state); a seeded call must pass the same seed and offset on every rank."
                )

    def elementwise_handler(op_call, args, kwargs):
        op_name = op_call._schema.name.split("::")[-1]
        lead_name, aligned, vectors, whole_last_dim = _ELEMENTWISE[op_name]
        arguments = op_call._schema.arguments
        values = dict(zip((a.name for a in arguments), _filled(op_call, args, kwargs)))
        lead = values[lead_name]
        if not isinstance(lead, DTensor):
            raise plain_beside_dtensor(op_name, lead_name, "another operand")
        mesh, ndim, shape = lead.device_mesh, lead.ndim, tuple(lead.shape)
        placements = box_placements(lead.placements, ndim, whole_last_dim)
        inplace = op_call._schema.is_mutable
        if inplace and placements != tuple(lead.placements):
            raise ValueError(
                f"fused_dropout::{op_name}: in-place dropout needs a DTensor whose shards are boxes (Replicate or "
                f"Shard placements{', the last dim whole' if whole_last_dim else ''}), got {lead.placements}; "
                "redistribute it first or use the out-of-place form"
            )
        if any(isinstance(p, Shard) for p in placements) and detect_fake_mode(lead._local_tensor):
            # A traced graph would keep the local call but not the window set around it, and
            # every shard would then draw the first slice. Refused as an operator the tracer
            # does not support: torch.compile breaks the graph here (fullgraph=True fails).
            from torch._subclasses.fake_tensor import UnsupportedOperatorException

            raise UnsupportedOperatorException(op_call)
        local_values = {}
        for name, value in values.items():
            if name == lead_name or name in aligned:
                local_values[name] = local(op_name, name, value, mesh, placements)
            elif name in vectors and value is not None:
                local_values[name] = local(op_name, name, value, mesh, vector_placements(placements, ndim))
            elif name == "rng_state" and isinstance(value, DTensor):
                local_values[name] = local(op_name, name, value, mesh, (Replicate(),) * mesh.ndim)
            else:
                local_values[name] = value
        _, origin = compute_local_shape_and_global_offset(shape, mesh, placements)
        with _mask_window(shape, origin):
            result = op_call(*(local_values[a.name] for a in arguments))
        if inplace:
            return lead
        returns = [r.name for r in op_call._schema.returns]
        results = result if isinstance(result, tuple) else (result,)
        wrapped = []
        for name, value in zip(returns, results):
            if name == "rng_state" or op_name == "dropout_state":
                if "seed" in values and _rng_check_enabled():
                    check_rng_agreement(op_name, mesh, value)
                wrapped.append(wrap(value, mesh, (Replicate(),) * mesh.ndim, (2,)))
            elif name in ("mean", "rstd"):
                wrapped.append(wrap(value, mesh, placements, shape[:-1]))
            else:
                # The elementwise outputs keep the input's strides; the norm forms' are contiguous.
                stride = None if whole_last_dim else tuple(lead.stride())
                wrapped.append(wrap(value, mesh, placements, shape, stride))
        return tuple(wrapped) if isinstance(result, tuple) else wrapped[0]

    def norm_backward_handler(op_call, args, kwargs):
        """The norm's backward on row shards: grad_h keeps the rows' placement, and the weight's
        and bias's gradients are partial sums over the ranks that split the rows."""
        grad, residual_out, weight, mean, rstd, rms = _filled(op_call, args, kwargs)
        mesh, ndim, shape = residual_out.device_mesh, residual_out.ndim, tuple(residual_out.shape)
        placements = box_placements(residual_out.placements, ndim, whole_last_dim=True)
        replicate = (Replicate(),) * mesh.ndim
        grad_h, grad_weight, grad_bias = op_call(
            local("norm_backward", "grad", grad, mesh, placements),
            local("norm_backward", "residual_out", residual_out, mesh, placements),
            None if weight is None else local("norm_backward", "weight", weight, mesh, replicate),
            local("norm_backward", "mean", mean, mesh, placements),
            local("norm_backward", "rstd", rstd, mesh, placements),
            rms,
        )
        summed = tuple(Partial() if isinstance(p, Shard) else Replicate() for p in placements)
        return (
            wrap(grad_h, mesh, placements, shape),
            wrap(grad_weight, mesh, summed, shape[-1:]),
            wrap(grad_bias, mesh, summed, shape[-1:]),
        )

    def dropout_linear_handler(op_call, args, kwargs):
        """Dropout on the DTensor input (its own handler), then DTensor's linear."""
        input, weight, bias, p, seed, offset, generator, shared_dims = _filled(op_call, args, kwargs)
        hidden, rng_state = torch.ops.fused_dropout.dropout.default(input, p, seed, offset, generator, shared_dims)
        return torch.ops.aten.linear.default(hidden, weight, bias), rng_state

    handlers = DTensor._op_dispatcher._custom_op_handlers
    library = torch.ops.fused_dropout
    for name in _ELEMENTWISE:
        handlers[getattr(library, name).default] = elementwise_handler
    handlers[library.norm_backward.default] = norm_backward_handler
    handlers[library.dropout_linear.default] = dropout_linear_handler


def _filled(op_call, args, kwargs):
    """Every argument of the schema, in order, with defaults filled in."""
    arguments = op_call._schema.arguments
    values = [a.default_value if a.has_default_value() else None for a in arguments]
    for i, value in enumerate(args):
        values[i] = value
    for i, argument in enumerate(arguments):
        if argument.name in kwargs:
            values[i] = kwargs[argument.name]
    return values


def _register_or_warn():
    try:
        _register()
    except Exception as error:  # a torch whose DTensor internals moved: plain tensors still work
        warnings.warn(f"fused_dropout: the DTensor handlers could not be registered ({error!r})", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the handlers right after ``torch.distributed.tensor`` is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DTENSOR_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_or_warn()

        spec.loader.exec_module = exec_then_register
        return spec


def _install():
    if not torch.distributed.is_available():
        return
    if _DTENSOR_MODULE in sys.modules:
        _register_or_warn()
    else:
        sys.meta_path.insert(0, _RegisterAfterImport())
