"""The importance clone loss of MEDIC: public function, ``nn.Module``, and the fused custom op.

``importance_clone_loss`` validates its arguments, then runs the backend that
:func:`medic_fast.ops._dispatch.resolve` picks: ``"reference"``
(:mod:`medic_fast.reference.importance_clone`, plain PyTorch autograd) or the fused op
``medic_fast::importance_clone_loss``, whose kernels are ``"cpp"`` for CPU tensors (the C++
extension, ``csrc/importance_clone.cpp``) and ``"triton"`` for CUDA tensors (``kernels/``).

The op takes every layer at once and returns the loss and, when ``acts_c`` needs a gradient,
that gradient too (computed in the same pass over the data, the fused cross-entropy trick).
Backward then only scales the kept gradient by the incoming one, in place; with
``create_graph=True`` it recomputes the gradient differentiably instead (higher-order gradients).
"""
from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from medic_fast.ops import _dispatch
from medic_fast.reference import importance_clone as reference

__all__ = ["importance_clone_loss", "importance_weights", "ImportanceCloneLoss"]

CRITERIA = ("abs", "signed")
REDUCTIONS = ("mean", "sum", "none")
# Per-channel statistics whose runs of equal statistics are shorter than this are expanded to
# one statistic per neuron, so that the kernels always read statistics as long vectors or scalars.
_MIN_CHANNEL_RUN = 16


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _as_layers(name: str, x, n: Optional[int]) -> list:
    """``x`` as a list of per-layer values (a single tensor is one layer)."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return list(x)
    raise TypeError(f"{name} must be a Tensor or a sequence of Tensors, got {type(x).__name__}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_options(tau, criterion, eps, reduction, backend):
    if not _finite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if not _finite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _dispatch.check("importance_clone_loss", backend)


def _check_tensor(name: str, x, like: Optional[Tuple[str, Tensor]] = None) -> None:
    """``like``: ``(its name, a tensor)`` whose device ``x`` must be on."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16 or "
                        f"float64), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if like is not None and x.device != like[1].device:
        raise ValueError(f"{name} is on {x.device} but {like[0]} is on {like[1].device}; all "
                         "tensors (of every layer, statistics included) must be on one device")


def _check_stat(name: str, stat, t: Tuple[str, Tensor], start_dim: int) -> None:
    """``t``: ``(its name, the layer's acts_t)``."""
    if stat is None:
        return
    _check_tensor(name, stat, t)
    t = t[1]
    feat = t.shape[start_dim:]
    if stat.dim() == 1 and stat.shape[0] == feat[0]:
        return
    try:
        if torch.broadcast_shapes(stat.shape, feat) == feat:
            return
    except RuntimeError:
        pass
    raise ValueError(f"{name} has shape {tuple(stat.shape)}, which does not broadcast to the "
                     f"feature shape {tuple(feat)} (acts_t.shape[start_dim:]); pass a 1-D tensor "
                     f"of length {feat[0]} for per-channel statistics")


_zero_std_warned = False


def check_std(name: str, std: Tensor) -> None:
    """Refuse negative values of the statistic ``std``; warn (once per process) where it is 0,
    as ``eps`` alone then divides. Reads the values: a sync for CUDA tensors."""
    global _zero_std_warned
    low = float(std.min())
    if low < 0:
        raise ValueError(f"{name} must be >= 0 (a standard deviation), got a minimum of {low:g}")
    if low == 0 and not _zero_std_warned:
        _zero_std_warned = True
        warnings.warn(f"{name} is 0 at {int((std == 0).sum())} of {std.numel()} entries: eps "
                      "alone divides there, so those neurons may dominate the loss (a constant "
                      "or dead channel in the statistics?); shown once per process",
                      RuntimeWarning, stacklevel=2)


def _normalize_start_dim(start_dim, ndim: int, where: str) -> int:
    if not isinstance(start_dim, int) or isinstance(start_dim, bool):
        raise TypeError(f"start_dim must be an int, got {type(start_dim).__name__}")
    sd = start_dim + ndim if start_dim < 0 else start_dim
    if not 0 <= sd < ndim:
        raise ValueError(f"start_dim={start_dim} is out of range for {where} with {ndim} dims; "
                         f"it must leave at least one feature dim")
    return sd


def _validate(acts_t, acts_c, grads, mean, std, start_dim, reduction):
    """Return ``(layers, start_dims)``: per layer ``(t, c, g, mean, std)``, checked."""
    ts = _as_layers("acts_t", acts_t, None)
    cs = _as_layers("acts_c", acts_c, None)
    gs = _as_layers("grads", grads, None)
    if not ts:
        raise ValueError("acts_t is an empty sequence; pass at least one layer")
    if not (len(ts) == len(cs) == len(gs)):
        raise ValueError(f"acts_t, acts_c and grads must have the same number of layers, got "
                         f"{len(ts)}, {len(cs)} and {len(gs)}")
    n = len(ts)
    means = [None] * n if mean is None else _as_layers("mean", mean, n)
    stds = [None] * n if std is None else _as_layers("std", std, n)
    for name, lst in (("mean", means), ("std", stds)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} layers but acts_t has {n}")
    layers, dims = [], []
    first = None  # ("acts_t (layer 0)", its tensor): every layer's device
    for i, (t, c, g, mu, sd) in enumerate(zip(ts, cs, gs, means, stds)):
        sfx = f" (layer {i})" if n > 1 else ""
        _check_tensor("acts_t" + sfx, t, first)
        first = first or ("acts_t" + sfx, t)
        _check_tensor("acts_c" + sfx, c, ("acts_t" + sfx, t))
        _check_tensor("grads" + sfx, g, ("acts_t" + sfx, t))
        for name, x in (("acts_c", c), ("grads", g)):
            if x.shape != t.shape:
                raise ValueError(f"{name}{sfx} has shape {tuple(x.shape)} but acts_t has shape "
                                 f"{tuple(t.shape)}")
        d = _normalize_start_dim(start_dim, t.dim(), "acts_t" + sfx)
        _check_stat("mean" + sfx, mu, ("acts_t" + sfx, t), d)
        _check_stat("std" + sfx, sd, ("acts_t" + sfx, t), d)
        if sd is not None and sd.device.type == "cpu" and _plain_eager(sd):
            check_std("std" + sfx, sd)
        layers.append((t, c, g, mu, sd))
        dims.append(d)
    if reduction == "none" and n > 1:
        rows = {t.shape[:d].numel() for (t, *_), d in zip(layers, dims)}
        if len(rows) > 1:
            raise ValueError(f"reduction='none' sums per-row losses over layers, so every layer "
                             f"needs the same number of rows; got {sorted(rows)}")
    return layers, dims


# --------------------------------------------------------------------------------------------
# Preparing one layer for the fused op
# --------------------------------------------------------------------------------------------

def _rows_view(x: Tensor, rows: int, m: int) -> Tensor:
    """``x`` as ``[rows, m]`` with unit stride along ``m`` (a view when the layout allows)."""
    x2 = x.reshape(rows, m)
    if m > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _compute_stats_arrays(t: Tensor, mean, std, start_dim: int, tau: float, eps: float, acc):
    """``(mu, inv_s, tau_s, inner)``: statistic ``k = (i // inner) % len(mu)`` for neuron ``i``."""
    if mean is None or std is None:
        bm, bs = reference.batch_stats(t, start_dim)
        mean = bm if mean is None else mean
        std = bs if std is None else std
    feat = t.shape[start_dim:]
    inner = feat[1:].numel()
    per_channel = all(s.dim() == 1 and s.shape[0] == feat[0] for s in (mean, std))
    if not per_channel or (inner > 1 and inner < _MIN_CHANNEL_RUN):
        mean = reference.expand_stats(mean, t.shape, start_dim).reshape(-1)
        std = reference.expand_stats(std, t.shape, start_dim).reshape(-1)
        inner = 1
    mu = mean.detach().to(acc).contiguous()
    s = std.detach().to(acc) + eps
    return mu, (1.0 / s).contiguous(), (tau * s).contiguous(), inner


_STATS_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_STATS_CACHE_SIZE = 256


def _stats_arrays(t: Tensor, mean, std, start_dim: int, tau: float, eps: float, acc):
    """:func:`_compute_stats_arrays`, remembered per statistics tensor between calls.

    The statistics of a training run are fixed tensors (a :class:`~medic_fast.stats.LayerStats`),
    so their derived arrays (``mu``, ``1 / (std + eps)``, ``tau (std + eps)``: three small
    kernels per layer, on a GPU three launches) are computed once. An entry is used only while
    the very tensors it was made from are alive and unmodified (same object, same ``_version``),
    and only in plain eager execution without gradients through the statistics; an entry goes
    when its statistics are freed, and at most the last 256 are kept.
    """
    if (mean is None or std is None or mean.requires_grad or std.requires_grad
            or not _plain_eager(mean, std)):
        return _compute_stats_arrays(t, mean, std, start_dim, tau, eps, acc)
    key = (id(mean), id(std), mean._version, std._version, tuple(t.shape[start_dim:]), tau, eps,
           acc, t.device)
    hit = _STATS_CACHE.get(key)
    if hit is not None and hit[0]() is mean and hit[1]() is std:
        _STATS_CACHE.move_to_end(key)
        return hit[2]
    arrays = _compute_stats_arrays(t, mean, std, start_dim, tau, eps, acc)
    def forget(_, key=key):
        _STATS_CACHE.pop(key, None)

    _STATS_CACHE[key] = (weakref.ref(mean, forget), weakref.ref(std, forget), arrays)
    if len(_STATS_CACHE) > _STATS_CACHE_SIZE:
        _STATS_CACHE.popitem(last=False)
    return arrays


# --------------------------------------------------------------------------------------------
# The fused custom op
# --------------------------------------------------------------------------------------------

# The CUDA kernel copies its launch tables from host memory at each call, which a CUDA graph would
# replay stale: the tag makes Inductor keep the op out of its CUDA graphs
# (torch.compile(mode="reduce-overhead") splits the graph around it, or runs it without graphs),
# and the kernel refuses a capture of its own (kernels/importance_clone.py, forward). The tag
# exists in every supported torch (>= 2.11); getattr keeps an older one importable.
_TAGS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


@torch.library.custom_op("medic_fast::importance_clone_loss", mutates_args=(),
                         device_types="cuda", tags=_TAGS)
def _fused_loss(t: List[Tensor], c: List[Tensor], g: List[Tensor], mu: List[Tensor],
                inv_s: List[Tensor], tau_s: List[Tensor], inner: List[int], tau: float,
                signed: bool, row_scale: List[float], reduce_rows: bool,
                need_grad: bool) -> Tuple[Tensor, List[Tensor]]:
    """Loss over all layers, and ``d loss / d c`` per layer when ``need_grad``.

    Per layer, ``t, c, g`` are ``[rows, m]`` with unit stride along ``m``; ``mu, inv_s, tau_s``
    are contiguous statistics in the accumulation dtype, statistic ``(i // inner) % len(mu)``
    for neuron ``i``. The loss is ``sum_l row_scale[l] * sum_b loss_lb`` (a scalar) when
    ``reduce_rows``, else the vector ``sum_l loss_lb`` over rows; the gradient is that of the
    scalar ``sum_l row_scale[l] * sum_b loss_lb``, in ``c``'s dtype. The op's backward takes
    that gradient over and scales it in place: read the second output before any backward.

    This function is the op's CUDA kernel (Triton), run on the tensors' device. Its CPU kernel is
    the C++ extension's, registered when :mod:`medic_fast._extension` loads it (the resolver
    does, for "cpp"). Tagged ``cudagraph_unsafe`` (see ``_TAGS``).
    """
    from medic_fast.kernels import importance_clone  # Triton, imported on first use

    return importance_clone.forward(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale,
                                    reduce_rows, need_grad)


@_fused_loss.register_fake
def _(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, reduce_rows, need_grad):
    acc = torch.float64 if t[0].dtype == torch.float64 else torch.float32
    loss = t[0].new_empty(() if reduce_rows else (t[0].shape[0],), dtype=acc)
    return loss, [x.new_empty(x.shape) for x in c] if need_grad else []


def _setup_context(ctx, inputs, output):
    _, dc = output
    t, c, g, mu, inv_s, tau_s = inputs[:6]
    ctx.save_for_backward(*t, *c, *g, *mu, *inv_s, *tau_s, *dc)
    ctx.args = inputs[6:]
    ctx.n_layers = len(t)
    # The kept gradients are outputs only for backward's sake: no gradient flows into them, and
    # none should be materialised as zeros (a full-size fill per layer).
    ctx.mark_non_differentiable(*dc)
    ctx.set_materialize_grads(False)
    ctx.handed_over = False


def _scale_rows_(d: Tensor, scale: Tensor) -> None:
    """``d *= scale`` in place, ``scale`` a scalar or one value per row of ``d``.

    Per-row fp32 scales on a 16-bit ``d`` go in chunks of rows: a mixed-dtype in-place multiply
    computes through a temporary the size of its operand, which must stay small.
    """
    if scale.dim() == 0 or scale.dtype == d.dtype:
        d.mul_(scale)
        return
    rows = max(1, (1 << 18) // max(1, d.shape[1]))
    for d_part, s_part in zip(d.split(rows), scale.split(rows)):
        d_part.mul_(s_part)


def _plain_eager(*tensors: Tensor) -> bool:
    """Plain eager execution on plain tensors: no tracing (torch.compile, export, AOTAutograd),
    no dispatch mode, no tensor subclass (fake, functional)."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(x) is Tensor for x in tensors))


def _differentiable_grad(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, scale):
    """One layer's gradient as the op gives it, ``scale * row_scale * d loss / d c``, in plain
    PyTorch on the op's arguments: ``-2 * w_i * r_i * inv_s_i`` (DESIGN.md §1), differentiable
    in ``c`` and ``scale``; ``t``, ``g`` and the statistics are constants."""
    k = (torch.arange(t.shape[1], device=t.device) // inner) % mu.shape[0]
    mu, inv_s, tau_s = mu[k].detach(), inv_s[k].detach(), tau_s[k].detach()
    t_, g_ = t.detach().to(mu.dtype), g.detach().to(mu.dtype)
    z = (t_ - mu) * inv_s
    a = tau * (z if signed else z.abs())
    w = torch.exp((torch.log_softmax(a, 1) + torch.log_softmax(tau_s * g_, 1)) / 2)
    r = (t_ - c.to(mu.dtype)) * inv_s
    return ((-2.0 * row_scale) * w * inv_s * r * scale).to(c.dtype)


def _backward(ctx, grad_loss, _grad_dc):
    """Scale the gradient kept by the forward by ``grad_loss``.

    Eagerly, the first backward hands the kept buffers over, scaled in place (no copy: the op
    allocates nothing of the inputs' size beyond its output), and a second backward through the
    same graph (``retain_graph=True``, gradcheck) recomputes the gradient from the saved inputs.
    Traced, it multiplies out of place, as a graph must (Inductor fuses it into one pass).
    With ``create_graph=True`` (grad mode on here) it is recomputed from the saved inputs in plain
    PyTorch, so higher-order gradients are exact. (A compiled graph's backward is traced without
    grad mode, so it is first-order only, as for any compiled function: AOTAutograd refuses
    double backward with an error in torch 2.13; in torch 2.11 the gradient comes back not
    requiring grad.)
    """
    n = ctx.n_layers
    saved = ctx.saved_tensors
    inputs = [list(saved[i * n:(i + 1) * n]) for i in range(6)]
    dc = list(saved[6 * n:])
    grads = [[None] * n for _ in range(6)] + [None] * len(ctx.args)  # the inputs' structure
    if grad_loss is None:
        return tuple(grads)
    inner, tau, signed, row_scale, reduce_rows, _ = ctx.args
    scale = grad_loss if reduce_rows else grad_loss[:, None]
    if torch.is_grad_enabled():
        grads[1] = [_differentiable_grad(*layer, inn, tau, signed, rs, scale)
                    for *layer, inn, rs in zip(*inputs, inner, row_scale)]
        return tuple(grads)
    if not _plain_eager(grad_loss, *dc):
        # The fp32 scale, as eager multiplies with it.
        grads[1] = [(d * scale).to(d.dtype) for d in dc]
        return tuple(grads)
    if ctx.handed_over:
        _, dc = _fused_loss(*inputs, inner, tau, signed, row_scale, reduce_rows, True)
    ctx.handed_over = True
    if not (grad_loss.device.type == "cpu" and bool((grad_loss == 1).all())):
        for d in dc:
            # .data: scaling the handed-over buffer must not bump the saved tensor's version.
            _scale_rows_(d.data, scale)
    grads[1] = dc
    return tuple(grads)


_fused_loss.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def importance_clone_loss(acts_t, acts_c, grads, mean=None, std=None, *, tau: float = 1.0,
                          criterion: str = "abs", eps: float = 1e-5, reduction: str = "mean",
                          start_dim: int = 1, backend: str = "auto") -> Tensor:
    """MEDIC's importance-weighted cloning loss (DESIGN.md §1, paper eq. 1–4).

    Args:
        acts_t: teacher (trojaned model) activations of one layer, or a sequence, one per layer.
        acts_c: clone activations, same shapes; the only input that receives a gradient.
        grads: ``d CE(teacher(x), y) / d acts_t``, same shapes.
        mean, std: statistics of ``acts_t`` over the clean set: a 1-D tensor of length
            ``acts_t.shape[start_dim]`` (per channel) or anything broadcasting to
            ``acts_t.shape[start_dim:]`` (e.g. per neuron); sequences for several layers.
            ``None``: per-channel statistics of ``acts_t`` over this batch. A negative ``std`` is
            refused and a zero one warned about, for CPU tensors; CUDA ones are not read here
            (no sync per call): :class:`~medic_fast.stats.LayerStats` checks them once.
        tau: softmax temperature ``>= 0`` (0: uniform weights ``1/m``).
        criterion: ``"abs"`` (paper eq. 2) or ``"signed"`` (the authors' released code).
        eps: added to ``std``; ``> 0``.
        reduction: ``"mean"`` | ``"sum"`` over rows, or ``"none"`` (per-row losses).
        start_dim: dims before it are rows (1: a row per sample; 2 on ``[B, T, H]``: per token).
        backend: ``"auto"`` (the fused kernel for the device, else the reference), ``"cpp"``
            (CPU tensors), ``"triton"`` (CUDA tensors) or ``"reference"``.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or ``[rows]`` for
        ``reduction="none"``; with several layers, the sum of the layer losses.
    """
    _check_options(tau, criterion, eps, reduction, backend)
    layers, dims = _validate(acts_t, acts_c, grads, mean, std, start_dim, reduction)
    backend = _dispatch.resolve("importance_clone_loss", backend, layers[0][0].device)
    if backend == "reference":
        return reference.importance_clone_loss(layers, dims, tau=tau, criterion=criterion,
                                               eps=eps, reduction=reduction)

    ts, cs, gs, mus, invs, taus, inners, scales = [], [], [], [], [], [], [], []
    for (t, c, g, mean_, std_), d in zip(layers, dims):
        dtype = torch.promote_types(torch.promote_types(t.dtype, c.dtype), g.dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rows, m = t.shape[:d].numel(), t.shape[d:].numel()
        mu, inv_s, tau_s, inner = _stats_arrays(t, mean_, std_, d, float(tau), float(eps), acc)
        ts.append(_rows_view(t.detach().to(dtype), rows, m))
        cs.append(_rows_view(c.to(dtype), rows, m))
        gs.append(_rows_view(g.detach().to(dtype), rows, m))
        mus.append(mu)
        invs.append(inv_s)
        taus.append(tau_s)
        inners.append(inner)
        scales.append(1.0 / rows if reduction == "mean" else 1.0)
    need_grad = torch.is_grad_enabled() and any(c.requires_grad for c in cs)
    loss, _ = _fused_loss(ts, cs, gs, mus, invs, taus, inners, float(tau), criterion == "signed",
                          scales, reduction != "none", need_grad)
    return loss


def importance_weights(acts_t, grads, mean=None, std=None, *, tau: float = 1.0,
                       criterion: str = "abs", eps: float = 1e-5, start_dim: int = 1):
    """The importance weights ``w`` (paper eq. 4), in the shape of ``acts_t``.

    For inspection and plots; a sequence of layers gives a list. Computed in plain PyTorch
    (float32, float64 for float64 inputs); the loss never materialises ``w``.
    """
    _check_options(tau, criterion, eps, "mean", "reference")
    single = isinstance(acts_t, Tensor)
    layers, dims = _validate(acts_t, acts_t, grads, mean, std, start_dim, "mean")
    ws = [reference.importance_weights(t, g, mu, sd, tau=tau, criterion=criterion, eps=eps,
                                       start_dim=d)
          for (t, _, g, mu, sd), d in zip(layers, dims)]
    return ws[0] if single else ws


class ImportanceCloneLoss(nn.Module):
    """``nn.Module`` form of :func:`importance_clone_loss`; options are fixed at construction.

    ``forward(acts_t, acts_c, grads, mean=None, std=None)``.
    """

    def __init__(self, tau: float = 1.0, criterion: str = "abs", eps: float = 1e-5,
                 reduction: str = "mean", start_dim: int = 1, backend: str = "auto"):
        super().__init__()
        _check_options(tau, criterion, eps, reduction, backend)
        self.tau, self.criterion, self.eps = tau, criterion, eps
        self.reduction, self.start_dim, self.backend = reduction, start_dim, backend

    def forward(self, acts_t, acts_c, grads, mean=None, std=None) -> Tensor:
        return importance_clone_loss(acts_t, acts_c, grads, mean, std, tau=self.tau,
                                     criterion=self.criterion, eps=self.eps,
                                     reduction=self.reduction, start_dim=self.start_dim,
                                     backend=self.backend)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, criterion={self.criterion!r}, eps={self.eps}, "
                f"reduction={self.reduction!r}, start_dim={self.start_dim}, "
                f"backend={self.backend!r}")
