"""Argument checks of the importance clone loss: one-line errors naming the argument and what was
expected. The op runs them once per layout (its plan cache, :mod:`medic_fast.ops.importance_clone`);
the scalar options, which are values, at every call."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Optional, Tuple

import torch
from torch import Tensor

from medic_fast._utils import user_stacklevel
from medic_fast.ops import _dispatch
from medic_fast.reference.importance_clone import CRITERIA

REDUCTIONS = ("mean", "sum", "none")


def as_layers(name: str, x) -> list:
    """``x`` as a list of per-layer values (a single tensor is one layer)."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return list(x)
    raise TypeError(f"{name} must be a Tensor or a sequence of Tensors, got {type(x).__name__}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_scalars(tau, eps, weight) -> None:
    """The options that are values (checked at every call)."""
    if not _finite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if not _finite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not _finite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")


def check_options(tau, criterion, eps, reduction, weight, backend, op="importance_clone_loss"):
    check_scalars(tau, eps, weight)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _dispatch.check(op, backend)


def _check_tensor(name: str, x, like: Optional[Tuple[str, Tensor]] = None) -> None:
    """``like``: ``(its name, a tensor)`` whose device ``x`` must be on."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16 or "
                        f"float64), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if like is not None and x.device != like[1].device:
        raise ValueError(f"{name} is on {x.device} but {like[0]} is on {like[1].device}; all "
                         "tensors (of every layer, statistics included) must be on one device")


def _check_stat(name: str, stat, t: Tuple[str, Tensor], start_dim: int) -> None:
    """``t``: ``(its name, the layer's acts_t)``."""
    if stat is None:
        return
    _check_tensor(name, stat, t)
    t = t[1]
    feat = t.shape[start_dim:]
    if stat.dim() == 1 and stat.shape[0] == feat[0]:
        return
    try:
        if torch.broadcast_shapes(stat.shape, feat) == feat:
            return
    except RuntimeError:
        pass
    raise ValueError(f"{name} has shape {tuple(stat.shape)}, which does not broadcast to the "
                     f"feature shape {tuple(feat)} (acts_t.shape[start_dim:]); pass a 1-D tensor "
                     f"of length {feat[0]} for per-channel statistics")


_zero_std_warned = False


def check_std(name: str, std: Tensor) -> None:
    """Refuse negative values of the statistic ``std``; warn (once per process) where it is 0,
    as ``eps`` alone then divides. Reads the values: a sync for CUDA tensors (the statistics
    objects call it once; the C++ kernel checks its own inputs at every call)."""
    global _zero_std_warned
    low = float(std.min())
    if low < 0:
        raise ValueError(f"{name} must be >= 0 (a standard deviation), got a minimum of {low:g}")
    if low == 0 and not _zero_std_warned:
        _zero_std_warned = True
        warnings.warn(f"{name} is 0 at {int((std == 0).sum())} of {std.numel()} entries: eps "
                      "alone divides there, so those neurons may dominate the loss (a constant "
                      "or dead channel in the statistics?); shown once per process",
                      RuntimeWarning, stacklevel=user_stacklevel())


def _normalize_start_dim(start_dim, ndim: int, where: str) -> int:
    if not isinstance(start_dim, int) or isinstance(start_dim, bool):
        raise TypeError(f"start_dim must be an int, got {type(start_dim).__name__}")
    sd = start_dim + ndim if start_dim < 0 else start_dim
    if not 0 <= sd < ndim:
        raise ValueError(f"start_dim={start_dim} is out of range for {where} with {ndim} dims; "
                         f"it must leave at least one feature dim")
    return sd


def validate(acts_t, acts_c, grads, mean, std, start_dim, reduction):
    """Return ``(layers, start_dims)``: per layer ``(t, c, g, mean, std)``, checked."""
    ts = as_layers("acts_t", acts_t)
    cs = as_layers("acts_c", acts_c)
    gs = as_layers("grads", grads)
    if not ts:
        raise ValueError("acts_t is an empty sequence; pass at least one layer")
    if not (len(ts) == len(cs) == len(gs)):
        raise ValueError(f"acts_t, acts_c and grads must have the same number of layers, got "
                         f"{len(ts)}, {len(cs)} and {len(gs)}")
    n = len(ts)
    means = [None] * n if mean is None else as_layers("mean", mean)
    stds = [None] * n if std is None else as_layers("std", std)
    for name, lst in (("mean", means), ("std", stds)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} layers but acts_t has {n}")
    layers, dims = [], []
    first = None  # ("acts_t (layer 0)", its tensor): every layer's device
    for i, (t, c, g, mu, sd) in enumerate(zip(ts, cs, gs, means, stds)):
        sfx = f" (layer {i})" if n > 1 else ""
        _check_tensor("acts_t" + sfx, t, first)
        first = first or ("acts_t" + sfx, t)
        _check_tensor("acts_c" + sfx, c, ("acts_t" + sfx, t))
        _check_tensor("grads" + sfx, g, ("acts_t" + sfx, t))
        for name, x in (("acts_c", c), ("grads", g)):
            if x.shape != t.shape:
                raise ValueError(f"{name}{sfx} has shape {tuple(x.shape)} but acts_t has shape "
                                 f"{tuple(t.shape)}")
        d = _normalize_start_dim(start_dim, t.dim(), "acts_t" + sfx)
        _check_stat("mean" + sfx, mu, ("acts_t" + sfx, t), d)
        _check_stat("std" + sfx, sd, ("acts_t" + sfx, t), d)
        layers.append((t, c, g, mu, sd))
        dims.append(d)
    if reduction == "none" and n > 1:
        rows = {t.shape[:d].numel() for (t, *_), d in zip(layers, dims)}
        if len(rows) > 1:
            raise ValueError(f"reduction='none' sums per-row losses over layers, so every layer "
                             f"needs the same number of rows; got {sorted(rows)}")
    return layers, dims
