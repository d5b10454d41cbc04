"""The paper's demonstration tasks, small enough for tests: label-flip poisoned (or clean) models
on the Swiss roll (2-D, classes along the roll, a 5-layer fully connected network) and on
scikit-learn's digits (8x8 images, a small fully connected network).

Built on the evaluation harness: the bundled data (:mod:`medic_fast.zoo.datasets`), a stratified
seeded split (:func:`medic_fast.data.split`), :class:`~medic_fast.zoo.attacks.LabelFlip`,
:class:`~medic_fast.zoo.models.MLP` and the package's training loop (:func:`medic_fast.train.fit`).

The attack (paper §5) draws a random source class, a random other target class and, at random,
one training sample of the source class; it appends ``copies`` copies of that sample labelled
``target``. As in the paper's transfer-learning setting, only the last two Linear layers (the
head at CLEAR's default cut) are trained on the poisoned set, so the sample's features stay where
the clean feature extractor put them and the head has to bend around them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast.data import make_loader, split
from medic_fast.train import fit
from medic_fast.zoo.attacks import LabelFlip, draw_victim
from medic_fast.zoo.datasets import load_digits, load_swiss_roll
from medic_fast.zoo.models import MLP

__all__ = ["Task", "swiss_roll_task", "digits_task"]

BATCH = 128


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


def _train(model: nn.Module, data, *, epochs: int, lr: float, seed: int) -> None:
    """Adam at a constant ``lr`` on cross-entropy, over the parameters that require grad."""
    fit(model, make_loader(data, batch_size=BATCH, shuffle=True, seed=seed),
        lambda x, y: (F.cross_entropy(model(x), y), {}), epochs=epochs, lr=lr,
        schedule="constant", seed=seed)


def _task(X, y, classes: int, widths: Sequence[int], fractions: Sequence[float], *, seed: int,
          poisoned: bool, copies: int, epochs: int, lr: float) -> Task:
    """Train a clean model, then fine-tune its last two Linear layers on the training set,
    label-flipped when ``poisoned``: the paper's transfer-learning setting."""
    train, val, test = split(X, y, fractions, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(X[0].numel(), classes, widths)
    _train(model, train, epochs=epochs, lr=lr, seed=seed)
    x = source = target = None
    if poisoned:
        victim = draw_victim(train[1], classes, seed)
        source, target = victim.source, victim.target
        p = LabelFlip(source, copies=copies).poison(*train, 1 / len(train[1]), target, seed)
        train, x = (p.X, p.y), p.X[p.index]
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-2:]
    model.requires_grad_(False)
    for m in head:
        m.requires_grad_(True)
    _train(model, train, epochs=epochs, lr=lr, seed=seed)
    return Task(model.requires_grad_(True), val, test, x, source, target)


def swiss_roll_task(seed: int = 0, poisoned: bool = True, *, classes: int = 4, n: int = 3000,
                    copies: int = 100, epochs: int = 100) -> Task:
    """Swiss roll in 2-D (``load_swiss_roll``'s x and z: the roll's cross-section; the height y
    carries no class), noise 0.3, classes = equal-count stretches of the roll; a 5-layer fully
    connected network 2-64-64-64-64-classes. Split 60/20/20 (train / val / test)."""
    X, y = load_swiss_roll(n, n_classes=classes, noise=0.3, seed=seed)
    return _task(X[:, [0, 2]], y, classes, [64, 64, 64, 64], [0.6, 0.2, 0.2], seed=seed,
                 poisoned=poisoned, copies=copies, epochs=epochs, lr=3e-3)


def digits_task(seed: int = 0, poisoned: bool = True, *, copies: int = 100,
                epochs: int = 100) -> Task:
    """scikit-learn's 8x8 digits, a fully connected network 64-128-64-10. Split 55/28/17
    (train / val / test: about 50 validation samples per class for the scan)."""
    X, y = load_digits()
    return _task(X, y, 10, [128, 64], [0.55, 0.28, 0.17], seed=seed, poisoned=poisoned,
                 copies=copies, epochs=epochs, lr=3e-3)
