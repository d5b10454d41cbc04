"""Activation statistics: per channel and per neuron against torch on the whole data, rows by
start_dim (a row per token for [B, T, H]), masks of padding."""
import copy

import pytest
import torch
from torch import nn

import medic_fast as mf
from medic_fast.zoo import models
from shared import digits, double_backward_grads

torch.set_num_threads(1)


@pytest.mark.parametrize("per", ["channel", "neuron"])
def test_collect_stats_match_torch_on_full_data(per):
    torch.manual_seed(0)
    model = models.DigitsCNN((4, 6, 8))
    model.train()
    before = copy.deepcopy(model.state_dict())
    X, y = digits(203)
    layers = ["features.0", "features.4", "features.7"]
    stats = mf.collect_stats(model, (X, y), layers, per=per, batch_size=50)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ref = copy.deepcopy(model).eval()
    acts, _ = double_backward_grads(ref, layers, X, y)
    assert stats.layers == layers and stats.count == 203 and stats.per == per
    for a, mu, sd in zip(acts, stats.mean, stats.std):
        dims = [0, 2, 3] if per == "channel" else [0]
        rsd, rmu = torch.std_mean(a.double(), dims, correction=0)
        torch.testing.assert_close(mu, rmu.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd, rsd.float(), rtol=1e-5, atol=1e-6)
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
def test_collect_stats_on_tokens_are_per_feature(per):
    """[B, T, H] outputs: one statistic per hidden unit over all tokens (rows = [B, T]), also
    for per="neuron"; with a mask, over the real tokens only."""
    torch.manual_seed(0)
    model = _Tokens()
    X, y = torch.randn(37, 5, 4) * 2 + 1, torch.randint(3, (37,))
    stats = mf.collect_stats(model, (X, y), ["hidden"], per=per, batch_size=10)
    with torch.no_grad():
        h = model.hidden(X).double()
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
        h = model.hidden(X).double()[real(X)]
    rsd, rmu = torch.std_mean(h, 0, correction=0)
    torch.testing.assert_close(masked.mean[0], rmu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.std[0], rsd.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"mask has shape \(10, 4\) but layer 'hidden' has rows"):
        mf.collect_stats(model, (X, y), ["hidden"], mask_fn=lambda x: real(x)[:, 1:],
                         batch_size=10)
    per_position = mf.collect_stats(model, (X, y), ["hidden"], start_dim=1, batch_size=10)
    assert per_position.mean[0].shape == (5,)
