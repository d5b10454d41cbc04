"""Speed of the importance clone loss: eager reference, torch.compile(reference), fused backend.

    python benchmarks/bench_loss.py [--device cpu|cuda] [--repeat 30] [--cases rows64,rows128,wrn]
                                    [--dtypes float32,bfloat16] [--passes fwd,fwd+bwd]
                                    [--csv out.csv] [--json out.json]
    python benchmarks/bench_loss.py --host [--device cpu|cuda] [--threads 1]

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

``--host`` instead measures the host time of one forward+backward on 1 and 25 tiny layers
(``[4, 8, 4, 4]`` fp32, where the kernels cost nothing), as a ratio to ``F.mse_loss``
forward+backward on the same tensors and beside the eager formula, measured alternately in one
run: the op as it runs on the device, and, on CPU, the Triton path's host code with its launches
not executed.
"""
from __future__ import annotations

import argparse
import sys

import torch

from _harness import (LOSS_CASES, add_output_options, copy_gbs, host_steps, interleaved_us,
                      loss_case, loss_step, median_ms, peak_extra_bytes, rel_error, write_rows)

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


def design_bytes(layers, start_dim, backward: bool) -> float:
    """Bytes per element (in units of the element size E) the fused kernels move by design:
    read t, g, c (3E), and with the gradient write it once (4E), plus one read and one write
    for rows longer than ROW_MAX, which are split and rescaled (6E). CPU: the C++ kernel's 4E."""
    if not backward:
        return 3.0
    if layers[0][0].device.type != "cuda":
        return 4.0
    from medic_fast.kernels.importance_clone import ROW_MAX

    elems = [(t.numel(), t.shape[start_dim:].numel() > ROW_MAX[t.dtype]) for t, *_ in layers]
    return sum(n * (6 if split else 4) for n, split in elems) / sum(n for n, _ in elems)


def graph_ms(layers, start_dim, backend, repeat) -> float:
    """The fused forward+backward captured in one CUDA graph and replayed: the kernels' time
    without the host's."""
    step, _, _ = loss_step(layers, start_dim, backend, backward=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_ms(graph.replay, repeat, device=layers[0][0].device)


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
        moved = elems * esize * (4 if backward else 3)  # the floor: 4E, or 3E for the loss
        graph = (graph_ms(layers, start_dim, backend, repeat)
                 if backward and device.type == "cuda" else float("nan"))
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
            graph_ms=graph, design_bytes=design_bytes(layers, start_dim, backward),
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


def host_rows(device, rounds, calls) -> list[dict]:
    """The host-time table: per layer count, the op (and on CPU the Triton path's host code,
    its launches not executed) and the eager formula, in microseconds and as ratios to
    ``F.mse_loss``, all measured alternately in one run."""
    rows = []
    for n in (1, 25):
        r = interleaved_us(host_steps(n, device), device, rounds, calls)
        for path, name in (("op", "op"), ("triton host", "triton")):
            if name in r:
                rows.append(dict(layers=n, path=path, device=str(device), mse_us=r["mse"],
                                 op_us=r[name], eager_us=r["eager"], x_mse=r[f"{name}/mse"],
                                 eager_x_mse=r["eager/mse"], x_eager=r[name] / r["eager"]))
    return rows


def print_host(rows) -> None:
    print(f"{'layers':>6} {'path':12s} {'mse us':>8s} {'op us':>8s} {'x mse':>6s} "
          f"{'eager us':>9s} {'eager x mse':>11s}")
    for r in rows:
        print(f"{r['layers']:6d} {r['path']:12s} {r['mse_us']:8.1f} {r['op_us']:8.1f} "
              f"{r['x_mse']:6.2f} {r['eager_us']:9.1f} {r['eager_x_mse']:11.2f}", flush=True)


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
    p.add_argument("--host", action="store_true",
                   help="the host-time table (1 and 25 tiny layers against F.mse_loss)")
    p.add_argument("--rounds", type=int, default=15,
                   help="with --host: alternating rounds (default: %(default)s)")
    p.add_argument("--calls", type=int, default=200,
                   help="with --host: calls per variant per round (default: %(default)s)")
    add_output_options(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.host:
        print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; host "
              f"time per forward+backward, median over {args.rounds} alternating rounds of "
              f"{args.calls} calls")
        rows = host_rows(device, args.rounds, args.calls)
        print_host(rows)
        write_rows(rows, "bench_loss_host", json_path=args.json, csv_path=args.csv)
        return 0
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
