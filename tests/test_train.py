"""The training loop and the evaluator: ACC/ASR, schedules, parts logged per epoch."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import medic_fast as mf
from medic_fast.data import make_loader
from medic_fast.train import evaluate_loader, fit
from medic_fast.zoo import attacks

torch.set_num_threads(1)


class _Oracle(nn.Module):
    """Predicts the class written in pixel (0, 0) * 10, or class 7 when the corner is lit."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 10).round().long()
        cls = torch.where(x[:, 0, -1, -1] > 0.5, torch.full_like(cls, 7), cls)
        return nn.functional.one_hot(cls, 10).float()


def test_evaluate_acc_and_asr():
    y = torch.tensor([0, 1, 2, 3, 7, 7, 5, 6])
    X = torch.zeros(8, 1, 4, 4)
    X[:, 0, 0, 0] = y / 10
    X[1, 0, 0, 0] = 0.9  # one wrong prediction
    trig = attacks.BadNets(size=1)
    model = _Oracle().train()
    r = mf.evaluate(model, X, y, trigger=trig, target=7)
    assert r["acc"] == pytest.approx(7 / 8) and r["asr"] == 1.0 and model.training
    r = mf.evaluate(model, X, y, trigger=attacks.BadNets(size=1, margin=1), target=7)
    assert r["asr"] == 0.0
    assert mf.evaluate(model, X, y)["asr"] is None
    half = lambda x: torch.cat([trig(x[:3]), x[3:]])  # noqa: E731  stamps 3 of the 6 victims
    assert mf.evaluate(model, X, y, trigger=half, target=7)["asr"] == pytest.approx(3 / 6)
    with pytest.raises(TypeError, match="target"):
        mf.evaluate(model, X, y, trigger=trig)
    with pytest.raises(ValueError, match="not the target"):
        mf.evaluate(model, X[4:6], y[4:6], trigger=trig, target=7)
    with pytest.raises(ValueError, match="same N"):
        mf.evaluate(model, X, y[:3])


def test_evaluate_refuses_labels_and_targets_outside_the_classes_and_empty_data():
    """Labels and the target must be in [0, 10) for 10 logits (not counted wrong, nor an ASR
    of 0); no batch is no accuracy (not NaN); batches must be (inputs, labels, ...) tuples."""
    y = torch.tensor([0, 1, 2, 3])
    X = torch.zeros(4, 1, 4, 4)
    X[:, 0, 0, 0] = y / 10
    model, trig = _Oracle(), attacks.BadNets(size=1)
    for label in (10, -1):
        bad = y.clone()
        bad[2] = label
        with pytest.raises(ValueError, match=r"\(X, y\): labels must be in \[0, 10\) for a "
                           rf"model with 10 classes, got label {label}$"):
            mf.evaluate(model, X, bad)
    for target in (10, -1):
        with pytest.raises(ValueError, match=r"target must be a class of the model, in "
                           rf"\[0, 10\), got {target}$"):
            mf.evaluate(model, X, y, trigger=trig, target=target)
    empty = DataLoader(TensorDataset(X, y), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="eval_data is empty: expected at least one batch"):
        evaluate_loader(model, empty)
    dicts = DataLoader([{"x": a, "y": b} for a, b in zip(X, y)], batch_size=2)
    with pytest.raises(TypeError, match=r"eval_data must yield \(inputs, labels, \.\.\.\) tuple "
                       r"batches, got a dict with keys \['x', 'y'\]"):
        evaluate_loader(model, dicts)


def test_fit_schedules_history_and_errors():
    """Constant and cosine schedules, per-epoch means of the loss and its parts, eval mode at the
    end, and the bad arguments named."""
    torch.manual_seed(0)
    X = torch.randn(40, 3)
    y = (X.sum(1) > 0).long()
    for schedule, last_lr in (("constant", 0.05), ("cosine", 0.0)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))

        def objective(x, t):
            ce = nn.functional.cross_entropy(net(x), t)
            return ce, {"ce": ce, "half": ce / 2}

        loader = make_loader((X, y), batch_size=8, shuffle=True, seed=1)
        hist = fit(net, loader, objective, epochs=6, lr=0.05, schedule=schedule, seed=1)
        assert [h["epoch"] for h in hist] == list(range(1, 7)) and not net.training
        assert hist[-1]["lr"] == pytest.approx(last_lr, abs=1e-12)
        assert all(h["loss"] == pytest.approx(h["ce"]) == pytest.approx(2 * h["half"])
                   for h in hist)
        assert hist[-1]["loss"] < hist[0]["loss"]
    with pytest.raises(ValueError, match="schedule must be one of"):
        fit(net, loader, objective, epochs=1, lr=0.1, schedule="step")
    empty = make_loader((X[:3], y[:3]), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="no batch"):
        fit(net, empty, objective, epochs=1, lr=0.1)


def test_checkpoint_in_a_missing_directory_fails_before_training(tmp_path):
    """Not after the first epoch, and naming the user's path."""
    X, y = torch.rand(16, 1, 8, 8), torch.randint(10, (16,))
    calls = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            calls.append(1)
            return self.fc(x.flatten(1))

    path = tmp_path / "missing" / "state.pt"
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        mf.finetune(Net(), (X, y), epochs=1, progress=False, checkpoint=path)
    assert not calls


def test_evaluate_leaves_the_global_generator_as_it_was():
    """Iterating its loader draws a seed from the global generator: after evaluate,
    ``torch.rand`` gives what it would have given without the call."""
    X, y = torch.rand(30, 1, 4, 4) * 0.9, torch.randint(10, (30,))  # the oracle's classes 0-9
    seed = int(torch.randint(2 ** 31, ()))
    torch.manual_seed(seed)
    expected = torch.rand(5)
    torch.manual_seed(seed)
    mf.evaluate(_Oracle(), X, y, batch_size=8)
    assert torch.equal(torch.rand(5), expected)
