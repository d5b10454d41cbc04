"""CLEAR's evaluation tasks (paper §5), small enough for tests: a model attacked by one of the
paper's four sample-targeted attacks (or the same model left clean), on the bundled data.

* Tasks: ``"swiss_roll"`` (2-D points, classes along the roll, a 5-layer fully connected network:
  the paper's Fig. 3), ``"digits_mlp"`` (scikit-learn's 8x8 digits, a fully connected network)
  and ``"digits_cnn"`` (digits, :class:`~medic_fast.zoo.models.DigitsCNN`: a single Linear layer,
  so CLEAR's cut is the input of the last conv block).
* Attacks (:data:`ATTACKS`): ``"label_flip"`` (``copies`` copies of a training sample, relabelled:
  :class:`~medic_fast.zoo.attacks.LabelFlip`), and the clean-label ``"feature_collision"``,
  ``"convex_polytope"`` and ``"bullseye_polytope"`` (:class:`~medic_fast.zoo.attacks.
  FeaturePoisoning`: target-class training samples perturbed so that their features at the cut
  collide with, or surround, a test-time sample's).
* Forms (:data:`FORMS`): ``"transfer"`` (the feature extractor frozen, the head, everything after
  CLEAR's default cut, trained on the poisoned set) and ``"end2end"`` (the whole model trained on
  it).

Every model starts the same way: trained on the clean training split (its accuracy is the
reference of the paper's rule below). The second phase trains the head (transfer) or the whole
model (end to end) on the training split, poisoned or, for a clean model, not. The attacked sample
and the target class are drawn at random from the seed (:func:`~medic_fast.zoo.attacks.
draw_victim`), as the paper does; nothing is picked because it suits the defence. An attack
*takes* (:attr:`Task.took`) when the attacked sample goes to the target class and test accuracy
drops by less than 5 points from the clean model's (the paper's rule).

Built on the evaluation harness: the bundled data (:mod:`medic_fast.zoo.datasets`), a stratified
seeded split (:func:`medic_fast.data.split`), the models of :mod:`medic_fast.zoo.models` and the
package's training loop (:func:`medic_fast.train.fit`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast.clear import graph
from medic_fast.data import make_loader, split
from medic_fast.train import fit
from medic_fast.zoo import attacks as _attacks
from medic_fast.zoo.datasets import load_digits, load_swiss_roll
from medic_fast.zoo.models import MLP, DigitsCNN

__all__ = ["Task", "make_task", "swiss_roll_task", "digits_task", "TASKS", "ATTACKS", "FORMS"]

BATCH = 128
ATTACKS = ("label_flip", "feature_collision", "convex_polytope", "bullseye_polytope")
FORMS = ("transfer", "end2end")
FEATURE_ATTACKS = {"feature_collision": _attacks.FeatureCollision,
                   "convex_polytope": _attacks.ConvexPolytope,
                   "bullseye_polytope": _attacks.BullseyePolytope}
# The paper's rule: an attack counts when clean accuracy drops by less than this (fraction).
MAX_ACC_DROP = 0.05


@dataclass
class Task:
    model: nn.Module                 # trained, in eval mode
    val: Tuple[Tensor, Tensor]       # clean validation data for scan/patch
    test: Tuple[Tensor, Tensor]      # clean test data for accuracy
    target_x: Optional[Tensor]       # [1, ...]: the attacked sample (None for a clean model)
    source: Optional[int]            # its true class
    target: Optional[int]            # the class the attack wants for it
    clean_accuracy: float = float("nan")  # test accuracy of the clean model of the first phase
    name: str = ""                   # "task/attack/form" ("task/clean/form" for a clean model)

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

    @property
    def took(self) -> bool:
        """The paper's rule: the attacked sample is classified as the target, and test accuracy
        is less than 5 points below the clean model's. False for a clean model."""
        return (self.target_x is not None and self.target_class() == self.target
                and self.accuracy() > self.clean_accuracy - MAX_ACC_DROP)


@dataclass(frozen=True)
class _Spec:
    data: Callable[[int], Tuple[Tensor, Tensor]]      # seed -> (X, y)
    model: Callable[[], nn.Module]
    fractions: Tuple[float, float, float]             # train / val / test
    epochs: int
    lr: float
    budget: float                                     # feature attacks: L2 budget per poison
    clamp: Optional[Tuple[float, float]]              # the inputs' valid range


def _roll(seed: int):
    X, y = load_swiss_roll(3000, n_classes=4, noise=0.3, seed=seed)
    return X[:, [0, 2]], y


# Swiss roll: x and z of load_swiss_roll (the roll's cross-section; the height y carries no class),
# noise 0.3, 4 classes = equal-count stretches of the roll, 60/20/20. Digits: 55/28/17, about 50
# validation samples per class for the scan. Budgets of the feature attacks: an L2 ball of 2.0
# around each base point of the roll (whose cross-section spans about 25) and around each 64-pixel
# digit in [0, 1] (a root-mean-square change of 0.25 per pixel). Chosen on seeds 100-102: at 1.0
# no feature attack took on either; at 2.0 all three took 3/3 on the digits MLP (transfer) and
# 1/3 on the roll; at 4.0 the roll's went to 0-2/3 (benchmarks/RESULTS.md §4).
TASKS: Dict[str, _Spec] = {
    "swiss_roll": _Spec(_roll, lambda: MLP(2, 4, (64, 64, 64, 64)), (0.6, 0.2, 0.2), 100, 3e-3,
                        2.0, None),
    "digits_mlp": _Spec(lambda seed: load_digits(), lambda: MLP(64, 10, (128, 64)),
                        (0.55, 0.28, 0.17), 100, 3e-3, 2.0, (0.0, 1.0)),
    "digits_cnn": _Spec(lambda seed: load_digits(), lambda: DigitsCNN(), (0.55, 0.28, 0.17), 30,
                        3e-3, 2.0, (0.0, 1.0)),
}


def _train(model: nn.Module, data, *, epochs: int, lr: float, seed: int) -> None:
    """Adam at a constant ``lr`` on cross-entropy, over the parameters that require grad."""
    fit(model, make_loader(data, batch_size=BATCH, shuffle=True, seed=seed),
        lambda x, y: (F.cross_entropy(model(x), y), {}), epochs=epochs, lr=lr,
        schedule="constant", seed=seed)


def make_task(task: str = "swiss_roll", attack: str = "label_flip", form: str = "transfer",
              seed: int = 0, poisoned: bool = True, *, copies: int = 20, n_poisons: int = 20,
              epochs: Optional[int] = None) -> Task:
    """One model of ``task`` under ``attack`` in ``form`` (see the module's docstring), or, with
    ``poisoned=False``, the same pipeline on clean data (``attack`` is then ignored). ``copies``:
    label flip's relabelled copies; ``n_poisons``: the feature attacks' poisoned base samples
    (both 20, about 1% of the training set of the roll, 2% of digits'). ``epochs``: of each phase
    (default: the task's)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    spec = TASKS[task]
    epochs = spec.epochs if epochs is None else epochs
    X, y = spec.data(seed)
    train, val, test = split(X, y, spec.fractions, seed=seed)
    classes = int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model()
    _train(model, train, epochs=epochs, lr=spec.lr, seed=seed)
    model.eval()
    clean_accuracy = Task(model, val, test, None, None, None).accuracy()
    x = source = target = None
    if poisoned:
        if attack == "label_flip":
            victim = _attacks.draw_victim(train[1], classes, seed)
            p = _attacks.LabelFlip(victim.source, copies=copies).poison(
                *train, 1 / len(train[1]), victim.target, seed)
            x = p.X[p.index]
        else:  # a test-time sample, poisons crafted on the clean model's features at the cut
            victim = _attacks.draw_victim(test[1], classes, seed)
            x = test[0][victim.index:victim.index + 1]
            feats = graph.features(copy.deepcopy(model), graph.default_cut(model))
            att = FEATURE_ATTACKS[attack](feats, budget=spec.budget, norm="l2", clamp=spec.clamp)
            p = att.poison_for(*train, x, victim.target, n_poisons, seed)
        train, source, target = (p.X, p.y), victim.source, victim.target
    if form == "transfer":  # the features frozen (eval mode: BatchNorm statistics too)
        head = graph.split(model, graph.default_cut(model))
        model.requires_grad_(False)
        head.requires_grad_(True).train()
    else:
        model.train()
    _train(model, train, epochs=epochs, lr=spec.lr, seed=seed)
    model.requires_grad_(True).eval()
    name = f"{task}/{attack if poisoned else 'clean'}/{form}"
    return Task(model, val, test, x, source, target, clean_accuracy, name)


def swiss_roll_task(seed: int = 0, poisoned: bool = True, **kwargs) -> Task:
    """:func:`make_task` on the Swiss roll (``kwargs``: its options)."""
    return make_task("swiss_roll", seed=seed, poisoned=poisoned, **kwargs)


def digits_task(seed: int = 0, poisoned: bool = True, **kwargs) -> Task:
    """:func:`make_task` on digits with the MLP (``kwargs``: its options)."""
    return make_task("digits_mlp", seed=seed, poisoned=poisoned, **kwargs)
