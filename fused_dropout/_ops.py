"""Typed wrappers of ``torch.ops.fused_dropout.*``, their fake kernels and autograd.

The forward op returns the output and ``rng_state`` (int64[2]: seed, base). Backward calls
``dropout_replay``, which regenerates the same mask from ``rng_state``; that is all that is
saved, so dropout's backward (and its double backward) costs no mask memory. The
autograd formulas live in C++ (``csrc/autograd.cpp``), so a training step pays no Python
per dropout call beyond these wrappers.
"""
from typing import Optional, Sequence, Tuple

import torch

from . import _C  # noqa: F401  (loads the operator registrations)

_ops = torch.ops.fused_dropout
_dropout = _ops.dropout.default
_dropout_add = _ops.dropout_add.default

# Seeds are unsigned 64-bit in the mask rule; the op schema carries them as int64 bits.
_U64 = 1 << 64


def _as_int64_bits(value: int) -> int:
    return value - _U64 if value >= (1 << 63) else value


def _seed_args(seed: Optional[int], offset: int) -> Tuple[Optional[int], int]:
    if seed is None:
        return None, offset
    return _as_int64_bits(seed), _as_int64_bits(offset)


def dropout_op(
    input: torch.Tensor,
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(output, rng_state)`` of one fused dropout call."""
    if seed is None and offset == 0 and generator is None and not shared_dims:
        # The common call: the schema's defaults are filled in C++, which parses fewer
        # arguments than passing them from here.
        return _dropout(input, p)
    seed, offset = _seed_args(seed, offset)
    return _dropout(input, p, seed, offset, generator, list(shared_dims))


def dropout_inplace_op(
    input: torch.Tensor,
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> torch.Tensor:
    """Dropout applied to ``input`` in place; returns ``rng_state``."""
    seed, offset = _seed_args(seed, offset)
    return _ops.dropout_.default(input, p, seed, offset, generator, list(shared_dims))


def dropout_replay_op(
    input: torch.Tensor, rng_state: torch.Tensor, p: float, shared_dims: Sequence[int] = ()
) -> torch.Tensor:
    """``input`` times the mask and scale that ``rng_state`` stands for."""
    return _ops.dropout_replay.default(input, rng_state, p, list(shared_dims))


def dropout_add_op(
    input: torch.Tensor,
    residual: torch.Tensor,
    bias: Optional[torch.Tensor],
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(residual + dropout(input + bias), rng_state)`` in one pass."""
    if seed is None and offset == 0 and generator is None:
        return _dropout_add(input, residual, bias, p)
    seed, offset = _seed_args(seed, offset)
    return _dropout_add(input, residual, bias, p, seed, offset, generator)


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10: counter int64[N, 4] and key int64[N, 2] of 32-bit words -> int64[N, 4]."""
    return _ops.philox4x32_10.default(counter, key)


# Fake kernels: shapes, dtypes and strides for torch.compile / export / meta tensors.
@torch.library.register_fake("fused_dropout::dropout")
def _dropout_fake(input, p, seed=None, offset=0, generator=None, shared_dims=()):
    return torch.empty_like(input), input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fused_dropout::dropout_")
def _dropout_inplace_fake(input, p, seed=None, offset=0, generator=None, shared_dims=()):
    return input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fused_dropout::dropout_replay")
def _dropout_replay_fake(input, rng_state, p, shared_dims=()):
    return torch.empty_like(input)


@torch.library.register_fake("fused_dropout::dropout_add")
def _dropout_add_fake(input, residual, bias, p, seed=None, offset=0, generator=None):
    return torch.empty_like(input), input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fused_dropout::philox4x32_10")
def _philox_fake(counter, key):
    return torch.empty_like(counter, memory_format=torch.contiguous_format)


# Autograd of dropout, dropout_replay and dropout_add is registered in C++
# (csrc/autograd.cpp). The in-place op is differentiated here, where autograd can mark its
# input dirty.
class _DropoutInplace(torch.autograd.Function):
    """In-place dropout under autograd. Registered autograd formulas cannot describe a
    mutating op, so this thin Function marks the input dirty and saves only rng_state.
    It returns the input alone: autograd allows no second output when the input is a view."""

    @staticmethod
    def forward(ctx, input, p, seed, offset, generator, shared_dims):
        rng_state = dropout_inplace_op(input, p, seed, offset, generator, shared_dims)
        ctx.mark_dirty(input)
        ctx.p, ctx.shared_dims = p, shared_dims
        ctx.save_for_backward(rng_state)
        return input

    @staticmethod
    def backward(ctx, grad_output):
        (rng_state,) = ctx.saved_tensors
        return dropout_replay_op(grad_output, rng_state, ctx.p, ctx.shared_dims), None, None, None, None, None


def dropout_inplace(input, p, seed=None, offset=0, generator=None, shared_dims=()):
    """In-place dropout that autograd can differentiate; returns ``input``."""
    if torch.is_grad_enabled() and input.requires_grad:
        return _DropoutInplace.apply(input, p, seed, offset, generator, tuple(shared_dims))
    dropout_inplace_op(input, p, seed, offset, generator, shared_dims)
    return input
