"""fused_dropout: dropout as one fused pass over memory.

Philox random numbers, the keep/drop decision and the scaling happen in a single CPU or
CUDA kernel; backward regenerates the mask from a 16-byte ``rng_state`` instead of storing
it. The mask is a pure function of (seed, base, logical index, p), so the same seed gives
the same mask on every device, dtype and memory layout.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from ._load import load_extension

_C = load_extension()

from . import distributed, ops
from .functional import (
    act_dropout,
    alpha_dropout,
    drop_path_add,
    dropout,
    dropout1d,
    dropout2d,
    dropout3d,
    dropout_add,
    dropout_add_layer_norm,
    dropout_add_rms_norm,
    dropout_linear,
    feature_alpha_dropout,
    keep_mask,
    stochastic_depth,
)
from .functional_routing import functional_mode
from .functional_routing import remove as remove_functional_mode
from .modules import (
    FusedActDropout,
    FusedAlphaDropout,
    FusedDropout,
    FusedDropout1d,
    FusedDropout2d,
    FusedDropout3d,
    FusedDropoutAdd,
    FusedDropoutAddLayerNorm,
    FusedDropoutAddRMSNorm,
    FusedDropoutLinear,
    FusedDropPath,
    FusedFeatureAlphaDropout,
    FusedStochasticDepth,
    replace_dropout,
)
from .ops import philox4x32_10

__version__ = "0.1.0"

distributed._install()


def has_cuda_kernels() -> bool:
    """True when this build of the extension has its CUDA kernels compiled in."""
    return bool(_C.with_cuda)


__all__ = [
    "FusedActDropout",
    "FusedAlphaDropout",
    "FusedDropout",
    "FusedDropout1d",
    "FusedDropout2d",
    "FusedDropout3d",
    "FusedDropoutAdd",
    "FusedDropoutAddLayerNorm",
    "FusedDropoutAddRMSNorm",
    "FusedDropoutLinear",
    "FusedDropPath",
    "FusedFeatureAlphaDropout",
    "FusedStochasticDepth",
    "act_dropout",
    "alpha_dropout",
    "distributed",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
    "dropout_add_layer_norm",
    "dropout_add_rms_norm",
    "dropout_linear",
    "feature_alpha_dropout",
    "functional_mode",
    "has_cuda_kernels",
    "keep_mask",
    "ops",
    "philox4x32_10",
    "remove_functional_mode",
    "replace_dropout",
    "stochastic_depth",
]
