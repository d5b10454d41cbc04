"""``patch``: CLEAR's mitigation (DESIGN.md §2). Fine-tune only the last Linear layer on clean
samples plus the pocket samples labelled with their anchors' class; the input model is kept."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from medic_fast.clear import graph
from medic_fast._utils import eval_mode
from medic_fast.clear._data import batches, inputs_of
from medic_fast._utils import device_of
from medic_fast.clear.detect import ScanReport

__all__ = ["patch"]


def patch(model: nn.Module, report: ScanReport, data, *, epochs: int = 5, lr: float = 0.1,
          per_class: int = 50, batch_size: int = 32, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose last Linear layer is fine-tuned (Adam, ``lr``, ``epochs``) on at
    most ``per_class`` clean samples per class of ``data`` plus ``report``'s pocket samples with
    their source labels. Pocket samples live at ``report.cut``; they go through the model from
    there to the last Linear layer. Everything before that layer is frozen, so its inputs are
    computed once, in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(report, ScanReport):
        raise TypeError("report must be the ScanReport returned by scan, got "
                        f"{type(report).__name__}")
    for name, v in (("epochs", epochs), ("per_class", per_class), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    new = copy.deepcopy(model)
    linears = graph.linear_modules(new)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to fine-tune")
    last = new.get_submodule(linears[-1])
    device = device_of(new)
    with eval_mode(new):
        xs, ys, seen = [], [], {}
        for x, y in batches(data):
            keep = []
            for i, label in enumerate(y.tolist()):
                if seen.get(label, 0) < per_class:
                    seen[label] = seen.get(label, 0) + 1
                    keep.append(i)
            if keep:
                xs.append(x[keep].to(device))
                ys.append(y[keep].long())
        if not xs:
            raise ValueError("data is empty")
        z = [inputs_of(last, new, xs)]
        labels = [torch.cat(ys)]
        if len(report.pocket_samples):
            head = graph.split(new, report.cut)
            z.append(inputs_of(last, head, [report.pocket_samples.to(device)]))
            labels.append(report.pocket_sources.cpu())
    z, labels = torch.cat(z), torch.cat(labels).to(device)
    if int(labels.min()) < 0 or int(labels.max()) >= last.out_features:
        raise ValueError(f"data has labels outside [0, {last.out_features}), the model's classes")

    layer = copy.deepcopy(last).requires_grad_(True)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for b in torch.randperm(len(z), generator=gen).split(batch_size):
                b = b.to(device)
                opt.zero_grad()
                F.cross_entropy(layer(z[b]), labels[b]).backward()
                opt.step()
    with torch.no_grad():
        last.weight.copy_(layer.weight)
        if last.bias is not None:
            last.bias.copy_(layer.bias)
    return new
