"""MEDIC inside any training loop: :class:`Cloner`, the one clone objective of the package.

``loss = cloner(batch)`` (a Hugging Face dict batch, or ``(inputs, labels)``) or
``loss = cloner(inputs, labels, mask)`` is ``CE(student(inputs), labels) + lam *
importance_clone_loss(all hooked layers)`` for one step; the caller runs ``backward`` and steps
the optimizer (:func:`medic_fast.sanitize` does this with :func:`medic_fast.train.fit`). It works
for CNNs (a row per sample) and transformers (a row per token for 3-D activations ``[B, T, H]``;
padded tokens, ``mask`` False, contribute nothing), with tuple outputs, in-place activations,
``torch.autocast``, non-reentrant activation checkpointing and DDP.

Hooks exist only during the forwards of :meth:`Cloner.losses`, so the recomputation of a
checkpointed student in backward does not fire them, and the models run hook-free elsewhere.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from medic_fast._memory import PHASES
from medic_fast._utils import check_int, check_module, check_number, device_of, eval_mode, \
    inner_module
from medic_fast.capture import (ActivationCapture, call_model, check_mask, inplace_modified,
                                mask_applies, resolve_layers, rows_start_dim, teacher_signals)
from medic_fast.medic.cache import TeacherCache
from medic_fast.medic.head import Head, chunked_lm_loss
from medic_fast.ops.importance_clone import CRITERIA, importance_clone_loss
from medic_fast.stats import LayerStats

__all__ = ["Cloner", "CloneStep", "masked_clone_loss", "default_forward", "default_loss"]


def default_forward(model: nn.Module, batch):
    """The model's output on a batch: ``model(**batch)`` for a dict (labels included, so a
    Hugging Face model computes its own ``.loss``), ``model(inputs)`` for ``(inputs, labels)``."""
    if isinstance(batch, Mapping):
        return call_model(model, batch)
    return model(batch[0])


def _field(output, key: str):
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None)


def _logits(output, missing: str) -> Tensor:
    """A model output's ``.logits``, or the output itself (a tuple's first element); else a
    ``TypeError`` saying ``missing``."""
    logits = _field(output, "logits")
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, Tensor):
        raise TypeError(missing)
    return logits


def default_loss(output, batch) -> Tensor:
    """The CE of a model's output: its own ``.loss`` when it has one (a Hugging Face model given
    ``labels``: shifted for causal LMs, ``-100`` ignored), else ``cross_entropy`` of its
    ``.logits`` (or the output itself, or a tuple's first element) against the labels.

    ``(inputs, labels)``: ``cross_entropy(logits, labels)``, PyTorch's layout (classes in dim 1).
    A dict batch: against ``batch["labels"]``, and per-token logits ``[..., V]`` with labels
    ``[...]`` (Hugging Face's layout, classes last) are scored position by position,
    **unshifted**, ignoring ``-100``: pass labels already shifted, or let the model compute
    ``.loss``."""
    loss = _field(output, "loss")
    if isinstance(loss, Tensor):
        return loss
    logits = _logits(output, f"the model returned {type(output).__name__} with neither .loss "
                     "nor .logits; pass loss_fn=(output, batch) -> CE")
    if not isinstance(batch, Mapping):
        return F.cross_entropy(logits, batch[1])
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("the batch has no labels and the model's output no .loss: add "
                         "'labels' to the batch or pass loss_fn=(output, batch) -> CE")
    if logits.dim() == labels.dim() + 1 and logits.dim() > 2 \
            and logits.shape[:-1] == labels.shape:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return F.cross_entropy(logits, labels)


def distill_loss(student_output, teacher_output, temperature: float, class_dim: int = 1
                 ) -> Tensor:
    """Knowledge distillation of the logits (Hinton et al. 2015):
    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over ``class_dim``, the mean over
    every other position (samples, tokens). The teacher's logits carry no gradient."""
    missing = "kd needs the models' logits: the model returned {} with no .logits"
    s = _logits(student_output, missing.format(type(student_output).__name__))
    t = _logits(teacher_output, missing.format(type(teacher_output).__name__)).detach()
    log_s = F.log_softmax(s.float() / temperature, class_dim)
    log_t = F.log_softmax(t.float() / temperature, class_dim)
    kl = (log_t.exp() * (log_t - log_s)).sum(class_dim)
    return temperature ** 2 * kl.mean()


def masked_clone_loss(acts_t, acts_c, grads, mean, std, mask: Tensor, *, tau: float,
                      criterion: str = "abs", start_dim: int = 2, weight: float = 1.0,
                      keep_inputs: bool = True, backend: str = "auto") -> Tensor:
    """:func:`importance_clone_loss` (summed over layers) averaged over the rows ``mask`` keeps.

    ``mask`` has the row shape ``acts_t.shape[:start_dim]`` of every layer (``[B, T]`` for
    per-token rows). Computed as ``(rows * mask).sum() / mask.sum()`` on the per-row losses
    (``reduction="none"``), so the backward scales the fused op's kept gradient by 0 at
    masked rows: padded activations get no gradient and change nothing. No kept row: 0.
    """
    first = acts_t if isinstance(acts_t, Tensor) else acts_t[0]
    mask = check_mask(mask, first)
    for i, t in enumerate([acts_t] if isinstance(acts_t, Tensor) else acts_t):
        if t.shape[:start_dim] != mask.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but layer {i} has rows "
                             f"{tuple(t.shape[:start_dim])} (acts_t.shape[:start_dim])")
    rows = importance_clone_loss(acts_t, acts_c, grads, mean, std, tau=tau, criterion=criterion,
                                 reduction="none", start_dim=start_dim, weight=weight,
                                 keep_inputs=keep_inputs, backend=backend)
    keep = mask.reshape(-1).to(rows.dtype)
    return (rows * keep).sum() / keep.sum().clamp_min(1)


@contextlib.contextmanager
def checkpointed(modules):
    """Inside, each of ``modules`` runs its forward under non-reentrant activation
    checkpointing: what it would keep for the backward is recomputed there instead, through its
    original ``forward`` (so its forward hooks do not fire again; none of ``modules`` may hold
    another hooked module)."""
    had = []
    for m in modules:
        had.append(m.__dict__.get("forward"))
        m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    try:
        yield
    finally:
        for m, own in zip(modules, had):
            if own is None:
                del m.forward
            else:
                m.forward = own


@dataclass(frozen=True)
class CloneStep:
    """The parts of the last :class:`Cloner` step: CE and clone loss (detached, for logging)
    and, with ``Cloner(keep_output=True)``, the student's own output object (a Hugging Face
    ``ModelOutput``, logits...; else None: holding it keeps its ``[B, T, V]`` logits alive
    through the backward, which needs none of them)."""
    ce: Tensor
    clone: Tensor
    student_output: Any = None
    kd: Optional[Tensor] = None


class Cloner:
    """One MEDIC training step's loss for a loop the user owns.

    ``loss = cloner(batch)`` (a dict batch, as a Hugging Face model takes it, or an
    ``(inputs, labels)`` tuple) or ``loss = cloner(inputs, labels, mask=None)`` returns
    ``CE(student, batch) + lam * sum_layers importance_clone_loss``; then
    ``loss.backward(); optimizer.step()``. ``cloner.last`` holds the step's CE and clone loss
    (detached) and, with ``keep_output=True``, the student's own output object
    (``.student_output``).

    Batches:

    * a dict goes to both models as keyword arguments, labels included (``model(**batch)``), so
      the teacher's importance signals are the gradients of its own loss, the same loss the
      student is trained on; the CE is :func:`default_loss` (the model's ``.loss`` when it
      returns one, else CE on ``.logits`` against ``batch["labels"]``, unshifted);
    * ``(inputs, labels)``: ``model(inputs)`` and ``cross_entropy(output, labels)``, as before.

    ``forward=(model, batch) -> output`` and ``loss_fn=(output, batch) -> CE`` replace these
    (the batch the hooks get is the dict, or the ``(inputs, labels)`` tuple).

    Args:
        teacher: the trojaned model (a DDP / compiled wrapper is unwrapped). It runs in eval mode
            during the call (its flags are restored); freeze it (``requires_grad_(False)``) so
            its forward keeps nothing for parameter gradients. Its activations and gradients
            live only until the step's backward frees the graph.
        student: the clone being trained, as the user runs it: plain, DDP-wrapped (gradients are
            synchronised by calling the wrapper) or ``torch.compile``-d.
        layers: what to clone (conv/BN outputs, transformer blocks, attention, MLPs...): module
            names, module objects, glob patterns (``"transformer.h.*"``) or ``"blocks"`` (the
            repeated blocks of a Hugging Face model), resolved by
            :func:`~medic_fast.capture.find_layers`; names resolve through DDP / compile /
            FSDP1 / checkpoint wrappers on either side.
        stats: :class:`~medic_fast.stats.LayerStats` of the teacher for ``layers``, from
            :func:`~medic_fast.stats.collect_stats` (with the same ``start_dim`` and ``select``),
            on any device: they follow the activations (also models moved after construction).
        tau, lam, criterion: importance temperature, clone-loss weight, ``"abs"`` | ``"signed"``.
        start_dim: rows of the loss; ``None``: per layer, as
            :func:`~medic_fast.capture.rows_start_dim` (a row per token for 3-D outputs of
            modules other than conv/BatchNorm, else a row per sample).
        select: which tensor of a tuple output to clone (see
            :class:`~medic_fast.capture.ActivationCapture`).
        copy: names of layers whose outputs the forward later modifies in place (e.g. BatchNorm
            before ``ReLU(inplace=True)``); ``None`` finds them on the first call with one
            forward of the teacher without gradients.
        backend: of the loss (``"auto"``: the fused kernel for the device).
        forward, loss_fn: the hooks above.
        mask_key: the key of a dict batch that holds the padding mask (``None``: none).
        kd, kd_temperature: weight and temperature of an added logit-distillation term
            (:func:`distill_loss`; 0: none), logged in ``last.kd``.
        cache: a :class:`~medic_fast.medic.cache.TeacherCache`: with ``index=`` (the batch's
            sample indices) the teacher's signals of samples seen before are reused instead of
            recomputed, for inputs that are the same every epoch.
        checkpoint_teacher: run the teacher's pass with activation checkpointing of its hooked
            layers (their insides are recomputed in its backward instead of kept: about one
            more teacher forward, for a pass that holds one layer's activations at a time).
            ``"auto"``: when the student checkpoints (a Hugging Face model with gradient
            checkpointing enabled), so that checkpointing keeps its promise for the whole step.
        keep_output: keep the student's output object in ``last.student_output`` (its logits
            then live through the backward); set per call if need be (``cloner.keep_output``).
        head_chunk: tokens per chunk of the teacher's head and CE on dict batches
            (:mod:`medic_fast.medic.head`: a Hugging Face causal LM's gradients without its
            ``[B, T, V]`` logits, checked on the first batch against the model's own loss, which
            is used where they differ, with a warning); ``None``: a chunk's logits about the
            size of the hidden states; 0: always the model's own loss. Not with ``kd`` (it
            needs the teacher's logits) or a custom ``forward``/``loss_fn``.

    Memory: the teacher's pass is done before the student's forward and leaves only its
    activations ``t`` and gradients ``g`` at the hooked layers (its output is dropped unless
    ``kd`` needs its logits; a causal LM's head runs in chunks of tokens, so its logits never
    exist whole); the loss frees ``t`` and ``g`` when the step's forward returns and
    keeps only its gradient (``keep_inputs=False``), so a step holds at most ``2x`` the hooked
    activations more than a plain one (measured: ``benchmarks/RESULTS.md`` §12).

    ``mask`` (``[B, T]``, True or 1 at real tokens; by default ``batch["attention_mask"]`` of a
    dict batch) applies to the layers whose rows are ``[B, T]``: their loss is the mean over
    real tokens; rows of the same rank but another shape (a shifted or transposed mask) raise a
    ``ValueError`` naming the layer and both shapes. The CE is the student's own (its model
    handles padding). Reentrant checkpointing in the student is detected and refused.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers, stats: LayerStats,
                 tau: float = 5.0, lam: float = 10.0, *, criterion: str = "abs",
                 start_dim: Optional[int] = None, select=None, copy=None,
                 backend: str = "auto",
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                 loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
                 mask_key: Optional[str] = "attention_mask", kd: float = 0.0,
                 kd_temperature: float = 4.0, cache: Optional[TeacherCache] = None,
                 checkpoint_teacher: Union[bool, str] = "auto", keep_output: bool = False,
                 head_chunk: Optional[int] = None):
        check_module("teacher", teacher)
        check_module("student", student)
        if not isinstance(stats, LayerStats):
            raise TypeError(f"stats must be a LayerStats (see collect_stats), got "
                            f"{type(stats).__name__}")
        self.tau, self.lam = check_number("tau", tau), check_number("lam", lam)
        self.kd = check_number("kd", kd)
        if cache is not None and (not isinstance(cache, TeacherCache) or forward is not None
                                  or loss_fn is not None):
            raise ValueError("cache must be a TeacherCache, and works with (inputs, labels) "
                             "batches and the default forward and loss only (a sample's CE "
                             "gradient is then the batch mean's times the batch size)")
        self.cache = cache
        self.kd_temperature = check_number("kd_temperature", kd_temperature, positive=True)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if start_dim is not None:
            check_int("start_dim", start_dim, 1)
        for name, fn in (("forward", forward), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self.teacher, self.student = inner_module(teacher), student
        names = resolve_layers(self.teacher, layers, also=inner_module(student))
        resolve_layers(inner_module(student), names)
        if list(stats.layers) != names:
            raise ValueError(f"stats are for layers {stats.layers}, but layers is {names}")
        self.layers = names
        self.stats = stats.to(device_of(inner_module(student)))
        self.criterion, self.start_dim, self.backend = criterion, start_dim, backend
        self.select = select
        self.forward = forward or default_forward
        self.loss_fn = loss_fn or default_loss
        self.mask_key = mask_key
        if checkpoint_teacher not in (True, False, "auto"):
            raise ValueError(f"checkpoint_teacher must be True, False or 'auto', got "
                             f"{checkpoint_teacher!r}")
        self.checkpoint_teacher = checkpoint_teacher
        self.keep_output = bool(keep_output)
        self._head = Head(None if head_chunk is None else check_int("head_chunk", head_chunk, 0))
        self.copy = None if copy is None else list(copy)
        self.last: Optional[CloneStep] = None
        self._output = self._kd = None
        self._tcap = self._ccap = None
        if self.copy is not None:
            self._make_captures()

    def _make_captures(self) -> None:
        self._tcap = ActivationCapture(self.teacher, self.layers, select=self.select,
                                       differentiable=True, copy=self.copy)
        self._ccap = ActivationCapture(inner_module(self.student), self.layers,
                                       select=self.select, copy=self.copy)

    def __call__(self, batch, labels: Optional[Tensor] = None,
                 mask: Optional[Tensor] = None, *, index: Optional[Tensor] = None) -> Tensor:
        # lam goes into the fused op (weight=), so that the clone term reaches its backward
        # with gradient 1, which costs no scaling pass.
        weight = self.lam or 1.0
        ce, clone = self.losses(batch, labels, mask, index=index, weight=weight)
        kd, self._kd = self._kd, None
        self.last = CloneStep(ce.detach(), clone.detach() / weight,
                              self._output if self.keep_output else None,
                              None if kd is None else kd.detach())
        self._output = None
        loss = ce + clone if self.lam else ce + 0.0 * clone
        return loss if kd is None else loss + self.kd * kd

    def _batch(self, batch, labels):
        """The step's batch as the hooks see it: a dict, or ``(inputs, labels)``."""
        if labels is not None:
            return (batch, labels)
        if isinstance(batch, Mapping):
            return batch
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return (batch[0], batch[1])
        if self.loss_fn is not default_loss:
            return (batch, None)
        raise TypeError(f"cloner(batch) takes a dict batch or an (inputs, labels) tuple, or "
                        f"cloner(inputs, labels); got {type(batch).__name__} without labels")

    @torch.compiler.disable
    def losses(self, batch, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None,
               *, index: Optional[Tensor] = None, weight: float = 1.0) -> Tuple[Tensor, Tensor]:
        """``(CE, weight * clone loss)`` of the step (``weight`` folded into the fused op).

        ``index``: the batch's sample indices, with a ``cache``: the teacher's signals come from
        the cache when it holds every sample (the teacher does not run), else they are computed
        and kept. Only for (inputs, labels) batches whose inputs are the same every epoch.

        Not traced by ``torch.compile`` (Dynamo mis-handles hooks added and removed inside a
        compiled frame): in a compiled step it runs eagerly, while a ``torch.compile``-d
        student (or teacher) passed to the Cloner runs its compiled code with the hooks.
        """
        batch = self._batch(batch, labels)
        if mask is None and isinstance(batch, Mapping) and self.mask_key is not None:
            mask = batch.get(self.mask_key)
        if self._tcap is None:
            self.copy = inplace_modified(self.teacher, self.layers, batch, self.select,
                                         forward=self.forward)
            self._make_captures()

        teacher_out = None

        def teacher_ce():
            # The output object (its [B, T, V] logits) dies here, before the teacher's backward,
            # unless kd needs the logits.
            nonlocal teacher_out
            out = self.forward(self.teacher, batch)
            if self.kd:
                teacher_out = out
            return self.loss_fn(out, batch)

        if not self.kd and self.forward is default_forward and self.loss_fn is default_loss \
                and index is None:
            if self._head.applies(self.teacher, batch):
                teacher_ce = functools.partial(chunked_lm_loss, self.teacher, batch,
                                               self._head.chunk)

        cached = None
        if index is not None:
            if self.cache is None or isinstance(batch, Mapping):
                raise ValueError("index= needs a Cloner built with cache=TeacherCache(...) and "
                                 "(inputs, labels) batches")
            cached = self.cache.get(index)
            if cached is not None and self.kd:  # the logits are not cached
                with torch.no_grad(), eval_mode(self.teacher):
                    teacher_out = self.forward(self.teacher, batch)
        with eval_mode(self.teacher), self._tcap as tcap, self._ccap as ccap:
            if cached is None:
                with record_function(PHASES[0]), self._teacher_checkpointing():
                    acts_t, grads = teacher_signals(self.teacher, tcap, None, None,
                                                    loss=teacher_ce)
                if index is not None:
                    self.cache.put(index, acts_t, grads)
            else:
                acts_t, grads = cached
            with record_function(PHASES[1]):
                out = self.forward(self.student, batch)
                ce = self.loss_fn(out, batch)
                acts_c = ccap.outputs()
        self._output = out
        self._kd = None if not self.kd else distill_loss(
            out, teacher_out, self.kd_temperature,
            class_dim=-1 if isinstance(batch, Mapping) else 1)
        if torch.is_grad_enabled():
            frozen = [n for n, c in zip(self.layers, acts_c) if not c.requires_grad]
            if frozen:
                raise RuntimeError(
                    f"the student's outputs of {frozen} do not require grad, so the clone loss "
                    "cannot train it: reentrant activation checkpointing "
                    "(torch.utils.checkpoint(..., use_reentrant=True)) runs the checkpointed "
                    "part without autograd; use use_reentrant=False (or unfreeze the student)")
        with record_function(PHASES[2]):
            return ce, self._clone_loss(acts_t, acts_c, grads, mask, weight)

    def _teacher_checkpointing(self):
        """Checkpointing of the teacher's innermost hooked modules for its pass, if asked for
        (``checkpoint_teacher``), else nothing."""
        on = self.checkpoint_teacher
        if on == "auto":
            student = inner_module(self.student)  # transformers >= 5 names it "activation"
            flag = ("is_activation_checkpointing" if hasattr(student, "is_activation_checkpointing")
                    else "is_gradient_checkpointing")
            on = bool(getattr(student, flag, False))
        if not on:
            return contextlib.nullcontext()
        mods = self._tcap.modules
        inner = [m for m in mods if not any(o is not m and any(o is d for d in m.modules())
                                            for o in mods)]
        return checkpointed(inner)

    def _stats_follow(self, acts: List[Tensor]) -> None:
        """Keep each layer's statistics on its activations' device: the models may have been
        moved (``.cuda()``) after the Cloner was built. A copy on the first step after a move;
        nothing otherwise (a device comparison per layer, no sync)."""
        st = self.stats
        if all(m.device == a.device and s.device == a.device
               for m, s, a in zip(st.mean, st.std, acts)):
            return
        self.stats = LayerStats(st.layers, [m.to(a.device) for m, a in zip(st.mean, acts)],
                                [s.to(a.device) for s, a in zip(st.std, acts)], st.per, st.count)

    def _clone_loss(self, acts_t: List[Tensor], acts_c: List[Tensor], grads: List[Tensor],
                    mask: Optional[Tensor], weight: float) -> Tensor:
        """``weight`` times the sum of the layer losses: one fused call per group of layers with
        the same rows."""
        if mask is not None:
            mask = check_mask(mask, acts_t[0])
        self._stats_follow(acts_t)
        groups: Dict[Tuple[int, bool], List[int]] = {}
        for i, (name, module, t) in enumerate(zip(self.layers, self._tcap.modules, acts_t)):
            sd = rows_start_dim(module, t, self.start_dim)
            masked = mask is not None and mask_applies(mask, t.shape[:sd], name)
            groups.setdefault((sd, masked), []).append(i)
        total = None
        for (sd, masked), idx in groups.items():
            args = ([acts_t[i] for i in idx], [acts_c[i] for i in idx], [grads[i] for i in idx],
                    [self.stats.mean[i] for i in idx], [self.stats.std[i] for i in idx])
            if masked:
                part = masked_clone_loss(*args, mask, tau=self.tau, criterion=self.criterion,
                                         start_dim=sd, weight=weight, keep_inputs=False,
                                         backend=self.backend)
            else:
                part = importance_clone_loss(*args, tau=self.tau, criterion=self.criterion,
                                             start_dim=sd, weight=weight, keep_inputs=False,
                                             backend=self.backend)
            total = part if total is None else total + part
        return total
