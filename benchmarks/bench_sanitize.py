"""Speed of MEDIC clone training (issue "MEDIC end to end", Speed section).

1. One training step of WRN-16-1 (batch 64, 3x32x32, the 25 conv/bn tensors of the released
   recipe hooked), CPU: plain cross-entropy, our step (``medic_fast.Cloner``), and the
   released code's way (input gradients, two backward passes through both networks, per-layer
   eager loss), and ours with the teacher's signals cached (the steps after the first epoch when
   the inputs repeat). Several rounds, each the median of ``--repeats`` interleaved steps on
   fresh random inputs; the ratios are per round, so a busy machine slows all variants alike.
   Targets (issue 9): <= 1.6x plain at 2 threads, released >= 1.8x ours.
2. The demo's wall-clock per phase (``medic-fast demo``).
3. ``paper``: the paper's whole sanitization run (WRN-16-1, 2,500 inputs of 32x32x3, batch 64,
   60 epochs = 2,400 steps) projected from the median steps and a timed statistics pass
   (``medic-fast bench --paper-scale``). Targets: ours <= 1.6x plain, released >= 1.8x ours.

    python benchmarks/bench_sanitize.py [--rounds 5] [--repeats 20] [--threads 2]
                                        [--device cpu|cuda] [--parts steps,demo,paper]
                                        [--json PATH] [--csv PATH]

On a GPU (``--device cuda``) the step part runs there (each step timed to its end); the demo
always runs on CPU.

The step rows (one per backend and round) and the demo rows (one per phase) go to the files.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from medic_fast.zoo.bench import bench_steps, paper_scale
from medic_fast.zoo.demo import run_demo

from _harness import add_output_options, write_rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="independent rounds of the step timing")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--backends", default="auto,reference",
                   help="comma-separated loss backends for our step")
    p.add_argument("--device", default="cpu", help="where the step part runs (cpu or cuda)")
    p.add_argument("--parts", default="steps,demo,paper", help="comma-separated: steps, demo, "
                   "paper")
    add_output_options(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    runs = {backend: [bench_steps(repeats=args.repeats, backend=backend, seed=r,
                                  device=args.device)
                      for r in range(args.rounds)]
            for backend in (args.backends.split(",") if "steps" in parts else [])}
    load = os.getloadavg()[0]
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU, {args.threads} threads")
    if runs:
        print(f"## One training step, WRN-16-1, batch 64, 3x32x32, 25 tensors hooked, {where} "
              f"({args.rounds} rounds x median of {args.repeats}; load average {load:.1f} at "
              f"the end)\n")
        print("| loss backend | plain CE | ours | ours, teacher cached | released-code style | "
              "ours / plain (median, per round) | cached / plain | released / ours |")
        print("|---|---|---|---|---|---|---|---|")
    for backend, rounds in runs.items():
        ms = {k: statistics.median(1e3 * r["seconds"][k] for r in rounds)
              for k in rounds[0]["seconds"]}
        ratios = [round(r["ours_vs_plain"], 3) for r in rounds]
        released = statistics.median(round(r["released_vs_ours"], 3) for r in rounds)
        cached = statistics.median(round(r["cached_vs_plain"], 3) for r in rounds)
        print(f"| {backend} | {ms['plain']:.1f} ms | {ms['ours']:.1f} ms | {ms['cached']:.1f} ms"
              f" | {ms['released']:.1f} ms | **{statistics.median(ratios):.2f}x** "
              f"({', '.join(f'{r:.2f}' for r in ratios)}) | {cached:.2f}x | {released:.2f}x |")
        if "graph_ours_vs_plain" in rounds[0]:
            graph = statistics.median(r["graph_ours_vs_plain"] for r in rounds)
            print(f"| {backend}, captured in a CUDA graph | {ms['plain_graph']:.1f} ms | "
                  f"{ms['ours_graph']:.1f} ms | | | **{graph:.2f}x** | | |")
    step_rows = [{"part": "step", "device": args.device, "backend": backend, "round": i,
                  **{f"{k}_ms": 1e3 * v for k, v in r["seconds"].items()},
                  "ours_vs_plain": r["ours_vs_plain"], "cached_vs_plain": r["cached_vs_plain"],
                  "released_vs_ours": r["released_vs_ours"],
                  "graph_ours_vs_plain": r.get("graph_ours_vs_plain"), "load": load}
                 for backend, rounds in runs.items() for i, r in enumerate(rounds)]
    paper_rows = paper(args.repeats, args.device) if "paper" in parts else []
    write_rows(step_rows + (demo() if "demo" in parts else []) + paper_rows, "bench_sanitize",
               json_path=args.json, csv_path=args.csv)


def demo() -> list:
    """Run the demo (seed 0, CPU), print its table; its rows."""
    result = run_demo(0, progress=False)
    print("\n## The demo (`medic-fast demo`, seed 0, 1 thread)\n")
    print("| phase | seconds | ACC | ASR |")
    print("|---|---|---|---|")
    by_method = {r["method"]: r for r in result["results"]}
    for phase, sec in result["phases"].items():
        r = by_method.get(phase)
        acc = f"{100 * r['acc']:.1f}%" if r else ""
        asr = f"{100 * r['asr']:.1f}%" if r else ""
        print(f"| {phase} | {sec:.2f} | {acc} | {asr} |")
    return [{"part": "demo", "phase": phase, "seconds": sec, "threads": result["threads"],
             **{k: by_method[phase][k] for k in ("acc", "asr") if phase in by_method}}
            for phase, sec in result["phases"].items()]


def paper(repeats: int, device: str) -> list:
    """The paper-scale projection (one round of ``repeats`` steps), printed; its rows."""
    r = paper_scale(repeats=repeats, device=device)
    p = r["paper_scale"]
    print(f"\n## The paper's run projected: {p['inputs']} inputs, batch {p['batch']}, "
          f"{p['epochs']} epochs = {p['steps']} steps, {r['threads']} threads\n")
    print("| variant | step (ms) | whole run (min) | / plain |")
    print("|---|---|---|---|")
    for k, v in p["projected_seconds"].items():
        print(f"| {k} | {1e3 * r['seconds'][k]:.1f} | {v / 60:.1f} | "
              f"{v / p['projected_seconds']['plain']:.2f}x |")
    print(f"\nours and cached include a statistics pass of {p['stats_seconds']:.1f} s; cached "
          f"holds {p['cache_bytes'] / 2 ** 30:.1f} GiB; released / ours "
          f"{p['released_vs_ours']:.2f}x")
    return [{"part": "paper", "variant": k, "step_ms": 1e3 * r["seconds"][k], "run_s": v,
             "stats_s": p["stats_seconds"] if k in ("ours", "cached") else 0.0,
             "threads": r["threads"]}
            for k, v in p["projected_seconds"].items()]


if __name__ == "__main__":
    main()
