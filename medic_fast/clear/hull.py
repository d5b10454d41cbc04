"""The default search of :func:`medic_fast.scan` (``method="hull"``): pockets inside the local hulls
of the clean features.

Algorithm 1 (``method="paper"``) moves its anchors freely. In a feature space of higher dimension
than the data's manifold (a 64-wide layer over the 2-D Swiss roll) they leave the manifold, where
the head's decisions carry no meaning: with the anchors free, clean models give as many "pockets"
as attacked ones (benchmarks/RESULTS.md §4). This search keeps each centroid near the data: a
problem is a *neighbourhood*, the ``k`` nearest correctly classified samples of one class, and a
target class; its point is a convex combination of the neighbourhood's features plus an offset of
norm at most ``reach`` times the neighbourhood's mean radius. Adam moves the mixture's logits and
the offset to minimise the target's cross-entropy, every problem in one batch. ``scan`` runs it at
the model's input by default, where the data's own geometry holds.

A point classified as the target is a pocket candidate; what tells a planted pocket from a clean
boundary is where it lies. :func:`depth` is the distance from the point to the nearest clean
sample of the target class over its distance to the nearest one of the source class: near 1 at a
boundary, large deep inside the source class, where an attacked sample's pocket sits.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["neighbourhoods", "hull_search", "depth"]


def neighbourhoods(phi: Tensor, k: int) -> Tensor:
    """``[n, k]`` indices: for every row of ``phi`` ``[n, D]``, itself and its ``k - 1`` nearest
    other rows (Euclidean); ``k`` is capped at ``n``."""
    return torch.cdist(phi, phi).topk(min(k, len(phi)), largest=False).indices


def hull_search(anchors: Tensor, head: nn.Module, target: Tensor, *, reach: float, steps: int,
                lr: float = 0.1, on_step: Optional[Callable[[int], None]] = None
                ) -> Tuple[Tensor, Tensor]:
    """``(points [Q, D], margins [Q])``: for every problem, the point of its neighbourhood's hull
    (``anchors`` ``[Q, k, D]``, plus the offset) found after ``steps`` Adam steps at ``lr`` on the
    target's cross-entropy, and the target logit's lead over the best other logit there (> 0:
    classified as the target). Starts at the centroid with no offset. Runs in the anchors' dtype
    (the head's must match). ``on_step(s)`` is called after each step."""
    a = anchors.detach()
    radius = reach * (a - a.mean(1, keepdim=True)).norm(dim=2).mean(1, keepdim=True)
    w = a.new_zeros(a.shape[:2]).requires_grad_(True)
    off = a.new_zeros(a.shape[0], a.shape[2]).requires_grad_(True)

    def point() -> Tensor:
        scale = (radius / off.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1)
        return torch.einsum("qk,qkd->qd", w.softmax(1), a) + off * scale

    opt = torch.optim.Adam([w, off], lr=lr)
    with torch.enable_grad():
        for s in range(steps):
            loss = F.cross_entropy(head(point()).float(), target, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(s)
    with torch.no_grad():
        p = point()
        z = head(p).float()
        own = z.gather(1, target[:, None]).squeeze(1)
        lead = own - z.scatter(1, target[:, None], -math.inf).amax(1)
    return p, lead


def depth(points: Tensor, source: Tensor, target: Tensor, phi: Tensor, y: Tensor) -> Tensor:
    """``[M]``: for each point, its distance to the nearest row of ``phi`` labelled ``target``
    over its distance to the nearest labelled ``source`` (``inf`` where the class has no row)."""
    d = torch.cdist(points, phi)

    def nearest(label: Tensor) -> Tensor:
        return torch.where(y[None] == label[:, None], d, math.inf).amin(1)

    return nearest(target) / nearest(source).clamp_min(1e-12)
