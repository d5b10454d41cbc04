"""The importance clone loss in plain PyTorch: the readable specification (DESIGN.md §1).

The formula is written once, on rows (:func:`weights`, :func:`row_losses`, :func:`gradient`):
the reference backend, the op's differentiable backward (``create_graph=True``) and the kernel
tests all call it. Every fast backend is tested against it, run in float64. The functions take
already validated arguments (see :func:`medic_fast.importance_clone_loss`) and favour clarity
over speed.
"""
from __future__ import annotations

import enum

import torch
from torch import Tensor

CRITERIA = ("abs", "signed")


class Criterion(enum.IntEnum):
    """How a neuron's activation scores its importance (``D`` in DESIGN.md §1); the op's schema
    takes the integer."""

    ABS = 0  # paper eq. 2
    SIGNED = 1  # the authors' released code

    @classmethod
    def of(cls, name: str) -> "Criterion":
        return cls(CRITERIA.index(name))


# --- the formula, on rows: the last dim holds a row's neurons ---------------------------------

def weights(t: Tensor, g: Tensor, mu: Tensor, s: Tensor, *, tau: float,
            criterion: Criterion) -> Tensor:
    """``w = sqrt(softmax(a) * softmax(q))`` over the last dim (eq. 2–4), ``s = std + eps``:
    ``a = tau D((t - mu) / s)``, ``q = tau s g``."""
    z = (t - mu) / s
    a = tau * (z.abs() if criterion == Criterion.ABS else z)
    q = tau * s * g
    return torch.exp((torch.log_softmax(a, -1) + torch.log_softmax(q, -1)) / 2)


def row_losses(t: Tensor, c: Tensor, g: Tensor, mu: Tensor, s: Tensor, *, tau: float,
               criterion: Criterion) -> Tensor:
    """``loss_b = sum_i w_i ((t_i - c_i) / s_i)^2`` per row; the gradient flows to ``c`` only."""
    w = weights(t.detach(), g.detach(), mu.detach(), s.detach(), tau=tau, criterion=criterion)
    r = (t.detach() - c) / s.detach()
    return (w * r * r).sum(-1)


def gradient(t: Tensor, c: Tensor, g: Tensor, mu: Tensor, s: Tensor, *, tau: float,
             criterion: Criterion) -> Tensor:
    """``d loss_b / d c_i = -2 w_i (t_i - c_i) / s_i^2``, differentiable in ``c``."""
    w = weights(t.detach(), g.detach(), mu.detach(), s.detach(), tau=tau, criterion=criterion)
    return -2.0 * w * (t.detach() - c) / s.detach() ** 2


# --- layers: shapes, statistics, reductions ---------------------------------------------------

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


def as_rows(acts_t, grads, mean, std, *, eps, start_dim, acc=None):
    """``(t, g, mu, s)`` of one layer in the row form of the formula: ``t, g`` as
    ``[rows, m]``, ``mu`` and ``s = std + eps`` as ``[m]``, in ``acc`` (float32, or float64 for
    float64 activations, by default). Missing statistics are the batch's, per channel."""
    acc = acc or (torch.float64 if acts_t.dtype == torch.float64 else torch.float32)
    if mean is None or std is None:
        bm, bs = batch_stats(acts_t.to(acc), start_dim)
        mean = bm if mean is None else mean
        std = bs if std is None else std
    rows = acts_t.shape[:start_dim].numel()
    mu = expand_stats(mean.detach().to(acc), acts_t.shape, start_dim).reshape(-1)
    s = expand_stats(std.detach().to(acc), acts_t.shape, start_dim).reshape(-1) + eps
    return (acts_t.detach().to(acc).reshape(rows, -1), grads.detach().to(acc).reshape(rows, -1),
            mu, s)


def importance_weights(acts_t, grads, mean, std, *, tau, criterion, eps, start_dim) -> Tensor:
    """``w`` per row, in the shape of ``acts_t`` (eq. 2–4)."""
    t, g, mu, s = as_rows(acts_t, grads, mean, std, eps=eps, start_dim=start_dim)
    return weights(t, g, mu, s, tau=tau, criterion=Criterion.of(criterion)).reshape(acts_t.shape)


def layer_row_losses(acts_t, acts_c, grads, mean, std, *, tau, criterion, eps, start_dim) -> Tensor:
    """Per-row loss of one layer; the gradient flows to ``acts_c``."""
    acc = torch.float64 if acts_c.dtype == torch.float64 else torch.float32
    t, g, mu, s = as_rows(acts_t, grads, mean, std, eps=eps, start_dim=start_dim, acc=acc)
    c = acts_c.to(acc).reshape(t.shape)
    return row_losses(t, c, g, mu, s, tau=tau, criterion=Criterion.of(criterion))


def importance_clone_loss(layers, start_dims, *, tau, criterion, eps, reduction,
                          weight=1.0) -> Tensor:
    """``weight`` times the sum over ``layers`` (tuples ``(acts_t, acts_c, grads, mean, std)``)
    of the reduced loss."""
    total = None
    for (t, c, g, mean, std), start_dim in zip(layers, start_dims):
        rows = layer_row_losses(t, c, g, mean, std, tau=tau, criterion=criterion, eps=eps,
                                start_dim=start_dim)
        value = rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
        total = value if total is None else total + value
    return total * weight if weight != 1 else total
