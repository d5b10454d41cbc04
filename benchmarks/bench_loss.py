"""Speed of the importance clone loss: eager reference, torch.compile(reference), fused backend.

    python benchmarks/bench_loss.py [--repeat 30] [--cases rows64,rows128,wrn] [--csv out.csv]
                                    [--json out.json]

Prints, per case, dtype and pass (forward, forward+backward): median time, ratio to eager and to
torch.compile, achieved GB/s (the bytes the op must move: read t, g, c, write dc), that as a
fraction of the copy bandwidth measured in the same run, the fused time at tau=0 (the same kernel
without exponentials: the difference gives the exp throughput achieved in situ), and the peak
extra memory as a multiple of the size of acts_c (the gradient included) for each of the three.
The floor of DESIGN.md §1 per case is printed too: the larger of bytes / copy bandwidth and
(2 exponentials per element) / (our exp throughput in situ).
"""
from __future__ import annotations

import argparse
import sys

import torch

import medic_fast

from _harness import add_output_options, median_ms, peak_extra_bytes, write_rows

# WRN-16-1 on 32x32 inputs, batch 64: the shapes of its 25 conv and BN outputs (the released
# recipe's "conv+bn" plane): conv1, then 3 groups of 2 blocks x (bn1, conv1, bn2, conv2) with a
# shortcut conv in the first block of groups 2 and 3, and the final BN.
WRN_16_1 = ([(16, 32, 32)] + [(16, 32, 32)] * 8 + [(32, 16, 16)] * 8 + [(64, 8, 8)] * 8)[:25]


def make_case(name: str, dtype: torch.dtype):
    """Per-layer (t, c, g, mean, std) of fresh random data for a named case."""
    gen = torch.Generator().manual_seed(0)
    if name.startswith("rows"):
        shapes = [(int(name[4:]), 64, 32, 32)]
    elif name == "wrn":
        shapes = [(64,) + s for s in WRN_16_1]
    else:
        raise ValueError(f"unknown case {name!r}")
    layers = []
    for shp in shapes:
        t = torch.randn(shp, generator=gen).to(dtype)
        c = (t.float() + 0.3 * torch.randn(shp, generator=gen)).to(dtype)
        g = (1e-3 * torch.randn(shp, generator=gen)).to(dtype)
        mean = 0.1 * torch.randn(shp[1], generator=gen)
        std = torch.rand(shp[1], generator=gen) + 0.5
        layers.append((t, c, g, mean, std))
    return layers


def runner(layers, backend, *, backward, compiled=None, tau=5.0):
    ts, cs, gs, ms, ss = (list(x) for x in zip(*layers))
    cs = [c.clone().requires_grad_(backward) for c in cs]

    def loss_fn(cs_):
        return medic_fast.importance_clone_loss(ts, cs_, gs, ms, ss, tau=tau, backend=backend)

    f = compiled(loss_fn) if compiled else loss_fn

    def reset():
        for c in cs:
            c.grad = None

    def step():
        if backward:
            reset()
            f(cs).backward()
        else:
            with torch.no_grad():
                f(cs)

    return step, reset


def measure_copy_gbs(nbytes: int, repeat: int) -> float:
    x = torch.empty(nbytes // 4)
    x.uniform_()
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), repeat)
    return 2 * nbytes / ms / 1e6  # read + write


def measure_exp_rate(n: int, repeat: int) -> float:
    x = -torch.rand(n) * 10
    y = torch.empty_like(x)
    ms = median_ms(lambda: torch.exp(x, out=y), repeat)
    return n / ms / 1e6  # G elements / s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--cases", default="rows64,rows128,wrn")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--backend", default="auto",
                   help="the fused backend to time (auto = cpp on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_output_options(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_out = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    copy = measure_copy_gbs(64 << 20, args.repeat)
    exp_rate = measure_exp_rate(1 << 22, args.repeat)
    print(f"copy bandwidth {copy:.1f} GB/s (read+write); torch.exp {exp_rate:.2f} G elem/s")
    hdr = (f"{'case':8s} {'dtype':9s} {'pass':8s} {'eager ms':>9s} {'compile':>9s} "
           f"{'fused':>8s} {'x eager':>8s} {'x comp':>7s} {'GB/s':>6s} {'%copy':>6s} "
           f"{'tau0 ms':>7s} {'exp G/s':>7s} {'floor ms':>8s} {'mem x (eager/comp/fused)':>24s}")
    print(hdr)
    for case in args.cases.split(","):
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            layers = make_case(case, dtype)
            elems = sum(t.numel() for t, *_ in layers)
            esize = layers[0][0].element_size()
            c_bytes = elems * esize
            for backward in (False, True):
                torch._dynamo.reset()
                eager_step, eager_reset = runner(layers, "reference", backward=backward)
                eager = median_ms(eager_step, max(5, args.repeat // 3))
                eager_mem = peak_extra_bytes(eager_step, eager_reset) / c_bytes
                comp_step, comp_reset = runner(layers, "reference", backward=backward,
                                               compiled=torch.compile)
                comp = median_ms(comp_step, args.repeat)
                comp_mem = peak_extra_bytes(comp_step, comp_reset) / c_bytes
                fused_step, fused_reset = runner(layers, args.backend, backward=backward)
                fused = median_ms(fused_step, args.repeat)
                # Our exponentials in situ: tau=0 runs the same kernel without them.
                no_exp = median_ms(runner(layers, args.backend, backward=backward, tau=0.0)[0],
                                   args.repeat)
                exps = 2 * elems
                our_exp_rate = exps / max(fused - no_exp, 1e-6) / 1e6  # G exp / s
                moved = elems * esize * (4 if backward else 3)
                floor = max(moved / copy / 1e6, exps / our_exp_rate / 1e6)
                mem = peak_extra_bytes(fused_step, fused_reset) / c_bytes
                gbs = moved / fused / 1e6
                row = dict(case=case, dtype=dname, pass_="fwd+bwd" if backward else "fwd",
                           eager_ms=eager, compile_ms=comp, fused_ms=fused, x_eager=eager / fused,
                           x_compile=comp / fused, gbs=gbs, pct_copy=100 * gbs / copy,
                           floor_ms=floor, no_exp_ms=no_exp, exp_gps=our_exp_rate, mem_x=mem,
                           eager_mem_x=eager_mem, compile_mem_x=comp_mem)
                rows_out.append(row)
                print(f"{case:8s} {dname:9s} {row['pass_']:8s} {eager:9.2f} {comp:9.2f} "
                      f"{fused:8.2f} {row['x_eager']:8.2f} {row['x_compile']:7.2f} {gbs:6.1f} "
                      f"{row['pct_copy']:6.1f} {no_exp:7.2f} {our_exp_rate:7.2f} {floor:8.2f} "
                      f"{eager_mem:8.2f}/{comp_mem:6.2f}/{mem:6.2f}")
                sys.stdout.flush()
    write_rows(rows_out, "bench_loss", json_path=args.json, csv_path=args.csv)


if __name__ == "__main__":
    main()
