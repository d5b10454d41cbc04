"""Splitting a model at a cut, and reading what its head is, with ``torch.fx``.

The cut is the module whose *input* is CLEAR's feature space. :func:`split` returns the head, a
``GraphModule`` mapping that input to the logits and sharing the model's submodules. It refuses a
cut that some other path of the model goes around (a skip connection across it), since then the
logits are not a function of the features alone.
"""
from __future__ import annotations

import operator
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["split", "features", "default_cut", "input_cut", "is_affine", "linear_modules",
           "activation_numel"]


class _LeafTracer(fx.Tracer):
    """The default tracer, except that the module named ``leaf`` is kept whole (not traced into),
    so that its input is a node even when it is a block such as a residual unit."""

    def __init__(self, leaf: str):
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.leaf or super().is_leaf_module(m, qualname)


class _AroundCut(ValueError):
    """Another path of the model bypasses the cut."""


def _trace(model: nn.Module, leaf: str = "") -> fx.Graph:
    try:
        return _LeafTracer(leaf).trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on control flow, ...)
        raise ValueError(
            f"cannot split {type(model).__name__} into features and head: torch.fx could not "
            f"trace it ({type(e).__name__}: {e}). CLEAR needs a traceable forward (no "
            "data-dependent Python control flow) to take the part of the model after the cut."
        ) from e


def _module_names(model: nn.Module) -> List[str]:
    return [name for name, _ in model.named_modules() if name]


def _upstream(node: fx.Node, stop=None) -> set:
    """``node`` and every node it depends on, not going past ``stop`` (included)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            if n is not stop:
                stack.extend(n.all_input_nodes)
    return seen


def split(model: nn.Module, cut: str) -> fx.GraphModule:
    """The head of ``model`` after ``cut``: a ``GraphModule`` from the cut module's input to the
    model's output (the same submodule objects, not copies)."""
    names = _module_names(model)
    if not isinstance(cut, str) or cut not in names:
        hint = ", ".join(repr(n) for n in names[-8:])
        raise ValueError(f"cut={cut!r} is not a module of {type(model).__name__}; pass a name "
                         f"from model.named_modules(), e.g. one of {hint}")
    graph = _trace(model, cut)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == cut]
    if len(calls) != 1:
        raise ValueError(f"cut={cut!r} is called {len(calls)} times in the model's forward; the "
                         "cut must be a module that runs exactly once")
    inputs = calls[0].all_input_nodes
    if len(inputs) != 1:
        raise ValueError(f"cut={cut!r} takes {len(inputs)} tensor inputs; the cut must be a module "
                         "with a single input (its input is the feature space)")
    phi = inputs[0]
    from_input, below_cut = set(), {phi}
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in from_input for a in n.all_input_nodes):
            from_input.add(n)
        if any(a in below_cut for a in n.all_input_nodes):
            below_cut.add(n)
    needed = _upstream(next(n for n in graph.nodes if n.op == "output"), stop=phi)
    for n in graph.nodes:
        if n in needed and n in from_input and n not in below_cut:
            raise _AroundCut(
                f"cut={cut!r}: the model's output also depends on {n.name!r}, which is computed "
                "before the cut and bypasses it (a skip connection across the cut), so the head "
                "is not a function of the cut's input alone; choose a cut outside that block")
    head = fx.Graph()
    env = {phi: head.placeholder("phi")}
    for n in graph.nodes:
        if n in needed and n is not phi:
            env[n] = head.node_copy(n, lambda a: env[a])
    head.lint()
    return fx.GraphModule(model, head, class_name="ClearHead")


def features(model: nn.Module, cut: str) -> fx.GraphModule:
    """The part of ``model`` before ``cut``: a ``GraphModule`` from the model's input to the cut
    module's input (the feature space; the same submodule objects, not copies). With
    :func:`split`'s head, ``head(features(model, cut)(x))`` is ``model(x)``."""
    split(model, cut)  # the same checks: a module that runs once, on one input, not bypassed
    graph = _trace(model, cut)
    phi = next(n for n in graph.nodes
               if n.op == "call_module" and n.target == cut).all_input_nodes[0]
    needed = _upstream(phi)
    body = fx.Graph()
    env = {}
    for n in graph.nodes:
        if n in needed or n.op == "placeholder":
            env[n] = body.node_copy(n, lambda a: env[a])
    body.output(env[phi])
    body.lint()
    return fx.GraphModule(model, body, class_name="ClearFeatures")


def _leaf_calls(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every leaf module the forward calls, in the order it calls them."""
    return [(n.target, model.get_submodule(n.target))
            for n in _trace(model).nodes if n.op == "call_module"]


def linear_modules(model: nn.Module) -> List[str]:
    """Names of the ``nn.Linear`` modules in the order the forward calls them."""
    return [name for name, m in _leaf_calls(model) if isinstance(m, nn.Linear)]


def default_cut(model: nn.Module) -> str:
    """DESIGN.md §2: the input of the second-to-last Linear layer when the model ends in two or
    more Linear layers, otherwise the input of the last convolution block (the last convolution,
    or the smallest block holding it that no skip connection goes around)."""
    calls = _leaf_calls(model)
    trailing = []
    for name, m in reversed([(n, m) for n, m in calls if any(True for _ in m.parameters(False))]):
        if not isinstance(m, nn.Linear):
            break
        trailing.append(name)
    if len(trailing) >= 2:
        return trailing[1]
    convs = [name for name, m in calls if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"cannot choose a default cut for {type(model).__name__}: it neither ends "
                         "in two Linear layers nor has a convolution; pass cut= (the name of the "
                         "module whose input is the feature space)")
    parts = convs[-1].split(".")
    for i in range(len(parts), 0, -1):
        try:
            split(model, ".".join(parts[:i]))
            return ".".join(parts[:i])
        except _AroundCut:
            continue
    raise ValueError(f"cannot choose a default cut for {type(model).__name__}: a skip connection "
                     f"goes around every block holding its last convolution {convs[-1]!r}; "
                     "pass cut=")


def input_cut(model: nn.Module) -> str:
    """The first module the forward calls whose input is the model's input, unchanged or only
    reshaped (so the feature space is the input space): the default cut of ``scan``'s hull
    search."""
    graph = _trace(model)
    reshapes = {"flatten", "view", "reshape", "contiguous"}
    plain = {n for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        if n.op == "call_method" and n.target in reshapes and n.args[0] in plain:
            plain.add(n)
        elif n.op == "call_function" and n.target is torch.flatten and n.args[0] in plain:
            plain.add(n)
        elif n.op == "call_module" and n.all_input_nodes and n.all_input_nodes[0] in plain:
            return n.target
    raise ValueError(f"cannot find the module that takes {type(model).__name__}'s input; pass "
                     "cut= (the name of the module whose input is the space to search)")


# Modules and functions that are affine maps of their input (in eval mode).
_AFFINE_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                   nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten,
                   nn.Identity, nn.modules.dropout._DropoutNd)
_AFFINE_FUNCTIONS = {torch.flatten, torch.reshape, torch.add, torch.sub, torch.cat, torch.mean,
                     torch.sum, F.linear, F.conv1d, F.conv2d, F.conv3d, F.avg_pool1d, F.avg_pool2d,
                     F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.dropout, operator.add, operator.sub, operator.neg,
                     operator.getitem, getattr}
_SCALING_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
_AFFINE_METHODS = {"view", "reshape", "flatten", "contiguous", "size", "dim", "permute",
                   "transpose", "squeeze", "unsqueeze", "add", "sub", "neg", "mean", "sum"}


def is_affine(head: nn.Module) -> bool:
    """True when every operation of ``head`` is known to be affine (so its decision regions are
    convex); False when any operation is nonlinear or unknown."""
    gm = fx.symbolic_trace(head)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            ok = isinstance(gm.get_submodule(n.target), _AFFINE_MODULES)
        elif n.op == "call_function":
            ok = n.target in _AFFINE_FUNCTIONS or (
                n.target in _SCALING_FUNCTIONS
                and sum(isinstance(a, fx.Node) for a in n.args) <= 1)
        elif n.op == "call_method":
            ok = n.target in _AFFINE_METHODS
        else:  # placeholder, get_attr, output
            ok = True
        if not ok:
            return False
    return True


def activation_numel(head: fx.GraphModule, example: torch.Tensor) -> int:
    """Elements of all the values ``head`` computes on ``example`` (``[N, *features]``), per
    sample: what a forward keeps for its backward, for an estimate of a search's memory."""
    from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

    with torch.no_grad():
        ShapeProp(head).propagate(example)
    metas = [n.meta.get("tensor_meta") for n in head.graph.nodes if n.op != "output"]
    return sum(m.shape.numel() for m in metas if isinstance(m, TensorMetadata)) // len(example)
