"""Activation capture: outputs, inputs, tuple selection, in-place copies, and the teacher's
gradients from one backward to the hooked tensors only (on each device: CUDA where there is a
GPU, ``pytest -m cuda``)."""
import copy

import pytest
import torch
from torch import nn

from medic_fast.capture import (ActivationCapture, default_layers, default_plane,
                                inplace_modified, resolve_layers, teacher_signals)
from medic_fast.zoo import models
from medic_fast.zoo.transformer import TinyTransformer
from shared import DEVICES, double_backward_grads, frozen

torch.set_num_threads(1)


@pytest.mark.parametrize("make,shape", [(lambda: models.DigitsCNN((4, 6, 8)), (5, 1, 8, 8)),
                                        (lambda: models.wrn16_1(), (3, 3, 8, 8)),
                                        (lambda: models.MLP(3, 4, (8, 7, 6, 5)), (9, 3))],
                         ids=["digits_cnn", "wrn16_1", "mlp"])
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_signals_match_double_backward(device, make, shape, monkeypatch):
    if device == "cuda":  # the same float32 convolutions in both computations (cuDNN allows TF32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # and atomics by default)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    model = make()
    for m in model.modules():  # non-trivial BatchNorm statistics in eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    layers = default_layers(model) or [n for n, m in model.named_modules()
                                       if isinstance(m, (nn.Linear, nn.ReLU))]
    model.to(device)
    x, y = torch.randn(shape).to(device), torch.randint(0, 4, (shape[0],)).to(device)
    teacher = frozen(model)
    with ActivationCapture(teacher, layers, differentiable=True) as cap:
        acts, grads = teacher_signals(teacher, cap, x, y)
    ref_acts, ref_grads = double_backward_grads(model, layers, x, y)
    assert len(acts) == len(layers)
    for a, g, ra, rg in zip(acts, grads, ref_acts, ref_grads):
        torch.testing.assert_close(a, ra)
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-7)
        assert a.device == g.device == x.device
        assert not a.requires_grad and g.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_backward_reaches_hooked_tensors_only():
    """No parameter gradient and no input gradient are computed: the backward stops at the
    first hooked tensor, so the convolution before it never runs its backward."""
    model = frozen(models.DigitsCNN((4, 4, 4)))
    calls = []
    model.features[0].register_full_backward_hook(lambda *a: calls.append("conv0"))
    layers = ["features.1", "features.3"]
    x = torch.rand(2, 1, 8, 8)
    with ActivationCapture(model, layers, differentiable=True) as cap:
        teacher_signals(model, cap, x, torch.tensor([1, 2]))
    assert calls == [] and x.grad is None


def test_inplace_outputs_are_copied():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                        nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 4, (6,))
    teacher = frozen(net)
    assert inplace_modified(teacher, ["0", "1"], x) == ["1"]
    with ActivationCapture(teacher, ["0", "1"], differentiable=True) as cap:
        teacher(x)
        with pytest.raises(RuntimeError, match="modified in place"):
            cap.outputs()
    with ActivationCapture(teacher, ["0", "1"], differentiable=True, copy=["1"]) as cap:
        acts, grads = teacher_signals(teacher, cap, x, y)
    plain = copy.deepcopy(net)
    plain[2] = nn.ReLU()
    ref_acts, ref_grads = double_backward_grads(plain, ["0", "1"], x, y)
    for a, g, ra, rg in zip(acts, grads, ref_acts, ref_grads):
        torch.testing.assert_close(a, ra)
        torch.testing.assert_close(g, rg)
    assert (acts[1] < 0).any()  # the BatchNorm output, not the rectified one


def test_capture_errors():
    model = models.DigitsCNN((4, 4, 4))
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        resolve_layers(model, ["nope"])
    with pytest.raises(TypeError, match="sequence of module names"):
        resolve_layers(model, "features.0")
    with pytest.raises(ValueError, match="more than once"):
        resolve_layers(model, ["features.0", "features.0"])
    with pytest.raises(ValueError, match="^Linear has no conv or BatchNorm layer, no "
                       "nn.ModuleList of repeated blocks and no hidden Linear layer to hook by "
                       r"default; pass layers=\[...\] with names"):
        resolve_layers(nn.Linear(4, 3), None)
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, shared)
    with ActivationCapture(twice, ["0"]) as cap, pytest.raises(RuntimeError, match="ran twice"):
        twice(torch.randn(2, 3))
    with ActivationCapture(model, ["features.0"]) as cap, \
            pytest.raises(RuntimeError, match="did not run"):
        cap.outputs()
    with pytest.raises(ValueError, match="differentiable"):
        teacher_signals(model, ActivationCapture(model, ["features.0"]), torch.rand(1, 1, 8, 8),
                        torch.tensor([0]))
    assert not model.features[0]._forward_hooks  # hooks removed on exit


def test_capture_of_inputs():
    torch.manual_seed(0)
    model = models.MLP(3, 4, (8, 7))
    x = torch.randn(6, 3)
    with ActivationCapture(model, ["layers.2", "layers.4"], inputs=True) as cap, \
            torch.no_grad():
        model(x)
        first, last = cap.outputs()
        torch.testing.assert_close(first, model.layers[:2](x))
        torch.testing.assert_close(last, model.layers[:4](x))
    with pytest.raises(ValueError, match="outputs only"):
        ActivationCapture(model, ["layers.2"], inputs=True, differentiable=True)


class _Wrap(nn.Module):
    """A pass-through wrapper (as DDP): only ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class _ListMLP(nn.Module):
    """An MLP whose Linear layers, the output one too, sit in one nn.ModuleList."""

    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)])

    def forward(self, x):
        for fc in self.fc[:-1]:
            x = torch.relu(fc(x))
        return self.fc[-1](x)


class _Attention(nn.Module):
    """Attention without a block list: nn.MultiheadAttention's out_proj is never called."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.head(torch.relu(self.mlp(h)).mean(1))


@pytest.mark.parametrize("make,x,kind,names", [
    (lambda: models.DigitsCNN((4, 4, 4)), torch.rand(2, 1, 8, 8), "conv+bn",
     ["features.0", "features.1", "features.3", "features.4", "features.7", "features.8"]),
    (lambda: models.MLP(3, 4, (8, 7, 6)), torch.rand(2, 3), "hidden linear",
     ["layers.0", "layers.2", "layers.4"]),
    (lambda: _Wrap(TinyTransformer(d_model=8, depth=2, heads=2, max_len=8)),
     torch.randint(1, 32, (2, 8)), "blocks", ["blocks.0", "blocks.1"]),
    (_ListMLP, torch.rand(2, 4), "hidden linear", ["fc.0", "fc.1"]),
    (_Attention, torch.rand(2, 5, 8), "hidden linear", ["mlp"]),
], ids=["cnn", "mlp", "wrapped_transformer", "list_mlp", "attention"])
def test_default_plane_for_any_architecture(make, x, kind, names):
    """conv+bn first (the Linear layers of a CNN are not added); else the repeated blocks
    (canonical names through a wrapper); else every Linear but the last, never a list of
    Linear leaves as blocks nor the out_proj that nn.MultiheadAttention does not call. The
    default hooks all run in a forward."""
    model = make()
    assert default_plane(model) == (kind, names)
    assert resolve_layers(model, None) == names
    assert default_layers(model) == (names if kind == "conv+bn" else [])
    inner = model.module if isinstance(model, _Wrap) else model
    with ActivationCapture(inner, None) as cap, torch.no_grad():
        inner(x)
        assert len(cap.outputs()) == len(names)
