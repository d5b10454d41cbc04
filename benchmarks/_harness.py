"""Shared measuring and reporting code of the benchmark scripts, which import from here only
(run as ``python benchmarks/<script>.py``, this directory is on ``sys.path``).

The pytest-benchmark suite (``benchmarks/test_bench_*.py``) uses the same inputs and steps.

* :func:`median_ms`: median time of a callable over repeats, after warm-up calls (CUDA events
  on a GPU, the wall clock on CPU);
* :func:`peak_extra_bytes`: peak memory growth over one step (resident memory on CPU, Linux;
  the caching allocator's peak on CUDA);
* :func:`copy_gbs`: the device's copy bandwidth, the memory floor's yardstick;
* :func:`loss_case`, :func:`loss_step`, :func:`rel_error`: the loss benchmark's inputs, its
  timed step, and the check against float64;
* :func:`host_steps`, :func:`interleaved_us`: the loss's host time (tiny layers, where the
  kernels cost nothing) against ``F.mse_loss`` on the same tensors, measured alternately;
* :func:`mlp_head`, :class:`ConvHead`, :func:`pocket_problems`, :func:`head_flops`,
  :func:`gemm_gflops`: the pocket-search benchmark's heads, problems and floor;
* :func:`add_output_options` and :func:`write_rows`: every script's ``--json PATH`` and
  ``--csv PATH``, its result rows (flat dicts) stamped with the run's context, as in
  Liger-Kernel's benchmark CSV (one self-describing line per measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import statistics
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import medic_fast

__all__ = ["median_ms", "peak_extra_bytes", "copy_gbs", "loss_case", "loss_step", "rel_error",
           "host_steps", "without_launches", "interleaved_us", "HOST_SHAPE",
           "LOSS_CASES", "mlp_head", "ConvHead", "pocket_problems", "head_flops", "gemm_gflops",
           "add_output_options", "write_rows"]


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3, device=None) -> float:
    """Median milliseconds of ``repeat`` calls of ``fn``, after ``warmup`` untimed calls.

    On a CUDA ``device`` each call is timed with CUDA events (the device's time, launch gaps
    included); elsewhere with the wall clock.
    """
    for _ in range(warmup):
        fn()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _trim() -> None:
    """Give freed memory back, so each timed call sees the allocator as a user's step would."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_bytes(step: Callable[[], object], reset: Callable[[], object],
                     device=None) -> int:
    """Peak memory growth over one ``step``, gradients included.

    After a warm-up step, ``reset`` drops the previous gradients. On CPU (Linux) freed memory
    goes back to the OS and the kernel's high-water mark is reset (``/proc/self/clear_refs``),
    so the peak counts every byte the step touches anew, as in a user's training step; on CUDA
    it is the caching allocator's peak over what was allocated before the step.
    """
    step()
    reset()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _trim()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return (_status_kb("VmHWM") - base) * 1024


def copy_gbs(nbytes: int, repeat: int, device="cpu") -> float:
    """GB/s of copying a buffer of ``nbytes`` on ``device``, counting bytes read and written."""
    x = torch.empty(nbytes // 4, device=device).uniform_()
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), repeat, device=device)
    return 2 * nbytes / ms / 1e6


# --------------------------------------------------------------------------------------------
# The loss benchmark: inputs, step, check
# --------------------------------------------------------------------------------------------

# WRN-16-1 on 32x32 inputs, batch 64: the shapes of its 25 conv and BN outputs (the released
# recipe's "conv+bn" plane): conv1, then 3 groups of 2 blocks x (bn1, conv1, bn2, conv2) with a
# shortcut conv in the first block of groups 2 and 3, and the final BN.
WRN_16_1 = ([(16, 32, 32)] + [(16, 32, 32)] * 8 + [(32, 16, 16)] * 8 + [(64, 8, 8)] * 8)[:25]
# name -> (per-layer shapes, start_dim). rows64/rows128/wrn are issue 2's shapes; tokens is a
# transformer's hidden states (per-token rows); the small ones are for dry runs and CI.
LOSS_CASES = {
    "rows64": ([(64, 64, 32, 32)], 1),
    "rows128": ([(128, 64, 32, 32)], 1),
    "wrn": ([(64,) + s for s in WRN_16_1], 1),
    "tokens": ([(8, 1024, 4096)], 2),
    "small": ([(8, 16, 16, 16)], 1),
    "tokens_small": ([(2, 64, 256)], 2),
}


def loss_case(name: str, dtype: torch.dtype, device="cpu"):
    """``(layers, start_dim)`` of a named case: per layer ``(t, c, g, mean, std)``, fresh
    random data (seeded) of ``dtype`` on ``device``; statistics per feature of ``start_dim``."""
    if name not in LOSS_CASES:
        raise ValueError(f"unknown case {name!r}; one of {sorted(LOSS_CASES)}")
    shapes, start_dim = LOSS_CASES[name]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device)

    layers = []
    for shp in shapes:
        t = randn(*shp)
        c = (t + 0.3 * randn(*shp)).to(dtype)
        g = (1e-3 * randn(*shp)).to(dtype)
        mean = 0.1 * randn(shp[start_dim])
        std = torch.rand(shp[start_dim], generator=gen, device=device) + 0.5
        layers.append((t.to(dtype), c, g, mean, std))
    return layers, start_dim


def loss_step(layers, start_dim, backend, *, backward, compiled=None, tau=5.0):
    """``(step, reset, loss_and_grads)``: one call of the loss (``backward``: and its backward)
    with ``backend``, optionally through ``compiled`` (e.g. ``torch.compile``); ``reset`` drops
    the gradients; ``loss_and_grads()`` runs it once and returns the loss and ``d/d acts_c``."""
    ts, cs, gs, ms, ss = (list(x) for x in zip(*layers))
    cs = [c.clone().requires_grad_(backward) for c in cs]

    def loss_fn(cs_):
        return medic_fast.importance_clone_loss(ts, cs_, gs, ms, ss, tau=tau, backend=backend,
                                                start_dim=start_dim)

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

    def loss_and_grads():
        reset()
        loss = f(cs)
        loss.backward()
        return loss.detach(), [c.grad for c in cs]

    return step, reset, loss_and_grads


def rel_error(out, ref) -> float:
    """``||out - ref|| / ||ref||`` over tensors or lists of tensors, in float64 (NaN and inf
    give inf)."""
    out = [out] if isinstance(out, torch.Tensor) else out
    ref = [ref] if isinstance(ref, torch.Tensor) else ref
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    err = (num / max(den, 1e-300)) ** 0.5
    return err if err == err else float("inf")


# --------------------------------------------------------------------------------------------
# Host time of the loss
# --------------------------------------------------------------------------------------------

HOST_SHAPE = (4, 8, 4, 4)  # a layer whose kernels cost next to nothing: the call is host work


def host_steps(n_layers: int, device="cpu") -> dict:
    """One forward+backward over ``n_layers`` tiny fp32 layers (``HOST_SHAPE``, per-channel
    statistics, tau 5) per call of each step: ``mse`` (``F.mse_loss`` per layer, summed),
    ``eager`` (the formula, ``backend="reference"``), ``op`` (``backend="auto"``) and, on CPU
    tensors, ``triton`` (the Triton path's host code, to run inside :func:`without_launches`)."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(n_layers):
        t = torch.randn(HOST_SHAPE, generator=gen)
        c = t + 0.3 * torch.randn(HOST_SHAPE, generator=gen)
        g = 1e-3 * torch.randn(HOST_SHAPE, generator=gen)
        layers.append([x.to(device) for x in (t, c, g, 0.1 * torch.randn(8, generator=gen),
                                               torch.rand(8, generator=gen) + 0.5)])
    ts, cs, gs, ms, ss = (list(x) for x in zip(*layers))
    cs = [c.requires_grad_() for c in cs]
    args = [x[0] for x in (ts, cs, gs, ms, ss)] if n_layers == 1 else [ts, cs, gs, ms, ss]

    def mse():
        sum(F.mse_loss(c, t) for t, c in zip(ts, cs)).backward()

    def loss(backend):
        return lambda: medic_fast.importance_clone_loss(*args, tau=5.0,
                                                        backend=backend).backward()

    steps = {"mse": mse, "eager": loss("reference"), "op": loss("auto")}
    if not _is_cuda(device):
        steps["triton"] = loss("triton")
    return steps


@contextlib.contextmanager
def without_launches():
    """Inside, the loss's Triton path takes CPU tensors and its kernel launches are not
    executed: what remains is our host code per call. The plans made inside are dropped after."""
    from medic_fast.kernels import importance_clone as kernels
    from medic_fast.ops import _dispatch, importance_clone

    table = _dispatch.KERNELS["importance_clone_loss"]
    launch, cpu = kernels.Launch.__call__, table["cpu"]
    kernels.Launch.__call__, table["cpu"] = (lambda self, *a, traced=False: None), "triton"
    try:
        yield
    finally:
        kernels.Launch.__call__, table["cpu"] = launch, cpu
        importance_clone._PLANS.clear()


def interleaved_us(steps: dict, device="cpu", rounds: int = 15, calls: int = 200) -> dict:
    """Microseconds per call of each step: each of ``rounds`` rounds runs every step in turn,
    ``calls`` calls (the first round is warm-up; ``triton`` inside :func:`without_launches`;
    on CUDA synchronised after the calls only); a step's figure is its median over rounds, and
    ``<name>/mse`` the median of its per-round ratios to ``mse``, which is robust to the
    machine's drift."""
    times = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            with without_launches() if name == "triton" else contextlib.nullcontext():
                step()
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                _sync(device)
                if r:
                    times[name].append((time.perf_counter() - start) / calls * 1e6)
    out = {name: statistics.median(v) for name, v in times.items()}
    for name in steps:
        if name != "mse":
            out[f"{name}/mse"] = statistics.median(
                a / b for a, b in zip(times[name], times["mse"]))
    return out


def _sync(device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# The pocket-search benchmark: heads, problems, floor
# --------------------------------------------------------------------------------------------

def mlp_head(sizes, device="cpu"):
    """Linear layers of ``sizes`` with ReLU between them, frozen, in eval mode."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(device).eval().requires_grad_(False)


class ConvHead(nn.Module):
    """conv 8->16 3x3 on 6x6, ReLU, 2x2 max-pool, Linear 144 -> classes."""

    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 3 * 3, classes)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def pocket_problems(classes, restarts, k, feat, seed=0, device="cpu"):
    """``(anchors, source, target)``: every ordered class pair x ``restarts``, ``k`` random
    anchors of shape ``feat`` each."""
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(classes).repeat_interleave((classes - 1) * restarts)
    tgt = torch.tensor([t for s in range(classes) for t in range(classes) if t != s]
                       ).repeat_interleave(restarts)
    anchors = torch.rand(len(src), k, *feat, generator=g) * 2
    return anchors.to(device), src.to(device), tgt.to(device)


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


def gemm_gflops(shapes, repeat, device="cpu") -> float:
    """The best GFLOP/s of ``torch.mm`` over ``(m, k, n)`` ``shapes`` (fp32) on ``device``."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        out = torch.empty(m, n, device=device)
        ms = median_ms(lambda: torch.mm(a, b, out=out), repeat, warmup=1, device=device)
        best = max(best, 2 * m * k * n / ms / 1e6)
    return best


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--json PATH`` and ``--csv PATH`` (the arguments of :func:`write_rows`)."""
    parser.add_argument("--json", metavar="PATH", help="also write the result rows to this JSON "
                        "file (a list of objects)")
    parser.add_argument("--csv", metavar="PATH", help="also write the result rows to this CSV "
                        "file")


def write_rows(rows: Iterable[dict], benchmark: str, *, json_path: Optional[str] = None,
               csv_path: Optional[str] = None) -> None:
    """Write the result ``rows`` (flat dicts) to ``json_path`` and / or ``csv_path``.

    Each row gets the run's columns after its own: ``benchmark``, ``torch`` and ``medic_fast``
    versions, torch ``threads`` and ``timestamp`` (a row's own value of one of them wins). The
    CSV's columns are the rows' keys in first-seen order, then the run's; a missing value is
    empty.
    """
    run = {"benchmark": benchmark, "torch": torch.__version__,
           "medic_fast": medic_fast.__version__, "threads": torch.get_num_threads(),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = list(rows)
    fields = list(dict.fromkeys([k for row in rows for k in row] + list(run)))
    rows = [{**row, **{k: v for k, v in run.items() if k not in row}} for row in rows]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
