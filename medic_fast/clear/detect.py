"""``scan``: CLEAR's detection (DESIGN.md §2). Split the model at the cut, take the n most
confidently and correctly classified clean samples of each class, run every (source, target,
restart) pocket search as one batch, and flag the model when a pair finds pockets more often than
the threshold."""
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

from medic_fast.clear import graph
from medic_fast._utils import available_cores, check_int, device_of, torch_threads
from medic_fast.capture import ActivationCapture
from medic_fast.data import labelled_batches, make_loader
from medic_fast.ops.pocket_search import pocket_search
from medic_fast.stats import nonfinite_error

__all__ = ["scan", "ScanReport", "DEFAULTS", "BOX_SLACK"]

# alpha: weight of the compactness term; steps: SGD steps per search; margin: how far the winning
# logit must lead for a test to pass. Chosen on the demo tasks with seeds 100-105 (evaluated on
# seeds 0-9 in benchmarks/bench_clear.py; benchmarks/RESULTS.md §4 has the figures): a large
# alpha keeps hulls tight, which is what tells a planted pocket from the wiggles of a clean
# boundary; a margin keeps ties and near-ties out; at lr_scale = 1e-3 it takes a few hundred
# steps for the centroid to travel from the confident anchors to a pocket.
DEFAULTS = dict(alpha=3.0, steps=600, margin=0.25)
# A search is abandoned when its centroid leaves the clean features' range [lo, hi] widened by
# BOX_SLACK * (hi - lo) on each side. Without the slack (DESIGN.md §2 read literally), features
# that are ReLU outputs have lo = 0 with many exact zeros, and the first step that pushes one of
# them below zero abandons the search: on the demo models every search stopped at step 1.
BOX_SLACK = 0.5


@dataclass
class ScanReport:
    """What :func:`scan` found. ``P[ls, lt]`` is the fraction of the restarts from source ``ls``
    that found a pocket of target ``lt`` (NaN where no search ran: the diagonal and skipped
    sources). The pocket samples are the found centroids, in the feature space at ``cut``."""

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


def scan(model: nn.Module, data, *, cut: Optional[str] = None, n: int = 50, k: int = 5,
         restarts: int = 10, alpha: float = DEFAULTS["alpha"], steps: int = DEFAULTS["steps"],
         lr_scale: float = 1e-3, margin: float = DEFAULTS["margin"], threshold: float = 0.5,
         seed: int = 0, backend: str = "auto", progress: bool = False,
         threads: Optional[int] = None) -> ScanReport:
    """Scan ``model`` for a sample-targeted backdoor with CLEAR, using clean ``data`` (a
    ``Dataset``, a ``DataLoader`` or an ``(X, y)`` pair). The model is not modified.

    cut: name of the module whose input is the feature space (default: DESIGN.md §2). n: clean
    samples per class to start from; k: anchors per search; restarts: searches per class pair.
    lr = lr_scale * (max - min of the clean features). A pair with P > threshold flags the model.
    progress: show on stderr the feature pass (a bar over batches), then the search.
    threads: torch threads while it runs (restored after); default every core this process may
    use (the batched search splits its problems across them).
    """
    with torch_threads(threads or available_cores()):
        return _scan(model, data, cut=cut, n=n, k=k, restarts=restarts, alpha=alpha,
                     steps=steps, lr_scale=lr_scale, margin=margin, threshold=threshold,
                     seed=seed, backend=backend, progress=progress)


def _scan(model, data, *, cut, n, k, restarts, alpha, steps, lr_scale, margin, threshold, seed,
          backend, progress) -> ScanReport:
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n, k = check_int("n", n, 1), check_int("k", k, 2)
    restarts = check_int("restarts", restarts, 1)
    seed = check_int("seed", seed, 0)
    if k > n:
        raise ValueError(f"k={k} anchors cannot be drawn from n={n} samples; need k <= n")
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
            or not 0 <= threshold < 1):
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    if (isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float))
            or not 0 < lr_scale < math.inf):
        raise ValueError(f"lr_scale must be a finite number > 0, got {lr_scale!r}")
    m = copy.deepcopy(model).eval().requires_grad_(False)
    cut = graph.default_cut(m) if cut is None else cut
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
        raise ValueError(f"data has labels outside [0, {classes}), the model's classes")
    with torch.no_grad():
        check = head(phi[:8])
    if not torch.allclose(check.float(), logits[:8], rtol=1e-3, atol=1e-4):
        raise ValueError(f"the model's part after cut={cut!r} does not reproduce its output from "
                         "the cut's input; the forward may use that input in a way torch.fx "
                         "cannot see. Choose another cut")
    t_feat = time.perf_counter()

    conf = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    correct = logits.argmax(1) == y
    gen = torch.Generator().manual_seed(seed)
    anchors, source, target, skipped = [], [], [], {}
    for ls in range(classes):
        mine = (correct & (y == ls)).nonzero().squeeze(1)
        if len(mine) < k:
            skipped[ls] = len(mine)
            continue
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
    feat = phi.shape[1:]
    samples = phi.new_zeros((0, *feat))
    src_found = tgt_found = torch.zeros(0, dtype=torch.long)
    n_found = n_abandoned = 0
    used = "none"
    if anchors:
        source, target = torch.cat(source), torch.cat(target)
        if progress:
            print(f"scan: {len(source)} searches = {len(anchors) * (classes - 1)} class pairs x "
                  f"{restarts} restarts", file=sys.stderr)
        res = pocket_search(torch.cat(anchors), head, source.to(phi.device), target.to(phi.device),
                            alpha=alpha, lr=lr, steps=steps, lo=lo - slack, hi=hi + slack,
                            margin=margin, backend=backend, progress=progress)
        found = res.found.cpu()
        counts = torch.zeros(classes * classes).index_add_(
            0, source * classes + target, found.float()).view(classes, classes)
        searched = sorted(set(source.tolist()))
        P[searched] = counts[searched] / restarts
        P[searched, searched] = math.nan
        samples = res.centroids[res.found]
        src_found, tgt_found = source[found], target[found]
        n_found, n_abandoned, used = int(found.sum()), int(res.abandoned.sum()), res.backend
    t_end = time.perf_counter()

    above = [(ls, lt, float(P[ls, lt])) for ls in range(classes) for lt in range(classes)
             if P[ls, lt] > threshold]
    above.sort(key=lambda p: -p[2])
    return ScanReport(
        P=P, threshold=float(threshold), flagged=bool(above), target=above[0][1] if above else None,
        pairs=above, pocket_samples=samples, pocket_sources=src_found, pocket_targets=tgt_found,
        skipped=skipped, cut=cut, n_searches=sum(len(a) for a in anchors), n_found=n_found,
        n_abandoned=n_abandoned, backend=used,
        timing=dict(features=t_feat - t0, search=t_end - t_feat, total=t_end - t0),
        settings=settings)
