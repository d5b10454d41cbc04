"""A small transformer sequence classifier, a synthetic sequence-classification task with padding,
and a trigger-token backdoor: the test bed for MEDIC on transformers (no weights to download).

* :class:`TinyTransformer`: token + position embeddings, pre-LayerNorm blocks built on
  ``nn.MultiheadAttention`` (so ``blocks.<i>.self_attn`` returns a tuple, as in most transformer
  code), masked mean pooling, a linear head. Token id ``pad`` (0) is padding: the model builds
  the key padding mask itself, so ``model(tokens)`` takes one tensor like the CNNs of
  :mod:`medic_fast.models`. Optional activation checkpointing of the blocks.
* :func:`make_sequences`: class ``y`` = the token group (``token % classes``) that dominates the
  sequence; lengths vary, the tail is padding.
* :class:`TokenTrigger`: stamps a fixed token pattern at a position drawn per sample; its
  ``poison`` / ``apply`` follow :mod:`medic_fast.attacks`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from medic_fast.zoo.attacks import Attack, Poisoned

__all__ = ["PAD", "Block", "TinyTransformer", "padding_mask", "make_sequences", "TokenTrigger"]

PAD = 0
CHECKPOINT = (None, "non_reentrant", "reentrant")


def padding_mask(tokens: Tensor, pad: int = PAD) -> Tensor:
    """``[B, T]`` bool, True at real tokens: the ``mask`` of :class:`medic_fast.Cloner`."""
    return tokens != pad


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        h = self.ln1(x)
        attn, _ = self.self_attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        x = x + self.drop(attn)
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyTransformer(nn.Module):
    """Transformer encoder classifier over token ids ``[B, T]`` (``pad`` = padding).

    ``checkpoint``: ``None``, ``"non_reentrant"`` or ``"reentrant"``: recompute each block in
    backward (``torch.utils.checkpoint``) when training with gradients.
    """

    def __init__(self, vocab: int = 32, classes: int = 4, d_model: int = 64, depth: int = 2,
                 heads: int = 4, d_ff: Optional[int] = None, max_len: int = 64,
                 dropout: float = 0.0, pad: int = PAD, checkpoint: Optional[str] = None):
        super().__init__()
        if checkpoint not in CHECKPOINT:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT}, got {checkpoint!r}")
        for name, v in (("vocab", vocab), ("classes", classes), ("d_model", d_model),
                        ("depth", depth), ("heads", heads), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.pad, self.checkpoint = pad, checkpoint
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff or 4 * d_model, dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be integer ids [B, T], got {tokens.dtype} "
                            f"{tuple(tokens.shape)}")
        if tokens.shape[1] > self.pos.num_embeddings:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len "
                             f"{self.pos.num_embeddings}")
        keep = padding_mask(tokens, self.pad)
        pad_mask = ~keep
        x = self.embed(tokens) + self.pos.weight[:tokens.shape[1]]
        recompute = self.checkpoint is not None and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = _checkpoint(block, x, pad_mask, use_reentrant=self.checkpoint == "reentrant")
            else:
                x = block(x, pad_mask)
        w = keep.unsqueeze(-1).to(x.dtype)
        pooled = (self.norm(x) * w).sum(1) / w.sum(1).clamp_min(1)
        return self.head(pooled)


def make_sequences(n: int, *, length: int = 32, min_length: int = 8, vocab: int = 32,
                   classes: int = 4, dominance: float = 0.4, seed: int = 0,
                   pad: int = PAD) -> Tuple[Tensor, Tensor]:
    """``(X, y)``: ``n`` sequences of token ids ``[n, length]`` and their classes ``[n]``.

    Each sequence has a length drawn from ``[min_length, length]`` (the rest is ``pad``); each
    real token comes, with probability ``dominance``, from the group of its class (tokens ``v``
    with ``v % classes == y``) and otherwise uniformly from the vocabulary; ``y`` is then set to
    the group that actually dominates (ties: the lower class), so labels are exact.
    """
    if not 1 <= min_length <= length:
        raise ValueError(f"need 1 <= min_length <= length, got {min_length}, {length}")
    if vocab < 2 * classes + 1:
        raise ValueError(f"vocab must be at least 2 * classes + 1 (two tokens per class plus pad), "
                         f"got {vocab}")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.arange(vocab)
    tokens = tokens[tokens != pad]
    group = tokens % classes
    y0 = torch.randint(classes, (n,), generator=gen)
    uniform = tokens[torch.randint(len(tokens), (n, length), generator=gen)]
    per_class = [tokens[group == k] for k in range(classes)]
    own = torch.stack([per_class[int(k)][torch.randint(len(per_class[int(k)]), (length,),
                                                       generator=gen)] for k in y0])
    X = torch.where(torch.rand(n, length, generator=gen) < dominance, own, uniform)
    lengths = torch.randint(min_length, length + 1, (n,), generator=gen)
    X[torch.arange(length)[None, :] >= lengths[:, None]] = pad
    counts = F.one_hot(X % classes, classes) * (X != pad).unsqueeze(-1)
    return X, counts.sum(1).argmax(1)


class TokenTrigger(Attack):
    """Backdoor trigger: the token ``pattern`` written over the real tokens at a position drawn
    per sample (fixed by ``seed``, so ``apply`` is deterministic); padding is never written."""

    images = False

    def __init__(self, pattern: Sequence[int] = (29, 30, 31), seed: int = 0, pad: int = PAD):
        pattern = torch.as_tensor(list(pattern), dtype=torch.int64)
        if pattern.dim() != 1 or len(pattern) == 0 or bool((pattern == pad).any()):
            raise ValueError("pattern must be a non-empty sequence of non-padding token ids")
        self.pattern, self.seed, self.pad = pattern, seed, pad

    def apply(self, X: Tensor) -> Tensor:
        """New token ids (any dtype) with the pattern stamped inside each sequence's real part."""
        k = len(self.pattern)
        lengths = (X != self.pad).sum(1)
        if bool((lengths < k).any()):
            raise ValueError(f"X: some sequences have fewer than {k} real tokens, the pattern "
                             "does not fit")
        gen = torch.Generator().manual_seed(self.seed)
        start = (torch.rand(X.shape[0], generator=gen) * (lengths.cpu() - k + 1)).long()
        cols = (start[:, None] + torch.arange(k)).to(X.device)
        out = X.clone()
        out.scatter_(1, cols, self.pattern.to(X).expand(X.shape[0], k))
        return out

    def poison(self, X: Tensor, y: Tensor, rate: float, target: int, seed: int = 0) -> Poisoned:
        """:meth:`Attack.poison` on token ids (it takes floating inputs: ids pass through
        float64, exactly) returning ids of ``X``'s dtype."""
        if not isinstance(X, Tensor) or X.is_floating_point() or X.dim() != 2:
            raise TypeError("X must be integer token ids [N, T]")
        p = super().poison(X.double(), y, rate, target, seed)
        return Poisoned(p.X.to(X.dtype), p.y, p.index)
