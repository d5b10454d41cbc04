"""CLEAR under the paper's protocol (§5, Tables 1 and 3): for each task x attack x {transfer,
end-to-end} (``medic_fast.zoo.tasks``), one attacked model per seed, with a random attacked sample
and a random target class; and one clean model per seed of each task x form. ``scan`` with both
methods (``"hull"``, the default, and ``"paper"``), then ``patch`` (with the default's report)
against the paper's control, the same fine-tuning on the clean samples alone.

    python benchmarks/bench_clear.py                       # seeds 0-9 (settings tuned on 100-105)
    python benchmarks/bench_clear.py --seeds 2 --tasks swiss_roll --json out.json --csv out.csv
    python benchmarks/bench_clear.py --workers 2           # (task, form) units in 2 processes
    python benchmarks/bench_clear.py --seeds 1 --tasks swiss_roll --figures results  # pictures
    python benchmarks/bench_clear.py --explain results/bench_clear_mlp.json  # why a case failed
    python benchmarks/bench_clear.py --table a.json b.json   # one table from runs over other seeds

Per task x form x attack: how often the attack takes (the sample goes to the target and test
accuracy drops by less than 5 points), detection at the right pair among those for each method
(the scan's best pair is the attacked sample's true class and the target: ``ScanReport.detects``;
a flag at the target from another class is a miss), false alarms among the clean models, the
attacked sample's ASR (still sent to the target) and test accuracy after ``patch`` and after
clean-only fine-tuning, and median scan time per model. Each row also keeps each method's
verdict (flagged, clean or inconclusive)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics

import torch

import medic_fast
from medic_fast.clear.hull import depth
from medic_fast.zoo.tasks import ATTACKS, FORMS, TASKS, make_task

from _harness import add_output_options, write_rows

METHODS = ("hull", "paper")


def _scans(task):
    """Both methods' reports on the task's model."""
    return {m: medic_fast.scan(task.model, task.val, method=m, threads=1) for m in METHODS}


def _figures(t, r, folder):
    """The scans' heatmaps and, for 2-D inputs, the decision regions with the attacked sample and
    the default's pockets (the paper's Fig. 3/5), as PNGs in ``folder``."""
    from medic_fast.clear.plots import decision_regions

    stem = f"{folder}/clear_{t.name.replace('/', '_')}"
    for m in METHODS:
        r[m].plot(f"{stem}_{m}_heatmap.png")
    if t.target_x.flatten(1).shape[1] == 2:
        decision_regions(t.model, *t.val, f"{stem}_regions.png", report=r["hull"],
                         attacked=t.target_x, target=t.target)


def _unit(job):
    """Every seed of one (task, form): the clean models, then each attack's."""
    name, form, seeds, figures = job
    torch.set_num_threads(1)
    out = []
    for seed in seeds:
        clean = make_task(name, form=form, seed=seed, poisoned=False)
        r = _scans(clean)
        out.append(dict(task=name, form=form, attack="clean", seed=seed, took=False,
                        **{f"{m}_flagged": r[m].flagged for m in METHODS},
                        **{f"{m}_verdict": r[m].verdict for m in METHODS},
                        **{f"{m}_max": float(r[m].P.nan_to_num(0).max()) for m in METHODS},
                        **{f"{m}_seconds": r[m].timing["total"] for m in METHODS}))
        print(f"{name}/{form}/clean seed {seed}: flagged "
              + ", ".join(f"{m} {r[m].flagged}" for m in METHODS), flush=True)
    for attack in ATTACKS:
        for seed in seeds:
            t = make_task(name, attack, form, seed=seed)
            r = _scans(t)
            patched = medic_fast.patch(t.model, r["hull"], t.val)
            none = dataclasses.replace(r["hull"], pocket_samples=r["hull"].pocket_samples[:0],
                                       pocket_sources=r["hull"].pocket_sources[:0],
                                       pocket_targets=r["hull"].pocket_targets[:0])
            control = medic_fast.patch(t.model, none, t.val)
            if figures and attack == "label_flip" and seed == seeds[0]:
                _figures(t, r, figures)
            row = dict(task=name, form=form, attack=attack, seed=seed, took=t.took,
                       source=t.source, target=t.target,
                       acc=t.accuracy(), acc_clean_model=t.clean_accuracy,
                       acc_patch=t.accuracy(patched), acc_control=t.accuracy(control),
                       asr_patch=t.target_class(patched) == t.target,
                       asr_control=t.target_class(control) == t.target,
                       **{f"{m}_detected": r[m].detects(t.source, t.target) for m in METHODS},
                       **{f"{m}_flagged": r[m].flagged for m in METHODS},
                       **{f"{m}_verdict": r[m].verdict for m in METHODS},
                       **{f"{m}_pair": float(r[m].P[t.source, t.target]) for m in METHODS},
                       **{f"{m}_seconds": r[m].timing["total"] for m in METHODS})
            out.append(row)
            print(f"{name}/{form}/{attack} seed {seed}: took {t.took}, " + ", ".join(
                f"{m} P[s,t]={row[f'{m}_pair']:.2f} detected {row[f'{m}_detected']}"
                for m in METHODS) + f"; ASR patch {row['asr_patch']} control "
                f"{row['asr_control']}", flush=True)
    return out


def pocket_geometry(t, k: int = 8, points: int = 101) -> dict:
    """Where the attacked sample's pocket lies against what the default search can reach, at the
    model's input: ``d_nn``, its distance to the nearest correctly classified validation sample
    of its class; ``gap``, its distance to the convex hull of its ``k`` nearest such samples (the
    neighbourhood a search would start from), over ``d_nn``; ``reach``, how far the pocket (the
    points classified as the target) extends from the sample towards that hull, over the gap;
    ``depth``, the sample's own depth (:func:`medic_fast.clear.hull.depth`: its distance to the
    nearest validation sample of the target class over that to its own class's)."""
    X, y = t.val
    flat, v = X.flatten(1), t.target_x.flatten(1)[0]
    with torch.no_grad():
        ok = t.model(X).argmax(1) == y
    mine = flat[ok & (y == t.source)]
    d = (mine - v).norm(dim=1)
    hood = mine[d.argsort()[:k]]
    w = torch.zeros(len(hood), requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(500):  # the nearest point of the hull
        loss = ((w.softmax(0) @ hood) - v).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = w.softmax(0) @ hood
        gap = float((p - v).norm())
        a = torch.linspace(0, 1, points)[:, None]
        cls = t.model((v + a * (p - v)).view(-1, *X.shape[1:])).argmax(1)
        out = (cls != t.target).nonzero()
        reach = float(a[out[0]]) if len(out) else 1.0
        own = float(depth(v[None], torch.tensor([t.source]), torch.tensor([t.target]), flat, y))
    return dict(d_nn=float(d.min()), gap=gap / float(d.min()), reach=reach, depth=own)


def explain(path: str) -> None:
    """For every attack that took and the default missed, in a JSON written by this script:
    :func:`pocket_geometry` of its task, rebuilt from its row (the tasks are deterministic)."""
    rows = [r for r in json.load(open(path)) if "seed" in r and r["took"]
            and not r["hull_detected"]]
    print("| task | form | attack | seed | hull P[s,t] | d_nn | gap to the hull / d_nn | "
          "pocket reach / gap | the sample's depth |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = make_task(r["task"], r["attack"], r["form"], seed=r["seed"])
        g = pocket_geometry(t)
        print(f"| {r['task']} | {r['form']} | {r['attack']} | {r['seed']} | "
              f"{r['hull_pair']:.1f} | {g['d_nn']:.3f} | {g['gap']:.2f} | {g['reach']:.2f} | "
              f"{g['depth']:.1f} |",
              flush=True)


def _frac(rows, key):
    return f"{sum(bool(r[key]) for r in rows)}/{len(rows)}"


def table(rows) -> list:
    """Print the markdown table of the per-seed ``rows`` (one line per task x form x attack, in
    the order they appear) and return its lines as summary rows."""
    print("\n| task | form | attack | took | hull: detected | hull: false alarms | paper: "
          "detected | paper: false alarms | ASR after patch | ... clean-only | ACC before -> "
          "patch / clean-only | scan s (hull, paper) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    summary = []
    units = list(dict.fromkeys((r["task"], r["form"]) for r in rows))
    for name, form in units:
        clean = [r for r in rows if (r["task"], r["form"], r["attack"]) == (name, form, "clean")]
        for attack in ATTACKS:
            mine = [r for r in rows if (r["task"], r["form"], r["attack"]) == (name, form, attack)]
            if not mine:
                continue
            took = [r for r in mine if r["took"]]
            secs = {m: statistics.median(r[f"{m}_seconds"] for r in mine + clean)
                    for m in METHODS}

            def acc(key):
                return statistics.mean(r[key] for r in took) if took else float("nan")
            s = dict(task=name, form=form, attack=attack, seeds=len(mine), took=len(took),
                     **{f"{m}_detected": sum(r[f"{m}_detected"] for r in took) for m in METHODS},
                     **{f"{m}_false_alarms": sum(r[f"{m}_flagged"] for r in clean)
                        for m in METHODS},
                     clean_models=len(clean), asr_patch=sum(r["asr_patch"] for r in took),
                     asr_control=sum(r["asr_control"] for r in took), acc=acc("acc"),
                     acc_patch=acc("acc_patch"), acc_control=acc("acc_control"),
                     **{f"{m}_seconds": secs[m] for m in METHODS})
            summary.append(s)
            print(f"| {name} | {form} | {attack} | {len(took)}/{len(mine)} | "
                  f"{_frac(took, 'hull_detected')} | {_frac(clean, 'hull_flagged')} | "
                  f"{_frac(took, 'paper_detected')} | {_frac(clean, 'paper_flagged')} | "
                  f"{_frac(took, 'asr_patch')} | {_frac(took, 'asr_control')} | "
                  f"{s['acc']:.3f} -> {s['acc_patch']:.3f} / {s['acc_control']:.3f} | "
                  f"{secs['hull']:.2f}, {secs['paper']:.2f} |", flush=True)
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    p.add_argument("--figures", default=None, metavar="DIR", help="also draw, for the first "
                   "seed's label flip, the scans' heatmaps and (2-D inputs) the decision regions "
                   "into DIR (needs matplotlib)")
    p.add_argument("--explain", default=None, metavar="JSON", help="instead of a run: for the "
                   "attacks a run (its --json) found to take and the default missed, measure the "
                   "pocket against the hull the search starts from")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON", help="instead of a run: "
                   "the table of the per-seed rows of runs' --json files together (e.g. runs "
                   "over different seeds)")
    add_output_options(p)
    args = p.parse_args()
    if args.explain:
        return explain(args.explain)
    if args.table:
        rows = [r for path in args.table for r in json.load(open(path)) if "seed" in r]
        return write_rows(table(rows) + rows, "bench_clear", json_path=args.json,
                          csv_path=args.csv)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    jobs = [(t, f, seeds, args.figures) for t in args.tasks for f in args.forms]
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            units = pool.map(_unit, jobs, chunksize=1)
    else:
        units = [_unit(j) for j in jobs]
    rows = [r for u in units for r in u]
    write_rows(table(rows) + rows, "bench_clear", json_path=args.json, csv_path=args.csv)


if __name__ == "__main__":
    main()
