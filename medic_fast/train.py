"""The one training loop and the one evaluator of the package.

:func:`fit` trains a module (MEDIC's clone, the baselines, CLEAR's patched layer, the harness's
models) with Adam, a cosine (or constant) learning rate over all steps, per-epoch seeding (a
run is deterministic given ``seed``, also when resumed), a stop with an error naming the step on
a non-finite loss, atomic checkpoints, a tqdm progress bar, and DistributedDataParallel when a
``torch.distributed`` process group is initialised (each process trains on its shard; rank 0
alone logs and writes checkpoints). :func:`evaluate` gives clean accuracy and attack success.
"""
from __future__ import annotations

import math
import os
import pickletools
import re
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medic_fast._utils import device_of, dist_shard, eval_mode, inner_module, preserved_rng, \
    save_atomic
from medic_fast.data import check_labels, check_pair, make_loader, set_epoch, unpack_batch

__all__ = ["fit", "evaluate", "evaluate_loader", "distributed", "load_checkpoint",
           "read_torch_file", "read_training_state", "CheckpointError", "state_diff",
           "describe_diff", "state_dict_mismatch", "check_trigger", "seeded", "SCHEDULES"]

CHECKPOINT_FORMAT = "medic_fast.train/1"
SCHEDULES = ("cosine", "constant")

LossFn = Callable[[Tensor, Tensor], Tuple[Tensor, Dict[str, Tensor]]]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, trigger=None, target=None, device=None, *,
                    name: str = "eval_data", logits: Optional[Callable] = None
                    ) -> Dict[str, Optional[float]]:
    """:func:`evaluate` over the ``(x, y, ...)`` batches of ``loader`` (``name`` in errors).
    ``logits``: takes the model's output to its logits (for models returning more than them)."""
    device = device_of(model, device)
    run = model if logits is None else (lambda v: logits(model(v)))
    correct = total = hits = victims = 0
    with eval_mode(model):
        for batch in loader:
            x, y = unpack_batch(batch, name)
            x, y = x.to(device), y.to(device)
            scores = run(x)
            check_labels(y, scores.shape[1], name)
            check_trigger(trigger, target, scores.shape[1])
            correct += int((scores.argmax(1) == y).sum())
            total += len(y)
            if trigger is not None:
                keep = y != target
                if keep.any():
                    hits += int((run(trigger(x[keep])).argmax(1) == target).sum())
                    victims += int(keep.sum())
    if total == 0:
        raise ValueError(f"{name} is empty: expected at least one batch, got none")
    if trigger is not None and victims == 0:
        raise ValueError(f"ASR needs inputs whose true label is not the target ({target}); "
                         "every label equals the target")
    return {"acc": correct / total, "asr": hits / victims if trigger is not None else None}


def check_trigger(trigger, target, classes: Optional[int] = None) -> None:
    """A trigger is a callable ``X -> triggered X``, given with an int target class (one of the
    model's, ``[0, classes)``, when ``classes`` is given)."""
    if trigger is None:
        return
    if not callable(trigger):
        raise TypeError(f"trigger must be callable (X -> triggered X), e.g. an attack from "
                        f"medic_fast.zoo.attacks, got {type(trigger).__name__}")
    if not isinstance(target, int) or isinstance(target, bool):
        raise TypeError(f"target must be the int target class when a trigger is given, got "
                        f"{target!r}")
    if classes is not None and not 0 <= target < classes:
        raise ValueError(f"target must be a class of the model, in [0, {classes}), got {target}")


@preserved_rng()
def evaluate(model: nn.Module, X: Tensor, y: Tensor, *, trigger: Optional[Callable] = None,
             target: Optional[int] = None, batch_size: int = 512) -> Dict[str, Optional[float]]:
    """Clean accuracy and attack success rate of ``model`` (run in eval mode; its training flags
    are restored).

    Returns ``{"acc": ..., "asr": ...}``: ``acc`` on ``(X, y)``; ``asr`` (None without a
    trigger) is the fraction of ``trigger(X)`` classified as ``target`` among the inputs whose
    true label is not ``target``. Labels and ``target`` must be classes of the model: in
    ``[0, classes)``, ``classes`` the width of its logits. The global random generator is left
    as it was.
    """
    check_pair(X, y, "(X, y)")
    check_trigger(trigger, target)
    return evaluate_loader(model, make_loader((X, y), batch_size=batch_size), trigger, target,
                           name="(X, y)")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

_STATE_ENTRIES = {"config": dict, "epoch": int, "model": dict, "optimizer": dict,
                  "scheduler": dict, "history": list}


def _version() -> str:
    from medic_fast import __version__  # at call time: the package imports this module

    return __version__


class CheckpointError(ValueError):
    """A training state that cannot be resumed, in one line: ``checkpoint PATH PROBLEM``.

    ``path``; ``problem``, what is wrong (without the path); ``diff``, for a state written by
    another run, its ``(what, saved, now)`` triples (:func:`state_diff`), so that a caller can
    word them its own way (the ``medic-fast`` command names its flags)."""

    def __init__(self, path, problem: str, diff: Sequence[Tuple[str, object, object]] = ()):
        self.path, self.problem, self.diff = path, problem, list(diff)
        super().__init__(f"checkpoint {path!r} {problem}" if path is not None else
                         f"the training state {problem}")


def read_torch_file(path):
    """``torch.load(path, weights_only=True)`` onto the CPU; a file it cannot read raises a
    ValueError saying what the file holds instead (not torch's advice to load it unsafely)."""
    try:
        with open(path, "rb") as f:  # not found, a directory, no permission: the OS's words
            head = f.read(2)
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    try:
        with warnings.catch_warnings():  # torch warns before failing on some plain pickles
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, OSError, RuntimeError, UnpicklingError...: unreadable
        raise ValueError(_unreadable(path, head, e)) from None


def _unreadable(path, head: bytes, error: Exception) -> str:
    """What the file at ``path``, starting with the bytes ``head``, holds, given that
    ``torch.load(weights_only=True)`` failed on it with ``error``."""
    size, text = os.path.getsize(path), str(error)
    if size == 0:
        return "the file is empty"
    blocked = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if blocked:
        return (f"it holds a pickled {blocked[1]}, blocked: only tensors and plain containers "
                "are loaded, for safety")
    if head == b"PK":  # torch.save's format: a zip archive holding data.pkl
        if not zipfile.is_zipfile(path):
            return f"a zip archive cut short at {size} bytes: a truncated torch.save file"
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "a zip archive without data.pkl, not a torch.save file"
        return f"a torch.save archive that cannot be read ({text.strip().splitlines()[-1]})"
    if head[:1] == b"\x80":  # a pickle's PROTO opcode
        protocol = f"a pickle (protocol {head[1]})" if len(head) > 1 else "a pickle"
        names, whole = _pickled_globals(path)
        if not whole:
            return f"{protocol} cut short at {size} bytes (truncated)"
        refers = f" that refers to {', '.join(names[:3])}" if names else ""
        return f"{protocol}{refers}, not a torch.save file"
    return f"not a torch.save file (neither a zip archive nor a pickle: it starts with {head!r})"


def _pickled_globals(path) -> Tuple[List[str], bool]:
    """The globals (``module.name``, first seen first) that the pickle at ``path`` refers to, and
    whether it is whole (ends with its STOP opcode); read with ``pickletools``, which runs
    nothing."""
    names: List[str] = []
    strings: List[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "STOP":
                    return names, True
                if op.name == "GLOBAL":
                    name = arg.replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) > 1:
                    name = ".".join(strings[-2:])
                else:
                    if isinstance(arg, str):
                        strings.append(arg)
                    continue
                if name not in names:
                    names.append(name)
    except (ValueError, OSError):  # pickletools on a truncated or malformed stream
        pass
    return names, False


def read_training_state(path) -> dict:
    """The training state :func:`fit` saved at ``path``; a file that is not one raises a
    ValueError with the reason alone."""
    state = read_torch_file(path)
    if isinstance(state, dict) and state and all(map(torch.is_tensor, state.values())):
        raise ValueError("it holds a model's state_dict, not a training state")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"no 'format': {CHECKPOINT_FORMAT!r} entry: not written by medic_fast")
    for key, kind in _STATE_ENTRIES.items():
        if key not in state:
            raise ValueError(f"no {key!r} entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ValueError(f"{key!r} is {type(state[key]).__name__}, expected {kind.__name__}")
    if not isinstance(state.get("inputs", {}), dict):
        raise ValueError(f"'inputs' is {type(state['inputs']).__name__}, expected dict")
    return state


def state_diff(state: dict, config: dict, inputs: Optional[dict] = None
               ) -> List[Tuple[str, object, object]]:
    """How the run that wrote ``state`` differs from this one: ``(what, saved, now)`` for the
    library version, each fingerprint in ``inputs`` (``"weights"``, ``"data"``) and each
    setting in ``config`` that differs (``saved`` None: not recorded)."""
    saved = {"version": state.get("version"), **state.get("inputs", {}), **state["config"]}
    now = {"version": _version(), **(inputs or {}), **config}
    return [(k, saved.get(k), v) for k, v in now.items() if saved.get(k) != v]


def describe_diff(diff: Sequence[Tuple[str, object, object]],
                  name: Optional[Callable[[str], str]] = None) -> str:
    """:func:`state_diff`'s triples in words, on one line; ``name(what)`` names each input or
    setting (default: as it is)."""
    name = name or str

    def shown(v):
        if v is None:
            return "not recorded"
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    parts = []
    for what, saved, now in diff:
        if what == "version":
            parts.append(f"medic_fast {shown(saved)} (now {shown(now)})")
        elif what == "weights":
            parts.append(f"{name(what)}: other values (digest {shown(saved)}, now {shown(now)})")
        elif what == "data" and isinstance(saved, dict) and isinstance(now, dict):
            fields = [f"{k} {saved.get(k)} (now {v})" if k != "sample" else
                      f"other values in the sampled rows (digest {shown(saved.get(k))}, now "
                      f"{shown(v)})" for k, v in now.items() if saved.get(k) != v]
            parts.append(f"{name(what)}: {', '.join(fields)}")
        else:
            parts.append(f"{name(what)} {shown(saved)} (now {shown(now)})")
    return ", ".join(parts)


def state_dict_mismatch(own: dict, saved: dict) -> Optional[str]:
    """How the ``saved`` state_dict differs from a model's ``own``: names, then shapes; None if
    it fits."""
    def some(names):
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k}: {list(saved[k].shape)} in the file, {list(v.shape)} in the model"
              for k, v in own.items() if torch.is_tensor(saved.get(k))
              and saved[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"missing {some(missing)}")
    if unexpected:
        parts.append(f"unexpected {some(unexpected)}")
    if shapes:
        parts.append(f"shape of {shapes[0]}" + (f"; {len(shapes) - 1} more shapes differ"
                                                 if shapes[1:] else ""))
    return "; ".join(parts) or None


def load_checkpoint(path, resume: bool, config: dict,
                    inputs: Optional[dict] = None) -> Optional[dict]:
    """The saved state to resume from, or None to start fresh. Refuses to overwrite a file the
    caller did not ask to resume from, to resume from a file that is not a readable training
    state (the error says why), and to resume a run of another library version, other
    ``inputs`` (fingerprints of the model's weights and the data: see :func:`fit`) or other
    settings (the :class:`CheckpointError` names each difference). :func:`fit` checks the rest
    (the epoch, the tensors' shapes) against the model and optimizer it resumes."""
    if path is None:
        if resume:
            raise ValueError("resume=True needs checkpoint=PATH")
        return None
    path = os.fspath(path)
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint {path!r}: the directory {folder!r} does not "
                                    "exist; create it first (checked before any training)")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"checkpoint {path!r}: the directory {folder!r} is not "
                                  "writable; choose another path (checked before any training)")
        return None
    if not resume:
        raise FileExistsError(f"checkpoint {path!r} exists; pass resume=True to continue from it, "
                              "or choose another path (it is never overwritten otherwise)")
    try:
        state = read_training_state(path)
    except ValueError as e:
        raise CheckpointError(path, f"is not a readable medic_fast training state ({e})") from None
    diff = state_diff(state, config, inputs)
    if diff:
        raise CheckpointError(path, f"was written by another run: {describe_diff(diff)}; resume "
                              "with the same model, data and settings, or start afresh with "
                              "another checkpoint path", diff)
    return state


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def _rank_world() -> Tuple[int, int]:
    part = dist_shard()
    return part if part is not None else (0, 1)


def distributed(module: nn.Module, device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel under an initialised process group of more
    than one process (call the wrapper to have gradients synchronised), else ``module``."""
    if _rank_world()[1] == 1:
        return module
    device = torch.device(device)
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device] if device.type == "cuda" else None)


@contextmanager
def seeded(seed: int):
    """Run the block as after ``torch.manual_seed(seed)``, and restore afterwards every generator
    that this reseeds (:func:`~medic_fast._utils.preserved_rng`: the CPU's and, once CUDA is
    initialised, every GPU's; ``fork_rng(devices=[device])`` alone would leave the other GPUs
    reseeded for good)."""
    with preserved_rng():
        torch.manual_seed(seed)
        yield


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63)


def fit(net: nn.Module, loader, loss_fn: LossFn, *, epochs: int, lr: float,
        weight_decay: float = 0.0, schedule: str = "cosine", seed: int = 0, device=None,
        augment: Optional[Callable[[Tensor], Tensor]] = None, params=None,
        progress: bool = False, desc: str = "train", checkpoint=None,
        config: Optional[dict] = None, state: Optional[dict] = None,
        extra: Optional[dict] = None, inputs: Optional[dict] = None, eval_loader=None,
        trigger=None, target=None, logits: Optional[Callable] = None,
        extras: bool = False) -> List[dict]:
    """Train ``net`` on ``loader`` and return the per-epoch history.

    Args:
        net: the module to train, or its DistributedDataParallel wrapper (see
            :func:`distributed`); the optimizer, checkpoints and evaluation use the inner module.
        loader: ``(x, y, ...)`` batches; under DDP each process's shard (``make_loader``).
        loss_fn: ``loss_fn(x, y) -> (loss, parts)``, ``parts`` a dict of named scalar tensors
            logged per epoch beside ``loss``; it calls ``net`` (or a :class:`Cloner` on it).
        epochs, lr, weight_decay: Adam (L2 weight decay) over ``params`` (default: every
            parameter of the module that requires grad).
        schedule: ``"cosine"`` (to 0 over all steps) or ``"constant"``.
        seed: seeds the global RNG per epoch (dropout, augmentation); with a seeded loader the
            run is deterministic, also when resumed.
        augment: optional ``x -> x`` on each training batch.
        progress, desc: a tqdm bar labelled ``desc`` on stderr (rank 0 only); a line per epoch
            instead when stderr is not a terminal (a log file).
        checkpoint, config, inputs, state, extra: write ``{format, version, config, inputs,
            epoch, model, optimizer, scheduler, history, **extra}`` atomically to
            ``checkpoint`` after every epoch (``inputs``: fingerprints of what the run reads,
            such as the data's, which :func:`load_checkpoint` compares on resuming); ``state``
            (from :func:`load_checkpoint`) resumes from one, once it is checked against the
            module, the optimizer and ``epochs`` (a :class:`CheckpointError` names what does not
            fit).
        eval_loader, trigger, target, logits: ACC (and ASR) after every epoch, in the history;
            ``logits`` takes the module's output to its logits (see :func:`evaluate_loader`).
        extras: also pass the batch's elements after the labels to ``loss_fn``
            (``loss_fn(x, y, *rest)``; :func:`~medic_fast.sanitize` passes sample indices).

    The module is left in eval mode. A non-finite loss on any process stops training before the
    update with a ``FloatingPointError`` naming the step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    module = inner_module(net)
    device = device_of(module, device)
    rank, world = _rank_world()
    steps = len(loader)
    if steps == 0:
        raise ValueError("data gives no batch (empty, or fewer samples than one batch with "
                         "drop_last)")
    params = [p for p in module.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
             if schedule == "cosine" else torch.optim.lr_scheduler.ConstantLR(opt, 1.0, 0))
    history: List[dict] = []
    start = 0
    if state is not None:
        _restore(state, module, opt, sched, epochs, steps, checkpoint)
        history, start = list(state["history"]), state["epoch"]
    elapsed = history[-1]["time"] if history else 0.0
    bar = None
    lines = progress and rank == 0 and not sys.stderr.isatty()  # a log: a line per epoch
    if progress and rank == 0 and not lines:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps, initial=start * steps, desc=desc, unit="step")
    # Batches from pinned memory are copied without blocking the host (a stream-ordered copy; from
    # pageable memory non_blocking changes nothing); never towards the CPU, where it would race.
    non_blocking = device.type == "cuda"
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            set_epoch(loader, epoch)
            net.train()
            sums = names = None
            with seeded(_epoch_seed(seed, epoch)):
                for b, batch in enumerate(loader):
                    x = batch[0].to(device, non_blocking=non_blocking)
                    y = batch[1].to(device, non_blocking=non_blocking)
                    if augment is not None:
                        x = augment(x)
                    loss, parts = loss_fn(x, y, *batch[2:]) if extras else loss_fn(x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    # The one host sync of a step, after the backward is queued (a GPU runs it
                    # while the host waits) and still before the update.
                    _check_finite(loss, epoch, b, steps, desc, checkpoint, world)
                    opt.step()
                    sched.step()
                    names = list(parts)
                    vals = torch.stack([loss.detach(), *(p.detach() for p in parts.values())])
                    sums = vals if sums is None else sums + vals
                    if bar is not None:
                        bar.update()
            if world > 1:
                dist.all_reduce(sums)
                sums /= world
            means = (sums / steps).tolist()
            elapsed += time.perf_counter() - t0
            row = {"epoch": epoch + 1, "loss": means[0], **dict(zip(names, means[1:])),
                   "lr": opt.param_groups[0]["lr"], "time": elapsed}
            if eval_loader is not None:
                row.update(evaluate_loader(module, eval_loader, trigger, target, device,
                                           logits=logits))
                if row["asr"] is None:
                    del row["asr"]
            history.append(row)
            shown = {k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "acc", "asr")}
            if bar is not None:
                bar.set_postfix(shown)
            if lines:
                print(f"{desc}: epoch {epoch + 1}/{epochs}, "
                      + ", ".join(f"{k} {v}" for k, v in shown.items())
                      + f" ({elapsed:.1f} s)", file=sys.stderr, flush=True)
            if checkpoint is not None:
                if rank == 0:
                    save_atomic({"format": CHECKPOINT_FORMAT, "version": _version(),
                                 "config": config or {}, "inputs": inputs or {},
                                 "epoch": epoch + 1, "model": module.state_dict(),
                                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "history": history, **(extra or {})}, checkpoint)
                if world > 1:
                    dist.barrier()
    finally:
        if bar is not None:
            bar.close()
    if world > 1:  # buffers (BatchNorm running stats) follow each process's batches: take rank 0's
        for buf in module.buffers():
            dist.broadcast(buf, 0)
    module.eval()
    return history


def _restore(state: dict, module: nn.Module, opt, sched, epochs: int, steps: int,
             checkpoint) -> None:
    """Load the training ``state`` into the module, optimizer and scheduler once it is checked
    to fit them and a run of ``epochs`` epochs of ``steps`` steps: a :class:`CheckpointError`
    names what does not (not a shape error in the middle of the run)."""
    path = None if checkpoint is None else os.fspath(checkpoint)

    def refuse(why):
        raise CheckpointError(path, f"does not fit this run: {why}")
    epoch, history = state["epoch"], state["history"]
    if not 1 <= epoch <= epochs:
        refuse(f"'epoch' is {epoch}, expected 1 to {epochs} (epochs completed)")
    if len(history) != epoch or any(
            not isinstance(row, dict) or row.get("epoch") != i + 1
            or not isinstance(row.get("time"), (int, float)) or not math.isfinite(row["time"])
            for i, row in enumerate(history)):
        refuse(f"'history' is not the {epoch} rows of epochs 1 to {epoch}")
    last = state["scheduler"].get("last_epoch")
    if last != epoch * steps:
        refuse(f"'scheduler' is at step {last}, expected {epoch * steps} ({epoch} epochs of "
               f"{steps} steps)")
    why = state_dict_mismatch(module.state_dict(), state["model"])
    if why:
        refuse(f"'model' does not fit the model ({why})")
    names = {p: n for n, p in module.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = state["optimizer"]
    groups = saved.get("param_groups")
    ids = [i for g in groups for i in g.get("params", ())] \
        if isinstance(groups, list) and all(isinstance(g, dict) for g in groups) else None
    if ids is None or len(ids) != len(params) or len(groups) != len(opt.param_groups):
        refuse(f"'optimizer' does not hold {len(params)} parameters in "
               f"{len(opt.param_groups)} group(s)")
    per_id = dict(zip(ids, params))
    for i, entries in (saved.get("state") or {}).items():
        p = per_id.get(i)
        for key, v in (entries.items() if isinstance(entries, dict) else ()):
            if p is not None and torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                refuse(f"'optimizer' {key} of {names.get(p, i)} is {list(v.shape)}, expected "
                       f"{list(p.shape)}")
    try:
        module.load_state_dict(state["model"])
        opt.load_state_dict(saved)
        sched.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        refuse(" ".join(str(e).split()))


def _check_finite(loss: Tensor, epoch: int, b: int, steps: int, desc: str, checkpoint,
                  world: int) -> None:
    """Stop on a NaN/inf loss (on any process) before it reaches the weights."""
    bad = ~torch.isfinite(loss.detach())
    if world > 1:
        flag = bad.to(torch.float32).reshape(1)
        dist.all_reduce(flag)
        bad = flag > 0
    if bool(bad):
        step = epoch * steps + b + 1
        msg = (f"{desc}: non-finite loss ({float(loss.detach()):g} on this process) at step {step} "
               f"(epoch {epoch + 1}, batch {b + 1} of {steps}); training stopped before the "
               "update")
        if checkpoint is not None:
            msg += (f". The last good state (end of epoch {epoch}) is in {os.fspath(checkpoint)!r};"
                    " continue with resume=True" if epoch > 0 else "; no epoch had completed")
        raise FloatingPointError(msg)
