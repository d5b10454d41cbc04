"""Activation statistics of a model over a data set: the ``mean`` / ``std`` of the importance
clone loss (DESIGN.md §1), per channel or per neuron.

Batches are merged with Chan et al.'s parallel form of Welford's algorithm in float64 (no
catastrophic cancellation from summing squares); under ``torch.distributed`` each process
handles its shard and the per-process moments are gathered and merged the same way, so every
process ends with the statistics of the whole data set.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from medic_fast._utils import check_int, device_of, dist_shard, eval_mode, inner_module, \
    preserved_rng
from medic_fast.capture import (ActivationCapture, call_model, check_mask, inplace_modified,
                                mask_applies, resolve_layers, rows_start_dim)
from medic_fast.data import batch_inputs, make_loader
from medic_fast.ops._validate import check_std

__all__ = ["LayerStats", "collect_stats", "stat_shapes"]

PER = ("channel", "neuron")


@dataclass(frozen=True)
class LayerStats:
    """Statistics of the hooked layers: ``mean[i]`` and population ``std[i]`` (float32) of layer
    ``layers[i]``: 1-D ``[C]`` per channel, or the feature shape per neuron; ``count`` samples.
    A negative ``std`` is refused, a zero one warned about (once per process)."""
    layers: List[str]
    mean: List[Tensor]
    std: List[Tensor]
    per: str
    count: int

    def __post_init__(self):
        if not len(self.layers) == len(self.mean) == len(self.std):
            raise ValueError(f"LayerStats needs one mean and one std per layer, got "
                             f"{len(self.layers)} layers, {len(self.mean)} means and "
                             f"{len(self.std)} stds")
        for name, sd in zip(self.layers, self.std):
            check_std(f"std of layer {name!r}", sd)

    def to(self, device) -> "LayerStats":
        """The same statistics on ``device``."""
        return LayerStats(self.layers, [m.to(device) for m in self.mean],
                          [s.to(device) for s in self.std], self.per, self.count)


class _Moments:
    """Count, mean and sum of squared deviations (M2) of one layer, in float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0.0, None, None

    def merge(self, n: float, mean: Tensor, m2: Tensor) -> None:
        """Chan et al.: combine with another group's ``(n, mean, M2)``."""
        if n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.n * n / total)
        self.n = total

    def add_batch(self, rows: Tensor, per: str) -> Tensor:
        """Add ``rows`` ``[R, *features]``: per channel (``features[0]``) or per neuron. Returns
        whether the rows were all finite (a 0-dim bool tensor: no sync)."""
        x = rows.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        dims = [d for d in range(x.dim()) if d != 1] if per == "channel" else [0]
        if x.shape[0] == 0:
            return torch.ones((), dtype=torch.bool, device=x.device)
        # Sums of (x - shift), shift = the first row's mean per statistic: plain sums are 5x
        # faster than var_mean's Welford pass on CPU, and the shift keeps E[d^2] - E[d]^2 free of
        # cancellation when a mean is large against its spread (RESULTS §10). Sums are pairwise
        # in float32, the moments merged in float64.
        inner = [k for k in dims if k != 0]
        shift = x[:1].mean(inner, keepdim=True) if inner else x[:1]
        d = x - shift
        n = float(x.numel() // x.shape[1]) if per == "channel" else float(x.shape[0])
        s1 = d.sum(dims).to(torch.float64)
        s2 = d.square().sum(dims).to(torch.float64)
        mean_d = s1 / n
        m2 = (s2 - s1 * mean_d).clamp_min(0)
        mean = shift.reshape(mean_d.shape).to(torch.float64) + mean_d
        self.merge(n, mean, m2)
        return torch.isfinite(m2).all() & torch.isfinite(mean).all()


def _comm_device(like: Tensor) -> torch.device:
    """Where this process's collectives run: the CPU (gloo), or under NCCL the statistics' own GPU
    (the current device only when they are on the CPU; the current device need not be theirs)."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    return like.device if like.is_cuda else torch.device("cuda", torch.cuda.current_device())


def _all_gather_moments(moments: List[_Moments]) -> None:
    """Merge every process's moments into every process's ``moments``, in rank order."""
    world = dist.get_world_size()
    comm = _comm_device(moments[0].mean)
    flat = torch.cat([torch.cat([torch.tensor([m.n], dtype=torch.float64),
                                 m.mean.flatten().cpu(), m.m2.flatten().cpu()])
                      for m in moments]).to(comm)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    shapes = [(m.mean.shape, m.mean.device) for m in moments]
    for i in range(len(moments)):
        moments[i] = _Moments()
    for g in gathered:
        g = g.cpu()  # one copy per process, not a host sync per layer to read its count
        offset = 0
        for i, (shape, device) in enumerate(shapes):
            k = shape.numel()
            n = float(g[offset])
            mean = g[offset + 1:offset + 1 + k].reshape(shape).to(device)
            m2 = g[offset + 1 + k:offset + 1 + 2 * k].reshape(shape).to(device)
            moments[i].merge(n, mean, m2)
            offset += 1 + 2 * k


@preserved_rng()
@torch.no_grad()
def collect_stats(model: nn.Module, data, layers: Optional[Sequence[str]] = None,
                  per: str = "channel", *, start_dim: Optional[int] = None,
                  mask_fn: Optional[Callable[[Tensor], Tensor]] = None,
                  mask_key: Optional[str] = "attention_mask", select=None,
                  copy: Optional[Sequence[str]] = None, batch_size: int = 256,
                  device=None) -> LayerStats:
    """Mean and std of the outputs of ``layers`` of ``model`` over ``data``, in eval mode.

    Each output is cut into rows ``shape[:start_dim]`` and features ``shape[start_dim:]``, as
    the importance clone loss cuts it, and the statistics are over rows:

    * ``per="channel"``: one statistic per ``shape[start_dim]`` (per channel of a conv map, per
      feature of a 2-D output, per hidden unit of a ``[B, T, H]`` output with a row per token);
    * ``per="neuron"``: one per element of ``shape[start_dim:]``.

    Args:
        model: the (trojaned) model (a DDP / compiled wrapper is unwrapped); it is put in eval
            mode for the pass and its training flags are restored; nothing else of it changes.
        data: a ``Dataset``, ``DataLoader`` or ``(X, y)`` pair (labels are not used); or dict
            batches (a ``DataLoader`` yielding them, or a list of them): each dict is passed to
            the model as keyword arguments (``model(**batch)``, a Hugging Face model's
            ``input_ids``, ``attention_mask``, ...).
        layers: module names, module objects, glob patterns or ``"blocks"`` (see
            :func:`~medic_fast.capture.find_layers`); default
            :func:`~medic_fast.capture.default_plane`.
        start_dim: per layer by default (:func:`~medic_fast.capture.rows_start_dim`: a row per
            token for 3-D outputs of modules other than conv/BatchNorm, else a row per sample).
        mask_fn: ``inputs -> [B, T]`` bool, True at real tokens: rows that are padding are left
            out of the statistics of the layers whose rows are ``[B, T]`` (a mask of their rank
            but another shape is a ``ValueError`` naming the layer). For dict batches it gets
            the dict, and by default the mask is ``batch[mask_key]`` (``attention_mask``).
        select: which tensor of a tuple output is the activation (see ``ActivationCapture``).
        copy: outputs modified in place later in the forward (see ``ActivationCapture``); found
            on the first batch when None.
        batch_size: for ``(X, y)`` or ``Dataset`` data.
        device: where to run; default the model's parameters' device.

    ``count`` is the number of samples (sequences, for dict batches). Under an initialised
    ``torch.distributed`` process group each process reads its ``rank``-th share of the data
    and the result is the statistics of all of it. A statistic that would not be finite raises
    ``ValueError`` naming the first sample whose inputs are not (NaN or inf), or else the first
    layer whose output is not. The global random generators are left as they were (iterating a
    ``DataLoader`` draws from them).
    """
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    if start_dim is not None:
        check_int("start_dim", start_dim, 1)
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable (inputs -> [B, T] bool), got "
                        f"{type(mask_fn).__name__}")
    model = inner_module(model)
    names = resolve_layers(model, layers)
    device = device_of(model, device)
    moments = [_Moments() for _ in names]
    count = 0
    with eval_mode(model):
        for batch in _batches(data, batch_size):
            x = _to(batch if isinstance(batch, Mapping) else batch_inputs(batch), device)
            if copy is None:
                copy = inplace_modified(model, names, x, select)
            with ActivationCapture(model, names, select=select, copy=copy) as cap:
                call_model(model, x)
                acts = cap.outputs()
            mask = _batch_mask(x, mask_fn, mask_key)
            if mask is not None:
                mask = check_mask(mask, acts[0])
            finite = []
            for name, module, mom, a in zip(names, cap.modules, moments, acts):
                sd = rows_start_dim(module, a, start_dim)
                rows = a.reshape(-1, *a.shape[sd:])
                if mask is not None and mask_applies(mask, a.shape[:sd], name):
                    rows = rows[mask.reshape(-1).bool()]
                finite.append(mom.add_batch(rows, per))
            if not bool(torch.stack(finite).all()):
                raise nonfinite_error(model, x, count)
            count += _batch_len(x)
    return _finalize(names, moments, count, per)


@torch.no_grad()
def stat_shapes(model: nn.Module, x: Tensor, layers: Sequence[str],
                per: str = "channel") -> List[torch.Size]:
    """The shapes of the statistics that :func:`collect_stats` gives for ``layers`` of ``model``
    (rows cut by default) on inputs like the batch ``x``: per channel ``[C]``, per neuron the
    feature shape. For checking statistics from elsewhere (a checkpoint) before use; runs the
    model on one sample, in eval mode."""
    model = inner_module(model)
    names = resolve_layers(model, layers)
    with eval_mode(model), ActivationCapture(model, names) as cap:
        call_model(model, x[:1])
        acts = cap.outputs()
    shapes = []
    for module, a in zip(cap.modules, acts):
        sd = rows_start_dim(module, a)
        shapes.append(a.shape[sd:sd + 1] if per == "channel" else a.shape[sd:])
    return shapes


def _batches(data, batch_size: int):
    """The batches of ``data``; a list of dict batches is this process's share of the list."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, Mapping) for b in data):
        rank, world = dist_shard() or (0, 1)
        return list(data)[rank::world]
    return make_loader(data, batch_size=batch_size, shard=dist_shard())


def _to(x, device: torch.device):
    """``x`` (a tensor, or a dict of tensors and other values) on ``device``."""
    nb = device.type == "cuda"
    if isinstance(x, Mapping):
        return {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v
                for k, v in x.items()}
    return x.to(device, non_blocking=nb)


def _batch_len(x) -> int:
    """The number of samples of a batch: its first tensor's first dimension."""
    if isinstance(x, Mapping):
        return next(len(v) for v in x.values() if isinstance(v, Tensor) and v.dim() > 0)
    return x.shape[0]


def _batch_mask(x, mask_fn, mask_key) -> Optional[Tensor]:
    """The padding mask of a batch: ``mask_fn(x)``, else ``x[mask_key]`` of a dict batch."""
    if mask_fn is not None:
        return mask_fn(x)
    if isinstance(x, Mapping) and mask_key is not None:
        return x.get(mask_key)
    return None


@torch.no_grad()
def nonfinite_error(model: nn.Module, x: Tensor, offset: int, data: str = "data") -> ValueError:
    """The error for a batch ``x`` of ``data`` (its samples ``offset``, ``offset + 1``, ...)
    whose activations are not finite: it names the first sample with a non-finite input, else
    the first module of ``model`` (in forward order) whose output is not finite, and on which
    sample. Runs ``model`` (in its current mode) on ``x`` again to find that module."""
    n = _batch_len(x)
    if isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex()):
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
        if bool(bad.any()):
            return ValueError(f"{data}: sample {offset + int(bad.nonzero()[0])} has NaN or "
                              "infinite values; remove or repair it (clean data must be finite)")
    found = []

    def hook(name, output):
        t = output[0] if isinstance(output, (tuple, list)) and output else output
        if found or not isinstance(t, Tensor) or not t.is_floating_point() \
                or bool(torch.isfinite(t).all()):
            return
        per_sample = t.dim() > 0 and len(t) == n
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(1) if per_sample else None
        found.append((name, int(bad.nonzero()[0]) if per_sample else None))

    handles = [m.register_forward_hook(lambda m, i, o, name=name: hook(name, o))
               for name, m in model.named_modules() if name]
    try:
        call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    name, i = found[0] if found else (None, None)
    where = f"samples {offset}-{offset + n - 1}" if i is None else f"sample {offset + i}"
    if name is None:
        return ValueError(f"{data}: the model's activations are not finite (NaN or inf) on "
                          f"{where}, while the inputs and every submodule's output are finite; "
                          "check the model's forward and parameters")
    return ValueError(f"{data}: the output of layer {name!r} is not finite (NaN or inf) on "
                      f"{where}, while the inputs are finite; check that layer's parameters "
                      "(and the model's) for NaN or inf")


def _finalize(names: List[str], moments: List[_Moments], count: int, per: str) -> LayerStats:
    """This process's moments over ``count`` samples -> the statistics of all processes."""
    if count == 0:
        raise ValueError("data is empty (or this process's share of it is): no statistics")
    if dist.is_available() and dist.is_initialized():
        _all_gather_moments(moments)
        total = torch.tensor([count], dtype=torch.float64, device=_comm_device(moments[0].mean))
        dist.all_reduce(total)
        count = int(total.item())
    return LayerStats(list(names), [m.mean.float() for m in moments],
                      [(m.m2 / m.n).sqrt().float() for m in moments], per, count)
