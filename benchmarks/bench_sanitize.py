"""Speed of MEDIC clone training (issue "MEDIC end to end", Speed section).

1. One training step of WRN-16-1 (batch 64, 3x32x32, the 25 conv/bn tensors of the released
   recipe hooked), CPU: plain cross-entropy, our step (``medic_fast.sanitize``'s), and the
   released code's way (input gradients, two backward passes through both networks, per-layer
   eager loss). Several rounds, each the median of ``--repeats`` interleaved steps on fresh
   random inputs; the ratios are per round, so a busy machine slows all variants alike.
   Target: ours <= 1.9x plain, clearly faster than released.
2. The demo's wall-clock per phase (``medic-fast demo``).

    python benchmarks/bench_sanitize.py [--rounds 5] [--repeats 20] [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from medic_fast.cli import bench_steps, run_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="independent rounds of the step timing")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--backends", default="auto,reference",
                   help="comma-separated loss backends for our step")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    steps = {}
    for backend in args.backends.split(","):
        rounds = [bench_steps(repeats=args.repeats, backend=backend, seed=r)
                  for r in range(args.rounds)]
        steps[backend] = {
            "ms": {k: statistics.median(1e3 * r["seconds"][k] for r in rounds)
                   for k in rounds[0]["seconds"]},
            "ours_vs_plain": [round(r["ours_vs_plain"], 3) for r in rounds],
            "released_vs_ours": [round(r["released_vs_ours"], 3) for r in rounds],
        }
    load = os.getloadavg()[0]
    demo = run_demo(0, progress=False)
    if args.json:
        print(json.dumps({"threads": args.threads, "load": load, "steps": steps, "demo": demo},
                         indent=2))
        return

    print(f"## One training step, WRN-16-1, batch 64, 3x32x32, 25 tensors hooked, CPU, "
          f"{args.threads} threads ({args.rounds} rounds x median of {args.repeats}; "
          f"load average {load:.1f} at the end)\n")
    print("| loss backend | plain CE | ours | released-code style | ours / plain (median, "
          "per round) | released / ours |")
    print("|---|---|---|---|---|---|")
    for backend, s in steps.items():
        ms, ratios = s["ms"], s["ours_vs_plain"]
        print(f"| {backend} | {ms['plain']:.1f} ms | {ms['ours']:.1f} ms | {ms['released']:.1f} ms"
              f" | **{statistics.median(ratios):.2f}x** ({', '.join(f'{r:.2f}' for r in ratios)})"
              f" | {statistics.median(s['released_vs_ours']):.2f}x |")
    print("\n## The demo (`medic-fast demo`, seed 0, 1 thread)\n")
    print("| phase | seconds | ACC | ASR |")
    print("|---|---|---|---|")
    rows = {r["method"]: r for r in demo["results"]}
    for phase, sec in demo["phases"].items():
        r = rows.get(phase)
        acc = f"{100 * r['acc']:.1f}%" if r else ""
        asr = f"{100 * r['asr']:.1f}%" if r else ""
        print(f"| {phase} | {sec:.2f} | {acc} | {asr} |")


if __name__ == "__main__":
    main()
