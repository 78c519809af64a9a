"""Drop-in ``nn.Module``s, mirroring ``torch.nn.Dropout`` and its channel-wise variants."""
import warnings

import torch
from torch import nn

from . import functional as F


class _FusedDropoutNd(nn.Module):
    __constants__ = ["p", "inplace"]

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        F._check_p(p)
        self.p = p
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class FusedDropout1d(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.Dropout1d`: zeroes whole channels of ``(N, C, L)`` or
    ``(C, L)`` inputs. See :func:`fused_dropout.functional.dropout1d`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace)


class FusedDropout2d(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.Dropout2d`: zeroes whole channels of ``(N, C, H, W)``
    inputs. See :func:`fused_dropout.functional.dropout2d`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)


class FusedDropout3d(_FusedDropoutNd):
    """Drop-in for :class:`torch.nn.Dropout3d`: zeroes whole channels of ``(N, C, D, H, W)``
    or ``(C, D, H, W)`` inputs. See :func:`fused_dropout.functional.dropout3d`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace)


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

    def forward(self, input: torch.Tensor, residual: torch.Tensor, bias=None) -> torch.Tensor:
        return F.dropout_add(input, residual, self.p, self.training, bias=bias)

    def extra_repr(self) -> str:
        return f"p={self.p}"


_REPLACEMENTS = {
    nn.Dropout: FusedDropout,
    nn.Dropout1d: FusedDropout1d,
    nn.Dropout2d: FusedDropout2d,
    nn.Dropout3d: FusedDropout3d,
}


def replace_dropout(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Dropout``, ``nn.Dropout1d``, ``nn.Dropout2d`` and ``nn.Dropout3d`` in
    ``model`` (in place) for its fused counterpart with the same ``p``, ``inplace`` and
    training mode. Other dropout kinds (``AlphaDropout``, ``FeatureAlphaDropout``) and
    subclasses of the torch modules are left alone, with a warning naming them.

    Args:
        model (nn.Module): the model to change; a bare dropout module is replaced too.

    Returns:
        The model (the new module when ``model`` itself was a dropout module).
    """

    def swap(module: nn.Module) -> nn.Module:
        fused_cls = _REPLACEMENTS.get(type(module))
        if fused_cls is None:
            return module
        fused = fused_cls(module.p, module.inplace)
        fused.train(module.training)
        return fused

    untouched = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and type(module) not in _REPLACEMENTS:
            untouched.append(f"{name or '<model>'} ({type(module).__name__})")
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            replacement = swap(child)
            if replacement is not child:
                setattr(parent, child_name, replacement)
    if untouched:
        warnings.warn(
            "replace_dropout: left these modules unchanged, since fused_dropout has no kernel for them: "
            + ", ".join(untouched),
            stacklevel=2,
        )
    return swap(model)
