"""The defence table (issue "MEDIC that holds up"), in the shape of the MEDIC paper's Table 1:
attacks as rows, defences as columns, each cell ACC / ASR of the defended model, on
scikit-learn's digits with the digits CNN and a ResNet-8, at 2%, 5% and 10% clean data.

For each net, attack and seed: a stratified 70/30 split (train / test); a random target class;
the trojan trained from scratch on the poisoned training split (30 epochs); the defender's clean
set a random ``fraction`` of the clean training split. Every defence runs with its library
defaults, except that the ones that train a fresh network (MEDIC, plain cloning, distillation,
from scratch) all get MEDIC's step budget (``recipes.training_epochs``), so none wins by
training longer. ACC on the clean test split; ASR on its non-target samples with the trigger.

    python benchmarks/bench_defences.py [--nets cnn,resnet] [--attacks badnets,blend,...]
        [--fractions 0.02,0.05,0.1] [--seeds 0,1,2] [--defences medic,clone,...]
        [--workers 2] [--plot defences.png] [--json PATH] [--csv PATH] [--smoke]

Jobs (net x attack x seed) run in ``--workers`` processes of one torch thread each. The
seconds per defence are wall-clock with that many jobs sharing the machine.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from collections import defaultdict

import torch

import medic_fast as mf
from medic_fast import data
from medic_fast.medic import recipes
from medic_fast.train import seeded
from medic_fast.zoo import attacks, datasets, defences, models

from _harness import add_output_options, write_rows

NETS = {"cnn": models.DigitsCNN, "resnet": models.digits_resnet}
ATTACKS = ("badnets", "blend", "sig", "wanet", "lc")
DEFENCES = ("medic", "clone", "kd", "finetune", "scratch", "fineprune", "nad")
TROJAN_EPOCHS = 30


def _attack(name: str, seed: int, train):
    """The attack and its poison rate (a fraction of the training split)."""
    if name == "badnets":
        return attacks.BadNets(3), 0.1
    if name == "blend":
        return attacks.Blend(0.2, seed=seed), 0.1
    if name == "sig":
        return attacks.SIG(), 0.1  # clean-label: every target-class row it can take
    if name == "wanet":
        return attacks.WaNet(seed=seed), 0.1
    if name == "lc":  # clean-label; PGD against a clean surrogate trained on the same split
        surrogate = mf.train_from_scratch(models.DigitsCNN(), train, epochs=10, seed=seed,
                                          progress=False).model
        return attacks.LabelConsistent(surrogate), 0.05
    raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")


# Fine-Pruning prunes the last conv layer; in the ResNet the last registered conv is a 1x1
# shortcut, so name the last 3x3 conv of the main path instead.
PRUNE_LAYER = {"cnn": None, "resnet": "layer3.0.conv2"}


def _options(text: str) -> dict:
    """``"tau=20;min_steps=500;stats=neuron"`` -> ``{"tau": 20.0, "min_steps": 500,
    "stats": "neuron"}``; a value with ``|`` is a list of strings
    (``layers=features.3|features.4``)."""
    out = {}
    for item in filter(None, text.split(";")):
        key, _, value = item.partition("=")
        if "|" in value:
            out[key] = value.split("|")
            continue
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            out[key] = value
    return out


def _defend(spec: str, net: str, trojan, clean, epochs: int, seed: int):
    """Run the defence ``spec``: a name of :data:`DEFENCES`, or a variant for tuning with the
    library function's options in brackets, e.g. ``medic[tau=20;min_steps=500]`` or
    ``finetune[lr=0.01]``."""
    name, _, opts = spec.partition("[")
    kw = dict(seed=seed, progress=False, **_options(opts.rstrip("]")))
    fresh = {} if name in ("medic", "clone", "finetune", "fineprune", "nad") else \
        {"epochs": epochs}  # distillation and from scratch get MEDIC's step budget
    kw = {**fresh, **kw}
    if name == "medic":
        return mf.sanitize(trojan, clean, **kw).model
    if name == "clone":
        return mf.sanitize(trojan, clean, **{"tau": 0.0, **kw}).model
    if name == "kd":
        return defences.distill(trojan, clean, **kw).model
    if name == "scratch":
        return mf.train_from_scratch(trojan, clean, **kw).model
    if name == "finetune":
        return mf.finetune(trojan, clean, **kw).model
    if name == "fineprune":
        return defences.fine_prune(trojan, clean, **{"layer": PRUNE_LAYER[net], **kw}).model
    if name == "nad":
        return defences.nad(trojan, clean, **kw).model
    raise ValueError(f"unknown defence {spec!r}; choose from {DEFENCES}, with options in "
                     "brackets")


def run_job(job) -> list:
    """All rows of one net x attack x seed: the trojan, then each defence at each fraction."""
    net, attack_name, seed, fractions, names, trojan_epochs = job
    torch.set_num_threads(1)
    X, y = datasets.load_digits()
    (Xtr, ytr), (Xte, yte) = data.split(X, y, [0.7, 0.3], seed=seed)
    target = int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(seed)))
    attack, rate = _attack(attack_name, seed, (Xtr, ytr))
    poisoned = attack.poison(Xtr, ytr, rate, target, seed)
    base = dict(net=net, attack=attack_name, seed=seed, target=target,
                poisoned=len(poisoned.index))
    t0 = time.perf_counter()
    with seeded(seed):
        fresh = NETS[net]()
    trojan = mf.train_from_scratch(fresh, (poisoned.X, poisoned.y), epochs=trojan_epochs,
                                   seed=seed, progress=False).model
    ev = dict(trigger=attack, target=target)
    rows = [{**base, "fraction": 0.0, "clean": 0, "defence": "trojan",
             **mf.evaluate(trojan, Xte, yte, **ev), "seconds": time.perf_counter() - t0}]
    for f in fractions:
        pick = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1000 + seed))
        idx = pick[:round(f * len(ytr))]
        clean = (Xtr[idx], ytr[idx])
        r = recipes.RECIPES["default"]
        epochs = recipes.training_epochs(r["epochs"], r["min_steps"],
                                         -(-len(idx) // r["batch_size"]))
        for name in names:
            t0 = time.perf_counter()
            model = _defend(name, net, trojan, clean, epochs, seed)
            rows.append({**base, "fraction": f, "clean": len(idx), "defence": name,
                         **mf.evaluate(model, Xte, yte, **ev),
                         "seconds": time.perf_counter() - t0})
    return rows


def _mean(rows, key):
    return 100 * statistics.mean(r[key] for r in rows)


def table(rows, names) -> str:
    """Markdown: per net and fraction, attacks x (trojan, defences), mean ACC / ASR over seeds."""
    cells = defaultdict(list)
    for r in rows:
        cells[(r["net"], r["fraction"], r["attack"], r["defence"])].append(r)
    trojans = {(r["net"], r["attack"]): [] for r in rows}
    for r in rows:
        if r["defence"] == "trojan":
            trojans[(r["net"], r["attack"])].append(r)
    out = []
    nets = sorted({r["net"] for r in rows})
    fractions = sorted({r["fraction"] for r in rows} - {0.0})
    attacks_seen = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    for net in nets:
        for f in fractions:
            seeds = sorted({r["seed"] for r in rows if r["net"] == net})
            out.append(f"\n#### {net}, {f:.0%} clean data (ACC / ASR %, mean of seeds "
                       f"{', '.join(map(str, seeds))})\n")
            out.append("| attack | trojan | " + " | ".join(names) + " |")
            out.append("|---" * (len(names) + 2) + "|")
            for a in attacks_seen:
                t = trojans.get((net, a), [])
                line = [a, f"{_mean(t, 'acc'):.1f} / {_mean(t, 'asr'):.1f}" if t else "-"]
                for d in names:
                    c = cells.get((net, f, a, d))
                    line.append(f"{_mean(c, 'acc'):.1f} / {_mean(c, 'asr'):.1f}" if c else "-")
                out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def took(rows) -> list:
    """The rows of the net x attack x seed cases whose trojan has ASR >= 50% (where the attack
    took; SIG on digits mostly does not)."""
    ok = {(r["net"], r["attack"], r["seed"]) for r in rows
          if r["defence"] == "trojan" and r["asr"] >= 0.5}
    return [r for r in rows if (r["net"], r["attack"], r["seed"]) in ok]


def plot(rows, names, path) -> None:
    """ACC and ASR against the clean fraction, one line per defence (mean over the attacks and
    seeds where the attack took), one row of panels per net."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install -e \".[plot]\"")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = took(rows)
    nets = sorted({r["net"] for r in rows})
    fractions = sorted({r["fraction"] for r in rows} - {0.0})
    fig, axes = plt.subplots(len(nets), 2, figsize=(10, 3.6 * len(nets)), squeeze=False)
    for i, net in enumerate(nets):
        for j, key in enumerate(("acc", "asr")):
            ax = axes[i][j]
            for d in names:
                ys = [_mean([r for r in rows if r["net"] == net and r["fraction"] == f
                             and r["defence"] == d], key) for f in fractions]
                ax.plot([100 * f for f in fractions], ys, marker="o", label=d)
            teacher = [r for r in rows if r["net"] == net and r["defence"] == "trojan"]
            ax.axhline(_mean(teacher, key), color="k", ls="--", lw=1, label="trojan")
            ax.set(xlabel="clean data (% of the training split)", ylabel=f"{key.upper()} (%)",
                   title=f"{net}: {key.upper()}, mean where the attack took")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nets", default="cnn,resnet", help=f"comma-separated, of {tuple(NETS)}")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {ATTACKS}")
    p.add_argument("--fractions", default="0.02,0.05,0.1", help="clean fractions of the "
                   "training split")
    p.add_argument("--seeds", default="0,1,2", help="evaluation seeds (tuning used 100-102)")
    p.add_argument("--defences", default=",".join(DEFENCES), help=f"of {DEFENCES}, or variants "
                   "for tuning with options in brackets: medic[tau=20;min_steps=500], lists "
                   "with |: medic[layers=features.3|features.4]")
    p.add_argument("--workers", type=int, default=2, help="parallel jobs (one thread each)")
    p.add_argument("--trojan-epochs", type=int, default=TROJAN_EPOCHS)
    p.add_argument("--plot", default=None, metavar="PNG", help="ACC and ASR against the clean "
                   "fraction (needs matplotlib: the [plot] extra)")
    p.add_argument("--smoke", action="store_true", help="one tiny job, to check the script")
    add_output_options(p)
    args = p.parse_args(argv)
    names = args.defences.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    jobs = [(n, a, int(s), fractions, names, args.trojan_epochs) for n in args.nets.split(",")
            for a in args.attacks.split(",") for s in args.seeds.split(",")]
    if args.smoke:
        jobs = [("cnn", "badnets", 0, [0.02], names, 1)]
    rows = []
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(max(1, args.workers)) as pool:
        for i, job_rows in enumerate(pool.imap_unordered(run_job, jobs)):
            rows += job_rows
            r = job_rows[0]
            print(f"[{i + 1}/{len(jobs)}] {r['net']} {r['attack']} seed {r['seed']}: trojan "
                  f"ACC {100 * r['acc']:.1f} ASR {100 * r['asr']:.1f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(table(rows, names))
    if args.plot:
        plot(rows, names, args.plot)
    write_rows(rows, "bench_defences", json_path=args.json, csv_path=args.csv)


if __name__ == "__main__":
    main()
