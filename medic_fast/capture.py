"""Activation capture with forward hooks on named modules, and the teacher's importance signals.

* :func:`default_layers` / :func:`resolve_layers`: which modules to hook (default: every conv and
  BatchNorm layer, the "conv+bn" plane of the released MEDIC recipe).
* :class:`ActivationCapture`: records the output (or the input) of each named module on every
  forward of the model it is attached to; teacher and clone each get one, so both are captured in
  the same step. It picks one tensor out of tuple / dict outputs (``select``) and copies outputs
  that the forward later modifies in place (``copy``).
* :func:`rows_start_dim`: where a hooked tensor's rows end (a row per sample, or per token).
* :func:`teacher_signals`: the teacher's activations and ``d CE(teacher(x), y) / d activations``
  from ONE backward that reaches the hooked tensors only (no gradient for the teacher's
  parameters or its input, and no second backward through the clone).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from medic_fast._utils import eval_mode

__all__ = ["HOOKABLE", "default_layers", "resolve_layers", "rows_start_dim", "check_mask",
           "mask_applies", "ActivationCapture", "inplace_modified", "teacher_signals"]

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


Select = Union[None, int, Callable[[object], Tensor]]


def _check_select(name: str, select) -> Select:
    if select is None or callable(select) or (isinstance(select, int)
                                              and not isinstance(select, bool)):
        return select
    raise TypeError(f"select for layer {name!r} must be None (the first tensor of the output), "
                    f"an int index or a callable output -> Tensor, got {type(select).__name__}")


def rows_start_dim(module: nn.Module, x: Tensor, start_dim: Optional[int] = None) -> int:
    """The ``start_dim`` of a hooked tensor: where its rows end and its features begin.

    Given, or by default 1 (a row per sample) for conv and BatchNorm outputs, which are
    channels-first, and for other outputs that are not 3-D; 2 (a row per token) for other 3-D
    outputs ``[B, T, H]`` (transformer blocks, attention, MLPs). The loss and the statistics
    use the same rule, so statistics per channel are per hidden unit for tokens.
    """
    if start_dim is not None:
        return start_dim
    return 2 if x.dim() == 3 and not isinstance(module, HOOKABLE) else 1


def check_mask(mask, like: Tensor) -> Tensor:
    """``mask`` if it is a bool (or 0/1 integer) tensor on ``like``'s device."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor [B, T] (True at real tokens), got "
                        f"{type(mask).__name__}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"mask must be bool (or 0/1 integers), got {mask.dtype}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but the inputs are on {like.device}")
    return mask


def mask_applies(mask: Tensor, rows: torch.Size, name: str) -> bool:
    """Whether ``mask`` selects among the rows ``rows`` of layer ``name``: yes when they have
    its shape; no for rows of another rank (a row per sample under a ``[B, T]`` mask); an
    error for rows of its rank but another shape (a shifted or transposed mask)."""
    if len(rows) != mask.dim():
        return False
    if tuple(rows) != tuple(mask.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but layer {name!r} has rows "
                         f"{tuple(rows)}; the mask must mark the layer's rows (True at real "
                         "tokens)")
    return True


class ActivationCapture:
    """Record a tensor of each of the modules ``layers`` of ``model`` on each forward.

    Use as a context manager (hooks are removed on exit) around one or many forwards; after each
    forward, :meth:`outputs` returns the tensors in ``layers`` order and clears them.

    * ``inputs``: record each module's (first) input instead of its output.
    * ``select``: which tensor of an output that is not a tensor (a tuple, a dict, a
      ``ModelOutput``) is the activation: ``None`` (the first tensor in it), an int index, a
      callable ``output -> Tensor`` returning one of the output's own tensors, or a mapping from
      layer name to one of these. A replacement made by the capture (below) is put back in the
      selected tensor's place.
    * ``differentiable``: for the teacher. An output that does not require grad (nothing before
      it does: frozen parameters, plain input) is replaced by a leaf that does, so that
      ``torch.autograd.grad(loss, outputs)`` works without gradients for any parameter or the
      input; outputs that already require grad stay in the graph as they are.
    * ``copy``: names whose output the rest of the forward modifies in place (e.g. a BatchNorm
      followed by ``ReLU(inplace=True)``): the forward continues on a copy, so the recorded
      tensor keeps the module's own output. Find them with :func:`inplace_modified`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, inputs: bool = False,
                 select=None, differentiable: bool = False, copy: Sequence[str] = ()):
        self.layers = resolve_layers(model, layers)
        modules = dict(model.named_modules())
        self.modules = [modules[n] for n in self.layers]
        if inputs and (differentiable or copy):
            raise ValueError("inputs=True records module inputs as they are; differentiable and "
                             "copy apply to outputs only")
        self.inputs = inputs
        self.differentiable = differentiable
        self.copy = frozenset(copy)
        if isinstance(select, Mapping):
            unknown = set(select) - set(self.layers)
            if unknown:
                raise ValueError(f"select names layers that are not hooked: {sorted(unknown)}")
            self.select = {n: _check_select(n, select.get(n)) for n in self.layers}
        else:
            self.select = {n: _check_select(n, select) for n in self.layers}
        self._handles: list = []
        self._out: Dict[str, Tuple[Tensor, int]] = {}

    def __enter__(self) -> "ActivationCapture":
        if self._handles:
            raise RuntimeError("ActivationCapture is already active")
        for name, module in zip(self.layers, self.modules):
            if self.inputs:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._out.clear()

    def _pick(self, name: str, value) -> Tensor:
        """The selected tensor of a module's output (or input arguments)."""
        if isinstance(value, Tensor):
            return value
        sel = self.select[name]
        if sel is None:
            picked = next((x for x in tree_leaves(value) if isinstance(x, Tensor)), None)
        elif isinstance(sel, int):
            try:
                picked = value[sel]
            except (TypeError, IndexError, KeyError) as e:
                raise ValueError(f"select={sel} for layer {name!r}: cannot index its output "
                                 f"({type(value).__name__}): {e}") from None
        else:
            picked = sel(value)
        if not isinstance(picked, Tensor):
            raise TypeError(f"layer {name!r} gave {type(value).__name__}; the selected element is "
                            f"{type(picked).__name__}, not a Tensor (set select)")
        return picked

    def _record(self, name: str, t: Tensor) -> None:
        if name in self._out:
            raise RuntimeError(f"layer {name!r} ran twice in one forward (a shared module); "
                               "hook a module that runs once, or call outputs() after each "
                               "forward")
        self._out[name] = (t, t._version)

    def _input_hook(self, name: str):
        def hook(module, args):
            self._record(name, self._pick(name, args).detach())
        return hook

    def _output_hook(self, name: str):
        def hook(module, inputs, output):
            picked = self._pick(name, output)
            t = picked
            if self.differentiable and torch.is_grad_enabled() and not t.requires_grad:
                t = t.detach().requires_grad_()
            self._record(name, t)
            new = t.clone() if name in self.copy else t
            if new is picked:
                return None
            if picked is output:
                return new
            found = []

            def put(x):
                if x is picked:
                    found.append(x)
                    return new
                return x

            out = tree_map(put, output)
            if not found:
                raise ValueError(f"select for layer {name!r} must return one of the tensors of "
                                 "the module's output itself (not a view or a new tensor), so "
                                 "the capture can pass its replacement on")
            return out
        return hook

    def outputs(self) -> List[Tensor]:
        """The recorded tensors of the last forward, in ``layers`` order; clears them."""
        missing = [n for n in self.layers if n not in self._out]
        if missing:
            self._out.clear()
            raise RuntimeError(f"layers {missing} did not run in the forward; hook only modules "
                               "that the model calls on every input")
        modified = self.modified()
        if modified and not self.inputs:
            self._out.clear()
            raise RuntimeError(f"the outputs of {modified} were modified in place later in the "
                               "forward (e.g. by ReLU(inplace=True)); pass their names in "
                               "copy=... (see inplace_modified) or set inplace=False")
        outs = [self._out[n][0] for n in self.layers]
        self._out.clear()
        return outs

    def modified(self) -> List[str]:
        """Names whose recorded tensor was modified in place since it was recorded."""
        return [n for n, (t, v) in self._out.items() if t._version != v]


@torch.no_grad()
def inplace_modified(model: nn.Module, layers: Sequence[str], x, select=None) -> List[str]:
    """Names among ``layers`` whose output ``model`` modifies in place later in its forward.

    Runs one forward on ``x`` in eval mode without gradients, so the model's parameters,
    buffers and training flags are left as they are.
    """
    with eval_mode(model), ActivationCapture(model, layers, select=select) as cap:
        model(x)
        return cap.modified()


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
