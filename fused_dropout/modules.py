"""Drop-in ``nn.Module``s, mirroring ``torch.nn.Dropout``."""
import torch
from torch import nn

from . import functional as F


class FusedDropout(nn.Module):
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

    __constants__ = ["p", "inplace"]

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        F._check_p(p)
        self.p = p
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
