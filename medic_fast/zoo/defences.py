"""Published baseline defences that MEDIC is compared with (the defence table of the MEDIC paper,
Table 1), beside :func:`~medic_fast.medic.finetune` and
:func:`~medic_fast.medic.train_from_scratch`:

* :func:`distill`: knowledge distillation of the logits only (Hinton et al. 2015) into a
  re-initialised student, the "cloning of logits only" column.
* :func:`fine_prune`: Fine-Pruning (Liu et al. 2018): prune the least active channels of the last
  conv layer on clean data, then fine-tune.
* :func:`nad`: Neural Attention Distillation (Li et al. 2021): fine-tune the trojaned model with
  CE plus an attention-map distance to a teacher fine-tuned on the clean data.

Each takes the keyword options of :func:`~medic_fast.medic.finetune` (Adam with weight decay and
a cosine schedule on :func:`medic_fast.train.fit`, ``augment``, ``seed``, ``device``,
``progress``, ``checkpoint``/``resume``, ``eval_data``/``trigger``/``target`` for ACC/ASR in the
history), returns a :class:`~medic_fast.medic.Result` and never modifies the given model.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast._utils import check_int, check_module, check_number, device_of, eval_mode
from medic_fast.capture import ActivationCapture, find_layers, inplace_modified
from medic_fast.data import first_batch, make_loader
from medic_fast.medic.cloner import distill_loss
from medic_fast.medic.sanitize import Result, _check_common, _classes, _config, _reinitialised, \
    _train, finetune
from medic_fast.train import check_trigger, distributed, evaluate_loader, load_checkpoint

__all__ = ["distill", "distill_objective", "fine_prune", "PruneResult", "nad", "attention_map",
           "attention_loss", "nad_layers"]


def _fraction(name: str, v, *, low_open: bool, high_open: bool) -> float:
    """``v`` as a float in the interval from 0 to 1 (ends open or closed as given)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v \
        and (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}0, "
                         f"1{')' if high_open else ']'}, got {v!r}")
    return float(v)


def _prepare(model: nn.Module, net: nn.Module, data, method: str, settings: dict, device,
             checkpoint, resume, trigger, target, **more):
    """What every defence does before training ``net`` (a new module): its device, the
    checkpoint config and state to resume from, the number of classes (``trigger``'s target is
    checked against it), the first batch, and ``net`` on the device (DDP-wrapped when
    distributed)."""
    device = device_of(model, device)
    config = _config(method, **settings, **more)
    state = load_checkpoint(checkpoint, resume, config)
    net = net.to(device)
    first = first_batch(data, settings["batch_size"])[0].to(device)
    classes = _classes(net, first)
    check_trigger(trigger, target, classes)
    return device, config, state, classes, first, distributed(net, device)


def _frozen(model: nn.Module, device) -> nn.Module:
    return copy.deepcopy(model).to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Knowledge distillation of the logits
# --------------------------------------------------------------------------------------------

def distill_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
                      temperature: float = 4.0, alpha: float = 0.9
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """Hinton et al.'s distillation loss on a batch: ``(1 - alpha) * CE(student, labels) + alpha
    * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the KL summed over classes and
    averaged over the batch (the teacher's logits carry no gradient). Returns ``(loss, ce,
    kd)``, ``kd`` the ``T^2 * KL`` term."""
    ce = F.cross_entropy(student_logits, labels)
    kd = distill_loss(student_logits, teacher_logits, temperature)
    return (1 - alpha) * ce + alpha * kd, ce, kd


def distill(model: nn.Module, data, *, temperature: float = 4.0, alpha: float = 0.9,
            epochs: int = 60, lr: float = 0.01, batch_size: int = 64, weight_decay: float = 1e-4,
            augment=None, seed: int = 0, device=None, progress: bool = True, checkpoint=None,
            resume: bool = False, eval_data=None, trigger=None, target=None,
            factory: Optional[Callable[[], nn.Module]] = None) -> Result:
    """Knowledge distillation of the logits only (Hinton et al. 2015): a re-initialised model of
    ``model``'s architecture (or ``factory()``), seeded as in
    :func:`~medic_fast.medic.train_from_scratch`, trained on the clean ``data`` with
    :func:`distill_objective` against the frozen ``model`` in eval mode (which sees the same,
    augmented, batches). MEDIC without its activation-cloning term: the "logits only" column.

    ``temperature`` (> 0; 4, a usual choice) softens both distributions; ``alpha`` in [0, 1]
    weighs the distillation term against CE (0.9: mostly the teacher). The training options and
    their defaults are :func:`~medic_fast.medic.train_from_scratch`'s: the student starts from
    scratch. The history logs ``ce`` and ``kd`` (the ``T^2 * KL`` term) beside ``loss``.
    """
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data)
    temperature = check_number("temperature", temperature, positive=True)
    alpha = _fraction("alpha", alpha, low_open=False, high_open=False)
    check_module("model", model)
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                    seed=seed, augment=augment)
    student = _reinitialised(model, factory, seed)
    device, config, state, classes, _, net = _prepare(
        model, student, data, "distill", settings, device, checkpoint, resume, trigger, target,
        temperature=temperature, alpha=alpha)
    teacher = _frozen(model, device)

    def objective(x, y):
        with torch.no_grad():
            t = teacher(x)
        loss, ce, kd = distill_objective(net(x), t, y, temperature=temperature, alpha=alpha)
        return loss, {"ce": ce, "kd": kd}

    return Result(student, _train(net, data, objective, classes=classes, config=config,
                                  state=state, device=device, progress=progress,
                                  checkpoint=checkpoint, eval_data=eval_data, trigger=trigger,
                                  target=target, **settings))


# --------------------------------------------------------------------------------------------
# Fine-Pruning
# --------------------------------------------------------------------------------------------

@dataclass
class PruneResult(Result):
    """:class:`~medic_fast.medic.Result` of :func:`fine_prune`, with the pruned ``layer`` (its
    name) and the ``pruned`` output channels, in the order they were pruned (least active first).
    Each history row also has ``pruned``, their number."""
    layer: str = ""
    pruned: List[int] = field(default_factory=list)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and not m.transposed


def _forward_calls(model: nn.Module, x: Tensor, leaves: bool = False) -> List[Tuple[str, object]]:
    """``(name, output)`` of every call of a named module of ``model`` (only leaf modules when
    ``leaves``), in the order the calls complete during one forward on ``x`` (eval mode, no
    gradients)."""
    calls: List[Tuple[str, object]] = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: calls.append((n, o)))
               for n, m in model.named_modules()
               if n and not (leaves and any(True for _ in m.children()))]
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _execution_order(model: nn.Module, x: Tensor) -> List[str]:
    """Names of the leaf modules of ``model`` in the order one forward on ``x`` (eval mode, no
    gradients) calls them, a name once per call."""
    return [n for n, _ in _forward_calls(model, x, leaves=True)]


def _prune_target(model: nn.Module, layer, x: Tensor, also: nn.Module
                  ) -> Tuple[str, nn.Module, Optional[str], bool]:
    """The conv layer to prune (``layer``, or the last conv module of ``model`` in registration
    order), the BatchNorm that takes its output (the module the forward calls right after it,
    of its width), if any, and whether an ``nn.ReLU`` module follows them."""
    if layer is None:
        convs = [n for n, m in model.named_modules() if n and _is_conv(m)]
        if not convs:
            raise ValueError(f"fine_prune: {type(model).__name__} has no conv layer to prune; "
                             "pass layer=... naming one")
        name = convs[-1]
    else:
        if isinstance(layer, (str, nn.Module)):
            name = find_layers(model, [layer], also=also)[0][0]
        else:
            raise TypeError(f"layer must be a module name (str) or a module, got "
                            f"{type(layer).__name__}")
    mods = dict(model.named_modules())
    conv = mods.get(name)
    if conv is None or not _is_conv(conv):
        raise ValueError(f"fine_prune: layer {name!r} is a {type(conv).__name__}, not a "
                         "convolution; Fine-Pruning prunes a conv layer's output channels")
    order = _execution_order(model, x)
    if order.count(name) != 1:
        raise ValueError(f"fine_prune: layer {name!r} runs {order.count(name)} times in a "
                         "forward; pass a conv layer that runs once")
    after = order[order.index(name) + 1:]
    bn = None
    if after and isinstance(mods[after[0]], nn.modules.batchnorm._BatchNorm) \
            and mods[after[0]].num_features == conv.out_channels:
        bn, after = after[0], after[1:]
        if not mods[bn].affine:
            raise ValueError(f"fine_prune: the BatchNorm {bn!r} after {name!r} has no affine "
                             "weights to zero; its output cannot be pruned")
    return name, conv, bn, bool(after) and isinstance(mods[after[0]], nn.ReLU)


@torch.no_grad()
def _channel_means(model: nn.Module, name: str, data, relu: bool, copies, device) -> Tensor:
    """The mean activation of each channel of the output of module ``name`` (rectified when a
    ReLU follows) over every sample and position of ``data``, in float64."""
    total, count = None, 0
    with eval_mode(model), ActivationCapture(model, [name], copy=copies) as cap:
        for batch in make_loader(data, batch_size=256):
            model(batch[0].to(device))
            a = cap.outputs()[0].double()
            a = F.relu(a) if relu else a
            s = a.transpose(0, 1).flatten(1).sum(1)
            total = s if total is None else total + s
            count += a.numel() // a.shape[1]
    return total / count


def fine_prune(model: nn.Module, data, *, layer=None, prune_ratio: float = 0.9,
               max_acc_drop: float = 0.05, epochs: int = 20, lr: float = 1e-3,
               batch_size: int = 64, weight_decay: float = 1e-4, augment=None, seed: int = 0,
               device=None, progress: bool = True, checkpoint=None, resume: bool = False,
               eval_data=None, trigger=None, target=None) -> PruneResult:
    """Fine-Pruning (Liu et al. 2018) on a copy of ``model``: prune, then fine-tune.

    1. The output channels of the conv ``layer`` (a name or module; default the last conv
       module of ``model`` in registration order, the last conv layer of a plain CNN) are ranked
       by their mean activation on the clean ``data`` (after the ``nn.ReLU`` module that the
       forward calls next, through the BatchNorm between them if any; else the conv's or the
       BatchNorm's output).
    2. The least active are pruned one at a time, for at most ``floor(prune_ratio * channels)``,
       stopping before the first whose pruning lowers the accuracy on ``data`` by more than
       ``max_acc_drop`` below the unpruned model's (Liu et al. stop at a set drop in validation
       accuracy). A channel is pruned by zeroing its conv weights (and bias) and the weight and
       bias of the BatchNorm that follows (so its output, and the ReLU's, is exactly 0).
    3. The pruned copy is fine-tuned as by :func:`~medic_fast.medic.finetune` (same options and
       defaults), with the gradients of the pruned weights masked so they stay exactly 0
       (Adam moves no weight whose gradient and value are 0).

    On a residual network the last conv sits on a residual branch: pruning it zeroes the branch,
    not the block's output.

    Returns:
        :class:`PruneResult`: the model, the history (each row with ``pruned``, the number of
        channels pruned), the ``layer`` name and the ``pruned`` channels.
    """
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data)
    prune_ratio = _fraction("prune_ratio", prune_ratio, low_open=True, high_open=True)
    max_acc_drop = _fraction("max_acc_drop", max_acc_drop, low_open=False, high_open=False)
    check_module("model", model)
    device = device_of(model, device)
    pruned_net = copy.deepcopy(model).to(device)
    first = first_batch(data, batch_size)[0].to(device)
    name, conv, bn_name, relu = _prune_target(pruned_net, layer, first, model)
    bn = None if bn_name is None else dict(pruned_net.named_modules())[bn_name]
    measured = bn_name or name
    copies = inplace_modified(pruned_net, [measured], first)
    ranking = _channel_means(pruned_net, measured, data, relu, copies, device).argsort(stable=True)
    params = [p for p in (conv.weight, conv.bias) if p is not None]
    if bn is not None:
        params += [bn.weight, bn.bias]
    acc_loader = make_loader(data, batch_size=512)

    def accuracy() -> float:
        return evaluate_loader(pruned_net, acc_loader, device=device)["acc"]

    base = accuracy()
    pruned: List[int] = []
    with torch.no_grad():
        for c in ranking[:int(prune_ratio * conv.out_channels)].tolist():
            saved = [p[c].clone() for p in params]
            for p in params:
                p[c] = 0
            if base - accuracy() > max_acc_drop:
                for p, s in zip(params, saved):
                    p[c] = s
                break
            pruned.append(c)
    keep = torch.ones(conv.out_channels, device=device)
    keep[pruned] = 0
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                    seed=seed, augment=augment)
    device, config, state, classes, _, net = _prepare(
        model, pruned_net, data, "fine_prune", settings, device, checkpoint, resume, trigger,
        target, layer=name, prune_ratio=prune_ratio, max_acc_drop=max_acc_drop, pruned=pruned)
    handles = [p.register_hook(lambda g, k=keep.view(-1, *[1] * (p.dim() - 1)): g * k)
               for p in params]

    def objective(x, y):
        ce = F.cross_entropy(net(x), y)
        return ce, {"ce": ce}

    try:
        history = _train(net, data, objective, classes=classes, config=config, state=state,
                         device=device, progress=progress, checkpoint=checkpoint,
                         eval_data=eval_data, trigger=trigger, target=target, **settings)
    finally:
        for h in handles:
            h.remove()
    for row in history:
        row.setdefault("pruned", len(pruned))
    return PruneResult(pruned_net, history, None, layer=name, pruned=pruned)


# --------------------------------------------------------------------------------------------
# Neural Attention Distillation
# --------------------------------------------------------------------------------------------

def attention_map(a: Tensor, p: float = 2.0) -> Tensor:
    """NAD's attention map of activations ``a`` ``[N, C, ...]``: the mean over channels of
    ``|a|^p``, flattened per sample, ``[N, prod(...)]``."""
    if a.dim() < 2:
        raise ValueError(f"attention_map needs activations [N, C, ...], got shape "
                         f"{tuple(a.shape)}")
    return a.abs().pow(p).mean(1).flatten(1)


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], p: float = 2.0
                   ) -> Tensor:
    """NAD's distillation term (Li et al. 2021, Eq. 2): the sum over layers of the batch mean of
    ``|| A_s / ||A_s|| - A_t / ||A_t|| ||_2``, ``A`` the :func:`attention_map` of each sample
    (an all-zero map stays zero); the teacher's activations carry no gradient."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"attention_loss needs as many student as teacher activations, at "
                         f"least one; got {len(student)} and {len(teacher)}")
    total = 0
    for s, t in zip(student, teacher):
        a_s = F.normalize(attention_map(s.float(), p), dim=1)
        a_t = F.normalize(attention_map(t.detach().float(), p), dim=1)
        total = total + (a_s - a_t).norm(dim=1).mean()
    return total


def nad_layers(model: nn.Module, x: Tensor) -> List[str]:
    """NAD's default layers: the end of each stage, i.e. for each spatial resolution the last
    ``[N, C, H, W]`` activation the forward produces at that resolution (``H * W > 1``), named by
    the innermost module that outputs it and runs once per forward (a residual network's last
    block of each stage, DigitsCNN's last ReLU at 8x8 and at 4x4)."""
    done = _forward_calls(model, x)
    calls = Counter(n for n, _ in done)
    outs = [(n, o) for n, o in done
            if isinstance(o, Tensor) and o.dim() == 4 and o.shape[2] * o.shape[3] > 1]
    last = {}
    for name, o in outs:  # in completion order: the last at each resolution wins
        last[tuple(o.shape[2:])] = o
    names = []
    for o in last.values():
        name = next((n for n, t in outs if t is o and calls[n] == 1), None)
        if name is not None and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"nad: found no [N, C, H, W] activation of a module that runs once in "
                         f"{type(model).__name__}; pass layers=[...]")
    return names


def nad(model: nn.Module, data, *, layers: Optional[Sequence] = None, beta: float = 5.0,
        teacher_epochs: int = 10, p: float = 2.0, epochs: int = 20, lr: float = 1e-3,
        batch_size: int = 64, weight_decay: float = 1e-4, augment=None, seed: int = 0,
        device=None, progress: bool = True, checkpoint=None, resume: bool = False,
        eval_data=None, trigger=None, target=None) -> Result:
    """Neural Attention Distillation (Li et al. 2021).

    The teacher is ``model`` fine-tuned on the clean ``data`` for ``teacher_epochs`` by
    :func:`~medic_fast.medic.finetune` (same ``lr``, ``batch_size``, ``weight_decay``,
    ``augment``, ``seed``), frozen in eval mode; then a copy of ``model`` is fine-tuned with
    ``CE + beta * attention_loss(student, teacher, p)`` over ``layers`` (see
    :func:`attention_loss`; names, modules or patterns as in
    :func:`~medic_fast.capture.find_layers`; default :func:`nad_layers`, the end of each
    stage, as NAD takes the output of each residual group).

    ``beta=5``: the paper's 5000 (CIFAR, WRN, three groups) multiplies its code's mean over
    positions of the *squared* map difference, ``||d||^2 / (H*W)``; the un-squared norm of the
    paper's Eq. 2, used here, is ``H*W / ||d||`` times larger (over 1e4 at CIFAR resolutions), so
    ``beta`` in the units is a few, not thousands. ``p=2`` as in the paper. The training options
    and defaults of the fine-tuning are :func:`~medic_fast.medic.finetune`'s; the teacher is not
    checkpointed (a resumed run fine-tunes it again, identically). The history logs ``ce`` and
    ``at`` (the attention term before ``beta``).
    """
    _check_common(epochs, lr, batch_size, weight_decay, seed, trigger, target, eval_data)
    beta = check_number("beta", beta)
    p = check_number("p", p, positive=True)
    check_int("teacher_epochs", teacher_epochs)
    check_module("model", model)
    device = device_of(model, device)
    student = copy.deepcopy(model).to(device)
    first = first_batch(data, batch_size)[0].to(device)
    names = nad_layers(student, first) if layers is None else \
        find_layers(student, layers, also=model)[0]
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                    seed=seed, augment=augment)
    device, config, state, classes, first, net = _prepare(
        model, student, data, "nad", settings, device, checkpoint, resume, trigger, target,
        layers=names, beta=beta, p=p, teacher_epochs=teacher_epochs)
    teacher = finetune(model, data, epochs=teacher_epochs, lr=lr, batch_size=batch_size,
                       weight_decay=weight_decay, augment=augment, seed=seed, device=device,
                       progress=progress).model
    teacher = teacher.eval().requires_grad_(False)
    copies = inplace_modified(teacher, names, first)

    tcap = ActivationCapture(teacher, names, copy=copies)
    scap = ActivationCapture(student, names, copy=copies)

    def objective(x, y):
        # hooks only around these forwards: fit's evaluation runs the student too
        with torch.no_grad(), tcap:
            teacher(x)
            t_acts = tcap.outputs()
        with scap:
            logits = net(x)
            s_acts = scap.outputs()
        ce = F.cross_entropy(logits, y)
        at = attention_loss(s_acts, t_acts, p)
        return ce + beta * at, {"ce": ce, "at": at}

    history = _train(net, data, objective, classes=classes, config=config, state=state,
                     device=device, progress=progress, checkpoint=checkpoint,
                     eval_data=eval_data, trigger=trigger, target=target, **settings)
    return Result(student, history)
