"""CLEAR: the batched pocket search (extension vs reference), cuts, scan, patch, and errors."""
import contextlib
import json
import math
import shutil

import pytest
import torch
from torch import nn

import medic_fast
from medic_fast import _extension
from medic_fast.clear import graph
from medic_fast.ops.pocket_search import pocket_search


def _has_extension():
    try:
        _extension.load()
        return True
    except _extension.ExtensionUnavailable:
        return False


needs_ext = pytest.mark.skipif(not _has_extension(), reason="the C++ extension did not build")


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
    processes on a shared machine. Threads are tested on their own below."""
    with _threads(1):
        yield


def _problems(shape, classes, q=60, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(q, k, *shape, generator=g)
    source = torch.randint(classes, (q,), generator=g)
    target = (source + 1 + torch.randint(classes - 1, (q,), generator=g)) % classes
    return anchors, source, target


def _mlp_head(relu_in=False):
    torch.manual_seed(1)
    layers = [nn.ReLU()] if relu_in else []
    layers += [nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 6)]
    head = nn.Sequential(*layers).eval()
    with torch.no_grad():  # larger weights than the default init: more varied decision regions
        for p in head.parameters():
            p.mul_(3)
    return head


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 3 * 3, 6)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def _run_both(head, shape, **kw):
    anchors, source, target = _problems(shape, 6)
    before = anchors.clone()
    ref = pocket_search(anchors, head, source, target, backend="reference", **kw)
    ext = pocket_search(anchors, head, source, target, backend="extension", **kw)
    assert torch.equal(anchors, before)
    assert (ref.backend, ext.backend) == ("reference", "extension")
    return ref, ext


# head, feature shape, and settings under which some problems are found, some abandoned and
# some run out of steps
HEADS = [pytest.param(lambda: _mlp_head(), (32,), dict(lr=0.5, steps=60, margin=0.5), id="mlp"),
         pytest.param(lambda: _mlp_head(relu_in=True), (32,), dict(lr=1.0, steps=20, margin=0.0),
                      id="relu-mlp"),
         pytest.param(lambda: ConvHead().eval(), (4, 6, 6), dict(lr=2.0, steps=60, margin=0.0),
                      id="conv")]


@needs_ext
@pytest.mark.parametrize("make_head, shape, _", HEADS)
def test_extension_follows_reference_step_by_step(make_head, shape, _):
    """With no test able to stop a problem, the anchors after s steps agree for every s."""
    head = make_head()
    for steps in (0, 1, 5, 25):
        ref, ext = _run_both(head, shape, alpha=0.5, lr=0.05, steps=steps, lo=-math.inf,
                             hi=math.inf, margin=math.inf)
        assert (ref.stopped_at == steps).all() and (ext.stopped_at == steps).all()
        torch.testing.assert_close(ext.anchors, ref.anchors, rtol=1e-4, atol=1e-5)
        if steps:
            assert not torch.allclose(ref.anchors, _problems(shape, 6)[0])  # they did move


@needs_ext
@pytest.mark.parametrize("make_head, shape, settings", HEADS)
def test_extension_makes_the_reference_decisions(make_head, shape, settings):
    """Found, abandoned and ran-out problems, and the step each stopped at, all match."""
    head = make_head()
    centroids = _problems(shape, 6)[0].mean(1)
    lo, hi = float(centroids.min()) - 0.1, float(centroids.max()) + 0.1
    ref, ext = _run_both(head, shape, alpha=0.1, lo=lo, hi=hi, **settings)
    ran_out = ~ref.found & ~ref.abandoned
    assert min(ref.found.sum(), ref.abandoned.sum(), ran_out.sum()) >= 5
    assert torch.equal(ext.found, ref.found)
    assert torch.equal(ext.abandoned, ref.abandoned)
    assert torch.equal(ext.stopped_at, ref.stopped_at)
    # Over up to 60 large steps float rounding grows where a ReLU flips; still far below the
    # distance the anchors travelled.
    moved = (ref.anchors - _problems(shape, 6)[0]).abs().max()
    assert moved > 1.0
    torch.testing.assert_close(ext.anchors, ref.anchors, rtol=0, atol=0.02)


@needs_ext
def test_the_whole_search_gives_the_same_answer_on_any_number_of_threads():
    """Threads take tiles of problems from a shared counter; every tile is independent, so the
    result is bitwise the same however the tiles are shared out."""
    head = _mlp_head()
    anchors, source, target = _problems((32,), 6, q=200)
    kw = dict(alpha=0.1, lr=0.5, steps=40, lo=-2.0, hi=2.0, margin=0.5, backend="extension")
    one = pocket_search(anchors, head, source, target, **kw)
    torch.set_num_threads(2)
    two = pocket_search(anchors, head, source, target, **kw)
    assert one.found.any() and one.abandoned.any()
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b)


def test_mlp_heads_take_the_whole_search_path_and_others_do_not():
    assert graph.mlp_layers(_mlp_head()) is not None
    w, b, relu = graph.mlp_layers(_mlp_head(relu_in=True))
    assert relu == [1, 1, 1, 0] and [t.shape for t in w] == [(48, 32), (24, 48), (6, 24)]
    assert graph.mlp_layers(ConvHead().eval()) is None
    assert graph.mlp_layers(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))) is None


@pytest.mark.parametrize("backend", ["reference", pytest.param("extension", marks=needs_ext)])
def test_the_tests_come_before_the_step(backend):
    """A problem that already satisfies the test is found at step 0 with its starting anchors;
    one whose centroid starts outside the box is abandoned at step 0; the box wins."""
    head = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():  # class 1 exactly where |x0| < 1: a pocket around the origin
        head[0].weight.copy_(torch.tensor([[1.0, 0], [-1, 0]] * 4))
        head[0].bias.zero_()
        head[2].weight.copy_(torch.tensor([[1.0] * 8, [0.0] * 8]))
        head[2].bias.copy_(torch.tensor([0.0, 4.0]))
    anchors = torch.tensor([[[-1.5, 0.0], [1.5, 0.0]]])  # both class 0, centroid class 1
    src, tgt = torch.tensor([0]), torch.tensor([1])
    kw = dict(alpha=0.0, lr=0.1, steps=10, margin=0.5, backend=backend)
    r = pocket_search(anchors, head, src, tgt, lo=-5.0, hi=5.0, **kw)
    assert r.found.tolist() == [True] and r.stopped_at.tolist() == [0]
    assert torch.equal(r.anchors, anchors)
    torch.testing.assert_close(r.centroids, torch.zeros(1, 2))
    r = pocket_search(anchors, head, src, tgt, lo=0.5, hi=5.0, **kw)
    assert r.abandoned.tolist() == [True] and not r.found.any() and r.stopped_at.tolist() == [0]
    r = pocket_search(anchors, head, src, tgt, lo=-5.0, hi=5.0, **{**kw, "margin": 3.0})
    assert not r.found.any() and not r.abandoned.any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("extension", marks=needs_ext)])
def test_nan_logits_are_never_found(backend):
    head = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        head[0].bias[2] = math.nan
    anchors, source, target = _problems((4,), 3, q=8)
    r = pocket_search(anchors, head, source, target, alpha=0.1, lr=0.1, steps=3, lo=-math.inf,
                      hi=math.inf, margin=0.0, backend=backend)
    assert not r.found.any()


def test_pocket_search_rejects_bad_arguments():
    head = _mlp_head()
    anchors, source, target = _problems((32,), 6, q=4)
    kw = dict(alpha=0.1, lr=0.1, steps=5, lo=-1.0, hi=1.0, margin=0.0)
    cases = [
        (dict(anchors=anchors[:, 0]), ValueError, "anchors"),
        (dict(anchors=anchors.long()), TypeError, "anchors"),
        (dict(head=lambda x: x), TypeError, "head"),
        (dict(source=source[:2]), ValueError, "source"),
        (dict(target=target.float()), TypeError, "target"),
        (dict(target=source), ValueError, "differ"),
        (dict(target=target + 6), ValueError, "target"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(lo=2.0), ValueError, "lo"),
        (dict(margin=math.nan), ValueError, "margin"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(head=nn.Sequential(nn.Linear(32, 1))), ValueError, "logits"),
        (dict(head=nn.Sequential(nn.Linear(32, 6), nn.Dropout())), ValueError, "eval"),
    ]
    for change, exc, word in cases:
        args = dict(anchors=anchors, head=head, source=source, target=target, **kw)
        args.update(change)
        with pytest.raises(exc, match=word):
            pocket_search(args.pop("anchors"), args.pop("head"), args.pop("source"),
                          args.pop("target"), **args)


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


# ------------------------------------------------------------------------------------------------
# CUDA sources
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA "
                    "sources of the pocket search cannot be compiled here")
def test_pocket_search_cuda_compiles_for_sm80_and_sm90_without_spills():
    from medic_fast.build import check_cuda
    recs = [r for r in check_cuda(verbose=False) if r["file"] == "pocket_search.cu"]
    kernels = {(r["arch"], name) for r in recs
               for name in ("mlp_search_kernel", "step_logits_kernel", "step_update_kernel")
               if name in r["kernel"]}
    assert len(kernels) == 6, recs
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in recs)
