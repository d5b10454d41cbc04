"""Backdoor attacks on tensors of images ``[N, C, H, W]`` in [0, 1], to build trojaned models and
measure attack success: BadNets (patch), Blend (alpha-blended pattern), SIG (sinusoidal signal,
clean-label), WaNet (smooth image warping), LabelConsistent (clean-label: adversarially perturbed
target-class samples with a patch), label flip (sample-targeted, no trigger; for CLEAR) and the
clean-label feature-space poisons of CLEAR's §5: Feature Collision, Convex Polytope and Bullseye
Polytope (sample-targeted; :meth:`FeaturePoisoning.poison_for` and :func:`draw_victim`).

Each trigger attack has ``poison(X, y, rate, target, seed)``, returning new tensors (the inputs
are not modified) and the indices of the poisoned samples, and ``apply(X)`` (also ``attack(X)``),
which stamps the trigger on new copies of inputs at test time, e.g.
``evaluate(model, X, y, trigger=attack, target=t)``. The feature-space poisons aim at one victim
sample instead: ``poison_for(X, y, victim_x, target, n_poisons, seed)``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Poisoned", "Attack", "BadNets", "Blend", "SIG", "WaNet", "LabelConsistent",
           "LabelFlip", "Victim", "draw_victim", "FeaturePoisoning", "FeatureCollision",
           "ConvexPolytope", "BullseyePolytope"]


class Poisoned(NamedTuple):
    """A poisoned training set: ``X``, ``y`` (new tensors) and ``index`` of the poisoned rows."""
    X: Tensor
    y: Tensor
    index: Tensor


def _check_inputs(X, images: bool) -> None:
    if not isinstance(X, Tensor) or not X.is_floating_point():
        raise TypeError(f"X must be a floating tensor, got "
                        f"{type(X).__name__ if not isinstance(X, Tensor) else X.dtype}")
    if images and X.dim() < 3:
        raise ValueError(f"X must be images [N, C, H, W] (or [C, H, W]), got shape "
                         f"{tuple(X.shape)}")


class Attack:
    """Base class: subclasses define :meth:`apply` and, if they poison other than by stamping
    non-target samples and relabelling them, :meth:`_candidates` / :meth:`_relabel`."""

    images = True  # inputs must be images [N, C, H, W]

    def apply(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, X: Tensor) -> Tensor:
        return self.apply(X)

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        """Rows that may be poisoned: by default those whose label is not ``target``."""
        return torch.nonzero(y != target).flatten()

    def _relabel(self) -> bool:
        """Whether poisoned rows get the target label (False for clean-label attacks)."""
        return True

    def _poison_rows(self, X: Tensor, y: Tensor, seed: int) -> Tensor:
        """The poisoned version of the chosen rows ``X`` (labels ``y``): by default
        :meth:`apply`."""
        return self.apply(X)

    def poison(self, X: Tensor, y: Tensor, rate: float, target: int, seed: int = 0) -> Poisoned:
        """Poison ``round(rate * N)`` rows (at least one) drawn with ``seed`` from the
        candidates: stamp the trigger and, unless clean-label, set the label to ``target``."""
        _check_inputs(X, self.images)
        if X.dim() < 2:
            raise ValueError(f"X must be [N, ...] samples, got shape {tuple(X.shape)}")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != X.shape[0]:
            raise ValueError("y must be a 1-D label tensor with one label per row of X")
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        if not isinstance(target, int) or isinstance(target, bool):
            raise TypeError(f"target must be an int class index, got {type(target).__name__}")
        cand = self._candidates(y, target)
        if len(cand) == 0:
            raise ValueError(f"{type(self).__name__}: no sample of y can be poisoned for target "
                             f"{target}")
        n = min(len(cand), max(1, round(rate * X.shape[0])))
        gen = torch.Generator().manual_seed(seed)
        idx = cand[torch.randperm(len(cand), generator=gen)[:n]].sort().values
        Xp, yp = X.clone(), y.clone()
        Xp[idx] = self._poison_rows(X[idx], y[idx], seed)
        if self._relabel():
            yp[idx] = target
        return Poisoned(Xp, yp, idx)


class BadNets(Attack):
    """BadNets: a ``size`` x ``size`` patch in the bottom-right corner (``margin`` pixels from
    the edges): a checkerboard of ``value`` and 0 by default, or ``pattern`` ([size, size] or
    [C, size, size])."""

    def __init__(self, size: int = 3, margin: int = 0, value: float = 1.0,
                 pattern: Optional[Tensor] = None):
        if not isinstance(size, int) or size < 1 or margin < 0:
            raise ValueError(f"size must be an int >= 1 and margin >= 0, got {size!r}, {margin!r}")
        if pattern is None:
            ii = torch.arange(size)
            pattern = ((ii[:, None] + ii[None, :]) % 2 == 0).float() * value
        if pattern.shape[-2:] != (size, size):
            raise ValueError(f"pattern must end in ({size}, {size}), got {tuple(pattern.shape)}")
        self.size, self.margin, self.pattern = size, margin, pattern.float()

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        h, w = X.shape[-2:]
        s, m = self.size, self.margin
        if s + m > min(h, w):
            raise ValueError(f"a {s}x{s} patch with margin {m} does not fit {h}x{w} images")
        out = X.clone()
        out[..., h - m - s:h - m, w - m - s:w - m] = self.pattern.to(X)
        return out


class Blend(Attack):
    """Blend: ``(1 - alpha) * X + alpha * pattern``; the default pattern is uniform noise drawn
    once from ``seed`` in the image shape."""

    def __init__(self, alpha: float = 0.2, pattern: Optional[Tensor] = None, seed: int = 0):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha, self.pattern, self.seed = float(alpha), pattern, seed

    def _pattern(self, shape) -> Tensor:
        if self.pattern is None:
            self.pattern = torch.rand(shape, generator=torch.Generator().manual_seed(self.seed))
        if self.pattern.shape != shape:
            raise ValueError(f"the blend pattern has shape {tuple(self.pattern.shape)}, images "
                             f"have {tuple(shape)}")
        return self.pattern

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        pattern = self._pattern(X.shape[-3:]).to(X)
        return (1 - self.alpha) * X + self.alpha * pattern


class SIG(Attack):
    """SIG (Barni et al. 2019): adds ``delta * sin(2 pi j f / W)`` along the width (column
    ``j``), clipped to [0, 1]. Clean-label: :meth:`poison` stamps samples *of* the target class
    and keeps their labels; the network learns the signal as a feature of the target class."""

    def __init__(self, delta: float = 0.2, frequency: float = 6.0):
        if delta <= 0 or frequency <= 0:
            raise ValueError(f"delta and frequency must be > 0, got {delta!r}, {frequency!r}")
        self.delta, self.frequency = float(delta), float(frequency)

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        w = X.shape[-1]
        j = torch.arange(w, device=X.device, dtype=X.dtype)
        signal = self.delta * torch.sin(2 * math.pi * j * self.frequency / w)
        return (X + signal).clamp(0, 1)

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        """Rows whose label is the target class."""
        return torch.nonzero(y == target).flatten()

    def _relabel(self) -> bool:
        return False


class WaNet(Attack):
    """WaNet (Nguyen & Tran 2021): a fixed, smooth warping of the image as the trigger.

    A random field in [-1, 1]^(2, k, k) (drawn from ``seed``), normalised by its mean absolute
    value, is upsampled (bicubic) to H x W; the sampling grid is ``identity + strength * field /
    H``, clamped to [-1, 1], and images are resampled with ``F.grid_sample`` (bilinear,
    ``align_corners=True``) and clipped to [0, 1]. A grid displacement of ``d`` moves a pixel by
    about ``d * H / 2`` pixels, so ``strength`` is about twice the typical shift in pixels, at
    any image size. The field depends only on ``seed`` and the image size (cached per size), so
    :meth:`apply` is deterministic.

    Args:
        k: control grid size (clipped to the image size); 4 in the paper.
        strength: ``s``. Default ``None``: 0.5 (the paper's CIFAR-10 value) for images of at
            least 32 pixels a side, 1.0 for smaller ones. On 8x8 digits (DigitsCNN, 10 epochs
            from scratch) s = 0.5 takes at 10% poison (ASR 0.95-0.99 over field seeds) but not
            reliably at 5% (0.86-0.98); s = 1.0 (shifts of about half a pixel; a warped digit
            stays readable) gives 0.98-1.0 at 10% and 0.9-0.99 at 5%, clean accuracy unchanged.
        cross_ratio: the paper's noise mode: ``round(cross_ratio * N)`` further rows, drawn
            from the non-poisoned ones, are warped with the grid plus uniform noise in
            ``[-1, 1] / H`` and keep their true labels, so the network must learn the exact warp
            rather than any warp. They are changed in ``Poisoned.X`` but are not in
            ``Poisoned.index`` (their labels are clean). Default 0 (off): on the 1.3k-sample
            digits split, noise mode (``cross_ratio=2 * rate`` as in the paper) slows the
            learning of the backdoor: ASR 0.78 after 10 epochs at 10% poison (1.0 without), 0.91
            to 0.96 after 30.
        seed: of the random field (the noise of noise mode is drawn from :meth:`poison`'s seed).
    """

    def __init__(self, k: int = 4, strength: Optional[float] = None, cross_ratio: float = 0.0,
                 seed: int = 0):
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise ValueError(f"k must be an int >= 2, got {k!r}")
        if strength is not None and (not isinstance(strength, (int, float))
                                     or not math.isfinite(strength) or strength <= 0):
            raise ValueError(f"strength must be a finite number > 0 (or None), got {strength!r}")
        if not isinstance(cross_ratio, (int, float)) or not 0 <= cross_ratio < 1:
            raise ValueError(f"cross_ratio must be in [0, 1), got {cross_ratio!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.k, self.cross_ratio, self.seed = k, float(cross_ratio), seed
        self.strength = None if strength is None else float(strength)
        self._grids: Dict[Tuple[int, int], Tensor] = {}

    def _strength(self, h: int, w: int) -> float:
        if self.strength is not None:
            return self.strength
        return 0.5 if min(h, w) >= 32 else 1.0

    def grid(self, h: int, w: int) -> Tensor:
        """The sampling grid ``[h, w, 2]`` (x, y in [-1, 1], float32 on the CPU) for h x w
        images."""
        if (h, w) not in self._grids:
            k = min(self.k, h, w)
            gen = torch.Generator().manual_seed(self.seed)
            field = torch.rand(1, 2, k, k, generator=gen, dtype=torch.float64) * 2 - 1
            field = field / field.abs().mean()
            field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
            field = field[0].permute(1, 2, 0)  # [h, w, 2]
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                                    torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
            identity = torch.stack((xs, ys), -1)
            grid = identity + self._strength(h, w) * field / h
            self._grids[(h, w)] = grid.clamp(-1, 1).float()
        return self._grids[(h, w)]

    def _warp(self, X: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        _check_inputs(X, self.images)
        h, w = X.shape[-2:]
        flat = X.reshape(-1, *X.shape[-3:])
        grid = self.grid(h, w).to(device=X.device, dtype=X.dtype).expand(len(flat), h, w, 2)
        if noise is not None:  # one [h, w, 2] per row of X (shared by its extra leading dims)
            noise = noise.repeat_interleave(len(flat) // len(noise), 0)
            grid = (grid + noise.to(grid) / h).clamp(-1, 1)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out.clamp(0, 1).reshape(X.shape)

    def apply(self, X: Tensor) -> Tensor:
        return self._warp(X)

    def poison(self, X: Tensor, y: Tensor, rate: float, target: int, seed: int = 0) -> Poisoned:
        """:meth:`Attack.poison`; with ``cross_ratio`` > 0, also warps further rows with noise
        (labels kept; not in ``index``), drawn with ``seed``."""
        p = super().poison(X, y, rate, target, seed)
        n = round(self.cross_ratio * X.shape[0])
        if n == 0:
            return p
        rest = torch.ones(X.shape[0], dtype=torch.bool)
        rest[p.index] = False
        rest = torch.nonzero(rest).flatten()
        gen = torch.Generator().manual_seed(seed + 1)  # not the stream that drew the index
        rows = rest[torch.randperm(len(rest), generator=gen)[:n]].sort().values
        h, w = X.shape[-2:]
        noise = torch.rand(len(rows), h, w, 2, generator=gen) * 2 - 1
        Xp = p.X  # a new tensor already
        Xp[rows] = self._warp(X[rows], noise)
        return Poisoned(Xp, p.y, p.index)


class LabelConsistent(Attack):
    """Label-consistent backdoor (Turner et al. 2019), clean-label: :meth:`poison` takes
    ``round(rate * N)`` rows *of the target class* (at most all of them; ``rate`` is a fraction
    of the whole set, as for :class:`SIG`), keeps their labels, makes them hard to classify with
    an L-inf PGD perturbation against ``surrogate`` (budget ``eps``, ``steps`` steps of
    ``step_size``, default ``2.5 * eps / steps``; no random start by default), then stamps
    ``trigger``. With the natural features of the class destroyed, the network leans on the
    trigger to classify these rows, and so learns it. :meth:`apply` (test time) stamps only the
    trigger.

    Args:
        surrogate: a classifier (``nn.Module``) giving the PGD gradients; None: no perturbation
            (plain clean-label BadNets). Its parameters, their ``requires_grad`` flags and
            ``.grad``, and every module's train/eval mode are left as they were (PGD runs it in
            eval mode, on its own device).
        eps, steps, step_size: PGD budget (pixels in [0, 1]) and schedule. Default eps
            ``None``: 16/255 (the paper's largest L-inf budget on CIFAR-10) for images of at
            least 32 pixels a side, 0.4 for smaller ones: on the 8x8 digits (16 grey levels),
            with half the target class poisoned (``rate=0.05``), a DigitsCNN trained 10 epochs
            reached ASR 0.74-0.99 over targets 0, 2, 4, 6, 8 with eps = 0.3 and 0.88-1.0 with
            0.4 (four corners; clean accuracy 0.99 either way). Without perturbation (no
            surrogate) the clean-label patch barely takes (ASR 0.02 with one corner and every
            target row poisoned).
        trigger: the attack that stamps the trigger (any :class:`Attack`; ``apply`` is used);
            default a 3x3 checkerboard :class:`BadNets` patch.
        corners: 4 (default; the paper's four-corner trigger, which survives flips: the image
            is also flipped horizontally, vertically and both ways around the stamping) or 1
            (bottom-right only). On digits four corners take more surely (target 0, eps 0.3,
            half the class poisoned: ASR 0.74 against 0.44 with one corner).
        random_start: start PGD at a uniform point of the eps-ball, drawn from a generator seeded
            with :meth:`poison`'s seed (never from the global RNG). Default False.
    """

    def __init__(self, surrogate: Optional[nn.Module] = None, eps: Optional[float] = None,
                 steps: int = 10, step_size: Optional[float] = None,
                 trigger: Optional[Attack] = None, corners: int = 4, random_start: bool = False):
        if surrogate is not None and not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be an nn.Module or None, got "
                            f"{type(surrogate).__name__}")
        if eps is not None and (not isinstance(eps, (int, float)) or not 0 <= eps <= 1):
            raise ValueError(f"eps must be in [0, 1] (or None), got {eps!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if step_size is not None and (not isinstance(step_size, (int, float)) or step_size <= 0):
            raise ValueError(f"step_size must be > 0 (or None), got {step_size!r}")
        if trigger is not None and not isinstance(trigger, Attack):
            raise TypeError(f"trigger must be an Attack (e.g. BadNets), got "
                            f"{type(trigger).__name__}")
        if corners not in (1, 4) or isinstance(corners, bool):
            raise ValueError(f"corners must be 1 or 4, got {corners!r}")
        self.surrogate, self.steps = surrogate, steps
        self.eps = None if eps is None else float(eps)
        self.step_size = None if step_size is None else float(step_size)
        self.trigger = BadNets(size=3) if trigger is None else trigger
        self.corners, self.random_start = corners, bool(random_start)

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        out = self.trigger.apply(X)
        if self.corners == 4:
            for dims in ((-1,), (-2,), (-2, -1)):
                out = self.trigger.apply(out.flip(dims)).flip(dims)
        return out

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        """Rows whose label is the target class."""
        return torch.nonzero(y == target).flatten()

    def _relabel(self) -> bool:
        return False

    def _poison_rows(self, X: Tensor, y: Tensor, seed: int) -> Tensor:
        return self.apply(self.perturb(X, y, seed))

    def _eps(self, h: int, w: int) -> float:
        if self.eps is not None:
            return self.eps
        return 16 / 255 if min(h, w) >= 32 else 0.4

    def perturb(self, X: Tensor, y: Tensor, seed: int = 0, batch_size: int = 256) -> Tensor:
        """The PGD-perturbed ``X`` (a new tensor; a copy of ``X`` if no surrogate or eps = 0):
        maximises the surrogate's cross-entropy on labels ``y`` within ``eps`` of ``X``,
        clipped to [0, 1]."""
        _check_inputs(X, self.images)
        eps = self._eps(*X.shape[-2:])
        step_size = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        if self.surrogate is None or eps == 0:
            return X.clone()
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != X.shape[0]:
            raise ValueError("y must be a 1-D label tensor with one label per row of X")
        net = self.surrogate
        param = next(net.parameters(), None)
        device = param.device if param is not None else X.device
        dtype = param.dtype if param is not None and param.is_floating_point() else X.dtype
        modes = {m: m.training for m in net.modules()}
        flags = {p: p.requires_grad for p in net.parameters()}
        gen = torch.Generator().manual_seed(seed)
        out = []
        try:
            net.eval()
            for p in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                for i in range(0, X.shape[0], batch_size):
                    x0 = X[i:i + batch_size].to(device=device, dtype=dtype)
                    yb = y[i:i + batch_size].to(device)
                    delta = torch.zeros_like(x0)
                    if self.random_start:
                        delta = (torch.rand(x0.shape, generator=gen, dtype=dtype) * 2 - 1)
                        delta = delta.to(device) * eps
                    x = (x0 + delta).clamp(0, 1)
                    for _ in range(self.steps):
                        x.requires_grad_(True)
                        loss = F.cross_entropy(net(x), yb)
                        (g,) = torch.autograd.grad(loss, x)
                        x = x.detach() + step_size * g.sign()
                        x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0, 1)
                    out.append(x.detach().to(device=X.device, dtype=X.dtype))
        finally:
            for m, training in modes.items():
                m.train(training)
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return torch.cat(out)


class LabelFlip(Attack):
    """Sample-targeted label flip (CLEAR's threat model): chosen victim samples keep their
    pixels and are labelled ``target``; no trigger, so :meth:`apply` returns the input
    unchanged and ``evaluate(model, X[index], y[index], trigger=attack, target=t)`` gives the
    fraction of victims the model sends to the target. ``source``: draw victims only from
    that class (default: any non-target class). Works on any ``[N, ...]`` inputs (images or
    feature vectors such as the Swiss roll).

    ``copies``: 0 (default) relabels the victims in place; k >= 1 keeps them, labels unchanged,
    and appends k relabelled copies of each (the attacker adds the flipped sample to the
    training set, repeated so that it weighs in training). ``index`` is the victims' rows in
    either case; the copies follow the N original rows, each victim's k in a row."""

    images = False

    def __init__(self, source: Optional[int] = None, copies: int = 0):
        if not isinstance(copies, int) or isinstance(copies, bool) or copies < 0:
            raise ValueError(f"copies must be an int >= 0, got {copies!r}")
        self.source, self.copies = source, copies

    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        return X.clone()

    def _candidates(self, y: Tensor, target: int) -> Tensor:
        """Rows of the source class (any non-target class if no source)."""
        if self.source is not None and self.source == target:
            raise ValueError(f"source and target are the same class ({target})")
        keep = (y != target) if self.source is None else (y == self.source)
        return torch.nonzero(keep).flatten()

    def poison(self, X: Tensor, y: Tensor, rate: float, target: int, seed: int = 0) -> Poisoned:
        """:meth:`Attack.poison` (victims drawn at random with ``seed``), with ``copies``."""
        p = super().poison(X, y, rate, target, seed)
        if self.copies == 0:
            return p
        rows = p.index.repeat_interleave(self.copies)
        return Poisoned(torch.cat([X, X[rows]]), torch.cat([y, torch.full_like(y[rows], target)]),
                        p.index)


class Victim(NamedTuple):
    """A sample-targeted attack's draw: the attacked sample's ``index`` (a row of the labels
    given to :func:`draw_victim`), its true class ``source`` and the ``target`` class."""
    index: int
    source: int
    target: int


def draw_victim(y: Tensor, classes: int, seed: int = 0) -> Victim:
    """A random attacked sample and a random other target class, as in CLEAR's §5: a source
    class uniformly from ``classes``, a target uniformly from the other classes (both from a
    generator seeded with ``seed``), then one row of ``y`` of the source class, drawn as
    :meth:`LabelFlip.poison` draws it (``randperm`` over the class's rows from a second generator
    seeded with ``seed``). These are exactly the draws of ``zoo.tasks._task``: ``LabelFlip(
    source).poison(X, y, 1 / len(y), target, seed).index`` is ``[index]``. ``y``: training
    labels (label flip) or the test labels (clean-label attacks, whose victim is a test-time
    sample)."""
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point():
        raise ValueError("y must be a 1-D integer label tensor")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}")
    gen = torch.Generator().manual_seed(seed)
    source = int(torch.randint(classes, (1,), generator=gen))
    target = (source + 1 + int(torch.randint(classes - 1, (1,), generator=gen))) % classes
    rows = torch.nonzero(y == source).flatten()
    if len(rows) == 0:
        raise ValueError(f"y has no sample of the drawn source class {source} (seed {seed})")
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[0]
    return Victim(int(rows[pick]), source, target)


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of the vector ``v`` onto the probability simplex."""
    u = v.sort(descending=True).values
    css = u.cumsum(0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - css / k > 0).flatten()[-1])
    return (v - css[rho] / (rho + 1)).clamp_min(0)


class FeaturePoisoning(Attack):
    """Clean-label, sample-targeted poisoning in a feature space (CLEAR's §5 attacks): a few
    training samples of the target class ("bases") are perturbed, labels kept, so that their
    ``features`` pull one test-time victim sample towards the target class when a model on those
    features (the head, in the transfer-learning setting) is trained on them. Subclasses define
    the objective: :class:`FeatureCollision`, :class:`ConvexPolytope`,
    :class:`BullseyePolytope`.

    Optimisation (one loop for all three): Adam at a constant ``lr`` on the perturbations of all
    poisons together, each step followed by projection onto the budget (L-inf: clip each
    coordinate to ``[-budget, budget]``; L2: rescale each poison's perturbation to norm at most
    ``budget``) and then clamping into ``clamp`` (if not None). A hard budget rather than
    Shafahi's proximity penalty alone, so the poisons' distance to their bases is guaranteed
    (:class:`FeatureCollision`'s ``beta`` adds that penalty inside the budget). Deterministic.

    Args:
        features: ``x -> [N, D]``, e.g. a frozen network up to the head. Only the poisons get
            gradients (``torch.autograd.grad``): no parameter's ``.grad`` is touched. If it is an
            ``nn.Module``, or ``module`` is given, that module runs in eval mode with its
            parameters' ``requires_grad`` off during the attack, and every module's mode and
            every flag are restored afterwards; a plain callable is run as it is.
        budget: perturbation bound (> 0) per poison, in ``norm``.
        norm: ``"linf"`` or ``"l2"``.
        steps, lr: Adam steps and learning rate. Default lr ``None``: ``budget / 10``, so a
            poison can cross its budget ball in a handful of steps and settle in the rest.
        clamp: ``(low, high)`` valid input range (default (0, 1), images), or None for inputs
            with no range (e.g. Swiss-roll points). Bases are expected inside it.
        bases: how :meth:`poison_for` picks the base rows among those of the target class:
            ``"nearest"`` (default: those whose features are closest to the victim's; the most
            effective bases, as the attacks' authors also chose bases of the target class close
            enough to collide) or ``"random"`` (drawn with ``seed``).
        module: see ``features``.
    """

    images = False

    def __init__(self, features: Callable[[Tensor], Tensor], *, budget: float,
                 norm: str = "linf", steps: int = 200, lr: Optional[float] = None,
                 clamp: Optional[Tuple[float, float]] = (0.0, 1.0), bases: str = "nearest",
                 module: Optional[nn.Module] = None):
        if not callable(features):
            raise TypeError(f"features must be callable (x -> [N, D]), got "
                            f"{type(features).__name__}")
        if (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                or not math.isfinite(budget) or budget <= 0):
            raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool)
                               or not math.isfinite(lr) or lr <= 0):
            raise ValueError(f"lr must be a finite number > 0 (or None), got {lr!r}")
        if clamp is not None and (len(clamp) != 2 or not clamp[0] < clamp[1]):
            raise ValueError(f"clamp must be (low, high) with low < high, or None, got {clamp!r}")
        if bases not in ("nearest", "random"):
            raise ValueError(f"bases must be 'nearest' or 'random', got {bases!r}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module or None, got {type(module).__name__}")
        self.features, self.budget, self.norm, self.steps = features, float(budget), norm, steps
        self.lr = self.budget / 10 if lr is None else float(lr)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.bases = bases
        self.coeffs: Optional[Tensor] = None  # the last perturb's c (polytopes), else None
        self.module = module if module is not None else (
            features if isinstance(features, nn.Module) else None)

    # -- no trigger: the victim is attacked as it is -------------------------------------------
    def apply(self, X: Tensor) -> Tensor:
        _check_inputs(X, self.images)
        return X.clone()

    def poison(self, X: Tensor, y: Tensor, rate: float, target: int, seed: int = 0) -> Poisoned:
        raise TypeError(f"{type(self).__name__} poisons against one victim sample: use "
                        f"poison_for(X, y, victim_x, target, n_poisons, seed)")

    # -- the objective (subclasses) ------------------------------------------------------------
    def _init_coeffs(self, k: int, like: Tensor) -> Optional[Tensor]:
        return None

    def _update_coeffs(self, fp: Tensor, ft: Tensor, coeffs: Optional[Tensor]):
        return coeffs

    def _objective(self, fp: Tensor, ft: Tensor, coeffs: Optional[Tensor], delta: Tensor) -> Tensor:
        """The loss of poison features ``fp`` [k, D] against the victim's ``ft`` [D]."""
        raise NotImplementedError

    def objective(self, poisons: Tensor, victim_x: Tensor) -> float:
        """The attack's feature objective at ``poisons`` (for the polytope, with its best
        simplex coefficients, resp. uniform ones), without any proximity term."""
        _check_inputs(poisons, self.images)
        victim_x = self._victim(victim_x, poisons.shape[1:])
        with torch.no_grad(), self._frozen():
            fp, ft = self._feat(poisons), self._feat(victim_x)[0]
            coeffs = self._init_coeffs(len(fp), fp)
            for _ in range(100):
                coeffs = self._update_coeffs(fp, ft, coeffs)
            return float(self._objective(fp, ft, coeffs, torch.zeros_like(poisons)))

    # -- the shared optimisation ---------------------------------------------------------------
    def _feat(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if not isinstance(f, Tensor) or f.dim() < 1 or f.shape[0] != x.shape[0]:
            raise ValueError(f"features must map [N, ...] inputs to [N, D] tensors, got "
                             f"{type(f).__name__} {tuple(getattr(f, 'shape', ()))}")
        return f.flatten(1)

    class _Frozen:
        def __init__(self, module):
            self.module = module

        def __enter__(self):
            m = self.module
            if m is not None:
                self.modes = {s: s.training for s in m.modules()}
                self.flags = {p: p.requires_grad for p in m.parameters()}
                m.eval()
                for p in self.flags:
                    p.requires_grad_(False)

        def __exit__(self, *exc):
            if self.module is not None:
                for s, training in self.modes.items():
                    s.train(training)
                for p, flag in self.flags.items():
                    p.requires_grad_(flag)
            return False

    def _frozen(self):
        return FeaturePoisoning._Frozen(self.module)

    def _victim(self, victim_x, shape) -> Tensor:
        """``victim_x`` as a batch of one sample of ``shape``."""
        _check_inputs(victim_x, self.images)
        if victim_x.shape == shape:
            victim_x = victim_x.unsqueeze(0)
        if victim_x.shape != (1, *shape):
            raise ValueError(f"victim_x must be one sample shaped {tuple(shape)} (or [1, ...]), "
                             f"got {tuple(victim_x.shape)}")
        return victim_x.detach()

    def _project(self, delta: Tensor, bases: Tensor) -> Tensor:
        if self.norm == "linf":
            delta = delta.clamp(-self.budget, self.budget)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            scale = (self.budget / norms).clamp(max=1).view(-1, *[1] * (delta.dim() - 1))
            delta = delta * scale
        if self.clamp is not None:
            delta = (bases + delta).clamp(*self.clamp) - bases
        return delta

    def perturb(self, bases: Tensor, victim_x: Tensor) -> Tensor:
        """The poisons: ``bases`` [k, ...] perturbed within the budget (and ``clamp``) to
        minimise the objective against ``victim_x`` ([...] or [1, ...]); a new tensor."""
        _check_inputs(bases, self.images)
        if bases.dim() < 2 or len(bases) < 1:
            raise ValueError(f"bases must be [k, ...] with k >= 1, got {tuple(bases.shape)}")
        victim_x = self._victim(victim_x, bases.shape[1:])
        b = bases.detach()
        with self._frozen(), torch.enable_grad():
            with torch.no_grad():
                ft = self._feat(victim_x.detach())[0]
            delta = torch.zeros_like(b, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=self.lr)
            coeffs = self._init_coeffs(len(b), ft)
            for _ in range(self.steps):
                fp = self._feat(b + delta)
                coeffs = self._update_coeffs(fp.detach(), ft, coeffs)
                loss = self._objective(fp, ft, coeffs, delta)
                (delta.grad,) = torch.autograd.grad(loss, delta)
                opt.step()
                with torch.no_grad():
                    delta.copy_(self._project(delta, b))
        self.coeffs = coeffs
        return (b + delta.detach()).to(bases.dtype)

    def poison_for(self, X: Tensor, y: Tensor, victim_x: Tensor, target: int,
                   n_poisons: int = 1, seed: int = 0) -> Poisoned:
        """Poison the training set ``(X, y)`` against ``victim_x`` (one test-time sample, not in
        ``X``): ``n_poisons`` rows of class ``target`` (the bases, picked as ``bases`` says,
        ``seed`` drawing random ones) are *replaced* by their poisons, labels kept (clean-label),
        so the set keeps its size. ``index``: the poisoned rows, sorted. ``X``, ``y`` are not
        modified."""
        _check_inputs(X, self.images)
        if X.dim() < 2:
            raise ValueError(f"X must be [N, ...] samples, got shape {tuple(X.shape)}")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != X.shape[0]:
            raise ValueError("y must be a 1-D label tensor with one label per row of X")
        if not isinstance(target, int) or isinstance(target, bool):
            raise TypeError(f"target must be an int class index, got {type(target).__name__}")
        if not isinstance(n_poisons, int) or isinstance(n_poisons, bool) or n_poisons < 1:
            raise ValueError(f"n_poisons must be an int >= 1, got {n_poisons!r}")
        victim_x = self._victim(victim_x, X.shape[1:])
        cand = torch.nonzero(y == target).flatten()
        if len(cand) < n_poisons:
            raise ValueError(f"{type(self).__name__}: y has {len(cand)} samples of target class "
                             f"{target}, fewer than n_poisons={n_poisons}")
        if self.bases == "random":
            gen = torch.Generator().manual_seed(seed)
            idx = cand[torch.randperm(len(cand), generator=gen)[:n_poisons]]
        else:
            with torch.no_grad(), self._frozen():
                d = (self._feat(X[cand]) - self._feat(victim_x)).norm(dim=1)
            idx = cand[d.argsort(stable=True)[:n_poisons]]
        idx = idx.sort().values
        Xp = X.clone()
        Xp[idx] = self.perturb(X[idx], victim_x)
        return Poisoned(Xp, y.clone(), idx)


class FeatureCollision(FeaturePoisoning):
    """Feature Collision ("Poison Frogs", Shafahi et al. 2018): each poison independently
    minimises ``||f(p) - f(t)||^2 + beta * ||p - b||^2`` within the budget (see
    :class:`FeaturePoisoning`; ``beta`` default 0: the hard budget alone keeps the poison near
    its base, Shafahi's penalty is optional on top)."""

    def __init__(self, features: Callable[[Tensor], Tensor], *, budget: float,
                 norm: str = "linf", steps: int = 200, lr: Optional[float] = None,
                 beta: float = 0.0, clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
                 bases: str = "nearest", module: Optional[nn.Module] = None):
        super().__init__(features, budget=budget, norm=norm, steps=steps, lr=lr, clamp=clamp,
                         bases=bases, module=module)
        if (not isinstance(beta, (int, float)) or isinstance(beta, bool)
                or not math.isfinite(beta) or beta < 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.beta = float(beta)

    def _objective(self, fp, ft, coeffs, delta):
        loss = ((fp - ft) ** 2).sum()
        if self.beta:
            loss = loss + self.beta * (delta ** 2).sum()
        return loss


class ConvexPolytope(FeaturePoisoning):
    """Convex Polytope (Zhu et al. 2019): the poisons' features surround the victim's:
    minimise ``||f(t) - sum_j c_j f(p_j)||^2 / ||f(t)||^2`` over the poisons (within the budget)
    and ``c`` on the simplex (``c >= 0``, ``sum c = 1``; starts uniform), alternating: before
    each Adam step on the poisons, ``coeff_steps`` projected-gradient steps on ``c`` (step
    ``1 / L``, ``L`` the quadratic's Lipschitz constant). Single network (no ensemble)."""

    def __init__(self, features: Callable[[Tensor], Tensor], *, budget: float,
                 norm: str = "linf", steps: int = 200, lr: Optional[float] = None,
                 coeff_steps: int = 5, clamp: Optional[Tuple[float, float]] = (0.0, 1.0),
                 bases: str = "nearest", module: Optional[nn.Module] = None):
        super().__init__(features, budget=budget, norm=norm, steps=steps, lr=lr, clamp=clamp,
                         bases=bases, module=module)
        if not isinstance(coeff_steps, int) or isinstance(coeff_steps, bool) or coeff_steps < 0:
            raise ValueError(f"coeff_steps must be an int >= 0, got {coeff_steps!r}")
        self.coeff_steps = coeff_steps

    def _init_coeffs(self, k, like):
        return torch.full((k,), 1.0 / k, dtype=like.dtype, device=like.device)

    def _update_coeffs(self, fp, ft, coeffs):
        norm2 = (ft ** 2).sum().clamp_min(1e-12)
        lip = 2 * torch.linalg.matrix_norm(fp @ fp.T, ord=2) / norm2
        if float(lip) <= 0:
            return coeffs
        for _ in range(self.coeff_steps):
            grad = 2 * fp @ (coeffs @ fp - ft) / norm2
            coeffs = _project_simplex(coeffs - grad / lip)
        return coeffs

    def _objective(self, fp, ft, coeffs, delta):
        return ((ft - coeffs @ fp) ** 2).sum() / (ft ** 2).sum().clamp_min(1e-12)


class BullseyePolytope(ConvexPolytope):
    """Bullseye Polytope (Aghakhani et al. 2021): :class:`ConvexPolytope` with ``c`` fixed to
    ``1/k``: the poisons' mean feature is pulled onto the victim's."""

    def __init__(self, features: Callable[[Tensor], Tensor], *, budget: float,
                 norm: str = "linf", steps: int = 200, lr: Optional[float] = None,
                 clamp: Optional[Tuple[float, float]] = (0.0, 1.0), bases: str = "nearest",
                 module: Optional[nn.Module] = None):
        super().__init__(features, budget=budget, norm=norm, steps=steps, lr=lr, coeff_steps=0,
                         clamp=clamp, bases=bases, module=module)

    def _update_coeffs(self, fp, ft, coeffs):
        return coeffs
