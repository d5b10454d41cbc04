"""The importance clone loss of MEDIC: public function, ``nn.Module``, the ops, and their autograd.

``importance_clone_loss`` runs the backend that :func:`medic_fast.ops._dispatch.resolve` picks:
``"reference"`` (:mod:`medic_fast.reference.importance_clone`, plain PyTorch autograd) or the
fused kernels: ``"cpp"`` for CPU tensors (the C++ extension, ``csrc/importance_clone.cpp``, op
``medic_fast::importance_clone_loss_cpu``) and ``"triton"`` for CUDA tensors (``kernels/``).

The fused forward computes the gradient in the same pass over the data (the fused cross-entropy
trick) and keeps it; the backward hands it over, scaled by the incoming gradient, which costs
nothing when that gradient is 1 (``weight=`` folds a loss weight into the forward, so a
``ce + weight * clone`` objective reaches it with gradient 1).

Two paths, one set of kernels:

* Eager (plain tensors, no tracing, no dispatch mode): a plain ``torch.autograd.Function`` over
  the kernels, with a plan per layout (:class:`_Plan`: the checks, layouts and launch plans made
  once, keyed by shapes, strides, dtypes, devices and the options; never by values). A call
  that hits costs a few dictionary lookups more than the kernels.
* Traced (``torch.compile``, export, a dispatch mode or a tensor subclass): the
  ``torch.library.triton_op`` ``medic_fast::importance_clone_loss``, whose body launches the
  Triton kernels with ``wrap_triton`` (so Inductor sees and schedules them) and calls the C++ op
  for CPU tensors. Nothing in either path reads a device value on the host, so both can be
  captured in CUDA graphs.
"""
from __future__ import annotations

import importlib.util
import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from medic_fast.ops import _dispatch, _validate
from medic_fast.ops._validate import REDUCTIONS  # noqa: F401  (re-exported)
from medic_fast.reference import importance_clone as reference
from medic_fast.reference.importance_clone import CRITERIA, Criterion

__all__ = ["importance_clone_loss", "importance_weights", "ImportanceCloneLoss", "Criterion",
           "CRITERIA"]


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def _row_stride(x: Tensor, start_dim: int):
    """The stride between rows of ``x`` viewed as ``[rows, m]`` with unit inner stride, or None
    when that view needs a copy (the rule of ``row_stride`` in csrc/importance_clone.cpp)."""
    expect = 1
    for size, stride in zip(reversed(x.shape[start_dim:]), reversed(x.stride()[start_dim:])):
        if size != 1:
            if stride != expect:
                return None
            expect *= size
    row = None
    for size, stride in zip(reversed(x.shape[:start_dim]), reversed(x.stride()[:start_dim])):
        if size != 1:
            if row is None:
                row, expect = stride, stride * size
            elif stride != expect:
                return None
            else:
                expect *= size
    return row or 0


def _stat_layout(stat: Tensor, feat: torch.Size):
    """``inner`` such that neuron ``i`` of a row (feature shape ``feat``) reads statistic
    ``(i // inner) % stat.numel()`` of ``stat`` as stored, or None when no such reading exists
    (then the statistic is expanded to one per neuron at each call)."""
    m = feat.numel()
    if stat.dim() == 1 and stat.shape[0] == feat[0]:  # per channel, even where it broadcasts
        return m // feat[0] if stat.stride(0) == 1 or feat[0] == 1 else None
    if not stat.is_contiguous():
        return None
    shape = (1,) * (len(feat) - stat.dim()) + tuple(stat.shape)
    varying = [d for d, n in enumerate(shape) if n != 1]
    if not varying:
        return m
    if varying != list(range(varying[0], varying[-1] + 1)):
        return None  # broadcast dims between the varying ones
    return math.prod(feat[varying[-1] + 1:])


def _kernels():
    from medic_fast.kernels import importance_clone  # Triton, imported on first use

    return importance_clone


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

_CPU_SCHEMA = ("(Tensor[] t, Tensor[] c, Tensor[] g, Tensor[] mean, Tensor[] std, int[] start_dim, "
               "int[] mean_inner, int[] std_inner, float tau, float eps, int criterion, "
               "float[] row_scale, bool reduce_rows, bool need_grad) -> (Tensor, Tensor[])")
torch.library.define("medic_fast::importance_clone_loss_cpu", _CPU_SCHEMA)


@torch.library.register_fake("medic_fast::importance_clone_loss_cpu")
def _fake(t, c, g, mean, std, start_dim, mean_inner, std_inner, tau, eps, criterion, row_scale,
          reduce_rows, need_grad):
    acc = torch.float64 if any(x.dtype == torch.float64 for x in t) else torch.float32
    rows = t[0].shape[:start_dim[0]].numel()
    loss = t[0].new_empty(() if reduce_rows else (rows,), dtype=acc)
    return loss, [x.new_empty(x.shape) for x in c] if need_grad else []


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # a module set to None in sys.modules: blocked
        return False


def _define_op(fn):
    """``fn`` as the op: a ``triton_op`` where Triton is installed (Inductor then sees its
    kernels), else a plain custom op for CPU tensors (CUDA builds of PyTorch bring Triton;
    ``triton_op`` would log that it is missing at every import). ``fn`` is its own fake kernel:
    it only allocates and calls ops that have theirs."""
    if _triton_installed():
        return torch.library.triton_op("medic_fast::importance_clone_loss", fn, mutates_args=())
    op = torch.library.custom_op("medic_fast::importance_clone_loss", fn, mutates_args=())
    op.register_fake(fn)
    return op


@_define_op
def _fused_loss(t: List[Tensor], c: List[Tensor], g: List[Tensor], mean: List[Tensor],
                std: List[Tensor], start_dim: List[int], mean_inner: List[int],
                std_inner: List[int], tau: float, eps: float, criterion: int,
                row_scale: List[float], reduce_rows: bool,
                need_grad: bool) -> Tuple[Tensor, List[Tensor]]:
    """Loss over all layers, and ``d loss / d c`` per layer when ``need_grad``.

    Per layer, ``t, c, g`` share shape and dtype; the dims before ``start_dim`` are rows, the
    rest a row's ``m`` neurons, viewable as ``[rows, m]`` with unit inner stride. ``mean``,
    ``std`` are contiguous: neuron ``i`` reads statistic ``(i // inner) % numel``. The loss is
    ``sum_l row_scale[l] * sum_b loss_lb`` (a scalar) when ``reduce_rows``, else the vector
    ``sum_l row_scale[l] * loss_lb`` over rows; the gradient is that of ``sum_l row_scale[l] *
    sum_b loss_lb``, in ``c``'s shape and dtype. CPU tensors run the C++ op, CUDA tensors the
    Triton kernels (``wrap_triton``: visible to Inductor).
    """
    args = (t, c, g, mean, std, start_dim, mean_inner, std_inner, tau, eps, criterion, row_scale,
            reduce_rows, need_grad)
    if t[0].device.type == "cpu":
        return torch.ops.medic_fast.importance_clone_loss_cpu(*args)
    return _kernels().forward(*args, traced=True)[:2]


def _setup_context(ctx, inputs, output):
    t, c, g, mean, std, start_dim, mean_inner, std_inner, tau, eps, crit, row_scale, \
        reduce_rows, _ = inputs
    ctx.save_for_backward(*c, *output[1])
    ctx.args = (t, g, mean, std, start_dim, mean_inner, std_inner, tau, eps, crit, row_scale,
                reduce_rows)
    ctx.n_layers = len(t)
    ctx.mark_non_differentiable(*output[1])
    ctx.set_materialize_grads(False)


def _traced_backward(ctx, grad_loss, _grad_dc):
    """The op's autograd formula, for traced graphs: the kept gradient times the incoming one,
    out of place (a graph must; Inductor fuses it into one pass per layer)."""
    n = ctx.n_layers
    saved = ctx.saved_tensors
    cs, dcs = saved[:n], saved[n:]
    grads = [[None] * n for _ in range(5)] + [None] * 9  # the inputs' structure
    if grad_loss is None:
        return tuple(grads)
    t, g, mean, std, start_dim, mean_inner, std_inner, tau, eps, crit, row_scale, reduce_rows \
        = ctx.args
    if torch.is_grad_enabled():  # create_graph: recomputed, differentiable in c
        grads[1] = [_differentiable_grad(*layer, tau, eps, crit, rs, grad_loss, reduce_rows)
                    for *layer, rs in zip(t, cs, g, mean, std, start_dim, mean_inner, std_inner,
                                          row_scale)]
        return tuple(grads)
    grads[1] = [_scaled(d, grad_loss, reduce_rows) for d in dcs]
    return tuple(grads)


_fused_loss.register_autograd(_traced_backward, setup_context=_setup_context)


def _scaled(d: Tensor, grad: Tensor, reduce_rows: bool) -> Tensor:
    """``d`` times the incoming gradient (a scalar, or one value per row), out of place."""
    if reduce_rows:
        return (d * grad).to(d.dtype)
    return (d.reshape(grad.shape[0], -1) * grad[:, None]).to(d.dtype).reshape(d.shape)


def _differentiable_grad(t, c, g, mean, std, start_dim, mean_inner, std_inner, tau, eps, crit,
                         row_scale, grad, reduce_rows):
    """One layer's gradient, ``grad * row_scale * d loss / d c``, from the reference formula:
    differentiable in ``c`` and ``grad`` (higher-order gradients)."""
    rows = t.shape[:start_dim].numel()
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    feat = t.shape[start_dim:]
    mu = _expand_stat(mean, mean_inner, feat).to(acc)
    s = _expand_stat(std, std_inner, feat).to(acc) + eps
    d = reference.gradient(t.to(acc).reshape(rows, -1), c.to(acc).reshape(rows, -1),
                           g.to(acc).reshape(rows, -1), mu, s, tau=tau, criterion=Criterion(crit))
    scale = grad * row_scale if reduce_rows else (grad * row_scale)[:, None]
    return (d * scale).to(c.dtype).reshape(c.shape)


def _expand_stat(stat: Tensor, inner: int, feat: torch.Size) -> Tensor:
    """The op's statistic per neuron: ``stat[(i // inner) % numel]``, as a ``[m]`` vector."""
    m = feat.numel()
    k = (torch.arange(m, device=stat.device) // inner) % stat.numel()
    return stat.reshape(-1)[k]


# --------------------------------------------------------------------------------------------
# Plans: what one layout of the arguments needs, checked and computed once
# --------------------------------------------------------------------------------------------

class _Plan:
    """One layout of the arguments: checked once; lists the op takes; what each call must fix
    up first (casts, copies, statistics to expand or compute); the Triton launch plans."""

    __slots__ = ("backend", "start_dim", "mean_inner", "std_inner", "base_scale", "fixes",
                 "criterion", "reduce_rows", "need_grad", "triton", "weight", "row_scale", "plain")

    def run(self, ts, cs, gs, ms, ss, tau, eps, need_grad, flat=False):
        """The kernels on prepared arguments: ``(loss, dcs[, flat buffers])``."""
        args = (ts, cs, gs, ms, ss, self.start_dim, self.mean_inner, self.std_inner, tau, eps,
                self.criterion, self.row_scale, self.reduce_rows, need_grad)
        if self.backend == "cpp":
            return torch.ops.medic_fast.importance_clone_loss_cpu.default(*args)
        return _kernels().forward(*args, plan=self.triton, flat=flat)


_PLANS: dict = {}
_PLANS_MAX = 1024


def _layout_key(x: Tensor):
    return (type(x), x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() % 16)


def _make_plan(acts_t, acts_c, grads, mean, std, tau, criterion, eps, reduction, start_dim,
               weight, backend) -> _Plan:
    """Check every argument (one-line errors) and plan the call."""
    _validate.check_options(tau, criterion, eps, reduction, weight, backend)
    layers, dims = _validate.validate(acts_t, acts_c, grads, mean, std, start_dim, reduction)
    _check_cpu_std(layers)  # a zero std warns when a layout is planned (the kernel refuses < 0)
    device = layers[0][0].device
    p = _Plan()
    p.backend = _dispatch.resolve("importance_clone_loss", backend, device)
    p.criterion = int(Criterion.of(criterion))
    p.reduce_rows = reduction != "none"
    p.need_grad = torch.is_grad_enabled() and any(c.requires_grad for _, c, *_ in layers)
    p.plain = all(type(x) is Tensor for layer in layers for x in layer if x is not None)
    p.start_dim, p.mean_inner, p.std_inner, p.base_scale, p.fixes = dims, [], [], [], []
    p.weight, p.row_scale, p.triton = None, None, None
    if p.backend == "reference":
        return p
    for (t, c, g, mu, sd), d in zip(layers, dims):
        dtype = torch.promote_types(torch.promote_types(t.dtype, c.dtype), g.dtype)
        feat = t.shape[d:]
        layouts = [None if x is None else _stat_layout(x, feat) for x in (mu, sd)]
        fix = (dtype, [x.dtype != dtype or _row_stride(x, d) is None for x in (t, c, g)],
               [x is None or lay is None for x, lay in zip((mu, sd), layouts)])
        p.fixes.append(fix if any(fix[1]) or any(fix[2]) else None)
        p.mean_inner.append(1 if layouts[0] is None else layouts[0])
        p.std_inner.append(1 if layouts[1] is None else layouts[1])
        p.base_scale.append(1.0 / t.shape[:d].numel() if reduction == "mean" else 1.0)
    if not any(p.fixes):
        p.fixes = None
    if p.backend == "triton" and p.plain and p.fixes is None:
        ts, cs, gs, ms, ss = zip(*layers)
        p.triton = _kernels().plan_call(ts, cs, gs, ms, ss, dims, p.mean_inner, p.std_inner,
                                        p.criterion, p.reduce_rows, p.need_grad)
    return p


def _fix(p: _Plan, ts, cs, gs, ms, ss):
    """The call's arguments as the kernels take them: one dtype per layer, row-viewable layouts,
    statistics expanded to one per neuron where no stored layout fits (or computed from the
    batch where missing). Copies only what the plan says needs one."""
    ts, cs, gs, ms, ss = list(ts), list(cs), list(gs), list(ms), list(ss)
    for li, fix in enumerate(p.fixes or ()):
        if fix is None:
            continue
        dtype, copy, expand = fix
        d = p.start_dim[li]
        for xs, bad in zip((ts, cs, gs), copy):
            if bad:
                xs[li] = xs[li].to(dtype).contiguous()
        if any(expand):
            mu, sd = ms[li], ss[li]
            if mu is None or sd is None:
                bm, bs = reference.batch_stats(ts[li], d)
                mu = bm if mu is None else mu
                sd = bs if sd is None else sd
            shape = ts[li].shape
            for xs, stat, bad in ((ms, mu, expand[0]), (ss, sd, expand[1])):
                xs[li] = reference.expand_stats(stat, shape, d).contiguous() if bad else stat
    return ts, cs, gs, ms, ss


# --------------------------------------------------------------------------------------------
# Eager autograd
# --------------------------------------------------------------------------------------------

class _Loss(torch.autograd.Function):
    """The eager path: the forward runs the kernels and keeps the gradient they computed; the
    backward hands it over scaled by the incoming gradient, in place and without a copy.

    A second backward through the same graph (``retain_graph=True``, gradcheck) recomputes it
    from the saved inputs; with ``create_graph=True`` it is recomputed differentiably from the
    reference formula, so higher-order gradients are exact. Only ``acts_c`` are the Function's
    inputs: ``acts_t``, ``grads`` and the statistics are constants (the teacher is frozen).
    """

    @staticmethod
    def forward(ctx, plan, args, keep_inputs, *cs):
        ts, gs, ms, ss, tau, eps = args
        out = plan.run(ts, cs, gs, ms, ss, tau, eps, True, flat=True)
        ctx.plan, ctx.dc = plan, out[1:]
        ctx.args = args if keep_inputs else None  # else freed with the caller's references
        if keep_inputs:
            ctx.save_for_backward(*cs)
        ctx.set_materialize_grads(False)
        return out[0]

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        if grad is None:
            return (None, None, None) + (None,) * len(plan.start_dim)
        if ctx.args is None and (ctx.dc is None or torch.is_grad_enabled()):
            raise RuntimeError("importance_clone_loss(..., keep_inputs=False) keeps only the "
                               "gradient of its forward: a second backward through it, or "
                               "create_graph=True, needs keep_inputs=True")
        if ctx.args is not None:
            ts, gs, ms, ss, tau, eps = ctx.args
            cs = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (None, None, None,
                    *[_differentiable_grad(*layer, tau, eps, plan.criterion, rs, grad,
                                                       plan.reduce_rows)
                                  for *layer, rs in zip(ts, cs, gs, ms, ss, plan.start_dim,
                                                        plan.mean_inner, plan.std_inner,
                                                        plan.row_scale)])
        kept, ctx.dc = ctx.dc, None
        if kept is None:  # a second backward: recompute
            kept = plan.run(ts, cs, gs, ms, ss, tau, eps, True, flat=True)[1:]
        dcs = kept[0]
        if not plan.reduce_rows:
            for d in dcs:
                _scale_rows_(d, grad)
        elif grad.is_cuda:
            for flat in kept[1]:
                _kernels().scale_(flat, grad)
        elif (g := grad.item()) != 1:
            for d in dcs:
                d.mul_(g)
        return (None, None, None, *dcs)


def _scale_rows_(d: Tensor, grad: Tensor) -> None:
    """``d *= grad[b]`` per row ``b``, in place; fp32 scales on a 16-bit ``d`` go in chunks of
    rows, as a mixed-dtype in-place multiply computes through a temporary of its operand's
    size."""
    d = d.view(grad.shape[0], -1)
    rows = max(1, (1 << 18) // max(1, d.shape[1]))
    for d_part, g_part in zip(d.split(rows), grad.split(rows)):
        d_part.mul_(g_part[:, None])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def importance_clone_loss(acts_t, acts_c, grads, mean=None, std=None, *, tau: float = 1.0,
                          criterion: str = "abs", eps: float = 1e-5, reduction: str = "mean",
                          start_dim: int = 1, weight: float = 1.0, keep_inputs: bool = True,
                          backend: str = "auto") -> Tensor:
    """MEDIC's importance-weighted cloning loss (DESIGN.md §1, paper eq. 1–4).

    Args:
        acts_t: teacher (trojaned model) activations of one layer, or a sequence, one per layer.
        acts_c: clone activations, same shapes; the only input that receives a gradient.
        grads: ``d CE(teacher(x), y) / d acts_t``, same shapes.
        mean, std: statistics of ``acts_t`` over the clean set: a 1-D tensor of length
            ``acts_t.shape[start_dim]`` (per channel) or anything broadcasting to
            ``acts_t.shape[start_dim:]`` (e.g. per neuron); sequences for several layers.
            ``None``: per-channel statistics of ``acts_t`` over this batch. A negative ``std`` is
            refused (CPU tensors: read by the kernel at each call; CUDA tensors are not read on
            the host, so :class:`~medic_fast.stats.LayerStats` checks them once).
        tau: softmax temperature ``>= 0`` (0: uniform weights ``1/m``).
        criterion: ``"abs"`` (paper eq. 2) or ``"signed"`` (the authors' released code).
        eps: added to ``std``; ``> 0``.
        reduction: ``"mean"`` | ``"sum"`` over rows, or ``"none"`` (per-row losses).
        start_dim: dims before it are rows (1: a row per sample; 2 on ``[B, T, H]``: per token).
        weight: a factor on the loss, folded into the kernels (``ce + weight * loss`` then
            reaches the backward with gradient 1, which costs no scaling pass).
        keep_inputs: the backward holds ``acts_t``, ``grads`` and the statistics, to recompute
            the gradient for a second backward through the graph or ``create_graph=True``.
            ``False`` keeps only the gradient the forward computed (the fused backends), so
            those inputs are freed as soon as the caller drops them (the
            :class:`~medic_fast.Cloner` does, between its forward and the backward); a second
            backward or ``create_graph=True`` then raises.
        backend: ``"auto"`` (the fused kernel for the device, else the reference), ``"cpp"``
            (CPU tensors), ``"triton"`` (CUDA tensors) or ``"reference"``.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or ``[rows]`` for
        ``reduction="none"``; with several layers, the sum of the layer losses.
    """
    options = (acts_t, acts_c, grads, mean, std, tau, criterion, eps, reduction, start_dim,
               weight, backend)
    if torch.compiler.is_compiling():
        return _call_traced(*options)
    try:
        key = _key(acts_t, acts_c, grads, mean, std, criterion, reduction, start_dim, backend)
        plan = _PLANS.get(key)
    except Exception:  # arguments the checks must name
        key = plan = None
    if plan is None:
        plan = _make_plan(*options)
        if key is not None and plan.plain:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            _PLANS[key] = plan
    else:
        _validate.check_scalars(tau, eps, weight)
    if plan.backend == "reference":
        return _reference(*options)
    if not plan.plain or torch._C._len_torch_dispatch_stack():
        return _call_traced(*options)
    ts, cs, gs, ms, ss = _lists(acts_t, acts_c, grads, mean, std)
    if plan.weight != weight:
        plan.weight, plan.row_scale = weight, [weight * s for s in plan.base_scale]
    if plan.fixes:
        ts, cs, gs, ms, ss = _fix(plan, ts, cs, gs, ms, ss)
    if not plan.need_grad:
        return plan.run(ts, cs, gs, ms, ss, float(tau), float(eps), False)[0]
    return _Loss.apply(plan, (ts, gs, ms, ss, float(tau), float(eps)), keep_inputs, *cs)


def _lists(acts_t, acts_c, grads, mean, std):
    """The per-layer sequences of checked arguments (one layer: 1-tuples)."""
    if isinstance(acts_t, Tensor):
        return (acts_t,), (acts_c,), (grads,), (mean,), (std,)
    n = len(acts_t)
    return (acts_t, acts_c, grads, (None,) * n if mean is None else mean,
            (None,) * n if std is None else std)


def _key(acts_t, acts_c, grads, mean, std, *options):
    """Everything a plan depends on: the layouts and options, never the values."""
    types = tuple(map(type, (acts_t, acts_c, grads, mean, std)))
    ts, cs, gs, ms, ss = _lists(acts_t, acts_c, grads, mean, std)
    return (*types, *options, torch.is_grad_enabled(), len(cs), len(gs), len(ms), len(ss),
            *[(_layout_key(t), _layout_key(c), c.requires_grad, _layout_key(g),
               None if mu is None else _layout_key(mu), None if sd is None else _layout_key(sd))
              for t, c, g, mu, sd in zip(ts, cs, gs, ms, ss)])


def _reference(acts_t, acts_c, grads, mean, std, tau, criterion, eps, reduction, start_dim,
               weight, backend):
    layers, dims = _validate.validate(acts_t, acts_c, grads, mean, std, start_dim, reduction)
    _check_cpu_std(layers)
    return reference.importance_clone_loss(layers, dims, tau=tau, criterion=criterion, eps=eps,
                                           reduction=reduction, weight=weight)


def _check_cpu_std(layers) -> None:
    """The plain-PyTorch paths read CPU statistics at each call, as the C++ kernel does."""
    for i, (*_, sd) in enumerate(layers):
        if (sd is not None and sd.device.type == "cpu" and type(sd) is Tensor
                and not torch.compiler.is_compiling()):
            _validate.check_std(f"std{f' (layer {i})' if len(layers) > 1 else ''}", sd)


def _call_traced(acts_t, acts_c, grads, mean, std, tau, criterion, eps, reduction, start_dim,
                 weight, backend):
    """The op ``medic_fast::importance_clone_loss`` (traced: compile, export, dispatch modes,
    tensor subclasses), with its autograd formula."""
    plan = _make_plan(acts_t, acts_c, grads, mean, std, tau, criterion, eps, reduction,
                      start_dim, weight, backend)
    if plan.backend == "reference":
        return _reference(acts_t, acts_c, grads, mean, std, tau, criterion, eps, reduction,
                          start_dim, weight, backend)
    ts, cs, gs, ms, ss = _fix(plan, *_lists(acts_t, acts_c, grads, mean, std))
    loss, _ = _fused_loss(list(ts), list(cs), list(gs), list(ms), list(ss), plan.start_dim,
                          plan.mean_inner, plan.std_inner, float(tau), float(eps),
                          plan.criterion, [weight * s for s in plan.base_scale],
                          plan.reduce_rows, plan.need_grad)
    return loss


def importance_weights(acts_t, grads, mean=None, std=None, *, tau: float = 1.0,
                       criterion: str = "abs", eps: float = 1e-5, start_dim: int = 1):
    """The importance weights ``w`` (paper eq. 4), in the shape of ``acts_t``.

    For inspection and plots; a sequence of layers gives a list. Computed in plain PyTorch
    (float32, float64 for float64 inputs); the loss never materialises ``w``.
    """
    _validate.check_options(tau, criterion, eps, "mean", 1.0, "reference")
    single = isinstance(acts_t, Tensor)
    layers, dims = _validate.validate(acts_t, acts_t, grads, mean, std, start_dim, "mean")
    _check_cpu_std(layers)
    ws = [reference.importance_weights(t, g, mu, sd, tau=tau, criterion=criterion, eps=eps,
                                       start_dim=d)
          for (t, _, g, mu, sd), d in zip(layers, dims)]
    return ws[0] if single else ws


class ImportanceCloneLoss(nn.Module):
    """``nn.Module`` form of :func:`importance_clone_loss`; options are fixed at construction.

    ``forward(acts_t, acts_c, grads, mean=None, std=None)``.
    """

    def __init__(self, tau: float = 1.0, criterion: str = "abs", eps: float = 1e-5,
                 reduction: str = "mean", start_dim: int = 1, weight: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        _validate.check_options(tau, criterion, eps, reduction, weight, backend)
        self.tau, self.criterion, self.eps, self.weight = tau, criterion, eps, weight
        self.reduction, self.start_dim, self.backend = reduction, start_dim, backend

    def forward(self, acts_t, acts_c, grads, mean=None, std=None) -> Tensor:
        return importance_clone_loss(acts_t, acts_c, grads, mean, std, tau=self.tau,
                                     criterion=self.criterion, eps=self.eps,
                                     reduction=self.reduction, start_dim=self.start_dim,
                                     weight=self.weight, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, criterion={self.criterion!r}, eps={self.eps}, "
                f"reduction={self.reduction!r}, start_dim={self.start_dim}, "
                f"weight={self.weight}, backend={self.backend!r}")
