"""Activation capture with forward hooks on named modules, and the teacher's importance signals.

* :func:`find_layers` / :func:`resolve_layers`: which modules to hook (default
  :func:`default_plane`: every conv and BatchNorm layer, the "conv+bn" plane of the released
  MEDIC recipe, or for a model without any, its repeated blocks or its hidden Linear layers;
  names, module objects, glob patterns, ``"blocks"``), through DDP / compile / FSDP1 /
  checkpoint wrappers.
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
from fnmatch import fnmatchcase
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from medic_fast._utils import eval_mode

__all__ = ["HOOKABLE", "PLANES", "default_plane", "default_layers", "find_layers",
           "resolve_layers", "repeated_blocks",
           "call_model", "rows_start_dim", "check_mask",
           "mask_applies", "ActivationCapture", "inplace_modified", "teacher_signals"]

# Module types whose outputs form the "conv+bn" plane, the default of a model with any.
HOOKABLE = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


# Attribute names under which wrappers hold the model they wrap: torch.compile, FSDP1 and the
# activation-checkpoint wrapper. ``module`` (DDP, DataParallel, accelerate) is a wrapper segment
# only where its parent is a pass-through wrapper (see :func:`_is_passthrough`).
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_GLOB = frozenset("*?[")


def _is_passthrough(parent: nn.Module) -> bool:
    """A wrapper that only holds ``.module`` (DDP, DataParallel, a user's or accelerate's
    wrapper): its only child is named ``module`` and it has no parameters of its own."""
    children = list(parent._modules)
    return children == ["module"] and not any(True for _ in parent.parameters(recurse=False))


def _canonical(qualified: str, parents: Dict[str, nn.Module]) -> str:
    """``qualified`` (a name from ``model.named_modules()``) without its wrapper segments."""
    if not qualified:
        return ""
    out, prefix = [], []
    for seg in qualified.split("."):
        parent = parents[".".join(prefix)]
        prefix.append(seg)
        if seg in WRAPPER_SEGMENTS or (seg == "module" and _is_passthrough(parent)):
            continue
        out.append(seg)
    return ".".join(out)


def _strip(name: str, module_too: bool) -> str:
    """A name given by the user without the segments wrappers add (all ``module`` ones too when
    ``module_too``): the key it has in a model that is wrapped differently."""
    drop = WRAPPER_SEGMENTS | ({"module"} if module_too else set())
    return ".".join(s for s in name.split(".") if s not in drop) if name else ""


def _layer_table(model: nn.Module) -> Tuple[Dict[str, Tuple[str, nn.Module]], Dict[int, str]]:
    """``canonical name -> (qualified name, module)`` (the innermost module of a wrapper chain:
    ``transformer.h.0`` of an FSDP1 model is the block inside its FSDP unit), and ``id(module)
    -> canonical name`` for every module, wrappers included."""
    parents = dict(model.named_modules())
    table: Dict[str, Tuple[str, nn.Module]] = {}
    ids: Dict[int, str] = {}
    for qualified, module in parents.items():
        key = _canonical(qualified, parents)
        table[key] = (qualified, module)  # pre-order: an inner module comes after its wrapper
        ids[id(module)] = key
    return table, ids


def _glob_match(pattern: str, name: str) -> bool:
    """``fnmatch`` segment by segment: ``*`` stays within one dot-separated name segment, so
    ``transformer.h.*`` is the blocks and not their submodules."""
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(fnmatchcase(a, b) for b, a in zip(p, n))


def _block_list(model: nn.Module) -> Tuple[str, Optional[nn.ModuleList]]:
    """``(name, list)`` of the largest ``nn.ModuleList`` of ``model`` whose children are all of
    one class (the first such list on a tie), or ``("", None)``."""
    best, best_name = None, ""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 \
                and len({type(c) for c in m}) == 1 and (best is None or len(m) > len(best)):
            best, best_name = m, name
    return best_name, best


def repeated_blocks(model: nn.Module) -> List[str]:
    """Qualified names of the repeated blocks of ``model`` (a Hugging Face ``...h`` /
    ``...layers``): the children of its largest ``nn.ModuleList`` whose children are all of one
    class (the first such list on a tie)."""
    name, blocks = _block_list(model)
    if blocks is None:
        raise ValueError(f'layers="blocks": {type(model).__name__} has no nn.ModuleList of '
                         "blocks of one class; pass layers=[...] with names from "
                         "model.named_modules()")
    return [f"{name}.{k}" if name else k for k in blocks._modules]


# The default planes, in the order they are tried (see :func:`default_plane`).
PLANES = {
    "conv+bn": "every conv and BatchNorm output",
    "blocks": "the repeated blocks' outputs (the model has no conv or BatchNorm layer)",
    "hidden linear": "the hidden Linear layers' outputs, all but the last Linear (the model has "
                     "no conv or BatchNorm layer and no repeated blocks)",
}


def _default(model: nn.Module, table: Dict[str, Tuple[str, nn.Module]]) -> Tuple[str, List[str]]:
    """:func:`default_plane` on ``model``'s :func:`_layer_table`."""
    def named(kind) -> List[str]:
        return [k for k, (_, m) in table.items() if k and isinstance(m, kind)]

    names = named(HOOKABLE)
    if names:
        return "conv+bn", names
    parents = dict(model.named_modules())
    _, blocks = _block_list(model)
    if blocks is not None and all(any(True for _ in b.children()) for b in blocks):
        return "blocks", [_canonical(n, parents) for n in repeated_blocks(model)]
    # nn.MultiheadAttention computes with out_proj's weights without calling it: never hooked.
    inside_mha = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention)
                  for m in a.modules()}
    linear = [k for k in named(nn.Linear) if id(table[k][1]) not in inside_mha]
    if len(linear) > 1:
        return "hidden linear", linear[:-1]
    raise ValueError(f"{type(model).__name__} has no conv or BatchNorm layer, no nn.ModuleList "
                     "of repeated blocks and no hidden Linear layer to hook by default; pass "
                     "layers=[...] with names from model.named_modules()")


def default_plane(model: nn.Module) -> Tuple[str, List[str]]:
    """``(kind, names)``: the layers hooked when none are named, and which rule chose them (a
    key of :data:`PLANES`), the first that finds any:

    * ``"conv+bn"``: every conv and BatchNorm layer (the released MEDIC recipe's plane);
    * ``"blocks"``: else the repeated blocks (:func:`repeated_blocks`, when each block holds
      modules: transformer and ViT-style models);
    * ``"hidden linear"``: else every Linear layer but the last registered one (the output
      head) of an MLP. Their outputs, before the nonlinearity, are the analogue of the
      conv+bn plane (pre-activation outputs); a ReLU's gradient already gives inactive units
      no importance, and activation modules are often shared or functional, which a hook
      cannot tell apart.

    Names are canonical (see :func:`find_layers`), in registration order.
    """
    return _default(model, _layer_table(model)[0])


def default_layers(model: nn.Module) -> List[str]:
    """Names of every conv and BatchNorm module of ``model``, in registration order: the
    "conv+bn" plane, empty for a model without any (whose default is another plane: see
    :func:`default_plane`)."""
    return [name for name, m in model.named_modules() if name and isinstance(m, HOOKABLE)]


def find_layers(model: nn.Module, layers, *, also: Optional[nn.Module] = None
                ) -> Tuple[List[str], List[nn.Module]]:
    """The ONE resolution of a ``layers`` argument: ``(names, modules)`` of ``model``.

    ``layers`` is ``None`` (:func:`default_plane`), ``"blocks"`` (see
    :func:`repeated_blocks`), a glob pattern (``"transformer.h.*"``; ``*`` within one name
    segment), or a sequence of module names, glob patterns and module objects (of ``model``, or
    of ``also``, a model of the same structure such as the student).

    Names resolve through wrappers: DDP / DataParallel / accelerate ``module.``,
    ``torch.compile`` ``_orig_mod.``, FSDP1 ``_fsdp_wrapped_module.`` and checkpoint wrappers'
    ``_checkpoint_wrapped_module.``: a name given for the inner model resolves in the wrapped
    one and the other way round. The returned names are canonical (those of the unwrapped
    model) and the modules the innermost ones (a wrapped block, not its wrapper).
    """
    table, ids = _layer_table(model)
    parents = dict(model.named_modules())
    by_plain: Dict[str, List[str]] = {}
    for key in table:
        by_plain.setdefault(_strip(key, True), []).append(key)

    def hint() -> str:
        return ", ".join(k for k in list(table)[1:9])

    def by_name(name: str) -> str:
        if name and name in parents:
            return _canonical(name, parents)
        key = _strip(name, False)
        if key and key in table:
            return key
        keys = by_plain.get(_strip(name, True), [])
        if name and len(keys) == 1:
            return keys[0]
        raise ValueError(f"layers: {name!r} is not a submodule of {type(model).__name__} "
                         f"(names look like: {hint()}, ...)")

    if layers is None:
        names = _default(model, table)[1]
        return names, [table[n][1] for n in names]
    if isinstance(layers, str):
        if layers != "blocks" and not (_GLOB & set(layers)):
            raise TypeError(f"layers must be a sequence of module names (or \"blocks\", or a "
                            f"glob pattern), got the str {layers!r}; pass [{layers!r}]")
        layers = [layers]
    if isinstance(layers, nn.Module) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of module names, got {type(layers).__name__}")
    if not list(layers):
        raise ValueError("layers is empty; pass at least one module name (or None for the "
                         "default plane)")
    other = None if also is None else _layer_table(also)[1]
    names: List[str] = []
    for item in layers:
        if isinstance(item, nn.Module):
            key = ids.get(id(item), None if other is None else other.get(id(item)))
            if key is None or key not in table:
                raise ValueError(f"layers: the {type(item).__name__} given is not a submodule of "
                                 f"{type(model).__name__}")
            names.append(key)
        elif not isinstance(item, str):
            raise TypeError(f"layers must hold module names (str) or modules, got "
                            f"{type(item).__name__}")
        elif item == "blocks":
            names += [_canonical(n, parents) for n in repeated_blocks(model)]
        elif _GLOB & set(item):
            found = [k for k in table if k and _glob_match(_strip(item, False), k)]
            if not found:
                found = [k for k in table if k and _glob_match(_strip(item, True),
                                                               _strip(k, True))]
            if not found:
                raise ValueError(f"layers: the pattern {item!r} matches no submodule of "
                                 f"{type(model).__name__} (names look like: {hint()}, ...)")
            names += found
        else:
            names.append(by_name(item))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"layers names a module more than once: {dup}")
    return names, [table[n][1] for n in names]


def resolve_layers(model: nn.Module, layers, *, also: Optional[nn.Module] = None) -> List[str]:
    """The canonical names of ``layers`` in ``model`` (see :func:`find_layers`)."""
    return find_layers(model, layers, also=also)[0]


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
        self.layers, self.modules = find_layers(model, layers)
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


def call_model(model: nn.Module, batch):
    """``model(**batch)`` for a dict batch (a Hugging Face model's keyword arguments), else
    ``model(batch)``."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


@torch.no_grad()
def inplace_modified(model: nn.Module, layers: Sequence[str], x, select=None, *,
                     forward: Optional[Callable[[nn.Module, object], object]] = None
                     ) -> List[str]:
    """Names among ``layers`` whose output ``model`` modifies in place later in its forward.

    Runs one forward on ``x`` (``forward(model, x)``, by default :func:`call_model`) in eval
    mode without gradients, so the model's parameters, buffers and training flags are left as
    they are.
    """
    with eval_mode(model), ActivationCapture(model, layers, select=select) as cap:
        (forward or call_model)(model, x)
        return cap.modified()


def teacher_signals(teacher: nn.Module, capture: ActivationCapture, x, y: Optional[Tensor],
                    loss: Optional[Callable[[], Tensor]] = None
                    ) -> Tuple[List[Tensor], List[Tensor]]:
    """Teacher activations at the hooked layers and ``d CE(teacher(x), y) / d activations``.

    ``capture`` must be a ``differentiable`` capture attached to ``teacher``; the teacher should
    be frozen (parameters without ``requires_grad``) and ``x`` should not require grad, so the
    single ``torch.autograd.grad`` call runs the backward from the loss down to the first hooked
    tensor and computes nothing else. CE is the batch mean. Returns detached tensors.

    ``loss``: a callable that runs the teacher and returns its scalar CE (a Hugging Face
    model's ``.loss``, say), in place of ``CE(teacher(x), y)``.
    """
    if not capture.differentiable:
        raise ValueError("teacher_signals needs an ActivationCapture(..., differentiable=True)")
    with torch.enable_grad():
        if loss is None:
            logits = teacher(x)
            acts = capture.outputs()
            ce = F.cross_entropy(logits, y)
        else:
            ce = loss()
            acts = capture.outputs()
        grads = torch.autograd.grad(ce, acts, allow_unused=True, materialize_grads=True)
    return [a.detach() for a in acts], list(grads)
