"""Speed of the importance clone loss: eager reference, torch.compile(reference), fused backend.

    python benchmarks/bench_loss.py [--device cpu|cuda] [--repeat 30] [--cases rows64,rows128,wrn]
                                    [--dtypes float32,bfloat16] [--passes fwd,fwd+bwd]
                                    [--csv out.csv] [--json out.json]

Prints, per case, dtype and pass (forward, forward+backward): median time, ratio to eager and to
torch.compile, achieved GB/s (the bytes the op must move: read t, g, c, and write dc with the
backward: 3E or 4E bytes per element of E bytes), that as a fraction of the copy bandwidth
measured in the same run, the fused time at tau=0 (the same kernel without exponentials: the
difference gives the exp throughput achieved in situ), and the peak extra memory as a multiple of
the size of acts_c (the gradient included) for each of the three. The floor of DESIGN.md §1 per
case is printed too: the larger of bytes / copy bandwidth and, on CPU, (2 exponentials per
element) / (our exp throughput in situ).

Before timing, each case's fused loss and gradient are compared with the reference in float64;
``mismatch`` in a row (and exit status 1) means they differ by more than the dtype allows.
Cases (``_harness.LOSS_CASES``): rows64, rows128, wrn (issue 2), tokens ([8, 1024, 4096],
start_dim=2), and small ones for dry runs.
"""
from __future__ import annotations

import argparse
import sys

import torch

from _harness import (LOSS_CASES, add_output_options, copy_gbs, loss_case, loss_step, median_ms,
                      peak_extra_bytes, rel_error, write_rows)

# ||fused - float64 reference|| / ||reference|| allowed, per input dtype (loss and gradient).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2,
             torch.float16: 5e-3}


def exp_gps(n: int, repeat: int, device) -> float:
    """G elements / s of ``torch.exp`` on ``device``."""
    x = -torch.rand(n, device=device) * 10
    y = torch.empty_like(x)
    return n / median_ms(lambda: torch.exp(x, out=y), repeat, device=device) / 1e6


def check(layers, start_dim, backend, dtype) -> float:
    """The fused loss and gradient against the reference on float64 copies of the inputs."""
    loss, grads = loss_step(layers, start_dim, backend, backward=True)[2]()
    wide = [tuple(x.double() for x in layer) for layer in layers]
    ref_loss, ref_grads = loss_step(wide, start_dim, "reference", backward=True)[2]()
    return max(rel_error(loss, ref_loss), rel_error(grads, ref_grads))


def measure(case, dtype, device, backend, passes, repeat, copy, compile_=True):
    """The rows of one case and dtype, one per pass."""
    layers, start_dim = loss_case(case, dtype, device)
    elems = sum(t.numel() for t, *_ in layers)
    esize = layers[0][0].element_size()
    c_bytes = elems * esize
    err = check(layers, start_dim, backend, dtype)
    rows = []
    for backward in (False, True):
        name = "fwd+bwd" if backward else "fwd"
        if name not in passes:
            continue

        def timed(backend_, compiled=None, tau=5.0, reps=repeat):
            step, reset, _ = loss_step(layers, start_dim, backend_, backward=backward,
                                       compiled=compiled, tau=tau)
            return (median_ms(step, reps, device=device),
                    peak_extra_bytes(step, reset, device) / c_bytes)

        torch._dynamo.reset()
        eager, eager_mem = timed("reference", reps=max(5, repeat // 3))
        comp, comp_mem = timed("reference", torch.compile) if compile_ else (float("nan"),) * 2
        fused, mem = timed(backend)
        no_exp = timed(backend, tau=0.0)[0]
        moved = elems * esize * (4 if backward else 3)
        floor = moved / copy / 1e6
        exp_rate = 2 * elems / max(fused - no_exp, 1e-6) / 1e6  # G exp / s in situ
        if device.type == "cpu":  # CPU: the exponentials can bind (DESIGN.md §1)
            floor = max(floor, 2 * elems / exp_rate / 1e6)
        gbs = moved / fused / 1e6
        rows.append(dict(
            case=case, dtype=str(dtype).replace("torch.", ""), pass_=name, device=str(device),
            backend=backend, elements=elems, eager_ms=eager, compile_ms=comp, fused_ms=fused,
            x_eager=eager / fused, x_compile=comp / fused, gbs=gbs, pct_copy=100 * gbs / copy,
            floor_ms=floor, x_floor=fused / floor, no_exp_ms=no_exp, exp_gps=exp_rate,
            mem_x=mem, eager_mem_x=eager_mem, compile_mem_x=comp_mem, rel_error=err,
            mismatch=err > TOLERANCE[dtype]))
    return rows


HEADER = (f"{'case':12s} {'dtype':9s} {'pass':8s} {'eager ms':>9s} {'compile':>9s} "
          f"{'fused':>8s} {'x eager':>8s} {'x comp':>7s} {'GB/s':>7s} {'%copy':>6s} "
          f"{'floor ms':>8s} {'x floor':>7s} {'tau0 ms':>7s} {'rel err':>8s} "
          f"{'mem x (eager/comp/fused)':>24s}")


def format_row(r: dict) -> str:
    return (f"{r['case']:12s} {r['dtype']:9s} {r['pass_']:8s} {r['eager_ms']:9.3f} "
            f"{r['compile_ms']:9.3f} {r['fused_ms']:8.3f} {r['x_eager']:8.2f} "
            f"{r['x_compile']:7.2f} {r['gbs']:7.1f} {r['pct_copy']:6.1f} {r['floor_ms']:8.3f} "
            f"{r['x_floor']:7.2f} {r['no_exp_ms']:7.3f} {r['rel_error']:8.1e} "
            f"{r['eager_mem_x']:8.2f}/{r['compile_mem_x']:6.2f}/{r['mem_x']:6.2f}"
            f"{'  MISMATCH' if r['mismatch'] else ''}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--cases", default="rows64,rows128,wrn",
                   help=f"comma-separated, of {','.join(LOSS_CASES)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    p.add_argument("--backend", default="auto",
                   help="the fused backend to time (auto: cpp on CPU, triton on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_output_options(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # The copy: 1 GiB on a GPU (well past its L2), 64 MiB on CPU (past its caches).
    copy = copy_gbs((1 << 30) if device.type == "cuda" else (64 << 20), args.repeat, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads; copy "
          f"bandwidth {copy:.1f} GB/s (read+write); torch.exp "
          f"{exp_gps(1 << 22, args.repeat, device):.2f} G elem/s")
    print(HEADER)
    rows = []
    for case in args.cases.split(","):
        for dname in args.dtypes.split(","):
            for row in measure(case, getattr(torch, dname), device, args.backend,
                               args.passes.split(","), args.repeat, copy, not args.no_compile):
                row["copy_gbs"] = copy
                rows.append(row)
                print(format_row(row), flush=True)
    write_rows(rows, "bench_loss", json_path=args.json, csv_path=args.csv)
    if any(r["mismatch"] for r in rows):
        print("bench_loss: MISMATCH against the float64 reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
