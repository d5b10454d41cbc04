"""MEDIC end to end (DESIGN.md §1): clone a trojaned model with importance-driven cloning, the
baselines it is compared with (fine-tuning, training from scratch), and ACC/ASR evaluation.

:func:`sanitize`, :func:`finetune` and :func:`train_from_scratch` share one training loop:
Adam with weight decay, a cosine learning-rate schedule over all steps, per-epoch seeding (the
run is deterministic given ``seed``, also when resumed), a stop with an error naming the step on a
non-finite loss, atomic checkpoints, a tqdm progress bar, and DistributedDataParallel when a
``torch.distributed`` process group is initialised (e.g. under ``torchrun``): each process trains
on its shard, statistics are merged over all processes, rank 0 alone logs and writes checkpoints.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast._utils import check_number, device_of, eval_mode, dist_shard, save_atomic
from medic_fast.capture import ActivationCapture, inplace_modified, resolve_layers, teacher_signals
from medic_fast.data import check_pair, make_loader, set_epoch
from medic_fast.ops.importance_clone import CRITERIA, importance_clone_loss
from medic_fast.stats import PER, LayerStats, _collect

__all__ = ["Result", "sanitize", "finetune", "train_from_scratch", "evaluate"]

_FORMAT = "medic_fast.train/1"


@dataclass
class Result:
    """What a training run returns: the trained ``model`` (a new module, in eval mode), the
    per-epoch ``history`` (losses, learning rate, elapsed seconds, and ``acc``/``asr`` when
    evaluation data was given) and, for :func:`sanitize`, the teacher's ``stats``."""
    model: nn.Module
    history: List[Dict[str, float]] = field(default_factory=list)
    stats: Optional[LayerStats] = None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _evaluate_loader(model: nn.Module, loader, trigger, target, device) -> Dict[str, Optional[float]]:
    correct = total = hits = victims = 0
    with eval_mode(model):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
            if trigger is not None:
                keep = y != target
                if keep.any():
                    hits += int((model(trigger(x[keep])).argmax(1) == target).sum())
                    victims += int(keep.sum())
    if trigger is not None and victims == 0:
        raise ValueError(f"ASR needs inputs whose true label is not the target ({target}); "
                         "every label equals the target")
    return {"acc": correct / total if total else float("nan"),
            "asr": hits / victims if trigger is not None else None}


def _check_trigger(trigger, target) -> None:
    if trigger is None:
        return
    if not callable(trigger):
        raise TypeError(f"trigger must be callable (X -> triggered X), e.g. an attack from "
                        f"medic_fast.attacks, got {type(trigger).__name__}")
    if not isinstance(target, int) or isinstance(target, bool):
        raise TypeError(f"target must be the int target class when a trigger is given, got "
                        f"{target!r}")


def evaluate(model: nn.Module, X: Tensor, y: Tensor, *, trigger: Optional[Callable] = None,
             target: Optional[int] = None, batch_size: int = 512) -> Dict[str, Optional[float]]:
    """Clean accuracy and attack success rate of ``model`` (run in eval mode; its training flags
    are restored).

    Returns ``{"acc": ..., "asr": ...}``: ``acc`` on ``(X, y)``; ``asr`` (None without a
    trigger) is the fraction of ``trigger(X)`` classified as ``target`` among the inputs whose
    true label is not ``target``.
    """
    check_pair(X, y, "(X, y)")
    _check_trigger(trigger, target)
    loader = make_loader((X, y), batch_size=batch_size)
    return _evaluate_loader(model, loader, trigger, target, device_of(model))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _load_checkpoint(path: Optional[str], resume: bool, config: dict) -> Optional[dict]:
    """The saved state to resume from, or None to start fresh. Refuses to overwrite a file the
    caller did not ask to resume from, and to resume a run with different settings."""
    if path is None:
        if resume:
            raise ValueError("resume=True needs checkpoint=PATH")
        return None
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    if not resume:
        raise FileExistsError(f"checkpoint {path!r} exists; pass resume=True to continue from it, "
                              "or choose another path (it is never overwritten otherwise)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a medic_fast training checkpoint")
    diff = {k: (state["config"].get(k), v) for k, v in config.items()
            if state["config"].get(k) != v}
    if diff:
        raise ValueError("checkpoint {!r} was written with other settings; (saved, now): {}"
                         .format(path, diff))
    return state


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def _dist_info():
    part = dist_shard()
    return part if part is not None else (0, 1)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63)


def _fit(module: nn.Module, loader, loss_fn, *, config: dict, epochs: int, lr: float,
         weight_decay: float, augment, seed: int, device, progress: bool, checkpoint,
         eval_loader, trigger, target, desc: str, extra: Optional[dict] = None,
         state: Optional[dict] = None) -> List[dict]:
    """Train ``module`` in place on ``loader`` minimising ``loss_fn(net, x, y) -> (loss, parts)``
    and return the history. ``state``: a checkpoint to resume from (see _load_checkpoint)."""
    rank, world = _dist_info()
    net = module
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None)
    steps = len(loader)
    if steps == 0:
        raise ValueError("data gives no batch (empty, or fewer samples than one batch with "
                         "drop_last)")
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
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
    devices = [device] if device.type == "cuda" else []
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            set_epoch(loader, epoch)
            net.train()
            sums = None
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_epoch_seed(seed, epoch))
                for b, batch in enumerate(loader):
                    x, y = batch[0].to(device), batch[1].to(device)
                    if augment is not None:
                        x = augment(x)
                    loss, parts = loss_fn(net, x, y)
                    _check_finite(loss, epoch, b, steps, desc, checkpoint, world)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    vals = torch.stack([loss.detach(), *(p.detach() for p in parts.values())])
                    sums = vals if sums is None else sums + vals
                    if bar is not None:
                        bar.update()
            if world > 1:
                dist.all_reduce(sums)
                sums /= world
            means = (sums / steps).tolist()
            elapsed += time.perf_counter() - t0
            row = {"epoch": epoch + 1, "loss": means[0],
                   **{k: v for k, v in zip(parts, means[1:])},
                   "lr": opt.param_groups[0]["lr"], "time": elapsed}
            if eval_loader is not None:
                row.update(_evaluate_loader(module, eval_loader, trigger, target, device))
                if row["asr"] is None:
                    del row["asr"]
            history.append(row)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()
                                 if k in ("loss", "acc", "asr")})
            if checkpoint is not None:
                if rank == 0:
                    save_atomic({"format": _FORMAT, "config": config, "epoch": epoch + 1,
                                  "model": module.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "history": history,
                                  **(extra or {})}, os.fspath(checkpoint))
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


# --------------------------------------------------------------------------------------------
# Models to train
# --------------------------------------------------------------------------------------------

def _reinitialised(model: nn.Module, factory: Optional[Callable[[], nn.Module]],
                   seed: int) -> nn.Module:
    """A new model of the same architecture with every parameter re-initialised (seeded), or
    ``factory()``; ``model`` itself is not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if factory is not None:
            if not callable(factory):
                raise TypeError(f"factory must be a callable returning a model, got "
                                f"{type(factory).__name__}")
            fresh = factory()
            if not isinstance(fresh, nn.Module):
                raise TypeError(f"factory() must return an nn.Module, got {type(fresh).__name__}")
            return fresh
        fresh = copy.deepcopy(model)
        for name, m in fresh.named_modules():
            owns = any(True for _ in m.parameters(recurse=False)) or \
                any(True for _ in m.buffers(recurse=False))
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            if owns and reset is None:
                raise ValueError(f"module {name or '<root>'!r} ({type(m).__name__}) holds "
                                 "parameters but has no reset_parameters(); pass factory=... to "
                                 "build a fresh model")
            if owns:
                reset()
    return fresh


def _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target) -> None:
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    check_number("lr", lr, positive=True)
    check_number("weight_decay", weight_decay, positive=False)
    _check_trigger(trigger, target)


def _setup(model, data, batch_size, seed, device, eval_data):
    """Device, training loader (shuffled, sharded under DDP) and evaluation loader."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    device = device_of(model, device)
    loader = make_loader(data, batch_size=batch_size, shuffle=True, seed=seed, shard=dist_shard())
    eval_loader = None if eval_data is None else make_loader(eval_data, batch_size=512,
                                                             name="eval_data")
    return device, loader, eval_loader


def _ce_loss(net, x, y):
    ce = F.cross_entropy(net(x), y)
    return ce, {"ce": ce}


def _train_ce(model, net, data, *, kind, epochs, lr, batch_size, weight_decay, augment, seed,
              device, progress, checkpoint, resume, eval_data, trigger, target) -> Result:
    """The baselines: ``net`` (a new module) trained with cross-entropy only."""
    device, loader, eval_loader = _setup(model, data, batch_size, seed, device, eval_data)
    config = {"method": kind, "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "weight_decay": weight_decay, "seed": seed, "augment": repr(augment)}
    state = _load_checkpoint(checkpoint, resume, config)
    net = net.to(device)
    history = _fit(net, loader, _ce_loss, config=config, epochs=epochs, lr=lr,
                   weight_decay=weight_decay, augment=augment, seed=seed, device=device,
                   progress=progress, checkpoint=checkpoint,
                   eval_loader=eval_loader, trigger=trigger, target=target, desc=kind,
                   state=state)
    return Result(net, history)


def finetune(model: nn.Module, data, *, epochs: int = 20, lr: float = 1e-3,
             batch_size: int = 64, weight_decay: float = 1e-4, augment=None, seed: int = 0,
             device=None, progress: bool = True, checkpoint=None, resume: bool = False,
             eval_data=None, trigger=None, target=None) -> Result:
    """Baseline: fine-tune a copy of ``model`` on the clean ``data`` with cross-entropy (Adam,
    cosine schedule; a learning rate 10x below the from-scratch one by default).
    Options as in :func:`sanitize`."""
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target)
    return _train_ce(model, copy.deepcopy(model), data, kind="finetune", epochs=epochs, lr=lr,
                     batch_size=batch_size, weight_decay=weight_decay, augment=augment, seed=seed,
                     device=device, progress=progress, checkpoint=checkpoint, resume=resume,
                     eval_data=eval_data, trigger=trigger, target=target)


def train_from_scratch(model: nn.Module, data, *, epochs: int = 60, lr: float = 0.01,
                       batch_size: int = 64, weight_decay: float = 1e-4, augment=None,
                       seed: int = 0, device=None, progress: bool = True, checkpoint=None,
                       resume: bool = False, eval_data=None, trigger=None, target=None,
                       factory: Optional[Callable[[], nn.Module]] = None) -> Result:
    """Baseline: a re-initialised model of ``model``'s architecture (or ``factory()``) trained
    on the clean ``data`` with cross-entropy only. Options as in :func:`sanitize`."""
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target)
    return _train_ce(model, _reinitialised(model, factory, seed), data, kind="scratch",
                     epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                     augment=augment, seed=seed, device=device, progress=progress,
                     checkpoint=checkpoint, resume=resume, eval_data=eval_data, trigger=trigger,
                     target=target)


class _CloneObjective:
    """One MEDIC step's loss, ``CE(clone(x), y) + lam * importance_clone_loss(all layers)``,
    called as ``objective(net, x, y) -> (loss, parts)``; ``net`` is the clone or its DDP wrapper
    and ``teacher`` must be frozen. The forward hooks exist only during the call, so the models
    run hook-free elsewhere (evaluation, the caller's own use)."""

    def __init__(self, teacher: nn.Module, clone: nn.Module, layers: Sequence[str],
                 stats: LayerStats, *, tau: float, lam: float, criterion: str, backend: str,
                 copies: Sequence[str] = ()):
        self.teacher_capture = ActivationCapture(teacher, layers, differentiable=True, copy=copies)
        self.clone_capture = ActivationCapture(clone, layers, copy=copies)
        self.teacher, self.stats = teacher, stats
        self.tau, self.lam, self.criterion, self.backend = tau, lam, criterion, backend

    def __call__(self, net: nn.Module, x: Tensor, y: Tensor):
        with self.teacher_capture as tcap, self.clone_capture as ccap:
            acts_t, grads = teacher_signals(self.teacher, tcap, x, y)
            ce = F.cross_entropy(net(x), y)
            acts_c = ccap.outputs()
        clone_loss = importance_clone_loss(acts_t, acts_c, grads, self.stats.mean,
                                           self.stats.std, tau=self.tau,
                                           criterion=self.criterion, backend=self.backend)
        return ce + self.lam * clone_loss, {"ce": ce, "clone": clone_loss}


def sanitize(model: nn.Module, data, *, layers: Optional[Sequence[str]] = None, tau: float = 5.0,
             lam: float = 10.0, epochs: int = 60, lr: float = 0.01, batch_size: int = 64,
             weight_decay: float = 1e-4, criterion: str = "abs", augment=None, stats="channel",
             seed: int = 0, device=None, progress: bool = True, checkpoint=None,
             resume: bool = False, eval_data=None, trigger=None, target=None,
             factory: Optional[Callable[[], nn.Module]] = None, backend: str = "auto") -> Result:
    """Remove a backdoor by importance-driven cloning (MEDIC).

    A clone of ``model``'s architecture is trained from a fresh initialisation on the small
    clean ``data`` with ``CE(clone(x), y) + lam * importance_clone_loss(...)`` over all hooked
    layers at once, the teacher (a frozen copy of ``model`` in eval mode) giving activations and
    loss gradients each step. ``model`` is not modified.

    Args:
        model: the trojaned model.
        data: clean training data: ``Dataset``, ``DataLoader`` or ``(X, y)`` tensors; batches
            are ``(inputs, labels, ...)``.
        layers: module names to clone; default the output of every conv and BatchNorm layer.
        tau, lam, criterion: importance temperature, clone-loss weight, ``"abs"`` | ``"signed"``.
        epochs, lr, batch_size, weight_decay: Adam with weight decay and a cosine schedule.
        augment: optional callable ``x -> x`` on each batch (e.g. ``data.RandomCropFlip``).
        stats: ``"channel"`` | ``"neuron"`` (collected from the teacher over ``data``), or a
            precomputed :class:`~medic_fast.stats.LayerStats` for ``layers``.
        seed: fixes the clone's initialisation, data order and augmentation.
        device: default the model's device.
        progress: show a tqdm progress bar (rank 0 only).
        checkpoint, resume: save the training state atomically after every epoch to this path;
            ``resume=True`` continues from it (an existing file is never overwritten otherwise).
        eval_data, trigger, target: if given, ACC (and ASR of ``trigger`` towards ``target``)
            on ``eval_data`` after each epoch, in the history.
        factory: builds the fresh clone instead of re-initialising a copy of ``model``.
        backend: of the loss (``"auto"``: the fused kernel for the device).

    Returns:
        :class:`Result` with ``model`` (the clone, eval mode), ``history`` and ``stats``.
    Raises:
        FloatingPointError: on a non-finite loss, naming the step.
    """
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target)
    check_number("tau", tau, positive=False)
    check_number("lam", lam, positive=False)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not (isinstance(stats, LayerStats) or stats in PER):
        raise ValueError(f"stats must be one of {PER} or a LayerStats, got {stats!r}")
    device, loader, eval_loader = _setup(model, data, batch_size, seed, device, eval_data)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    clone = _reinitialised(model, factory, seed).to(device)
    names = resolve_layers(teacher, layers)
    per = stats.per if isinstance(stats, LayerStats) else stats
    config = {"method": "medic", "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "weight_decay": weight_decay, "seed": seed, "augment": repr(augment), "tau": tau,
              "lam": lam, "criterion": criterion, "layers": names, "stats": per}
    state = _load_checkpoint(checkpoint, resume, config)
    copies = inplace_modified(teacher, names, next(iter(loader))[0].to(device))
    if state is not None:
        stats = LayerStats(names, state["stats_mean"], state["stats_std"], per,
                           state["stats_count"])
    elif isinstance(stats, LayerStats):
        if list(stats.layers) != names:
            raise ValueError(f"stats are for layers {stats.layers}, but the layers to clone are "
                             f"{names}")
    else:
        stats_loader = make_loader(data, batch_size=max(256, batch_size), shard=dist_shard())
        stats = _collect(teacher, stats_loader, names, per, device, copies)
    stats = stats.to(device)
    objective = _CloneObjective(teacher, clone, names, stats, tau=tau, lam=lam,
                                criterion=criterion, backend=backend, copies=copies)
    extra = {"stats_mean": stats.mean, "stats_std": stats.std, "stats_count": stats.count}
    history = _fit(clone, loader, objective, config=config, epochs=epochs, lr=lr,
                   weight_decay=weight_decay, augment=augment, seed=seed, device=device,
                   progress=progress, checkpoint=checkpoint, eval_loader=eval_loader,
                   trigger=trigger, target=target, desc="medic", extra=extra, state=state)
    return Result(clone, history, stats)
