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
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medic_fast._utils import auto_threads, build_model, check_device, check_int, check_module, \
    check_number, device_of, digest, dist_shard, eval_mode, forward_macs, preserved_rng, \
    torch_threads, user_stacklevel
from medic_fast.capture import PLANES, ActivationCapture, default_plane, inplace_modified, \
    resolve_layers, teacher_signals
from medic_fast.data import as_dataset, check_labels, fingerprint, first_batch, make_loader, \
    set_epoch
from medic_fast.medic import recipes
from medic_fast.medic.cache import TeacherCache
from medic_fast.medic.cloner import Cloner, _logits, default_forward, default_loss
from medic_fast.ops import _dispatch
from medic_fast.ops.importance_clone import CRITERIA
from medic_fast.stats import PER, LayerStats, collect_stats, stat_shapes
from medic_fast.train import CheckpointError, check_trigger, distributed, fit, load_checkpoint, \
    seeded

__all__ = ["Result", "sanitize", "finetune", "train_from_scratch"]


@dataclass
class Result:
    """What a training run returns: the trained ``model`` (a new module, in eval mode), the
    per-epoch ``history`` (losses, learning rate, elapsed seconds, and ``acc``/``asr`` when
    evaluation data was given) and, for :func:`sanitize`, the teacher's ``stats`` and the
    ``layers`` cloned (their names, whether given or the default plane)."""
    model: nn.Module
    history: List[Dict[str, float]] = field(default_factory=list)
    stats: Optional[LayerStats] = None
    layers: List[str] = field(default_factory=list)


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
            return build_model("factory", factory)
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


def _model_logits(output) -> Tensor:
    """A model's logits: its output, a tuple's first element or ``.logits`` (as the
    :class:`Cloner` takes them)."""
    return _logits(output, f"the model returned {type(output).__name__}; expected logits: a "
                   "tensor [batch, classes], a tuple whose first element is one, or an output "
                   "with .logits")


@torch.no_grad()
def _classes(model: nn.Module, x, name: str = "data") -> int:
    """The number of classes of ``model``: the class dim of its logits on the batch ``x`` of
    ``name``. A model that fails on ``x`` over the dtypes is a ValueError naming both."""
    with eval_mode(model):
        try:
            out = model(x)
        except RuntimeError as e:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            if dtype is None or x.dtype == dtype or "type" not in str(e):
                raise
            if x.is_floating_point():
                why = (f"give inputs of the model's dtype (X.to({dtype})), or convert the model "
                       f"(model.to({x.dtype}))")
            else:
                why = f"give floating-point inputs (X.to({dtype}), divided by 255 for 8-bit images)"
            raise ValueError(f"{name}: inputs are {x.dtype}, but the model computes in {dtype}; "
                             f"{why}") from None
    return _model_logits(out).shape[1]


def _check_classes(labels: Tensor, name: str = "data") -> None:
    """Refuse training data of a single class: a model trained on it learns to predict that
    class alone."""
    seen = torch.unique(labels)
    if len(seen) < 2:
        raise ValueError(f"{name}: every label is {int(seen[0])}; clean data must hold at least "
                         "two classes (a model trained on one learns to predict it alone): add "
                         "samples of the others")


def _check_data(model: nn.Module, data, first: Tensor, eval_data, batch_size: int) -> int:
    """Before any work: the model's classes on the ``first`` batch of ``data`` (the model must
    take its inputs), the labels of tensor data (two classes at least; other data is checked
    in the first epoch) and the inputs of ``eval_data``."""
    classes = _classes(model, first)
    dataset = as_dataset(data)
    if isinstance(dataset, TensorDataset):
        _check_classes(dataset.tensors[1])
    if eval_data is not None:
        x = first_batch(eval_data, batch_size, "eval_data")[0]
        _classes(model, x.to(first.device), "eval_data")
    return classes


_SETTINGS = ("epochs", "lr", "batch_size", "weight_decay", "seed", "augment")


def _config(method: str, *, epochs, lr, batch_size, weight_decay, seed, augment, **more) -> dict:
    """The settings a checkpoint records; resuming with other settings is refused."""
    return {"method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size,
            "weight_decay": weight_decay, "seed": seed, "augment": repr(augment), **more}


def _train(net: nn.Module, data, objective, *, classes: int, config: dict, state, epochs, lr,
           batch_size, weight_decay, augment, seed, device, progress, checkpoint, eval_data,
           trigger, target, extra=None, inputs=None, extras=False, refill=None) -> List[dict]:
    """Train ``net`` (on ``device``; DDP-wrapped by the caller when distributed) with
    ``objective(x, y) -> (loss, parts)`` on :func:`~medic_fast.train.fit`. The labels of the
    first epoch (each sample's once) are checked against ``classes`` before the loss uses them,
    and (in one process) that there are two classes at least. ``progress``: a bool, or the
    label of the progress display (default the method). ``refill(loader, epochs)``, on
    resuming, before training: see :func:`_refill`."""
    loader = make_loader(data, batch_size=batch_size, shuffle=True, seed=seed, shard=dist_shard())
    eval_loader = None if eval_data is None else make_loader(eval_data, batch_size=512,
                                                             name="eval_data")
    unchecked, seen = len(loader), []

    def checked(x, y, *rest):
        nonlocal unchecked
        if unchecked:
            check_labels(y, classes)
            seen.append(torch.unique(y))
            unchecked -= 1
            if not unchecked and dist_shard() is None:
                _check_classes(torch.cat(seen))
        return objective(x, y, *rest)

    if refill is not None and state is not None:
        refill(loader, min(state["epoch"], epochs))
    return fit(net, loader, checked, epochs=epochs, lr=lr, weight_decay=weight_decay,
               augment=augment, seed=seed, device=device, progress=bool(progress),
               desc=progress if isinstance(progress, str) else config["method"],
               checkpoint=checkpoint, config=config, inputs=inputs, state=state, extra=extra,
               eval_loader=eval_loader, trigger=trigger, target=target, logits=_model_logits,
               extras=extras)


def _inputs(checkpoint, model: Optional[nn.Module], data) -> Optional[dict]:
    """What a checkpoint records of the run's inputs, to refuse resuming on others: a digest of
    ``model``'s weights (when they matter) and the data's :func:`~medic_fast.data.fingerprint`;
    None without a checkpoint."""
    if checkpoint is None:
        return None
    weights = {} if model is None else {"weights": digest([model.state_dict()])}
    return {**weights, "data": fingerprint(data)}


def _device(model: nn.Module, device) -> torch.device:
    """``device`` (checked: one this process can use), default the model's."""
    return device_of(model, None if device is None else check_device("device", device))


@preserved_rng()
def _train_ce(model, fresh, data, *, method, device, resume, weights, **kw) -> Result:
    """The baselines: ``fresh`` (a new module) trained with cross-entropy only; ``weights``:
    whether ``model``'s weights are an input of the run (fine-tuning starts from them)."""
    check_module("model", model)
    device = _device(model, device)
    config = _config(method, **{k: kw[k] for k in _SETTINGS})
    inputs = _inputs(kw["checkpoint"], model if weights else None, data)
    state = load_checkpoint(kw["checkpoint"], resume, config, inputs)
    fresh = fresh.to(device)
    first = first_batch(data, kw["batch_size"])[0].to(device)
    classes = _check_data(fresh, data, first, kw["eval_data"], kw["batch_size"])
    check_trigger(kw["trigger"], kw["target"], classes)
    net = distributed(fresh, device)

    def objective(x, y):
        ce = F.cross_entropy(_model_logits(net(x)), y)
        return ce, {"ce": ce}

    return Result(fresh, _train(net, data, objective, classes=classes, config=config, state=state,
                                inputs=inputs, device=device, **kw))


def finetune(model: nn.Module, data, *, epochs: int = 20, lr: float = 1e-3,
             batch_size: int = 64, weight_decay: float = 1e-4, augment=None, seed: int = 0,
             device=None, progress: Union[bool, str] = True, checkpoint=None,
             resume: bool = False, eval_data=None, trigger=None, target=None) -> Result:
    """Baseline: fine-tune a copy of ``model`` on the clean ``data`` with cross-entropy (Adam,
    cosine schedule; a learning rate 10x below the from-scratch one by default).
    Options as in :func:`sanitize`."""
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data)
    return _train_ce(model, copy.deepcopy(model), data, method="finetune", weights=True,
                     epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                     augment=augment, seed=seed, device=device, progress=progress,
                     checkpoint=checkpoint, resume=resume, eval_data=eval_data, trigger=trigger,
                     target=target)


def train_from_scratch(model: nn.Module, data, *, epochs: int = 60, lr: float = 0.01,
                       batch_size: int = 64, weight_decay: float = 1e-4, augment=None,
                       seed: int = 0, device=None, progress: Union[bool, str] = True,
                       checkpoint=None, resume: bool = False, eval_data=None, trigger=None,
                       target=None, factory: Optional[Callable[[], nn.Module]] = None) -> Result:
    """Baseline: a re-initialised model of ``model``'s architecture (or ``factory()``) trained
    on the clean ``data`` with cross-entropy only. Options as in :func:`sanitize`."""
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data)
    return _train_ce(model, _reinitialised(model, factory, seed), data, method="scratch",
                     weights=False, epochs=epochs, lr=lr, batch_size=batch_size,
                     weight_decay=weight_decay, augment=augment, seed=seed, device=device,
                     progress=progress, checkpoint=checkpoint, resume=resume,
                     eval_data=eval_data, trigger=trigger, target=target)


def sanitize(model: nn.Module, data, *, recipe: str = "default", layers=None, tau=None,
             lam=None, epochs: Optional[int] = None, min_steps: Optional[int] = None, lr=None,
             batch_size: Optional[int] = None, weight_decay=None, criterion=None,
             augment="recipe", stats=None, kd=None, kd_temperature=None, cache=None,
             seed: int = 0,
             device=None, threads: Optional[int] = None, progress: Union[bool, str] = True,
             checkpoint=None, resume: bool = False, eval_data=None, trigger=None, target=None,
             factory: Optional[Callable[[], nn.Module]] = None, backend: str = "auto") -> Result:
    """Remove a backdoor by importance-driven cloning (MEDIC).

    A clone of ``model``'s architecture is trained from a fresh initialisation on the small
    clean ``data`` with ``CE(clone(x), y) + lam * importance_clone_loss(...)`` over all hooked
    layers at once, the teacher (a frozen copy of ``model`` in eval mode) giving activations and
    loss gradients each step. ``model`` is not modified.

    Every option left as None comes from ``recipe`` (:data:`medic_fast.medic.recipes.RECIPES`,
    the one table the CLI, the demo and the benchmarks read too). The defaults, and why:

    * layers: every conv and BatchNorm output, as the paper clones them; a model without any
      gets its repeated blocks (transformers) or its hidden Linear layers (MLPs);
    * tau 20 (the paper's is 5), lam 10, criterion ``"abs"``, stats ``"channel"``: at tau 5 a
      ResNet clone kept 20-70% of the backdoor's ASR; tau 20 kept it near or below 10% at
      about 2.5 points of ACC (the paper tunes tau per task too); lam 3 or 30 changed nothing;
    * epochs 60, extended to at least ``min_steps`` = 1000 optimizer steps: 60 epochs of a small
      clean set are too few steps (60 on 5% of digits); 1000 gained 0.5-1.4 points of ACC over
      500;
    * Adam lr 0.01, weight decay 1e-4, cosine schedule, batch 64: the paper's;
    * augment None: random crops let the teacher's backdoor into the clone on 8x8 digits;
      ``"crop+flip"`` suits natural images;
    * kd 0 (no logit matching): at tau 5, matching the teacher's logits as well as its
      features transferred the backdoor, though neither does alone;
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
        layers: module names to clone (or patterns, ``"blocks"``: see
            :func:`~medic_fast.capture.find_layers`); default the output of every conv and
            BatchNorm layer, or for a model without any its repeated blocks, else its hidden
            Linear layers (:func:`~medic_fast.capture.default_plane`). The layers cloned are in
            ``Result.layers``; a default choice is also said once at the start (with
            ``progress``).
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
        progress: show the progress on stderr (rank 0 only): a tqdm bar, or a line per epoch
            when stderr is not a terminal; a string labels it (default the method's name). The
            stretch of ``epochs`` to ``min_steps`` is said once, at the start.
        checkpoint, resume: save the training state atomically after every epoch to this path;
            ``resume=True`` continues from it (an existing file is never overwritten otherwise).
            The state records the library version, the options, a digest of ``model``'s weights
            and a fingerprint of ``data`` (:func:`~medic_fast.data.fingerprint`); resuming with
            any of them different is refused, naming what differs, and so is a state whose
            epoch, history or tensors do not fit the run
            (:class:`~medic_fast.train.CheckpointError`). A resumed run gives the uninterrupted
            run's result bit for bit, the teacher cache included (its first epochs are refilled
            by the teacher alone).
        eval_data, trigger, target: if given, ACC (and ASR of ``trigger`` towards ``target``)
            on ``eval_data`` after each epoch, in the history; a trigger needs ``eval_data``.
        factory: builds the fresh clone instead of re-initialising a copy of ``model``.
        backend: of the loss (``"auto"``: the fused kernel for the device), resolved before
            any work: a kernel that cannot run raises, and ``"auto"``'s warning that it falls
            back to the reference names the caller's line.

    ``model`` may return its logits, a tuple whose first element they are, or an output with
    ``.logits``; its inputs must have its parameters' dtype (else one ValueError says so). The
    global random generators are left as they were.

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
    device = _device(model, device)
    _resolve_backend(backend, device)
    with preserved_rng():
        first = first_batch(data, r["batch_size"])[0].to(device)
        augment = recipes.make_augment(r["augment"] if augment == "recipe" else augment, first)
        teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        classes = _check_data(teacher, data, first, eval_data, r["batch_size"])
        if threads is None:
            threads = auto_threads(forward_macs(teacher, first)) if device.type == "cpu" else None
        with torch_threads(threads):
            return _sanitize(teacher, model, data, r, first, augment, classes, seed=seed,
                             device=device, progress=progress, checkpoint=checkpoint,
                             resume=resume, eval_data=eval_data, trigger=trigger, target=target,
                             factory=factory, backend=backend)


def _resolve_backend(backend: str, device: torch.device) -> None:
    """Resolve the loss's ``backend`` on ``device`` before any work: a fused kernel that cannot
    run raises here, and the warning of ``"auto"`` falling back to the reference is re-issued
    at the caller's line (not a library source line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dispatch.resolve("importance_clone_loss", backend, device)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=user_stacklevel())


def _sanitize(teacher, model, data, r, first, augment, classes, *, seed, device, progress,
              checkpoint, resume, eval_data, trigger, target, factory, backend) -> Result:
    clone = _reinitialised(model, factory, seed).to(device)
    kind, names = default_plane(teacher) if r["layers"] is None else \
        (None, resolve_layers(teacher, r["layers"]))
    stats = r["stats"]
    per = stats.per if isinstance(stats, LayerStats) else stats
    batches = len(make_loader(data, batch_size=r["batch_size"], shard=dist_shard()))
    epochs = recipes.training_epochs(r["epochs"], r["min_steps"], batches)
    settings = dict(epochs=epochs, lr=r["lr"], batch_size=r["batch_size"],
                    weight_decay=r["weight_decay"], seed=seed, augment=augment)
    config = _config("medic", **settings, tau=r["tau"], lam=r["lam"], criterion=r["criterion"],
                     layers=names, stats=per, kd=r["kd"], kd_temperature=r["kd_temperature"])
    inputs = _inputs(checkpoint, model, data)
    state = load_checkpoint(checkpoint, resume, config, inputs)
    check_trigger(trigger, target, classes)
    lead = progress and (dist_shard() or (0, 1))[0] == 0
    label = progress if isinstance(progress, str) else "medic"
    if lead and kind is not None:
        print(f"{label}: cloning {PLANES[kind]}, {len(names)} layers: {', '.join(names)}",
              file=sys.stderr)
    if lead and epochs > r["epochs"]:
        print(f"{label}: {epochs} epochs of {batches} steps: the recipe's {r['epochs']} epochs "
              f"stretched to min_steps={r['min_steps']} optimizer steps, as a small clean set "
              "needs (give epochs alone for exactly that many)", file=sys.stderr)
    copies = inplace_modified(teacher, names, first)
    if state is not None:
        stats = _saved_stats(state, checkpoint, teacher, names, per, first)
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

    def refill(loader, done):
        _refill(cache, teacher, names, copies, device, loader, done)

    history = _train(net, data, objective, classes=classes, config=config, state=state, extra=extra,
                     inputs=inputs, device=device, progress=progress, checkpoint=checkpoint,
                     eval_data=eval_data, trigger=trigger, target=target,
                     extras=cache is not None, refill=None if cache is None else refill,
                     **settings)
    return Result(clone, history, stats, names)


def _saved_stats(state: dict, checkpoint, teacher: nn.Module, names: List[str], per: str,
                 x: Tensor) -> LayerStats:
    """The teacher's statistics saved in the training ``state``, checked against the shapes
    that its layers give on the batch ``x`` (a :class:`CheckpointError` names what differs)."""
    want = stat_shapes(teacher, x, names, per)

    def refuse(why):
        raise CheckpointError(os.fspath(checkpoint), f"does not fit this run: {why}")
    for key in ("stats_mean", "stats_std"):
        got = state.get(key)
        if not (isinstance(got, list) and len(got) == len(names)
                and all(torch.is_tensor(t) for t in got)):
            refuse(f"{key!r} is not a list of {len(names)} tensors, one per layer cloned")
        for name, t, shape in zip(names, got, want):
            if t.shape != shape:
                refuse(f"{key!r} of layer {name!r} is {list(t.shape)}, expected {list(shape)}")
    count = state.get("stats_count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        refuse(f"'stats_count' is {count!r}, expected a number of samples >= 1")
    try:
        return LayerStats(names, state["stats_mean"], state["stats_std"], per, count)
    except ValueError as e:  # a negative std
        refuse(str(e))


def _refill(cache: TeacherCache, teacher: nn.Module, names: List[str], copies, device,
            loader, epochs: int) -> None:
    """Fill ``cache`` as the first ``epochs`` epochs of an uninterrupted run filled it, before a
    resumed run continues: the teacher's signals of each batch that missed a sample, computed on
    that same batch (a sample's CE gradient depends on its batch in the last bits), so that the
    resumed run is bit-identical to the uninterrupted one. The teacher alone runs (the clone's
    BatchNorm statistics are not touched); it stops once every sample is cached (in one
    process, after the first epoch)."""
    capture = ActivationCapture(teacher, names, differentiable=True, copy=copies)
    for epoch in range(epochs):
        set_epoch(loader, epoch)
        for x, y, index in loader:
            if not cache.enabled or cache.complete:
                return
            if cache.covers(index):
                continue
            batch = (x.to(device), y.to(device))
            with eval_mode(teacher), capture as cap:
                acts, grads = teacher_signals(
                    teacher, cap, None, None,
                    loss=lambda: default_loss(default_forward(teacher, batch), batch))
            cache.put(index, acts, grads)


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
