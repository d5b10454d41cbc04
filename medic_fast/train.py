"""The one training loop and the one evaluator of the package.

:func:`fit` trains a module (MEDIC's clone, the baselines, CLEAR's patched layer, the harness's
models) with Adam, a cosine (or constant) learning rate over all steps, per-epoch seeding (a
run is deterministic given ``seed``, also when resumed), a stop with an error naming the step on
a non-finite loss, atomic checkpoints, a tqdm progress bar, and DistributedDataParallel when a
``torch.distributed`` process group is initialised (each process trains on its shard; rank 0
alone logs and writes checkpoints). :func:`evaluate` gives clean accuracy and attack success.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medic_fast._utils import device_of, dist_shard, eval_mode, inner_module, save_atomic
from medic_fast.data import check_labels, check_pair, make_loader, set_epoch, unpack_batch

__all__ = ["fit", "evaluate", "evaluate_loader", "distributed", "load_checkpoint",
           "read_torch_file", "read_training_state", "check_trigger", "seeded", "SCHEDULES"]

CHECKPOINT_FORMAT = "medic_fast.train/1"
SCHEDULES = ("cosine", "constant")

LossFn = Callable[[Tensor, Tensor], Tuple[Tensor, Dict[str, Tensor]]]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, trigger=None, target=None, device=None, *,
                    name: str = "eval_data") -> Dict[str, Optional[float]]:
    """:func:`evaluate` over the ``(x, y, ...)`` batches of ``loader`` (``name`` in errors)."""
    device = device_of(model, device)
    correct = total = hits = victims = 0
    with eval_mode(model):
        for batch in loader:
            x, y = unpack_batch(batch, name)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            check_labels(y, logits.shape[1], name)
            check_trigger(trigger, target, logits.shape[1])
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            if trigger is not None:
                keep = y != target
                if keep.any():
                    hits += int((model(trigger(x[keep])).argmax(1) == target).sum())
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


def evaluate(model: nn.Module, X: Tensor, y: Tensor, *, trigger: Optional[Callable] = None,
             target: Optional[int] = None, batch_size: int = 512) -> Dict[str, Optional[float]]:
    """Clean accuracy and attack success rate of ``model`` (run in eval mode; its training flags
    are restored).

    Returns ``{"acc": ..., "asr": ...}``: ``acc`` on ``(X, y)``; ``asr`` (None without a
    trigger) is the fraction of ``trigger(X)`` classified as ``target`` among the inputs whose
    true label is not ``target``. Labels and ``target`` must be classes of the model: in
    ``[0, classes)``, ``classes`` the width of its logits.
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


def read_torch_file(path):
    """``torch.load(path, weights_only=True)`` onto the CPU; a file it cannot read raises a
    ValueError with the reason alone (not torch's advice to load it unsafely)."""
    try:
        with warnings.catch_warnings():  # torch warns before failing on some plain pickles
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    except Exception as e:  # EOFError, RuntimeError, UnpicklingError, KeyError...: unreadable
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if pickled:
            why = (f"it holds a pickled {pickled[1]}; only tensors and plain containers are "
                   "loaded, for safety")
        else:
            why = "the file is empty" if os.path.getsize(path) == 0 else \
                "not a torch.save file, or truncated"
        raise ValueError(why) from None


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
    return state


def load_checkpoint(path, resume: bool, config: dict) -> Optional[dict]:
    """The saved state to resume from, or None to start fresh. Refuses to overwrite a file the
    caller did not ask to resume from, to resume from a file that is not a readable training
    state (the ValueError says why), and to resume a run with different settings."""
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
        raise ValueError(f"{path!r} is not a readable medic_fast checkpoint ({e})") from None
    diff = {k: (state["config"].get(k), v) for k, v in config.items()
            if state["config"].get(k) != v}
    if diff:
        raise ValueError("checkpoint {!r} was written with other settings; (saved, now): {}"
                         .format(path, diff))
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
    that this reseeds: the CPU's and, once CUDA is initialised, every GPU's.
    (``fork_rng(devices=[])`` or ``fork_rng(devices=[device])`` alone would leave the other GPUs
    reseeded for good; a CUDA generator's state lives on the host, so forking it is cheap.)"""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63)


def fit(net: nn.Module, loader, loss_fn: LossFn, *, epochs: int, lr: float,
        weight_decay: float = 0.0, schedule: str = "cosine", seed: int = 0, device=None,
        augment: Optional[Callable[[Tensor], Tensor]] = None, params=None,
        progress: bool = False, desc: str = "train", checkpoint=None,
        config: Optional[dict] = None, state: Optional[dict] = None,
        extra: Optional[dict] = None, eval_loader=None, trigger=None,
        target=None, extras: bool = False) -> List[dict]:
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
        progress, desc: a tqdm bar (rank 0 only) labelled ``desc``.
        checkpoint, config, state, extra: write ``{format, config, epoch, model, optimizer,
            scheduler, history, **extra}`` atomically to ``checkpoint`` after every epoch;
            ``state`` (from :func:`load_checkpoint`) resumes from one.
        eval_loader, trigger, target: ACC (and ASR) after every epoch, in the history.
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
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = list(state["history"]), int(state["epoch"])
    elapsed = history[-1]["time"] if history else 0.0
    bar = None
    if progress and rank == 0:
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
                row.update(evaluate_loader(module, eval_loader, trigger, target, device))
                if row["asr"] is None:
                    del row["asr"]
            history.append(row)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                 if k in ("loss", "acc", "asr")})
            if checkpoint is not None:
                if rank == 0:
                    save_atomic({"format": CHECKPOINT_FORMAT, "config": config or {},
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
