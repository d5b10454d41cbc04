"""The step benchmark behind ``medic-fast bench`` (and ``benchmarks/bench_sanitize.py``): one
training step of WRN-16-1 as plain cross-entropy, as the MEDIC step of :class:`medic_fast.Cloner`
and as the released MEDIC code takes it."""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Dict

import torch
import torch.nn.functional as F

import medic_fast as mf
from medic_fast.capture import ActivationCapture
from medic_fast.medic.cache import TeacherCache
from medic_fast.reference import importance_clone as reference
from medic_fast.zoo import models

__all__ = ["bench_steps", "step_variants", "captured_steps", "paper_scale", "VARIANTS",
           "PAPER_SCALE"]

VARIANTS = ("plain", "ours", "cached", "released")

# The MEDIC paper's sanitization run: WRN-16-1 on 5% of CIFAR-10 (2,500 inputs of 32x32x3),
# batch 64, 60 epochs, the conv+BN tensors hooked.
PAPER_SCALE = {"inputs": 2500, "batch": 64, "size": 32, "epochs": 60}


def _released_style_step(teacher, student, layers, stats, tau, opt, x, y):
    """One step the way the released MEDIC code does it: the input requires grad, every hooked
    tensor retains its grad, one backward of CE(teacher) + CE(student) through both networks,
    a per-layer loss in eager PyTorch from ``.grad``, then a second backward and the update."""
    x = x.clone().requires_grad_()
    with ActivationCapture(teacher, layers) as tc, ActivationCapture(student, layers) as sc:
        out_t, out_s = teacher(x), student(x)
        acts_t, acts_s = tc.outputs(), sc.outputs()
    for a in acts_t + acts_s:
        a.retain_grad()
    ce_s = F.cross_entropy(out_s, y)
    (F.cross_entropy(out_t, y) + ce_s).backward(retain_graph=True)
    clone = 0.0
    for t, c, mu, sd in zip(acts_t, acts_s, stats.mean, stats.std):
        clone = clone + reference.layer_row_losses(t, c, t.grad, mu, sd, tau=tau,
                                                   criterion="abs", eps=1e-5,
                                                   start_dim=1).mean()
    opt.zero_grad()
    (ce_s + 10.0 * clone).backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_variants(batch: int = 64, size: int = 32, backend: str = "auto", seed: int = 0,
                  device="cpu"):
    """``(step, inputs, hooked)`` for WRN-16-1 (``batch`` x 3 x ``size`` x ``size``, the 25
    conv/bn tensors of the released recipe hooked): ``step(kind, x, y)`` takes one training step,
    Adam after it, of the variant ``kind``: ``plain`` cross-entropy, ``ours`` (``loss =
    Cloner(...)(x, y)``, tau 5, lam 10, ``backend``: the step ``sanitize`` takes) or
    ``cached`` (ours with a :class:`~medic_fast.medic.cache.TeacherCache` holding the batch's
    teacher signals: the steps of every epoch after the first when the inputs repeat, as
    ``sanitize`` takes them) or ``released`` (the released code's way); ``inputs()`` draws a
    fresh random batch."""
    device = torch.device(device)
    torch.manual_seed(seed)
    teacher = models.wrn16_1().to(device).eval().requires_grad_(False)
    layers = models.wrn_released_layers(teacher)
    xs = torch.rand(4 * batch, 3, size, size, device=device)
    ys = torch.randint(0, 10, (4 * batch,), device=device)
    stats = mf.collect_stats(teacher, (xs, ys), layers, batch_size=batch)
    nets = {k: models.wrn16_1().to(device) for k in VARIANTS}
    capturable = device.type == "cuda"  # so that captured_steps can capture a whole step
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-3, capturable=capturable)
            for k, n in nets.items()}
    cloner = mf.Cloner(teacher, nets["ours"], layers, stats, tau=5.0, lam=10.0, backend=backend)
    cached = mf.Cloner(teacher, nets["cached"], layers, stats, tau=5.0, lam=10.0,
                       backend=backend, cache=TeacherCache(batch))
    index = torch.arange(batch)

    def step(kind, x, y):
        net, opt = nets[kind], opts[kind]
        if kind == "released":
            return _released_style_step(teacher, net, layers, stats, 5.0, opt, x, y)
        if kind == "plain":
            loss = F.cross_entropy(net(x), y)
        elif kind == "cached":
            loss = cached(x, y, index=index)  # the first call fills the cache
        else:
            loss = cloner(x, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    def inputs():
        return (torch.rand(batch, 3, size, size, device=device),
                torch.randint(0, 10, (batch,), device=device))

    return step, inputs, len(layers)


def captured_steps(step, inputs, kinds=("plain", "ours")):
    """CUDA only: for each of ``kinds``, its step (:func:`step_variants`, whose optimizers are
    capturable there) captured once in a CUDA graph on static inputs; returns ``{kind: run(x,
    y)}``, each copying the batch into the graph's inputs and replaying it."""
    runs = {}
    for kind in kinds:
        x, y = inputs()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: gradients, optimizer state, plans, kernels
                step(kind, x, y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(kind, x, y)

        def run(x_new, y_new, x=x, y=y, graph=graph):
            x.copy_(x_new)
            y.copy_(y_new)
            graph.replay()
        runs[kind] = run
    return runs


def bench_steps(batch: int = 64, size: int = 32, repeats: int = 20, warmup: int = 3,
                backend: str = "auto", seed: int = 0, progress: bool = False,
                device="cpu") -> dict:
    """Median seconds of one training step of each of :func:`step_variants`. Variants are
    interleaved, each step on fresh random inputs; ``progress`` prints a line per round (one
    step of each variant) on stderr. On a CUDA ``device`` each step is timed to its end (a
    synchronisation after it), and the plain and Cloner steps are also timed captured in a CUDA
    graph (``plain_graph``, ``ours_graph``: the step without its host work)."""
    device = torch.device(device)
    step, inputs, hooked = step_variants(batch, size, backend, seed, device)
    runs = {kind: (lambda x, y, kind=kind: step(kind, x, y)) for kind in VARIANTS}
    if device.type == "cuda":
        runs.update({f"{k}_graph": r for k, r in captured_steps(step, inputs).items()})
    times: Dict[str, list] = {k: [] for k in runs}
    rounds = warmup + repeats
    for i in range(rounds):
        if progress:
            print(f"bench: round {i + 1}/{rounds}" + (" (warm-up)" if i < warmup else ""),
                  file=sys.stderr, flush=True)
        for kind, run in runs.items():
            x, y = inputs()
            _sync(device)
            t0 = time.perf_counter()
            run(x, y)
            _sync(device)
            if i >= warmup:
                times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": "wrn16_1", "device": str(device), "batch": batch, "size": size,
           "hooked": hooked, "repeats": repeats, "threads": torch.get_num_threads(),
           "backend": backend, "seconds": med, "ours_vs_plain": med["ours"] / med["plain"],
           "cached_vs_plain": med["cached"] / med["plain"],
           "released_vs_ours": med["released"] / med["ours"]}
    if "ours_graph" in med:
        out["graph_ours_vs_plain"] = med["ours_graph"] / med["plain_graph"]
    return out


def paper_scale(repeats: int = 10, warmup: int = 3, backend: str = "auto", seed: int = 0,
                progress: bool = False, device="cpu") -> dict:
    """The wall-clock of the paper's sanitization run (:data:`PAPER_SCALE`), projected from
    measured parts: the median step of each variant (:func:`bench_steps`) times the run's
    steps (``cached``: the first epoch at ours' step, the rest at the cached step; its cache
    holds ``cache_bytes``), plus, for ours, one statistics pass of the teacher over the inputs
    (timed; the released code reads BatchNorm's running statistics instead). Synthetic inputs:
    the cost does not depend on the pixels."""
    p = PAPER_SCALE
    r = bench_steps(p["batch"], p["size"], repeats, warmup, backend, seed, progress, device)
    steps = math.ceil(p["inputs"] / p["batch"]) * p["epochs"]
    device = torch.device(device)
    torch.manual_seed(seed)
    teacher = models.wrn16_1().to(device).eval().requires_grad_(False)
    X = torch.rand(p["inputs"], 3, p["size"], p["size"], device=device)
    y = torch.randint(0, 10, (p["inputs"],), device=device)
    if progress:
        print("bench: statistics pass", file=sys.stderr, flush=True)
    _sync(device)
    t0 = time.perf_counter()
    mf.collect_stats(teacher, (X, y), models.wrn_released_layers(teacher), batch_size=256)
    _sync(device)
    stats_s = time.perf_counter() - t0
    per_epoch = math.ceil(p["inputs"] / p["batch"])
    run = {k: v * steps for k, v in r["seconds"].items()}
    # with the cache, the first epoch computes the teacher's signals, the others reuse them
    run["cached"] = per_epoch * r["seconds"]["ours"] + (steps - per_epoch) * r["seconds"]["cached"]
    run["ours"] += stats_s
    run["cached"] += stats_s
    layers = models.wrn_released_layers(teacher)
    with torch.no_grad(), ActivationCapture(teacher, layers) as cap:
        teacher(X[:1])
        cache_bytes = TeacherCache(p["inputs"]).nbytes(cap.outputs())
    return {**r, "paper_scale": {**p, "steps": steps, "stats_seconds": stats_s,
                                 "cache_bytes": cache_bytes,
                                 "projected_seconds": run,
                                 "ours_vs_plain": run["ours"] / run["plain"],
                                 "released_vs_ours": run["released"] / run["ours"]}}
