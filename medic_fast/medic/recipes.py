"""MEDIC's settings in one table: what :func:`~medic_fast.sanitize`, ``medic-fast sanitize``, the
demo and the benchmarks read when an option is not given.

``RECIPES["default"]`` is the library's choice, measured on small clean sets
(``benchmarks/RESULTS.md`` §10 has every setting tried); ``RECIPES["paper"]`` is the released
MEDIC code's recipe (``sanitize(..., recipe="paper")``). ``WHY`` holds the one-sentence reason
for each default, which ``sanitize``'s docstring repeats.
"""
from __future__ import annotations

import math
from typing import Optional

from medic_fast.data import RandomCropFlip

__all__ = ["RECIPES", "WHY", "recipe", "training_epochs", "make_augment", "AUGMENTS"]

AUGMENTS = (None, "crop", "crop+flip")

RECIPES = {
    "default": {
        "layers": None, "tau": 20.0, "lam": 10.0, "criterion": "abs", "stats": "channel",
        "epochs": 60, "min_steps": 1000, "lr": 0.01, "batch_size": 64, "weight_decay": 1e-4,
        "augment": None, "kd": 0.0, "kd_temperature": 4.0, "cache": "auto",
    },
    "paper": {
        "layers": None, "tau": 5.0, "lam": 10.0, "criterion": "abs", "stats": "channel",
        "epochs": 60, "min_steps": 0, "lr": 0.01, "batch_size": 64, "weight_decay": 1e-4,
        "augment": "crop+flip", "kd": 0.0, "kd_temperature": 4.0, "cache": "auto",
    },
}

WHY = {
    "layers": "every conv and BatchNorm output, as the paper clones them; a model without any "
              "gets its repeated blocks (transformers) or its hidden Linear layers (MLPs).",
    "tau": "the paper's 5 left 20-70% ASR in ResNet clones after 250-1000 steps; 20 kept ASR "
           "at or below about 10% on Blend and LC with ACC within 3 points at 10% clean data "
           "(RESULTS §10; the paper also tunes tau per task).",
    "lam": "the paper's weight; 3 and 30 gave the same ACC and ASR, as the clone loss is "
           "hundreds of times the CE and Adam is scale-free (RESULTS §10).",
    "epochs": "the paper's 60 epochs; at least min_steps optimizer steps in all.",
    "min_steps": "60 epochs of a small clean set are too few steps (60 on 5% of digits); "
                 "1000 steps at tau 20 gained 0.5-1.4 points of ACC over 500 at little ASR "
                 "(RESULTS §10).",
    "lr": "Adam at 0.01 with a cosine schedule, the paper's.",
    "batch_size": "the paper's 64.",
    "weight_decay": "the paper's 1e-4.",
    "augment": "off: random crops let the teacher's backdoor into the clone on 8x8 digits "
               "(ASR 80% with, 1% without, RESULTS §10); pass augment='crop+flip' for "
               "natural images where it fits.",
    "kd": "0: at the paper's tau 5, matching the teacher's logits as well transferred the "
          "backdoor (ASR 35-73% on Blend, RESULTS §10), though neither term does alone; at tau "
          "20 it did not on the one seed checked (issue 24), which is not yet enough to turn "
          "it on.",
    "kd_temperature": "Hinton et al.'s usual 4, used only when kd > 0.",
    "cache": "keep the teacher's signals across epochs when the inputs repeat: the same "
             "result, and a step of about 1.2x a plain one instead of 1.8x (RESULTS §10).",
    "criterion": "|z|, the paper's eq. 2.",
    "stats": "per channel, as BatchNorm keeps them.",
}


def recipe(name: str = "default", **given) -> dict:
    """The settings of recipe ``name`` with the options in ``given`` that are not None put over
    them; an unknown recipe or option raises ``ValueError``."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {name!r}")
    unknown = set(given) - set(RECIPES[name])
    if unknown:
        raise ValueError(f"unknown recipe options {sorted(unknown)}")
    return {**RECIPES[name], **{k: v for k, v in given.items() if v is not None}}


def training_epochs(epochs: int, min_steps: int, batches: int) -> int:
    """``epochs``, or more if that many epochs of ``batches`` steps are under ``min_steps``."""
    return max(epochs, math.ceil(min_steps / max(batches, 1)))


def make_augment(spec, x) -> Optional[object]:
    """The batch augmentation of ``spec`` for inputs like ``x`` (a batch): None, a callable
    (used as it is), ``"crop"`` (random crop after zero-padding by ``max(1, H // 8)`` pixels)
    or ``"crop+flip"`` (and a random horizontal flip); the crops need images ``[B, C, H, W]``."""
    if spec is None or callable(spec):
        return spec
    if spec not in AUGMENTS:
        raise ValueError(f"augment must be None, a callable or one of {AUGMENTS[1:]}, got "
                         f"{spec!r}")
    if x.dim() != 4:
        raise ValueError(f"augment={spec!r} needs images [B, C, H, W], the data gives inputs "
                         f"of shape {tuple(x.shape)}; pass augment=None")
    return RandomCropFlip(max(1, x.shape[-2] // 8), flip=spec == "crop+flip")
