"""Data plumbing shared by the pipelines (MEDIC and CLEAR): ``data`` arguments to loaders, splits
and augmentation. The bundled toy data sets are in :mod:`medic_fast.zoo.datasets`.

Every public function that takes ``data`` accepts a ``Dataset``, a ``DataLoader`` or an
``(X, y)`` pair of tensors; :func:`make_loader` turns any of them into a ``DataLoader``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, TensorDataset

from medic_fast._utils import digest, preserved_rng

__all__ = ["batch_inputs", "check_pair", "check_labels", "as_dataset", "make_loader",
           "labelled_batches", "first_batch", "unpack_batch", "set_epoch", "split",
           "fingerprint", "RandomCropFlip"]


def check_pair(X, y, name: str) -> None:
    """Check that ``(X, y)`` are ``[N, ...]`` inputs and ``[N]`` integer labels, N > 0."""
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{name} as a pair must be (X, y) tensors, got "
                        f"({type(X).__name__}, {type(y).__name__})")
    if X.dim() == 0 or y.dim() != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: X must be [N, ...] and y [N] with the same N, got X "
                         f"{tuple(X.shape)} and y {tuple(y.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: labels y must be an integer tensor, got {y.dtype}")


def check_labels(y: Tensor, classes: int, name: str = "data") -> None:
    """Refuse labels outside ``[0, classes)`` (it reads them: a sync for CUDA tensors)."""
    bad = (y < 0) | (y >= classes)
    if bool(bad.any()):
        raise ValueError(f"{name}: labels must be in [0, {classes}) for a model with {classes} "
                         f"classes, got label {int(y[bad][0])}")


def as_dataset(data, name: str = "data") -> Dataset:
    """The ``Dataset`` behind ``data``: a ``Dataset`` itself, a ``DataLoader``'s dataset, or a
    ``TensorDataset`` of an ``(X, y)`` pair."""
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and len(data) == 2:
        check_pair(data[0], data[1], name)
        return TensorDataset(data[0], data[1])
    raise TypeError(f"{name} must be a Dataset, a DataLoader or an (X, y) pair of tensors, "
                    f"got {type(data).__name__}")


def make_loader(data, *, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, shard: Optional[Tuple[int, int]] = None,
                name: str = "data") -> DataLoader:
    """A ``DataLoader`` over ``data``.

    * A ``DataLoader`` is used as given (its batch size, sampler, workers), except under
      ``shard``, where it is rebuilt on its dataset with the same batch size, collate function,
      workers and ``pin_memory``.
    * ``(X, y)`` tensors are fetched a whole batch at a time (one indexing per batch, not one
      per sample).
    * ``shuffle``: a new permutation every epoch, fixed by ``seed`` and the epoch number (call
      :func:`set_epoch`), so runs and resumed runs see the same order.
    * ``shard=(rank, world)``: this process's part of the data. Shuffled: ``DistributedSampler``
      (padded so every process runs the same number of steps, as DDP needs). Not shuffled: every
      ``world``-th sample from ``rank`` without padding, so statistics count each sample once.

    A data set of length 0 is refused.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dataset = as_dataset(data, name)
    if isinstance(dataset, Sized) and len(dataset) == 0:
        raise ValueError(f"{name} is empty: expected at least one sample, got a "
                         f"{type(dataset).__name__} of length 0")
    if isinstance(data, DataLoader) and shard is None:
        return data
    rank, world = shard if shard is not None else (0, 1)
    if shuffle:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=seed, drop_last=drop_last)
    else:
        sampler = range(rank, len(dataset), world)
    if isinstance(data, DataLoader):
        return DataLoader(dataset, batch_size=data.batch_size or batch_size, sampler=sampler,
                          collate_fn=data.collate_fn, num_workers=data.num_workers,
                          pin_memory=data.pin_memory, drop_last=drop_last)
    if isinstance(dataset, TensorDataset):
        return DataLoader(dataset, batch_size=None,
                          sampler=BatchSampler(sampler, batch_size, drop_last))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)


def batch_inputs(batch, name: str = "data") -> Tensor:
    """The inputs of a batch: the batch itself when it is a tensor, else its first element
    (for uses that need no labels, such as activation statistics)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        return batch[0]
    return unpack_batch(batch, name)[0]


def unpack_batch(batch, name: str = "data") -> Tuple[Tensor, Tensor]:
    """The ``(inputs, labels)`` of an ``(inputs, labels, ...)`` tuple or list batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    if isinstance(batch, Mapping):
        got = f"a dict with keys {list(batch)} (dict batches are not supported)"
    elif isinstance(batch, Tensor):
        got = f"a Tensor of shape {tuple(batch.shape)} (inputs only)"
    elif isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of length {len(batch)}"
    else:
        got = type(batch).__name__
    raise TypeError(f"{name} must yield (inputs, labels, ...) tuple batches, got {got}")


def labelled_batches(data, batch_size: int = 256, name: str = "data"):
    """Yield the ``(inputs, labels)`` of each batch of ``data`` (see :func:`make_loader`)."""
    for item in make_loader(data, batch_size=batch_size, name=name):
        yield unpack_batch(item, name)


def first_batch(data, batch_size: int = 256, name: str = "data") -> Tuple[Tensor, Tensor]:
    """The ``(inputs, labels)`` of the first batch of ``data``; ``data`` giving none is refused."""
    for x, y in labelled_batches(data, batch_size, name):
        return x, y
    raise ValueError(f"{name} gives no batch: expected at least one, got none (empty, or fewer "
                     "samples than one batch with drop_last)")


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler (if it is epoch-aware, e.g. ``DistributedSampler``) the epoch."""
    for sampler in (loader.sampler, getattr(loader.sampler, "sampler", None),
                    getattr(loader.batch_sampler, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def fingerprint(data, name: str = "data", rows: int = 32) -> dict:
    """What identifies ``data`` when a run is resumed, cheaply (no pass over it): the dataset's
    type, ``shape`` (its length, then the first sample's input shape), the inputs' ``dtype``, and
    ``sample``, a digest of ``rows`` samples spread over it (inputs and labels).

    ``(X, y)`` tensors and a ``TensorDataset`` are indexed directly. Another ``Dataset``'s items
    are read twice with the torch generator seeded (and restored): a dataset whose items still
    differ between the reads (random transforms drawing elsewhere) gets ``sample`` None, as does
    one whose items are not tensors, arrays or numbers, or that has no length (an iterable).
    """
    dataset = as_dataset(data, name)
    size = len(dataset) if isinstance(dataset, Sized) else None
    index = [i * size // rows for i in range(rows)] if size and size > rows else range(size or 0)
    if isinstance(dataset, TensorDataset):
        items = [t[torch.as_tensor(index, dtype=torch.long, device=t.device)]
                 for t in dataset.tensors]
        first, sample = items[0][:1], digest(items)
    else:
        reads, items = [], []
        try:
            for _ in range(2):
                with preserved_rng():
                    torch.manual_seed(0)
                    items = [dataset[i] for i in index]
                reads.append(digest(items))
        except (TypeError, NotImplementedError):  # items not digestible, or no __getitem__
            reads = [None]
        sample = reads[0] if len(set(reads)) == 1 else None
        x = items[0][0] if items and isinstance(items[0], (tuple, list)) else None
        first = torch.as_tensor(x)[None] if isinstance(x, Tensor) \
            or type(x).__module__ == "numpy" else None
    return {"type": type(dataset).__name__,
            "shape": None if first is None else [size, *first.shape[1:]],
            "dtype": None if first is None else str(first.dtype), "sample": sample}


def split(X: Tensor, y: Tensor, fractions: Sequence[float], *, seed: int = 0,
          stratify: bool = True) -> list:
    """Split ``(X, y)`` into ``len(fractions)`` disjoint ``(X, y)`` parts of those fractions.

    With ``stratify`` every part keeps the class proportions (each class is split on its own).
    Fractions may sum to less than 1; the rest is left out. Deterministic given ``seed``.
    """
    check_pair(X, y, "split")
    fr = [float(f) for f in fractions]
    if not fr or any(f < 0 for f in fr) or sum(fr) > 1 + 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to at most 1, got {list(fractions)}")
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(y == c).flatten() for c in torch.unique(y)] if stratify \
        else [torch.arange(len(y))]
    parts = [[] for _ in fr]
    for idx in groups:
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cum = torch.tensor([0.0, *fr], dtype=torch.float64).cumsum(0).clamp(max=1.0)
        # cumulative: fractions summing to 1 keep every sample
        cuts = (cum * len(idx)).round().long().tolist()
        for k in range(len(fr)):
            parts[k].append(idx[cuts[k]:cuts[k + 1]])
    out = []
    for p in parts:
        idx = torch.cat(p)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        out.append((X[idx], y[idx]))
    return out


class RandomCropFlip:
    """Batch augmentation for images ``[B, C, H, W]``: a random crop after zero-padding by
    ``padding`` pixels, and a random horizontal flip when ``flip`` (off for digits, which are
    not mirror-symmetric). Draws from the global torch RNG (the training loop seeds it per epoch).
    """

    def __init__(self, padding: int = 1, flip: bool = False):
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {padding!r}")
        self.padding, self.flip = padding, bool(flip)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomCropFlip takes images [B, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        b, _, h, w = x.shape
        p = self.padding
        if p:
            xp = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b, 1), device=x.device)
            ox = torch.randint(0, 2 * p + 1, (b, 1), device=x.device)
            rows = (oy + torch.arange(h, device=x.device))[:, :, None]
            cols = (ox + torch.arange(w, device=x.device))[:, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = xp[batch, :, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            mirror = torch.rand(b, device=x.device) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        return x.contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"
