"""MEDIC end to end (DESIGN.md §1): clone a trojaned model with importance-driven cloning, and
the baselines it is compared with (fine-tuning, training from scratch).

:func:`sanitize` trains a fresh clone with :func:`medic_fast.train.fit` on the objective of a
:class:`~medic_fast.medic.cloner.Cloner`; the baselines train with cross-entropy on the same
loop (Adam with weight decay, cosine schedule, per-epoch seeding, atomic checkpoints and resume,
a stop on a non-finite loss, a progress bar, and DistributedDataParallel under ``torchrun``:
each process trains on its shard and statistics are merged over all processes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medic_fast._utils import auto_threads, check_int, check_module, check_number, device_of, \
    dist_shard, eval_mode, forward_macs, torch_threads
from medic_fast.capture import inplace_modified, resolve_layers
from medic_fast.data import as_dataset, check_labels, first_batch, make_loader
from medic_fast.medic import recipes
from medic_fast.medic.cache import TeacherCache
from medic_fast.medic.cloner import Cloner
from medic_fast.ops.importance_clone import CRITERIA
from medic_fast.stats import PER, LayerStats, collect_stats
from medic_fast.train import check_trigger, distributed, fit, load_checkpoint, seeded

__all__ = ["Result", "sanitize", "finetune", "train_from_scratch"]


@dataclass
class Result:
    """What a training run returns: the trained ``model`` (a new module, in eval mode), the
    per-epoch ``history`` (losses, learning rate, elapsed seconds, and ``acc``/``asr`` when
    evaluation data was given) and, for :func:`sanitize`, the teacher's ``stats``."""
    model: nn.Module
    history: List[Dict[str, float]] = field(default_factory=list)
    stats: Optional[LayerStats] = None


# --------------------------------------------------------------------------------------------
# Models to train
# --------------------------------------------------------------------------------------------

def _reinitialised(model: nn.Module, factory: Optional[Callable[[], nn.Module]],
                   seed: int) -> nn.Module:
    """A new model of the same architecture with every parameter re-initialised (seeded), or
    ``factory()``; ``model`` itself is not touched, nor the caller's RNG state: the CPU's and
    every GPU's are restored (a CUDA model re-initialises from the seeded CUDA generator).
    Every parameter of the copy requires grad, also where ``model``'s were frozen."""
    with seeded(seed):
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
    return fresh.requires_grad_(True)  # a frozen trojan still gives a clone to train


def _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data) -> None:
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    check_number("lr", lr, positive=True)
    check_number("weight_decay", weight_decay)
    check_trigger(trigger, target)
    if trigger is not None and eval_data is None:
        raise ValueError("trigger needs eval_data, the data the ASR is measured on; got "
                         "eval_data=None")


@torch.no_grad()
def _classes(model: nn.Module, x) -> int:
    """The number of classes of ``model``: the class dim of its logits on the batch ``x``."""
    with eval_mode(model):
        return model(x).shape[1]


_SETTINGS = ("epochs", "lr", "batch_size", "weight_decay", "seed", "augment")


def _config(method: str, *, epochs, lr, batch_size, weight_decay, seed, augment, **more) -> dict:
    """The settings a checkpoint records; resuming with other settings is refused."""
    return {"method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size,
            "weight_decay": weight_decay, "seed": seed, "augment": repr(augment), **more}


def _train(net: nn.Module, data, objective, *, classes: int, config: dict, state, epochs, lr,
           batch_size, weight_decay, augment, seed, device, progress, checkpoint, eval_data,
           trigger, target, extra=None, extras=False) -> List[dict]:
    """Train ``net`` (on ``device``; DDP-wrapped by the caller when distributed) with
    ``objective(x, y) -> (loss, parts)`` on :func:`~medic_fast.train.fit`. The labels of the
    first epoch (each sample's once) are checked against ``classes`` before the loss uses them."""
    loader = make_loader(data, batch_size=batch_size, shuffle=True, seed=seed, shard=dist_shard())
    eval_loader = None if eval_data is None else make_loader(eval_data, batch_size=512,
                                                             name="eval_data")
    unchecked = len(loader)

    def checked(x, y, *rest):
        nonlocal unchecked
        if unchecked:
            check_labels(y, classes)
            unchecked -= 1
        return objective(x, y, *rest)

    return fit(net, loader, checked, epochs=epochs, lr=lr, weight_decay=weight_decay,
               augment=augment, seed=seed, device=device, progress=progress,
               desc=config["method"], checkpoint=checkpoint, config=config, state=state,
               extra=extra, eval_loader=eval_loader, trigger=trigger, target=target,
               extras=extras)


def _train_ce(model, fresh, data, *, method, device, resume, **kw) -> Result:
    """The baselines: ``fresh`` (a new module) trained with cross-entropy only."""
    check_module("model", model)
    device = device_of(model, device)
    config = _config(method, **{k: kw[k] for k in _SETTINGS})
    state = load_checkpoint(kw["checkpoint"], resume, config)
    fresh = fresh.to(device)
    classes = _classes(fresh, first_batch(data, kw["batch_size"])[0].to(device))
    check_trigger(kw["trigger"], kw["target"], classes)
    net = distributed(fresh, device)

    def objective(x, y):
        ce = F.cross_entropy(net(x), y)
        return ce, {"ce": ce}

    return Result(fresh, _train(net, data, objective, classes=classes, config=config, state=state,
                                device=device, **kw))


def finetune(model: nn.Module, data, *, epochs: int = 20, lr: float = 1e-3,
             batch_size: int = 64, weight_decay: float = 1e-4, augment=None, seed: int = 0,
             device=None, progress: bool = True, checkpoint=None, resume: bool = False,
             eval_data=None, trigger=None, target=None) -> Result:
    """Baseline: fine-tune a copy of ``model`` on the clean ``data`` with cross-entropy (Adam,
    cosine schedule; a learning rate 10x below the from-scratch one by default).
    Options as in :func:`sanitize`."""
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data)
    return _train_ce(model, copy.deepcopy(model), data, method="finetune", epochs=epochs, lr=lr,
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
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data)
    return _train_ce(model, _reinitialised(model, factory, seed), data, method="scratch",
                     epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                     augment=augment, seed=seed, device=device, progress=progress,
                     checkpoint=checkpoint, resume=resume, eval_data=eval_data, trigger=trigger,
                     target=target)


def sanitize(model: nn.Module, data, *, recipe: str = "default", layers=None, tau=None,
             lam=None, epochs: Optional[int] = None, min_steps: Optional[int] = None, lr=None,
             batch_size: Optional[int] = None, weight_decay=None, criterion=None,
             augment="recipe", stats=None, kd=None, kd_temperature=None, cache=None,
             seed: int = 0,
             device=None, threads: Optional[int] = None, progress: bool = True,
             checkpoint=None, resume: bool = False, eval_data=None, trigger=None, target=None,
             factory: Optional[Callable[[], nn.Module]] = None, backend: str = "auto") -> Result:
    """Remove a backdoor by importance-driven cloning (MEDIC).

    A clone of ``model``'s architecture is trained from a fresh initialisation on the small
    clean ``data`` with ``CE(clone(x), y) + lam * importance_clone_loss(...)`` over all hooked
    layers at once, the teacher (a frozen copy of ``model`` in eval mode) giving activations and
    loss gradients each step. ``model`` is not modified.

    Every option left as None comes from ``recipe`` (:data:`medic_fast.medic.recipes.RECIPES`,
    the one table the CLI, the demo and the benchmarks read too). The defaults, and why:

    * layers: every conv and BatchNorm output, as the paper clones them;
    * tau 20 (the paper's is 5), lam 10, criterion ``"abs"``, stats ``"channel"``: at tau 5 a
      ResNet clone kept 20-70% of the backdoor's ASR; tau 20 kept it near or below 10% at
      about 2.5 points of ACC (the paper tunes tau per task too); lam 3 or 30 changed nothing;
    * epochs 60, extended to at least ``min_steps`` = 1000 optimizer steps: 60 epochs of a small
      clean set are too few steps (60 on 5% of digits); 1000 gained 0.5-1.4 points of ACC over
      500;
    * Adam lr 0.01, weight decay 1e-4, cosine schedule, batch 64: the paper's;
    * augment None: random crops let the teacher's backdoor into the clone on 8x8 digits;
      ``"crop+flip"`` suits natural images;
    * kd 0 (no logit matching): matching the teacher's logits transferred the backdoor;
    * cache ``"auto"``: when the inputs are the same every epoch (``(X, y)`` tensors, no
      augmentation), the teacher's signals of the first epoch are kept
      (:class:`~medic_fast.medic.cache.TeacherCache`, up to 8 GiB) and later steps skip the
      teacher: a step costs about 1.2x a plain one instead of 1.8x.

    The measurements are in ``benchmarks/RESULTS.md`` §10. ``recipe="paper"`` is the released
    code's recipe: 60 epochs whatever the data size, random crop and flip.

    Args:
        model: the trojaned model.
        data: clean training data: ``Dataset``, ``DataLoader`` or ``(X, y)`` tensors; batches
            are ``(inputs, labels, ...)``, labels in ``[0, classes)`` (the width of the model's
            logits; checked batch by batch in the first epoch).
        recipe: ``"default"`` or ``"paper"``.
        layers: module names to clone; default the output of every conv and BatchNorm layer.
        tau, lam, criterion: importance temperature, clone-loss weight, ``"abs"`` | ``"signed"``.
        epochs, min_steps: train ``epochs`` epochs, more if needed to take ``min_steps``
            optimizer steps (``epochs`` given alone means exactly that many).
        lr, batch_size, weight_decay: Adam with weight decay and a cosine schedule.
        augment: ``"recipe"`` (the recipe's), None, ``"crop"``, ``"crop+flip"`` (see
            :func:`~medic_fast.medic.recipes.make_augment`) or a callable ``x -> x`` on each
            batch (e.g. ``data.RandomCropFlip``).
        stats: ``"channel"`` | ``"neuron"`` (collected from the teacher over ``data``), or a
            precomputed :class:`~medic_fast.stats.LayerStats` for ``layers``.
        kd, kd_temperature: weight and temperature of an added logit-distillation term
            (:func:`~medic_fast.medic.cloner.distill_loss`).
        cache: ``"auto"``, True or False: keep the teacher's signals across epochs. ``"auto"``
            keeps them for ``(X, y)`` tensors (or a ``TensorDataset``) without augmentation,
            in runs of at least 4 epochs (filling the cache costs more than 3 epochs save);
            True also for another ``Dataset`` (whose items must then be the same every epoch);
            never for a ``DataLoader`` (no sample indices). Exact up to float rounding.
        seed: fixes the clone's initialisation, data order and augmentation.
        device: default the model's device.
        threads: torch intra-op threads while it runs (restored after); default one for small
            models, whose threads only wait on each other, else every core this process may use
            (:func:`medic_fast._utils.auto_threads`).
        progress: show a tqdm progress bar (rank 0 only).
        checkpoint, resume: save the training state atomically after every epoch to this path;
            ``resume=True`` continues from it (an existing file is never overwritten otherwise).
        eval_data, trigger, target: if given, ACC (and ASR of ``trigger`` towards ``target``)
            on ``eval_data`` after each epoch, in the history; a trigger needs ``eval_data``.
        factory: builds the fresh clone instead of re-initialising a copy of ``model``.
        backend: of the loss (``"auto"``: the fused kernel for the device).

    Returns:
        :class:`Result` with ``model`` (the clone, eval mode), ``history`` and ``stats``.
    Raises:
        FloatingPointError: on a non-finite loss, naming the step.
    """
    if epochs is not None and min_steps is None:
        min_steps = 0
    r = recipes.recipe(recipe, layers=layers, tau=tau, lam=lam, epochs=epochs,
                       min_steps=min_steps, lr=lr, batch_size=batch_size,
                       weight_decay=weight_decay, criterion=criterion, stats=stats, kd=kd,
                       kd_temperature=kd_temperature, cache=cache)
    check_int("min_steps", r["min_steps"], 0)
    _check_common(r["epochs"], r["lr"], r["batch_size"], r["weight_decay"], seed, trigger,
                  target, eval_data)
    check_number("tau", r["tau"])
    check_number("lam", r["lam"])
    if r["criterion"] not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {r['criterion']!r}")
    stats = r["stats"]
    if not (isinstance(stats, LayerStats) or stats in PER):
        raise ValueError(f"stats must be one of {PER} or a LayerStats, got {stats!r}")
    if threads is not None:
        check_int("threads", threads)
    check_module("model", model)
    device = device_of(model, device)
    first = first_batch(data, r["batch_size"])[0].to(device)
    augment = recipes.make_augment(r["augment"] if augment == "recipe" else augment, first)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    if threads is None:
        threads = auto_threads(forward_macs(teacher, first)) if device.type == "cpu" else None
    with torch_threads(threads):
        return _sanitize(teacher, model, data, r, first, augment, seed=seed, device=device,
                         progress=progress, checkpoint=checkpoint, resume=resume,
                         eval_data=eval_data, trigger=trigger, target=target, factory=factory,
                         backend=backend)


def _sanitize(teacher, model, data, r, first, augment, *, seed, device, progress, checkpoint,
              resume, eval_data, trigger, target, factory, backend) -> Result:
    clone = _reinitialised(model, factory, seed).to(device)
    names = resolve_layers(teacher, r["layers"])
    stats = r["stats"]
    per = stats.per if isinstance(stats, LayerStats) else stats
    batches = len(make_loader(data, batch_size=r["batch_size"], shard=dist_shard()))
    epochs = recipes.training_epochs(r["epochs"], r["min_steps"], batches)
    settings = dict(epochs=epochs, lr=r["lr"], batch_size=r["batch_size"],
                    weight_decay=r["weight_decay"], seed=seed, augment=augment)
    config = _config("medic", **settings, tau=r["tau"], lam=r["lam"], criterion=r["criterion"],
                     layers=names, stats=per, kd=r["kd"], kd_temperature=r["kd_temperature"])
    state = load_checkpoint(checkpoint, resume, config)
    copies = inplace_modified(teacher, names, first)
    classes = _classes(teacher, first)
    check_trigger(trigger, target, classes)
    if state is not None:
        stats = LayerStats(names, state["stats_mean"], state["stats_std"], per,
                           state["stats_count"])
    elif isinstance(stats, LayerStats):
        if list(stats.layers) != names:
            raise ValueError(f"stats are for layers {stats.layers}, but the layers to clone are "
                             f"{names}")
    else:
        stats = collect_stats(teacher, data, names, per, copy=copies,
                              batch_size=max(256, r["batch_size"]), device=device)
    net = distributed(clone, device)
    data, cache = _teacher_cache(data, r["cache"], augment, epochs)
    cloner = Cloner(teacher, net, names, stats, tau=r["tau"], lam=r["lam"],
                    criterion=r["criterion"], copy=copies, backend=backend, kd=r["kd"],
                    kd_temperature=r["kd_temperature"], cache=cache)

    def objective(x, y, index=None):
        loss = cloner(x, y, index=index)
        last = cloner.last
        return loss, {"ce": last.ce, "clone": last.clone, **({"kd": last.kd} if r["kd"] else {})}

    extra = {"stats_mean": cloner.stats.mean, "stats_std": cloner.stats.std,
             "stats_count": stats.count}
    history = _train(net, data, objective, classes=classes, config=config, state=state, extra=extra,
                     device=device, progress=progress, checkpoint=checkpoint,
                     eval_data=eval_data, trigger=trigger, target=target,
                     extras=cache is not None, **settings)
    return Result(clone, history, stats)


class _Indexed(Dataset):
    """``dataset``'s ``(x, y)`` items with their index: ``(x, y, i)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item[0], item[1], i


# Filling the cache costs about one and a half epochs' saving (the writes of the first epoch),
# so "auto" caches only runs of at least this many epochs (RESULTS §10.4).
CACHE_MIN_EPOCHS = 4


def _teacher_cache(data, mode, augment, epochs):
    """``(data, cache)``: the data with sample indices and a :class:`TeacherCache` for them, or
    the data as it is and None (see ``sanitize``'s ``cache``)."""
    if mode not in ("auto", True, False):
        raise ValueError(f"cache must be 'auto', True or False, got {mode!r}")
    if mode is False or (mode == "auto" and (augment is not None
                                             or epochs < CACHE_MIN_EPOCHS)):
        return data, None
    if isinstance(data, DataLoader):
        if mode is True:
            raise ValueError("cache=True needs (X, y) tensors or a Dataset: a DataLoader's "
                             "sampler gives no sample indices; pass its dataset, or cache=False")
        return data, None
    dataset = as_dataset(data)
    if isinstance(dataset, TensorDataset):
        X, y = dataset.tensors[:2]
        indexed = TensorDataset(X, y, torch.arange(len(y)))
    elif mode is True:
        indexed = _Indexed(dataset)
    else:
        return data, None
    return indexed, TeacherCache(len(indexed))
