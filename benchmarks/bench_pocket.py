"""Wall-clock of CLEAR's full pocket search: one search at a time (how the paper times it), the
batched PyTorch reference, the extension, and the floor (the head's matrix work at the GEMM rate
measured in the same run).

    python benchmarks/bench_pocket.py            # C=10 (900 problems), MLP and conv heads, C=100
    python benchmarks/bench_pocket.py --quick    # fewer repeats
    python benchmarks/bench_pocket.py --csv pocket.csv --json pocket.json   # also the rows

Problems: C(C-1) ordered class pairs x R restarts, k anchors each, `steps` SGD steps. "no early
exit" makes every problem run every step (margin = inf, no box), which is what the floor and the
issue's reference figures assume. (With early exit the work shrinks as problems leave; the
scan timings in bench_clear.py show that case.)
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from medic_fast.ops.pocket_search import pocket_search

from _harness import add_output_options, median_ms, write_rows


# The batched searches, by the names of the tables in RESULTS.md: name -> pocket_search backend.
BACKENDS = {"reference": "reference", "extension": "cpp"}


def mlp_head(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).eval().requires_grad_(False)


class ConvHead(nn.Module):
    """conv 8->16 3x3 on 6x6, ReLU, 2x2 max-pool, Linear 144 -> classes."""

    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 3 * 3, classes)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def head_flops(head, feat) -> float:
    """Multiply-adds x 2 of one forward of one feature vector (Linear and Conv2d layers)."""
    flops, shape = 0.0, feat
    for m in head.modules():
        if isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            hw = shape[1] * shape[2]
            flops += 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * hw
    return flops


def gemm_rate(repeats) -> float:
    """GFLOP/s of torch.mm: the best of the MLP head's full-batch shapes (5400 x 256 x 128 and
    its input-gradient) and a 2048^3 product, so that the floor is the machine's GEMM rate."""
    best = 0.0
    for m, k, n in ((5400, 256, 128), (5400, 128, 256), (2048, 2048, 2048)):
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        t = timeit(lambda: torch.mm(a, b, out=out), repeats * 5)
        best = max(best, 2 * m * k * n / t / 1e9)
    return best


def timeit(fn, repeats, warmup=1) -> float:
    """Median seconds of ``fn`` (``median_ms``, in seconds)."""
    return median_ms(fn, repeats, warmup) / 1e3


def problems(classes, restarts, k, feat, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(classes).repeat_interleave((classes - 1) * restarts)
    tgt = torch.tensor([t for s in range(classes) for t in range(classes) if t != s]
                       ).repeat_interleave(restarts)
    return torch.rand(len(src), k, *feat, generator=g) * 2, src, tgt


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
        loss = (F.cross_entropy(z[:k], torch.full((k,), ls))
                + F.cross_entropy(z[k:], torch.tensor([lt])) + alpha / k * (P - c).pow(2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps


def run(name, head, feat, classes, restarts, k, steps, repeats, singles, backends):
    """Time the search of one head and print its table; returns the table's rows."""
    rate = gemm_rate(repeats)
    anchors, src, tgt = problems(classes, restarts, k, feat)
    q = len(src)
    kw = dict(alpha=1.0, lr=0.01, steps=steps, lo=-math.inf, hi=math.inf, margin=math.inf)
    rows = {}
    if singles:
        t = timeit(lambda: [one_search(anchors[i], head, int(src[i]), int(tgt[i]), **kw)
                            for i in range(singles)], 1) / singles
        rows["one search at a time"] = (t * q, f"{t * 1e3:.0f} ms per search x {q}")
    results = {}
    for method in backends:
        def go():
            results[method] = pocket_search(anchors, head, src, tgt, backend=BACKENDS[method],
                                            **kw)
        rows[f"batched {method}"] = (timeit(go, repeats), "")
    res = results.get("extension") or results.get("reference")
    assert bool((res.stopped_at == steps).all())
    floor = q * steps * (k + 1) * 2 * head_flops(head, feat) / (rate * 1e9)
    rows["floor (matrix work at GEMM rate)"] = (floor, f"GEMM {rate:.0f} GFLOP/s")
    if {"extension", "reference"} <= results.keys():
        diff = (results["extension"].anchors - results["reference"].anchors).abs().max()
        print(f"  max |extension - reference| over the final anchors: {float(diff):.2e}")
    print(f"\n### {name}: C={classes}, R={restarts}, k={k}, {q} problems, {steps} steps\n")
    print("| method | wall-clock (s) | vs extension | note |\n|---|---:|---:|---|")
    ext = rows.get("batched extension", (None,))[0]
    for label, (t, note) in rows.items():
        ratio = f"{t / ext:.2f}x" if ext else ""
        print(f"| {label} | {t:.3f} | {ratio} | {note} |")
    return [{"case": name, "classes": classes, "restarts": restarts, "k": k, "problems": q,
             "steps": steps, "method": label, "seconds": t,
             "vs_extension": t / ext if ext else None, "note": note}
            for label, (t, note) in rows.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one repeat instead of three")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_output_options(p)
    args = p.parse_args()
    repeats = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); the GEMM rate is "
          "the best torch.mm rate of the MLP's shapes and 2048^3, measured before each case")
    both = ("reference", "extension")
    mlp = mlp_head([256, 128, 10])
    rows = run("MLP head 256-128-10", mlp, (256,), 10, 10, 5, 200, repeats, 10, both)
    conv = ConvHead(10).eval().requires_grad_(False)
    rows += run("conv head", conv, (8, 6, 6), 10, 10, 5, 200, repeats, 5, both)
    big = mlp_head([256, 128, 100])
    rows += run("MLP head 256-128-100", big, (256,), 100, 1, 5, 200, 1, 10, ("extension",))
    write_rows(rows, "bench_pocket", json_path=args.json, csv_path=args.csv)


if __name__ == "__main__":
    main()
