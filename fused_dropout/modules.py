"""Drop-in ``nn.Module``s, mirroring ``torch.nn.Dropout`` and its channel-wise variants."""

import sys
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import functional as F
from . import functional_routing


def _scripted_dropout(input: torch.Tensor, p: float, training: bool, inplace: bool, shared_dims: List[int]):
    """The modules' forward under TorchScript, which cannot compile the functional API's
    keyword-only arguments: the registered ops themselves."""
    if not training or p == 0.0:
        return input
    if inplace:
        rng_state = torch.ops.fused_dropout.dropout_state(input, None, 0, None, shared_dims)
        return torch.ops.fused_dropout.dropout_replay_(input, rng_state, p, shared_dims)
    return torch.ops.fused_dropout.dropout(input, p, None, 0, None, shared_dims)[0]


def _scripted_alpha_dropout(input: torch.Tensor, p: float, training: bool, inplace: bool, shared_dims: List[int]):
    """Alpha dropout's forward under TorchScript (see :func:`_scripted_dropout`)."""
    if not training or p == 0.0:
        return input
    output = torch.ops.fused_dropout.alpha_dropout(input, p, None, 0, None, shared_dims)[0]
    return input.copy_(output) if inplace else output


def _scripted_activation(input: torch.Tensor, activation: str) -> torch.Tensor:
    """torch's own activation for an act_dropout name, in a form TorchScript compiles."""
    if activation == "relu":
        return torch.nn.functional.relu(input)
    if activation == "gelu":
        return torch.nn.functional.gelu(input)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(input, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(input)
    return torch.square(torch.nn.functional.relu(input))


class _FusedDropoutNd(nn.Module):
    __constants__ = ["p", "inplace"]

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        F._check_p(p)
        self.p = p
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def _shared_dims(self, input: torch.Tensor) -> List[int]:
        # The channel-wise modules share the mask over the spatial dims (see their forward).
        return []

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._forward(input)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        # Each subclass compiles to its own op: dropout here, alpha dropout in the alpha modules.
        return _scripted_dropout(input, float(self.p), self.training, self.inplace, self._shared_dims(input))

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FusedDropout(_FusedDropoutNd):
    """Drop-in replacement for :class:`torch.nn.Dropout` that runs as one fused kernel.

    Same constructor, ``repr`` and (empty) ``state_dict`` as ``nn.Dropout``; in training
    mode it calls :func:`fused_dropout.dropout`, in eval mode it returns its input.

    Args:
        p (float): probability of an element to be zeroed. Default: 0.5
        inplace (bool): do the operation in place. Default: ``False``

    Shape:
        - Input: any shape.
        - Output: the shape, dtype and memory format of the input.
    """

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class FusedDropout1d(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.Dropout1d`: zeroes whole channels of ``(N, C, L)`` or
    ``(C, L)`` inputs. See :func:`fused_dropout.functional.dropout1d`."""

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace)

    def _shared_dims(self, input: torch.Tensor) -> List[int]:
        return F._channel_dims(input.dim(), F._dropout1d_batched(input.dim()))


class FusedDropout2d(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.Dropout2d`: zeroes whole channels of ``(N, C, H, W)``
    inputs. See :func:`fused_dropout.functional.dropout2d`."""

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)

    def _shared_dims(self, input: torch.Tensor) -> List[int]:
        return F._channel_dims(input.dim(), True)


class FusedDropout3d(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.Dropout3d`: zeroes whole channels of ``(N, C, D, H, W)``
    or ``(C, D, H, W)`` inputs. See :func:`fused_dropout.functional.dropout3d`."""

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace)

    def _shared_dims(self, input: torch.Tensor) -> List[int]:
        return F._channel_dims(input.dim(), input.dim() == 5)


class FusedDropoutAdd(_FusedDropoutNd):
    """``residual + dropout(input + bias)`` as one fused kernel, for transformer blocks.
    See :func:`fused_dropout.functional.dropout_add`.

    Args:
        p (float): probability of an element to be zeroed. Default: 0.5

    Shape:
        - input, residual: the same shape; bias (optional): ``(input.shape[-1],)``.
        - Output: the input's shape, dtype and memory format.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p, inplace=False)

    def forward(self, input: torch.Tensor, residual: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.training and float(self.p) > 0.0:
                return torch.ops.fused_dropout.dropout_add(input, residual, bias, float(self.p), None, 0, None, [])[0]
            return torch.ops.fused_dropout.dropout_add(input, residual, bias, 0.0, 0, 0, None, [])[0]
        return F.dropout_add(input, residual, self.p, self.training, bias=bias)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FusedAlphaDropout(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.AlphaDropout`: alpha dropout for SELU networks as one fused
    pass. See :func:`fused_dropout.functional.alpha_dropout`."""

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.alpha_dropout(input, self.p, self.training, self.inplace)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        return _scripted_alpha_dropout(input, float(self.p), self.training, self.inplace, [])


class FusedFeatureAlphaDropout(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.FeatureAlphaDropout`: alpha dropout of whole channels. See
    :func:`fused_dropout.functional.feature_alpha_dropout`."""

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.feature_alpha_dropout(input, self.p, self.training, self.inplace)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        return _scripted_alpha_dropout(
            input, float(self.p), self.training, self.inplace, F._channel_dims(input.dim(), True)
        )


class FusedActDropout(nn.Module):
    """``dropout(activation(input))`` as one fused pass: the activation module and the dropout
    module after it in one. See :func:`fused_dropout.functional.act_dropout`.

    In eval mode it calls torch's own activation, so its output equals the unfused pair's
    bit for bit.

    Args:
        activation (str): ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"squared_relu"``.
            Default: ``"gelu"``
        p (float): probability of an element to be zeroed. Default: 0.5
    """

    def __init__(self, activation: str = "gelu", p: float = 0.5) -> None:
        super().__init__()
        F._check_p(p)
        F._activation(activation)
        self.activation = activation
        self.p = p

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.training and float(self.p) > 0.0:
                return torch.ops.fused_dropout.act_dropout(
                    input, None, float(self.p), self.activation, None, 0, None, []
                )[0]
            return _scripted_activation(input, self.activation)
        return F.act_dropout(input, self.p, self.training, activation=self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, p={self.p}"


class FusedStochasticDepth(nn.Module):
    """Drop-in for :class:`torchvision.ops.StochasticDepth`: the same constructor, ``repr``
    and (empty) ``state_dict``, as one fused pass. See
    :func:`fused_dropout.functional.stochastic_depth`.

    Args:
        p (float): probability of a sample (``mode="row"``) or of the batch (``"batch"``) to be dropped.
        mode (str): ``"row"`` or ``"batch"``.
    """

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return F.stochastic_depth(input, self.p, self.mode, self.training)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        # torchvision's checks and words, then the dropout op with the per-sample (or
        # whole-batch) mask, as F.stochastic_depth calls it.
        p = float(self.p)
        if p < 0.0 or p > 1.0:
            raise ValueError("drop probability has to be between 0 and 1, but got " + str(p))
        if self.mode == "row":
            dims = list(range(1, input.dim()))
        elif self.mode == "batch":
            dims = list(range(input.dim()))
        else:
            raise ValueError("mode has to be either 'batch' or 'row', but got " + self.mode)
        if not self.training or p == 0.0:
            return input
        return torch.ops.fused_dropout.dropout(input, p, None, 0, None, dims)[0]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


class FusedDropPath(nn.Module):
    """Drop-in for timm's :class:`timm.layers.DropPath`: drops whole samples of a residual
    branch in one fused pass, with timm's constructor, attributes, ``repr`` and (empty)
    ``state_dict``. See :func:`fused_dropout.functional.stochastic_depth`.

    Args:
        drop_prob (float): probability of a sample to be dropped. Default: 0.0
        scale_by_keep (bool): scale kept samples by ``1 / (1 - drop_prob)``. Default: ``True``
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(x)
        return F.stochastic_depth(x, self.drop_prob, "row", self.training, scale_by_keep=self.scale_by_keep)

    def _scripted_forward(self, x: torch.Tensor) -> torch.Tensor:
        p = float(self.drop_prob)
        if not self.training or p == 0.0:
            return x
        dims = list(range(1, x.dim()))
        if self.scale_by_keep:
            return torch.ops.fused_dropout.dropout(x, p, None, 0, None, dims)[0]
        rng_state = torch.ops.fused_dropout.dropout_state(x, None, 0, None, dims)
        return torch.ops.fused_dropout.dropout_replay(x, rng_state, p, dims, 1.0)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def _last_dim_shape(name: str, normalized_shape) -> tuple:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(
            f"{name} normalises over the last dim only: normalized_shape must be an int or a 1-tuple, got {shape}"
        )
    return shape


def _scripted_dropout_add_norm(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    p: float,
    training: bool,
    eps: Optional[float],
    rms: bool,
    residual_dtype: Optional[torch.dtype],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(output, h)`` of the norm modules under TorchScript: the op itself, as the functional
    API calls it (eval and p=0 the plain norm with no state drawn; RMSNorm's default eps the
    machine epsilon of the accumulation type)."""
    if eps is None:
        eps = 2.220446049250313e-16 if input.dtype == torch.float64 else 1.1920928955078125e-07
    seed: Optional[int] = None
    if not training or p == 0.0:
        p, seed = 0.0, 0
    output, h, _, _, _ = torch.ops.fused_dropout.dropout_add_norm(
        input, residual, weight, bias, p, eps, rms, residual_dtype, seed, 0, None, []
    )
    return output, h


class _FusedDropoutAddNorm(nn.Module):
    """What the two dropout + residual + norm modules share: the arguments beyond the norm's,
    one normalised dim, the repr, and the forward under TorchScript."""

    __constants__ = ["prenorm"]

    def __init__(self, normalized_shape, eps, elementwise_affine, p, prenorm, residual_dtype) -> None:
        super().__init__()
        F._check_p(p)
        self.normalized_shape = _last_dim_shape(type(self).__name__, normalized_shape)
        self.eps, self.elementwise_affine, self.p, self.prenorm = eps, elementwise_affine, p, prenorm
        self.residual_dtype = residual_dtype

    def _parameter(self, name, present, init, device, dtype) -> None:
        # As nn.LayerNorm: an absent parameter is registered as None.
        value = nn.Parameter(init(self.normalized_shape, device=device, dtype=dtype)) if present else None
        self.register_parameter(name, value)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, p={self.p}, "
            f"prenorm={self.prenorm}"
        )


class FusedDropoutAddLayerNorm(_FusedDropoutAddNorm):
    """``layer_norm(residual + dropout(input))`` as one fused pass: :class:`torch.nn.LayerNorm`
    over the last dim with the dropout and the residual add of the branch before it. The
    parameters are LayerNorm's (``weight``, ``bias``), so a LayerNorm's ``state_dict`` loads
    into it strictly. See :func:`fused_dropout.functional.dropout_add_layer_norm`.

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as for ``nn.LayerNorm``
            (one normalised dim).
        p (float): probability of an element of the branch to be zeroed. Default: 0.1
        prenorm (bool): ``forward`` returns ``(output, h)``, h the next residual. Default: ``False``
        residual_dtype (torch.dtype, optional): h's dtype. Default: as the inputs promote.

    Shape:
        - input, residual (optional): ``(*, normalized_shape[0])``.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        p: float = 0.1,
        prenorm: bool = False,
        residual_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, p, prenorm, residual_dtype)
        self._parameter("weight", elementwise_affine, torch.ones, device, dtype)
        self._parameter("bias", elementwise_affine and bias, torch.zeros, device, dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if torch.jit.is_scripting():
            output, h = _scripted_dropout_add_norm(
                input,
                residual,
                self.weight,
                self.bias,
                float(self.p),
                self.training,
                self.eps,
                False,
                self.residual_dtype,
            )
            if self.prenorm:
                return output, h
            return output
        return F.dropout_add_layer_norm(
            input,
            residual,
            self.weight,
            self.bias,
            self.p,
            self.training,
            eps=self.eps,
            prenorm=self.prenorm,
            residual_dtype=self.residual_dtype,
        )


class FusedDropoutAddRMSNorm(_FusedDropoutAddNorm):
    """``rms_norm(residual + dropout(input))`` as one fused pass: :class:`torch.nn.RMSNorm` over
    the last dim with the dropout and residual add before it; its ``weight`` is RMSNorm's, so an
    RMSNorm's ``state_dict`` loads into it strictly. See
    :func:`fused_dropout.functional.dropout_add_rms_norm`.

    Args:
        normalized_shape, eps, elementwise_affine, device, dtype: as for ``nn.RMSNorm``.
        p, prenorm, residual_dtype: as for :class:`FusedDropoutAddLayerNorm`.
    """

    def __init__(
        self,
        normalized_shape,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        p: float = 0.1,
        prenorm: bool = False,
        residual_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, p, prenorm, residual_dtype)
        self._parameter("weight", elementwise_affine, torch.ones, device, dtype)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if torch.jit.is_scripting():
            output, h = _scripted_dropout_add_norm(
                input, residual, self.weight, None, float(self.p), self.training, self.eps, True, self.residual_dtype
            )
            if self.prenorm:
                return output, h
            return output
        return F.dropout_add_rms_norm(
            input,
            residual,
            self.weight,
            self.p,
            self.training,
            eps=self.eps,
            prenorm=self.prenorm,
            residual_dtype=self.residual_dtype,
        )


class FusedDropoutLinear(nn.Linear):
    """``nn.Linear`` applied to ``dropout(input, p)``: an ``nn.Dropout`` and the ``nn.Linear``
    after it in one module, which keeps no dropped input for backward. See
    :func:`fused_dropout.functional.dropout_linear`.

    A subclass of ``nn.Linear`` with its parameters under its names, so a Linear's
    ``state_dict`` loads strictly and code that expects a Linear (a LoRA adapter's merge, an
    ``isinstance`` check) still finds one. In eval mode, or at ``p=0``, it is ``nn.Linear``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        p (float): probability of an input element to be zeroed. Default: 0.5
    """

    __constants__ = ["in_features", "out_features", "p"]

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *, p: float = 0.5
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.p = F._check_p(p)

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> "FusedDropoutLinear":
        """The fused module holding ``linear``'s own parameters (the same ``Parameter`` objects)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight = linear.weight
        fused.register_parameter("bias", linear.bias)
        fused.p = F._check_p(p)
        fused.train(linear.training)
        return fused

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.training and float(self.p) > 0.0:
                return torch.ops.fused_dropout.dropout_linear(
                    input, self.weight, self.bias, float(self.p), None, 0, None, []
                )[0]
            return torch.nn.functional.linear(input, self.weight, self.bias)
        return F.dropout_linear(input, self.weight, self.bias, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def _is_timm_drop_path(module: nn.Module) -> bool:
    # By name, so that replace_dropout works without timm installed.
    cls = type(module)
    return cls.__name__ == "DropPath" and cls.__module__.startswith("timm.")


def _is_torchvision_stochastic_depth(module: nn.Module) -> bool:
    # Checked by name so that replace_dropout works without torchvision installed.
    cls = type(module)
    return cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision.")


_REPLACEMENTS = {
    nn.Dropout: FusedDropout,
    nn.Dropout1d: FusedDropout1d,
    nn.Dropout2d: FusedDropout2d,
    nn.Dropout3d: FusedDropout3d,
    nn.AlphaDropout: FusedAlphaDropout,
    nn.FeatureAlphaDropout: FusedFeatureAlphaDropout,
}


def _activation_name(module: nn.Module):
    """The act_dropout name of an activation module, or None."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return None


# The hook tables of nn.Module: a replaced module takes over the very dicts of the module it
# replaces, so hooks keep running and their RemovableHandles keep working.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, table, None) for table in _HOOK_TABLES)


def _take_over_hooks(new: nn.Module, old: nn.Module) -> None:
    for table in _HOOK_TABLES:
        if hasattr(old, table):
            setattr(new, table, getattr(old, table))
    if hasattr(old, "_is_full_backward_hook"):
        new._is_full_backward_hook = old._is_full_backward_hook


def _runs_in_order(container: nn.Module) -> bool:
    """True for an nn.Sequential whose forward is nn.Sequential's own: each child's output is
    the next child's input and nothing else. A subclass with its own forward may use a
    child's output twice, which a fused pair could not give it."""
    return isinstance(container, nn.Sequential) and type(container).forward is nn.Sequential.forward


def _adjacent_in_order(model: nn.Module):
    """(container, before, first, second) for each pair of adjacent children of every
    plain-running nn.Sequential in ``model``: the names of the pair, and the module before the
    first (or None). Modules are read as the walk reaches them, so a pair fused in a slot is
    what the next pair sees."""
    for module in list(model.modules()):
        if not _runs_in_order(module):
            continue
        names = list(module._modules.keys())
        for index, (first, second) in enumerate(zip(names, names[1:])):
            before = module._modules[names[index - 1]] if index > 0 else None
            yield module, before, first, second


def _fuse_activations(model: nn.Module) -> None:
    # An activation directly followed by an nn.Dropout inside a plain-running nn.Sequential
    # becomes one FusedActDropout in the activation's slot and an nn.Identity in the
    # dropout's, so every index, and with it every state_dict key, stays where it was
    # (neither module has state). A pair with a hook on either module is left unfused: no one
    # module could call both modules' hooks with what they saw.
    for module, _, first, second in _adjacent_in_order(model):
        activation, dropout = module._modules[first], module._modules[second]
        name = _activation_name(activation) if activation is not None else None
        if name is None or type(dropout) is not nn.Dropout or _has_hooks(activation) or _has_hooks(dropout):
            continue
        fused = FusedActDropout(name, dropout.p)
        fused.train(dropout.training)
        module._modules[first] = fused
        module._modules[second] = nn.Identity()


def _plain_dropout_p(module: nn.Module) -> Optional[float]:
    """p of an ``nn.Dropout`` or a ``FusedDropout`` (either, since replace_dropout may run twice)
    with no hooks, or None."""
    if type(module) not in (nn.Dropout, FusedDropout) or _has_hooks(module):
        return None
    return module.p


def _fusable_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not _has_hooks(module)


def _lora_layer_class():
    """PEFT's LoraLayer when PEFT is imported (a model with LoRA layers has imported it), else None."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


# Activations whose backward needs their input: fused with the dropout after them, they keep
# that input and the Linear's, as dropout_linear after them would too, and save a pass. ReLU's
# backward needs only its output, which dropout_linear after it shares: one tensor fewer.
_FUSE_WITH_ACTIVATION = ("gelu", "gelu_tanh", "silu")


def _fuse_linears(model: nn.Module, before_activations: bool) -> List[str]:
    """Dropout directly before a Linear becomes one FusedDropoutLinear holding the Linear's own
    parameters: in a plain-running nn.Sequential (an Identity in the dropout's slot, the fused
    module in the Linear's, so indices and state_dict keys stay), unless ``before_activations``
    and a GELU or SiLU comes right before the dropout (the activation fusion takes that pair);
    and in each vanilla adapter of a PEFT LoRA layer on an nn.Linear (``lora_dropout[name]`` and
    ``lora_A[name]``, whose forward is ``lora_B(lora_A(lora_dropout(x)))``). Returns the adapters
    left unfused because a LoRA variant (DoRA and others) uses the dropped input beyond lora_A."""
    for module, before, first, second in _adjacent_in_order(model):
        dropout, linear = module._modules[first], module._modules[second]
        p = _plain_dropout_p(dropout) if dropout is not None else None
        if p is None or linear is None or not _fusable_linear(linear):
            continue
        if before_activations and before is not None and _activation_name(before) in _FUSE_WITH_ACTIVATION:
            continue
        fused = FusedDropoutLinear.from_linear(linear, p)
        fused.train(dropout.training)
        module._modules[first] = nn.Identity()
        module._modules[second] = fused
    lora_layer = _lora_layer_class()
    if lora_layer is None:
        return []
    variants = []
    for layer_name, layer in model.named_modules():
        # An nn.Linear base only: a LoRA layer on GPT-2's Conv1D keeps its dropout module, swapped alone.
        if not isinstance(layer, lora_layer) or not isinstance(layer.get_base_layer(), nn.Linear):
            continue
        for adapter in list(layer.lora_A.keys()):
            p = _plain_dropout_p(layer.lora_dropout[adapter]) if adapter in layer.lora_dropout else None
            if p is None or not _fusable_linear(layer.lora_A[adapter]):
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                variants.append(f"{layer_name} ({adapter})")
                continue
            fused = FusedDropoutLinear.from_linear(layer.lora_A[adapter], p)
            fused.train(layer.lora_dropout[adapter].training)
            layer.lora_dropout[adapter] = nn.Identity()
            layer.lora_A[adapter] = fused
    return variants


_FUSED_MODULES = (_FusedDropoutNd, FusedActDropout, FusedStochasticDepth, FusedDropPath, FusedDropoutLinear)


def _still_dropout_like(module: nn.Module) -> bool:
    """A module left in place that drops something: torch's dropout classes and any class
    named like a dropout (timm's DropBlock2d, other libraries' DropPath or StochasticDepth)."""
    if isinstance(module, _FUSED_MODULES):
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    name = type(module).__name__
    return "Drop" in name or "StochasticDepth" in name


def _fused_norm_block_class(block_class):
    """A subclass of torchvision's EncoderBlock whose forward is the stock one with
    ``ln_2(input + dropout(attention))`` as one fused pass; nothing else changes."""

    class FusedNormEncoderBlock(block_class):
        def forward(self, input: torch.Tensor):
            torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
            x = self.ln_1(input)
            x, _ = self.self_attention(x, x, x, need_weights=False)
            y, x = F.dropout_add_layer_norm(
                x,
                input,
                self.ln_2.weight,
                self.ln_2.bias,
                self.dropout.p,
                self.training,
                eps=self.ln_2.eps,
                prenorm=True,
            )
            return x + self.mlp(y)

    FusedNormEncoderBlock.__name__ = FusedNormEncoderBlock.__qualname__ = "FusedNormEncoderBlock"
    return FusedNormEncoderBlock


def _fuse_norms(model: nn.Module) -> None:
    """Turns every torchvision ViT EncoderBlock whose ln_2 is a LayerNorm over the last dim and
    whose dropout is a (fused or torch) dropout module, neither hooked, into its fused subclass."""
    try:
        from torchvision.models.vision_transformer import EncoderBlock
    except ImportError:
        return
    fused_class = None
    for module in model.modules():
        if type(module) is not EncoderBlock:
            continue
        norm, drop = module.ln_2, module.dropout
        if not (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1):
            continue
        if _plain_dropout_p(drop) is None or drop.inplace or _has_hooks(norm):
            continue
        fused_class = fused_class or _fused_norm_block_class(EncoderBlock)
        module.__class__ = fused_class


def replace_dropout(
    model: nn.Module,
    fuse_activations: bool = True,
    *,
    functional: bool = False,
    fuse_norms: bool = False,
    fuse_linears: Optional[bool] = None,
) -> nn.Module:
    """Swap every torch dropout module (``nn.Dropout``, ``nn.Dropout1d/2d/3d``,
    ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``), every ``torchvision.ops.StochasticDepth``
    and every ``timm.layers.DropPath`` in ``model`` (in place) for its fused counterpart with
    the same arguments and training mode. A module registered in several places is replaced
    by one fused module in all of them. Hooks registered on a swapped module (forward,
    pre-forward, backward, state_dict) are carried over; their handles keep working.

    With ``fuse_activations``, an ``nn.ReLU``, ``nn.GELU`` or ``nn.SiLU`` directly followed by an
    ``nn.Dropout`` inside an ``nn.Sequential`` (torchvision's ``MLP`` and ViT's ``MLPBlock`` are
    Sequentials) becomes one :class:`FusedActDropout` in the activation's slot and an
    ``nn.Identity`` in the dropout's: indices and ``state_dict`` keys stay the same, so
    checkpoints of the stock model load into the swapped one and back. Only containers whose
    forward is ``nn.Sequential.forward`` are fused (a subclass with its own forward may use the
    activation's output twice), and a pair with a hook on either module stays unfused.

    With ``fuse_linears``, an ``nn.Dropout`` directly followed by an ``nn.Linear`` inside such an
    ``nn.Sequential`` (the classifier heads of VGG, AlexNet, EfficientNet, MobileNet) becomes an
    ``nn.Identity`` and a :class:`FusedDropoutLinear` holding the Linear's own parameters, in the
    Linear's slot; and in every PEFT LoRA layer on an ``nn.Linear``, each adapter's
    ``lora_dropout`` and ``lora_A`` become an ``nn.Identity`` and a :class:`FusedDropoutLinear`. Backward
    then keeps the Linear's input, not a dropped copy of it. Keys and parameters stay the same,
    so PEFT's ``save_pretrained``, ``load_adapter`` and ``merge_and_unload`` work as before. An
    adapter of a LoRA variant (DoRA and others use the dropped input beyond ``lora_A``) keeps its
    dropout module, swapped as any other, and the warning names it. Where a GELU or SiLU comes
    before the dropout, the activation fusion takes the pair instead (it saves the same tensors
    and a pass); after a ReLU, the dropout goes with the Linear (the ReLU's saved output is then
    the Linear's saved input: one tensor fewer).

    With ``functional``, the model's own calls of ``torch.nn.functional.dropout`` (and its
    channel-wise and alpha forms), which no module swap reaches, run as the fused ops too:
    :func:`fused_dropout.functional_mode` is kept active, in training, in the modules that call
    them (learned in the first training forward, which runs it over the whole model), including
    a layer recomputed under checkpointing. Replacing again learns anew, after a module is
    added. ``fused_dropout.remove_functional_mode`` undoes it; ``state_dict`` is untouched
    either way.

    With ``fuse_norms``, each torchvision ViT ``EncoderBlock`` runs its attention branch's
    dropout, the residual add and ``ln_2`` as one :func:`~fused_dropout.functional.dropout_add_layer_norm`
    pass (its modules and ``state_dict`` stay as they are; a hook on ``dropout`` or ``ln_2``
    leaves the block unfused).

    Afterwards one warning names every module that still drops in torch (a subclass of a
    dropout class, timm's ``DropBlock2d``, any class named like a dropout), and, without
    ``functional``, says when the model's code calls functional dropout.

    Args:
        model (nn.Module): the model to change; a bare dropout module is replaced too.
        fuse_activations (bool): fuse activation + dropout pairs. Default: ``True``
        functional (bool): reach functional dropout calls too. Default: ``False``
        fuse_norms (bool): fuse dropout + residual + LayerNorm in ViT encoder blocks. Default: ``False``
        fuse_linears (bool, optional): fuse dropout + Linear pairs and LoRA adapters. Default: the
            value of ``fuse_activations``, so ``fuse_activations=False`` swaps modules one for one.

    Returns:
        The model (the new module when ``model`` itself was a dropout module).
    """
    replaced = {}  # id of a replaced module -> its fused module, so a shared module stays shared

    def swap(module: nn.Module) -> nn.Module:
        if id(module) in replaced:
            return replaced[id(module)]
        if _is_torchvision_stochastic_depth(module):
            fused = FusedStochasticDepth(module.p, module.mode)
        elif _is_timm_drop_path(module):
            fused = FusedDropPath(module.drop_prob, module.scale_by_keep)
        elif type(module) in _REPLACEMENTS:
            fused = _REPLACEMENTS[type(module)](module.p, module.inplace)
        else:
            return module
        fused.train(module.training)
        _take_over_hooks(fused, module)
        replaced[id(module)] = fused
        return fused

    if fuse_linears is None:
        fuse_linears = fuse_activations
    lora_variants = _fuse_linears(model, fuse_activations) if fuse_linears else []
    if fuse_activations:
        _fuse_activations(model)
    for parent in list(model.modules()):
        # _modules itself, not named_children(), which names a module registered twice once.
        for child_name, child in list(parent._modules.items()):
            replacement = swap(child) if child is not None else child
            if replacement is not child:
                setattr(parent, child_name, replacement)
    model = swap(model)
    if fuse_norms:
        _fuse_norms(model)

    untouched = [
        f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules() if _still_dropout_like(m)
    ]
    calls_functional = not functional and any(functional_routing.uses_functional_dropout(m) for m in model.modules())
    if untouched or calls_functional or lora_variants:
        parts = []
        if untouched:
            parts.append(
                "left these modules unchanged, since fused_dropout has no kernel for them: " + ", ".join(untouched)
            )
        if lora_variants:
            parts.append(
                "kept lora_dropout and lora_A apart in these LoRA adapters, whose variant (e.g. DoRA) uses "
                "the dropped input beyond lora_A: " + ", ".join(lora_variants)
            )
        if calls_functional:
            parts.append(
                "the model's code calls torch.nn.functional.dropout, which a module swap does not reach; "
                "replace_dropout(model, functional=True) routes those calls to the fused ops"
            )
        warnings.warn("replace_dropout: " + "; ".join(parts), stacklevel=2)
    if functional:
        functional_routing.install(model)
    return model
