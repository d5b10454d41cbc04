"""The false-alarm rate shadow calibration promises against the one it gets, on the zoo's Swiss
roll (benchmarks/RESULTS.md §4, "Shadow calibration"): per seed, a clean model and a label-flip
model (random sample and target, :func:`~medic_fast.zoo.attacks.draw_victim`), both scanned on
the seed's clean validation split with ``shadows`` shadows (trained afresh: never the models
scanned) and with the fixed threshold. One JSON line per model, then the totals; ``--json`` /
``--csv`` write the per-model rows.

    python benchmarks/bench_shadows.py --seeds 300 301 --form end2end --shadows 5 [--json PATH]
"""
from __future__ import annotations

import argparse
import json

import torch

import medic_fast
from _harness import add_output_options, write_rows


def main(argv=None) -> None:
    from medic_fast.zoo.tasks import FORMS, TASKS, make_task

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--form", choices=FORMS, default="end2end")
    p.add_argument("--shadows", type=int, default=5)
    p.add_argument("--false-alarm", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    add_output_options(p)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    totals = dict(clean=0, shadow_alarms=0, fixed_alarms=0, took=0, shadow_detected=0,
                  fixed_detected=0)
    for seed in a.seeds:
        for poisoned in (False, True):
            t = make_task("swiss_roll", "label_flip", a.form, seed=seed, poisoned=poisoned)
            cal = medic_fast.scan(t.model, t.val, shadows=a.shadows, factory=TASKS[
                "swiss_roll"].model, false_alarm=a.false_alarm, threads=a.threads)
            fixed = medic_fast.scan(t.model, t.val, threads=a.threads)
            row = dict(seed=seed, poisoned=poisoned, took=t.took, threshold=cal.threshold,
                       maxima=cal.calibration["maxima"], largest=float(cal.P.nan_to_num(0).max()),
                       shadow_seconds=cal.timing["shadows"], trained=cal.calibration["trained"])
            if poisoned:
                row.update(pair=float(cal.P[t.source, t.target]),
                           shadow=cal.detects(t.source, t.target),
                           fixed=fixed.detects(t.source, t.target))
                totals["took"] += t.took
                totals["shadow_detected"] += t.took and row["shadow"]
                totals["fixed_detected"] += t.took and row["fixed"]
            else:
                row.update(shadow=cal.flagged, fixed=fixed.flagged)
                totals["clean"] += 1
                totals["shadow_alarms"] += cal.flagged
                totals["fixed_alarms"] += fixed.flagged
            print(json.dumps(row), flush=True)
            rows.append({**row, "maxima": " ".join(f"{m:.4g}" for m in row["maxima"])})
    write_rows(rows, "bench_shadows", json_path=a.json, csv_path=a.csv)
    print(json.dumps(dict(totals, promised=a.false_alarm, form=a.form, shadows=a.shadows)))


if __name__ == "__main__":
    main()
