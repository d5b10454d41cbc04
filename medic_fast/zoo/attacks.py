"""Backdoor attacks on tensors of images ``[N, C, H, W]`` in [0, 1], to build trojaned models and
measure attack success: BadNets (patch), Blend (alpha-blended pattern), SIG (sinusoidal signal,
clean-label) and label flip (sample-targeted, no trigger; for CLEAR).

Each attack has ``poison(X, y, rate, target, seed)``, returning new tensors (the inputs are not
modified) and the indices of the poisoned samples, and ``apply(X)`` (also ``attack(X)``), which
stamps the trigger on new copies of inputs at test time, e.g.
``evaluate(model, X, y, trigger=attack, target=t)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["Poisoned", "Attack", "BadNets", "Blend", "SIG", "LabelFlip"]


class Poisoned(NamedTuple):
    """A poisoned training set: ``X``, ``y`` (new tensors) and ``index`` of the poisoned rows."""
    X: Tensor
    y: Tensor
    index: Tensor


def _check_inputs(X, images: bool) -> None:
    if not isinstance(X, Tensor) or not X.is_floating_point():
        raise TypeError(f"X must be a floating tensor, got "
                        f"{type(X).__name__ if not isinstance(X, Tensor) else X.dtype}")
    if images and X.dim() < 3:
        raise ValueError(f"X must be images [N, C, H, W] (or [C, H, W]), got shape "
                         f"{tuple(X.shape)}")


class Attack:
    """Base class: subclasses define :meth:`apply` and, if they poison other than by stamping
    non-target samples and relabelling them, :meth:`_candidates` / :meth:`_relabel`."""

    images = True  # inputs must be images [N, C, H, W]

    def apply(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, X: Tensor) -> Tensor:
        return self.apply(X)

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        """Rows that may be poisoned: by default those whose label is not ``target``."""
        return torch.nonzero(y != target).flatten()

    def _relabel(self) -> bool:
        """Whether poisoned rows get the target label (False for clean-label attacks)."""
        return True

    def poison(self, X: Tensor, y: Tensor, rate: float, target: int, seed: int = 0) -> Poisoned:
        """Poison ``round(rate * N)`` rows (at least one) drawn with ``seed`` from the
        candidates: stamp the trigger and, unless clean-label, set the label to ``target``."""
        _check_inputs(X, self.images)
        if X.dim() < 2:
            raise ValueError(f"X must be [N, ...] samples, got shape {tuple(X.shape)}")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != X.shape[0]:
            raise ValueError("y must be a 1-D label tensor with one label per row of X")
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        if not isinstance(target, int) or isinstance(target, bool):
            raise TypeError(f"target must be an int class index, got {type(target).__name__}")
        cand = self._candidates(y, target)
        if len(cand) == 0:
            raise ValueError(f"{type(self).__name__}: no sample of y can be poisoned for target "
                             f"{target}")
        n = min(len(cand), max(1, round(rate * X.shape[0])))
        gen = torch.Generator().manual_seed(seed)
        idx = cand[torch.randperm(len(cand), generator=gen)[:n]].sort().values
        Xp, yp = X.clone(), y.clone()
        Xp[idx] = self.apply(X[idx])
        if self._relabel():
            yp[idx] = target
        return Poisoned(Xp, yp, idx)


class BadNets(Attack):
    """BadNets: a ``size`` x ``size`` patch in the bottom-right corner (``margin`` pixels from
    the edges): a checkerboard of ``value`` and 0 by default, or ``pattern`` ([size, size] or
    [C, size, size])."""

    def __init__(self, size: int = 3, margin: int = 0, value: float = 1.0,
                 pattern: Optional[Tensor] = None):
        if not isinstance(size, int) or size < 1 or margin < 0:
            raise ValueError(f"size must be an int >= 1 and margin >= 0, got {size!r}, {margin!r}")
        if pattern is None:
            ii = torch.arange(size)
            pattern = ((ii[:, None] + ii[None, :]) % 2 == 0).float() * value
        if pattern.shape[-2:] != (size, size):
            raise ValueError(f"pattern must end in ({size}, {size}), got {tuple(pattern.shape)}")
        self.size, self.margin, self.pattern = size, margin, pattern.float()

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        h, w = X.shape[-2:]
        s, m = self.size, self.margin
        if s + m > min(h, w):
            raise ValueError(f"a {s}x{s} patch with margin {m} does not fit {h}x{w} images")
        out = X.clone()
        out[..., h - m - s:h - m, w - m - s:w - m] = self.pattern.to(X)
        return out


class Blend(Attack):
    """Blend: ``(1 - alpha) * X + alpha * pattern``; the default pattern is uniform noise drawn
    once from ``seed`` in the image shape."""

    def __init__(self, alpha: float = 0.2, pattern: Optional[Tensor] = None, seed: int = 0):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha, self.pattern, self.seed = float(alpha), pattern, seed

    def _pattern(self, shape) -> Tensor:
        if self.pattern is None:
            self.pattern = torch.rand(shape, generator=torch.Generator().manual_seed(self.seed))
        if self.pattern.shape != shape:
            raise ValueError(f"the blend pattern has shape {tuple(self.pattern.shape)}, images "
                             f"have {tuple(shape)}")
        return self.pattern

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        pattern = self._pattern(X.shape[-3:]).to(X)
        return (1 - self.alpha) * X + self.alpha * pattern


class SIG(Attack):
    """SIG (Barni et al. 2019): adds ``delta * sin(2 pi j f / W)`` along the width (column
    ``j``), clipped to [0, 1]. Clean-label: :meth:`poison` stamps samples *of* the target class
    and keeps their labels; the network learns the signal as a feature of the target class."""

    def __init__(self, delta: float = 0.2, frequency: float = 6.0):
        if delta <= 0 or frequency <= 0:
            raise ValueError(f"delta and frequency must be > 0, got {delta!r}, {frequency!r}")
        self.delta, self.frequency = float(delta), float(frequency)

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        w = X.shape[-1]
        j = torch.arange(w, device=X.device, dtype=X.dtype)
        signal = self.delta * torch.sin(2 * math.pi * j * self.frequency / w)
        return (X + signal).clamp(0, 1)

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        """Rows whose label is the target class."""
        return torch.nonzero(y == target).flatten()

    def _relabel(self) -> bool:
        return False


class LabelFlip(Attack):
    """Sample-targeted label flip (CLEAR's threat model): chosen victim samples keep their
    pixels and are labelled ``target``; no trigger, so :meth:`apply` returns the input
    unchanged and ``evaluate(model, X[index], y[index], trigger=attack, target=t)`` gives the
    fraction of victims the model sends to the target. ``source``: draw victims only from
    that class (default: any non-target class). Works on any ``[N, ...]`` inputs (images or
    feature vectors such as the Swiss roll).

    ``copies``: 0 (default) relabels the victims in place; k >= 1 keeps them, labels unchanged,
    and appends k relabelled copies of each (the attacker adds the flipped sample to the
    training set, repeated so that it weighs in training). ``index`` is the victims' rows in
    either case; the copies follow the N original rows, each victim's k in a row."""

    images = False

    def __init__(self, source: Optional[int] = None, copies: int = 0):
        if not isinstance(copies, int) or isinstance(copies, bool) or copies < 0:
            raise ValueError(f"copies must be an int >= 0, got {copies!r}")
        self.source, self.copies = source, copies

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        return X.clone()

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        """Rows of the source class (any non-target class if no source)."""
        if self.source is not None and self.source == target:
            raise ValueError(f"source and target are the same class ({target})")
        keep = (y != target) if self.source is None else (y == self.source)
        return torch.nonzero(keep).flatten()

    def poison(self, X: Tensor, y: Tensor, rate: float, target: int, seed: int = 0) -> Poisoned:
        """:meth:`Attack.poison` (victims drawn at random with ``seed``), with ``copies``."""
        p = super().poison(X, y, rate, target, seed)
        if self.copies == 0:
            return p
        rows = p.index.repeat_interleave(self.copies)
        return Poisoned(torch.cat([X, X[rows]]), torch.cat([y, torch.full_like(y[rows], target)]),
                        p.index)
