"""MEDIC inside a user's own training loop, for transformers as well as CNNs.

* :class:`Cloner`: ``loss = cloner(inputs, labels, mask)`` is ``CE(student(inputs), labels) +
  lam * importance_clone_loss(all hooked layers)`` for one step; the user calls ``backward`` and
  steps the optimizer. Rows are tokens for 3-D activations ``[B, T, H]`` (``start_dim=2``) and
  padded tokens (``mask`` False) contribute nothing.
* :func:`collect_token_stats`: per-hidden-unit statistics over the real tokens of a data set.
* :func:`masked_clone_loss`: the importance clone loss averaged over the rows a mask keeps.
* :class:`TokenCapture`: :class:`~medic_fast.capture.ActivationCapture` for modules that return
  tuples (``nn.MultiheadAttention``, most transformer blocks): one tensor is picked (configurable)
  and a replacement made by the capture is put back in its place in the tuple.

Hooks exist only during the forwards of :meth:`Cloner.losses`, so the recomputation of a
checkpointed student in backward does not fire them, and the models run hook-free elsewhere.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from medic_fast._utils import device_of, dist_shard, eval_mode, inner_module
from medic_fast.capture import ActivationCapture, resolve_layers, teacher_signals
from medic_fast.data import make_loader
from medic_fast.ops.importance_clone import CRITERIA, importance_clone_loss
from medic_fast.stats import LayerStats, _finalize, _Moments

__all__ = ["Cloner", "TokenCapture", "collect_token_stats", "masked_clone_loss"]

Select = Union[None, int, Callable[[object], Tensor]]


def _check_select(name: str, select) -> Select:
    if select is None or callable(select) or (isinstance(select, int)
                                              and not isinstance(select, bool)):
        return select
    raise TypeError(f"select for layer {name!r} must be None (the first tensor of the output), "
                    f"an int index or a callable output -> Tensor, got {type(select).__name__}")


class TokenCapture(ActivationCapture):
    """:class:`ActivationCapture` that also hooks modules returning tuples (or other nests).

    ``select``: which tensor of a non-tensor output is the activation: ``None`` (the first
    tensor in it), an int index, a callable ``output -> Tensor`` returning one of the output's
    tensors, or a mapping from layer name to one of these. A tensor output is taken as is.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, select=None,
                 differentiable: bool = False, copy: Sequence[str] = ()):
        super().__init__(model, layers, differentiable=differentiable, copy=copy)
        if isinstance(select, Mapping):
            unknown = set(select) - set(self.layers)
            if unknown:
                raise ValueError(f"select names layers that are not hooked: {sorted(unknown)}")
            self.select = {n: _check_select(n, select.get(n)) for n in self.layers}
        else:
            self.select = {n: _check_select(n, select) for n in self.layers}
        self._picked: Optional[Tensor] = None

    def _tensor_of(self, name: str, output) -> Tensor:
        """The selected tensor of ``output`` (remembered, to put a replacement in its place)."""
        if isinstance(output, Tensor):
            picked = output
        else:
            sel = self.select[name]
            if sel is None:
                picked = next((x for x in tree_leaves(output) if isinstance(x, Tensor)), None)
            elif isinstance(sel, int):
                try:
                    picked = output[sel]
                except (TypeError, IndexError, KeyError) as e:
                    raise ValueError(f"select={sel} for layer {name!r}: cannot index its output "
                                     f"({type(output).__name__}): {e}") from None
            else:
                picked = sel(output)
            if not isinstance(picked, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}; the selected "
                                f"element is {type(picked).__name__}, not a Tensor (set select)")
        self._picked = picked
        return picked

    def _hook(self, name: str):
        hook = super()._hook(name)

        def nested_hook(module, inputs, output):
            new = hook(module, inputs, output)
            picked, self._picked = self._picked, None
            if new is None or isinstance(output, Tensor):
                return new
            if new is picked:
                return None
            found = []

            def put(x):
                if x is picked:
                    found.append(x)
                    return new
                return x

            out = tree_map(put, output)
            if not found:
                raise ValueError(f"select for layer {name!r} must return one of the tensors of "
                                 "the module's output itself (not a view or a new tensor), so "
                                 "the capture can pass its replacement on")
            return out
        return nested_hook


def _row_dims(x: Tensor, start_dim: Optional[int]) -> int:
    """The ``start_dim`` of a layer: given, or 2 for 3-D activations (tokens) and 1 otherwise."""
    if start_dim is not None:
        return start_dim
    return 2 if x.dim() == 3 else 1


def _check_mask(mask, like: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a Tensor [B, T] (True at real tokens), got "
                        f"{type(mask).__name__}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"mask must be bool (or 0/1 integers), got {mask.dtype}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but the activations are on {like.device}")
    return mask


def masked_clone_loss(acts_t, acts_c, grads, mean, std, mask: Tensor, *, tau: float,
                      criterion: str = "abs", start_dim: int = 2, backend: str = "auto") -> Tensor:
    """:func:`importance_clone_loss` (summed over layers) averaged over the rows ``mask`` keeps.

    ``mask`` has the row shape ``acts_t.shape[:start_dim]`` of every layer (``[B, T]`` for
    per-token rows). Computed as ``(rows * mask).sum() / mask.sum()`` on the per-row losses
    (``reduction="none"``), so the backward scales the fused op's kept gradient by 0 at
    masked rows: padded activations get no gradient and change nothing. No kept row: 0.
    """
    first = acts_t if isinstance(acts_t, Tensor) else acts_t[0]
    mask = _check_mask(mask, first)
    for i, t in enumerate([acts_t] if isinstance(acts_t, Tensor) else acts_t):
        if t.shape[:start_dim] != mask.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but layer {i} has rows "
                             f"{tuple(t.shape[:start_dim])} (acts_t.shape[:start_dim])")
    rows = importance_clone_loss(acts_t, acts_c, grads, mean, std, tau=tau, criterion=criterion,
                                 reduction="none", start_dim=start_dim, backend=backend)
    keep = mask.reshape(-1).to(rows.dtype)
    return (rows * keep).sum() / keep.sum().clamp_min(1)


class Cloner:
    """One MEDIC training step's loss for a loop the user owns.

    ``loss = cloner(inputs, labels, mask=None)`` returns ``CE(student(inputs), labels) + lam *
    sum_layers importance_clone_loss``; then ``loss.backward(); optimizer.step()``.

    Args:
        teacher: the trojaned model (a DDP / compiled wrapper is unwrapped). It runs in eval mode
            during the call (its flags are restored); freeze it (``requires_grad_(False)``) so
            its forward keeps nothing for parameter gradients. Its activations and gradients
            live only until the step's backward frees the graph.
        student: the clone being trained, as the user runs it: plain, DDP-wrapped (gradients are
            synchronised by calling the wrapper) or ``torch.compile``-d; ``layers`` name
            submodules of the inner module.
        layers: module names to clone (outputs of transformer blocks, attention, MLPs, ...).
        stats: :class:`~medic_fast.stats.LayerStats` of the teacher for ``layers``, e.g. from
            :func:`collect_token_stats`.
        tau, lam, criterion: importance temperature, clone-loss weight, ``"abs"`` | ``"signed"``.
        start_dim: rows of the loss; ``None``: per layer, 2 (a row per token) for 3-D
            activations, else 1 (a row per sample).
        select: which tensor of a tuple output to clone (see :class:`TokenCapture`).
        backend: of the loss (``"auto"``: the fused kernel for the device).

    ``mask`` (``[B, T]``, True at real tokens) applies to the layers whose rows are ``[B, T]``:
    their loss is the mean over real tokens. The CE is the student's own (its model handles
    padding). Works under ``torch.autocast``, with non-reentrant activation checkpointing in the
    student, and under DDP; reentrant checkpointing is detected and refused.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[str],
                 stats: LayerStats, tau: float = 5.0, lam: float = 10.0, *,
                 criterion: str = "abs", start_dim: Optional[int] = None, select=None,
                 backend: str = "auto"):
        for name, m in (("teacher", teacher), ("student", student)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        if not isinstance(stats, LayerStats):
            raise TypeError(f"stats must be a LayerStats (see collect_token_stats), got "
                            f"{type(stats).__name__}")
        for name, v in (("tau", tau), ("lam", lam)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 \
                    or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if start_dim is not None and (not isinstance(start_dim, int) or isinstance(start_dim, bool)
                                      or start_dim < 1):
            raise ValueError(f"start_dim must be None or an int >= 1, got {start_dim!r}")
        self.teacher, self.student = inner_module(teacher), student
        names = resolve_layers(self.teacher, layers)
        resolve_layers(inner_module(student), names)
        if list(stats.layers) != names:
            raise ValueError(f"stats are for layers {stats.layers}, but layers is {names}")
        self.layers = names
        self.stats = stats.to(device_of(inner_module(student)))
        self.tau, self.lam, self.criterion = float(tau), float(lam), criterion
        self.start_dim, self.backend = start_dim, backend
        self._tcap = TokenCapture(self.teacher, names, select=select, differentiable=True)
        self._ccap = TokenCapture(inner_module(student), names, select=select)

    def __call__(self, inputs, labels: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        ce, clone = self.losses(inputs, labels, mask)
        return ce + self.lam * clone

    @torch.compiler.disable
    def losses(self, inputs, labels: Tensor, mask: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor]:
        """``(CE, clone loss)`` of the step, before weighting (for logging).

        Not traced by ``torch.compile`` (Dynamo mis-handles hooks added and removed inside a
        compiled frame): in a compiled step it runs eagerly, while a ``torch.compile``-d
        student (or teacher) passed to the Cloner runs its compiled code with the hooks.
        """
        with eval_mode(self.teacher), self._tcap as tcap, self._ccap as ccap:
            acts_t, grads = teacher_signals(self.teacher, tcap, inputs, labels)
            ce = F.cross_entropy(self.student(inputs), labels)
            acts_c = ccap.outputs()
        if torch.is_grad_enabled():
            frozen = [n for n, c in zip(self.layers, acts_c) if not c.requires_grad]
            if frozen:
                raise RuntimeError(
                    f"the student's outputs of {frozen} do not require grad, so the clone loss "
                    "cannot train it: reentrant activation checkpointing "
                    "(torch.utils.checkpoint(..., use_reentrant=True)) runs the checkpointed "
                    "part without autograd; use use_reentrant=False (or unfreeze the student)")
        return ce, self._clone_loss(acts_t, acts_c, grads, mask)

    def _clone_loss(self, acts_t: List[Tensor], acts_c: List[Tensor], grads: List[Tensor],
                    mask: Optional[Tensor]) -> Tensor:
        """Sum of the layer losses: one fused call per group of layers with the same rows."""
        groups: Dict[Tuple[int, bool], List[int]] = {}
        for i, t in enumerate(acts_t):
            sd = _row_dims(t, self.start_dim)
            masked = mask is not None and t.shape[:sd] == mask.shape
            groups.setdefault((sd, masked), []).append(i)
        total = None
        for (sd, masked), idx in groups.items():
            args = ([acts_t[i] for i in idx], [acts_c[i] for i in idx], [grads[i] for i in idx],
                    [self.stats.mean[i] for i in idx], [self.stats.std[i] for i in idx])
            if masked:
                part = masked_clone_loss(*args, mask, tau=self.tau, criterion=self.criterion,
                                         start_dim=sd, backend=self.backend)
            else:
                part = importance_clone_loss(*args, tau=self.tau, criterion=self.criterion,
                                             start_dim=sd, backend=self.backend)
            total = part if total is None else total + part
        return total


@torch.no_grad()
def collect_token_stats(model: nn.Module, data, layers: Sequence[str], *,
                        mask_fn: Optional[Callable[[Tensor], Tensor]] = None, select=None,
                        batch_size: int = 256, device=None) -> LayerStats:
    """Per-channel mean and std of the outputs of ``layers`` over the real tokens of ``data``.

    A 3-D output ``[B, T, H]`` gives one statistic per hidden unit ``H`` over the tokens where
    ``mask_fn(inputs)`` (``[B, T]`` bool) is True (every token when ``mask_fn`` is None); other
    outputs are per channel as in :func:`~medic_fast.stats.collect_stats`. ``model`` runs in eval
    mode (its flags are restored); ``data``, ``batch_size``, ``device`` and distributed sharding
    as in ``collect_stats``; ``select`` as in :class:`TokenCapture`. ``count`` is the number of
    sequences.
    """
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable (inputs -> [B, T] bool), got "
                        f"{type(mask_fn).__name__}")
    model = inner_module(model)
    names = resolve_layers(model, layers)
    device = device_of(model, device)
    loader = make_loader(data, batch_size=batch_size, shard=dist_shard())
    moments = [_Moments() for _ in names]
    count = 0
    with eval_mode(model), TokenCapture(model, names, select=select) as cap:
        for batch in loader:
            x = batch[0].to(device)
            model(x)
            mask = None if mask_fn is None else _check_mask(mask_fn(x), x)
            for name, mom, a in zip(names, moments, cap.outputs()):
                if a.dim() == 3 and mask is not None:
                    if a.shape[:2] != mask.shape:
                        raise ValueError(f"mask_fn gave shape {tuple(mask.shape)} but layer "
                                         f"{name!r} has [B, T] = {tuple(a.shape[:2])}")
                    a = a[mask.bool()]
                elif a.dim() == 3:
                    a = a.reshape(-1, a.shape[-1])
                mom.add_batch(a, "channel")
            count += x.shape[0]
    return _finalize(names, moments, count, "channel")
