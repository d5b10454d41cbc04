"""The toy data sets the evaluation harness and the demos use, bundled with scikit-learn (no
download): the 8x8 handwritten digits and the Swiss roll."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["load_digits", "load_swiss_roll"]


def load_digits() -> Tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits: ``X`` [1797, 1, 8, 8] float32 in [0, 1],
    ``y`` [1797] int64 in 0..9. No download."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    X = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    return X, torch.from_numpy(d.target).long()


def load_swiss_roll(n_samples: int = 2000, *, n_classes: int = 2, bands: Optional[int] = None,
                    noise: float = 0.5, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """scikit-learn's Swiss roll as a classification toy: ``X`` [n, 3] float32 (standardised),
    ``y`` [n] int64.

    The roll is cut along its length into ``bands`` strips of equal sample count (default
    ``n_classes``), strip ``k`` labelled ``k % n_classes``: more bands than classes interleave
    the classes along the roll, a harder, more non-linear boundary.
    """
    from sklearn.datasets import make_swiss_roll

    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    bands = n_classes if bands is None else bands
    if bands < n_classes:
        raise ValueError(f"bands must be >= n_classes ({n_classes}), got {bands}")
    pts, t = make_swiss_roll(n_samples, noise=noise, random_state=seed)
    X = torch.from_numpy(pts).float()
    X = (X - X.mean(0)) / X.std(0)
    t = torch.from_numpy(t)
    rank = torch.empty_like(t, dtype=torch.long)
    rank[torch.argsort(t)] = torch.arange(n_samples)
    y = (rank * bands // n_samples) % n_classes
    return X, y.long()
