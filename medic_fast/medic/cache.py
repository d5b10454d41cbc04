"""The teacher's signals kept across epochs, so that a clone-training step need not recompute
them: :class:`TeacherCache`.

The teacher is frozen and runs in eval mode, so each sample's activations and its own loss
gradient do not depend on the batch it comes in. When the inputs are the same every epoch (no
random augmentation), the teacher's forward and backward of every epoch after the first repeat
the first's. The cache keeps per sample the activations of the hooked layers and the gradient
of that sample's CE (the batch-mean CE's gradient times the batch size), and gives them back
for a batch of sample indices, the gradient divided by the batch size: the step is then the
student's forward and backward plus the loss, instead of about 5/3 of a plain step more.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["TeacherCache", "CACHE_BYTES"]

# The default bound on a cache's memory (activations and gradients together): the paper's run
# (WRN-16-1, 2,500 inputs of 32x32x3, 25 tensors) needs 4.8 GiB in float32. On a GPU the bound is
# also a quarter of the memory free when the cache is allocated.
CACHE_BYTES = 8 << 30


class TeacherCache:
    """Per-sample teacher activations and CE gradients for ``size`` samples (indices
    ``0..size-1``), stored on the activations' device in their dtype (or ``dtype``), at most
    ``max_bytes`` in all (on a GPU, also at most a quarter of its free memory): a cache that
    would be larger is never allocated (``enabled`` turns False on the first :meth:`put`, and
    every step recomputes). ``hits`` and ``misses`` count the batches found and not found.

    Exact up to float rounding when stored in the activations' dtype; ``dtype=torch.bfloat16``
    halves the memory of float32 activations at a relative error of about 2**-9 per value.
    """

    def __init__(self, size: int, max_bytes: int = CACHE_BYTES,
                 dtype: Optional[torch.dtype] = None):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int (the number of samples), got {size!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.size, self.max_bytes, self.dtype = size, max_bytes, dtype
        self.enabled = True
        self.acts: Optional[List[Tensor]] = None
        self.grads: Optional[List[Tensor]] = None
        self.filled: Optional[Tensor] = None
        self._dtypes: List[torch.dtype] = []
        self.hits = self.misses = 0

    def nbytes(self, acts: Sequence[Tensor]) -> int:
        """Bytes the cache needs for activations shaped like ``acts`` (a batch of them)."""
        item = torch.empty((), dtype=self.dtype).element_size() if self.dtype else None
        return sum(2 * self.size * (a[0].numel() if len(a) else 0) *
                   (item or a.element_size()) for a in acts)

    def _check(self, index: Tensor) -> Tensor:
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype.is_floating_point:
            raise ValueError(f"index must be a 1-D integer tensor of sample indices, got "
                             f"{index if not isinstance(index, Tensor) else index.dtype}")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ValueError(f"index must be in [0, {self.size}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        return index

    def covers(self, index: Tensor) -> bool:
        """Whether every sample of ``index`` is cached (what :meth:`get` needs)."""
        index = self._check(index)
        return self.filled is not None and bool(self.filled[index.to(self.filled.device)].all())

    @property
    def complete(self) -> bool:
        """Whether every sample is cached."""
        return self.filled is not None and bool(self.filled.all())

    def get(self, index: Tensor) -> Optional[Tuple[List[Tensor], List[Tensor]]]:
        """``(acts, grads)`` of the samples ``index`` as one batch (gradients of the batch-mean
        CE), or None if any of them is not cached yet."""
        if not self.covers(index):
            self.misses += 1
            return None
        self.hits += 1
        i = index.to(self.acts[0].device)
        n = len(index)
        acts = [a.index_select(0, i).to(d) for a, d in zip(self.acts, self._dtypes)]
        grads = [g.index_select(0, i).div_(n).to(d) for g, d in zip(self.grads, self._dtypes)]
        return acts, grads

    def put(self, index: Tensor, acts: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Keep the batch ``index``'s activations and its batch-mean CE gradients."""
        if not self.enabled:
            return
        index = self._check(index)
        if self.acts is None:
            limit = self.max_bytes
            if acts[0].is_cuda:
                limit = min(limit, torch.cuda.mem_get_info(acts[0].device)[0] // 4)
            if self.nbytes(acts) > limit:
                self.enabled = False
                return
            self.acts = [a.new_empty((self.size, *a.shape[1:]), dtype=self.dtype or a.dtype)
                         for a in acts]
            self.grads = [g.new_empty((self.size, *g.shape[1:]), dtype=self.dtype or g.dtype)
                          for g in grads]
            self.filled = torch.zeros(self.size, dtype=torch.bool, device=acts[0].device)
            self._dtypes = [a.dtype for a in acts]
        i = index.to(self.acts[0].device)
        n = len(index)
        for store, a in zip(self.acts, acts):
            store.index_copy_(0, i, a.detach().to(store.dtype))
        for store, g in zip(self.grads, grads):
            store.index_copy_(0, i, (g.detach() * n).to(store.dtype))
        self.filled[i] = True
