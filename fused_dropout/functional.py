"""Functional API, mirroring ``torch.nn.functional.dropout``."""

import operator
import warnings
from typing import List, Optional, Sequence, Union

import torch
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_unary

from . import ops
from .ops import U64


def _check_p(p, what: str = "dropout probability") -> float:
    """``p`` as a float. What torch accepts is accepted (a float, an int, a bool, a 0-d
    tensor) and what it refuses is refused, in torch's words (torchvision's "drop
    probability" for stochastic depth); NaN is refused too."""
    if p < 0.0 or p > 1.0 or p != p:
        raise ValueError(f"{what} has to be between 0 and 1, but got {p}")
    return float(p)


def _check_u64(name: str, what: str, value) -> int:
    """``value`` as a Python int in [0, 2**64): anything ``operator.index`` accepts (an int, a
    NumPy integer, a 0-d integer tensor), as torch's integer arguments do; never a bool."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: {what} must be an int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: {what} must be an int, got {type(value).__name__} {value!r}") from None
    if not 0 <= value < U64:
        raise ValueError(f"{name}: {what} must be in [0, 2**64), got {value}")
    return value


def _check_randomness(name: str, seed, offset, generator):
    """``(seed, offset)`` as Python ints, after the checks of the randomness arguments."""
    if seed is not None:
        seed = _check_u64(name, "seed", seed)
        offset = _check_u64(name, "offset", offset)
        if generator is not None:
            raise ValueError(f"{name}: pass either seed or generator, not both")
    elif offset != 0:
        raise ValueError(f"{name}: offset is only used together with seed, but got offset={offset} and seed=None")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: generator must be a torch.Generator, got {type(generator).__name__}")
    return seed, offset


def _check_tensor(name: str, what: str, value, optional: bool = False) -> None:
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        expected = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{name}: {what} must be {expected}, got {type(value).__name__}")


def _checked_call(name: str, input, p, seed, offset, generator):
    """The checks every random call makes; returns ``(p, seed, offset)`` as a float and ints.
    The common call (a float p in range, the default generator) pays only three cheap tests."""
    if type(p) is not float or not 0.0 <= p <= 1.0:
        p = _check_p(p)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    if seed is not None or offset != 0 or generator is not None:
        seed, offset = _check_randomness(name, seed, offset, generator)
    return p, seed, offset


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    shared_dims: Sequence[int] = (),
) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    A drop-in for :func:`torch.nn.functional.dropout` that runs as one fused kernel and saves
    only a 16-byte random state for backward. Which elements are kept is a pure function of
    (seed, base, logical index, p), see the README's mask rule.

    Args:
        input (Tensor): float32, float64, float16 or bfloat16, any shape, layout and device
            (CPU or CUDA). The output keeps its memory format.
        p (float): probability of an element to be zeroed. Default: 0.5
        training (bool): apply dropout if ``True``; otherwise return ``input``. Default: ``True``
        inplace (bool): overwrite ``input``. Default: ``False``
        generator (torch.Generator, optional): draw the random state from this generator
            (of the input's device) instead of the device's default generator.
        seed (int, optional): an explicit seed in ``[0, 2**64)``; the same ``seed`` and
            ``offset`` give the same mask on CPU and CUDA. Excludes ``generator``.
        offset (int): the Philox counter base used with ``seed``. Default: 0
        shared_dims (int or sequence of int): dims along which one keep/drop decision is shared,
            e.g. ``(2, 3)`` for channel-wise dropout of ``(N, C, H, W)``, or ``(0,)`` for
            dropout locked over the time dim of a ``(T, B, H)`` sequence. Default: none

    Returns:
        Tensor of the input's shape, dtype, device and memory format. Dropped elements are
        exactly ``+0.0``, also where the input is NaN or infinite.
    """
    if has_torch_function_unary(input):
        return handle_torch_function(
            dropout,
            (input,),
            input,
            p,
            training,
            inplace,
            generator=generator,
            seed=seed,
            offset=offset,
            shared_dims=shared_dims,
        )
    p, seed, offset = _checked_call("dropout", input, p, seed, offset, generator)
    if not training or p == 0:
        return input
    if inplace:
        if input.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(f"dropout: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
        return ops.dropout_inplace(input, p, seed, offset, generator, shared_dims)
    return ops.dropout(input, p, seed, offset, generator, shared_dims)[0]


def dropout_add(
    input: torch.Tensor,
    residual: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    *,
    bias: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """``residual + dropout(input + bias)`` in one pass over memory (a transformer block's
    bias-dropout-add).

    Equal, bit for bit, to ``residual + dropout(input + bias, p, seed=seed)`` composed from
    this package's ops: each step is rounded to the input's dtype as it would be unfused.
    Backward saves only the 16-byte random state.

    Args:
        input (Tensor): the branch output to drop, any shape; float32, float64, float16 or
            bfloat16.
        residual (Tensor): the skip connection, of the input's shape and device. Its dtype may
            differ (a float32 residual stream beside a bfloat16 branch): the sum is then taken
            in the promoted dtype, as ``residual + dropout(input + bias)`` is in torch.
        p (float): probability of an element of ``input + bias`` to be zeroed. Default: 0.5
        training (bool): apply dropout if ``True``; otherwise return ``residual + input + bias``.
        bias (Tensor, optional): 1-D, the size of the input's last dim and the input's dtype,
            added before dropout.
        generator, seed, offset: as for :func:`dropout`.

    Returns:
        Tensor of the input's shape, device and memory format, in the dtype torch's type
        promotion gives ``input`` and ``residual``.
    """
    if has_torch_function((input, residual, bias)):
        return handle_torch_function(
            dropout_add,
            (input, residual, bias),
            input,
            residual,
            p,
            training,
            bias=bias,
            generator=generator,
            seed=seed,
            offset=offset,
        )
    p, seed, offset = _checked_call("dropout_add", input, p, seed, offset, generator)
    _check_tensor("dropout_add", "residual", residual)
    _check_tensor("dropout_add", "bias", bias, optional=True)
    if not training or p == 0:
        # The op with p = 0 keeps every element: the same checks as in training, the same
        # result as the unfused sum, and no random state drawn.
        return ops.dropout_add(input, residual, bias, 0.0, seed=0)[0]
    return ops.dropout_add(input, residual, bias, p, seed, offset, generator)[0]


def alpha_dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    shared_dims: Sequence[int] = (),
) -> torch.Tensor:
    """Alpha dropout for SELU networks: a drop-in for :func:`torch.nn.functional.alpha_dropout`
    (note its default ``training=False``) as one fused pass that saves 16 bytes for backward.

    Kept elements become ``a * x + a * alpha * p`` and dropped ones ``a * alpha * (p - 1)``,
    with torch's ``alpha = 1.7580993408473766`` and ``a = 1 / sqrt((alpha^2 p + 1)(1 - p))``,
    which keep a SELU activation's zero mean and unit variance. Which elements are kept is
    :func:`keep_mask` of the same seed.

    Args:
        input (Tensor): any shape; float32, float64, float16 or bfloat16.
        p (float): probability of an element to be dropped. Default: 0.5
        training (bool): apply it if ``True``; otherwise return ``input``. Default: ``False``
        inplace (bool): write the result into ``input``. Default: ``False``
        generator, seed, offset, shared_dims: as for :func:`dropout`.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    if has_torch_function_unary(input):
        return handle_torch_function(
            alpha_dropout,
            (input,),
            input,
            p,
            training,
            inplace,
            generator=generator,
            seed=seed,
            offset=offset,
            shared_dims=shared_dims,
        )
    p, seed, offset = _checked_call("alpha_dropout", input, p, seed, offset, generator)
    if not training or p == 0:
        return input
    output = ops.alpha_dropout(input, p, seed, offset, generator, shared_dims)[0]
    return input.copy_(output) if inplace else output


def feature_alpha_dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Alpha dropout of whole channels of ``(N, C, ...)`` inputs: a drop-in for
    :func:`torch.nn.functional.feature_alpha_dropout`. One decision per (sample, channel),
    shared over the spatial dims.

    Args:
        input (Tensor): ``(N, C, ...)``, at least 2-D.
        p, training, inplace, generator, seed, offset: as for :func:`alpha_dropout`.
    """
    if has_torch_function_unary(input):
        return handle_torch_function(
            feature_alpha_dropout,
            (input,),
            input,
            p,
            training,
            inplace,
            generator=generator,
            seed=seed,
            offset=offset,
        )
    p = _check_p(p)
    _check_tensor("feature_alpha_dropout", "input", input)
    dims = _channel_dims(input.dim(), batched=True)
    return alpha_dropout(input, p, training, inplace, generator=generator, seed=seed, offset=offset, shared_dims=dims)


def _activation(name: str):
    """torch's own function for an act_dropout activation name."""
    functions = {
        "relu": torch.nn.functional.relu,
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "silu": torch.nn.functional.silu,
        "squared_relu": lambda x: torch.square(torch.nn.functional.relu(x)),
    }
    if name not in functions:
        names = ", ".join(map(repr, ops.ACTIVATIONS))
        raise ValueError(f"act_dropout: activation must be one of {names}, got {name!r}")
    return functions[name]


def act_dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    *,
    activation: str = "gelu",
    bias: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """``dropout(activation(input + bias))`` in one pass over memory, as in a transformer's
    MLP (Linear, GELU, Dropout).

    Backward saves the input and the 16-byte random state, never a mask or the activation's
    output. The mask is :func:`keep_mask` of the same seed. Kept values are the activation
    rounded to the input's dtype, then scaled as :func:`dropout` scales: with
    ``activation="relu"`` the result equals ``dropout(F.relu(input + bias), p, seed=s)`` bit for
    bit, and the others agree with torch's activations to a few ulp of the dtype. In eval
    mode (or with ``p=0``) it calls torch's own activation.

    Args:
        input (Tensor): any shape; float32, float64, float16 or bfloat16.
        p (float): probability of an element to be zeroed. Default: 0.5
        training (bool): apply dropout if ``True``. Default: ``True``
        activation (str): ``"relu"``, ``"gelu"`` (erf, as ``F.gelu``), ``"gelu_tanh"`` (as
            ``F.gelu(approximate="tanh")``), ``"silu"`` or ``"squared_relu"``. Default: ``"gelu"``
        bias (Tensor, optional): 1-D, the size of the input's last dim, added before the activation.
        generator, seed, offset: as for :func:`dropout`.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    if has_torch_function((input, bias)):
        return handle_torch_function(
            act_dropout,
            (input, bias),
            input,
            p,
            training,
            activation=activation,
            bias=bias,
            generator=generator,
            seed=seed,
            offset=offset,
        )
    p, seed, offset = _checked_call("act_dropout", input, p, seed, offset, generator)
    _check_tensor("act_dropout", "bias", bias, optional=True)
    if not training or p == 0:
        # torch's own activation, after the checks the op makes in training.
        function = _activation(activation)
        ops.check_act_dropout_args(input, bias)
        return function(input if bias is None else input + bias)
    return ops.act_dropout(input, bias, p, activation, seed, offset, generator)[0]


def _sample_dims(mode: str, ndim: int) -> tuple:
    # The dims one stochastic-depth decision is shared over: all but the batch dim ("row"),
    # or all ("batch"). torchvision's words for a bad mode.
    if mode == "row":
        return tuple(range(1, ndim))
    if mode == "batch":
        return tuple(range(ndim))
    raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")


def stochastic_depth(
    input: torch.Tensor,
    p: float,
    mode: str,
    training: bool = True,
    *,
    scale_by_keep: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Stochastic depth (drop path): a drop-in for :func:`torchvision.ops.stochastic_depth`
    that drops whole samples of a residual branch in one fused pass, saving 16 bytes for
    backward instead of a noise tensor.

    With ``seed=s`` it equals ``dropout(input, p, seed=s, shared_dims=range(1, input.dim()))``
    bit for bit (``range(input.dim())`` for ``mode="batch"``).

    Args:
        input (Tensor): ``(N, ...)``, the branch's output.
        p (float): probability of a sample to be zeroed.
        mode (str): ``"row"`` drops each sample on its own, ``"batch"`` the whole batch at once.
        training (bool): apply it if ``True``; otherwise return ``input``. Default: ``True``
        scale_by_keep (bool): scale kept samples by ``1 / (1 - p)``; ``False`` keeps them as
            they are (timm's ``drop_path(..., scale_by_keep=False)``). Default: ``True``
        generator, seed, offset: as for :func:`dropout`.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    if has_torch_function_unary(input):
        return handle_torch_function(
            stochastic_depth,
            (input,),
            input,
            p,
            mode,
            training,
            scale_by_keep=scale_by_keep,
            generator=generator,
            seed=seed,
            offset=offset,
        )
    p, seed, offset = _checked_call("stochastic_depth", input, _check_p(p, "drop probability"), seed, offset, generator)
    dims = _sample_dims(mode, input.dim())
    if scale_by_keep or not training or p == 0:
        return dropout(input, p, training, generator=generator, seed=seed, offset=offset, shared_dims=dims)
    # Kept samples unscaled: the state a dropout call would draw, replayed with scale 1 (one
    # pass over memory, and backward replays the same mask and scale).
    rng_state = ops.dropout_state(input, seed, offset, generator, dims)
    return ops.dropout_replay(input, rng_state, p, dims, 1.0)


def drop_path_add(
    input: torch.Tensor,
    residual: torch.Tensor,
    p: float,
    training: bool = True,
    *,
    scale: Optional[torch.Tensor] = None,
    mode: str = "row",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """``residual + stochastic_depth(scale * input, p, mode)``: a residual block's drop path
    with its skip connection, as in ConvNeXt, Swin and ViT variants.

    The drop and the add are one fused pass (the :func:`dropout_add` kernel with the mask
    shared per sample). A LayerScale ``scale`` is applied first as its own elementwise
    multiply, so the result equals that composition of this package's ops bit for bit.

    Args:
        input (Tensor): the branch output, ``(N, ...)``.
        residual (Tensor): the skip connection, of the input's shape and device; a residual of
            another floating dtype gives the promoted dtype, as in torch.
        p (float): probability of a sample's branch to be dropped.
        training (bool): apply the drop if ``True``; otherwise return ``residual + scale * input``.
        scale (Tensor, optional): a LayerScale vector broadcast against ``input`` (for
            ConvNeXt's channels-last blocks ``(C,)``, for its channels-first blocks
            ``(C, 1, 1)``); any shape that broadcasts to the input's works. ``scale * input``
            takes torch's type promotion.
        mode (str): ``"row"`` or ``"batch"``, as for :func:`stochastic_depth`. Default: ``"row"``
        generator, seed, offset: as for :func:`dropout`.

    Returns:
        Tensor of the input's shape, dtype and memory format.
    """
    if has_torch_function((input, residual, scale)):
        return handle_torch_function(
            drop_path_add,
            (input, residual, scale),
            input,
            residual,
            p,
            training,
            scale=scale,
            mode=mode,
            generator=generator,
            seed=seed,
            offset=offset,
        )
    p, seed, offset = _checked_call("drop_path_add", input, _check_p(p, "drop probability"), seed, offset, generator)
    _check_tensor("drop_path_add", "residual", residual)
    _check_tensor("drop_path_add", "scale", scale, optional=True)
    dims = _sample_dims(mode, input.dim())
    if scale is None:
        branch = input
    else:
        try:
            branch = input * scale
        except RuntimeError as error:
            raise RuntimeError(
                f"drop_path_add: scale of shape {list(scale.shape)} must broadcast to the input's shape "
                f"{list(input.shape)} ({error})"
            ) from None
    if not training or p == 0:
        return ops.dropout_add(branch, residual, None, 0.0, seed=0)[0]
    return ops.dropout_add(branch, residual, None, p, seed, offset, generator, dims)[0]


def _opmath_eps(dtype: torch.dtype) -> float:
    """torch's rms_norm eps when none is given: the machine epsilon of the accumulation type."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _dropout_add_norm(
    name,
    input,
    residual,
    weight,
    bias,
    p,
    training,
    eps,
    rms,
    prenorm,
    residual_dtype,
    shared_dims,
    generator,
    seed,
    offset,
):
    p, seed, offset = _checked_call(name, input, p, seed, offset, generator)
    _check_tensor(name, "residual", residual, optional=True)
    _check_tensor(name, "weight", weight, optional=True)
    _check_tensor(name, "bias", bias, optional=True)
    if not training or p == 0:
        # The plain norm of residual + input: every check still runs, and no random state is drawn.
        p, seed, offset, generator = 0.0, 0, 0, None
    output, h, _, _, _ = ops.dropout_add_norm(
        input, residual, weight, bias, p, eps, rms, residual_dtype, seed, offset, generator, shared_dims
    )
    return (output, h) if prenorm else output


def dropout_add_layer_norm(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    p: float,
    training: bool = True,
    *,
    eps: float = 1e-5,
    prenorm: bool = False,
    residual_dtype: Optional[torch.dtype] = None,
    shared_dims: Union[int, Sequence[int]] = (),
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
):
    """``layer_norm(residual + dropout(input))`` over the last dim, in one pass over each row:
    a transformer block's branch, its skip connection and the next norm.

    ``h = residual + dropout(input)`` uses the mask of :func:`dropout` with the same ``seed``,
    ``offset`` and ``shared_dims`` (``residual=None``: ``h = dropout(input)``); the output is
    ``F.layer_norm(h, (h.shape[-1],), weight, bias, eps)`` in the input's dtype. Backward saves
    ``h``, a mean and an rstd per row and 16 bytes of random state: no mask.

    Args:
        input (Tensor): the branch output, any shape with at least one dim.
        residual (Tensor, optional): the skip connection, of the input's shape.
        weight, bias (Tensor, optional): 1-D, the size of the last dim.
        p (float): probability of an element of ``input`` to be zeroed.
        training (bool): apply dropout if ``True``; otherwise (or at ``p=0``) the plain
            ``layer_norm(residual + input)``. Default: ``True``
        eps (float): added to the variance. Default: ``1e-5``
        prenorm (bool): also return ``h``, the next block's residual. Default: ``False``
        residual_dtype (torch.dtype, optional): ``h``'s dtype, e.g. ``torch.float32`` for a
            float32 residual stream beside bfloat16 activations. Default: torch's promotion
            of the input's and the residual's dtypes.
        shared_dims: as for :func:`dropout`; ``range(1, input.dim())`` drops whole samples of
            the branch (drop path).
        generator, seed, offset: as for :func:`dropout`.

    Returns:
        ``output`` (the input's dtype), or ``(output, h)`` with ``prenorm=True``.
    """
    if has_torch_function((input, residual, weight, bias)):
        return handle_torch_function(
            dropout_add_layer_norm,
            (input, residual, weight, bias),
            input,
            residual,
            weight,
            bias,
            p,
            training,
            eps=eps,
            prenorm=prenorm,
            residual_dtype=residual_dtype,
            shared_dims=shared_dims,
            generator=generator,
            seed=seed,
            offset=offset,
        )
    return _dropout_add_norm(
        "dropout_add_layer_norm",
        input,
        residual,
        weight,
        bias,
        p,
        training,
        eps,
        False,
        prenorm,
        residual_dtype,
        shared_dims,
        generator,
        seed,
        offset,
    )


def dropout_add_rms_norm(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    p: float,
    training: bool = True,
    *,
    eps: Optional[float] = None,
    prenorm: bool = False,
    residual_dtype: Optional[torch.dtype] = None,
    shared_dims: Union[int, Sequence[int]] = (),
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
):
    """``rms_norm(residual + dropout(input))`` over the last dim, in one pass over each row: as
    :func:`dropout_add_layer_norm`, with ``F.rms_norm(h, (h.shape[-1],), weight, eps)``.
    ``eps=None`` is torch's default: the machine epsilon of the accumulation type (float32 for
    float16, bfloat16 and float32 inputs)."""
    if has_torch_function((input, residual, weight)):
        return handle_torch_function(
            dropout_add_rms_norm,
            (input, residual, weight),
            input,
            residual,
            weight,
            p,
            training,
            eps=eps,
            prenorm=prenorm,
            residual_dtype=residual_dtype,
            shared_dims=shared_dims,
            generator=generator,
            seed=seed,
            offset=offset,
        )
    if eps is None and isinstance(input, torch.Tensor):
        eps = _opmath_eps(input.dtype)
    return _dropout_add_norm(
        "dropout_add_rms_norm",
        input,
        residual,
        weight,
        None,
        p,
        training,
        eps,
        True,
        prenorm,
        residual_dtype,
        shared_dims,
        generator,
        seed,
        offset,
    )


def dropout_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    p: float = 0.5,
    training: bool = True,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    shared_dims: Union[int, Sequence[int]] = (),
) -> torch.Tensor:
    """``F.linear(dropout(input, p), weight, bias)`` that keeps no dropped input for backward.

    The mask is :func:`dropout`'s with the same ``seed``, ``offset`` and ``shared_dims``.
    Backward saves ``input`` (the same tensor the layer before, or a LoRA adapter's base
    layer, already keeps), ``weight`` and 16 bytes of random state; it redraws the dropped
    input for the weight's gradient, one elementwise pass. The unfused pair keeps the
    dropped input and a mask on top of ``input``. Under autocast the input, weight and bias
    are cast as ``F.linear`` casts them, and the mask scales the cast input.

    Args:
        input (Tensor): ``(*, in_features)``, float32, float64, float16 or bfloat16.
        weight (Tensor): ``(out_features, in_features)``, the input's dtype and device.
        bias (Tensor, optional): ``(out_features,)``.
        p (float): probability of an input element to be zeroed. Default: 0.5
        training (bool): apply dropout if ``True``; otherwise (or at ``p=0``)
            ``F.linear(input, weight, bias)``. Default: ``True``
        generator, seed, offset, shared_dims: as for :func:`dropout`.

    Returns:
        Tensor of shape ``(*, out_features)``.
    """
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(
            dropout_linear,
            (input, weight, bias),
            input,
            weight,
            bias,
            p,
            training,
            generator=generator,
            seed=seed,
            offset=offset,
            shared_dims=shared_dims,
        )
    p, seed, offset = _checked_call("dropout_linear", input, p, seed, offset, generator)
    _check_tensor("dropout_linear", "weight", weight)
    _check_tensor("dropout_linear", "bias", bias, optional=True)
    if not training or p == 0:
        return torch.nn.functional.linear(input, weight, bias)
    return ops.dropout_linear(input, weight, bias, p, seed, offset, generator, shared_dims)[0]


def _channel_dims(ndim: int, batched: bool) -> List[int]:
    """The dims torch's feature dropout shares one decision over (one per sample and channel):
    the spatial dims. An unbatched input's channel dim is 0, a batched one's is 1; torch refuses
    an input with fewer than 2 dims once an unbatched one is given its batch dim. The one home
    of the channel-wise shape rules: the functions below and the modules' TorchScript path
    (which compiles it) call it."""
    if ndim + (0 if batched else 1) < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    return list(range(2 if batched else 1, ndim))


def _dropout1d_batched(ndim: int) -> bool:
    """Whether a dropout1d input of ``ndim`` dims has a batch dim; torch's words for any other rank."""
    if ndim != 2 and ndim != 3:
        raise RuntimeError(
            "dropout1d: Expected 2D or 3D input, but received a "
            + str(ndim)
            + "D input. Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension (i.e. 2D or 3D inputs)."
        )
    return ndim == 3


def _channel_dropout(input, p, training, inplace, batched, generator, seed, offset):
    dims = _channel_dims(input.dim(), batched)
    return dropout(input, p, training, inplace, generator=generator, seed=seed, offset=offset, shared_dims=dims)


def _warn_unusual_dims(name: str, ndim: int, spatial: int) -> None:
    # torch's deprecation warning for inputs of other ranks, word for word.
    if ndim not in (spatial + 1, spatial + 2):
        warnings.warn(
            f"{name}: Received a {ndim}-D input to {name}, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            f"and silence this warning, please use dropout instead. Note that {name} "
            f"exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, "
            f"a channel dimension, and an optional batch dimension (i.e. {spatial + 1}D or {spatial + 2}D inputs).",
            stacklevel=3,
        )


def dropout1d(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Channel-wise dropout of ``(N, C, L)`` or ``(C, L)`` inputs: a drop-in for
    :func:`torch.nn.functional.dropout1d`. ``generator``, ``seed`` and ``offset`` as for
    :func:`dropout`."""
    if has_torch_function_unary(input):
        return handle_torch_function(
            dropout1d, (input,), input, p, training, inplace, generator=generator, seed=seed, offset=offset
        )
    p = _check_p(p)
    _check_tensor("dropout1d", "input", input)
    return _channel_dropout(input, p, training, inplace, _dropout1d_batched(input.dim()), generator, seed, offset)


def dropout2d(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Channel-wise dropout of ``(N, C, H, W)`` inputs: a drop-in for
    :func:`torch.nn.functional.dropout2d`, with its shape rules and warnings. ``generator``,
    ``seed`` and ``offset`` as for :func:`dropout`."""
    if has_torch_function_unary(input):
        return handle_torch_function(
            dropout2d, (input,), input, p, training, inplace, generator=generator, seed=seed, offset=offset
        )
    p = _check_p(p)
    _check_tensor("dropout2d", "input", input)
    _warn_unusual_dims("dropout2d", input.dim(), spatial=2)
    if input.dim() == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _channel_dropout(input, p, training, inplace, True, generator, seed, offset)


def dropout3d(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Channel-wise dropout of ``(N, C, D, H, W)`` or ``(C, D, H, W)`` inputs: a drop-in for
    :func:`torch.nn.functional.dropout3d`, with its shape rules and warnings. ``generator``,
    ``seed`` and ``offset`` as for :func:`dropout`."""
    if has_torch_function_unary(input):
        return handle_torch_function(
            dropout3d, (input,), input, p, training, inplace, generator=generator, seed=seed, offset=offset
        )
    p = _check_p(p)
    _check_tensor("dropout3d", "input", input)
    _warn_unusual_dims("dropout3d", input.dim(), spatial=3)
    return _channel_dropout(input, p, training, inplace, input.dim() == 5, generator, seed, offset)


def keep_mask(
    shape: Union[int, Sequence[int], torch.Size],
    p: float,
    *,
    seed: int,
    offset: int = 0,
    device: Union[str, torch.device] = "cpu",
    shared_dims: Sequence[int] = (),
) -> torch.Tensor:
    """The boolean keep-mask that :func:`dropout` with this ``seed`` and ``offset`` applies.

    For debugging and tests; training never materialises it.

    Args:
        shape: the shape of the tensor dropout is applied to.
        p (float): drop probability.
        seed (int): the seed, in ``[0, 2**64)``.
        offset (int): the Philox counter base. Default: 0
        device: where to compute it. Default: ``"cpu"``
        shared_dims: as for :func:`dropout`. Default: none

    Returns:
        A bool tensor of ``shape``: ``True`` where the element is kept.
    """
    p = _check_p(p)
    seed, offset = _check_randomness("keep_mask", seed, offset, None)
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    return ops.dropout(ones, p, seed, offset, None, shared_dims)[0] != 0
