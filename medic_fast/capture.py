"""Activation capture with forward hooks on named modules, and the teacher's importance signals.

* :func:`default_layers` / :func:`resolve_layers`: which modules to hook (default: every conv and
  BatchNorm layer, the "conv+bn" plane of the released MEDIC recipe).
* :class:`ActivationCapture`: records the output of each named module on every forward of the
  model it is attached to; teacher and clone each get one, so both are captured in the same step.
* :func:`teacher_signals`: the teacher's activations and ``d CE(teacher(x), y) / d activations``
  from ONE backward that reaches the hooked tensors only (no gradient for the teacher's
  parameters or its input, and no second backward through the clone).

A module's output becomes a tensor in :meth:`ActivationCapture._tensor_of`, the one place to
extend for modules that return tuples (e.g. transformer blocks).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast._utils import eval_mode

__all__ = ["HOOKABLE", "default_layers", "resolve_layers", "ActivationCapture",
           "inplace_modified", "teacher_signals"]

# Module types whose outputs form the default hooked plane.
HOOKABLE = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def default_layers(model: nn.Module) -> List[str]:
    """Names of every conv and BatchNorm module of ``model``, in registration order."""
    return [name for name, m in model.named_modules() if name and isinstance(m, HOOKABLE)]


def resolve_layers(model: nn.Module, layers: Optional[Sequence[str]]) -> List[str]:
    """Check ``layers`` (module names of ``model``) or pick :func:`default_layers`."""
    if layers is None:
        names = default_layers(model)
        if not names:
            raise ValueError(f"{type(model).__name__} has no conv or BatchNorm layer to hook by "
                             "default; pass layers=[...] with names from model.named_modules()")
        return names
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of module names, got {type(layers).__name__}")
    modules = dict(model.named_modules())
    names = list(layers)
    if not names:
        raise ValueError("layers is empty; pass at least one module name (or None for the "
                         "default conv+bn plane)")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layers must hold module names (str), got {type(name).__name__}")
        if not name or name not in modules:
            hint = ", ".join(n for n in list(modules)[1:9])
            raise ValueError(f"layers: {name!r} is not a submodule of {type(model).__name__} "
                             f"(names look like: {hint}, ...)")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"layers names a module more than once: {sorted(dup)}")
    return names


class ActivationCapture:
    """Record the outputs of the modules ``layers`` of ``model`` on each forward.

    Use as a context manager (hooks are removed on exit) around one or many forwards; after each
    forward, :meth:`outputs` returns the tensors in ``layers`` order and clears them.

    * ``differentiable``: for the teacher. An output that does not require grad (nothing before
      it does: frozen parameters, plain input) is replaced by a leaf that does, so that
      ``torch.autograd.grad(loss, outputs)`` works without gradients for any parameter or the
      input; outputs that already require grad stay in the graph as they are.
    * ``copy``: names whose output the rest of the forward modifies in place (e.g. a BatchNorm
      followed by ``ReLU(inplace=True)``): the forward continues on a copy, so the recorded
      tensor keeps the module's own output. Find them with :func:`inplace_modified`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, differentiable: bool = False,
                 copy: Sequence[str] = ()):
        self.layers = resolve_layers(model, layers)
        modules = dict(model.named_modules())
        self._modules = [modules[n] for n in self.layers]
        self.differentiable = differentiable
        self.copy = frozenset(copy)
        self._handles: list = []
        self._out: Dict[str, Tuple[Tensor, int]] = {}

    def __enter__(self) -> "ActivationCapture":
        if self._handles:
            raise RuntimeError("ActivationCapture is already active")
        for name, module in zip(self.layers, self._modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._out.clear()

    def _tensor_of(self, name: str, output) -> Tensor:
        """The activation tensor of a module's output (the extension point for tuples)."""
        if not isinstance(output, Tensor):
            raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a Tensor; "
                            "hook a module whose output is a tensor")
        return output

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if name in self._out:
                raise RuntimeError(f"layer {name!r} ran twice in one forward (a shared module); "
                                   "hook a module that runs once, or call outputs() after each "
                                   "forward")
            t = self._tensor_of(name, output)
            if self.differentiable and torch.is_grad_enabled() and not t.requires_grad:
                t = t.detach().requires_grad_()
            self._out[name] = (t, t._version)
            if name in self.copy:
                return t.clone()
            return None if t is output else t
        return hook

    def outputs(self) -> List[Tensor]:
        """The recorded outputs of the last forward, in ``layers`` order; clears them."""
        missing = [n for n in self.layers if n not in self._out]
        if missing:
            self._out.clear()
            raise RuntimeError(f"layers {missing} did not run in the forward; hook only modules "
                               "that the model calls on every input")
        modified = [n for n in self.layers if self._out[n][0]._version != self._out[n][1]]
        if modified:
            self._out.clear()
            raise RuntimeError(f"the outputs of {modified} were modified in place later in the "
                               "forward (e.g. by ReLU(inplace=True)); pass their names in "
                               "copy=... (see inplace_modified) or set inplace=False")
        outs = [self._out[n][0] for n in self.layers]
        self._out.clear()
        return outs


@torch.no_grad()
def inplace_modified(model: nn.Module, layers: Sequence[str], x: Tensor) -> List[str]:
    """Names among ``layers`` whose output ``model`` modifies in place later in its forward.

    Runs one forward on ``x`` in eval mode without gradients, so the model's parameters,
    buffers and training flags are left as they are.
    """
    with eval_mode(model), ActivationCapture(model, layers) as cap:
        model(x)
        return [n for n in cap.layers if cap._out[n][0]._version != cap._out[n][1]]


def teacher_signals(teacher: nn.Module, capture: ActivationCapture, x: Tensor,
                    y: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
    """Teacher activations at the hooked layers and ``d CE(teacher(x), y) / d activations``.

    ``capture`` must be a ``differentiable`` capture attached to ``teacher``; the teacher should
    be frozen (parameters without ``requires_grad``) and ``x`` should not require grad, so the
    single ``torch.autograd.grad`` call runs the backward from the loss down to the first hooked
    tensor and computes nothing else. CE is the batch mean. Returns detached tensors.
    """
    if not capture.differentiable:
        raise ValueError("teacher_signals needs an ActivationCapture(..., differentiable=True)")
    with torch.enable_grad():
        logits = teacher(x)
        acts = capture.outputs()
        ce = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(ce, acts, allow_unused=True, materialize_grads=True)
    return [a.detach() for a in acts], list(grads)
