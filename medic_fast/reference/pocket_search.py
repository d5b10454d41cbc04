"""CLEAR's batched pocket search in plain PyTorch: the readable specification (DESIGN.md §2).

What ``pocket_search(..., backend="reference")`` runs, and what the fused kernels are tested
against. Takes already validated arguments (see :func:`medic_fast.pocket_search`) and favours
clarity over speed: autograd for the gradient, SGD for the step, over the active problems.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A problem's status, the codes of the extension (csrc/pocket_search.h): still running (or ran out
# of steps), found, abandoned.
ACTIVE, FOUND, ABANDONED = 0, 1, 2


def pocket_search(anchors: Tensor, head: nn.Module, source: Tensor, target: Tensor, alpha: float,
                  lr: float, steps: int, lo: float, hi: float, margin: float,
                  on_step: Optional[Callable[[int, int], None]] = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(anchors, status, stopped_at)`` of every problem when it stopped.

    At every step ``s = 0..steps`` the current anchors are tested first: a problem whose centroid
    left ``[lo, hi]`` is abandoned, one whose anchors are all classified ``source`` and centroid
    ``target`` (each by more than ``margin``) is found; either way it stops at ``s``. Otherwise,
    for ``s < steps``, it takes one SGD step on ``L = (1/k) sum_j CE(head(P_j), ls)
    + CE(head(c), lt) + (alpha/k) sum_j ||P_j - c||^2``. ``on_step(s, active)``, if given, is
    called after every step with the number of problems still running.
    """
    q, k = anchors.shape[:2]
    P = anchors.clone()
    status = torch.full((q,), ACTIVE, dtype=torch.int8, device=P.device)
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
            hold = (margin_of(zd[:, :k], ls[:, None].expand(-1, k)) > margin).all(1)
            flips = margin_of(zd[:, k], lt) > margin
            st = torch.where(left, ABANDONED, torch.where(hold & flips, FOUND, ACTIVE))
            st = st.to(torch.int8)
            leaving = (st != ACTIVE) | (s == steps)
            gone = active[leaving]
            status[gone], stop[gone] = st[leaving], s
            if s < steps:
                (grad,) = torch.autograd.grad(loss, x)
                P[active[~leaving]] = (x - lr * grad)[~leaving]
            active = active[~leaving]
        if on_step is not None:
            on_step(s, len(active))
        if len(active) == 0:
            break
    return P, status, stop


def margin_of(z: Tensor, label: Tensor) -> Tensor:
    """Logit of ``label`` minus the best other logit (NaN if any logit is NaN: never a pass)."""
    own = z.gather(-1, label.unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, label.unsqueeze(-1), -math.inf)
    return own - others.amax(-1)
