"""CLEAR's batched pocket search (medic_fast.ops.pocket_search): the fused kernels against the
reference, step by step and decision by decision, on MLP heads (the whole-search kernel) and
others (the fused steps); the rules; arguments; backends; opcheck of the extension's ops."""
import math

import pytest
import torch
from torch import nn

from medic_fast.ops.pocket_search import mlp_layers, pocket_search
from shared import has_extension, needs_extension


# These problems are small: one thread runs them fastest and is not slowed down by other
# processes on a shared machine. Threads are tested on their own below.
pytestmark = pytest.mark.usefixtures("one_thread")


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
    ext = pocket_search(anchors, head, source, target, backend="cpp", **kw)
    assert torch.equal(anchors, before)
    assert (ref.backend, ext.backend) == ("reference", "cpp")
    return ref, ext


# head, feature shape, and settings under which some problems are found, some abandoned and
# some run out of steps
HEADS = [pytest.param(lambda: _mlp_head(), (32,), dict(lr=0.5, steps=60, margin=0.5), id="mlp"),
         pytest.param(lambda: _mlp_head(relu_in=True), (32,), dict(lr=1.0, steps=20, margin=0.0),
                      id="relu-mlp"),
         pytest.param(lambda: ConvHead().eval(), (4, 6, 6), dict(lr=2.0, steps=60, margin=0.0),
                      id="conv")]


@needs_extension
@pytest.mark.parametrize("make_head, shape, _", HEADS)
def test_cpp_follows_reference_step_by_step(make_head, shape, _):
    """With no test able to stop a problem, the anchors after s steps agree for every s."""
    head = make_head()
    for steps in (0, 1, 5, 25):
        ref, ext = _run_both(head, shape, alpha=0.5, lr=0.05, steps=steps, lo=-math.inf,
                             hi=math.inf, margin=math.inf)
        assert (ref.stopped_at == steps).all() and (ext.stopped_at == steps).all()
        torch.testing.assert_close(ext.anchors, ref.anchors, rtol=1e-4, atol=1e-5)
        if steps:
            assert not torch.allclose(ref.anchors, _problems(shape, 6)[0])  # they did move


@needs_extension
@pytest.mark.parametrize("make_head, shape, settings", HEADS)
def test_cpp_makes_the_reference_decisions(make_head, shape, settings):
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


@needs_extension
def test_the_whole_search_gives_the_same_answer_on_any_number_of_threads():
    """Threads take tiles of problems from a shared counter; every tile is independent, so the
    result is bitwise the same however the tiles are shared out."""
    head = _mlp_head()
    anchors, source, target = _problems((32,), 6, q=200)
    kw = dict(alpha=0.1, lr=0.5, steps=40, lo=-2.0, hi=2.0, margin=0.5, backend="cpp")
    one = pocket_search(anchors, head, source, target, **kw)
    torch.set_num_threads(2)
    two = pocket_search(anchors, head, source, target, **kw)
    assert one.found.any() and one.abandoned.any()
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b)


def test_mlp_heads_take_the_whole_search_path_and_others_do_not():
    assert mlp_layers(_mlp_head()) is not None
    w, b, relu = mlp_layers(_mlp_head(relu_in=True))
    assert relu == [1, 1, 1, 0] and [t.shape for t in w] == [(48, 32), (24, 48), (6, 24)]
    assert mlp_layers(ConvHead().eval()) is None
    assert mlp_layers(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))) is None


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_extension)])
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


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_extension)])
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
        (dict(backend="extension"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), ValueError, "backend='cuda' runs pocket_search on CUDA tensors; "
                                           "these are on cpu, where the fused kernel is 'cpp'"),
        (dict(anchors=anchors.double(), head=_mlp_head().double(), backend="cpp"), TypeError,
         "float32 anchors"),
        (dict(head=nn.Sequential(nn.Linear(32, 1))), ValueError, "logits"),
        (dict(head=nn.Sequential(nn.Linear(32, 6), nn.Dropout())), ValueError, "eval"),
    ]
    for change, exc, word in cases:
        args = dict(anchors=anchors, head=head, source=source, target=target, **kw)
        args.update(change)
        with pytest.raises(exc, match=word):
            pocket_search(args.pop("anchors"), args.pop("head"), args.pop("source"),
                          args.pop("target"), **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auto_takes_the_fused_kernel_for_float32_and_the_reference_otherwise(dtype):
    anchors, source, target = _problems((32,), 6, q=6)
    r = pocket_search(anchors.to(dtype), _mlp_head().to(dtype), source, target, alpha=0.1,
                      lr=0.1, steps=3, lo=-9.0, hi=9.0, margin=0.0)
    fused = "cpp" if has_extension() else "reference"
    assert r.backend == (fused if dtype == torch.float32 else "reference")
    assert r.anchors.dtype == dtype


# ------------------------------------------------------------------------------------------------
# The extension's ops, through torch.library.opcheck (every sub-test: schema, autograd
# registration, fake kernel against the real one, AOTAutograd against eager)
# ------------------------------------------------------------------------------------------------

def _active_rows(seed, q=9, active=6):
    """Fresh random rows ``[active, k + 1, D]`` (anchors, then centroid) of a random subset of
    ``q`` problems, their indices, and the problems' classes."""
    anchors, source, target = _problems((32,), 6, q=q, seed=seed)
    idx = torch.randperm(q, generator=torch.Generator().manual_seed(seed))[:active]
    rows = torch.cat([anchors, anchors.mean(1, keepdim=True)], 1)[idx]
    return rows, idx, source, target


@needs_extension
def test_opcheck_pocket_search_mlp():
    anchors, source, target = _problems((32,), 6, q=9, seed=3)
    weights, biases, relu = mlp_layers(_mlp_head(relu_in=True))
    torch.library.opcheck(torch.ops.medic_fast.pocket_search_mlp.default,
                          (anchors, weights, biases, relu, source, target, 0.1, 0.5, 8, -2.0, 2.0,
                           0.0))


@needs_extension
def test_opcheck_pocket_step_logits():
    rows, idx, source, target = _active_rows(4)
    logits = _mlp_head()(rows.flatten(0, 1)).detach()
    torch.library.opcheck(torch.ops.medic_fast.pocket_step_logits.default,
                          (logits, rows, idx, source, target, -2.0, 2.0, 0.0))


@needs_extension
@pytest.mark.parametrize("step", [True, False])
def test_opcheck_pocket_step_update(step):
    """With gradients some problems step and stay (how many depends on the data); without,
    every problem leaves."""
    rows, idx, _, _ = _active_rows(5)
    gen = torch.Generator().manual_seed(6)
    status = torch.randint(0, 3, (len(idx),), generator=gen, dtype=torch.int8)
    assert (status == 0).any() and (status != 0).any()
    grads = torch.randn(rows.shape, generator=gen) if step else None
    outs = (torch.randn(9, rows.shape[1] - 1, 32, generator=gen),
            torch.zeros(9, dtype=torch.int8), torch.zeros(9, dtype=torch.int64))
    torch.library.opcheck(torch.ops.medic_fast.pocket_step_update.default,
                          (rows, grads, status, idx, *outs, 3, 0.1, 0.5))
