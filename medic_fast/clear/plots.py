"""Figures of CLEAR's results: :func:`heatmap` (the class-pair scores P of a
:class:`~medic_fast.clear.detect.ScanReport` over class pairs; :meth:`ScanReport.plot` calls it)
and :func:`decision_regions` (a model on 2-D inputs, such as the Swiss roll task, with the
pockets a scan found mapped back to input space by :func:`pocket_inputs`).

matplotlib is an optional dependency (``pip install "medic_fast[plot]"``, or
``pip install -e ".[plot]"`` in a checkout), imported only when a figure is drawn. The figures are
:class:`matplotlib.figure.Figure` objects rendered by the Agg canvas (or the one the file type
needs): pyplot, its global figure list and the selected backend are never touched.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor, nn

from medic_fast._utils import device_of
from medic_fast.capture import ActivationCapture

if TYPE_CHECKING:  # pragma: no cover
    from medic_fast.clear.detect import ScanReport

__all__ = ["heatmap", "decision_regions", "pocket_inputs"]

MISSING = ('plotting needs matplotlib, an optional dependency of medic_fast: install it with '
           'pip install "medic_fast[plot]" (or pip install -e ".[plot]" in a checkout)')
_CHUNK = 4096  # grid points per forward, and per distance block in pocket_inputs


def _matplotlib():
    """``matplotlib.figure.Figure``, or a ``ModuleNotFoundError`` naming the ``plot`` extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # not installed (ModuleNotFoundError), or broken
        raise ModuleNotFoundError(f"{MISSING} ({e})", name="matplotlib") from e
    return Figure


def _axes(ax, size):
    """``(figure, axes)``: ``ax`` and its figure, or a new Agg figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _matplotlib()(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> None:
    """Save ``fig`` to ``path`` (a path, or a binary file object: its ``name``'s extension gives
    the format, as a path's does; PNG without one)."""
    if path is None:
        return
    fmt = None
    if not isinstance(path, (str, os.PathLike)):
        fmt = os.path.splitext(str(getattr(path, "name", "")))[1][1:].lower() or "png"
    fig.savefig(path, format=fmt, dpi=150)


def _class_colours(n: int):
    """``n`` distinct colours: tab10, tab20 beyond 10 classes, a continuous map beyond 20."""
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"
    cmap = colormaps[name]
    if name == "turbo":
        return [cmap(i / max(n - 1, 1)) for i in range(n)]
    return [cmap(i) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# P over class pairs
# ------------------------------------------------------------------------------------------------

def _verdict(report: "ScanReport") -> str:
    if report.flagged:
        return f"flagged: target class {report.target}"
    return report.verdict


def heatmap(report: "ScanReport", path=None, *, ax=None):
    """Draw ``report.P`` (rows: source class, columns: target class) as a heatmap and return the
    figure; save it to ``path`` (any file type matplotlib writes, from the extension) if given.

    Cells where no search ran (the diagonal, skipped source classes: NaN in P) are grey, and
    skipped classes are marked on the source axis. The colour bar carries the threshold as a red
    line, the pairs above it (``report.pairs``, which flag the model) are outlined in red, and the
    title gives the verdict. ``ax``: draw into these axes instead of a new figure (then ``path``
    may be None: nothing is saved).
    """
    _matplotlib()  # first: without it, the one error that names the extra
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    if ax is None and path is None:
        raise ValueError("give a path to save the figure to, or ax= to draw into")
    P = report.P.detach().float().cpu().numpy()
    C = P.shape[0]
    side = min(3.5 + 0.45 * C, 14.0)
    fig, ax = _axes(ax, (side + 1.5, side))
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    rate = report.settings.get("method", "paper") == "paper"
    top = 1.0 if rate else max(2 * report.threshold, float(np.nan_to_num(P).max()))
    image = ax.imshow(np.ma.masked_invalid(P), cmap=cmap, vmin=0.0, vmax=top,
                      interpolation="nearest", origin="upper")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("P: fraction of restarts that found a pocket" if rate else
                  "P: depth of the deepest pocket found (0: none)")
    bar.ax.axhline(report.threshold, color="red", linewidth=2)  # the threshold on the bar
    if C <= 12:  # room for the values in the cells
        for i in range(C):
            for j in range(C):
                if not math.isnan(P[i, j]):
                    ax.text(j, i, f"{P[i, j]:.2f}", ha="center", va="center",
                            fontsize="x-small",
                            color="black" if P[i, j] > 0.6 * top else "white")
    for ls, lt, _ in report.pairs:
        ax.add_patch(Rectangle((lt - 0.5, ls - 0.5), 1, 1, fill=False, edgecolor="red",
                               linewidth=2.5))
    step = max(1, math.ceil(C / 20))
    ticks = list(range(0, C, step))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{c} (skipped)" if c in report.skipped else str(c) for c in ticks])
    ax.set_xlabel("target class")
    ax.set_ylabel("source class (the anchors' class)")
    ax.set_title(f"CLEAR scan: {_verdict(report)}\n{len(report.pairs)} pair(s) with P > "
                 f"threshold {report.threshold:g} (red line; outlined); grey: not searched",
                 fontsize="medium")
    _save(fig, path)
    return fig


# ------------------------------------------------------------------------------------------------
# Decision regions of a model on 2-D inputs
# ------------------------------------------------------------------------------------------------

def _two_d(name: str, x, rows: Optional[int] = None) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 1 and rows == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"decision_regions draws models of 2-D inputs: {name} must be "
                         f"[N, 2]{' (or [2])' if rows == 1 else ''}, got {list(x.shape)}; for "
                         "other inputs plot the scan's P with ScanReport.plot")
    if rows is not None and len(x) != rows:
        raise ValueError(f"{name} must hold one sample, got {len(x)}")
    return x.detach().float().cpu()


@torch.no_grad()
def _forward(model: nn.Module, X: Tensor, cut: Optional[str]) -> Tuple[Tensor, Optional[Tensor]]:
    """Predicted classes of the points ``X`` and, when ``cut`` is given, their flattened features
    (the input of module ``cut``), in chunks; on CPU."""
    device = device_of(model)
    preds, feats = [], []
    capture = ActivationCapture(model, [cut], inputs=True) if cut is not None else None
    training = model.training
    model.eval()
    try:
        if capture is not None:
            capture.__enter__()
        for x in X.split(_CHUNK):
            out = model(x.to(device))
            if not isinstance(out, Tensor) or out.dim() != 2:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"the model must return logits [N, classes]; it returned {shape}")
            preds.append(out.argmax(1).cpu())
            if capture is not None:
                feats.append(capture.outputs()[0].flatten(1).float().cpu())
    finally:
        if capture is not None:
            capture.__exit__(None, None, None)
        model.train(training)
    return torch.cat(preds), (torch.cat(feats) if capture is not None else None)


def pocket_inputs(model: nn.Module, samples: Tensor, cut: str,
                  candidates: Tensor) -> Tuple[Tensor, Tensor]:
    """Map feature-space points back to input space: for each of ``samples`` ([M, *features], in
    the feature space at ``cut``: the input of that module, as in :class:`ScanReport`), the
    row of ``candidates`` ([G, *input]) whose features at ``cut`` are nearest (Euclidean). Returns
    ``(inputs [M, *input], distances [M])``.

    This is a nearest-neighbour pre-image, not an inversion: a pocket centroid is a convex
    combination of features and in general lies off the set of features the inputs reach (a
    2-D sheet in the feature space, for the Swiss roll), so the result is the candidate input
    whose features come closest, and ``distances`` says how close. Dense candidates (a fine
    grid) give a good approximation; nothing is optimised, so the result is exact for the
    candidates given and deterministic.
    """
    samples = samples.detach().float().cpu().flatten(1)
    candidates = candidates.detach()
    _, feats = _forward(model, candidates, cut)
    if feats.shape[1] != samples.shape[1]:
        raise ValueError(f"the samples have {samples.shape[1]} features, but the input of "
                         f"{cut!r} has {feats.shape[1]}; give the cut the samples come from")
    best = torch.full((len(samples),), math.inf)
    index = torch.zeros(len(samples), dtype=torch.long)
    for start in range(0, len(feats), _CHUNK):
        d, i = torch.cdist(samples, feats[start:start + _CHUNK]).min(1)
        better = d < best
        best = torch.where(better, d, best)
        index = torch.where(better, i + start, index)
    return candidates.cpu()[index], best


def decision_regions(model: nn.Module, X, y, path=None, *, report: Optional["ScanReport"] = None,
                     cut: Optional[str] = None, attacked=None, target: Optional[int] = None,
                     resolution: int = 300, ax=None):
    """Draw the decision regions of ``model`` over the plane of 2-D inputs, the samples ``X``
    ([N, 2]) coloured by their labels ``y``, the ``attacked`` sample ([1, 2] or [2], e.g.
    ``Task.target_x``; ``target``: the class the attack wants for it) and, with a scan ``report``,
    the pocket centroids it found. Returns the figure; saves it to ``path`` if given (or draws
    into ``ax``).

    The centroids live in the feature space at the cut (the input of module ``report.cut``;
    ``cut`` overrides it); each is drawn at the point of the ``resolution`` x ``resolution`` grid
    whose features are nearest (:func:`pocket_inputs`), coloured by its target class, edged by
    its source class. A centroid is a convex combination of features and generally lies off
    the features any input reaches, so its grid point is the input whose features come closest
    (it may even be classified as the source class): where the search ended, not a pocket
    member. The grid spans the samples, the attacked sample and a 10% margin. Raises
    ``ValueError`` for inputs that are not 2-D.
    """
    _matplotlib()  # first: without it, the one error that names the extra
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    if ax is None and path is None:
        raise ValueError("give a path to save the figure to, or ax= to draw into")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    X = _two_d("X", X)
    y = torch.as_tensor(y).detach().long().cpu().flatten()
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} samples but y has {len(y)} labels")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
    if cut is not None and report is None:
        raise ValueError("cut= says where report's pocket samples live; give report= with it")
    points = X
    if attacked is not None:
        attacked = _two_d("attacked", attacked, rows=1)
        points = torch.cat([X, attacked])
    lo, hi = points.min(0).values, points.max(0).values
    pad = 0.1 * (hi - lo).clamp_min(1e-6)
    lo, hi = lo - pad, hi + pad
    gx = torch.linspace(float(lo[0]), float(hi[0]), resolution)
    gy = torch.linspace(float(lo[1]), float(hi[1]), resolution)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 2)
    # the grid points in the dtype the model takes (its parameters')
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    grid = grid.to(dtype)
    pred, _ = _forward(model, grid, None)
    classes = int(max(int(pred.max()), int(y.max()) if len(y) else 0,
                      -1 if target is None else int(target))) + 1
    if report is not None:
        classes = max(classes, report.P.shape[0])
    colours = _class_colours(classes)

    fig, ax = _axes(ax, (7.5, 6.5))
    ax.imshow(pred.reshape(resolution, resolution).numpy(), origin="lower",
              extent=(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])),
              cmap=ListedColormap(colours), vmin=-0.5, vmax=classes - 0.5, alpha=0.3,
              interpolation="nearest", aspect="auto")
    ax.scatter(X[:, 0].numpy(), X[:, 1].numpy(), c=np.array(colours)[y.numpy()], s=8,
               linewidths=0, label="samples")
    handles = [Line2D([], [], marker="s", linestyle="", color=colours[c], alpha=0.6,
                      label=f"class {c}") for c in range(classes)]
    if attacked is not None:
        wants = f" (attack: class {target})" if target is not None else ""
        ax.scatter(attacked[:, 0].numpy(), attacked[:, 1].numpy(), marker="*", s=320,
                   c=[colours[target] if target is not None else "white"], edgecolors="black",
                   linewidths=1.5, zorder=5, label=f"attacked sample{wants}")
        handles.append(Line2D([], [], marker="*", linestyle="", markersize=14,
                              markerfacecolor=colours[target] if target is not None else "white",
                              markeredgecolor="black", label=f"attacked sample{wants}"))
    title = "decision regions"
    if report is not None:
        where = cut or report.cut
        title = f"decision regions; CLEAR scan: {_verdict(report)}"
        if len(report.pocket_samples):
            found, dist = pocket_inputs(model, report.pocket_samples, where, grid)
            found = found.float()
            tgt = report.pocket_targets.cpu().long().numpy()
            src = report.pocket_sources.cpu().long().numpy()
            ax.scatter(found[:, 0].numpy(), found[:, 1].numpy(), marker="X", s=140,
                       c=np.array(colours)[tgt], edgecolors=np.array(colours)[src],
                       linewidths=2, zorder=4, label="pocket centroids")
            handles.append(Line2D([], [], marker="X", linestyle="", markersize=10,
                                  markerfacecolor="0.6", markeredgecolor="black",
                                  label=f"{len(found)} pocket centroids (nearest grid point in "
                                  f"features at {where!r})"))
        else:
            title += "; no pockets found"
    ax.set_xlim(float(lo[0]), float(hi[0]))
    ax.set_ylim(float(lo[1]), float(hi[1]))
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(title, fontsize="medium")
    ax.legend(handles=handles, loc="best", fontsize="x-small", framealpha=0.8)
    _save(fig, path)
    return fig
