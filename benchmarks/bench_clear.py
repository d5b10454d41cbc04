"""CLEAR end to end on the paper's demonstrations: for each seed, a label-flip poisoned model and a
clean one on the Swiss roll (5-layer fully connected network) and on scikit-learn's digits;
``scan`` with its defaults, then ``patch`` on the poisoned model.

    python benchmarks/bench_clear.py               # seeds 0-9 (the defaults were tuned on 100-105)
    python benchmarks/bench_clear.py --seeds 3 --csv clear.csv --json clear.json  # also the rows

Reports, per task: how often the attack worked (the target sample is classified as the target
class), detection at the right target among those, false positives among the clean models, the
target sample's class after patch (and, as a control, after the same fine-tuning on the clean
samples alone), test accuracy before and after patch, and scan time.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

import medic_fast
from medic_fast.zoo.tasks import digits_task, swiss_roll_task
from medic_fast.clear.detect import DEFAULTS

from _harness import add_output_options, write_rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    add_output_options(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"scan defaults: {DEFAULTS}, lr_scale=1e-3, n=50, k=5, restarts=10, threshold=0.5; "
          f"{args.seeds} seeds, {torch.get_num_threads()} thread(s)\n")
    rows = []
    for name, make in (("Swiss roll", swiss_roll_task), ("digits", digits_task)):
        hits = attacks = fp = fixed = fixed_clean_only = 0
        acc_before, acc_after, times = [], [], []
        for seed in range(args.seeds):
            poisoned, clean = make(seed, poisoned=True), make(seed, poisoned=False)
            report = medic_fast.scan(poisoned.model, poisoned.val)
            clean_report = medic_fast.scan(clean.model, clean.val)
            times += [report.timing["total"], clean_report.timing["total"]]
            worked = poisoned.target_class() == poisoned.target
            attacks += worked
            hit = worked and report.flagged and report.target == poisoned.target
            hits += hit
            fp += clean_report.flagged
            patched = medic_fast.patch(poisoned.model, report, poisoned.val)
            after = poisoned.target_class(patched)
            fixed += worked and after == poisoned.source
            # control: the same fine-tuning on the clean samples alone (the paper's baseline)
            none = dataclasses.replace(report, pocket_samples=report.pocket_samples[:0],
                                       pocket_sources=report.pocket_sources[:0])
            control = medic_fast.patch(poisoned.model, none, poisoned.val)
            fixed_clean_only += worked and poisoned.target_class(control) == poisoned.source
            acc_before.append(poisoned.accuracy())
            acc_after.append(poisoned.accuracy(patched))
            print(f"{name} seed {seed}: attack {'ok' if worked else 'failed'} "
                  f"({poisoned.source}->{poisoned.target}), P[s,t]="
                  f"{float(report.P[poisoned.source, poisoned.target]):.1f}, flagged "
                  f"{report.flagged} at {report.target}; clean flagged {clean_report.flagged} "
                  f"(max P {float(clean_report.P.nan_to_num(0).max()):.1f}); after patch the "
                  f"target sample is class {after}", flush=True)
        rows.append(dict(task=name, seeds=args.seeds, attack_worked=attacks, detected=hits,
                         clean_flagged=fp, fixed=fixed, fixed_clean_only=fixed_clean_only,
                         acc_before=statistics.mean(acc_before),
                         acc_after=statistics.mean(acc_after),
                         scan_seconds=statistics.median(times)))
    n = args.seeds
    print("\n| task | attack worked | detected at the target | clean flagged (FP) | "
          "target fixed by patch | ... by clean-only fine-tuning | test acc before -> after "
          "patch | scan time (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        worked = r["attack_worked"]
        print(f"| {r['task']} | {worked}/{n} | {r['detected']}/{worked} | {r['clean_flagged']}/{n} "
              f"| {r['fixed']}/{worked} | {r['fixed_clean_only']}/{worked} | "
              f"{r['acc_before']:.3f} -> {r['acc_after']:.3f} | {r['scan_seconds']:.2f} s |")
    write_rows(rows, "bench_clear", json_path=args.json, csv_path=args.csv)


if __name__ == "__main__":
    main()
