"""The raw operators ``torch.ops.fused_dropout.*``: a typed wrapper per op, its fake kernel
and its vmap rule.

``dropout`` returns the output and ``rng_state`` (int64[2]: seed, base). ``dropout_replay``
regenerates the same mask from ``rng_state``: it is the backward of dropout, alpha dropout and
``dropout_add`` (``act_dropout`` has its own, ``act_dropout_backward``), so the state is all
autograd saves beyond act_dropout's input. In-place dropout is ``dropout_state`` (draw the state) followed by
``dropout_replay_`` (apply its mask in place). Autograd, forward-mode AD and the in-place
version counter are registered in C++ (``csrc/autograd.h`` and each form's files), so a training step pays no
Python per call beyond these wrappers.
"""

import operator
from typing import Optional, Sequence, Tuple

import torch

from . import _C  # noqa: F401  (loads the operator registrations)

_lib = torch.ops.fused_dropout
_dropout = _lib.dropout.default
_dropout_state = _lib.dropout_state.default
_dropout_replay = _lib.dropout_replay.default
_dropout_replay_ = _lib.dropout_replay_.default
_dropout_add = _lib.dropout_add.default
_alpha_dropout = _lib.alpha_dropout.default
_act_dropout = _lib.act_dropout.default
_act_dropout_backward = _lib.act_dropout_backward.default
_dropout_add_norm = _lib.dropout_add_norm.default
_dropout_linear = _lib.dropout_linear.default

# The activations act_dropout fuses, by the names its `activation` argument takes.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "squared_relu")

# Seeds and offsets are unsigned 64-bit in the mask rule; the op schema carries them as int64 bits.
U64 = 1 << 64


def _as_int64_bits(value: int) -> int:
    return value - U64 if value >= (1 << 63) else value


def _seed_args(seed: Optional[int], offset: int) -> Tuple[Optional[int], int]:
    if seed is None:
        return None, offset
    return _as_int64_bits(seed), _as_int64_bits(offset)


def _dims(shared_dims) -> list:
    """``shared_dims`` as the list the schema takes; an int is one dim, as in torch."""
    if isinstance(shared_dims, (list, tuple)):
        return list(shared_dims)
    try:
        return [operator.index(shared_dims)]
    except TypeError:
        return list(shared_dims)


def _random_call(op, args, seed, offset, generator, shared_dims):
    """``op(*args, seed, offset, generator, shared_dims)``. The common call (the default
    generator, no shared dims) passes ``args`` alone: the schema fills in the defaults in C++,
    which parses fewer arguments than passing them from here."""
    if seed is None and offset == 0 and generator is None and type(shared_dims) is tuple and not shared_dims:
        return op(*args)
    seed, offset = _seed_args(seed, offset)
    return op(*args, seed, offset, generator, _dims(shared_dims))


def dropout(
    input: torch.Tensor,
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(output, rng_state)`` of one fused dropout call."""
    return _random_call(_dropout, (input, p), seed, offset, generator, shared_dims)


def dropout_state(
    input: torch.Tensor,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> torch.Tensor:
    """The ``rng_state`` a dropout call on ``input`` would draw, drawn (the generator advances)."""
    seed, offset = _seed_args(seed, offset)
    return _dropout_state(input, seed, offset, generator, _dims(shared_dims))


def dropout_replay(
    input: torch.Tensor,
    rng_state: torch.Tensor,
    p: float,
    shared_dims: Sequence[int] = (),
    scale: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``input`` times the mask that ``rng_state`` stands for and ``scale`` (default ``1 / (1 - p)``).

    With ``dtype``, ``input`` is converted to it first, in the same pass: ``dropout_replay(g, s, p,
    dtype=torch.bfloat16)`` equals ``dropout_replay(g.to(torch.bfloat16), s, p)`` bit for bit."""
    return _dropout_replay(input, rng_state, p, _dims(shared_dims), scale, dtype)


def dropout_replay_(
    input: torch.Tensor, rng_state: torch.Tensor, p: float, shared_dims: Sequence[int] = ()
) -> torch.Tensor:
    """:func:`dropout_replay` in place; returns ``input``."""
    return _dropout_replay_(input, rng_state, p, _dims(shared_dims))


def dropout_inplace(
    input: torch.Tensor,
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> torch.Tensor:
    """Dropout applied to ``input`` in place; returns ``input``."""
    rng_state = dropout_state(input, seed, offset, generator, shared_dims)
    return _dropout_replay_(input, rng_state, p, _dims(shared_dims))


def dropout_add(
    input: torch.Tensor,
    residual: torch.Tensor,
    bias: Optional[torch.Tensor],
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(residual + dropout(input + bias), rng_state)`` in one pass."""
    return _random_call(_dropout_add, (input, residual, bias, p), seed, offset, generator, shared_dims)


def dropout_add_norm(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    p: float,
    eps: float,
    rms: bool,
    residual_dtype: Optional[torch.dtype] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output, h, mean, rstd, rng_state)``: h = residual + dropout(input) and its LayerNorm
    (or with ``rms`` RMSNorm) over the last dim, in one pass over each row."""
    seed, offset = _seed_args(seed, offset)
    return _dropout_add_norm(
        input, residual, weight, bias, p, eps, rms, residual_dtype, seed, offset, generator, _dims(shared_dims)
    )


def dropout_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(F.linear(dropout(input), weight, bias), rng_state)``; backward keeps ``input``, not
    the dropped input."""
    return _random_call(_dropout_linear, (input, weight, bias, p), seed, offset, generator, shared_dims)


def alpha_dropout(
    input: torch.Tensor,
    p: float,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(output, rng_state)`` of one fused alpha dropout call."""
    return _random_call(_alpha_dropout, (input, p), seed, offset, generator, shared_dims)


def act_dropout(
    input: torch.Tensor,
    bias: Optional[torch.Tensor],
    p: float,
    activation: str,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    shared_dims: Sequence[int] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(activation(input + bias)), rng_state)`` in one pass."""
    return _random_call(_act_dropout, (input, bias, p, activation), seed, offset, generator, shared_dims)


def act_dropout_backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    bias: Optional[torch.Tensor],
    rng_state: torch.Tensor,
    p: float,
    activation: str,
    shared_dims: Sequence[int] = (),
) -> torch.Tensor:
    """The gradient of :func:`act_dropout` at ``input`` (and ``bias``) for the call that drew
    ``rng_state``: ``activation'(input + bias) * dropout_replay(grad, rng_state, p)`` in one pass."""
    return _act_dropout_backward(grad, input, bias, rng_state, p, activation, _dims(shared_dims))


def check_act_dropout_args(input: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """The bias checks act_dropout's op makes, for its eval path, which calls torch's own
    activation instead of the op: the same messages in every mode."""
    if bias is None:
        return
    name = "fused_dropout::act_dropout"
    last = input.shape[-1] if input.dim() > 0 else 0
    if input.dim() == 0 or bias.dim() != 1 or bias.shape[0] != last:
        raise RuntimeError(
            f"{name}: bias must be 1-D with the size of the input's last dim ({last}), got shape {list(bias.shape)}"
        )
    if bias.dtype != input.dtype:
        raise RuntimeError(
            f"{name}: bias must have the input's dtype {_DTYPE_NAMES.get(input.dtype, input.dtype)}, "
            f"got {_DTYPE_NAMES.get(bias.dtype, bias.dtype)}"
        )
    if bias.device != input.device:
        raise RuntimeError(f"{name}: bias must be on the input's device {input.device}, got {bias.device}")


# c10's names of the dtypes, which the C++ messages print.
_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10: counter int64[N, 4] and key int64[N, 2] of 32-bit words -> int64[N, 4]."""
    return _lib.philox4x32_10.default(counter, key)


# The fake (Meta) kernels are in C++ (each form's csrc/ops/<form>/<form>.cpp): they run the
# same argument checks as the CPU and CUDA kernels, so torch.compile, torch.export and
# FakeTensorMode refuse what eager refuses.


# vmap rules. Each runs the op once on the whole batch, with the vmapped dim moved first:
# - randomness="different": one mask over the batch, so every sample gets its own. The
#   rng_state is returned batched (the same state for every sample): a batched rng_state is
#   how dropout_replay knows that its mask spans the vmapped dim.
# - randomness="same", or an explicit seed (then the op is a plain function of its
#   arguments): the vmapped dim is one more shared dim, so every sample gets the mask an
#   unbatched call gets; rng_state is not batched.
# - randomness="error": torch's error for random ops, unless a seed is given.
_RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
    "'different' randomness flags on vmap or perform the randomness operation out of vmap"
)


def _mask_per_sample(info, seed) -> bool:
    if seed is not None:
        return False
    if info.randomness == "error":
        raise RuntimeError(_RANDOMNESS_ERROR)
    return info.randomness == "different"


def _batch_first(x: torch.Tensor, bdim: Optional[int], batch_size: int) -> torch.Tensor:
    if bdim is None:
        return x.unsqueeze(0).expand(batch_size, *x.shape)
    return x.movedim(bdim, 0)


def _batched_dims(shared_dims: Sequence[int], per_sample: bool) -> list:
    # Negative dims count from the end, which the leading batch dim does not move.
    dims = [d + 1 if d >= 0 else d for d in shared_dims]
    return dims if per_sample else dims + [0]


def _fold_sample_bias(x: torch.Tensor, bias: Optional[torch.Tensor], bias_bdim: Optional[int]):
    """``(x, bias)`` for an op on the batch-first ``x``: a bias vmapped per sample is added to
    ``x`` first, in ``x``'s dtype, which is where the fused ops round input + bias too."""
    if bias_bdim is None:
        return x, bias
    per_sample_bias = bias.movedim(bias_bdim, 0)
    return x + per_sample_bias.reshape(x.shape[0], *([1] * (x.dim() - 2)), per_sample_bias.shape[-1]), None


def _random_op_vmap(op):
    """The vmap rule of a random op with the signature of dropout."""

    def rule(info, in_dims, input, p, seed=None, offset=0, generator=None, shared_dims=()):
        per_sample = _mask_per_sample(info, seed)
        if in_dims[0] is None and not per_sample:
            return op(input, p, seed, offset, generator, list(shared_dims)), (None, None)
        x = _batch_first(input, in_dims[0], info.batch_size)
        output, rng_state = op(x, p, seed, offset, generator, _batched_dims(shared_dims, per_sample))
        if per_sample:
            return (output, rng_state.expand(info.batch_size, 2)), (0, 0)
        return (output, rng_state), (0, None)

    return rule


torch.library.register_vmap("fused_dropout::dropout", _random_op_vmap(_dropout))
torch.library.register_vmap("fused_dropout::alpha_dropout", _random_op_vmap(_alpha_dropout))


@torch.library.register_vmap("fused_dropout::dropout_state")
def _dropout_state_vmap(info, in_dims, input, seed=None, offset=0, generator=None, shared_dims=()):
    per_sample = _mask_per_sample(info, seed)
    if not per_sample:
        sample = input if in_dims[0] is None else input.select(in_dims[0], 0)
        return _dropout_state(sample, seed, offset, generator, list(shared_dims)), None
    x = _batch_first(input, in_dims[0], info.batch_size)
    rng_state = _dropout_state(x, seed, offset, generator, _batched_dims(shared_dims, True))
    return rng_state.expand(info.batch_size, 2), 0


@torch.library.register_vmap("fused_dropout::dropout_replay")
def _dropout_replay_vmap(info, in_dims, input, rng_state, p, shared_dims=(), scale=None, dtype=None):
    input_bdim, state_bdim = in_dims[0], in_dims[1]
    per_sample = state_bdim is not None
    if input_bdim is None and not per_sample:
        return _dropout_replay(input, rng_state, p, list(shared_dims), scale, dtype), None
    x = _batch_first(input, input_bdim, info.batch_size)
    state = rng_state.select(state_bdim, 0) if per_sample else rng_state
    return _dropout_replay(x, state, p, _batched_dims(shared_dims, per_sample), scale, dtype), 0


@torch.library.register_vmap("fused_dropout::dropout_replay_")
def _dropout_replay_inplace_vmap(info, in_dims, input, rng_state, p, shared_dims=()):
    input_bdim, state_bdim = in_dims[0], in_dims[1]
    per_sample = state_bdim is not None
    if input_bdim is None:
        if per_sample:
            raise RuntimeError(
                "vmap: in-place dropout of a tensor that is not vmapped over cannot give each sample its own "
                "mask (randomness='different'); use the out-of-place dropout"
            )
        _dropout_replay_(input, rng_state, p, list(shared_dims))
        return input, None
    state = rng_state.select(state_bdim, 0) if per_sample else rng_state
    _dropout_replay_(input.movedim(input_bdim, 0), state, p, _batched_dims(shared_dims, per_sample))
    return input, input_bdim


@torch.library.register_vmap("fused_dropout::dropout_add")
def _dropout_add_vmap(info, in_dims, input, residual, bias, p, seed=None, offset=0, generator=None, shared_dims=()):
    per_sample = _mask_per_sample(info, seed)
    input_bdim, residual_bdim, bias_bdim = in_dims[:3]
    if input_bdim is None and residual_bdim is None and bias_bdim is None and not per_sample:
        return _dropout_add(input, residual, bias, p, seed, offset, generator, list(shared_dims)), (None, None)
    batch = info.batch_size
    x, bias = _fold_sample_bias(_batch_first(input, input_bdim, batch), bias, bias_bdim)
    r = _batch_first(residual, residual_bdim, batch)
    output, rng_state = _dropout_add(x, r, bias, p, seed, offset, generator, _batched_dims(shared_dims, per_sample))
    if per_sample:
        return (output, rng_state.expand(batch, 2)), (0, 0)
    return (output, rng_state), (0, None)


@torch.library.register_vmap("fused_dropout::act_dropout")
def _act_dropout_vmap(info, in_dims, input, bias, p, activation, seed=None, offset=0, generator=None, shared_dims=()):
    per_sample = _mask_per_sample(info, seed)
    input_bdim, bias_bdim = in_dims[0], in_dims[1]
    if input_bdim is None and bias_bdim is None and not per_sample:
        return _act_dropout(input, bias, p, activation, seed, offset, generator, list(shared_dims)), (None, None)
    x, bias = _fold_sample_bias(_batch_first(input, input_bdim, info.batch_size), bias, bias_bdim)
    dims = _batched_dims(shared_dims, per_sample)
    output, rng_state = _act_dropout(x, bias, p, activation, seed, offset, generator, dims)
    if per_sample:
        return (output, rng_state.expand(info.batch_size, 2)), (0, 0)
    return (output, rng_state), (0, None)


@torch.library.register_vmap("fused_dropout::act_dropout_backward")
def _act_dropout_backward_vmap(info, in_dims, grad, input, bias, rng_state, p, activation, shared_dims=()):
    grad_bdim, input_bdim, bias_bdim, state_bdim = in_dims[:4]
    per_sample = state_bdim is not None
    if grad_bdim is None and input_bdim is None and bias_bdim is None and not per_sample:
        return _act_dropout_backward(grad, input, bias, rng_state, p, activation, list(shared_dims)), None
    batch = info.batch_size
    g = _batch_first(grad, grad_bdim, batch)
    x, bias = _fold_sample_bias(_batch_first(input, input_bdim, batch), bias, bias_bdim)
    state = rng_state.select(state_bdim, 0) if per_sample else rng_state
    dims = _batched_dims(shared_dims, per_sample)
    return _act_dropout_backward(g, x, bias, state, p, activation, dims), 0


@torch.library.register_vmap("fused_dropout::dropout_add_norm")
def _dropout_add_norm_vmap(
    info,
    in_dims,
    input,
    residual,
    weight,
    bias,
    p,
    eps,
    rms,
    residual_dtype=None,
    seed=None,
    offset=0,
    generator=None,
    shared_dims=(),
):
    per_sample = _mask_per_sample(info, seed)
    input_bdim, residual_bdim, weight_bdim, bias_bdim = in_dims[:4]
    if input_bdim is None and residual_bdim is None and weight_bdim is None and bias_bdim is None and not per_sample:
        args = (weight, bias, p, eps, rms, residual_dtype, seed, offset, generator)
        return _dropout_add_norm(input, residual, *args, list(shared_dims)), (None,) * 5
    batch = info.batch_size
    x = _batch_first(input, input_bdim, batch)
    r = None if residual is None else _batch_first(residual, residual_bdim, batch)
    dims = _batched_dims(shared_dims, per_sample)
    if weight_bdim is None and bias_bdim is None:
        args = (weight, bias, p, eps, rms, residual_dtype, seed, offset, generator)
        *outputs, rng_state = _dropout_add_norm(x, r, *args, dims)
    else:
        # A weight or bias per sample (an ensemble): h from the op, the norm and the affine by
        # torch's ops, differentiable through h. Equal to the fused op to rounding.
        args = (None, None, p, eps, rms, residual_dtype, seed, offset, generator)
        _, h, mean, rstd, rng_state = _dropout_add_norm(x, r, *args, dims)
        wide = h.to(rstd.dtype)
        centered = wide if rms else wide - wide.mean(-1, keepdim=True)
        y = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
        per_sample_shape = (batch, *([1] * (x.dim() - 2)), x.shape[-1])
        if weight is not None:
            y = y * _batch_first(weight, weight_bdim, batch).to(wide.dtype).reshape(per_sample_shape)
        if bias is not None:
            y = y + _batch_first(bias, bias_bdim, batch).to(wide.dtype).reshape(per_sample_shape)
        outputs = [y.to(x.dtype), h, mean, rstd]
    if per_sample:
        return (*outputs, rng_state.expand(batch, 2)), (0, 0, 0, 0, 0)
    return (*outputs, rng_state), (0, 0, 0, 0, None)


@torch.library.register_vmap("fused_dropout::dropout_linear")
def _dropout_linear_vmap(info, in_dims, input, weight, bias, p, seed=None, offset=0, generator=None, shared_dims=()):
    per_sample = _mask_per_sample(info, seed)
    input_bdim, weight_bdim, bias_bdim = in_dims[:3]
    if input_bdim is None and weight_bdim is None and bias_bdim is None and not per_sample:
        return _dropout_linear(input, weight, bias, p, seed, offset, generator, list(shared_dims)), (None, None)
    batch = info.batch_size
    x = _batch_first(input, input_bdim, batch)
    dims = _batched_dims(shared_dims, per_sample)
    if weight_bdim is None and bias_bdim is None:
        output, rng_state = _dropout_linear(x, weight, bias, p, seed, offset, generator, dims)
    else:
        # A weight per sample (an ensemble): the same mask by dropout, then one batched matmul.
        # Backward then keeps the dropped input, as the unfused composition does.
        dropped, rng_state = _dropout(x, p, seed, offset, generator, dims)
        w = _batch_first(weight, weight_bdim, batch)
        output = torch.matmul(dropped.reshape(batch, -1, x.shape[-1]), w.transpose(-1, -2))
        output = output.reshape(*x.shape[:-1], w.shape[-2])
        if bias is not None:
            b = _batch_first(bias, bias_bdim, batch)
            output = output + b.reshape(batch, *([1] * (x.dim() - 2)), b.shape[-1])
    if per_sample:
        return (output, rng_state.expand(info.batch_size, 2)), (0, 0)
    return (output, rng_state), (0, None)
