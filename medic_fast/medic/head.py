"""The teacher's causal-LM loss without its ``[B, T, V]`` logits: a chunked linear head.

The Cloner needs the teacher's gradients at the hooked layers only. A Hugging Face causal LM
computes them through logits ``[B, T, V]``, their log-softmax and their gradient, each as large
as the vocabulary makes it. :func:`chunked_lm_loss` runs the model's base (the blocks and the
final norm), then the head and the cross-entropy a chunk of tokens at a time: each chunk's
``d CE / d hidden`` is computed in the forward (as Liger-Kernel's fused linear cross-entropy
does) and the chunk's logits are freed, so the head holds one chunk's logits at a time, by
default about the size of the hidden states. The
head's weight gets no gradient (the teacher is frozen and only its activations' gradients are
asked for).

It applies to models whose output is ``lm_head(hidden)`` scored by Hugging Face's causal-LM
loss (labels shifted by one, ``-100`` ignored, the mean over labelled tokens or the sum over
``num_items_in_batch``); :class:`Head` checks this once per model against the model's own loss
and falls back to it otherwise (a logit soft-cap or scale, another loss), saying so once.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast._utils import eval_mode, user_stacklevel

__all__ = ["chunked_lm_loss", "chunk_rows", "Head"]

IGNORE = -100


class _LinearCE(torch.autograd.Function):
    """``sum(CE(hidden @ W.T + b, labels)) / n`` over rows, chunk by chunk; the gradient of
    ``hidden`` is computed in the forward and kept (``[N, H]``), no logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                n: Tensor, chunk: int) -> Tensor:
        need = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if need else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # the model's loss upcasts too
        total = hidden.new_zeros((), dtype=acc)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            logits = F.linear(h, weight, bias).to(acc)  # the chunk's one [rows, V] buffer
            keep = y != IGNORE
            target = torch.where(keep, y, 0)[:, None]
            picked = logits.gather(1, target)[:, 0]
            top = logits.amax(-1)
            p = logits.sub_(top[:, None]).exp_()  # in place from here on
            sums = p.sum(-1)
            total = total + torch.where(keep, top + sums.log() - picked, 0.0).sum()
            if need:
                p.div_(sums[:, None]).scatter_add_(1, target, -torch.ones_like(picked[:, None]))
                p.mul_((keep.to(acc) / n.to(acc))[:, None])
                grad[s:s + chunk] = F.linear(p.to(h.dtype), weight.t().to(h.dtype))
            del logits, p
        ctx.save_for_backward(grad)
        return total / n.to(acc)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None, None


def chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk so that a chunk's logits are about as large as the hidden states
    ``[tokens, hidden]`` (Liger-Kernel's choice): ``tokens / ceil(vocab / hidden)``, rounded up
    to a power of two."""
    return 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / hidden))))))


def chunked_lm_loss(model: nn.Module, batch: Mapping, chunk: Optional[int] = None) -> Tensor:
    """The causal-LM loss of a Hugging Face ``model`` on a dict ``batch`` (with ``labels``, and
    optionally ``num_items_in_batch``), computed as ``model(**batch).loss`` is, from its base
    model's last hidden state and its output embeddings, ``chunk`` tokens at a time (``None``:
    :func:`chunk_rows`)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
    out = model.base_model(**inputs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    head = model.get_output_embeddings()
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(hidden.device)
    n = batch.get("num_items_in_batch")
    n = (shifted != IGNORE).sum() if n is None else torch.as_tensor(n, device=hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if chunk is None:
        chunk = chunk_rows(*flat.shape, head.weight.shape[0])
    return _LinearCE.apply(flat, head.weight, head.bias, shifted, n, chunk)


def _plain_head(model: nn.Module) -> Optional[str]:
    """Why ``model`` cannot take :func:`chunked_lm_loss`, or None if it may (checked later
    against its own loss)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return "its output embeddings are not an nn.Linear"
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return "it has no base model apart from its head"
    return None


class Head:
    """Whether the Cloner computes the teacher's CE chunked (``chunk`` tokens at a time): where
    the model's own loss is a linear head with causal-LM CE, checked on the first dict batch
    against ``model(**batch).loss`` (rtol 1e-3); else it keeps the model's own loss, and says
    why once."""

    def __init__(self, chunk: Optional[int]):
        self.chunk = chunk
        self.ok: Optional[bool] = None if chunk != 0 else False

    def applies(self, model: nn.Module, batch) -> bool:
        """Whether :func:`chunked_lm_loss` computes ``model``'s CE (decided on the first call,
        which runs the model twice in eval mode without gradients: call it outside any
        capture)."""
        if self.ok is None:
            self.ok = self._check(model, batch)
        return self.ok

    def _check(self, model: nn.Module, batch) -> bool:
        if not isinstance(batch, Mapping) or batch.get("labels") is None:
            return False  # (inputs, labels) classifiers: [B, C] logits, nothing to chunk
        why = _plain_head(model)
        if why is None:
            with torch.no_grad(), eval_mode(model):
                own = model(**batch).loss
                ours = chunked_lm_loss(model, batch, self.chunk)
            if own is None:
                why = "it returns no .loss"
            elif not torch.allclose(ours, own.to(ours.dtype), rtol=1e-3, atol=1e-5):
                why = (f"its loss ({float(own):.6g}) is not the linear head's causal-LM "
                       f"cross-entropy ({float(ours):.6g})")
        if why is not None:
            warnings.warn(f"Cloner: the teacher's CE keeps its [B, T, V] logits (no chunked "
                          f"head: {why}); head_chunk=0 says nothing", stacklevel=user_stacklevel())
        return why is None
