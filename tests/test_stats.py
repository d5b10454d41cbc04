"""Activation statistics: per channel and per neuron against torch on the whole data, rows by
start_dim (a row per token for [B, T, H]), masks of padding; on each device (CUDA where there is
a GPU: ``pytest -m cuda``), from CPU data."""
import copy
import warnings

import pytest
import torch
from torch import nn

import medic_fast as mf
from medic_fast.ops import _validate
from medic_fast.stats import LayerStats
from medic_fast.zoo import models
from shared import DEVICES, digits, double_backward_grads

torch.set_num_threads(1)


def _exact_fp32(monkeypatch, device):
    """No TF32 in cuDNN convolutions on CUDA (allowed by default), so CUDA statistics can be
    held to the CPU's at float32 tolerances."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("per", ["channel", "neuron"])
@pytest.mark.parametrize("device", DEVICES)
def test_collect_stats_match_torch_on_full_data(device, per, monkeypatch):
    """Statistics of a model on ``device`` over CPU data (batches follow the model) against
    torch on the whole data at once; on CUDA also against the CPU's statistics."""
    _exact_fp32(monkeypatch, device)
    torch.manual_seed(0)
    model = models.DigitsCNN((4, 6, 8)).to(device)
    model.train()
    before = copy.deepcopy(model.state_dict())
    X, y = digits(203)
    layers = ["features.0", "features.4", "features.7"]
    stats = mf.collect_stats(model, (X, y), layers, per=per, batch_size=50)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(t.device.type == device and t.dtype == torch.float32
               for t in stats.mean + stats.std)
    ref = copy.deepcopy(model).eval()
    acts, _ = double_backward_grads(ref, layers, X.to(device), y.to(device))
    assert stats.layers == layers and stats.count == 203 and stats.per == per
    for a, mu, sd in zip(acts, stats.mean, stats.std):
        dims = [0, 2, 3] if per == "channel" else [0]
        rsd, rmu = torch.std_mean(a.double(), dims, correction=0)
        torch.testing.assert_close(mu, rmu.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd, rsd.float(), rtol=1e-5, atol=1e-6)
    if device != "cpu":
        cpu = mf.collect_stats(copy.deepcopy(model).cpu(), (X, y), layers, per=per, batch_size=50)
        for a, b in zip(stats.mean + stats.std, cpu.mean + cpu.std):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="per must be"):
        mf.collect_stats(model, (X, y), layers, per="row")


class _Tokens(nn.Module):
    """[B, T, 4] -> a [B, T, 6] hidden layer -> logits of the mean token."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)).mean(1))


@pytest.mark.parametrize("per", ["channel", "neuron"])
@pytest.mark.parametrize("device", DEVICES)
def test_collect_stats_on_tokens_are_per_feature(device, per):
    """[B, T, H] outputs: one statistic per hidden unit over all tokens (rows = [B, T]), also
    for per="neuron"; with a mask (computed on the model's device from its inputs), over the
    real tokens only."""
    torch.manual_seed(0)
    model = _Tokens().to(device)
    X, y = torch.randn(37, 5, 4) * 2 + 1, torch.randint(3, (37,))
    stats = mf.collect_stats(model, (X, y), ["hidden"], per=per, batch_size=10)
    assert stats.mean[0].device.type == device
    with torch.no_grad():
        h = model.hidden(X.to(device)).double()
    rsd, rmu = torch.std_mean(h.reshape(-1, 6), 0, correction=0)
    assert stats.mean[0].shape == (6,) and stats.count == 37
    torch.testing.assert_close(stats.mean[0], rmu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.std[0], rsd.float(), rtol=1e-5, atol=1e-6)
    lengths = torch.randint(1, 6, (37,))
    X[torch.arange(5)[None, :] >= lengths[:, None]] = 0.0  # padding: all-zero tokens

    def real(x):
        return x.abs().sum(-1) > 0

    masked = mf.collect_stats(model, (X, y), ["hidden"], per=per, mask_fn=real, batch_size=10)
    with torch.no_grad():
        Xd = X.to(device)
        h = model.hidden(Xd).double()[real(Xd)]
    rsd, rmu = torch.std_mean(h, 0, correction=0)
    torch.testing.assert_close(masked.mean[0], rmu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.std[0], rsd.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"mask has shape \(10, 4\) but layer 'hidden' has rows"):
        mf.collect_stats(model, (X, y), ["hidden"], mask_fn=lambda x: real(x)[:, 1:],
                         batch_size=10)
    per_position = mf.collect_stats(model, (X, y), ["hidden"], start_dim=1, batch_size=10)
    assert per_position.mean[0].shape == (5,)


def test_layer_stats_refuse_negative_std_and_warn_once_on_zero(monkeypatch):
    """The check a Cloner's (and sanitize's) statistics get once, at construction: not per
    training step, and on any device."""
    monkeypatch.setattr(_validate, "_zero_std_warned", False)
    mean = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match=r"^std of layer 'b' must be >= 0 \(a standard "
                       r"deviation\), got a minimum of -0.5$"):
        LayerStats(["a", "b"], mean, [torch.ones(3), torch.tensor([1.0, -0.5])], "channel", 4)
    with pytest.raises(ValueError, match="one mean and one std per layer, got 2 layers, 2 means "
                       "and 1 stds"):
        LayerStats(["a", "b"], mean, [torch.ones(3)], "channel", 4)
    with pytest.warns(RuntimeWarning, match=r"^std of layer 'b' is 0 at 1 of 2 entries: eps "
                      "alone divides there"):
        stats = LayerStats(["a", "b"], mean, [torch.ones(3), torch.tensor([1.0, 0.0])],
                           "channel", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats.to("cpu")  # once per process
        LayerStats(["a"], mean[:1], [torch.zeros(3)], "channel", 4)


def test_collect_stats_takes_input_only_batches_and_dicts():
    """Statistics need no labels: a loader of inputs alone works; dict batches are passed to the
    model as keyword arguments."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = models.MLP(3, 2, (4,))
    X = torch.randn(20, 3)
    ref = mf.collect_stats(model, (X, torch.zeros(20, dtype=torch.long)), ["layers.0"])
    only_x = mf.collect_stats(model, DataLoader(X, batch_size=7), ["layers.0"])
    torch.testing.assert_close(only_x.mean[0], ref.mean[0])
    dicts = DataLoader([{"x": x} for x in X], batch_size=7)
    from_dicts = mf.collect_stats(model, dicts, ["layers.0"])
    torch.testing.assert_close(from_dicts.mean[0], ref.mean[0])
    assert from_dicts.count == 20


def test_collect_stats_leaves_the_global_generator_as_it_was():
    """Iterating a DataLoader draws a seed from the global generator: after collect_stats (on
    tensors, or a user's shuffling DataLoader) ``torch.rand`` gives what it would have given
    without the call."""
    model = models.DigitsCNN((4, 6, 8))
    X, y = torch.rand(40, 1, 8, 8), torch.randint(10, (40,))
    for data in ((X, y), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                                     batch_size=16, shuffle=True)):
        seed = int(torch.randint(2 ** 31, ()))
        torch.manual_seed(seed)
        expected = torch.rand(5)
        torch.manual_seed(seed)
        mf.collect_stats(model, data, batch_size=16)
        assert torch.equal(torch.rand(5), expected), type(data).__name__


@pytest.mark.parametrize("per", ["channel", "neuron"])
def test_stat_shapes_are_those_of_collected_statistics(per):
    """stat_shapes (what a checkpoint's statistics are checked against) gives the shapes of
    collect_stats' statistics, for conv maps, BatchNorm outputs and token rows."""
    from medic_fast.stats import stat_shapes

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(2),
                          nn.Linear(36, 5))
    X = torch.randn(12, 1, 8, 8)
    layers = ["0", "1", "3"]
    stats = mf.collect_stats(model, (X, torch.zeros(12, dtype=torch.long)), layers, per=per)
    assert stat_shapes(model, X[:4], layers, per) == [m.shape for m in stats.mean]
