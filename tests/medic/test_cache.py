"""The teacher cache: per-sample signals kept across epochs give the same loss and gradients as
recomputing them, in any batch composition; sanitize uses it only where inputs repeat."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import medic_fast as mf
from medic_fast.capture import default_layers
from medic_fast.medic.cache import TeacherCache
from medic_fast.zoo import models
from shared import Pairs

torch.set_num_threads(1)


@pytest.fixture
def made(monkeypatch):
    """The TeacherCaches sanitize makes, in order (sanitize's own class, recorded)."""
    made, real = [], mf.medic.sanitize.__globals__["TeacherCache"]

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setitem(mf.medic.sanitize.__globals__, "TeacherCache", spy)
    return made


def _signals(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 5, generator=g)],
            [torch.randn(n, 3, 4, 4, generator=g) / n, torch.randn(n, 5, generator=g) / n])


def test_put_then_get_any_batch_gives_batch_mean_gradients():
    cache = TeacherCache(10)
    acts, grads = _signals(4)
    idx = torch.tensor([7, 2, 5, 0])
    assert cache.get(idx) is None and cache.misses == 1
    cache.put(idx, acts, grads)
    got_a, got_g = cache.get(idx)
    assert all(torch.equal(a, b) for a, b in zip(got_a, acts))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(got_g, grads))
    # a sub-batch of 2: same activations, gradients of a 2-sample mean (twice as large)
    sub_a, sub_g = cache.get(torch.tensor([5, 7]))
    assert torch.equal(sub_a[1], acts[1][[2, 0]])
    assert torch.allclose(sub_g[0], 2 * grads[0][[2, 0]], rtol=1e-6, atol=0)
    assert cache.get(torch.tensor([5, 1])) is None  # 1 was never stored
    assert cache.hits == 2 and cache.misses == 2


def test_budget_bad_index_and_bf16():
    acts, grads = _signals(4)
    small = TeacherCache(10, max_bytes=100)
    small.put(torch.arange(4), acts, grads)
    assert not small.enabled and small.get(torch.arange(4)) is None
    assert TeacherCache(10).nbytes(acts) == 2 * 10 * (48 + 5) * 4
    cache = TeacherCache(10)
    for bad in (torch.tensor([10]), torch.tensor([-1]), torch.tensor([0.5]), [1, 2]):
        with pytest.raises(ValueError, match="index"):
            cache.get(bad)
    with pytest.raises(ValueError, match="size"):
        TeacherCache(0)
    half = TeacherCache(10, dtype=torch.bfloat16)
    half.put(torch.arange(4), acts, grads)
    a, g = half.get(torch.arange(4))
    assert a[0].dtype == torch.float32 and torch.allclose(a[0], acts[0], rtol=2 ** -8, atol=0)
    assert half.nbytes(acts) == TeacherCache(10).nbytes(acts) // 2


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = models.DigitsCNN((4, 8, 8)).eval().requires_grad_(False)
    X, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))
    layers = default_layers(teacher)
    stats = mf.collect_stats(teacher, (X, y), layers)
    return teacher, X, y, layers, stats


def test_cloner_with_cache_equals_recomputing(setup):
    """After one pass fills the cache, a batch of other composition gives the loss and the
    student's gradients of a Cloner without cache, while the teacher does not run."""
    teacher, X, y, layers, stats = setup
    student = models.DigitsCNN((4, 8, 8))
    plain = mf.Cloner(teacher, student, layers, stats)
    cached = mf.Cloner(teacher, student, layers, stats, cache=TeacherCache(24))
    for part in torch.arange(24).split(8):
        cached(X[part], y[part], index=part).backward()
    student.zero_grad()
    idx = torch.tensor([3, 17, 9, 22, 0])
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        loss_c = cached(X[idx], y[idx], index=idx)
    finally:
        hook.remove()
    assert calls == []
    loss_c.backward()
    grads_c = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    loss_p = plain(X[idx], y[idx])
    loss_p.backward()
    assert loss_c.item() == pytest.approx(loss_p.item(), rel=1e-6)
    for a, b in zip(grads_c, (p.grad for p in student.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="index= needs"):
        plain(X[idx], y[idx], index=idx)
    with pytest.raises(ValueError, match="cache must be"):
        mf.Cloner(teacher, student, layers, stats, cache=TeacherCache(3),
                  loss_fn=lambda out, batch: out.sum())


def test_sanitize_caches_only_where_inputs_repeat(setup, made):
    teacher, X, y, _, _ = setup
    kw = dict(epochs=4, batch_size=8, progress=False)
    off = mf.sanitize(teacher, (X, y), cache=False, **kw)
    assert made == []
    auto = mf.sanitize(teacher, (X, y), **kw)
    assert len(made) == 1 and made[0].hits == 9 and made[0].misses == 3
    for a, b in zip(off.history, auto.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for p, q in zip(off.model.parameters(), auto.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
    mf.sanitize(teacher, TensorDataset(X, y), **kw)
    mf.sanitize(teacher, Pairs(X, y), cache=True, **kw)
    assert len(made) == 3 and made[2].hits == 9
    mf.sanitize(teacher, Pairs(X, y), **kw)  # a Dataset may transform at random: not by default
    mf.sanitize(teacher, (X, y), augment="crop", **kw)
    mf.sanitize(teacher, DataLoader(TensorDataset(X, y), batch_size=8), **kw)
    mf.sanitize(teacher, (X, y), **{**kw, "epochs": 3})  # filling would cost more than it saves
    assert len(made) == 3
    with pytest.raises(ValueError, match="DataLoader"):
        mf.sanitize(teacher, DataLoader(TensorDataset(X, y), batch_size=8), cache=True, **kw)
    with pytest.raises(ValueError, match="cache must be"):
        mf.sanitize(teacher, (X, y), cache="yes", **kw)


class _Stop(Exception):
    pass


class _StopAt:
    """A trigger (a horizontal flip) that interrupts training at its call ``n + 1``: in the
    evaluation of epoch ``n + 1``, before that epoch is saved."""

    def __init__(self, n=None):
        self.n, self.calls = n, 0

    def __call__(self, x):
        self.calls += 1
        if self.n is not None and self.calls > self.n:
            raise _Stop
        return x.flip(-1)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one_with_the_cache(tmp_path, made):
    """cache="auto" (the default): a run interrupted after epoch 3 and resumed gives the
    uninterrupted run's clone bit for bit, from the same cache. The uninterrupted run fills the
    cache in its first epoch, in batches of 48, 48 and 4 samples; a sample's CE gradient
    recomputed in a batch of another size differs in its last bits, so the resumed run refills
    the cache from the first epoch's batches rather than from its own."""
    model = models.DigitsCNN((4, 6, 8))
    X, y = torch.rand(100, 1, 8, 8), torch.randint(10, (100,))
    path = tmp_path / "s.pt"
    kw = dict(epochs=8, batch_size=48, progress=False, eval_data=(X[:40], y[:40]), target=0)
    full = mf.sanitize(model, (X, y), trigger=_StopAt(), **kw)
    with pytest.raises(_Stop):
        mf.sanitize(model, (X, y), trigger=_StopAt(3), checkpoint=path, **kw)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    resumed = mf.sanitize(model, (X, y), trigger=_StopAt(), checkpoint=path, resume=True, **kw)
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert full.history == [dict(h, time=f["time"]) for h, f in zip(resumed.history,
                                                                    full.history)]
    assert len(made) == 3
    for a, b in zip(made[0].acts + made[0].grads, made[2].acts + made[2].grads):
        assert torch.equal(a, b)
    assert made[2].hits == 5 * 3  # epochs 4-8 from the refilled cache
