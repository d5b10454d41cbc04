"""The importance clone loss in plain PyTorch: the readable specification (DESIGN.md §1).

Every fast backend is tested against these functions, run in float64. They take already
validated arguments (see :func:`medic_fast.importance_clone_loss`) and favour clarity over speed.
"""
from __future__ import annotations

import torch
from torch import Tensor


def batch_stats(acts_t: Tensor, start_dim: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of ``acts_t`` over every dim but ``start_dim``."""
    dims = [d for d in range(acts_t.dim()) if d != start_dim]
    x = acts_t.detach()
    std, mean = torch.std_mean(x if x.dtype == torch.float64 else x.float(), dims, correction=0)
    return mean, std


def expand_stats(stat: Tensor, shape: torch.Size, start_dim: int) -> Tensor:
    """Broadcast a statistic to the feature shape ``shape[start_dim:]``.

    A 1-D statistic whose length is ``shape[start_dim]`` is per channel; anything else broadcasts
    by PyTorch's rules against the feature shape.
    """
    feat = shape[start_dim:]
    if stat.dim() == 1 and len(feat) > 1 and stat.shape[0] == feat[0]:
        stat = stat.reshape((feat[0],) + (1,) * (len(feat) - 1))
    return stat.expand(feat)


def importance_weights(acts_t, grads, mean, std, *, tau, criterion, eps, start_dim) -> Tensor:
    """``w = sqrt(softmax(a) * softmax(q))`` per row, in the shape of ``acts_t`` (eq. 2–4)."""
    acc = torch.float64 if acts_t.dtype == torch.float64 else torch.float32
    t, g = acts_t.detach().to(acc), grads.detach().to(acc)
    if mean is None or std is None:
        bm, bs = batch_stats(t, start_dim)
        mean = bm if mean is None else mean
        std = bs if std is None else std
    mu = expand_stats(mean.detach().to(acc), t.shape, start_dim)
    s = expand_stats(std.detach().to(acc), t.shape, start_dim) + eps
    z = (t - mu) / s
    a = tau * (z.abs() if criterion == "abs" else z)
    q = tau * s * g
    rows = t.shape[:start_dim].numel()
    log_wa = torch.log_softmax(a.reshape(rows, -1), dim=1)
    log_wq = torch.log_softmax(q.reshape(rows, -1), dim=1)
    return torch.exp((log_wa + log_wq) / 2).reshape(t.shape)


def layer_row_losses(acts_t, acts_c, grads, mean, std, *, tau, criterion, eps, start_dim) -> Tensor:
    """Per-row loss ``sum_i w_i ((t_i - c_i) / s_i)^2`` of one layer; gradient flows to acts_c."""
    acc = torch.float64 if acts_c.dtype == torch.float64 else torch.float32
    w = importance_weights(acts_t, grads, mean, std, tau=tau, criterion=criterion, eps=eps,
                           start_dim=start_dim)
    if mean is None or std is None:
        std = batch_stats(acts_t.detach().to(acc), start_dim)[1] if std is None else std
    s = expand_stats(std.detach().to(acc), acts_t.shape, start_dim) + eps
    r = (acts_t.detach().to(acc) - acts_c.to(acc)) / s
    rows = acts_t.shape[:start_dim].numel()
    return (w * r * r).reshape(rows, -1).sum(dim=1)


def importance_clone_loss(layers, start_dims, *, tau, criterion, eps, reduction) -> Tensor:
    """Sum over ``layers`` (tuples ``(acts_t, acts_c, grads, mean, std)``) of the reduced loss."""
    total = None
    for (t, c, g, mean, std), start_dim in zip(layers, start_dims):
        rows = layer_row_losses(t, c, g, mean, std, tau=tau, criterion=criterion, eps=eps,
                                start_dim=start_dim)
        value = rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
        total = value if total is None else total + value
    return total
