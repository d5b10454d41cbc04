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

from typing import Any, Dict, Optional

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
    ``.loss`` (a per-batch mean). Under gradient accumulation over ``k`` micro-batches the loss
    is divided by ``k`` (Trainer does it: ``model_accepts_loss_kwargs`` is set False, so
    ``num_items_in_batch`` is never passed to the model), and the teacher's loss, whose gradients
    give the importance weights, is divided by ``k`` too, so its gradients are those of the
    accumulated batch's mean loss: ``k`` micro-batches with equally many labelled tokens give the
    parameter update of one batch. ``self.cloner.last`` holds the last step's CE and clone loss.
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
        # The Cloner's loss is a per-batch mean: let Trainer divide it by the accumulation steps
        # (with loss kwargs on, Trainer passes num_items_in_batch and would not divide).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.cloner: Optional[Cloner] = None
        self._teacher_out = None
        self._teacher_scale = 1.0
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
            self.cloner = Cloner(self.teacher, model, self.layers, self.stats, tau=self.tau,
                                 lam=self.lam, forward=self._forward, loss_fn=self._loss, **kw)
        return self.cloner

    def compute_loss(self, model, inputs, return_outputs: bool = False,
                     num_items_in_batch=None):
        """``CE + lam * clone loss`` of the batch on ``model``, and with ``return_outputs`` the
        student's own output object. A per-batch mean: Trainer divides it by the number of
        accumulated micro-batches (``num_items_in_batch`` is not used)."""
        cloner = self._cloner_for(model)
        steps = getattr(self, "current_gradient_accumulation_steps", None) or 1
        self._teacher_scale = 1.0 / steps if model.training else 1.0
        cloner.keep_output = return_outputs
        try:
            loss = cloner(inputs)
        finally:
            self._teacher_out = None
        return (loss, cloner.last.student_output) if return_outputs else loss
