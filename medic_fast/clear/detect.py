"""``scan``: CLEAR's detection. Split the model at the cut, search the feature space for pockets
of every class pair, all searches in one batch, and flag the model when a pair's statistic exceeds
the threshold. Two searches: ``method="hull"`` (the default, :mod:`medic_fast.clear.hull`: within
the local hulls of the clean features, scored by depth) and ``method="paper"`` (Algorithm 1,
DESIGN.md §2: free anchors from the most confident samples, on the extension)."""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from medic_fast.clear import graph, hull
from medic_fast._utils import (available_cores, check_int, check_number, device_of,
                               torch_threads)
from medic_fast.capture import ActivationCapture
from medic_fast.data import labelled_batches, make_loader
from medic_fast.ops.pocket_search import pocket_search
from medic_fast.stats import nonfinite_error

__all__ = ["scan", "calibrate", "ScanReport", "DEFAULTS", "HULL", "METHODS", "BOX_SLACK"]

# method="paper": alpha: weight of the compactness term; steps: SGD steps per search; margin: how
# far the winning logit must lead for a test to pass. Chosen on the earlier demo tasks with seeds
# 100-105 (benchmarks/RESULTS.md §4 has the figures): a large alpha keeps hulls tight, which is
# what tells a planted pocket from the wiggles of a clean boundary; a margin keeps ties and
# near-ties out; at lr_scale = 1e-3 it takes a few hundred steps for the centroid to travel from
# the confident anchors to a pocket.
DEFAULTS = dict(alpha=3.0, steps=600, margin=0.25)
# A search is abandoned when its centroid leaves the clean features' range [lo, hi] widened by
# BOX_SLACK * (hi - lo) on each side. Without the slack (DESIGN.md §2 read literally), features
# that are ReLU outputs have lo = 0 with many exact zeros, and the first step that pushes one of
# them below zero abandons the search: on the demo models every search stopped at step 1.
BOX_SLACK = 0.5


@dataclass
class ScanReport:
    """What :func:`scan` found. ``P[ls, lt]`` is the statistic of the pair source ``ls``, target
    ``lt`` (NaN where no search ran: the diagonal and skipped sources): for ``method="paper"``
    the fraction of restarts that found a pocket, for ``"hull"`` the depth of the deepest point
    classified ``lt`` (0: none). The pocket samples are the found pockets (paper: every found
    centroid; hull: the points deeper than the threshold), in the feature space at ``cut``."""

    P: Tensor
    threshold: float
    flagged: bool
    target: Optional[int]
    pairs: List[Tuple[int, int, float]]          # (source, target, P) above threshold, best first
    pocket_samples: Tensor                       # [M, *features]
    pocket_sources: Tensor                       # [M]: each pocket's anchor class (its true label)
    pocket_targets: Tensor                       # [M]
    skipped: Dict[int, int]                      # class -> its correctly classified samples
    cut: str
    n_searches: int
    n_found: int
    n_abandoned: int
    backend: str
    timing: Dict[str, float]                     # seconds: features, search, total
    settings: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything but the pocket samples' features, as plain Python values (NaN -> None)."""
        return {
            "flagged": self.flagged, "target": self.target, "threshold": self.threshold,
            "pairs": [list(p) for p in self.pairs],
            "P": [[None if math.isnan(v) else v for v in row] for row in self.P.tolist()],
            "pocket_sources": self.pocket_sources.tolist(),
            "pocket_targets": self.pocket_targets.tolist(),
            "skipped": {str(c): n for c, n in self.skipped.items()},
            "cut": self.cut, "n_searches": self.n_searches, "n_found": self.n_found,
            "n_abandoned": self.n_abandoned, "backend": self.backend, "timing": self.timing,
            "settings": self.settings,
        }

    def to_json(self, **kwargs) -> str:
        """:meth:`to_dict` as JSON (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    def plot(self, path=None, *, ax=None):
        """Draw P as a heatmap over (source, target) class pairs: cells not searched grey, the
        threshold on the colour bar, the pairs above it outlined, the verdict in the title; save
        it to ``path`` (PNG, PDF, SVG...: from the extension) and return the matplotlib figure.
        ``ax``: draw into these axes instead (``path`` may then be None). Needs matplotlib
        (``pip install "medic_fast[plot]"``); see :func:`medic_fast.clear.plots.heatmap`."""
        from medic_fast.clear.plots import heatmap

        return heatmap(self, path, ax=ax)

    def __repr__(self) -> str:
        verdict = f"flagged, target {self.target}" if self.flagged else "not flagged"
        return (f"ScanReport({verdict}; {len(self.pairs)} pairs above {self.threshold}; "
                f"{self.n_found}/{self.n_searches} searches found pockets; skipped classes "
                f"{sorted(self.skipped)}; cut={self.cut!r}; {self.timing['total']:.2f} s)")


def _features(model: nn.Module, cut: str, data,
              progress: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Features at the cut, logits and labels of every sample of ``data``; all must be finite
    (else a ``ValueError`` names the first bad sample, or the first non-finite layer).
    ``progress``: a tqdm bar over the batches on stderr."""
    from tqdm.auto import tqdm

    device = device_of(model)
    loader = make_loader(data, batch_size=256)
    try:
        total = len(loader)
    except TypeError:  # an iterable dataset without a length
        total = None
    phis, logits, labels, offset = [], [], [], 0
    with (ActivationCapture(model, [cut], inputs=True) as cap, torch.no_grad(),
          tqdm(total=total, desc="scan: features", unit="batch", disable=not progress) as bar):
        for x, y in labelled_batches(loader):
            x = x.to(device)
            out = model(x)
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(x):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"the model must return logits [N, classes]; on a batch of "
                                 f"{len(x)} it returned {shape}")
            phi = cap.outputs()[0]
            if not bool(torch.isfinite(out).all() & torch.isfinite(phi).all()):
                raise nonfinite_error(model, x, offset)
            offset += len(x)
            phis.append(phi)
            logits.append(out.float())
            labels.append(y.to(device).long())
            bar.update()
    if not labels:
        raise ValueError("data is empty")
    return torch.cat(phis), torch.cat(logits), torch.cat(labels)


METHODS = ("hull", "paper")
# method="hull" (the default; medic_fast/clear/hull.py): k nearest same-class samples per
# neighbourhood, Adam steps, reach (offset bound over the neighbourhood's mean radius), and the
# depth a found point must exceed to count as a pocket. Its default cut is the model's input
# (graph.input_cut): feature spaces wider than the data's manifold let the search leave it.
# Chosen on seeds 100-105 of the tasks (benchmarks/RESULTS.md §4 has every setting tried): at the
# paper's cut, reach 0.5 found the roll's transfer pockets (depth 16-196, clean models at most
# 6.8) but not its end-to-end ones (0-15); at the input, every attack that took on the roll gave
# depth 8.7-350 and clean models at most 8.8, so the threshold is 10.
HULL = dict(k=8, steps=100, reach=0.5, threshold=10.0)


def scan(model: nn.Module, data, *, method: str = "hull", cut: Optional[str] = None,
         n: Optional[int] = None, k: Optional[int] = None, restarts: int = 10,
         alpha: float = DEFAULTS["alpha"], steps: Optional[int] = None, lr_scale: float = 1e-3,
         margin: float = DEFAULTS["margin"], reach: float = HULL["reach"],
         threshold: Optional[float] = None, seed: int = 0, backend: str = "auto",
         progress: bool = False, threads: Optional[int] = None) -> ScanReport:
    """Scan ``model`` for a sample-targeted backdoor with CLEAR, using clean ``data`` (a
    ``Dataset``, a ``DataLoader`` or an ``(X, y)`` pair). The model is not modified.

    method: ``"hull"`` (default, :mod:`medic_fast.clear.hull`): the neighbourhood of ``k``
    (default 8) same-class samples around every correctly classified sample (or around ``n`` of
    each class, drawn with ``seed``), against every other class, searched for a point of its hull
    (widened by ``reach``) classified as that class; ``P[ls, lt]`` is the depth of the deepest
    one found (0: none), and a pair with ``P > threshold`` (default 10.0) flags the model. Its
    default cut is the model's input. Cost: (neighbourhoods x (classes - 1)) points through the
    part after the cut, ``steps`` times (forward and backward): on a large network pass ``n``
    or a later ``cut``.
    ``"paper"``: Algorithm 1 (DESIGN.md §2): ``restarts`` searches per pair from ``k`` (default
    5) of the ``n`` (default 50) most confident samples, SGD with the extension, ``alpha``,
    ``margin``, ``lr = lr_scale * (max - min of the clean features)``; ``P`` is the fraction of
    restarts that found a pocket, ``threshold`` default 0.5.
    cut: name of the module whose input is the space searched (default: the model's input for
    "hull", DESIGN.md §2's cut for "paper").
    steps: search steps (default 100 for "hull", 600 for "paper").
    progress: show on stderr the feature pass (a bar over batches), then the search.
    threads: torch threads while it runs (restored after); default every core this process may
    use (the batched search splits its problems across them).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    hull_ = method == "hull"
    k = (HULL["k"] if hull_ else 5) if k is None else k
    n = (None if hull_ else 50) if n is None else n
    steps = (HULL["steps"] if hull_ else DEFAULTS["steps"]) if steps is None else steps
    threshold = (HULL["threshold"] if hull_ else 0.5) if threshold is None else threshold
    with torch_threads(threads or available_cores()):
        return _scan(model, data, method=method, cut=cut, n=n, k=k, restarts=restarts,
                     alpha=alpha, steps=steps, lr_scale=lr_scale, margin=margin, reach=reach,
                     threshold=threshold, seed=seed, backend=backend, progress=progress)


def calibrate(models, data, *, method: str = "hull", factor: float = 1.1, **kwargs) -> float:
    """A ``threshold`` for :func:`scan` from clean ``models`` of the task (trained as the model to
    scan was, on clean data): ``factor`` times the largest pair statistic any of them gives on
    ``data`` (each model's own clean data: a list, one per model, or one for all), the way the
    default was set. ``kwargs`` go to :func:`scan`. For ``method="paper"`` a ValueError says so
    when clean models reach P = 1 / factor or more: no threshold below 1 then separates them."""
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one clean model")
    check_number("factor", factor, positive=True)
    datas = data if isinstance(data, list) and len(data) == len(models) else [data] * len(models)
    kwargs.pop("threshold", None)
    top = max(float(scan(m, d, method=method, **kwargs).P.nan_to_num(0).max())
              for m, d in zip(models, datas))
    if method == "paper" and top * factor >= 1:
        raise ValueError(f"clean models reach P = {top:g} with method='paper': no threshold "
                         f"below 1 is {factor}x above it")
    return top * factor


def _scan(model, data, *, method, cut, n, k, restarts, alpha, steps, lr_scale, margin, reach,
          threshold, seed, backend, progress) -> ScanReport:
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n = None if n is None else check_int("n", n, 1)
    k = check_int("k", k, 2)
    restarts = check_int("restarts", restarts, 1)
    steps = check_int("steps", steps, 0)
    seed = check_int("seed", seed, 0)
    if method == "paper" and k > n:
        raise ValueError(f"k={k} anchors cannot be drawn from n={n} samples; need k <= n")
    check_number("threshold", threshold)
    if method == "paper" and threshold >= 1:
        raise ValueError(f"threshold must be a number in [0, 1) for method='paper' (P is a "
                         f"fraction of restarts), got {threshold!r}")
    check_number("lr_scale", lr_scale, positive=True)
    check_number("reach", reach)
    m = copy.deepcopy(model).eval().requires_grad_(False)
    if cut is None:
        cut = graph.default_cut(m) if method == "paper" else graph.input_cut(m)
    head = graph.split(m, cut)
    if graph.is_affine(head):
        raise ValueError(
            f"cut={cut!r} leaves a purely linear (affine) head: its decision regions are convex, "
            "so a convex combination of points of one class can never be classified as another "
            "and no pocket can exist there. Choose a cut with a nonlinearity (e.g. ReLU) after "
            "it, such as the input of the second-to-last Linear layer")
    phi, logits, y = _features(m, cut, data, progress)
    classes = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"data has labels outside [0, {classes}), the model's classes "
                         f"(found {int(y.min())}..{int(y.max())})")
    with torch.no_grad():
        check = head(phi[:8])
    if not torch.allclose(check.float(), logits[:8], rtol=1e-3, atol=1e-4):
        raise ValueError(f"the model's part after cut={cut!r} does not reproduce its output from "
                         "the cut's input; the forward may use that input in a way torch.fx "
                         "cannot see. Choose another cut")
    t_feat = time.perf_counter()
    correct = logits.argmax(1) == y
    search = _hull if method == "hull" else _paper
    P, found, settings = search(
        head, phi, logits, y, correct, classes, n=n, k=k, restarts=restarts, alpha=alpha,
        steps=steps, lr_scale=lr_scale, margin=margin, reach=reach, threshold=threshold,
        seed=seed, backend=backend, progress=progress)
    t_end = time.perf_counter()
    above = [(ls, lt, float(P[ls, lt])) for ls in range(classes) for lt in range(classes)
             if P[ls, lt] > threshold]
    above.sort(key=lambda p: -p[2])
    return ScanReport(
        P=P, threshold=float(threshold), flagged=bool(above), target=above[0][1] if above else None,
        pairs=above, pocket_samples=found["samples"], pocket_sources=found["sources"],
        pocket_targets=found["targets"], skipped=found["skipped"], cut=cut,
        n_searches=found["searches"], n_found=found["found"], n_abandoned=found["abandoned"],
        backend=found["backend"],
        timing=dict(features=t_feat - t0, search=t_end - t_feat, total=t_end - t0),
        settings=dict(method=method, **settings))


def _classes_with_k(correct, y, classes, k, skipped):
    """``(class, indices of its correctly classified samples)`` for each class that has at least
    ``k`` of them; the others go into ``skipped`` (class -> how many it has)."""
    for c in range(classes):
        mine = (correct & (y == c)).nonzero().squeeze(1)
        if len(mine) < k:
            skipped[c] = len(mine)
        else:
            yield c, mine


def _nothing_found(phi, skipped, backend, anchors) -> dict:
    """A search's outcome before it runs: no pockets, the skipped classes, the number of
    searches (problems in ``anchors``, a list of batches)."""
    none = torch.zeros(0, dtype=torch.long)
    return dict(samples=phi.new_zeros((0, *phi.shape[1:])), sources=none, targets=none,
                skipped=skipped, found=0, abandoned=0, backend=backend,
                searches=sum(len(a) for a in anchors))


def _paper(head, phi, logits, y, correct, classes, *, n, k, restarts, alpha, steps, lr_scale,
           margin, threshold, seed, backend, progress, **_):
    """Algorithm 1: ``restarts`` searches per class pair from ``k`` of the ``n`` most confident
    samples, with the extension. P: the fraction of restarts that found a pocket."""
    conf = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    anchors, source, target, skipped = [], [], [], {}
    for ls, mine in _classes_with_k(correct, y, classes, k, skipped):
        pool = phi[mine[conf[mine].argsort(descending=True)[:n]]]
        others = [lt for lt in range(classes) if lt != ls]
        pick = torch.rand(len(others) * restarts, len(pool), generator=gen).argsort(1)[:, :k]
        anchors.append(pool[pick.to(pool.device)])
        source.append(torch.full((len(pick),), ls))
        target.append(torch.tensor(others).repeat_interleave(restarts))

    lo, hi = float(phi.min()), float(phi.max())
    lr = lr_scale * (hi - lo)
    slack = BOX_SLACK * (hi - lo)
    settings = dict(n=n, k=k, restarts=restarts, alpha=alpha, steps=steps, lr_scale=lr_scale,
                    lr=lr, lo=lo - slack, hi=hi + slack, margin=margin, seed=seed)
    P = torch.full((classes, classes), math.nan)
    found = _nothing_found(phi, skipped, "none", anchors)
    if anchors:
        source, target = torch.cat(source), torch.cat(target)
        if progress:
            print(f"scan: {len(source)} searches = {len(anchors) * (classes - 1)} class pairs x "
                  f"{restarts} restarts", file=sys.stderr)
        res = pocket_search(torch.cat(anchors), head, source.to(phi.device), target.to(phi.device),
                            alpha=alpha, lr=lr, steps=steps, lo=lo - slack, hi=hi + slack,
                            margin=margin, backend=backend, progress=progress)
        hit = res.found.cpu()
        counts = torch.zeros(classes * classes).index_add_(
            0, source * classes + target, hit.float()).view(classes, classes)
        searched = sorted(set(source.tolist()))
        P[searched] = counts[searched] / restarts
        P[searched, searched] = math.nan
        found.update(samples=res.centroids[res.found], sources=source[hit], targets=target[hit],
                     found=int(hit.sum()), abandoned=int(res.abandoned.sum()),
                     backend=res.backend)
    return P, found, settings


def _hull(head, phi, logits, y, correct, classes, *, n, k, steps, reach, threshold, seed,
          progress, **_):
    """The hull search (:mod:`medic_fast.clear.hull`) from every correctly classified sample's
    neighbourhood against every other class. P: the depth of the deepest point found classified
    as the target (0: none); the pocket samples are the points deeper than ``threshold``."""
    from tqdm.auto import tqdm

    flat = phi.flatten(1).float()
    anchors, source, target, skipped = [], [], [], {}
    for ls, mine in _classes_with_k(correct, y, classes, k, skipped):
        hood = flat[mine][hull.neighbourhoods(flat[mine], k)]
        if n is not None and n < len(hood):  # n neighbourhoods, drawn at random
            gen = torch.Generator().manual_seed(seed * classes + ls)
            hood = hood[torch.randperm(len(hood), generator=gen)[:n].to(hood.device)]
        for lt in range(classes):
            if lt != ls:
                anchors.append(hood)
                source.append(torch.full((len(hood),), ls))
                target.append(torch.full((len(hood),), lt))
    settings = dict(n=n, k=k, steps=steps, reach=reach, threshold=threshold, seed=seed)
    P = torch.full((classes, classes), math.nan)
    found = _nothing_found(phi, skipped, "torch", anchors)
    if not anchors:
        return P, found, settings
    source, target = torch.cat(source).to(phi.device), torch.cat(target).to(phi.device)
    searched = sorted(set(source.tolist()))
    P[searched] = 0.0
    P[searched, searched] = math.nan
    if progress:
        print(f"scan: {len(source)} hull searches = {len(searched)} classes' neighbourhoods x "
              f"{classes - 1} targets", file=sys.stderr)
    with tqdm(total=steps, desc="scan: hull search", unit="step", disable=not progress) as bar:
        points, lead = hull.hull_search(
            torch.cat(anchors), lambda v: head(v.view(-1, *phi.shape[1:])), target, reach=reach,
            steps=steps, on_step=lambda s: bar.update())
    hit = lead > 0
    deep = hull.depth(points[hit], source[hit], target[hit], flat, y)
    pair = (source[hit] * classes + target[hit]).cpu()
    best = torch.zeros(classes * classes).scatter_reduce_(0, pair, deep.cpu().float(), "amax")
    P[searched] = torch.maximum(P[searched], best.view(classes, classes)[searched])
    keep = deep > threshold
    found.update(samples=points[hit][keep].view(-1, *phi.shape[1:]).to(phi.dtype),
                 sources=source[hit][keep].cpu(), targets=target[hit][keep].cpu(),
                 found=int(hit.sum()))
    return P, found, settings
