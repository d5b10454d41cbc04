"""CLEAR's batched pocket search (medic_fast.ops.pocket_search): the fused kernels against the
reference on the same device (CPU: "cpp"; CUDA: "cuda"), step by step and decision by decision, on
MLP heads (the whole-search kernel) and others (the fused steps); which heads take the whole search
(the CUDA kernel's shared memory); labels on another device; label and index checks; the rules;
arguments; backends; opcheck of the extension's ops."""
import importlib
import math

import pytest
import torch
from torch import nn

from medic_fast import _extension
from medic_fast.ops.pocket_search import (mlp_layers, pocket_search, smem_limit,
                                          takes_whole_search)
from shared import CUDA, DEVICES, has_extension, needs_extension

ops_module = importlib.import_module("medic_fast.ops.pocket_search")  # not the function

# These problems are small: one thread runs them fastest and is not slowed down by other
# processes on a shared machine. Threads are tested on their own below.
pytestmark = pytest.mark.usefixtures("one_thread")

# A CUDA-only test: marked like the CUDA cases of DEVICES, skipped without a GPU.
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
FUSED = {"cpu": "cpp", "cuda": "cuda"}  # the fused backend of each device
# The opt-in shared memory per block of an A100 and of an H100 / H200, in bytes
A100_SMEM, H100_SMEM = 166912, 232448


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 in cuBLAS and cuDNN (no TF32) while a test runs, so that the reference and
    the kernels differ by rounding only."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


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


def _run_both(head, shape, device="cpu", **kw):
    """The reference and the fused backend of ``device`` on the same problems there (results
    brought back to the CPU)."""
    anchors, source, target = (t.to(device) for t in _problems(shape, 6))
    head = head.to(device)
    before = anchors.clone()
    ref = pocket_search(anchors, head, source, target, backend="reference", **kw)
    ext = pocket_search(anchors, head, source, target, backend=FUSED[device], **kw)
    assert torch.equal(anchors, before)
    assert (ref.backend, ext.backend) == ("reference", FUSED[device])
    assert ext.anchors.device == anchors.device
    return [type(r)(*(t.cpu() for t in r[:4]), r.backend) for r in (ref, ext)]


# head, feature shape, and settings under which some problems are found, some abandoned and
# some run out of steps
HEADS = [pytest.param(lambda: _mlp_head(), (32,), dict(lr=0.5, steps=60, margin=0.5), id="mlp"),
         pytest.param(lambda: _mlp_head(relu_in=True), (32,), dict(lr=1.0, steps=20, margin=0.0),
                      id="relu-mlp"),
         pytest.param(lambda: ConvHead().eval(), (4, 6, 6), dict(lr=2.0, steps=60, margin=0.0),
                      id="conv")]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_head, shape, _", HEADS)
def test_fused_follows_reference_step_by_step(make_head, shape, _, device):
    """With no test able to stop a problem, the anchors after s steps agree for every s. (On
    CUDA the MLP kernel sums in another order than cuBLAS: a little more rounding.)"""
    head = make_head()
    atol = 1e-5 if device == "cpu" else 1e-4
    for steps in (0, 1, 5, 25):
        ref, ext = _run_both(head, shape, device, alpha=0.5, lr=0.05, steps=steps, lo=-math.inf,
                             hi=math.inf, margin=math.inf)
        assert (ref.stopped_at == steps).all() and (ext.stopped_at == steps).all()
        torch.testing.assert_close(ext.anchors, ref.anchors, rtol=1e-4, atol=atol)
        if steps:
            assert not torch.allclose(ref.anchors, _problems(shape, 6)[0])  # they did move


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_head, shape, settings", HEADS)
def test_fused_makes_the_reference_decisions(make_head, shape, settings, device):
    """Found, abandoned and ran-out problems, and the step each stopped at, all match."""
    head = make_head()
    centroids = _problems(shape, 6)[0].mean(1)
    lo, hi = float(centroids.min()) - 0.1, float(centroids.max()) + 0.1
    ref, ext = _run_both(head, shape, device, alpha=0.1, lo=lo, hi=hi, **settings)
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


# ------------------------------------------------------------------------------------------------
# Which Linear/ReLU heads the whole-search kernel takes: on CUDA, those whose problem fits in a
# block's shared memory, with at most 8 layers; the others run the per-step loop
# ------------------------------------------------------------------------------------------------

def _shapes_only(widths, relu_in=False):
    """``mlp_layers``-style layers of these widths, as meta tensors (only their shapes count):
    a ReLU between layers, and on the input if ``relu_in``."""
    weights = [torch.empty(o, i, device="meta") for i, o in zip(widths, widths[1:])]
    biases = [torch.empty(o, device="meta") for o in widths[1:]]
    return weights, biases, [int(relu_in)] + [1] * (len(weights) - 1) + [0]


def _big_head(relu_in):
    """2048 -> 1024 -> 1000: at k = 5 it needs 195456 bytes of shared memory per problem, 244608
    with a ReLU on its input (more than an A100's 166912, and with the ReLU an H100's 232448)."""
    torch.manual_seed(3)
    layers = [nn.ReLU()] if relu_in else []
    return nn.Sequential(*layers, nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 1000)).eval()


@needs_extension
def test_the_shared_memory_need_is_the_kernels_formula():
    """(k + 1) * 4 bytes * (2 * sum(widths) [+ D with a ReLU on the input]); -1 past 8 layers."""
    need = torch.ops.medic_fast.pocket_search_mlp_smem
    assert need([2048, 1024, 1000], False, 5) == 195456
    assert need([2048, 1024, 1000], True, 5) == 244608
    for widths, relu_in, k in [([32, 48, 24, 6], False, 5), ([7, 3], True, 2), ([5] * 9, True, 9)]:
        assert need(widths, relu_in, k) == (k + 1) * 4 * (2 * sum(widths) + relu_in * widths[0])
    assert need([4] * 10, False, 5) == -1  # 9 layers
    assert need([4], False, 5) == -1  # no layer


@needs_extension
def test_routing_follows_the_devices_shared_memory_limit():
    """The decision alone, with the limits of real GPUs: no limit (the CPU) takes every head; a
    big head fits an H100 but not an A100, and with an input ReLU neither; 9 layers never."""
    big, big_relu = _shapes_only([2048, 1024, 1000]), _shapes_only([2048, 1024, 1000], True)
    small = mlp_layers(_mlp_head(relu_in=True))
    for mlp in (big, big_relu, small, _shapes_only([4] * 10)):
        assert takes_whole_search(mlp, 5, None)
    assert takes_whole_search(big, 5, H100_SMEM) and not takes_whole_search(big, 5, A100_SMEM)
    assert not takes_whole_search(big_relu, 5, H100_SMEM)
    assert takes_whole_search(big_relu, 5, 244608) and not takes_whole_search(big_relu, 5, 244607)
    assert takes_whole_search(small, 5, A100_SMEM) and takes_whole_search(small, 5, 48 * 1024)
    assert takes_whole_search(_shapes_only([4] * 9), 5, A100_SMEM)  # 8 layers
    assert not takes_whole_search(_shapes_only([4] * 10), 5, 10 ** 9)  # 9 layers
    assert smem_limit(torch.device("cpu")) is None


@needs_extension
def test_a_head_over_the_limit_takes_the_per_step_path_with_the_same_answer(monkeypatch):
    """On the CPU, with a fake limit of 0 bytes: an MLP head goes through the per-step loop (the
    path big heads take on CUDA), which decides as the reference and the whole search do."""
    head = _mlp_head()
    anchors, source, target = _problems((32,), 6)
    centroids = anchors.mean(1)
    kw = dict(alpha=0.1, lr=0.5, steps=60, margin=0.5, lo=float(centroids.min()) - 0.1,
              hi=float(centroids.max()) + 0.1)
    whole = pocket_search(anchors, head, source, target, backend="cpp", **kw)
    ref = pocket_search(anchors, head, source, target, backend="reference", **kw)
    stepped, fused_steps = [], ops_module._fused_steps

    def spy(*args):
        stepped.append(1)
        return fused_steps(*args)

    monkeypatch.setattr(ops_module, "smem_limit", lambda device: 0)
    monkeypatch.setattr(ops_module, "_fused_steps", spy)
    per_step = pocket_search(anchors, head, source, target, backend="cpp", **kw)
    assert stepped and per_step.backend == "cpp"
    assert ref.found.any() and ref.abandoned.any()
    for r in (whole, per_step):
        assert torch.equal(r.found, ref.found) and torch.equal(r.abandoned, ref.abandoned)
        assert torch.equal(r.stopped_at, ref.stopped_at)
        torch.testing.assert_close(r.anchors, ref.anchors, rtol=0, atol=0.02)


@needs_extension
@pytest.mark.parametrize("relu_in", [False, True], ids=["fits-h100", "over-h100"])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_big_heads_on_cuda_take_the_path_that_fits_and_follow_the_reference(relu_in):
    """2048-1024-1000 at k = 5: the whole-search kernel where its 195456 (244608 with an input
    ReLU) bytes fit the GPU's opt-in limit (the > 48 KB opt-in path), else the per-step loop;
    either way the anchors follow the reference step by step."""
    head = _big_head(relu_in).cuda()
    g = torch.Generator().manual_seed(4)
    anchors = torch.randn(8, 5, 2048, generator=g).cuda()
    source = torch.randint(1000, (8,), generator=g)
    target = (source + 1 + torch.randint(999, (8,), generator=g)) % 1000
    source, target = source.cuda(), target.cuda()
    need = torch.ops.medic_fast.pocket_search_mlp_smem([2048, 1024, 1000], relu_in, 5)
    limit = smem_limit(anchors.device)
    whole = ops_module._whole_search_layers(anchors, head) is not None
    assert whole == (need <= limit)
    if limit == H100_SMEM:  # H100, H200: the case each parameter is named after
        assert whole != relu_in
    kw = dict(alpha=0.5, lr=5.0, steps=4, lo=-math.inf, hi=math.inf, margin=math.inf)
    ref = pocket_search(anchors, head, source, target, backend="reference", **kw)
    ext = pocket_search(anchors, head, source, target, backend="cuda", **kw)
    assert ext.backend == "cuda" and (ext.stopped_at == 4).all()
    assert (ref.anchors - anchors).abs().max() > 1e-3  # they did move
    torch.testing.assert_close(ext.anchors, ref.anchors, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Devices of the arguments, and the label and index checks of the ops
# ------------------------------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("make_head, shape, settings", HEADS)
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cpu_labels_with_cuda_anchors_go_to_the_anchors_device(make_head, shape, settings):
    """pocket_search moves the labels: the same answer as with labels on the GPU (they used to
    reach the kernels as host pointers)."""
    head = make_head().cuda()
    anchors, source, target = _problems(shape, 6)
    anchors = anchors.cuda()
    kw = dict(alpha=0.1, lo=-3.0, hi=3.0, **settings)
    on_gpu = pocket_search(anchors, head, source.cuda(), target.cuda(), backend="cuda", **kw)
    on_cpu = pocket_search(anchors, head, source, target.int(), backend="cuda", **kw)
    _same(on_gpu, on_cpu)


def _same(a, b):
    """The same decisions, and the same anchors up to the order of atomic sums in cuDNN."""
    for x, y in zip(a[1:4], b[1:4]):
        assert torch.equal(x.cpu(), y.cpu())
    torch.testing.assert_close(a.anchors.cpu(), b.anchors.cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_a_head_on_another_device_is_refused_by_name():
    anchors, source, target = _problems((32,), 6, q=4)
    with pytest.raises(ValueError, match=r"head has parameters on cpu but the anchors are on "
                                         r"cuda:0: move the head"):
        pocket_search(anchors.cuda(), _mlp_head(), source, target, alpha=0.1, lr=0.1, steps=2,
                      lo=-9.0, hi=9.0, margin=0.0)


def _op_args(device, q=6):
    """Arguments of the three ops for a small MLP head on ``device``."""
    anchors, source, target = _problems((32,), 6, q=q, seed=7)
    weights, biases, relu = mlp_layers(_mlp_head())
    rows = torch.cat([anchors, anchors.mean(1, keepdim=True)], 1)
    logits = _mlp_head()(rows.flatten(0, 1)).detach()
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return dict(anchors=anchors.to(device), weights=to(*weights), biases=to(*biases), relu=relu,
                source=source.to(device), target=target.to(device), rows=rows.to(device),
                logits=logits.to(device), idx=torch.arange(q, device=device))


def _mlp(a, **change):
    a = {**a, **change}
    return torch.ops.medic_fast.pocket_search_mlp(a["anchors"], a["weights"], a["biases"],
                                                  a["relu"], a["source"], a["target"], 0.1, 0.5,
                                                  3, -2.0, 2.0, 0.0)


def _logits(a, **change):
    a = {**a, **change}
    return torch.ops.medic_fast.pocket_step_logits(a["logits"], a["rows"], a["idx"], a["source"],
                                                   a["target"], -2.0, 2.0, 0.0)


def _update(a, **change):
    a = {**a, **change}
    rows, q = a["rows"], len(a["source"])
    status = torch.zeros(len(rows), dtype=torch.int8, device=rows.device)
    outs = (torch.zeros(q, rows.shape[1] - 1, rows.shape[2], device=rows.device),
            torch.zeros(q, dtype=torch.int8, device=rows.device),
            torch.zeros(q, dtype=torch.int64, device=rows.device))
    return torch.ops.medic_fast.pocket_step_update(rows, torch.ones_like(rows), status, a["idx"],
                                                   *outs, 1, 0.1, 0.5)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_refuse_classes_and_problem_indices_out_of_range(device):
    """Called directly (pocket_search validates first), the ops check the classes against the
    head's outputs and the problem indices against the problems, on CUDA as on the CPU: a class
    out of range would write past a logit row (in shared memory, in the whole-search kernel)."""
    _extension.load()
    a = _op_args(device)
    for run in (_mlp, _logits, _update):
        run(a)  # the unchanged arguments run
    bad_class = a["source"].clone()
    bad_class[2] = 6
    with pytest.raises(RuntimeError, match=r"classes must be in \[0, 6\)"):
        _mlp(a, source=bad_class)
    with pytest.raises(RuntimeError, match=r"classes must be in \[0, 6\)|class out of range"):
        _logits(a, target=-a["target"] - 1)
    bad_idx = a["idx"].clone()
    bad_idx[1] = 6
    with pytest.raises(RuntimeError, match="problem index"):
        _logits(a, idx=bad_idx)
    with pytest.raises(RuntimeError, match="problem index out of range"):
        _update(a, idx=bad_idx)
    if device == "cuda":
        torch.cuda.synchronize()  # and nothing was launched with them


@needs_extension
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_the_cuda_ops_refuse_tensors_on_another_device_by_name():
    """Host (CPU) tensors among CUDA ones: the dispatcher picks the CUDA kernel, which names the
    argument instead of handing a host pointer to a kernel."""
    _extension.load()
    a = _op_args("cuda")
    with pytest.raises(RuntimeError, match="pocket_search_mlp: source must be on cuda:0"):
        _mlp(a, source=a["source"].cpu())
    with pytest.raises(RuntimeError, match="pocket_search_mlp: anchors must be a CUDA tensor"):
        _mlp(a, anchors=a["anchors"].cpu())
    with pytest.raises(RuntimeError, match="pocket_search_mlp: every weight must be on cuda:0"):
        _mlp(a, weights=[a["weights"][0].cpu()] + a["weights"][1:])
    with pytest.raises(RuntimeError, match="pocket_step_logits: target must be on cuda:0"):
        _logits(a, target=a["target"].cpu())
    with pytest.raises(RuntimeError, match="pocket_step_logits: idx must be on cuda:0"):
        _logits(a, idx=a["idx"].cpu())
    with pytest.raises(RuntimeError, match="pocket_step_update: idx must be on cuda:0"):
        _update(a, idx=a["idx"].cpu())


@needs_extension
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("make_head, shape, settings", HEADS)
def test_tensors_on_another_gpu_than_the_current_one(make_head, shape, settings):
    """Tensors on cuda:1 while cuda:0 is current: the ops run on cuda:1 (a device guard) and
    give the answer of cuda:0."""
    anchors, source, target = _problems(shape, 6)
    kw = dict(alpha=0.1, lo=-3.0, hi=3.0, backend="cuda", **settings)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            results.append(pocket_search(anchors.to(dev), make_head().to(dev), source.to(dev),
                                         target.to(dev), **kw))
    assert results[1].anchors.device == torch.device("cuda:1")
    _same(*results)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_a_failed_cuda_build_is_reported_with_its_reason(monkeypatch):
    """When the extension has only its CPU kernels (its CUDA build failed), backend="cuda" says
    why, in the compiler's words."""
    reason = "building the CUDA kernels of the medic_fast extension failed: error: planted"
    monkeypatch.setattr(_extension, "cuda_unavailable", lambda: reason)
    anchors, source, target = (t.cuda() for t in _problems((32,), 6, q=4))
    with pytest.raises(_extension.ExtensionUnavailable, match="error: planted"):
        pocket_search(anchors, _mlp_head().cuda(), source, target, alpha=0.1, lr=0.1, steps=2,
                      lo=-9.0, hi=9.0, margin=0.0, backend="cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_extension)],
                         ids=["reference", "fused"])
def test_the_tests_come_before_the_step(fused, device):
    """A problem that already satisfies the test is found at step 0 with its starting anchors;
    one whose centroid starts outside the box is abandoned at step 0; the box wins."""
    head = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():  # class 1 exactly where |x0| < 1: a pocket around the origin
        head[0].weight.copy_(torch.tensor([[1.0, 0], [-1, 0]] * 4))
        head[0].bias.zero_()
        head[2].weight.copy_(torch.tensor([[1.0] * 8, [0.0] * 8]))
        head[2].bias.copy_(torch.tensor([0.0, 4.0]))
    head = head.to(device)
    anchors = torch.tensor([[[-1.5, 0.0], [1.5, 0.0]]], device=device)  # class 0, centroid 1
    src, tgt = torch.tensor([0], device=device), torch.tensor([1], device=device)
    backend = FUSED[device] if fused else "reference"
    kw = dict(alpha=0.0, lr=0.1, steps=10, margin=0.5, backend=backend)
    r = pocket_search(anchors, head, src, tgt, lo=-5.0, hi=5.0, **kw)
    assert r.backend == backend
    assert r.found.tolist() == [True] and r.stopped_at.tolist() == [0]
    assert torch.equal(r.anchors, anchors)
    torch.testing.assert_close(r.centroids, torch.zeros(1, 2, device=device))
    r = pocket_search(anchors, head, src, tgt, lo=0.5, hi=5.0, **kw)
    assert r.abandoned.tolist() == [True] and not r.found.any() and r.stopped_at.tolist() == [0]
    r = pocket_search(anchors, head, src, tgt, lo=-5.0, hi=5.0, **{**kw, "margin": 3.0})
    assert not r.found.any() and not r.abandoned.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_extension)],
                         ids=["reference", "fused"])
def test_nan_logits_are_never_found(fused, device):
    head = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        head[0].bias[2] = math.nan
    anchors, source, target = (t.to(device) for t in _problems((4,), 3, q=8))
    r = pocket_search(anchors, head.to(device), source, target, alpha=0.1, lr=0.1, steps=3,
                      lo=-math.inf, hi=math.inf, margin=0.0,
                      backend=FUSED[device] if fused else "reference")
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auto_takes_the_fused_kernel_for_float32_and_the_reference_otherwise(dtype, device):
    anchors, source, target = (t.to(device) for t in _problems((32,), 6, q=6))
    r = pocket_search(anchors.to(dtype), _mlp_head().to(device, dtype), source, target, alpha=0.1,
                      lr=0.1, steps=3, lo=-9.0, hi=9.0, margin=0.0)
    fused = FUSED[device] if has_extension() else "reference"
    assert r.backend == (fused if dtype == torch.float32 else "reference")
    assert r.anchors.dtype == dtype and r.anchors.device == anchors.device


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


def _on(device, *args):
    """``args`` with every tensor (also in lists) moved to ``device``."""
    def move(a):
        if isinstance(a, torch.Tensor):
            return a.to(device)
        return [move(x) for x in a] if isinstance(a, list) else a
    return tuple(move(a) for a in args)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pocket_search_mlp(device):
    anchors, source, target = _problems((32,), 6, q=9, seed=3)
    weights, biases, relu = mlp_layers(_mlp_head(relu_in=True))
    torch.library.opcheck(torch.ops.medic_fast.pocket_search_mlp.default,
                          _on(device, anchors, weights, biases, relu, source, target, 0.1, 0.5, 8,
                              -2.0, 2.0, 0.0))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pocket_step_logits(device):
    rows, idx, source, target = _active_rows(4)
    logits = _mlp_head()(rows.flatten(0, 1)).detach()
    torch.library.opcheck(torch.ops.medic_fast.pocket_step_logits.default,
                          _on(device, logits, rows, idx, source, target, -2.0, 2.0, 0.0))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [True, False])
def test_opcheck_pocket_step_update(step, device):
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
                          _on(device, rows, grads, status, idx, *outs, 3, 0.1, 0.5))
