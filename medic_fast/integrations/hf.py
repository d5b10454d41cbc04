"""MEDIC under the Hugging Face ``Trainer``: :class:`CloneTrainer`.

``CloneTrainer(model=student, teacher=teacher, stats=stats, layers=layers, args=..., ...)``
trains ``student`` with ``CE + lam * importance clone loss`` (a :class:`~medic_fast.Cloner`
step) and is otherwise a plain ``transformers.Trainer``: the student is the ``model`` that
``compute_loss`` receives (the DDP / FSDP wrapper Trainer made, once it made one), the loss is
scaled for gradient accumulation like Trainer's own, ``evaluate()`` gets the student's output
object, and ``save_model`` saves the student (tied weights included) as Trainer does.

Needs ``transformers`` (``pip install medic-fast[hf]``); ``import medic_fast`` does not import it.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
import transformers
from torch import nn

from medic_fast.medic.cloner import Cloner, default_forward, default_loss
from medic_fast.stats import LayerStats

__all__ = ["CloneTrainer"]


class CloneTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training loss is the MEDIC clone objective.

    Args:
        teacher: the trojaned model, frozen here (``eval()``, ``requires_grad_(False)``) and
            moved to ``args.device``.
        stats: :class:`~medic_fast.stats.LayerStats` of the teacher for ``layers``
            (:func:`medic_fast.collect_stats`).
        layers: what to clone, as :class:`~medic_fast.Cloner` takes it (names, modules, globs,
            ``"blocks"``).
        tau, lam: importance temperature and clone-loss weight.
        cloner_kwargs: more keyword arguments of :class:`~medic_fast.Cloner` (``criterion``,
            ``forward``, ``loss_fn``, ``mask_key``...).
        everything else: ``transformers.Trainer``'s (``model`` is the student).

    Batches are the dicts of the data collator, ``labels`` included: the CE is the model's own
    ``.loss``. Micro-batches of gradient accumulation give the update of the whole batch, also
    when they hold unequal numbers of tokens, as Trainer's own loss does: where both models take
    loss keyword arguments (every Hugging Face model) and ``forward``/``loss_fn`` are the
    defaults, ``num_items_in_batch`` (the labelled tokens of all micro-batches) goes to both
    models' forward, so each micro-batch's CE is its share of the batch's token mean (the
    teacher's too: its gradients, which weight the neurons, are the whole batch's), and the
    clone loss, a mean over the micro-batch's rows (the tokens its ``attention_mask`` keeps), is
    weighted by its share of the batch's rows. Otherwise each micro-batch's loss is its mean,
    divided by the number of micro-batches (exact for micro-batches of equal size), the
    teacher's loss too. ``self.cloner.last`` holds the last step's CE and clone loss.
    """

    def __init__(self, *args, teacher: nn.Module, stats: LayerStats, layers,
                 tau: float = 5.0, lam: float = 10.0,
                 cloner_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.stats, self.layers, self.tau, self.lam = stats, layers, tau, lam
        self.cloner_kwargs = dict(cloner_kwargs or {})
        self._user_forward = self.cloner_kwargs.pop("forward", None) or default_forward
        self._user_loss = self.cloner_kwargs.pop("loss_fn", None) or default_loss
        # Trainer counts num_items_in_batch and leaves the loss undivided by the accumulation
        # steps only where both models get it; otherwise it divides the per-batch means.
        self.model_accepts_loss_kwargs = (
            self.model_accepts_loss_kwargs and _accepts_loss_kwargs(self.teacher)
            and self._user_forward is default_forward and self._user_loss is default_loss)
        self.loss_is_scaled_for_ga = None
        self.cloner: Optional[Cloner] = None
        self._teacher_out = None
        self._teacher_scale = 1.0
        self._shares: list = []
        # Fail early on wrong layers or stats, on the model as given.
        self._cloner_for(self.model)

    # -- the Cloner, on the model Trainer passes ------------------------------------------------

    def _forward(self, model, batch):
        out = self._user_forward(model, batch)
        if model is self.cloner.teacher:
            self._teacher_out = out
        return out

    def _loss(self, output, batch):
        ce = self._user_loss(output, batch)
        if output is self._teacher_out:
            self._teacher_out = None
            if self._teacher_scale != 1.0:
                ce = ce * self._teacher_scale
        return ce

    def _cloner_for(self, model: nn.Module) -> Cloner:
        """The Cloner whose student is ``model`` (rebuilt when Trainer hands another object, such
        as the DDP wrapper it made after construction)."""
        if self.cloner is None or self.cloner.student is not model:
            kw = dict(self.cloner_kwargs)
            if self.cloner is not None and "copy" not in kw:
                kw["copy"] = self.cloner.copy
            # With num_items_in_batch, the Cloner's own defaults (and its chunked teacher head):
            # the batch carries num_items_in_batch to both models.
            hooks = {} if self.model_accepts_loss_kwargs else \
                dict(forward=self._forward, loss_fn=self._loss)
            self.cloner = Cloner(self.teacher, model, self.layers, self.stats, tau=self.tau,
                                 lam=self.lam, **hooks, **kw)
        return self.cloner

    # -- the accumulated batch ------------------------------------------------------------------

    def _rows(self, batch) -> Optional[torch.Tensor]:
        """The rows the clone loss averages over in ``batch``: the tokens its mask keeps, or
        every token of its labels."""
        mask = batch.get(self.cloner.mask_key) if self.cloner.mask_key else None
        if mask is not None:
            return mask.ne(0).sum()
        labels = batch.get("labels")
        return None if labels is None else torch.tensor(labels.numel())

    def get_batch_samples(self, *args, **kwargs):
        """Trainer's micro-batches of one update and ``num_items_in_batch``; also each
        micro-batch's share of the rows of all of them (summed over processes where Trainer
        sums the tokens), which weights its clone loss. One host read per update."""
        samples, num_items = super().get_batch_samples(*args, **kwargs)
        self._shares = []
        rows = [self._rows(b) for b in samples] if num_items is not None else []
        if rows and all(r is not None for r in rows):
            rows = torch.stack([r.to(self.args.device) for r in rows])
            total = rows.sum()
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            self._shares = (rows / total.clamp_min(1)).tolist()
        return samples, num_items

    def compute_loss(self, model, inputs, return_outputs: bool = False,
                     num_items_in_batch=None):
        """``CE + lam * clone loss`` of the batch on ``model``, and with ``return_outputs`` the
        student's own output object: with ``num_items_in_batch``, this micro-batch's share of
        the accumulated batch's loss (the class docstring says how); without, its mean."""
        cloner = self._cloner_for(model)
        tokens = num_items_in_batch if self.model_accepts_loss_kwargs else None
        steps = getattr(self, "current_gradient_accumulation_steps", None) or 1
        self._teacher_scale = 1.0 / steps if model.training and tokens is None else 1.0
        share = self._shares.pop(0) if tokens is not None and model.training and self._shares \
            else 1.0
        cloner.keep_output = return_outputs
        lam = cloner.lam
        cloner.lam = lam * share
        try:
            loss = cloner(inputs if tokens is None else {**inputs, "num_items_in_batch": tokens})
        finally:
            self._teacher_out = None
            cloner.lam = lam
        if (tokens is not None and self.args.average_tokens_across_devices
                and self.args.n_gpu <= 1):  # DDP averages what each process's tokens summed
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, cloner.last.student_output) if return_outputs else loss


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``num_items_in_batch``, as Trainer decides it."""
    model = getattr(model, "module", model)
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is not None:
        return bool(accepts)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(model.forward).parameters.values())
