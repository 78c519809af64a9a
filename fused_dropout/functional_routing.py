"""Functional dropout, reached: ``torch.nn.functional.dropout`` (and its channel-wise and alpha
forms) called inside a model, routed to the fused ops.

Models call ``F.dropout`` directly where no module holds the dropout (transformers' eager
attention, timm's classifier heads), and a module swap cannot reach those calls.
:func:`functional_mode` is a ``TorchFunctionMode`` that, while active, answers those calls
with this package's functions (the same arguments, torch's semantics and messages) and passes
every other call through. ``replace_dropout(model, functional=True)`` keeps it active wherever
the model's modules run, including a layer recomputed under activation checkpointing during
backward.
"""

import inspect
import sys
import threading

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import functional as fused

# torch's functions and the fused ones that answer them: the same positional arguments
# (input, p, training, inplace) and keywords.
_ROUTES = {
    F.dropout: fused.dropout,
    F.dropout1d: fused.dropout1d,
    F.dropout2d: fused.dropout2d,
    F.dropout3d: fused.dropout3d,
    F.alpha_dropout: fused.alpha_dropout,
    F.feature_alpha_dropout: fused.feature_alpha_dropout,
}


class FunctionalDropoutMode(TorchFunctionMode):
    """Routes torch's dropout functions to the fused ops while active; see :func:`functional_mode`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = _ROUTES.get(func)
        if route is not None:
            return route(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def functional_mode() -> FunctionalDropoutMode:
    """A context manager under which ``torch.nn.functional.dropout``, ``dropout1d/2d/3d``,
    ``alpha_dropout`` and ``feature_alpha_dropout`` run as this package's fused ops.

    The arguments and semantics are torch's (``training``, ``inplace``, the checks on ``p``);
    the masks come from torch's default generator, so ``torch.manual_seed`` reproduces a step.
    Backward replays the mask from 16 bytes. Calls that are not dropout pass through; each
    costs one Python call more while the mode is active. SDPA's ``dropout_p`` stays inside the
    attention kernel.

    Example::

        with fd.functional_mode():
            loss = model(x).sum()   # F.dropout inside model is fused
        loss.backward()
    """
    return FunctionalDropoutMode()


class _ModeEntries(threading.local):
    # Per thread: the modules that entered the mode, innermost last, with the mode each entered.
    def __init__(self):
        self.stack = []


_ENTRIES = _ModeEntries()


class _EnterMode:
    """A forward pre-hook: the outermost hooked module of a call enters the mode."""

    def __call__(self, module, args):
        if not any(isinstance(mode, FunctionalDropoutMode) for _, mode in _ENTRIES.stack):
            mode = FunctionalDropoutMode()
            mode.__enter__()
            _ENTRIES.stack.append((id(module), mode))


class _ExitMode:
    """A forward hook (always called, also when forward raises): the module that entered the
    mode leaves it."""

    def __call__(self, module, args, output):
        if _ENTRIES.stack and _ENTRIES.stack[-1][0] == id(module):
            _, mode = _ENTRIES.stack.pop()
            mode.__exit__(None, None, None)


_HANDLES = "_fused_dropout_functional_handles"


def install(model: nn.Module) -> None:
    """Keeps the mode active wherever ``model``'s modules run: every module gets the hooks, so
    a submodule called on its own (recomputed under checkpointing during backward, outside the
    model's forward) is covered too. Idempotent; :func:`remove` undoes it."""
    if getattr(model, _HANDLES, None):
        return
    handles = []
    for module in model.modules():
        if any(isinstance(hook, _EnterMode) for hook in module._forward_pre_hooks.values()):
            continue  # a submodule installed on its own
        handles.append(module.register_forward_pre_hook(_EnterMode()))
        handles.append(module.register_forward_hook(_ExitMode(), always_call=True))
    object.__setattr__(model, _HANDLES, handles)


def remove(model: nn.Module) -> None:
    """Removes what ``replace_dropout(model, functional=True)`` installed: the model's
    functional dropout calls run in torch again. Its ``state_dict`` was never touched."""
    for handle in getattr(model, _HANDLES, None) or []:
        handle.remove()
    if hasattr(model, _HANDLES):
        object.__delattr__(model, _HANDLES)


def uses_functional_dropout(module: nn.Module) -> bool:
    """True when the Python module that defines ``module``'s class calls a torch dropout
    function (read from its source): calls that no module swap reaches. A hint for a warning,
    not a proof."""
    name = type(module).__module__
    if name not in _CALLS_FUNCTIONAL_DROPOUT:
        try:
            source = inspect.getsource(sys.modules[name])
        except (KeyError, OSError, TypeError):
            source = ""
        ours = name.startswith(("torch.", "fused_dropout."))
        _CALLS_FUNCTIONAL_DROPOUT[name] = not ours and any(word in source for word in _CALL_WORDS)
    return _CALLS_FUNCTIONAL_DROPOUT[name]


_CALL_WORDS = ("functional.dropout(", "F.dropout(", "functional.alpha_dropout(", "F.alpha_dropout(")
_CALLS_FUNCTIONAL_DROPOUT = {}
