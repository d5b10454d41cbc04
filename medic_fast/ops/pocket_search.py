"""CLEAR's pocket search (DESIGN.md §2, Algorithm 1 of the paper) over a batch of problems.

Every problem has k anchors in the feature space, a source class ``ls`` and a target class
``lt``; it minimises ``L = (1/k) sum_j CE(head(P_j), ls) + CE(head(c), lt)
+ (alpha/k) sum_j ||P_j - c||^2`` (c the anchors' centroid) by SGD. At every step ``s = 0..steps``
the current anchors are tested first: the problem is *abandoned* when c leaves ``[lo, hi]``,
*found* when every anchor's top class is ``ls`` and c's is ``lt``, each by more than ``margin``;
either way it stops there (``stopped_at = s``) and leaves the batch. Otherwise, for ``s < steps``,
the anchors take one step. So ``steps`` is the number of SGD steps and a problem still running
after them stops with ``stopped_at = steps``, neither found nor abandoned.

Backends: ``"reference"`` is plain PyTorch autograd and SGD over the batch; ``"extension"`` runs
the C++ extension (``csrc/pocket_search.cpp``): the whole search for heads that are chains of
Linear and ReLU layers, and for any other head a loop where PyTorch runs the head's forward and
backward and the extension does the rest of each step.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast import _extension
from medic_fast.clear.graph import mlp_layers

__all__ = ["pocket_search", "PocketResult", "BACKENDS"]

BACKENDS = ("auto", "extension", "reference")
FOUND, ABANDONED = 1, 2  # the extension's status codes (csrc/pocket_search.h)


class PocketResult(NamedTuple):
    """Outcome of a batched pocket search, one entry per problem."""

    anchors: Tensor     # [Q, k, *feat]: the anchors when the problem stopped
    found: Tensor       # bool [Q]
    abandoned: Tensor   # bool [Q]
    stopped_at: Tensor  # int64 [Q]: the step at which it stopped (steps if it ran out)
    backend: str        # "extension" or "reference"

    @property
    def centroids(self) -> Tensor:
        """[Q, *feat]: the anchors' centroids (for found problems, the pocket samples)."""
        return self.anchors.mean(1)


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


def _validate(anchors, head, source, target, alpha, lr, steps, lo, hi, margin, backend):
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
    if bool((source == target).any()):
        raise ValueError("source and target must differ for every problem")
    _check_head_mode(head)
    alpha = _number("alpha", alpha, low=0.0)
    lr = _number("lr", lr, low=0.0, open_low=True)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    lo = _number("lo", lo, low=-math.inf, inf_ok=True)
    hi = _number("hi", hi, low=-math.inf, inf_ok=True)
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo}, hi={hi}")
    margin = _number("margin", margin, low=0.0, inf_ok=True)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
    return alpha, lr, steps, lo, hi, margin


def _has_kernel(op: str, device: torch.device) -> bool:
    key = "CPU" if device.type == "cpu" else device.type.upper()
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"medic_fast_C::{op}", key)
    except RuntimeError:  # the op is not registered at all (an extension built without it)
        return False


def _resolve_backend(backend: str, anchors: Tensor) -> str:
    """``"auto"``: the extension for float32 anchors on a device it has kernels for, else the
    reference (with a warning when the extension failed to build)."""
    if backend == "reference":
        return backend
    if backend == "extension" and anchors.dtype != torch.float32:
        raise TypeError(f'backend="extension" needs float32 anchors, got {anchors.dtype}')
    if backend == "auto" and anchors.dtype != torch.float32:
        return "reference"
    try:
        _extension.load()
    except _extension.ExtensionUnavailable as e:
        if backend == "extension":
            raise
        warnings.warn(f"medic_fast: pocket search falls back to the PyTorch reference: {e}",
                      stacklevel=3)
        return "reference"
    if not _has_kernel("pocket_step_update", anchors.device):
        if backend == "extension":
            raise ValueError(f"the medic_fast extension has no pocket-search kernels for "
                             f"{anchors.device} tensors in this build")
        return "reference"
    return "extension"


def pocket_search(anchors: Tensor, head: nn.Module, source: Tensor, target: Tensor, *,
                  alpha: float, lr: float, steps: int, lo: float, hi: float, margin: float,
                  backend: str = "auto") -> PocketResult:
    """Run ``Q`` pocket searches as one batch; see the module docstring for the exact rules.

    anchors: ``[Q, k, *features]`` starting anchors (not modified). head: module mapping
    ``[N, *features]`` to logits ``[N, C]``, in eval mode (not modified). source, target:
    ``[Q]`` classes. alpha: compactness weight; lr: SGD step; steps: SGD steps at most;
    lo, hi: the box the centroid must stay in; margin: how far the winning logit must lead.
    """
    alpha, lr, steps, lo, hi, margin = _validate(anchors, head, source, target, alpha, lr,
                                                 steps, lo, hi, margin, backend)
    backend = _resolve_backend(backend, anchors)
    args = (anchors.detach(), head, source.long(), target.long(), alpha, lr, steps, lo, hi, margin)
    run = _reference if backend == "reference" else _extension_search
    out, status, stop = run(*args)
    return PocketResult(out, status == FOUND, status == ABANDONED, stop, backend)


def _reference(anchors, head, source, target, alpha, lr, steps, lo, hi, margin):
    """Plain PyTorch: autograd for the gradient, SGD for the step, over the active batch."""
    q, k = anchors.shape[:2]
    P = anchors.clone()
    status = torch.zeros(q, dtype=torch.int8, device=P.device)
    stop = torch.full((q,), steps, dtype=torch.int64, device=P.device)
    active = torch.arange(q, device=P.device)
    for s in range(steps + 1):
        x = P[active].requires_grad_(True)
        ls, lt = source[active], target[active]
        with torch.enable_grad():
            c = x.mean(1)
            z = head(torch.cat([x, c[:, None]], 1).flatten(0, 1)).view(len(active), k + 1, -1)
            loss = (F.cross_entropy(z[:, :k].flatten(0, 1), ls.repeat_interleave(k),
                                    reduction="none").view(-1, k).mean(1)
                    + F.cross_entropy(z[:, k], lt, reduction="none")
                    + alpha / k * (x - c[:, None]).pow(2).flatten(2).sum(2).sum(1)).sum()
        with torch.no_grad():
            zd = z.detach()
            left = ~((c >= lo) & (c <= hi)).flatten(1).all(1)
            hold = (_margin(zd[:, :k], ls[:, None].expand(-1, k)) > margin).all(1)
            flips = _margin(zd[:, k], lt) > margin
            st = torch.where(left, ABANDONED, torch.where(hold & flips, FOUND, 0)).to(torch.int8)
            leaving = (st != 0) | (s == steps)
            gone = active[leaving]
            status[gone], stop[gone] = st[leaving], s
            if s < steps:
                (grad,) = torch.autograd.grad(loss, x)
                P[active[~leaving]] = (x - lr * grad)[~leaving]
            active = active[~leaving]
        if len(active) == 0:
            break
    return P, status, stop


def _margin(z: Tensor, label: Tensor) -> Tensor:
    """Logit of ``label`` minus the best other logit (NaN if any logit is NaN)."""
    own = z.gather(-1, label.unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, label.unsqueeze(-1), -math.inf)
    return own - others.amax(-1)


def _extension_search(anchors, head, source, target, alpha, lr, steps, lo, hi, margin):
    ops = torch.ops.medic_fast_C
    mlp = mlp_layers(head) if anchors.dim() == 3 else None
    if mlp is not None and all(w.dtype == torch.float32 for w in mlp[0] + mlp[1]):
        weights, biases, relu = mlp
        return ops.pocket_search_mlp(anchors.contiguous(), weights, biases, relu, source, target,
                                     alpha, lr, steps, lo, hi, margin)
    return _fused_steps(anchors, head, source, target, alpha, lr, steps, lo, hi, margin)


def _fused_steps(anchors, head, source, target, alpha, lr, steps, lo, hi, margin):
    """Any head: PyTorch runs its forward and input gradient, the extension the rest."""
    ops = torch.ops.medic_fast_C
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
        if s < steps and bool((st == 0).any()):
            (grads,) = torch.autograd.grad(z, x, dz.to(z.dtype))
            grads = grads.view_as(rows)
        rows, idx = ops.pocket_step_update(rows, grads, st, idx, out, status, stop, s, alpha, lr)
        if len(idx) == 0:
            break
    return out.view_as(anchors), status, stop
