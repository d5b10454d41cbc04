"""CLEAR: cuts, scan, patch, and their errors (the pocket search itself: tests/ops)."""
import contextlib
import json

import pytest
import torch
from torch import nn

import medic_fast
from medic_fast.clear import graph


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are small: one thread runs them fastest and is not slowed down by other
    processes on a shared machine."""
    with _threads(1):
        yield


# ------------------------------------------------------------------------------------------------
# Cuts
# ------------------------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Residual(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_default_cut_follows_the_design():
    mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert graph.default_cut(mlp) == "2"
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    assert graph.default_cut(cnn) == "2"
    # the last convolution has a skip connection around it: its residual block is the cut
    assert graph.default_cut(SmallResNet()) == "block"
    x = torch.randn(2, 1, 5, 5)
    net = SmallResNet().eval()
    feats = net.stem(x).relu()
    torch.testing.assert_close(graph.split(net, "block")(feats), net(x))


def test_cut_errors_are_explained():
    with pytest.raises(ValueError, match="skip connection"):
        graph.split(SmallResNet(), "block.conv2")
    with pytest.raises(ValueError, match="not a module"):
        graph.split(SmallResNet(), "nope")
    with pytest.raises(ValueError, match="default cut"):
        graph.default_cut(nn.Sequential(nn.Linear(3, 3)))


# ------------------------------------------------------------------------------------------------
# scan and patch on the paper's demonstrations
# ------------------------------------------------------------------------------------------------

# One seed of each demonstration, as a regression test of the whole path. The scan does not
# detect every seed: benchmarks/bench_clear.py measures the rates over seeds 0-9.
@pytest.fixture(scope="module")
def digits():
    from medic_fast.zoo.tasks import digits_task
    with _threads(1):  # module fixtures are set up before the autouse one above
        return digits_task(4, poisoned=True), digits_task(4, poisoned=False)


@pytest.fixture(scope="module")
def swiss():
    from medic_fast.zoo.tasks import swiss_roll_task
    with _threads(1):
        return swiss_roll_task(5, poisoned=True), swiss_roll_task(5, poisoned=False)


@pytest.mark.parametrize("task", ["swiss", "digits"])
def test_scan_flags_the_poisoned_model_at_its_target_and_not_the_clean_one(task, request):
    poisoned, clean = request.getfixturevalue(task)
    assert poisoned.target_class() == poisoned.target  # the attack worked
    state = {k: v.clone() for k, v in poisoned.model.state_dict().items()}
    mode = [m.training for m in poisoned.model.modules()]
    report = medic_fast.scan(poisoned.model, poisoned.val)
    assert report.flagged and report.target == poisoned.target
    assert (poisoned.source, poisoned.target) in [(s, t) for s, t, _ in report.pairs]
    assert not medic_fast.scan(clean.model, clean.val).flagged
    for k, v in poisoned.model.state_dict().items():
        assert torch.equal(v, state[k])
    assert [m.training for m in poisoned.model.modules()] == mode


def test_report_contents_and_json(digits):
    poisoned, _ = digits
    X, y = poisoned.val
    r = medic_fast.scan(poisoned.model, (X, y), restarts=3, steps=20)
    C = 10
    assert r.P.shape == (C, C) and torch.isnan(r.P.diagonal()).all()
    assert r.n_searches == C * (C - 1) * 3 and r.cut == "layers.2"
    assert len(r.pocket_samples) == len(r.pocket_sources) == r.n_found
    assert (r.pocket_sources != r.pocket_targets).all()
    assert set(r.timing) == {"features", "search", "total"}
    d = json.loads(r.to_json())
    assert d["n_searches"] == r.n_searches and d["P"][0][0] is None and len(d["P"]) == C


def test_scan_skips_classes_without_k_correct_samples(digits):
    poisoned, _ = digits
    X, y = poisoned.val
    keep = torch.cat([(y != 3).nonzero().squeeze(1), (y == 3).nonzero().squeeze(1)[:2]])
    r = medic_fast.scan(poisoned.model, (X[keep], y[keep]), restarts=2, steps=5)
    assert set(r.skipped) == {3} and r.skipped[3] <= 2
    assert torch.isnan(r.P[3]).all() and not torch.isnan(r.P[4, 3])
    assert r.n_searches == 9 * 9 * 2


def test_scan_accepts_datasets_and_loaders(digits):
    from torch.utils.data import DataLoader, TensorDataset
    poisoned, _ = digits
    ds = TensorDataset(*poisoned.val)
    kw = dict(restarts=2, steps=10)
    a = medic_fast.scan(poisoned.model, poisoned.val, **kw)
    b = medic_fast.scan(poisoned.model, ds, **kw)
    c = medic_fast.scan(poisoned.model, DataLoader(ds, batch_size=37), **kw)
    assert torch.equal(a.P.nan_to_num(-1), b.P.nan_to_num(-1))
    assert torch.equal(a.P.nan_to_num(-1), c.P.nan_to_num(-1))


def test_scan_errors(digits):
    poisoned, _ = digits
    model, val = poisoned.model, poisoned.val
    with pytest.raises(ValueError, match="purely linear"):
        medic_fast.scan(model, val, cut="layers.4")
    with pytest.raises(ValueError, match="not a module"):
        medic_fast.scan(model, val, cut="fc9")
    with pytest.raises(ValueError, match=r"logits \[N, classes\]"):
        medic_fast.scan(nn.Sequential(model, nn.Flatten(0)), val, cut="0.layers.2")
    with pytest.raises(TypeError, match="data"):
        medic_fast.scan(model, [1, 2, 3])
    with pytest.raises(ValueError, match="k="):
        medic_fast.scan(model, val, n=3, k=5)
    with pytest.raises(ValueError, match="threshold"):
        medic_fast.scan(model, val, threshold=1.5)
    with pytest.raises(TypeError, match="model"):
        medic_fast.scan("model", val)


def test_patch_fixes_the_target_and_leaves_the_input_model(digits):
    poisoned, _ = digits
    report = medic_fast.scan(poisoned.model, poisoned.val)
    assert report.n_found > 0
    state = {k: v.clone() for k, v in poisoned.model.state_dict().items()}
    patched = medic_fast.patch(poisoned.model, report, poisoned.val)
    assert patched is not poisoned.model
    for k, v in poisoned.model.state_dict().items():
        assert torch.equal(v, state[k])
    changed = [k for k, v in patched.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == ["layers.4.weight", "layers.4.bias"]  # only the last Linear layer
    assert poisoned.target_class(patched) == poisoned.source
    assert poisoned.accuracy(patched) > poisoned.accuracy() - 0.05


def test_patch_errors(digits):
    poisoned, _ = digits
    with pytest.raises(TypeError, match="report"):
        medic_fast.patch(poisoned.model, {"P": None}, poisoned.val)
    report = medic_fast.scan(poisoned.model, poisoned.val, restarts=1, steps=1)
    with pytest.raises(ValueError, match="epochs"):
        medic_fast.patch(poisoned.model, report, poisoned.val, epochs=0)
