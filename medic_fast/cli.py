"""The ``medic-fast`` command: ``demo``, ``sanitize``, ``scan`` and ``bench``.

``medic-fast <command> --help`` explains each option. ``demo`` and ``bench`` are also callable
from Python (:func:`run_demo`, :func:`bench_steps`), which ``benchmarks/bench_sanitize.py`` uses.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

__all__ = ["main", "run_demo", "bench_steps", "DEMO_SETTINGS"]

# The demo's settings, chosen on seeds 0-4 (see benchmarks/RESULTS.md §2 for what else was
# tried): digits split 60/10/30 (trojan training / clean defence set / test), a 3x3 BadNets
# checkerboard in the bottom-right corner on 10% of the training set, target class 0.
DEMO_SETTINGS = {
    "split": [0.6, 0.1, 0.3], "trigger_size": 3, "poison_rate": 0.1, "target": 0,
    "channels": [16, 32, 32], "trojan_epochs": 15, "trojan_lr": 0.01,
    "epochs": 60, "tau": 5.0, "lam": 10.0, "lr": 0.01, "batch_size": 64,
    "finetune_lr": 1e-3,
}


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

def run_demo(seed: int = 0, progress: bool = True, settings: Optional[dict] = None,
             threads: Optional[int] = 1) -> dict:
    """The digits demo: train a BadNets-trojaned CNN, then MEDIC, fine-tuning and training from
    scratch on the 10% clean split; returns the settings, one row per method (ACC, ASR,
    seconds) and the wall-clock per phase. Deterministic given ``seed`` (timings aside).

    ``threads``: torch intra-op threads for the run (restored after; None: leave as is). The
    models are tiny, so one thread is as fast as several on an idle machine and much faster on a
    busy one (no threads spinning at barriers while others hold the cores).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _demo(seed, progress, {**DEMO_SETTINGS, **(settings or {})})
    finally:
        torch.set_num_threads(previous)


def _demo(seed: int, progress: bool, s: dict) -> dict:
    import medic_fast as mf
    from medic_fast import data
    from medic_fast.zoo import attacks, datasets, models

    t_all = time.perf_counter()
    X, y = datasets.load_digits()
    (Xtr, ytr), (Xc, yc), (Xte, yte) = data.split(X, y, s["split"], seed=seed)
    attack = attacks.BadNets(size=s["trigger_size"])
    poisoned = attack.poison(Xtr, ytr, s["poison_rate"], s["target"], seed)
    ev = dict(trigger=attack, target=s["target"])
    common = dict(epochs=s["epochs"], batch_size=s["batch_size"], seed=seed, progress=progress)
    rows: List[dict] = []
    phases: Dict[str, float] = {"data": time.perf_counter() - t_all}

    def run(name, fn):
        if progress:
            print(f"[{len(rows) + 1}/4] {name}", file=sys.stderr)
        t0 = time.perf_counter()
        model = fn().model
        phases[name] = time.perf_counter() - t0
        rows.append({"method": name, **mf.evaluate(model, Xte, yte, **ev),
                     "seconds": phases[name]})
        return model

    trojan = run("trojaned", lambda: mf.train_from_scratch(
        models.DigitsCNN(s["channels"]), (poisoned.X, poisoned.y), epochs=s["trojan_epochs"],
        lr=s["trojan_lr"], batch_size=s["batch_size"], seed=seed, progress=progress))
    clean = (Xc, yc)
    run("medic", lambda: mf.sanitize(trojan, clean, tau=s["tau"], lam=s["lam"], lr=s["lr"],
                                      **common))
    run("finetune", lambda: mf.finetune(trojan, clean, lr=s["finetune_lr"], **common))
    run("scratch", lambda: mf.train_from_scratch(trojan, clean, lr=s["lr"], **common))
    phases["total"] = time.perf_counter() - t_all
    return {"seed": seed, "settings": s, "samples": {"trojan_train": len(ytr), "clean": len(yc),
                                                    "test": len(yte),
                                                    "poisoned": len(poisoned.index)},
            "results": rows, "phases": phases, "threads": torch.get_num_threads()}


def _table(result: dict) -> str:
    lines = [f"{'method':<10} {'ACC':>7} {'ASR':>7} {'seconds':>8}"]
    for r in result["results"]:
        lines.append(f"{r['method']:<10} {100 * r['acc']:6.1f}% {100 * r['asr']:6.1f}% "
                     f"{r['seconds']:8.1f}")
    lines.append(f"total {result['phases']['total']:.1f} s (seed {result['seed']}, "
                 f"{result['samples']['clean']} clean samples, {result['threads']} threads)")
    return "\n".join(lines)


def _free_name(stem: str, ext: str) -> str:
    """``stem.ext`` in the cwd, or ``stem-1.ext``, ``stem-2.ext``... (never an existing file)."""
    name, k = f"{stem}{ext}", 0
    while os.path.exists(name):
        k += 1
        name = f"{stem}-{k}{ext}"
    return name


def _write_new(path: str, text: str) -> None:
    """Create ``path`` with ``text``; fails if it exists (no silent overwrite)."""
    with open(path, "x") as f:
        f.write(text)


def _cmd_demo(args) -> int:
    if args.out is not None and os.path.exists(args.out):
        return _fail(f"--out {args.out!r} exists; it is never overwritten: choose another path")
    result = run_demo(args.seed, progress=not args.no_progress, threads=args.threads)
    text = json.dumps(result, indent=2)
    if args.json:
        print(_table(result), file=sys.stderr)
        print(text)
        return 0
    print(_table(result))
    out = args.out or _free_name("medic-fast-demo", ".json")
    _write_new(out, text + "\n")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------
# sanitize / scan: a user's own model and data
# --------------------------------------------------------------------------------------------

def _resolve(spec: str, option: str):
    """The object named by ``pkg.module:attr`` (the cwd is importable, as with ``python -m``)."""
    if ":" not in spec:
        raise SystemExit(f"medic-fast: {option} must look like pkg.module:name, got {spec!r}")
    mod, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise SystemExit(f"medic-fast: {option}: cannot import {mod!r}: {e}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"medic-fast: {option}: {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call(spec: str, option: str):
    factory = _resolve(spec, option)
    if not callable(factory):
        raise SystemExit(f"medic-fast: {option}: {spec!r} is not callable")
    return factory()


def _load_model(args):
    model = _call(args.model, "--model")
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"medic-fast: --model {args.model!r} returned {type(model).__name__}, "
                         "not an nn.Module")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    model.load_state_dict(state)
    return model


def _cmd_sanitize(args) -> int:
    import medic_fast as mf

    if os.path.exists(args.out):
        return _fail(f"--out {args.out!r} exists; it is never overwritten: choose another path")
    if args.history is not None and os.path.exists(args.history):
        return _fail(f"--history {args.history!r} exists; it is never overwritten")
    if (args.trigger is None) != (args.target is None) or (args.trigger and not args.eval_data):
        return _fail("--trigger and --target go together, with --eval-data")
    model = _load_model(args)
    data = _call(args.data, "--data")
    eval_data = _call(args.eval_data, "--eval-data") if args.eval_data else None
    trigger = _resolve(args.trigger, "--trigger") if args.trigger else None
    result = mf.sanitize(
        model, data, layers=args.layers.split(",") if args.layers else None, tau=args.tau,
        lam=args.lam, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        weight_decay=args.weight_decay, criterion=args.criterion, stats=args.stats,
        seed=args.seed, device=args.device, progress=not args.no_progress,
        checkpoint=args.state, resume=args.resume, eval_data=eval_data, trigger=trigger,
        target=args.target)
    from medic_fast._utils import save_atomic

    if os.path.exists(args.out):
        return _fail(f"--out {args.out!r} appeared during training; not overwritten")
    save_atomic(result.model.state_dict(), args.out)
    if args.history is not None:
        _write_new(args.history, json.dumps(result.history, indent=2) + "\n")
    last = result.history[-1]
    print(f"wrote {args.out} (epoch {last['epoch']}: loss {last['loss']:.4g}"
          + "".join(f", {k} {last[k]:.4f}" for k in ("acc", "asr") if k in last) + ")")
    return 0


def _cmd_scan(args) -> int:
    import medic_fast as mf

    scan = getattr(mf, "scan", None)
    if scan is None:
        return _fail("the CLEAR scanner (medic_fast.scan, in medic_fast/clear/) is not part of "
                     "this installation")
    report = scan(_load_model(args), _call(args.data, "--data"), threshold=args.threshold,
                  seed=args.seed)
    print(report.to_json() if hasattr(report, "to_json") else report)
    return 0


# --------------------------------------------------------------------------------------------
# bench: one clone-training step
# --------------------------------------------------------------------------------------------

def wrn_released_layers(model) -> List[str]:
    """The 25 tensors the released MEDIC code hooks on WRN-16-1 ("conv+bn" plane): the stem
    conv and, in every block, bn1, conv1, bn2, conv2 (not the shortcut convs or the final BN)."""
    names = ["conv1"]
    for g in ("block1", "block2", "block3"):
        for i, _ in enumerate(getattr(model, g)):
            names += [f"{g}.{i}.{n}" for n in ("bn1", "conv1", "bn2", "conv2")]
    return names


def _released_style_step(teacher, student, layers, stats, tau, opt, x, y):
    """One step the way the released MEDIC code does it: the input requires grad, every hooked
    tensor retains its grad, one backward of CE(teacher) + CE(student) through both networks,
    a per-layer loss in eager PyTorch from ``.grad``, then a second backward and the update."""
    from medic_fast.reference import importance_clone as reference
    from medic_fast.capture import ActivationCapture

    x = x.clone().requires_grad_()
    with ActivationCapture(teacher, layers) as tc, ActivationCapture(student, layers) as sc:
        out_t, out_s = teacher(x), student(x)
        acts_t, acts_s = tc.outputs(), sc.outputs()
    for a in acts_t + acts_s:
        a.retain_grad()
    ce_s = torch.nn.functional.cross_entropy(out_s, y)
    (torch.nn.functional.cross_entropy(out_t, y) + ce_s).backward(retain_graph=True)
    clone = 0.0
    for t, c, mu, sd in zip(acts_t, acts_s, stats.mean, stats.std):
        clone = clone + reference.layer_row_losses(t, c, t.grad, mu, sd, tau=tau,
                                                   criterion="abs", eps=1e-5,
                                                   start_dim=1).mean()
    opt.zero_grad()
    (ce_s + 10.0 * clone).backward()
    opt.step()


def bench_steps(batch: int = 64, size: int = 32, repeats: int = 20, warmup: int = 3,
                backend: str = "auto", seed: int = 0) -> dict:
    """Median seconds of one training step on WRN-16-1 (``batch`` x 3 x ``size`` x ``size``,
    the 25 conv/bn tensors of the released recipe hooked): ``plain`` cross-entropy, ``ours``
    (the :func:`medic_fast.sanitize` step) and ``released`` (the released code's way).
    Variants are interleaved, each step on fresh random inputs."""
    from medic_fast.zoo import models
    from medic_fast.capture import inplace_modified
    from medic_fast.medic.sanitize import _CloneObjective
    from medic_fast.stats import _collect
    from medic_fast.data import make_loader

    torch.manual_seed(seed)
    teacher = models.wrn16_1().eval().requires_grad_(False)
    layers = wrn_released_layers(teacher)
    xs = torch.rand(4 * batch, 3, size, size)
    ys = torch.randint(0, 10, (4 * batch,))
    stats = _collect(teacher, make_loader((xs, ys), batch_size=batch), layers, "channel",
                     torch.device("cpu"), inplace_modified(teacher, layers, xs[:2]))
    nets = {k: models.wrn16_1() for k in ("plain", "ours", "released")}
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-3) for k, n in nets.items()}
    objective = _CloneObjective(teacher, nets["ours"], layers, stats, tau=5.0, lam=10.0,
                                criterion="abs", backend=backend)

    def step(kind, x, y):
        net, opt = nets[kind], opts[kind]
        if kind == "released":
            return _released_style_step(teacher, net, layers, stats, 5.0, opt, x, y)
        loss = torch.nn.functional.cross_entropy(net(x), y) if kind == "plain" \
            else objective(net, x, y)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: Dict[str, list] = {k: [] for k in nets}
    for i in range(warmup + repeats):
        for kind in nets:
            x = torch.rand(batch, 3, size, size)
            y = torch.randint(0, 10, (batch,))
            t0 = time.perf_counter()
            step(kind, x, y)
            if i >= warmup:
                times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": "wrn16_1", "batch": batch, "size": size, "hooked": len(layers),
            "repeats": repeats, "threads": torch.get_num_threads(), "backend": backend,
            "seconds": med, "ours_vs_plain": med["ours"] / med["plain"],
            "released_vs_ours": med["released"] / med["ours"]}


def _cmd_bench(args) -> int:
    r = bench_steps(args.batch, args.size, args.repeats, args.warmup, args.backend)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"WRN-16-1, batch {r['batch']}, {r['size']}x{r['size']}, {r['hooked']} tensors hooked, "
          f"{r['threads']} threads, median of {r['repeats']}")
    for k, v in r["seconds"].items():
        print(f"  {k:<9} {1e3 * v:8.1f} ms  ({v / r['seconds']['plain']:.2f}x plain)")
    return 0


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------

def _fail(msg: str) -> int:
    print(f"medic-fast: error: {msg}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="medic-fast", formatter_class=fmt,
        description="Remove (MEDIC) and detect (CLEAR) neural-network backdoors.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", formatter_class=fmt, help="digits demo: MEDIC vs baselines",
                       description="Train a BadNets-trojaned CNN on scikit-learn's digits, then "
                       "remove the backdoor with MEDIC and compare with fine-tuning and training "
                       "from scratch on the 10%% clean split. Prints ACC, ASR and seconds per "
                       "method and writes them as JSON.")
    d.add_argument("--seed", type=int, default=0, help="seed of the split, poisoning, "
                   "initialisations and data order (the results are deterministic given it)")
    d.add_argument("--out", default=None, help="JSON file to write (must not exist); default "
                   "medic-fast-demo.json in the current directory, or the first free "
                   "medic-fast-demo-N.json")
    d.add_argument("--json", action="store_true", help="print the JSON on stdout instead of "
                   "writing a file (the table goes to stderr)")
    d.add_argument("--threads", type=int, default=1, help="torch threads; the demo's models are "
                   "tiny, so more threads only help on an idle machine")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    d.set_defaults(func=_cmd_demo)

    def model_args(q):
        q.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY",
                       help="callable returning the model architecture (nn.Module); the "
                       "current directory is importable")
        q.add_argument("--checkpoint", required=True, metavar="IN.pt",
                       help="the model's weights: a state_dict, or a dict holding one under "
                       "'state_dict' or 'model'; read only")
        q.add_argument("--data", required=True, metavar="PKG.MODULE:FACTORY",
                       help="callable returning the clean data: a Dataset, a DataLoader or an "
                       "(X, y) pair of tensors")
        q.add_argument("--seed", type=int, default=0, help="random seed")
        q.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    s = sub.add_parser("sanitize", formatter_class=fmt, help="remove a backdoor with MEDIC",
                       description="Clone a (possibly trojaned) model with importance-driven "
                       "cloning on a small clean data set and save the clone's state_dict. "
                       "Never overwrites a file.")
    model_args(s)
    s.add_argument("--out", required=True, metavar="CLONE.pt",
                   help="where to save the clone's state_dict (must not exist)")
    s.add_argument("--layers", default=None, help="comma-separated module names to clone; "
                   "default every conv and BatchNorm output")
    s.add_argument("--tau", type=float, default=5.0, help="importance temperature (0: every "
                   "neuron weighs the same)")
    s.add_argument("--lam", type=float, default=10.0, help="weight of the clone loss next to CE")
    s.add_argument("--epochs", type=int, default=60, help="training epochs")
    s.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (cosine schedule)")
    s.add_argument("--batch-size", type=int, default=64, help="batch size")
    s.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay")
    s.add_argument("--criterion", choices=("abs", "signed"), default="abs",
                   help="activation criterion: |z| (paper eq. 2) or z (released code)")
    s.add_argument("--stats", choices=("channel", "neuron"), default="channel",
                   help="teacher statistics per channel or per neuron")
    s.add_argument("--device", default=None, help="torch device; default the model's (CPU)")
    s.add_argument("--state", default=None, metavar="PATH", help="training state written "
                   "atomically after every epoch, to resume an interrupted run")
    s.add_argument("--resume", action="store_true", help="continue from --state")
    s.add_argument("--eval-data", default=None, metavar="PKG.MODULE:FACTORY",
                   help="callable returning held-out data for per-epoch ACC")
    s.add_argument("--trigger", default=None, metavar="PKG.MODULE:NAME",
                   help="a trigger callable X -> X (e.g. a medic_fast.attacks instance) for "
                   "per-epoch ASR on --eval-data")
    s.add_argument("--target", type=int, default=None, help="the backdoor's target class "
                   "(with --trigger)")
    s.add_argument("--history", default=None, metavar="PATH.json",
                   help="also write the per-epoch history as JSON (must not exist)")
    s.set_defaults(func=_cmd_sanitize)

    c = sub.add_parser("scan", formatter_class=fmt, help="scan for a sample-targeted backdoor "
                       "(CLEAR)", description="Search the model's feature space for pockets "
                       "(CLEAR) and print the report as JSON.")
    model_args(c)
    c.add_argument("--threshold", type=float, default=0.5, help="flag a class pair whose "
                   "pocket-finding rate exceeds this")
    c.set_defaults(func=_cmd_scan)

    b = sub.add_parser("bench", formatter_class=fmt, help="time one clone-training step",
                       description="Median time of one training step of WRN-16-1 on random "
                       "inputs: plain cross-entropy, the MEDIC step of medic_fast, and the "
                       "released MEDIC code's way (two backward passes, input gradients, "
                       "per-layer eager loss).")
    b.add_argument("--batch", type=int, default=64, help="batch size")
    b.add_argument("--size", type=int, default=32, help="input height and width")
    b.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    b.add_argument("--backend", default="auto", choices=("auto", "cpp", "reference"),
                   help="backend of the importance clone loss")
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``medic-fast`` command."""
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
