"""Functional dropout, reached: ``torch.nn.functional.dropout`` (and its channel-wise and alpha
forms) called inside a model, routed to the fused ops.

Models call ``F.dropout`` directly where no module holds the dropout (transformers' eager
attention, timm's classifier heads), and a module swap cannot reach those calls.
:func:`functional_mode` is a ``TorchFunctionMode`` that, while active, answers those calls
with this package's functions (the same arguments, torch's semantics and messages) and passes
every other call through. ``replace_dropout(model, functional=True)`` keeps it active in the
modules that call those functions, including a layer recomputed under activation
checkpointing during backward, and nowhere else.
"""

import inspect
import sys
import threading
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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
        if route is None:
            return func(*args, **(kwargs or {}))
        if not torch.compiler.is_compiling() and _ENTRIES.stack:
            entry = _ENTRIES.stack[-1]
            entry.routing.callers.add(type(entry.module))
            _refuse_a_call_checkpointed_inside(entry.module, entry.call, func)
        return route(*args, **(kwargs or {}))


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


def _refuse_a_call_checkpointed_inside(module, call, func):
    """A dropout call inside a function that ``torch.utils.checkpoint`` runs within ``module``'s
    forward is recomputed during backward with no module call around it, so no hook enters
    the mode: the recomputation would draw torch's mask, not the forward's, and the gradients
    would be wrong (silently, with ``use_reentrant=True``). Refused here. A checkpointed module
    is fine: its call is hooked, and recomputing it enters the mode. ``call`` is the frame of
    ``module``'s call, where the search for a checkpoint between the two ends."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            raise RuntimeError(
                f"replace_dropout(model, functional=True): {type(module).__name__}'s forward calls "
                f"torch.nn.functional.{func.__name__} inside a function that torch.utils.checkpoint "
                "recomputes during backward, where no module call enters the functional mode, so "
                "the recomputation would draw another mask than the forward. Checkpoint a module "
                "instead (its call is hooked), or leave functional=False for this model."
            )
        if frame is call:
            return
        frame = frame.f_back


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


class _Entry(NamedTuple):
    """A hooked module running on this thread."""

    module: nn.Module
    routing: "_Routing"  # that hooked it
    mode: Optional[FunctionalDropoutMode]  # that it entered: None where one was active, or in eval
    call: Optional[types.FrameType]  # the frame of its call; None while compiling


class _ModeEntries(threading.local):
    # Per thread: the hooked modules running, innermost last.
    def __init__(self):
        self.stack = []


_ENTRIES = _ModeEntries()


class _Routing:
    """What ``replace_dropout(model, functional=True)`` installs on one model.

    A mode costs every torch call made under it a Python call, and a forward hook costs every
    call of its module one, so both go only where functional dropout runs. Until a training
    forward of the model returns, every module is hooked and the outermost one running enters
    the mode; the mode notes the class of the innermost module of each dropout call it answers.
    After that forward, only the modules of those classes keep the hooks, and each enters the
    mode when none is active. Hooks on the modules themselves, not only on the model, are what
    cover a layer recomputed under checkpointing during backward, outside the model's forward.
    A module in eval mode does not enter it: torch's dropout is the identity there.
    """

    def __init__(self, model: nn.Module):
        # No reference to the model: its hooks hold this object, and a cycle through them would
        # keep a deleted model's memory until the garbage collector runs.
        self.callers = set()
        self.learned = False
        self.handles = []
        self._hook(model.modules())

    def _hook(self, modules):
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module, args):
        mode = None
        if module.training and all(entry.mode is None for entry in _ENTRIES.stack):
            mode = FunctionalDropoutMode()
            mode.__enter__()
        call = None if torch.compiler.is_compiling() else sys._getframe(1)
        _ENTRIES.stack.append(_Entry(module, self, mode, call))

    def _leave(self, module, args, output):
        # Always called, also when forward raised; each module pops its own entry.
        if not _ENTRIES.stack or _ENTRIES.stack[-1].module is not module:
            return
        mode = _ENTRIES.stack.pop().mode
        if mode is None:
            return
        mode.__exit__(None, None, None)
        # torch passes output None when forward raised: a forward cut short teaches nothing.
        learning = not torch.compiler.is_compiling() and not self.learned and _routing_of(module) is self
        if learning and output is not None:
            self._narrow(module)

    def _narrow(self, model):
        self.learned = True
        self.remove()
        self._hook(m for m in model.modules() if type(m) in self.callers)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


_ROUTING = "_fused_dropout_functional_routing"


def _routing_of(model):
    return model.__dict__.get(_ROUTING)


def install(model: nn.Module) -> None:
    """Keeps the mode active wherever ``model``'s modules call functional dropout (see
    :class:`_Routing`). Installing again starts over: after a module is added, or an
    attention implementation switched, the next training forward learns anew."""
    remove(model)
    object.__setattr__(model, _ROUTING, _Routing(model))


def remove(model: nn.Module) -> None:
    """Removes what ``replace_dropout(model, functional=True)`` installed: the model's
    functional dropout calls run in torch again. Its ``state_dict`` was never touched."""
    routing = _routing_of(model)
    if routing is not None:
        routing.remove()
        object.__delattr__(model, _ROUTING)


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
