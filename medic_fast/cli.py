"""The ``medic-fast`` command: ``demo``, ``sanitize``, ``scan`` and ``bench``; argument parsing
and the commands only.

``medic-fast <command> --help`` explains each option. The work of ``demo`` and ``bench`` is in
the evaluation harness (:func:`medic_fast.zoo.demo.run_demo`,
:func:`medic_fast.zoo.bench.bench_steps`), callable from Python.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from typing import List, Optional

import torch

__all__ = ["main"]


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

def _table(result: dict) -> str:
    from medic_fast.zoo.demo import DEFINITIONS

    s = result["settings"]
    lines = [f"{s['attack']} trojan (target class {s['target']}), defended with "
             f"{result['samples']['clean']} clean samples:",
             f"{'method':<14} {'ACC':>7} {'ASR':>7} {'seconds':>8}"]
    for r in result["results"]:
        lines.append(f"{r['method']:<14} {100 * r['acc']:6.1f}% {100 * r['asr']:6.1f}% "
                     f"{r['seconds']:8.1f}")
    lines += [f"{k}: {v}" for k, v in DEFINITIONS.items()]
    lines.append(f"total {result['phases']['total']:.1f} s (seed {result['seed']}, "
                 f"{result['threads']} threads)")
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
    from medic_fast.zoo.demo import run_demo

    out = args.out or _free_name("medic-fast-demo", ".json")
    why = _check_outputs([("--out", out, _NEVER_OVERWRITTEN)])
    if why:
        return _fail(why)
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

_NEVER_OVERWRITTEN = "exists and is never overwritten; choose another path"


def _check_outputs(outputs) -> Optional[str]:
    """Why one of the output files cannot be written, or None; checked before any work.

    ``outputs``: ``(flag, path, if_exists)`` triples (``path`` None: not given); ``if_exists``
    says why an existing file must not be replaced and what to do, or is None to replace it.
    """
    seen = {}
    for flag, path, if_exists in outputs:
        if path is None:
            continue
        what = f"{flag} {path!r}"
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            return f"{what}: is a directory; give a file path, e.g. " \
                f"{os.path.join(path, 'out' + (os.path.splitext(path)[1] or '.pt'))!r}"
        if os.path.lexists(path) and if_exists:
            return f"{what}: {if_exists}"
        if not os.path.lexists(folder):
            return f"{what}: directory {folder!r} does not exist; create it, or choose another path"
        if not os.path.isdir(folder):
            return f"{what}: {folder!r} is not a directory; choose another path"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{what}: directory {folder!r} is not writable; choose another path"
        key = os.path.realpath(path)
        if key in seen:
            return f"{what}: is the same file as {seen[key]}; give each output its own path"
        seen[key] = what
    return None


def _check_backend(backend: str, op: str, device) -> Optional[str]:
    """Why ``--device`` cannot be used here, or ``--backend`` cannot run ``op`` on it, or None
    (auto may fall back, warning)."""
    from medic_fast._extension import ExtensionUnavailable
    from medic_fast._utils import check_device
    from medic_fast.ops import _dispatch

    try:
        device = check_device("--device", device)
    except ValueError as e:
        return str(e)
    try:
        _dispatch.resolve(op, backend, device)
    except (ValueError, TypeError, ExtensionUnavailable) as e:
        why = " ".join(str(e).split())
        return f"--backend {backend!r}: {why}; use --backend auto or reference"
    return None


def _resolve(spec: str, option: str):
    """The object named by ``pkg.module:attr`` (the cwd is importable, as with ``python -m``)."""
    if ":" not in spec:
        raise _UserError(f"{option} {spec!r}: must look like pkg.module:name; name a callable "
                         "in an importable module")
    mod, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise _UserError(f"{option} {spec!r}: cannot import {mod!r} ({e}); run from the directory "
                         "that holds it, or install it")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _UserError(f"{option} {spec!r}: {mod!r} has no attribute {attr!r}; check the "
                             "name")
        obj = getattr(obj, part)
    return obj


def _call(spec: str, option: str):
    factory = _resolve(spec, option)
    if not callable(factory):
        raise _UserError(f"{option} {spec!r}: is not callable; name a function that returns the "
                         "object")
    return factory()


def _load_model(args):
    """The --model architecture with the --weights loaded (one-line errors naming the flags)."""
    from medic_fast.train import CHECKPOINT_FORMAT, read_torch_file, state_dict_mismatch

    model = _call(args.model, "--model")
    if not isinstance(model, torch.nn.Module):
        raise _UserError(f"--model {args.model!r}: returned {type(model).__name__}, not an "
                         "nn.Module; name a function that builds the model")
    what = f"--weights {args.weights!r}"
    save = "give the model's state_dict, saved with torch.save(model.state_dict(), PATH)"
    if not os.path.exists(args.weights):
        raise _UserError(f"{what}: does not exist; {save}")
    try:
        state = read_torch_file(args.weights)
    except ValueError as e:
        raise _UserError(f"{what}: is not a readable weights file ({e}); {save}") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        raise _UserError(f"{what}: is a training state written by --state, not model weights; to "
                         f"continue that run, pass it as --state {args.weights!r} with --resume "
                         "(and the trojaned model's weights as --weights)")
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise _UserError(f"{what}: holds a {type(state).__name__}, not a state_dict; {save}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        why = state_dict_mismatch(model.state_dict(), state) \
            or " ".join(str(e).split("\n", 1)[-1].split())
        raise _UserError(f"{what}: does not fit --model {args.model!r} ({why}); give the weights "
                         "of that architecture, or the --model they were saved from") from None
    return model


def _state_error(args, problem: str) -> str:
    """The one line for a --state that --resume cannot continue: its ``problem``, and what to
    do."""
    return (f"--state {args.state!r}: {problem}; give the --state file of the run to continue, "
            "with that run's --weights, --data and options, or another --state path without "
            "--resume")


def _another_run(args, diff) -> str:
    """``diff`` (:func:`medic_fast.train.state_diff`) in the command's words: its flags."""
    from medic_fast.train import describe_diff

    flags = vars(args)
    return "was written by another run: " + describe_diff(
        diff, lambda k: "--" + k.replace("_", "-") if k in flags else k)


def _check_resume(args) -> Optional[str]:
    """Why --resume cannot continue from an existing --state, or None: it must be a readable
    training state written by this version with the same options (checked before any work;
    sanitize then checks the weights, the data and the state's contents)."""
    from medic_fast.train import read_training_state, state_diff

    if not (args.resume and os.path.exists(args.state)):
        return None
    try:
        state = read_training_state(args.state)
    except ValueError as e:
        return _state_error(args, f"is not a readable medic_fast training state ({e})")
    options = {k: v for k, v in vars(args).items()
               if k in state["config"] and k != "augment" and v is not None}
    diff = state_diff(state, {"method": "medic", **options})
    return _state_error(args, _another_run(args, diff)) if diff else None


def _cmd_sanitize(args) -> int:
    import medic_fast as mf
    from medic_fast._utils import save_atomic
    from medic_fast.train import CheckpointError

    if (args.trigger is None) != (args.target is None) or (args.trigger and not args.eval_data):
        return _fail("--trigger, --target: given without each other or without --eval-data; "
                     "give all three for ASR, or none")
    if args.resume and args.state is None:
        return _fail("--resume: needs --state, the training state to continue from; give "
                     "--state PATH")
    why = _check_outputs([
        ("--out", args.out, _NEVER_OVERWRITTEN),
        ("--state", args.state, None if args.resume else
         "exists; pass --resume to continue from it, or choose another path"),
        ("--history", args.history, _NEVER_OVERWRITTEN)])
    why = why or _check_resume(args)
    why = why or _check_backend(args.backend, "importance_clone_loss", args.device or "cpu")
    if why:
        return _fail(why)
    model = _load_model(args)
    data = _call(args.data, "--data")
    eval_data = _call(args.eval_data, "--eval-data") if args.eval_data else None
    trigger = _resolve(args.trigger, "--trigger") if args.trigger else None
    try:
        result = mf.sanitize(
            model, data, recipe=args.recipe, layers=args.layers, tau=args.tau, lam=args.lam,
            epochs=args.epochs, min_steps=args.min_steps, lr=args.lr, batch_size=args.batch_size,
            weight_decay=args.weight_decay, criterion=args.criterion, stats=args.stats,
            augment=None if args.augment == "none" else args.augment, kd=args.kd,
            cache={None: None, "auto": "auto", "on": True, "off": False}[args.cache],
            threads=args.threads, seed=args.seed, device=args.device,
            progress=not args.no_progress,
            checkpoint=args.state, resume=args.resume, eval_data=eval_data, trigger=trigger,
            target=args.target, backend=args.backend)
    except CheckpointError as e:
        return _fail(_state_error(args, _another_run(args, e.diff) if e.diff else e.problem))
    kept = (f"the trained state is in --state {args.state!r}: run again with --resume and a "
            "writable --out to save the clone without retraining") if args.state else \
        "fix the path and run again"
    if os.path.lexists(args.out):
        return _fail(f"--out {args.out!r}: appeared during training and is never overwritten; "
                     f"{kept}")
    try:
        save_atomic(result.model.state_dict(), args.out)
    except OSError as e:
        return _fail(f"--out {args.out!r}: cannot write it: {e.strerror or e}; {kept}")
    if args.history is not None:
        try:
            _write_new(args.history, json.dumps(result.history, indent=2) + "\n")
        except OSError as e:
            return _fail(f"--history {args.history!r}: cannot write it: {e.strerror or e}; the "
                         f"clone is in --out {args.out!r}")
    last = result.history[-1]
    print(f"wrote {args.out} (epoch {last['epoch']}: loss {last['loss']:.4g}"
          + "".join(f", {k} {last[k]:.4f}" for k in ("acc", "asr") if k in last) + ")")
    return 0


def _check_plot(flag: str, path: Optional[str]) -> Optional[str]:
    """Why ``path`` cannot be written as a figure (matplotlib missing, an unknown file type), or
    None; checked before any work."""
    if path is None:
        return None
    from medic_fast.clear import plots

    try:
        plots._matplotlib()
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return f"{flag} {path!r}: {plots.MISSING}"
    kinds = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(path)[1][1:].lower()
    if ext not in kinds:
        return (f"{flag} {path!r}: " + (f"unknown image type {ext!r}" if ext else "no file type")
                + f"; end the name with one of {', '.join('.' + k for k in sorted(kinds))}")
    return None


# scan's exit status per verdict (2 is every command's error status)
_SCAN_EXIT = {"clean": 0, "flagged": 1, "inconclusive": 3}


def _scan_options(args) -> dict:
    """The scan settings given on the command line (the others keep scan()'s defaults)."""
    given = {"k": args.k, "n": args.n, "restarts": args.restarts, "cut": args.cut,
             "threshold": args.threshold, "max_memory": args.max_memory}
    if args.shadows:  # the --model factory builds the shadows' architecture
        given.update(shadows=args.shadows, factory=lambda: _call(args.model, "--model"),
                     false_alarm=args.false_alarm)
    return {k: v for k, v in given.items() if v is not None}


def _check_scan_backend(method: str, backend: str) -> Optional[str]:
    """Why ``--backend`` cannot run ``--method``'s search, or None; checked before any work."""
    from medic_fast.clear.detect import HULL_BACKENDS

    if method == "paper":
        return _check_backend(backend, "pocket_search", "cpu")
    if backend not in HULL_BACKENDS:
        return (f"--backend {backend!r}: --method hull runs its search in plain PyTorch and "
                f"takes --backend {' or '.join(HULL_BACKENDS)}; the extension's kernels "
                "(cpp, cuda) run --method paper")
    return None


def _check_shadows_args(args) -> Optional[str]:
    """Why --shadows cannot calibrate this scan, or None; checked before any work."""
    if not args.shadows:
        return None
    if args.method != "hull":
        return "--shadows calibrates --method hull (a depth); drop --shadows or use --method hull"
    if args.threshold is not None:
        return "--shadows sets the threshold: give --threshold or --shadows, not both"
    if not 0 < args.false_alarm < 1:
        return f"--false-alarm must be a number in (0, 1), got {args.false_alarm}"
    return None


def _gib(text: str) -> int:
    """An argparse ``type``: a positive number of GiB, as bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of GiB > 0, got {text}")
    return max(1, int(value * 2 ** 30))


def _cmd_scan(args) -> int:
    import medic_fast as mf

    scan = getattr(mf, "scan", None)
    if scan is None:
        return _fail("the CLEAR scanner (medic_fast.scan, in medic_fast/clear/) is not part of "
                     "this installation")
    why = _check_outputs([("--json", args.json, _NEVER_OVERWRITTEN),
                          ("--plot", args.plot, _NEVER_OVERWRITTEN)])
    why = why or _check_plot("--plot", args.plot)
    why = why or _check_scan_backend(args.method, args.backend)
    why = why or _check_shadows_args(args)
    if why:
        return _fail(why)
    report = scan(_load_model(args), _call(args.data, "--data"), method=args.method,
                  seed=args.seed, backend=args.backend, progress=not args.no_progress,
                  threads=args.threads, **_scan_options(args))
    if args.json is None:
        print(report.to_json())
    notes = sys.stderr if args.json is None else sys.stdout  # stdout: the JSON alone, if there
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and os.path.lexists(path):
            return _fail(f"{flag} {path!r}: appeared during the scan and is never overwritten; "
                         "run again with another path")
    if args.json is not None:
        try:
            _write_new(args.json, report.to_json(indent=2) + "\n")
        except OSError as e:
            return _fail(f"--json {args.json!r}: cannot write it: {e.strerror or e}")
        print(f"wrote {args.json} ({report!r})", file=notes)
    if args.plot is not None:
        try:
            f = open(args.plot, "xb")  # never replaces a file
        except OSError as e:
            return _fail(f"--plot {args.plot!r}: cannot write it: {e.strerror or e}")
        try:
            with f:
                report.plot(f)
        except BaseException:
            os.remove(args.plot)  # ours, half written
            raise
        print(f"wrote {args.plot}", file=notes)
    if report.verdict == "inconclusive":
        print(f"medic-fast: scan inconclusive: {report.advice}", file=sys.stderr)
    return _SCAN_EXIT[report.verdict]


# --------------------------------------------------------------------------------------------
# bench: one clone-training step
# --------------------------------------------------------------------------------------------

def _cmd_bench(args) -> int:
    from medic_fast._utils import available_cores, torch_threads
    from medic_fast.zoo.bench import bench_steps, paper_scale

    with torch_threads(args.threads or available_cores()):
        if args.paper_scale:
            r = paper_scale(args.repeats, args.warmup, args.backend,
                            progress=not args.no_progress)
        else:
            r = bench_steps(args.batch, args.size, args.repeats, args.warmup, args.backend,
                            progress=not args.no_progress)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"WRN-16-1, batch {r['batch']}, {r['size']}x{r['size']}, {r['hooked']} tensors hooked, "
          f"{r['threads']} threads, median of {r['repeats']}")
    for k, v in r["seconds"].items():
        print(f"  {k:<9} {1e3 * v:8.1f} ms  ({v / r['seconds']['plain']:.2f}x plain)")
    if args.paper_scale:
        p = r["paper_scale"]
        print(f"the paper's run: {p['inputs']} inputs, batch {p['batch']}, {p['epochs']} epochs "
              f"= {p['steps']} steps; ours adds a statistics pass of {p['stats_seconds']:.1f} s; "
              f"cached: the teacher's signals kept after the first epoch "
              f"({p['cache_bytes'] / 2 ** 30:.1f} GiB)")
        for k, v in p["projected_seconds"].items():
            print(f"  {k:<9} {v / 60:8.1f} min  ({v / p['projected_seconds']['plain']:.2f}x "
                  "plain)")
        print(f"  released / ours: {p['released_vs_ours']:.2f}x")
    return 0


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------

def _fail(msg: str) -> int:
    print(f"medic-fast: error: {msg}", file=sys.stderr)
    return 2


class _UserError(Exception):
    """A user error found inside a command: :func:`main` prints it with :func:`_fail` (rc 2)."""


def _interrupted(args) -> str:
    """The line printed on Ctrl-C; for sanitize, how to continue."""
    if args.command != "sanitize":
        return "medic-fast: interrupted"
    if args.state is None:
        return ("medic-fast: interrupted; --state PATH would have allowed resuming (with "
                "--resume) from the last completed epoch")
    if not os.path.exists(args.state):
        return ("medic-fast: interrupted before the first epoch completed; run the same command "
                "again")
    return ("medic-fast: interrupted; run the same command with --resume to continue from the "
            f"last completed epoch, saved in --state {args.state!r}")


_KERNEL_HELP = {"cpp": "the C++ extension (CPU)", "triton": "Triton (CUDA)",
                "cuda": "the extension's CUDA code"}


def _backend_arg(q, op: str, what: str) -> None:
    """``--backend``: the names of the ops' one vocabulary
    (:data:`medic_fast.ops._dispatch.BACKENDS`) that ``op`` takes."""
    from medic_fast.ops._dispatch import BACKENDS, KERNELS

    kernels = KERNELS[op]
    names = tuple(b for b in BACKENDS if b in ("auto", "reference") or b in kernels.values())
    fused = "; ".join(f"{name}: {_KERNEL_HELP[name]}" for name in names[2:])
    q.add_argument("--backend", choices=names, default="auto",
                   help=f"what runs {what}: auto: the fused kernel for the device, else (no C++ "
                   "compiler, say) the plain-PyTorch reference with one warning; reference: "
                   f"plain PyTorch (same results, slower); {fused}. A fused kernel named runs "
                   "or fails before any work")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, but only where the help does not give the default
    itself and there is one to show (not None, nor a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False \
                or re.search(r"\bdefault\b", action.help):
            return action.help
        return super()._get_help_string(action)


def _at_least(low: int):
    """An argparse ``type``: an int >= ``low`` (argparse turns the error into a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _scan_defaults() -> dict:
    """scan()'s keyword defaults, for the help texts (empty without the CLEAR scanner)."""
    try:
        from medic_fast.clear.detect import scan
    except ImportError:
        return {}
    return {name: p.default for name, p in inspect.signature(scan).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _names(text: str) -> List[str]:
    """An argparse ``type``: comma-separated names, spaces around them ignored."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one module name")
    return names


def _parser() -> argparse.ArgumentParser:
    from medic_fast.medic.recipes import RECIPES
    from medic_fast.zoo.demo import ATTACKS, DEMO_SETTINGS

    fmt = _HelpFormatter
    attack = type(ATTACKS[DEMO_SETTINGS["attack"]](0)).__name__
    p = argparse.ArgumentParser(
        prog="medic-fast", formatter_class=fmt,
        description="Remove (MEDIC) and detect (CLEAR) neural-network backdoors.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", formatter_class=fmt, help="digits demo: MEDIC vs baselines",
                       description=f"Train a {attack}-trojaned CNN on scikit-learn's digits, "
                       "then remove the backdoor with MEDIC and compare with plain cloning, "
                       "fine-tuning and training from scratch on the 10% clean split. Prints "
                       "ACC, ASR and seconds per method and writes them as JSON.")
    d.add_argument("--seed", type=int, default=0, help="seed of the split, poisoning, "
                   "initialisations and data order (the results are deterministic given it)")
    d.add_argument("--out", default=None, help="JSON file to write (must not exist); default "
                   "medic-fast-demo.json in the current directory, or the first free "
                   "medic-fast-demo-N.json")
    d.add_argument("--json", action="store_true", help="print the JSON on stdout instead of "
                   "writing a file (the table goes to stderr)")
    d.add_argument("--threads", type=_at_least(1), default=1, help="torch threads; the demo's "
                   "models are tiny, so more threads only help on an idle machine")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    d.set_defaults(func=_cmd_demo)

    def model_args(q):
        q.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY",
                       help="callable returning the model architecture (nn.Module); the "
                       "current directory is importable")
        q.add_argument("--weights", required=True, metavar="IN.pt",
                       help="the model's weights: a state_dict, or a dict holding one under "
                       "'state_dict' or 'model' (read only, tensors only: "
                       "torch.load(weights_only=True)); a training state is --state's")
        q.add_argument("--data", required=True, metavar="PKG.MODULE:FACTORY",
                       help="callable returning the clean data: a Dataset, a DataLoader or an "
                       "(X, y) pair of tensors")
        q.add_argument("--seed", type=int, default=0, help="random seed")
        q.add_argument("--no-progress", action="store_true", help="hide the progress on "
                       "stderr (a bar on a terminal, else a line per epoch)")

    s = sub.add_parser("sanitize", formatter_class=fmt, help="remove a backdoor with MEDIC",
                       description="Clone a (possibly trojaned) model with importance-driven "
                       "cloning on a small clean data set and save the clone's state_dict. "
                       "Never overwrites a file.")
    model_args(s)
    s.add_argument("--out", required=True, metavar="CLONE.pt",
                   help="where to save the clone's state_dict (must not exist)")
    d = RECIPES["default"]
    s.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                   help="the settings table of the options below that are not given (medic_fast."
                   "medic.recipes): the library's defaults, or the released code's recipe")
    s.add_argument("--layers", type=_names, default=None, help="comma-separated module names to "
                   "clone; default every conv and BatchNorm output, for a model without any its "
                   "repeated blocks, else its hidden Linear layers (the choice is printed)")
    s.add_argument("--tau", type=float, default=None, help=f"importance temperature (0: every "
                   f"neuron weighs the same; default {d['tau']})")
    s.add_argument("--lam", type=float, default=None,
                   help=f"weight of the clone loss next to CE (default {d['lam']})")
    s.add_argument("--epochs", type=_at_least(1), default=None,
                   help=f"training epochs (default {d['epochs']}, more if needed to reach "
                   "--min-steps; given alone: exactly this many)")
    s.add_argument("--min-steps", type=_at_least(0), default=None, help="at least this many "
                   f"optimizer steps, for small clean sets (default {d['min_steps']})")
    s.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate, cosine schedule (default {d['lr']})")
    s.add_argument("--batch-size", type=_at_least(1), default=None,
                   help=f"batch size (default {d['batch_size']})")
    s.add_argument("--weight-decay", type=float, default=None,
                   help=f"Adam weight decay (default {d['weight_decay']})")
    s.add_argument("--augment", choices=("recipe", "none", "crop", "crop+flip"),
                   default="recipe", help="batch augmentation of images: random crop (and "
                   f"horizontal flip); default the recipe's ({d['augment']})")
    s.add_argument("--kd", type=float, default=None, help="weight of a logit-distillation term "
                   f"(default {d['kd']}: it carried backdoors into the clone)")
    s.add_argument("--criterion", choices=("abs", "signed"), default=None,
                   help="activation criterion: |z| (paper eq. 2, default) or z (released code)")
    s.add_argument("--stats", choices=("channel", "neuron"), default=None,
                   help="teacher statistics per channel (default) or per neuron")
    s.add_argument("--cache", choices=("auto", "on", "off"), default=None, help="keep the "
                   "teacher's signals across epochs (same result, faster steps); default "
                   f"{d['cache']}: for (X, y) data without augmentation, 4 epochs or more")
    s.add_argument("--threads", type=_at_least(1), default=None, help="torch threads; default "
                   "one for small models, else every core this process may use")
    s.add_argument("--device", default=None, help="torch device; default the model's (CPU)")
    s.add_argument("--state", default=None, metavar="PATH", help="training state written "
                   "atomically after every epoch, to resume an interrupted run")
    s.add_argument("--resume", action="store_true", help="continue from --state, with the "
                   "--weights, --data and options of the run that wrote it (checked before any "
                   "training; a resumed run gives the uninterrupted run's clone)")
    s.add_argument("--eval-data", default=None, metavar="PKG.MODULE:FACTORY",
                   help="callable returning held-out data for per-epoch ACC")
    s.add_argument("--trigger", default=None, metavar="PKG.MODULE:NAME",
                   help="a trigger callable X -> X (e.g. a medic_fast.attacks instance) for "
                   "per-epoch ASR on --eval-data")
    s.add_argument("--target", type=int, default=None, help="the backdoor's target class "
                   "(with --trigger)")
    s.add_argument("--history", default=None, metavar="PATH.json",
                   help="also write the per-epoch history as JSON (must not exist)")
    _backend_arg(s, "importance_clone_loss", "the importance clone loss")
    s.set_defaults(func=_cmd_sanitize)

    c = sub.add_parser("scan", formatter_class=fmt, help="scan for a sample-targeted backdoor "
                       "(CLEAR)", description="Detects sample-targeted backdoors (one attacked "
                       "sample sent to a target class), not trigger backdoors such as BadNets: "
                       "for those use MEDIC (medic-fast sanitize). Searches for pockets "
                       "(CLEAR): by default within the local hulls of the clean samples at the "
                       "model's input (--method hull), or with the paper's Algorithm 1 in a "
                       "feature space (--method paper; --backend applies to it). Prints the "
                       "report as JSON, or writes it with --json. Never overwrites a file. "
                       "Exit status: 0 clean, 1 flagged, 3 inconclusive (a class could not be "
                       "searched, or no search step ran: the report's advice, also printed on "
                       "stderr, says what to change), 2 an error in the arguments or inputs.",
                       epilog="The report: verdict (flagged, clean or inconclusive; flagged "
                       "repeats it as true or false), target (of the best pair, when flagged), "
                       "advice (one line: what to change, empty when nothing needs to), pairs "
                       "([source, target, score] above --threshold, best first), P (the score "
                       "of every class pair, null where no search ran), searched (the source "
                       "classes searched), skipped and skip_reasons (the classes not searched: "
                       "their correctly classified samples, and why: none in the data, or fewer "
                       "than --k), n_searches (searches run), n_steps (steps the batch of "
                       "searches ran), n_found (searches that reached a point classified as "
                       "their target), n_abandoned (paper: searches that left the features' "
                       "range), pocket_sources and pocket_targets (the source and target class "
                       "of each pocket kept: paper: every found pocket, as many as n_found; "
                       "hull: only the points deeper than --threshold, so at most n_found), "
                       "cut, backend, model_dtype and search_dtype (the search runs in float32, "
                       "or float64 for a float64 model with --method hull), timing (seconds) and "
                       "settings (with the memory estimate and its limit, in bytes), "
                   "threshold_source (fixed, given by --threshold, or shadows) and "
                   "calibration (with --shadows: each shadow's largest score, what was "
                   "trained now, seconds, the cache key).")
    model_args(c)
    scan_defaults = _scan_defaults()
    c.add_argument("--method", choices=("hull", "paper"), default="hull", help="hull: search "
                   "the local hulls of every correctly classified sample's neighbourhood, score "
                   "a class pair by the depth of its deepest pocket (the default); paper: the "
                   "paper's Algorithm 1, score = the fraction of restarts that found a pocket")
    c.add_argument("--threshold", type=float, default=None, help="flag a class pair whose score "
                   "exceeds this; default 10.0 (depth) for hull, 0.5 (rate) for paper")
    c.add_argument("--shadows", type=_at_least(2), default=None, metavar="N", help="set the "
                   "threshold from N clean shadow models (5 or more advised; --method hull): "
                   "each a fresh --model trained on a random half of --data and scanned on the "
                   "other half, the threshold then flags a clean model with probability "
                   "--false-alarm. Costs N short trainings and half-size scans, cached in "
                   "$MEDIC_FAST_CACHE/shadows (default ~/.cache/medic_fast/shadows) by "
                   "architecture, data and --seed, so a second scan on the same data trains "
                   "nothing; the report says what it cost (calibration, timing.shadows) and "
                   "threshold_source. Default: the fixed threshold")
    c.add_argument("--false-alarm", type=float, default=0.05, metavar="RATE", help="with "
                   "--shadows: the chance that a clean model is flagged (default 0.05)")
    c.add_argument("--k", type=_at_least(2), default=None, help="samples per neighbourhood "
                   "(hull, default 8) or anchors per search (paper, default 5), at most 1024; a "
                   "class with fewer correctly classified samples is not searched")
    c.add_argument("--n", type=_at_least(1), default=None, help="hull: neighbourhoods per class, "
                   "drawn at random (default: every correctly classified sample's); paper: the "
                   "most confident samples per class the anchors are drawn from (default 50)")
    c.add_argument("--restarts", type=_at_least(1), default=None, help="paper: searches per "
                   "class pair (P's resolution is 1/restarts); default scan()'s: "
                   f"{scan_defaults.get('restarts', '?')}")
    c.add_argument("--cut", default=None, metavar="MODULE", help="name of the module whose "
                   "input is the space searched; default: the model's input (hull), or the "
                   "input of the second-to-last Linear layer, or of the last convolution or "
                   "residual block (paper; docs/DESIGN.md section 2)")
    c.add_argument("--max-memory", type=_gib, default=None, metavar="GIB", help="refuse, before "
                   "searching, a search estimated to take more memory than this; default half "
                   "the memory available")
    c.add_argument("--threads", type=_at_least(1), default=None, help="torch threads; default "
                   "every core this process may use")
    c.add_argument("--json", default=None, metavar="OUT.json", help="write the report there "
                   "as indented JSON (must not exist) instead of printing it")
    c.add_argument("--plot", default=None, metavar="OUT.png", help="draw the score "
                   "of every class pair as a heatmap (must not exist; the type from the "
                   "extension: .png, .pdf, .svg...); needs matplotlib: pip install "
                   "\"medic_fast[plot]\"")
    _backend_arg(c, "pocket_search", "the pocket search of --method paper (--method hull runs "
                 "in plain PyTorch and takes auto or reference)")
    c.set_defaults(func=_cmd_scan)

    b = sub.add_parser("bench", formatter_class=fmt, help="time one clone-training step",
                       description="Median time of one training step of WRN-16-1 on random "
                       "inputs: plain cross-entropy, the MEDIC step (medic_fast.Cloner), and the "
                       "released MEDIC code's way (two backward passes, input gradients, "
                       "per-layer eager loss).")
    b.add_argument("--batch", type=_at_least(1), default=64, help="batch size")
    b.add_argument("--size", type=_at_least(8), default=32, help="input height and width")
    b.add_argument("--repeats", type=_at_least(1), default=20, help="timed steps per variant")
    b.add_argument("--warmup", type=_at_least(0), default=3, help="untimed steps per variant first")
    b.add_argument("--backend", default="auto", choices=("auto", "cpp", "reference"),
                   help="backend of the importance clone loss")
    b.add_argument("--paper-scale", action="store_true", help="also project the wall-clock "
                   "of the paper's whole run (2,500 inputs of 32x32x3, batch 64, 60 epochs) from "
                   "the step times and a timed statistics pass (--batch and --size are then "
                   "the paper's)")
    b.add_argument("--threads", type=_at_least(1), default=None, help="torch threads; default "
                   "every core this process may use")
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    b.add_argument("--no-progress", action="store_true", help="hide the progress lines (a line "
                   "per round of steps, on stderr)")
    b.set_defaults(func=_cmd_bench)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, ``medic-fast: warning: ...``: the library source line
    that raised it means nothing to the command's user."""
    text = " ".join(str(message).split())
    print(f"medic-fast: warning: {text.removeprefix('medic_fast: ')}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``medic-fast`` command."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():  # restores showwarning on return
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except (_UserError, ValueError, TypeError) as e:  # the library's argument, data errors
            return _fail(str(e))
        except FloatingPointError as e:  # the training loop's stop on a non-finite loss
            msg = str(e).replace("continue with resume=True", "run the same command with --resume")
            print(f"medic-fast: {msg}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(_interrupted(args), file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
