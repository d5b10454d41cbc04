"""WaNet and the label-consistent attack: shapes, determinism, argument checks, and that each
takes on the digits (a DigitsCNN trained from scratch on the poisoned split learns it)."""
import pytest
import torch

import medic_fast
from medic_fast import data
from medic_fast.zoo import attacks, datasets, models


@pytest.fixture(scope="module")
def digits():
    X, y = datasets.load_digits()
    return data.split(X, y, [0.7, 0.3], seed=0)


@pytest.fixture(scope="module")
def surrogate(digits):
    (Xtr, ytr), _ = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return medic_fast.train_from_scratch(models.DigitsCNN(), (Xtr, ytr), epochs=5,
                                             progress=False, seed=1).model
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _takes(atk, digits, rate, target, epochs=10):
    (Xtr, ytr), (Xte, yte) = digits
    p = atk.poison(Xtr, ytr, rate, target, seed=0)
    model = medic_fast.train_from_scratch(models.DigitsCNN(), (p.X, p.y), epochs=epochs,
                                          progress=False).model
    return p, medic_fast.evaluate(model, Xte, yte, trigger=atk, target=target)


# --------------------------------------------------------------------------------------------
# WaNet
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (4, 3, 32, 32), (3, 8, 8)])
def test_wanet_apply_shape_range_and_inputs_untouched(shape):
    X = _images(shape)
    X0 = X.clone()
    out = attacks.WaNet()(X)
    assert out.shape == X.shape and out.dtype == X.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(X, X0)
    assert not torch.allclose(out, X)  # the warp changes the images...
    assert (out - X).abs().mean() < 0.25  # ...but only a little
    assert attacks.WaNet()(X.double()).dtype == torch.float64


def test_wanet_grid_and_determinism():
    X = _images((5, 1, 8, 8))
    a, b = attacks.WaNet(seed=3), attacks.WaNet(seed=3)
    assert torch.equal(a(X), b(X)) and torch.equal(a(X), a(X))
    assert not torch.equal(a.grid(8, 8), attacks.WaNet(seed=4).grid(8, 8))
    assert not torch.equal(a(X), attacks.WaNet(seed=4)(X))
    grid = a.grid(8, 8)
    assert grid.shape == (8, 8, 2) and grid.abs().max() <= 1
    # the identity plus a displacement of strength * field / H (field of mean |.| about 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    shift = grid - torch.stack((xs, ys), -1)
    assert 0.02 < shift.abs().mean() < 0.5
    # a stronger warp moves pixels further; zero strength would be the identity
    assert (attacks.WaNet(strength=2.0, seed=3).grid(8, 8) - grid).abs().sum() > 0
    # k is clipped to the image size: a 3x3 image with k = 4 works
    assert attacks.WaNet(k=4)(_images((2, 1, 3, 3))).shape == (2, 1, 3, 3)
    # the field is cached per image size and does not depend on the batch
    assert torch.equal(a(X[:2]), a(X)[:2])
    assert torch.equal(a(_images((2, 3, 32, 32)))[:, :1], a(_images((2, 3, 32, 32))[:, :1]))


def test_wanet_poison_and_noise_mode():
    X, y = _images((40, 1, 8, 8)), torch.arange(40) % 4
    X0, y0 = X.clone(), y.clone()
    atk = attacks.WaNet()
    p = atk.poison(X, y, 0.25, target=1, seed=0)
    assert torch.equal(X, X0) and torch.equal(y, y0)
    assert len(p.index) == 10 and (y[p.index] != 1).all() and (p.y[p.index] == 1).all()
    assert torch.equal(p.X[p.index], atk(X[p.index]))
    rest = torch.ones(40, dtype=torch.bool)
    rest[p.index] = False
    assert torch.equal(p.X[rest], X[rest]) and torch.equal(p.y[rest], y[rest])
    # noise mode: further rows warped with noise, labels kept, not in the index
    noisy = attacks.WaNet(cross_ratio=0.25)
    q = noisy.poison(X, y, 0.25, target=1, seed=0)
    assert torch.equal(q.index, p.index) and torch.equal(q.X[p.index], p.X[p.index])
    changed = (q.X != X).flatten(1).any(1) & rest
    assert changed.sum() == 10 and torch.equal(q.y[rest], y[rest])
    assert not torch.equal(q.X[changed], atk(X[changed]))  # not the exact warp
    assert q.X.min() >= 0 and q.X.max() <= 1
    assert torch.equal(noisy.poison(X, y, 0.25, 1, seed=0).X, q.X)  # deterministic
    assert not torch.equal(noisy.poison(X, y, 0.25, 1, seed=1).X, q.X)
    state = torch.get_rng_state()
    noisy.poison(X, y, 0.25, 1, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG drawn


def test_wanet_bad_arguments():
    for k in (1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="k must"):
            attacks.WaNet(k=k)
    for s in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="strength"):
            attacks.WaNet(strength=s)
    for c in (-0.1, 1.0, "0"):
        with pytest.raises(ValueError, match="cross_ratio"):
            attacks.WaNet(cross_ratio=c)
    with pytest.raises(TypeError, match="seed"):
        attacks.WaNet(seed=1.5)
    with pytest.raises(ValueError, match="images"):
        attacks.WaNet()(torch.rand(3, 8))
    with pytest.raises(TypeError, match="X must be a floating tensor"):
        attacks.WaNet()(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="rate"):
        attacks.WaNet().poison(torch.rand(4, 1, 8, 8), torch.arange(4), 0.0, 1)


def test_wanet_takes_on_digits(digits, one_thread):
    p, r = _takes(attacks.WaNet(), digits, rate=0.1, target=0)
    assert len(p.index) == 126
    assert r["acc"] >= 0.9 and r["asr"] >= 0.8, r


# --------------------------------------------------------------------------------------------
# LabelConsistent
# --------------------------------------------------------------------------------------------

def test_label_consistent_apply_stamps_four_corners():
    X = _images((4, 1, 8, 8))
    X0 = X.clone()
    out = attacks.LabelConsistent()(X)
    assert torch.equal(X, X0) and out.shape == X.shape and out.dtype == X.dtype
    patch = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    for rows in (slice(0, 3), slice(5, 8)):
        for cols in (slice(0, 3), slice(5, 8)):
            assert all(torch.equal(out[i, 0, rows, cols], patch) for i in range(4))
    assert torch.equal(out[:, :, 3:5], X[:, :, 3:5]) and torch.equal(out[..., 3:5], X[..., 3:5])
    one = attacks.LabelConsistent(corners=1)(X)
    assert torch.equal(one, attacks.BadNets(size=3)(X))
    # any Attack can stamp; on 32x32x3 the default patch still fits
    blend = attacks.Blend(0.2, seed=0)
    assert torch.equal(attacks.LabelConsistent(trigger=blend, corners=1)(X), blend(X))
    big = attacks.LabelConsistent()(_images((2, 3, 32, 32)))
    assert big.shape == (2, 3, 32, 32) and big.min() >= 0 and big.max() <= 1


def test_label_consistent_poison_without_surrogate_is_clean_label_badnets():
    X, y = _images((40, 1, 8, 8)), torch.arange(40) % 4
    X0, y0 = X.clone(), y.clone()
    atk = attacks.LabelConsistent()
    p = atk.poison(X, y, 0.1, target=2, seed=0)
    assert torch.equal(X, X0) and torch.equal(y, y0)
    assert len(p.index) == 4 and (y[p.index] == 2).all() and torch.equal(p.y, y)
    assert torch.equal(p.X[p.index], atk(X[p.index]))
    assert torch.equal(atk.poison(X, y, 0.1, 2, seed=0).X, p.X)
    assert not torch.equal(atk.poison(X, y, 0.1, 2, seed=1).index, p.index)
    # rate * N rows, at most the whole target class
    assert len(atk.poison(X, y, 1.0, 2).index) == 10
    with pytest.raises(ValueError, match="no sample"):
        atk.poison(X, y, 0.1, target=7)


def test_label_consistent_pgd_leaves_surrogate_alone(digits, surrogate):
    (Xtr, ytr), _ = digits
    X, y = Xtr[:32].clone(), ytr[:32].clone()
    net = models.DigitsCNN()
    net.load_state_dict(surrogate.state_dict())
    net.train()
    net.features[1].eval()  # a mixed train/eval state must come back as it was
    net.classifier.weight.requires_grad_(False)
    net.classifier.bias.grad = torch.ones_like(net.classifier.bias)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    rng = torch.get_rng_state()
    for random_start in (False, True):
        atk = attacks.LabelConsistent(net, eps=0.2, steps=5, random_start=random_start)
        with torch.no_grad():  # PGD needs gradients even if the caller turned them off
            Xa = atk.perturb(X, y, seed=0)
        assert torch.equal(X, Xtr[:32]) and Xa.shape == X.shape and Xa.dtype == X.dtype
        assert (Xa - X).abs().max() <= 0.2 + 1e-6 and Xa.min() >= 0 and Xa.max() <= 1
        assert torch.equal(atk.perturb(X, y, seed=0), Xa)  # deterministic
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad)
               for g, p in zip(grads, net.parameters()))
    # the perturbation makes the samples hard for the surrogate
    Xa = attacks.LabelConsistent(surrogate).perturb(X, y)
    with torch.no_grad():
        assert (surrogate(X).argmax(1) == y).float().mean() >= 0.9
        assert (surrogate(Xa).argmax(1) == y).float().mean() <= 0.2
    # poisoned rows: perturbed, then stamped; labels kept
    atk = attacks.LabelConsistent(surrogate)
    p = atk.poison(X, y, 0.1, target=int(y[0]), seed=0)
    assert torch.equal(p.y, y)
    assert torch.equal(p.X[p.index], atk(atk.perturb(X[p.index], y[p.index])))
    assert not torch.equal(p.X[p.index], atk(X[p.index]))


def test_label_consistent_bad_arguments():
    with pytest.raises(TypeError, match="surrogate"):
        attacks.LabelConsistent(surrogate=lambda x: x)
    for eps in (-0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="eps"):
            attacks.LabelConsistent(eps=eps)
    for steps in (0, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            attacks.LabelConsistent(steps=steps)
    with pytest.raises(ValueError, match="step_size"):
        attacks.LabelConsistent(step_size=0)
    with pytest.raises(TypeError, match="trigger"):
        attacks.LabelConsistent(trigger=lambda x: x)
    for corners in (0, 2, True):
        with pytest.raises(ValueError, match="corners"):
            attacks.LabelConsistent(corners=corners)
    atk = attacks.LabelConsistent(models.DigitsCNN(), eps=0.1)
    with pytest.raises(ValueError, match="y must"):
        atk.perturb(torch.rand(3, 1, 8, 8), torch.arange(2))
    with pytest.raises(ValueError, match="images"):
        atk(torch.rand(3, 8))
    with pytest.raises(ValueError, match="does not fit"):
        atk(torch.rand(3, 1, 2, 2))


def test_label_consistent_takes_on_digits(digits, surrogate, one_thread):
    # half the target class poisoned (rate 0.05 of the set), default eps and four corners
    p, r = _takes(attacks.LabelConsistent(surrogate), digits, rate=0.05, target=2)
    (_, ytr), _ = digits
    assert len(p.index) == 63 and (ytr[p.index] == 2).all() and torch.equal(p.y, ytr)
    assert r["acc"] >= 0.9 and r["asr"] >= 0.8, r
