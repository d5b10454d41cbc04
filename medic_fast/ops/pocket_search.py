"""CLEAR's pocket search (DESIGN.md §2, Algorithm 1 of the paper) over a batch of problems.

Every problem has k anchors in the feature space, a source class ``ls`` and a target class
``lt``; it minimises ``L = (1/k) sum_j CE(head(P_j), ls) + CE(head(c), lt)
+ (alpha/k) sum_j ||P_j - c||^2`` (c the anchors' centroid) by SGD. At every step ``s = 0..steps``
the current anchors are tested first: the problem is *abandoned* when c leaves ``[lo, hi]``,
*found* when every anchor's top class is ``ls`` and c's is ``lt``, each by more than ``margin``;
either way it stops there (``stopped_at = s``) and leaves the batch. Otherwise, for ``s < steps``,
the anchors take one step. So ``steps`` is the number of SGD steps and a problem still running
after them stops with ``stopped_at = steps``, neither found nor abandoned.

Backends (:mod:`medic_fast.ops._dispatch`): ``"reference"`` is
:mod:`medic_fast.reference.pocket_search`; the fused ones, ``"cpp"`` (CPU) and ``"cuda"`` (CUDA),
run three ops of ``torch.ops.medic_fast``, defined here with their fake kernels and implemented
by the extension (``csrc/pocket_search.cpp``, ``.cu``): ``pocket_search_mlp``, the whole search
for heads that are chains of Linear and ReLU layers, and for any other head a loop where PyTorch
runs the head's forward and backward and ``pocket_step_logits`` / ``pocket_step_update`` do the
rest of each step. They take float32 features; ``"auto"`` runs other dtypes on the reference.
On CUDA the whole-search kernel keeps a problem's activations in shared memory: a Linear/ReLU
head that needs more than the device allows a block (``pocket_search_mlp_smem``, against the
device's opt-in limit), or has more layers than the kernel takes, runs the per-step loop instead.
The labels go to the anchors' device; the head must be there already.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from medic_fast import _extension
from medic_fast.ops import _dispatch
from medic_fast.reference import pocket_search as reference
from medic_fast.reference.pocket_search import ABANDONED, ACTIVE, FOUND

__all__ = ["pocket_search", "PocketResult", "mlp_layers", "takes_whole_search", "smem_limit"]


class PocketResult(NamedTuple):
    """Outcome of a batched pocket search, one entry per problem."""

    anchors: Tensor     # [Q, k, *feat]: the anchors when the problem stopped
    found: Tensor       # bool [Q]
    abandoned: Tensor   # bool [Q]
    stopped_at: Tensor  # int64 [Q]: the step at which it stopped (steps if it ran out)
    backend: str        # what ran: "cpp", "cuda" or "reference"

    @property
    def centroids(self) -> Tensor:
        """[Q, *feat]: the anchors' centroids (for found problems, the pocket samples)."""
        return self.anchors.mean(1)


# --------------------------------------------------------------------------------------------
# The fused kernels' ops: defined here with their fake kernels (for opcheck, tracing and meta
# tensors); the extension registers their CPU and CUDA kernels when it loads.
# --------------------------------------------------------------------------------------------

torch.library.define(
    "medic_fast::pocket_search_mlp",
    "(Tensor anchors, Tensor[] weights, Tensor[] biases, int[] relu, Tensor source, "
    "Tensor target, float alpha, float lr, int steps, float lo, float hi, float margin) "
    "-> (Tensor, Tensor, Tensor)")


@torch.library.register_fake("medic_fast::pocket_search_mlp")
def _(anchors, weights, biases, relu, source, target, alpha, lr, steps, lo, hi, margin):
    """The whole search for a Linear/ReLU head (``relu[0]``: on the input, ``relu[l + 1]``:
    after layer ``l``): anchors ``[Q, k, D]``, int8 status and int64 stopped_at ``[Q]``."""
    q = anchors.shape[0]
    return (anchors.new_empty(anchors.shape), anchors.new_empty(q, dtype=torch.int8),
            anchors.new_empty(q, dtype=torch.int64))


torch.library.define(
    "medic_fast::pocket_step_logits",
    "(Tensor logits, Tensor rows, Tensor idx, Tensor source, Tensor target, float lo, float hi, "
    "float margin) -> (Tensor, Tensor)")


@torch.library.register_fake("medic_fast::pocket_step_logits")
def _(logits, rows, idx, source, target, lo, hi, margin):
    """Given the head's logits ``[A (k + 1), C]`` of the active problems' rows ``[A, k + 1, D]``
    (anchors, then centroid): the gradient of the CE terms w.r.t. the logits, and each problem's
    int8 status at this step."""
    return logits.new_empty(logits.shape), rows.new_empty(rows.shape[0], dtype=torch.int8)


torch.library.define(
    "medic_fast::pocket_step_update",
    "(Tensor rows, Tensor? grads, Tensor status, Tensor idx, Tensor(a!) anchors_out, "
    "Tensor(b!) status_out, Tensor(c!) stop_out, int step, float alpha, float lr) "
    "-> (Tensor, Tensor)")


@torch.library.register_fake("medic_fast::pocket_step_update")
def _(rows, grads, status, idx, anchors_out, status_out, stop_out, step, alpha, lr):
    """One SGD step of the problems still active (from the CE gradients ``grads`` w.r.t. the
    rows), returned compacted with their problem indices; those that stop (all of them when
    ``grads`` is None) are written to the ``*_out`` tensors at their index. How many stay is
    data-dependent."""
    kept = 0 if grads is None else torch.library.get_ctx().new_dynamic_size()
    return rows.new_empty(kept, *rows.shape[1:]), idx.new_empty(kept)


torch.library.define(
    "medic_fast::pocket_search_mlp_smem", "(int[] widths, bool relu_in, int k) -> int")
# Bytes of shared memory per problem that pocket_search_mlp's CUDA kernel needs for a head of
# widths [D, out_0, ..., out_{L-1}] (relu_in: a ReLU on its input) at k anchors; -1 when the
# kernel cannot take the head at all (too many layers). The formula is csrc/pocket_search.h's.


# --------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------

def _number(name: str, x, *, low: float, open_low: bool = False, inf_ok: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    bad = math.isnan(x) or (math.isinf(x) and not inf_ok) or x < low or (open_low and x == low)
    if bad:
        bound = f"> {low}" if open_low else f">= {low}"
        kind = "a" if inf_ok else "a finite"
        raise ValueError(f"{name} must be {kind} number {bound}, got {x!r}")
    return x


def _check_head_mode(head: nn.Module) -> None:
    training = [name or type(head).__name__ for name, m in head.named_modules()
                if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                 nn.modules.dropout._DropoutNd))]
    if training:
        raise ValueError(f"head has BatchNorm/Dropout modules in training mode ({training[:4]}); "
                         "call head.eval() first, or batch statistics and dropout would couple "
                         "and randomise the problems")


def _check_head_device(head: nn.Module, device: torch.device) -> None:
    elsewhere = sorted({str(p.device) for p in head.parameters() if p.device != device})
    if elsewhere:
        raise ValueError(f"head has parameters on {', '.join(elsewhere)} but the anchors are on "
                         f"{device}: move the head to the anchors' device (head.to('{device}'))")


def _validate(anchors, head, source, target, alpha, lr, steps, lo, hi, margin, backend):
    """The checked settings, and source and target as int64 on the anchors' device."""
    if not isinstance(anchors, Tensor):
        raise TypeError("anchors must be a Tensor [problems, k, *features], got "
                        f"{type(anchors).__name__}")
    if not anchors.is_floating_point():
        raise TypeError(f"anchors must have a floating dtype, got {anchors.dtype}")
    if anchors.dim() < 3 or 0 in anchors.shape or anchors.shape[1] < 2:
        raise ValueError(f"anchors must have shape [problems >= 1, k >= 2, *features], got "
                         f"{tuple(anchors.shape)}")
    if not isinstance(head, nn.Module):
        raise TypeError("head must be an nn.Module mapping features to logits, got "
                        f"{type(head).__name__}")
    q = anchors.shape[0]
    for name, t in (("source", source), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be an integer Tensor [problems], got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.shape != (q,):
            raise ValueError(f"{name} must have shape ({q},) (one class per problem), got "
                             f"{tuple(t.shape)}")
    # The kernels read the labels where the anchors are: a host pointer in a CUDA kernel is an
    # illegal access.
    source, target = source.to(anchors.device).long(), target.to(anchors.device).long()
    if bool((source == target).any()):
        raise ValueError("source and target must differ for every problem")
    _check_head_mode(head)
    _check_head_device(head, anchors.device)
    alpha = _number("alpha", alpha, low=0.0)
    lr = _number("lr", lr, low=0.0, open_low=True)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    lo = _number("lo", lo, low=-math.inf, inf_ok=True)
    hi = _number("hi", hi, low=-math.inf, inf_ok=True)
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo}, hi={hi}")
    margin = _number("margin", margin, low=0.0, inf_ok=True)
    _dispatch.check("pocket_search", backend)
    with torch.no_grad():
        probe = head(anchors[:1, 0])
    if not (isinstance(probe, Tensor) and probe.dim() == 2 and probe.shape[0] == 1
            and probe.shape[1] >= 2):
        shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(f"head must map features [N, *features] to logits [N, classes >= 2]; on "
                         f"one feature vector it returned {shape}")
    classes = probe.shape[1]
    for name, t in (("source", source), ("target", target)):
        if q and (int(t.min()) < 0 or int(t.max()) >= classes):
            raise ValueError(f"{name} classes must be in [0, {classes}) (the head's outputs)")
    return source, target, (alpha, lr, steps, lo, hi, margin)


def pocket_search(anchors: Tensor, head: nn.Module, source: Tensor, target: Tensor, *,
                  alpha: float, lr: float, steps: int, lo: float, hi: float, margin: float,
                  backend: str = "auto", progress: bool = False) -> PocketResult:
    """Run ``Q`` pocket searches as one batch; see the module docstring for the exact rules.

    anchors: ``[Q, k, *features]`` starting anchors (not modified). head: module mapping
    ``[N, *features]`` to logits ``[N, C]``, in eval mode (not modified). source, target:
    ``[Q]`` classes. alpha: compactness weight; lr: SGD step; steps: SGD steps at most;
    lo, hi: the box the centroid must stay in; margin: how far the winning logit must lead.
    progress: on stderr, a bar over the steps with the number of problems still active, or,
    when the extension runs the whole search, a line before it and one after.
    """
    source, target, settings = _validate(anchors, head, source, target, alpha, lr, steps, lo,
                                         hi, margin, backend)
    steps = settings[2]
    unsupported = ("" if anchors.dtype == torch.float32 else
                   f"its fused kernels take float32 anchors, these are {anchors.dtype}")
    if backend == "cuda" and anchors.device.type == "cuda" and not unsupported:
        why = _extension.cuda_unavailable()  # the compiler's reason, rather than a generic one
        if why:
            raise _extension.ExtensionUnavailable(why)
    backend = _dispatch.resolve("pocket_search", backend, anchors.device, unsupported=unsupported)
    anchors = anchors.detach()
    mlp = None if backend == "reference" else _whole_search_layers(anchors, head)
    if mlp is not None:
        if progress:
            print(f"pocket search: {len(anchors)} problems, up to {steps} steps, all inside the "
                  f"extension ({backend}) ...", file=sys.stderr)
        t0 = time.perf_counter()
        out, status, stop = torch.ops.medic_fast.pocket_search_mlp(
            anchors.contiguous(), *mlp, source, target, *settings)
        if progress:
            print(f"pocket search: done in {time.perf_counter() - t0:.1f} s, "
                  f"{int((status == FOUND).sum())} found", file=sys.stderr)
    else:
        run = reference.pocket_search if backend == "reference" else _fused_steps
        with _step_bar(progress, steps) as on_step:
            out, status, stop = run(anchors, head, source, target, *settings, on_step)
    return PocketResult(out, status == FOUND, status == ABANDONED, stop, backend)


@contextlib.contextmanager
def _step_bar(progress: bool, steps: int):
    """Yields None, or (with ``progress``) an ``on_step(s, active)`` that moves a tqdm bar."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=steps + 1, desc="pocket search", unit="step") as bar:
        def on_step(s: int, active: int) -> None:
            bar.set_postfix(active=active, refresh=False)
            bar.update()
        yield on_step


def _whole_search_layers(anchors: Tensor, head: nn.Module):
    """:func:`mlp_layers` of ``head`` when the extension can run the whole search, else None."""
    mlp = mlp_layers(head) if anchors.dim() == 3 else None
    if (mlp is not None and all(w.dtype == torch.float32 for w in mlp[0] + mlp[1])
            and takes_whole_search(mlp, anchors.shape[1], smem_limit(anchors.device))):
        return mlp
    return None


def smem_limit(device: torch.device) -> Optional[int]:
    """Bytes of shared memory a block may opt in to on ``device`` (a CUDA device), or None where
    the whole search has no such limit (the CPU)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def takes_whole_search(mlp, k: int, limit: Optional[int]) -> bool:
    """Whether the whole-search kernel runs the Linear/ReLU head ``mlp`` (:func:`mlp_layers`) at
    ``k`` anchors per problem, where a block may have ``limit`` bytes of shared memory
    (:func:`smem_limit`; None: no limit, the CPU kernel). On CUDA a problem's activations and
    gradients must fit in that and the kernel takes at most 8 layers; other heads take the
    per-step loop (:func:`_fused_steps`), which runs any head."""
    if limit is None:
        return True
    weights, _, relu = mlp
    widths = [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]
    need = torch.ops.medic_fast.pocket_search_mlp_smem(widths, bool(relu[0]), int(k))
    return 0 <= need <= limit


def _fused_steps(anchors, head, source, target, alpha, lr, steps, lo, hi, margin, on_step=None):
    """Any head: PyTorch runs its forward and input gradient, the extension the rest.
    ``on_step(s, active)``, if given, is called after every step."""
    ops = torch.ops.medic_fast
    q, k, feat = anchors.shape[0], anchors.shape[1], anchors.shape[2:]
    flat = anchors.reshape(q, k, -1)
    out = torch.empty_like(flat)
    status = torch.zeros(q, dtype=torch.int8, device=flat.device)
    stop = torch.empty(q, dtype=torch.int64, device=flat.device)
    rows = torch.cat([flat, flat.mean(1, keepdim=True)], 1)
    idx = torch.arange(q, device=flat.device)
    for s in range(steps + 1):
        x = rows.view(-1, *feat).detach().requires_grad_(True)
        with torch.enable_grad():
            z = head(x)
        dz, st = ops.pocket_step_logits(z.detach().float(), rows, idx, source, target, lo, hi,
                                        margin)
        grads = None
        if s < steps and bool((st == ACTIVE).any()):
            (grads,) = torch.autograd.grad(z, x, dz.to(z.dtype))
            grads = grads.view_as(rows)
        rows, idx = ops.pocket_step_update(rows, grads, st, idx, out, status, stop, s, alpha, lr)
        if on_step is not None:
            on_step(s, len(idx))
        if len(idx) == 0:
            break
    return out.view_as(anchors), status, stop


# --------------------------------------------------------------------------------------------
# Heads that take the whole-search kernel
# --------------------------------------------------------------------------------------------

_RELU_FUNCTIONS = {torch.relu, F.relu, torch.relu_}


def _mlp_op(n: fx.Node, gm: fx.GraphModule) -> Optional[object]:
    """A Linear module, "relu", "id" (identity on [N, D] inputs), or None for anything else."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Linear):
            return m
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):
            return "id"
        if isinstance(m, nn.Flatten) and m.start_dim in (1, -1):
            return "id"
    elif n.op == "call_function":
        if n.target in _RELU_FUNCTIONS:
            return "relu"
        if n.target is torch.flatten and tuple(n.args[1:]) in ((1,), (-1,)) and not n.kwargs:
            return "id"
    elif n.op == "call_method" and n.target in ("relu", "relu_") and len(n.args) == 1:
        return "relu"
    return None


def mlp_layers(head: nn.Module) -> Optional[Tuple[List[Tensor], List[Tensor], List[int]]]:
    """``(weights, biases, relu)`` when ``head`` is a chain of Linear and ReLU layers (on 1-D
    features), else None. ``relu[0]``: a ReLU on the input; ``relu[l + 1]``: after layer ``l``."""
    try:
        gm = fx.symbolic_trace(head)
    except Exception:  # untraceable heads take the general path
        return None
    weights, biases, relu = [], [], [0]
    cur = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if cur is not None:
                return None
            cur = n
            continue
        if n.op == "output":
            return (weights, biases, relu) if n.args[0] is cur and weights else None
        op = _mlp_op(n, gm)
        if op is None or n.all_input_nodes != [cur]:
            return None
        if isinstance(op, nn.Linear):
            w = op.weight.detach()
            weights.append(w)
            biases.append(op.bias.detach() if op.bias is not None else w.new_zeros(w.shape[0]))
            relu.append(0)
        elif op == "relu":
            relu[-1] = 1
        cur = n
    return None
