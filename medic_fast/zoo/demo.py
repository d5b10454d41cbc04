"""The digits demo behind ``medic-fast demo``: a trojaned CNN, then MEDIC, plain cloning (MEDIC
without importance, tau=0), fine-tuning and training from scratch on a small clean split
(``benchmarks/bench_sanitize.py`` times it too)."""
from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional

import torch

import medic_fast as mf
from medic_fast import data
from medic_fast.medic.recipes import RECIPES, training_epochs
from medic_fast.zoo import attacks, datasets, models

__all__ = ["DEMO_SETTINGS", "ATTACKS", "run_demo"]

ATTACKS = {"badnets": lambda seed: attacks.BadNets(size=3),
           "blend": lambda seed: attacks.Blend(0.2, seed=seed)}

# The demo's own settings (the trojan's), chosen on seeds 0-4 (benchmarks/RESULTS.md §2): digits
# split 60/10/30 (trojan training / clean defence set / test), 10% of the training set poisoned,
# target class 0. MEDIC's settings are the library's defaults (medic_fast.medic.recipes); the
# baselines that train a fresh network get MEDIC's step budget.
DEMO_SETTINGS = {
    "split": [0.6, 0.1, 0.3], "attack": "blend", "poison_rate": 0.1, "target": 0,
    "channels": [16, 32, 32], "trojan_epochs": 15, "trojan_lr": 0.01, "finetune_lr": 1e-3,
    **{k: RECIPES["default"][k] for k in ("tau", "lam", "lr", "batch_size", "epochs",
                                          "min_steps")},
}

# One line each, printed under the demo's table.
DEFINITIONS = {"ACC": "accuracy on the clean test split",
               "ASR": "attack success rate: the share of test samples not of the target class "
                      "that the model sends to the target once the trigger is stamped on them"}


def run_demo(seed: int = 0, progress: bool = True, settings: Optional[dict] = None,
             threads: Optional[int] = 1) -> dict:
    """The digits demo: train a CNN trojaned by ``DEMO_SETTINGS["attack"]`` (Blend), then MEDIC,
    plain cloning, fine-tuning and training from scratch on the 10% clean split; returns the
    settings, one row per method (ACC, ASR, seconds) and the wall-clock per phase
    (``"extension"``: building or loading the C++ extension, before the rest). Deterministic
    given ``seed`` (timings aside).

    ``threads``: torch intra-op threads for the run (restored after; None: leave as is). The
    models are tiny, so one thread is as fast as several on an idle machine and much faster on a
    busy one (no threads spinning at barriers while others hold the cores).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _demo(seed, progress, {**DEMO_SETTINGS, **(settings or {})})
    finally:
        torch.set_num_threads(previous)


def _warm_extension(tau: float) -> None:
    """Build (on the first run; the build says so on stderr) and load the C++ extension, and run
    the fused loss once, so no method's seconds include it. Draws no random numbers."""
    x = torch.linspace(-1, 1, 72).view(2, 4, 3, 3)
    clone = x.flip(0).requires_grad_(True)
    stats = x.mean((0, 2, 3)), x.std((0, 2, 3))
    mf.importance_clone_loss(x, clone, x, *stats, tau=tau).backward()


def _demo(seed: int, progress: bool, s: dict) -> dict:
    t_all = time.perf_counter()
    _warm_extension(s["tau"])
    phases: Dict[str, float] = {"extension": time.perf_counter() - t_all}
    t_data = time.perf_counter()
    X, y = datasets.load_digits()
    (Xtr, ytr), (Xc, yc), (Xte, yte) = data.split(X, y, s["split"], seed=seed)
    attack = ATTACKS[s["attack"]](seed)
    poisoned = attack.poison(Xtr, ytr, s["poison_rate"], s["target"], seed)
    ev = dict(trigger=attack, target=s["target"])
    epochs = training_epochs(s["epochs"], s["min_steps"], -(-len(yc) // s["batch_size"]))
    common = dict(epochs=epochs, batch_size=s["batch_size"], seed=seed)
    rows: List[dict] = []
    phases["data"] = time.perf_counter() - t_data

    def run(name, fn):
        """Phase ``name``: ``fn(progress)`` trains its model, the progress labelled ``name``."""
        if progress:
            print(f"[{len(rows) + 1}/5] {name}", file=sys.stderr)
        t0 = time.perf_counter()
        model = fn(progress and name).model
        phases[name] = time.perf_counter() - t0
        rows.append({"method": name, **mf.evaluate(model, Xte, yte, **ev),
                     "seconds": phases[name]})
        return model

    trojan = run("trojaned", lambda bar: mf.train_from_scratch(
        models.DigitsCNN(s["channels"]), (poisoned.X, poisoned.y), epochs=s["trojan_epochs"],
        lr=s["trojan_lr"], batch_size=s["batch_size"], seed=seed, progress=bar))
    clean = (Xc, yc)
    for name, tau in (("medic", s["tau"]), ("plain cloning", 0.0)):
        run(name, lambda bar: mf.sanitize(trojan, clean, tau=tau, lam=s["lam"], lr=s["lr"],
                                          progress=bar, **common))
    run("finetune", lambda bar: mf.finetune(trojan, clean, lr=s["finetune_lr"], progress=bar,
                                            **common))
    run("scratch", lambda bar: mf.train_from_scratch(trojan, clean, lr=s["lr"], progress=bar,
                                                     **common))
    phases["total"] = time.perf_counter() - t_all
    return {"seed": seed, "settings": s, "samples": {"trojan_train": len(ytr), "clean": len(yc),
                                                    "test": len(yte),
                                                    "poisoned": len(poisoned.index)},
            "results": rows, "phases": phases, "threads": torch.get_num_threads()}
