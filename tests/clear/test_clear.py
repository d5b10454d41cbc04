"""CLEAR: cuts, scan, patch, and their errors (the pocket search itself: tests/ops)."""
import dataclasses
import json
import math

import pytest
import torch

from medic_fast._utils import torch_threads
from torch import nn

import medic_fast
from medic_fast.clear import graph
from shared import needs_extension



@pytest.fixture(autouse=True)
def one_thread():
    """These problems are small: one thread runs them fastest and is not slowed down by other
    processes on a shared machine."""
    with torch_threads(1):
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
# scan and patch on models with a planted pocket
# ------------------------------------------------------------------------------------------------

# Two classes in a 2-D feature space phi (the model's first layer is the identity on the data,
# which is positive, so phi = x). Class 0: a ring of radius 1.5 around C = (5, 5); class 1: a
# cluster at phi0 in [12, 14], phi1 in [4, 6]. The models are built by hand so that a pocket
# provably exists, inside the convex hull of the class-0 ring, at C: a search from class 0 to
# class 1 must find it, and a defect (source and target swapped, a wrong centroid or margin test,
# a box that abandons every search, a patch that does not train) makes these tests fail. Whether
# scan detects the backdoors of the demonstration tasks is a rate, measured over seeds in
# benchmarks/bench_clear.py (benchmarks/RESULTS.md §4), not a unit test.
CENTRE = (5.0, 5.0)
SCAN_SEEDS = [0, 1, 2]  # fixed; every seed must pass


def _paper_scan(*args, **kwargs):
    """``scan`` with the paper's Algorithm 1 (these tests check its settings and P's meaning)."""
    return medic_fast.scan(*args, method="paper", **kwargs)


def _planted_data():
    a = torch.arange(100) * (2 * math.pi / 100)
    ring = torch.stack([CENTRE[0] + 1.5 * a.cos(), CENTRE[1] + 1.5 * a.sin()], 1)
    g = torch.linspace(0, 1, 10)
    cluster = torch.stack(torch.meshgrid(12 + 2 * g, 4 + 2 * g, indexing="ij"), -1)
    X = torch.cat([ring, cluster.reshape(-1, 2)])
    return X, torch.cat([torch.zeros(100), torch.ones(100)]).long()


def _axis_units(layer):
    """u = relu(phi0 - 5), relu(5 - phi0), relu(phi1 - 5), relu(5 - phi1), relu(phi0 - 10): the
    first four sum to |phi - C|_1, the last is the class-1 half-plane."""
    layer.weight.copy_(torch.tensor([[1., 0], [-1, 0], [0, 1], [0, -1], [1, 0]]))
    layer.bias.copy_(torch.tensor([-5., 5, -5, 5, -10]))


@torch.no_grad()
def _pocket_in_logit(pocket=True):
    """logit0 = 1, logit1 = p * (3 - 10 |phi - C|_1) + 100 relu(phi0 - 10), p = 1 (planted) or 0
    (control). Planted: class 1 is a region beyond phi0 = 10 plus the diamond |phi - C|_1 < 0.2
    (the pocket; class 1 by the 0.25 margin within 0.175), class 0 on the ring by a margin >= 13,
    and the pocket term's gradient points at C everywhere, so the search is led there.
    Control: logit1 - logit0 = 100 relu(phi0 - 10) - 1 is convex in phi, so the centroid of
    anchors classified 0 by a margin is classified 0 by at least that margin: no pocket can exist,
    whatever the search does."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 2))
    m[0].weight.copy_(torch.eye(2))
    m[0].bias.zero_()
    _axis_units(m[2])
    p = 1.0 if pocket else 0.0
    m[4].weight.copy_(torch.tensor([[0., 0, 0, 0, 0], [-10 * p, -10 * p, -10 * p, -10 * p, 100]]))
    m[4].bias.copy_(torch.tensor([1., 3 * p]))
    return m


@torch.no_grad()
def _pocket_in_unit():
    """The pocket is carried by one hidden unit of the layer before the last Linear one:
    bump = relu(3 - 10 |phi - C|_1), nonzero only in the diamond |phi - C|_1 < 0.3. Beside it,
    half = relu(phi0 - 10) and dist = |phi - C|_1. logit0 = 0, logit1 = 2 bump + 10 half - dist - 1:
    class 1 in the pocket |phi - C|_1 < 5/21 (logit1 = 5 at C) and at phi0 > 10.7 or so, class 0
    elsewhere with a margin >= 1. The bump unit is dead outside the pocket; dist gives the search
    a gradient towards C from anywhere in the ring (without it the search could only find the
    pocket by starting in it). Cut "2" (phi): the default cut would be the 5 axis units, in whose
    space the pocket is outside the hull of the class-0 features (|phi - C|_1 is linear there)."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3),
                      nn.ReLU(), nn.Linear(3, 2))
    m[0].weight.copy_(torch.eye(2))
    m[0].bias.zero_()
    _axis_units(m[2])
    m[4].weight.copy_(torch.tensor([[-10., -10, -10, -10, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 0]]))
    m[4].bias.copy_(torch.tensor([3., 0, 0]))
    m[6].weight.copy_(torch.tensor([[0., 0, 0], [2, 10, -1]]))
    m[6].bias.copy_(torch.tensor([0., -1]))
    return m


def _accuracy(model, data):
    X, y = data
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def _class_of(model, phi):
    with torch.no_grad():
        return int(model(torch.tensor([phi])).argmax(1))


def _in_pocket(samples, radius):
    return bool(((samples - torch.tensor(CENTRE)).abs().sum(1) < radius).all())


@pytest.mark.parametrize("seed", SCAN_SEEDS)
def test_scan_finds_a_planted_pocket_and_nothing_in_its_control(seed):
    data = _planted_data()
    model, control = _pocket_in_logit(True), _pocket_in_logit(False)
    assert _accuracy(model, data) == _accuracy(control, data) == 1.0
    assert _class_of(model, CENTRE) == 1 and _class_of(control, CENTRE) == 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mode = [m.training for m in model.modules()]
    report = _paper_scan(model, data, seed=seed)
    assert report.cut == "2"  # the default cut: phi
    assert report.flagged and report.target == 1
    assert (0, 1) in [(s, t) for s, t, _ in report.pairs]
    assert report.P[0, 1] > report.threshold
    # every found centroid is in the planted pocket, from class 0 to class 1
    mine = report.pocket_targets == 1
    assert mine.any() and (report.pocket_sources[mine] == 0).all()
    assert _in_pocket(report.pocket_samples[mine], 0.2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert [m.training for m in model.modules()] == mode

    clean = _paper_scan(control, data, seed=seed)
    assert not clean.flagged and clean.n_found == 0 and clean.pairs == []
    assert (clean.P.nan_to_num(0) == 0).all()


# One seed of the digits demonstration, for the report's contents, skipped classes, data forms
# and errors.
@pytest.fixture(scope="module")
def digits():
    from medic_fast.zoo.tasks import digits_task
    with torch_threads(1):  # module fixtures are set up before the autouse one above
        return digits_task(4, poisoned=True), digits_task(4, poisoned=False)


def test_report_contents_and_json(digits):
    poisoned, _ = digits
    X, y = poisoned.val
    r = _paper_scan(poisoned.model, (X, y), restarts=3, steps=20)
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
    r = _paper_scan(poisoned.model, (X[keep], y[keep]), restarts=2, steps=5)
    assert set(r.skipped) == {3} and r.skipped[3] <= 2
    assert torch.isnan(r.P[3]).all() and not torch.isnan(r.P[4, 3])
    assert r.n_searches == 9 * 9 * 2


def test_scan_accepts_datasets_and_loaders(digits):
    from torch.utils.data import DataLoader, TensorDataset
    poisoned, _ = digits
    ds = TensorDataset(*poisoned.val)
    kw = dict(restarts=2, steps=10)
    a = _paper_scan(poisoned.model, poisoned.val, **kw)
    b = _paper_scan(poisoned.model, ds, **kw)
    c = _paper_scan(poisoned.model, DataLoader(ds, batch_size=37), **kw)
    assert torch.equal(a.P.nan_to_num(-1), b.P.nan_to_num(-1))
    assert torch.equal(a.P.nan_to_num(-1), c.P.nan_to_num(-1))


def test_scan_errors(digits):
    poisoned, _ = digits
    model, val = poisoned.model, poisoned.val
    with pytest.raises(ValueError, match="purely linear"):
        _paper_scan(model, val, cut="layers.4")
    with pytest.raises(ValueError, match="not a module"):
        _paper_scan(model, val, cut="fc9")
    with pytest.raises(ValueError, match=r"logits \[N, classes\]"):
        _paper_scan(nn.Sequential(model, nn.Flatten(0)), val, cut="0.layers.2")
    with pytest.raises(TypeError, match="data"):
        _paper_scan(model, [1, 2, 3])
    with pytest.raises(ValueError, match="k="):
        _paper_scan(model, val, n=3, k=5)
    with pytest.raises(ValueError, match="threshold"):
        _paper_scan(model, val, threshold=1.5)
    with pytest.raises(TypeError, match="model"):
        _paper_scan("model", val)


def test_patch_removes_a_planted_pocket_and_leaves_the_input_model():
    data = _planted_data()
    model = _pocket_in_unit()
    assert _accuracy(model, data) == 1.0 and _class_of(model, CENTRE) == 1
    report = _paper_scan(model, data, cut="2")
    assert report.flagged and report.target == 1 and report.n_found > 0
    assert (report.pocket_sources == 0).all() and _in_pocket(report.pocket_samples, 5 / 21)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patched = medic_fast.patch(model, report, data)
    assert patched is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    changed = [k for k, v in patched.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == ["6.weight", "6.bias"]  # only the last Linear layer
    assert _class_of(patched, CENTRE) == 0
    assert _accuracy(patched, data) == 1.0
    # The paper's control: fine-tuning on the clean samples alone does not remove this pocket.
    # The bump unit is 0 on every clean sample, so its weights get no gradient; only the biases
    # and the other weights move (Adam lowers logit1's bias by about 2 in 5 epochs, logit1 at C
    # is 5). So the fix above comes from the pocket samples labelled with their source class.
    # (This checks the test's premise; on a model where clean fine-tuning alone also removed the
    # pocket, the assertion on the centre above would not show that patch uses the pockets.)
    clean_only = dataclasses.replace(report, pocket_samples=report.pocket_samples[:0],
                                     pocket_sources=report.pocket_sources[:0],
                                     pocket_targets=report.pocket_targets[:0])
    assert _class_of(medic_fast.patch(model, clean_only, data), CENTRE) == 1


def test_patch_errors(digits):
    poisoned, _ = digits
    with pytest.raises(TypeError, match="report"):
        medic_fast.patch(poisoned.model, {"P": None}, poisoned.val)
    report = _paper_scan(poisoned.model, poisoned.val, restarts=1, steps=1)
    with pytest.raises(ValueError, match="epochs"):
        medic_fast.patch(poisoned.model, report, poisoned.val, epochs=0)


# ------------------------------------------------------------------------------------------------
# Progress on stderr
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_extension)])
def test_scan_is_quiet_by_default_and_shows_progress_on_request(backend, capsys):
    data, model = _planted_data(), _pocket_in_logit(True)
    quiet = _paper_scan(model, data, backend=backend)
    assert capsys.readouterr() == ("", "")
    shown = _paper_scan(model, data, backend=backend, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and shown.backend == backend
    assert "scan: features" in err and "1/1" in err  # 200 samples: one batch
    assert "scan: 20 searches = 2 class pairs x 10 restarts" in err
    if backend == "cpp":  # a Linear/ReLU head: the extension runs the whole search
        assert "all inside the extension (cpp)" in err and "pocket search: done in" in err
        assert "active=" not in err
    else:  # the search runs in Python steps: a bar over them
        assert "pocket search:" in err and "active=" in err and "/601" in err
    assert torch.equal(quiet.P.nan_to_num(-1), shown.P.nan_to_num(-1))
    assert torch.equal(quiet.pocket_samples, shown.pocket_samples)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_extension)])
def test_stepped_searches_report_each_step_and_the_problems_still_active(backend, capsys):
    """The Python-driven searches (the reference; the extension's steps for a head that is not
    Linear/ReLU) call ``on_step(s, active)`` after every step; ``progress`` draws it as a bar."""
    import importlib

    from medic_fast.reference import pocket_search as reference
    ops = importlib.import_module("medic_fast.ops.pocket_search")  # not the function it exports
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    with torch.no_grad():  # larger weights than the default init: more varied decision regions
        for p in head.parameters():
            p.mul_(3)
    anchors = torch.randn(40, 4, 2)
    source = torch.randint(3, (40,))
    target = (source + 1 + torch.randint(2, (40,))) % 3
    c = anchors.mean(1)
    # alpha, lr, steps, lo, hi, margin: some problems are found, some abandoned, some run out
    settings = (0.1, 0.5, 30, float(c.min()) - 0.1, float(c.max()) + 0.1, 0.0)
    run = reference.pocket_search if backend == "reference" else ops._fused_steps
    calls = []
    _, status, stop = run(anchors, head, source, target, *settings,
                          lambda s, active: calls.append((s, active)))
    assert (status == 1).any() and (status == 2).any() and (stop == 30).any()
    assert 0 < int(stop.min()) and int(stop.max()) == len(calls) - 1
    assert calls == [(s, int((stop > s).sum())) for s in range(len(calls))]
    kw = dict(zip(("alpha", "lr", "steps", "lo", "hi", "margin"), settings))
    res = medic_fast.pocket_search(anchors, head, source, target, backend=backend, progress=True,
                                   **kw)
    assert torch.equal(res.stopped_at, stop) and torch.equal(res.found, status == 1)
    err = capsys.readouterr().err
    assert "pocket search:" in err and f"{len(calls)}/31" in err and "active=" in err
