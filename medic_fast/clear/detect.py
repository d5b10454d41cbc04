"""``scan``: CLEAR's detection. Split the model at the cut, search the feature space for pockets
of every class pair, all searches in one batch, and flag the model when a pair's statistic exceeds
the threshold. Two searches: ``method="hull"`` (the default, :mod:`medic_fast.clear.hull`: within
the local hulls of the clean features, scored by depth) and ``method="paper"`` (Algorithm 1,
DESIGN.md §2: free anchors from the most confident samples, on the extension).

The verdict is ``"flagged"`` (a pair's statistic exceeds the threshold), ``"clean"`` (nothing
does, and every class was searched against every other) or ``"inconclusive"`` (nothing does, but
a class could not be searched or no search step ran): "not flagged" after searching too little is
no evidence of a clean model, and the report's ``advice`` says what to change."""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from medic_fast.clear import graph, hull, shadows as _shadows
from medic_fast._utils import available_cores, check_int, check_number, device_of, torch_threads
from medic_fast.capture import ActivationCapture
from medic_fast.data import labelled_batches, make_loader
from medic_fast.ops import _dispatch
from medic_fast.ops.pocket_search import pocket_search
from medic_fast.stats import nonfinite_error

__all__ = ["scan", "calibrate", "ScanReport", "DEFAULTS", "HULL", "METHODS", "BOX_SLACK",
           "VERDICTS", "LIMITS", "HULL_BACKENDS", "working_dtype"]

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
VERDICTS = ("flagged", "clean", "inconclusive")
# The allowed ranges (inclusive) of the search's sizes: past them a setting is a slip, not a scan
# (both searches were tuned at k = 5-8, 100-600 steps and 10 restarts). The memory the search
# would take is checked on its own, against max_memory, before anything is allocated.
LIMITS = dict(k=(2, 1024), n=(1, 10**6), restarts=(1, 10**6), steps=(0, 10**5))
# The backends method="hull" takes: its search runs in plain PyTorch. The extension's fused
# kernels ("cpp", "cuda") run method="paper".
HULL_BACKENDS = ("auto", "reference")


@dataclass
class ScanReport:
    """What :func:`scan` found. ``verdict``: ``"flagged"``, ``"clean"`` or ``"inconclusive"``
    (:data:`VERDICTS`), with ``advice``: one line saying what to change ("" when nothing needs
    to). ``P[ls, lt]`` is the statistic of the pair source ``ls``, target ``lt`` (NaN where no
    search ran: the diagonal, skipped sources, and for ``"hull"`` skipped targets too):
    for ``method="paper"`` the fraction of restarts that found a pocket, for ``"hull"`` the depth
    of the deepest point classified ``lt`` (0: none). The pocket samples are the found pockets
    (paper: every found centroid; hull: the points deeper than the threshold), in the feature
    space at ``cut``, in the model's dtype.

    What was searched: the source classes ``searched``; ``skipped`` (class -> its correctly
    classified samples) with ``skip_reasons`` (class -> why, one line); ``n_searches`` problems
    and ``n_steps`` steps (the batch's: hull, every step; paper, up to the last problem's stop).
    ``model_dtype`` is the model's floating dtype, ``search_dtype`` the one the search ran in.

    ``threshold_source``: ``"fixed"`` (the method's default), ``"given"`` (the ``threshold``
    argument) or ``"shadows"`` (set from clean shadow models, :mod:`medic_fast.clear.shadows`),
    with ``calibration``: the rule, ``false_alarm``, each shadow's largest statistic
    (``maxima``), what was trained and scanned now and in how many seconds, and the cache key
    (empty unless ``"shadows"``)."""

    P: Tensor
    threshold: float
    verdict: str                                 # one of VERDICTS
    target: Optional[int]
    pairs: List[Tuple[int, int, float]]          # (source, target, P) above threshold, best first
    pocket_samples: Tensor                       # [M, *features]
    pocket_sources: Tensor                       # [M]: each pocket's anchor class (its true label)
    pocket_targets: Tensor                       # [M]
    searched: List[int]                          # the source classes searched
    skipped: Dict[int, int]                      # class -> its correctly classified samples
    skip_reasons: Dict[int, str]                 # class -> why it was not searched
    cut: str
    n_searches: int
    n_steps: int
    n_found: int
    n_abandoned: int
    backend: str
    model_dtype: str
    search_dtype: str
    advice: str
    timing: Dict[str, float]                     # seconds: shadows, features, search, total
    settings: Dict[str, float] = field(default_factory=dict)
    threshold_source: str = "fixed"              # "fixed", "given" or "shadows"
    calibration: dict = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """Whether the verdict is ``"flagged"`` (the report's verdict before there were three)."""
        return self.verdict == "flagged"

    def detects(self, source: int, target: int) -> bool:
        """Whether the report names the attack on a sample of class ``source`` sent to
        ``target``: its best pair is ``(source, target)``. A flag at ``target`` from another
        source class is a miss (it happens by chance, 1/(C-1) of the flags at a target)."""
        return self.flagged and tuple(self.pairs[0][:2]) == (source, target)

    def to_dict(self) -> dict:
        """Everything but the pocket samples' features, as plain Python values (NaN -> None)."""
        return {
            "verdict": self.verdict, "flagged": self.flagged, "target": self.target,
            "advice": self.advice, "threshold": self.threshold,
            "threshold_source": self.threshold_source, "calibration": self.calibration,
            "pairs": [list(p) for p in self.pairs],
            "P": [[None if math.isnan(v) else v for v in row] for row in self.P.tolist()],
            "pocket_sources": self.pocket_sources.tolist(),
            "pocket_targets": self.pocket_targets.tolist(),
            "searched": self.searched,
            "skipped": {str(c): n for c, n in self.skipped.items()},
            "skip_reasons": {str(c): why for c, why in self.skip_reasons.items()},
            "cut": self.cut, "n_searches": self.n_searches, "n_steps": self.n_steps,
            "n_found": self.n_found, "n_abandoned": self.n_abandoned, "backend": self.backend,
            "model_dtype": self.model_dtype, "search_dtype": self.search_dtype,
            "timing": self.timing, "settings": self.settings,
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
        verdict = f"flagged, target {self.target}" if self.flagged else self.verdict
        return (f"ScanReport({verdict}; {len(self.pairs)} pairs above {self.threshold:.4g} "
                f"({self.threshold_source}); "
                f"{self.n_found}/{self.n_searches} searches found pockets; searched classes "
                f"{self.searched}, skipped {sorted(self.skipped)}; cut={self.cut!r}; "
                f"{self.timing['total']:.2f} s)")


def _features(model: nn.Module, cut: str, data, dtype: torch.dtype,
              progress: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Features at the cut, logits and labels of every sample of ``data``; all must be finite
    (else a ``ValueError`` names the first bad sample, or the first non-finite layer). Floating
    inputs are cast to ``dtype``, the model's (float32 data scans a float64 or bfloat16 model).
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
            x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
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
         max_memory: Optional[int] = None, progress: bool = False,
         threads: Optional[int] = None, shadows: int = 0, factory=None,
         false_alarm: float = 0.05, shadow_train: Optional[dict] = None) -> ScanReport:
    """Scan ``model`` for a sample-targeted backdoor with CLEAR, using clean ``data`` (a
    ``Dataset``, a ``DataLoader`` or an ``(X, y)`` pair). The model is not modified.

    Returns a :class:`ScanReport` whose ``verdict`` is ``"flagged"``, ``"clean"`` or
    ``"inconclusive"``: never ``"clean"`` when a class could not be searched (no sample of it,
    or fewer than ``k`` that the model classifies correctly) or no search step ran; its
    ``advice`` says what to change.

    method: ``"hull"`` (default, :mod:`medic_fast.clear.hull`): the neighbourhood of ``k``
    (default 8) same-class samples around every correctly classified sample (or around ``n`` of
    each class, drawn with ``seed``), against every other class searched, searched for a
    point of its hull (widened by ``reach``) classified as that class; ``P[ls, lt]`` is the depth
    of the deepest one found (0: none), and a pair with ``P > threshold`` (default 10.0) flags
    the model. Its default cut is the model's input. Cost: (neighbourhoods x (classes - 1))
    points through the part after the cut, ``steps`` times (forward and backward): on a large
    network pass ``n`` or a later ``cut``. Runs in plain PyTorch: ``backend`` "auto" or
    "reference".
    ``"paper"``: Algorithm 1 (DESIGN.md §2): ``restarts`` searches per pair from ``k`` (default
    5) of the ``n`` (default 50) most confident samples, SGD with the extension (``backend``:
    see :func:`medic_fast.pocket_search`), ``alpha``, ``margin``, ``lr = lr_scale * (max - min
    of the clean features)``; ``P`` is the fraction of restarts that found a pocket,
    ``threshold`` default 0.5.
    cut: name of the module whose input is the space searched (default: the model's input for
    "hull", DESIGN.md §2's cut for "paper").
    steps: search steps (default 100 for "hull", 600 for "paper").
    k, n, restarts, steps must lie in :data:`LIMITS`. max_memory: bytes the search may take
    (default: half the memory available on the model's device); a scan whose estimate exceeds it
    is refused before the search allocates anything.
    dtype: floating inputs are cast to the model's dtype; the search runs in float32, or in
    float64 for a float64 model's hull search (``report.search_dtype``).
    progress: show on stderr the feature pass (a bar over batches), then the search.
    threads: torch threads while it runs (restored after); default every core this process may
    use (the batched search splits its problems across them).
    shadows, factory, false_alarm, shadow_train: calibrate the threshold from ``shadows`` (>= 2;
    5 or more for a useful bound) clean models of the architecture, ``factory()`` returning a
    fresh untrained one, the way to set it when you can train (method "hull";
    :mod:`medic_fast.clear.shadows`): each is trained (``shadow_train``: keys of
    :data:`~medic_fast.clear.shadows.TRAIN`) on a random half of ``data`` and scanned on the
    other half with this scan's settings, and the threshold is set so that a clean model is
    flagged with probability ``false_alarm``. Shadows and their scans are cached on disk. Cost:
    ``shadows`` trainings and half-size scans, once per architecture, data and seed
    (``report.calibration``, ``report.timing["shadows"]``). Without shadows the threshold is
    the fixed default, or ``threshold`` (``report.threshold_source``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    hull_ = method == "hull"
    k = (HULL["k"] if hull_ else 5) if k is None else k
    n = (None if hull_ else 50) if n is None else n
    steps = (HULL["steps"] if hull_ else DEFAULTS["steps"]) if steps is None else steps
    source = "fixed" if threshold is None else "given"
    threshold = (HULL["threshold"] if hull_ else 0.5) if threshold is None else threshold
    calibration = None
    if shadows != 0 or factory is not None:
        _check_shadows(method, shadows, factory, false_alarm, source)
        calibration = dict(factory=factory, shadows=shadows, false_alarm=false_alarm,
                           shadow_train=shadow_train)
    with torch_threads(threads or available_cores()):
        return _scan(model, data, method=method, cut=cut, n=n, k=k, restarts=restarts,
                     alpha=alpha, steps=steps, lr_scale=lr_scale, margin=margin, reach=reach,
                     threshold=threshold, seed=seed, backend=backend, max_memory=max_memory,
                     progress=progress, threshold_source=source, calibration=calibration)


def _check_shadows(method: str, shadows, factory, false_alarm, source: str) -> None:
    """Refuse, before any work, shadow settings that cannot calibrate this scan."""
    if method != "hull":
        raise ValueError(f"shadows calibrate method='hull' (a depth); got method={method!r}")
    if isinstance(shadows, bool) or not isinstance(shadows, int) \
            or shadows < _shadows.MIN_SHADOWS:
        raise ValueError(f"shadows must be an int >= {_shadows.MIN_SHADOWS} (5 or more for a "
                         f"useful bound) when factory is given, got {shadows!r}")
    if factory is None:
        raise ValueError(f"shadows={shadows} needs factory: a callable returning a fresh "
                         "untrained model of the architecture scanned")
    if source == "given":
        raise ValueError("give threshold or shadows, not both: shadows set the threshold")
    if isinstance(false_alarm, bool) or not isinstance(false_alarm, (int, float)) \
            or not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be a number in (0, 1), got {false_alarm!r}")


def calibrate(models, data, *, method: str = "hull", factor: float = 1.1,
              false_alarm: Optional[float] = None, **kwargs) -> float:
    """A ``threshold`` for :func:`scan` from clean ``models`` of the task (trained as the model to
    scan was, on clean data), from the largest pair statistic each gives on ``data`` (each
    model's own clean data: a list, one per model, or one for all): ``factor`` times the largest
    of them, the way the fixed default was set; or, with ``false_alarm`` (method "hull", 2
    models or more), the threshold a clean model's exceeds with that probability
    (:func:`medic_fast.clear.shadows.threshold_for`, the rule of ``scan(shadows=...)``).
    ``kwargs`` go to :func:`scan`. For ``method="paper"`` a ValueError says so when clean models
    reach P = 1 / factor or more: no threshold below 1 then separates them."""
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one clean model")
    check_number("factor", factor, positive=True)
    datas = data if isinstance(data, list) and len(data) == len(models) else [data] * len(models)
    kwargs.pop("threshold", None)
    maxima = [_largest(scan(m, d, method=method, **kwargs).P) for m, d in zip(models, datas)]
    if false_alarm is not None:
        if method != "hull":
            raise ValueError(f"false_alarm calibrates method='hull' (a depth); got "
                             f"method={method!r}: use factor")
        return _shadows.threshold_for(maxima, false_alarm)
    top = max(maxima)
    if method == "paper" and top * factor >= 1:
        raise ValueError(f"clean models reach P = {top:g} with method='paper': no threshold "
                         f"below 1 is {factor}x above it")
    return top * factor


def _largest(P: Tensor) -> float:
    """A scan's statistic as thresholds see it: its largest pair's (0 where none was searched)."""
    return float(P.nan_to_num(0).max())


def _bounded(name: str, v) -> int:
    """``v`` if it is an int in ``LIMITS[name]``, else a ValueError naming ``name`` and the
    range."""
    low, high = LIMITS[name]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {v!r}")
    return v


def _check_backend(method: str, backend, device: torch.device) -> None:
    """Refuse, before any work, a ``backend`` that ``method``'s search does not run on
    ``device`` (a ValueError naming what it takes; the extension missing for a named kernel:
    :class:`~medic_fast._extension.ExtensionUnavailable`)."""
    if method == "paper":
        _dispatch.resolve("pocket_search", backend, device)
    elif backend not in HULL_BACKENDS:
        raise ValueError(f"backend={backend!r}: method='hull' runs its search in plain PyTorch "
                         f"and takes backend {' or '.join(map(repr, HULL_BACKENDS))}; the "
                         "extension's kernels ('cpp', 'cuda') run method='paper'")


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter or buffer (the default dtype if none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to optimise in for a model in ``dtype``: float64 stays, anything else is
    float32: in half precision (bfloat16 keeps 8 bits) small steps round away, and Adam's eps
    (1e-8) underflows to 0 in float16, which gives NaN."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _search_dtype(method: str, model_dtype: torch.dtype) -> torch.dtype:
    """The hull search runs in :func:`working_dtype`; the paper's in float32, the extension's."""
    return working_dtype(model_dtype) if method == "hull" else torch.float32


def _memory_limit(device: torch.device) -> int:
    """Half the memory available now on ``device``: free CUDA memory, or what /proc/meminfo calls
    available on the host (its physical memory where that cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _footprint(method: str, groups: Dict[int, Tensor], targets: set, classes: int, *, n, k,
               restarts, dim: int, act: int, itemsize: int, samples: int) -> Tuple[int, int]:
    """``(problems, bytes)``: the search's number of problems and an estimate of its peak memory,
    from the searched classes' ``groups`` (class -> its correctly classified samples), ``dim``
    features, ``act`` elements the head computes per point and the ``samples`` of the data.
    Counted per problem: its anchors (as built, batched, and the search's working copies and
    gradients) and the head's activations with their gradients (hull: one point; paper: the
    anchors and the centroid); hull: Adam's state and the distances of a find to every sample;
    paper: the random draw of anchors. Once: hull's distances within the largest class."""
    sizes = [len(g) for g in groups.values()]
    if method == "hull":
        q = sum(min(n or len(g), len(g)) * len(targets - {c}) for c, g in groups.items())
        per = (2 * k * dim + 4 * k + 5 * dim + 2 * act + samples) * itemsize
        return q, q * per + max(sizes, default=0) ** 2 * itemsize
    q = len(groups) * (classes - 1) * restarts
    draw = (classes - 1) * restarts * min(n, max(sizes, default=0)) * 12  # float32 + int64
    return q, q * (k + 1) * (6 * dim + 2 * act) * itemsize + draw


def _gib(b: int) -> str:
    return f"{b / 2 ** 30:.2f} GiB = {b:,} bytes"


def _classes(correct: Tensor, y: Tensor, classes: int, k: int):
    """``(groups, skipped)``: ``groups``, class -> the indices of its correctly classified
    samples, for every class with at least ``k`` of them; ``skipped``, class -> (correctly
    classified, all) samples, for the others."""
    groups, skipped = {}, {}
    for c in range(classes):
        mine = y == c
        ok = (correct & mine).nonzero().squeeze(1)
        if len(ok) >= k:
            groups[c] = ok
        else:
            skipped[c] = (len(ok), int(mine.sum()))
    return groups, skipped


def _reason(ok: int, total: int, k: int) -> str:
    """Why a class with ``ok`` of ``total`` samples correctly classified was not searched."""
    if total == 0:
        return "the data has no sample of this class"
    return f"{ok} of its {total} samples are classified correctly; k={k} are needed"


def _advice(skipped: Dict[int, Tuple[int, int]], k: int, searches: int, steps: int) -> str:
    """One line: what to change so that the scan searches every class ("" when it did)."""
    def listed(cs):
        return f"class{'es' if len(cs) > 1 else ''} {', '.join(map(str, cs))}"

    absent = [c for c, (_, total) in skipped.items() if total == 0]
    wrong = [c for c, (ok, total) in skipped.items() if total and ok < total / 2]
    few = [c for c, (ok, total) in skipped.items() if total and ok >= total / 2]
    parts = []
    if absent:
        parts.append(f"give clean samples of {listed(absent)}: the data has none")
    if wrong:
        parts.append(f"the model gets most samples of {listed(wrong)} wrong ("
                     + ", ".join(f"{skipped[c][0]} of {skipped[c][1]} right" for c in wrong)
                     + "): check that the data's labels and preprocessing are the model's")
    if few:
        low = min(skipped[c][0] for c in few)
        parts.append(f"give more clean samples of {listed(few)} (fewer than k={k} correctly "
                     "classified" + (f"), or lower k to {low}" if low >= 2 else ")"))
    if not searches and not parts:
        parts.append("no class pair was searched")
    if steps == 0:
        parts.append("give steps >= 1: steps=0 ran no search step")
    return "; ".join(parts)


def _scan(model, data, *, method, cut, n, k, restarts, alpha, steps, lr_scale, margin, reach,
          threshold, seed, backend, max_memory, progress, threshold_source="fixed",
          calibration=None) -> ScanReport:
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n = None if n is None else _bounded("n", n)
    k = _bounded("k", k)
    restarts = _bounded("restarts", restarts)
    steps = _bounded("steps", steps)
    seed = check_int("seed", seed, 0)
    if max_memory is not None:
        check_int("max_memory", max_memory, 1)
    if method == "paper" and k > n:
        raise ValueError(f"k={k} anchors cannot be drawn from n={n} samples; need k <= n")
    check_number("threshold", threshold)
    if method == "paper" and threshold >= 1:
        raise ValueError(f"threshold must be a number in [0, 1) for method='paper' (P is a "
                         f"fraction of restarts), got {threshold!r}")
    check_number("lr_scale", lr_scale, positive=True)
    check_number("reach", reach)
    _check_backend(method, backend, device_of(model))
    if calibration is not None:
        search = dict(method=method, cut=cut, n=n, k=k, restarts=restarts, alpha=alpha,
                      steps=steps, lr_scale=lr_scale, margin=margin, reach=reach, seed=seed,
                      backend=backend, max_memory=max_memory)
        threshold, calibration = _calibrate_shadows(model, data, search, threshold, progress,
                                                    **calibration)
        threshold_source = "shadows"
    t0 = time.perf_counter()
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
    model_dtype = _model_dtype(m)
    phi, logits, y = _features(m, cut, data, model_dtype, progress)
    classes = logits.shape[1]
    if classes < 2:
        raise ValueError(f"the model must return logits of 2 classes or more, got {classes}")
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"data has labels outside [0, {classes}), the model's classes "
                         f"(found {int(y.min())}..{int(y.max())})")
    with torch.no_grad():
        check = head(phi[:8])
    if not torch.allclose(check.float(), logits[:8], rtol=1e-3, atol=1e-4):
        raise ValueError(f"the model's part after cut={cut!r} does not reproduce its output from "
                         "the cut's input; the forward may use that input in a way torch.fx "
                         "cannot see. Choose another cut")
    search_dtype = _search_dtype(method, model_dtype)
    head.to(search_dtype)  # the copy's modules
    feats = phi.to(search_dtype)
    t_feat = time.perf_counter()
    groups, skipped = _classes(logits.argmax(1) == y, y, classes, k)
    # hull's depth measures a find against the clean samples of its source and target: a class
    # too few of whose samples the model gets right is no reference, as a target either
    targets = set(groups) if method == "hull" else set(range(classes))
    problems, need = _footprint(
        method, groups, targets, classes, n=n, k=k, restarts=restarts, dim=feats[0].numel(),
        act=graph.activation_numel(head, feats[:1]), itemsize=feats.element_size(),
        samples=len(y))
    limit = _memory_limit(feats.device) if max_memory is None else max_memory
    if need > limit:
        knobs = "restarts, n or k" if method == "paper" else "n (neighbourhoods per class) or k"
        raise ValueError(
            f"the search would take about {_gib(need)} for {problems:,} problems (k={k}, n={n}"
            + (f", restarts={restarts}" if method == "paper" else "") + "), above the limit of "
            + _gib(limit) + (", max_memory" if max_memory is not None else
                             f", half the memory available on {feats.device.type}")
            + f"; lower {knobs}, or raise max_memory")
    search = _hull if method == "hull" else _paper
    P, found, settings = search(
        head, feats, logits, y, groups, targets, classes, n=n, k=k, restarts=restarts,
        alpha=alpha, steps=steps, lr_scale=lr_scale, margin=margin, reach=reach,
        threshold=threshold, seed=seed, backend=backend, progress=progress)
    t_end = time.perf_counter()
    above = [(ls, lt, float(P[ls, lt])) for ls in range(classes) for lt in range(classes)
             if P[ls, lt] > threshold]
    above.sort(key=lambda p: -p[2])
    verdict = ("flagged" if above else
               "inconclusive" if skipped or not found["searches"] or steps == 0 else "clean")
    return ScanReport(
        P=P, threshold=float(threshold), verdict=verdict, target=above[0][1] if above else None,
        pairs=above, pocket_samples=found["samples"].to(phi.dtype),
        pocket_sources=found["sources"], pocket_targets=found["targets"],
        searched=sorted(groups), skipped={c: ok for c, (ok, _) in skipped.items()},
        skip_reasons={c: _reason(ok, total, k) for c, (ok, total) in skipped.items()},
        cut=cut, n_searches=found["searches"], n_steps=found["steps"], n_found=found["found"],
        n_abandoned=found["abandoned"], backend=found["backend"],
        model_dtype=str(model_dtype).removeprefix("torch."),
        search_dtype=str(search_dtype).removeprefix("torch."),
        advice=_advice(skipped, k, found["searches"], steps),
        timing=dict(features=t_feat - t0, search=t_end - t_feat, total=t_end - t_start,
                    **({"shadows": t0 - t_start} if calibration else {})),
        settings=dict(method=method, **settings, max_memory=limit, memory_estimate=need),
        threshold_source=threshold_source, calibration=calibration or {})


def _calibrate_shadows(model, data, search: dict, threshold: float, progress: bool, *,
                       factory, shadows: int, false_alarm: float, shadow_train
                       ) -> Tuple[float, dict]:
    """``(threshold, calibration)`` from ``shadows`` clean models of ``factory()``'s
    architecture (:func:`medic_fast.clear.shadows.shadow_maxima`), each scanned with the
    ``search`` settings of the model's scan, at ``false_alarm``
    (:func:`~medic_fast.clear.shadows.threshold_for`)."""
    from medic_fast import __version__

    def scan_one(shadow, held_out):
        return _scan(shadow, held_out, threshold=threshold, progress=False, **search).P

    P, cost = _shadows.shadow_maxima(
        factory, data, shadows=shadows, seed=search["seed"], shadow_train=shadow_train,
        settings={**search, "version": __version__}, scan_one=scan_one,
        device=device_of(model), progress=progress)
    maxima = [_largest(p) for p in P]
    # a source class the held-out half could not search leaves its row NaN: a low maximum
    incomplete = sum(bool(p.isnan().all(1).any()) for p in P)
    value = _shadows.threshold_for(maxima, false_alarm)
    return value, dict(rule="log-normal upper prediction bound of the shadows' largest depths",
                       false_alarm=false_alarm, shadows=shadows, maxima=maxima,
                       incomplete=incomplete, **cost, cache_dir=str(_shadows.cache_dir()))


def _nothing_found(phi, backend, anchors) -> dict:
    """A search's outcome before it runs: no pockets, no steps, the number of searches
    (problems in ``anchors``, a list of batches)."""
    none = torch.zeros(0, dtype=torch.long)
    return dict(samples=phi.new_zeros((0, *phi.shape[1:])), sources=none, targets=none,
                found=0, abandoned=0, steps=0, backend=backend,
                searches=sum(len(a) for a in anchors))


def _paper(head, phi, logits, y, groups, targets, classes, *, n, k, restarts, alpha, steps,
           lr_scale, margin, threshold, seed, backend, progress, **_):
    """Algorithm 1: ``restarts`` searches per class pair from ``k`` of the ``n`` most confident
    samples, with the extension. P: the fraction of restarts that found a pocket."""
    conf = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    anchors, source, target = [], [], []
    for ls, mine in groups.items():
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
    found = _nothing_found(phi, "none", anchors)
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
        searched = sorted(groups)
        P[searched] = counts[searched] / restarts
        P[searched, searched] = math.nan
        found.update(samples=res.centroids[res.found], sources=source[hit], targets=target[hit],
                     found=int(hit.sum()), abandoned=int(res.abandoned.sum()),
                     steps=int(res.stopped_at.max()), backend=res.backend)
    return P, found, settings


def _hull(head, phi, logits, y, groups, targets, classes, *, n, k, steps, reach, threshold,
          seed, progress, **_):
    """The hull search (:mod:`medic_fast.clear.hull`) from every correctly classified sample's
    neighbourhood against every other class of ``targets`` (the searched classes). P: the depth
    of the deepest point found classified as the target (0: none); the pocket samples are the
    points deeper than ``threshold``."""
    from tqdm.auto import tqdm

    flat = phi.flatten(1)
    anchors, source, target = [], [], []
    for ls, mine in groups.items():
        hood = flat[mine][hull.neighbourhoods(flat[mine], k)]
        if n is not None and n < len(hood):  # n neighbourhoods, drawn at random
            gen = torch.Generator().manual_seed(seed * classes + ls)
            hood = hood[torch.randperm(len(hood), generator=gen)[:n].to(hood.device)]
        for lt in sorted(targets - {ls}):
            anchors.append(hood)
            source.append(torch.full((len(hood),), ls))
            target.append(torch.full((len(hood),), lt))
    settings = dict(n=n, k=k, steps=steps, reach=reach, threshold=threshold, seed=seed)
    P = torch.full((classes * classes,), math.nan)
    found = _nothing_found(phi, "torch", anchors)
    if not anchors:
        return P.view(classes, classes), found, settings
    source, target = torch.cat(source).to(phi.device), torch.cat(target).to(phi.device)
    if progress:
        print(f"scan: {len(source)} hull searches = {len(groups)} classes' neighbourhoods x "
              f"{len(groups) - 1} targets", file=sys.stderr)
    with tqdm(total=steps, desc="scan: hull search", unit="step", disable=not progress) as bar:
        points, lead = hull.hull_search(
            torch.cat(anchors), lambda v: head(v.view(-1, *phi.shape[1:])), target, reach=reach,
            steps=steps, on_step=lambda s: bar.update())
    hit = lead > 0
    deep = hull.depth(points[hit], source[hit], target[hit], flat, y)
    pair = (source[hit] * classes + target[hit]).cpu()
    best = torch.zeros(classes * classes).scatter_reduce_(0, pair, deep.cpu().float(), "amax")
    searched = (source * classes + target).unique().cpu()
    P[searched] = best[searched]
    keep = deep > threshold
    found.update(samples=points[hit][keep].view(-1, *phi.shape[1:]),
                 sources=source[hit][keep].cpu(), targets=target[hit][keep].cpu(),
                 found=int(hit.sum()), steps=steps)
    return P.view(classes, classes), found, settings
