"""The paper's demonstration tasks, small enough for tests: label-flip poisoned (or clean) models
on scikit-learn's Swiss roll (2-D, classes along the roll, a 5-layer fully connected network) and
on its bundled digits (8x8 images, a small fully connected network).

A label-flip attack (paper §5) takes one training sample of class ``source``, labels it
``target`` and adds it ``copies`` times. As in the paper's transfer-learning setting, only the
layers after the feature space are trained on the poisoned set, so the sample's features stay in
the middle of ``source``'s cluster and the head has to bend around them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast.zoo.models import MLP

__all__ = ["Task", "swiss_roll_task", "digits_task"]


@dataclass
class Task:
    model: nn.Module                 # trained, in eval mode
    val: Tuple[Tensor, Tensor]       # clean validation data for scan/patch
    test: Tuple[Tensor, Tensor]      # clean test data for accuracy
    target_x: Optional[Tensor]       # [1, ...]: the attacked sample (None for a clean model)
    source: Optional[int]            # its true class
    target: Optional[int]            # the class the attack wants for it

    def target_class(self, model: Optional[nn.Module] = None) -> Optional[int]:
        """The class ``model`` (default: the task's) gives the attacked sample."""
        if self.target_x is None:
            return None
        with torch.no_grad():
            return int((model or self.model)(self.target_x).argmax(1))

    def accuracy(self, model: Optional[nn.Module] = None) -> float:
        X, y = self.test
        with torch.no_grad():
            return float(((model or self.model)(X).argmax(1) == y).float().mean())


def _train(model, X, y, *, epochs, lr, batch, gen):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        for b in torch.randperm(len(X), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(X[b]), y[b]).backward()
            opt.step()
    return model.eval()


def _splits(X, y, gen, n_val, n_test):
    perm = torch.randperm(len(X), generator=gen)
    va, te, tr = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    return (X[tr], y[tr]), (X[va], y[va]), (X[te], y[te])


def _poison(model, train, gen, classes, copies):
    """Pick the training sample whose features (the input of the second-to-last Linear layer)
    are nearest its class's mean, and add it ``copies`` times labelled as another class."""
    X, y = train
    source = int(torch.randint(classes, (1,), generator=gen))
    target = (source + 1 + int(torch.randint(classes - 1, (1,), generator=gen))) % classes
    mine = (y == source).nonzero().squeeze(1)
    with torch.no_grad():
        feats = model.layers[:-3](X[mine])
    i = mine[(feats - feats.mean(0)).norm(dim=1).argmin()]
    x = X[i:i + 1]
    Xp = torch.cat([X, x.expand(copies, *x.shape[1:])])
    yp = torch.cat([y, torch.full((copies,), target)])
    return (Xp, yp), x, source, target


def _task(X, y, classes, sizes, *, seed, poisoned, copies, epochs, lr, n_val, n_test) -> Task:
    """Train a clean model, then fine-tune its last two Linear layers (the head at the default
    cut) on the training set, label-flipped when ``poisoned``: the paper's transfer-learning
    setting, where the attacked sample's features stay in its class's cluster."""
    gen = torch.Generator().manual_seed(seed)
    train, val, test = _splits(X, y, gen, n_val, n_test)
    torch.manual_seed(seed)
    model = _train(MLP(sizes[0], sizes[-1], sizes[1:-1]), *train, epochs=epochs, lr=lr, batch=128,
                   gen=gen)
    x = source = target = None
    if poisoned:
        train, x, source, target = _poison(model, train, gen, classes, copies)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-2:]
    model.requires_grad_(False)
    for m in head:
        m.requires_grad_(True)
    _train(model, *train, epochs=epochs, lr=lr, batch=128, gen=gen)
    return Task(model.requires_grad_(True), val, test, x, source, target)


def swiss_roll_task(seed: int = 0, poisoned: bool = True, *, classes: int = 4, n: int = 3000,
                    copies: int = 100, epochs: int = 100) -> Task:
    """Swiss roll in 2-D (``make_swiss_roll``'s x and z), classes = equal stretches of the roll,
    a 5-layer fully connected network 2-64-64-64-64-classes."""
    from sklearn.datasets import make_swiss_roll

    pts, t = make_swiss_roll(n, noise=0.3, random_state=seed)
    X = torch.tensor(pts[:, [0, 2]], dtype=torch.float32) / 10
    y = ((t - t.min()) / (t.max() - t.min() + 1e-9) * classes).astype(int)
    return _task(X, torch.tensor(y), classes, [2, 64, 64, 64, 64, classes], seed=seed,
                 poisoned=poisoned, copies=copies, epochs=epochs, lr=3e-3, n_val=600, n_test=600)


def digits_task(seed: int = 0, poisoned: bool = True, *, copies: int = 100,
                epochs: int = 100) -> Task:
    """scikit-learn's 8x8 digits, a fully connected network 64-128-64-10."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16
    return _task(X, torch.tensor(d.target), 10, [64, 128, 64, 10], seed=seed, poisoned=poisoned,
                 copies=copies, epochs=epochs, lr=3e-3, n_val=500, n_test=300)
