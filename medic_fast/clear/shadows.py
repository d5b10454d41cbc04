"""Shadow calibration: the hull scan's threshold from clean models of the user's own architecture
(``scan(..., shadows=N, factory=...)``, docs/DESIGN.md §2).

The fixed threshold (10) was set on the tuned Swiss roll; on other tasks clean models scored up
to 42. When the user can train, :func:`shadow_maxima` trains ``N`` clean *shadows* of the
architecture (``factory()``) on the clean data and scans them with the scan's own settings, and
:func:`threshold_for` turns the largest pair statistic of each into a threshold with a stated
false-alarm rate.

Each shadow is trained on a random half of the data and scanned on the other half: the model
under scan was trained on data the scan never sees, so its clean pockets (its training noise
learnt) lie away from the scan's samples; a shadow scanned on its own training samples finds
those pockets next to the samples that made them, shallow, and would set the threshold too low.

Shadows are cached in ``$MEDIC_FAST_CACHE/shadows`` (default ``~/.cache/medic_fast/shadows``,
the extension's cache root), one file per shadow, keyed by the architecture (class and parameter
shapes), the data's :func:`~medic_fast.data.fingerprint`, the seed, the shadow's index and the
training recipe; each file also keeps the shadow's scan statistics per scan setting, so a second
scan with the same data trains and scans nothing. Writes are atomic (``save_atomic``)."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from medic_fast._utils import build_model, check_int, check_number, digest, save_atomic
from medic_fast.data import as_dataset, fingerprint, make_loader
from medic_fast.train import fit, seeded

__all__ = ["TRAIN", "MIN_SHADOWS", "cache_dir", "shadow_key", "threshold_for", "shadow_maxima"]

# How a shadow is trained: Adam at a constant lr on cross-entropy, the zoo's recipe for the roll
# and the digits MLP (medic_fast/zoo/tasks.py). Any key may be overridden (scan's shadow_train).
TRAIN = dict(epochs=100, lr=3e-3, batch_size=128, weight_decay=0.0)
# The prediction bound needs a spread: two shadows at least (five or more for a useful bound).
MIN_SHADOWS = 2


def cache_dir() -> Path:
    """``shadows`` beside the extension's build cache: ``$MEDIC_FAST_CACHE/shadows`` or
    ``~/.cache/medic_fast/shadows`` (the same checks on ``$MEDIC_FAST_CACHE``)."""
    from medic_fast._extension import cache_dir as extension_cache

    return extension_cache().parent / "shadows"


def _architecture(model: nn.Module) -> list:
    """The architecture as the cache sees it: the class and every parameter's and buffer's name,
    shape and dtype (not their values: ``factory`` may draw a new initialisation each call)."""
    cls = type(model)
    return [f"{cls.__module__}.{cls.__qualname__}",
            [[name, list(t.shape), str(t.dtype)] for name, t in
             [*model.named_parameters(), *model.named_buffers()]]]


def shadow_key(model: nn.Module, data, seed: int, train: Dict[str, float]) -> Optional[str]:
    """The cache key of the shadows of ``model``'s architecture on ``data`` with ``seed`` and the
    ``train`` recipe, or None where the data cannot be fingerprinted (its items change between
    reads, or are not tensors): such data is never cached."""
    data_print = fingerprint(data)
    if data_print["sample"] is None:
        return None
    return digest([_architecture(model), sorted(data_print.items()), seed,
                   sorted(train.items())])


def threshold_for(maxima: Sequence[float], false_alarm: float) -> float:
    """The threshold a clean model's largest pair statistic exceeds with probability
    ``false_alarm``, from ``maxima``, the largest statistic of each of ``N`` clean models: the
    upper prediction bound of a log-normal, ``exp(m + t * s * sqrt(1 + 1/N))`` with ``m`` and
    ``s`` the mean and standard deviation of ``log(max(statistic, 1))`` and ``t`` Student's
    quantile at ``1 - false_alarm`` with ``N - 1`` degrees of freedom: exact when the log-maxima
    are normal, whatever ``N``, and wider the fewer the models (an empirical quantile would need
    ``N >= 1 / false_alarm``). A depth at most 1 is a find at the boundary, no pocket: it counts
    as 1."""
    from scipy.stats import t as student

    n = len(maxima)
    if n < MIN_SHADOWS:
        raise ValueError(f"the threshold needs at least {MIN_SHADOWS} clean models' statistics, "
                         f"got {n}")
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be a number in (0, 1), got {false_alarm!r}")
    logs = torch.tensor([math.log(max(float(v), 1.0)) for v in maxima], dtype=torch.float64)
    bound = student.ppf(1 - false_alarm, n - 1) * float(logs.std()) * math.sqrt(1 + 1 / n)
    return math.exp(float(logs.mean()) + bound)


def _halves(data, seed: int, index: int):
    """Shadow ``index``'s ``(train, held-out)`` halves of ``data``, drawn with ``seed``."""
    dataset = as_dataset(data)
    gen = torch.Generator().manual_seed(seed * 65537 + index)
    order = torch.randperm(len(dataset), generator=gen).tolist()
    half = len(order) // 2
    return Subset(dataset, order[:half]), Subset(dataset, order[half:])


def _train(factory: Callable[[], nn.Module], data, seed: int, train: Dict[str, float],
           device) -> nn.Module:
    """A fresh ``factory()`` model trained on ``data`` with the ``train`` recipe, seeded."""
    with seeded(seed):
        model = factory().to(device)
    fit(model, make_loader(data, batch_size=int(train["batch_size"]), shuffle=True, seed=seed),
        lambda x, y: (F.cross_entropy(model(x), y), {}), epochs=int(train["epochs"]),
        lr=train["lr"], weight_decay=train["weight_decay"], schedule="constant", seed=seed)
    return model.eval()


def _recipe(shadow_train: Optional[dict]) -> Dict[str, float]:
    """:data:`TRAIN` with ``shadow_train``'s keys over it (unknown keys and bad values refused)."""
    given = dict(shadow_train or {})
    unknown = set(given) - set(TRAIN)
    if unknown:
        raise ValueError(f"shadow_train takes the keys {sorted(TRAIN)}, got {sorted(unknown)}")
    recipe = {**TRAIN, **given}
    check_int("shadow_train['epochs']", recipe["epochs"], 1)
    check_int("shadow_train['batch_size']", recipe["batch_size"], 1)
    check_number("shadow_train['lr']", recipe["lr"], positive=True)
    check_number("shadow_train['weight_decay']", recipe["weight_decay"])
    return recipe


def shadow_maxima(factory: Callable[[], nn.Module], data, *, shadows: int, seed: int,
                  shadow_train: Optional[dict], settings: dict,
                  scan_one: Callable[[nn.Module, object], torch.Tensor], device,
                  progress: bool = False
                  ) -> Tuple[List[torch.Tensor], dict]:
    """``(P, cost)``: the pair statistics ``P`` of ``shadows`` clean models of ``factory()``'s
    architecture, each trained on a random half of ``data`` and scanned on the other half by
    ``scan_one(model, data) -> P`` (the scan's own search, whose ``settings`` key its cache
    entry); ``cost``: ``trained`` and ``scanned`` (how many, now: the rest came from the cache),
    ``train_seconds`` and ``scan_seconds`` (spent now), ``cache`` (the key, or None: data that
    cannot be fingerprinted is not cached). ``progress``: a line per shadow on stderr."""
    check_int("shadows", shadows, MIN_SHADOWS)
    probe = build_model("factory", factory)
    train = _recipe(shadow_train)
    key = shadow_key(probe, data, seed, train)
    scan_key = digest(sorted((k, str(v)) for k, v in settings.items()))
    folder = cache_dir()
    cost = dict(trained=0, scanned=0, train_seconds=0.0, scan_seconds=0.0, cache=key)
    out = []
    for i in range(shadows):
        path = None if key is None else folder / f"{key}-{i}.pt"
        entry, model = _load(path), None
        fit_data, held_out = _halves(data, seed, i)
        if entry is None:
            t0 = time.perf_counter()
            model = _train(factory, fit_data, seed * 65537 + i, train, device)
            entry = dict(state=model.state_dict(), scans={})
            cost["train_seconds"] += time.perf_counter() - t0
            cost["trained"] += 1
        if scan_key not in entry["scans"]:
            if model is None:
                model = factory().to(device)
                model.load_state_dict(entry["state"])
            t0 = time.perf_counter()
            entry["scans"][scan_key] = scan_one(model.eval(), held_out).cpu()
            cost["scan_seconds"] += time.perf_counter() - t0
            cost["scanned"] += 1
            if path is not None:
                folder.mkdir(parents=True, exist_ok=True)
                save_atomic(entry, path)
        if progress:
            print(f"scan: shadow {i + 1}/{shadows} "
                  + ("from the cache" if model is None else "trained and scanned"),
                  file=sys.stderr, flush=True)
        out.append(entry["scans"][scan_key])
    return out, cost


def _load(path: Optional[Path]) -> Optional[dict]:
    """A cached shadow (``state`` and ``scans``), or None when there is none or it cannot be
    read (a file of another torch, or damaged: it is trained again and replaced)."""
    if path is None or not os.path.exists(path):
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable cache file is a miss, never an error
        return None
    return entry if isinstance(entry, dict) and {"state", "scans"} <= set(entry) else None
