"""``patch``: CLEAR's mitigation (DESIGN.md §2). Fine-tune only the last Linear layer on clean
samples plus the pocket samples labelled with their anchors' class; the input model is kept."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medic_fast._utils import check_int, check_module, check_number, device_of, eval_mode
from medic_fast.capture import ActivationCapture
from medic_fast.clear import graph
from medic_fast.clear.detect import ScanReport, working_dtype
from medic_fast.data import labelled_batches, make_loader
from medic_fast.stats import nonfinite_error
from medic_fast.train import fit

__all__ = ["patch"]


@torch.no_grad()
def _inputs_of(model: nn.Module, name: str, run, xs) -> Tensor:
    """The inputs module ``name`` of ``model`` receives while ``run`` (``model`` or a part of it
    sharing its modules) processes each tensor of ``xs``, concatenated."""
    out = []
    with ActivationCapture(model, [name], inputs=True) as cap:
        for x in xs:
            run(x)
            out.append(cap.outputs()[0])
    return torch.cat(out)


def patch(model: nn.Module, report: ScanReport, data, *, epochs: int = 5, lr: float = 0.1,
          per_class: int = 50, batch_size: int = 32, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose last Linear layer is fine-tuned (Adam, constant ``lr``,
    ``epochs``) on at most ``per_class`` clean samples per class of ``data`` plus ``report``'s
    pocket samples with their source labels. Pocket samples live at ``report.cut``; they go
    through the model from there to the last Linear layer. Everything before that layer is
    frozen, so its inputs are computed once, in eval mode. The layer is fine-tuned in float32
    (float64 for a float64 model) and written back in the model's dtype. Clean samples whose
    inputs to that layer are not finite raise ``ValueError`` naming the first (its index in
    ``data``) and whether its inputs or a layer's output are not."""
    check_module("model", model)
    if not isinstance(report, ScanReport):
        raise TypeError("report must be the ScanReport returned by scan, got "
                        f"{type(report).__name__}")
    for name, v in (("epochs", epochs), ("per_class", per_class), ("batch_size", batch_size)):
        check_int(name, v)
    check_number("lr", lr, positive=True)
    new = copy.deepcopy(model)
    linears = graph.linear_modules(new)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to fine-tune")
    last_name = linears[-1]
    last = new.get_submodule(last_name)
    device = device_of(new)
    with eval_mode(new):
        xs, ys, index, seen, offset = [], [], [], {}, 0
        for x, y in labelled_batches(data):
            keep = []
            for i, label in enumerate(y.tolist()):
                if seen.get(label, 0) < per_class:
                    seen[label] = seen.get(label, 0) + 1
                    keep.append(i)
            if keep:
                xs.append(x[keep].to(device))
                ys.append(y[keep].long())
                index += [offset + i for i in keep]
            offset += len(y)
        if not xs:
            raise ValueError("data is empty")
        z = [_inputs_of(new, last_name, new, xs)]
        bad = ~torch.isfinite(z[0].flatten(1)).all(1)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise nonfinite_error(new, torch.cat(xs)[j:j + 1], index[j])
        labels = [torch.cat(ys)]
        if len(report.pocket_samples):
            head = graph.split(new, report.cut)
            z.append(_inputs_of(new, last_name, head, [report.pocket_samples.to(device)]))
            labels.append(report.pocket_sources.cpu())
    z, labels = torch.cat(z), torch.cat(labels).to(device)
    if int(labels.min()) < 0 or int(labels.max()) >= last.out_features:
        raise ValueError(f"data has labels outside [0, {last.out_features}), the model's classes")

    dtype = working_dtype(last.weight.dtype)
    layer = copy.deepcopy(last).to(dtype).requires_grad_(True)

    def objective(x, y):
        ce = F.cross_entropy(layer(x), y)
        return ce, {}

    loader = make_loader((z.to(dtype), labels), batch_size=batch_size, shuffle=True, seed=seed)
    with torch.enable_grad():
        fit(layer, loader, objective, epochs=epochs, lr=lr, schedule="constant", seed=seed,
            device=device)
    bad = [n for n, v in layer.named_parameters() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"patch: fine-tuning {last_name!r} gave non-finite {', '.join(bad)} "
                         f"(lr={lr} may be too large for this model); the model is unchanged, "
                         "try a smaller lr")
    with torch.no_grad():
        last.weight.copy_(layer.weight)
        if last.bias is not None:
            last.bias.copy_(layer.bias)
    return new
