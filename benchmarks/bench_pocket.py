"""Wall-clock of CLEAR's full pocket search: one search at a time (how the paper times it), the
batched PyTorch reference, the extension, and the floor (the head's matrix work at the GEMM rate
measured in the same run).

    python benchmarks/bench_pocket.py            # C=10 (900 problems), MLP and conv heads, C=100
    python benchmarks/bench_pocket.py --quick    # fewer repeats
    python benchmarks/bench_pocket.py --device cuda --singles 2   # on a GPU
    python benchmarks/bench_pocket.py --csv pocket.csv --json pocket.json   # also the rows

Problems: C(C-1) ordered class pairs x R restarts, k anchors each, `steps` SGD steps. "no early
exit" makes every problem run every step (margin = inf, no box), which is what the floor and the
issue's reference figures assume. (With early exit the work shrinks as problems leave; the
scan timings in bench_clear.py show that case.) The extension's final anchors and stopping steps
are compared with the reference's; ``mismatch`` in a row (and exit status 1) means they differ.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from medic_fast.ops.pocket_search import pocket_search

from _harness import (ConvHead, add_output_options, gemm_gflops, head_flops, median_ms, mlp_head,
                      pocket_problems, write_rows)


# The batched searches, by the names of the tables in RESULTS.md: name -> pocket_search backend.
BACKENDS = {"reference": "reference", "extension": "auto"}


def timeit(fn, repeats, device, warmup=1) -> float:
    """Median seconds of ``fn`` (``median_ms``, in seconds)."""
    return median_ms(fn, repeats, warmup, device=device) / 1e3


def lead(z, label):
    """Logit of ``label`` minus the best other logit."""
    others = z.clone()
    others[..., label] = -math.inf
    return z[..., label] - others.amax(-1)


def one_search(anchors, head, ls, lt, alpha, lr, steps, lo, hi, margin):
    """One problem on its own, the way a per-search implementation runs it: autograd and
    torch.optim.SGD on k anchors, testing before every step."""
    P = anchors.clone().requires_grad_(True)
    opt = torch.optim.SGD([P], lr=lr)
    k = len(P)
    for s in range(steps + 1):
        c = P.mean(0)
        z = head(torch.cat([P, c[None]]))
        with torch.no_grad():
            found = bool((lead(z[:k], ls) > margin).all()) and bool(lead(z[k], lt) > margin)
            if not ((c >= lo) & (c <= hi)).all() or found or s == steps:
                return s
        loss = (F.cross_entropy(z[:k], torch.full((k,), ls, device=P.device))
                + F.cross_entropy(z[k:], torch.tensor([lt], device=P.device))
                + alpha / k * (P - c).pow(2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps


def run(name, head, feat, classes, restarts, k, steps, repeats, singles, backends, device):
    """Time the search of one head and print its table; returns the table's rows (``mismatch``
    in each when the extension's search differs from the reference's)."""
    n = len(pocket_problems(classes, restarts, k, feat)[1])
    # The GEMM rate: the best of the head's full-batch shapes and a 2048^3 product.
    shapes = [(n * (k + 1), m.in_features, m.out_features) for m in head.modules()
              if isinstance(m, torch.nn.Linear)] + [(2048, 2048, 2048)]
    rate = gemm_gflops(shapes, repeats * 5, device)
    anchors, src, tgt = pocket_problems(classes, restarts, k, feat, device=device)
    q = len(src)
    kw = dict(alpha=1.0, lr=0.01, steps=steps, lo=-math.inf, hi=math.inf, margin=math.inf)
    rows = {}
    if singles:
        t = timeit(lambda: [one_search(anchors[i], head, int(src[i]), int(tgt[i]), **kw)
                            for i in range(singles)], 1, device) / singles
        rows["one search at a time"] = (t * q, f"{t * 1e3:.0f} ms per search x {q}")
    results = {}
    for method in backends:
        def go():
            results[method] = pocket_search(anchors, head, src, tgt, backend=BACKENDS[method],
                                            **kw)
        rows[f"batched {method}"] = (timeit(go, repeats, device), "")
    res = results.get("extension") or results.get("reference")
    assert bool((res.stopped_at == steps).all())
    floor = q * steps * (k + 1) * 2 * head_flops(head, feat) / (rate * 1e9)
    rows["floor (matrix work at GEMM rate)"] = (floor, f"GEMM {rate:.0f} GFLOP/s")
    diff, mismatch = None, False
    if {"extension", "reference"} <= results.keys():
        ext_, ref_ = results["extension"], results["reference"]
        diff = float((ext_.anchors - ref_.anchors).abs().max())
        mismatch = not (diff < 1e-3 and torch.equal(ext_.stopped_at, ref_.stopped_at))
        print(f"  max |extension - reference| over the final anchors: {diff:.2e}"
              f"{'  MISMATCH' if mismatch else ''}")
    print(f"\n### {name}: C={classes}, R={restarts}, k={k}, {q} problems, {steps} steps\n")
    print("| method | wall-clock (s) | vs extension | note |\n|---|---:|---:|---|")
    ext = rows.get("batched extension", (None,))[0]
    for label, (t, note) in rows.items():
        ratio = f"{t / ext:.2f}x" if ext else ""
        print(f"| {label} | {t:.3f} | {ratio} | {note} |")
    return [{"case": name, "device": str(device), "classes": classes, "restarts": restarts,
             "k": k, "problems": q, "steps": steps, "method": label, "seconds": t,
             "vs_extension": t / ext if ext else None, "note": note, "gemm_gflops": rate,
             "max_abs_diff": diff, "mismatch": mismatch}
            for label, (t, note) in rows.items()]


CASES = ("mlp", "conv", "mlp100", "small")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--cases", default="mlp,conv,mlp100", help=f"comma-separated, of {CASES}")
    p.add_argument("--quick", action="store_true", help="one repeat instead of three")
    p.add_argument("--singles", type=int, default=None,
                   help="searches timed one at a time per case (default 10, 5 for conv)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_output_options(p)
    args = p.parse_args(argv)
    repeats = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} thread(s); the GEMM rate "
          "is the best torch.mm rate of the head's shapes and 2048^3, measured before each case")
    both = ("reference", "extension")
    rows = []
    for case in args.cases.split(","):
        if case == "mlp":
            rows += run("MLP head 256-128-10", mlp_head([256, 128, 10], device), (256,), 10, 10,
                        5, 200, repeats, _singles(args, 10), both, device)
        elif case == "conv":
            conv = ConvHead(10).to(device).eval().requires_grad_(False)
            rows += run("conv head", conv, (8, 6, 6), 10, 10, 5, 200, repeats, _singles(args, 5),
                        both, device)
        elif case == "mlp100":
            rows += run("MLP head 256-128-100", mlp_head([256, 128, 100], device), (256,), 100, 1,
                        5, 200, 1, _singles(args, 10), ("extension",), device)
        elif case == "small":
            rows += run("MLP head 32-16-4", mlp_head([32, 16, 4], device), (32,), 4, 2, 3, 20,
                        repeats, _singles(args, 2), both, device)
        else:
            p.error(f"unknown case {case!r}; one of {CASES}")
    write_rows(rows, "bench_pocket", json_path=args.json, csv_path=args.csv)
    if any(r["mismatch"] for r in rows):
        print("bench_pocket: MISMATCH between the extension and the reference", file=sys.stderr)
        return 1
    return 0


def _singles(args, default: int) -> int:
    return default if args.singles is None else args.singles


if __name__ == "__main__":
    sys.exit(main())
