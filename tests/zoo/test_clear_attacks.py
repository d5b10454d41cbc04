"""CLEAR's clean-label feature-space attacks (Feature Collision, Convex Polytope, Bullseye
Polytope) and the victim draw: shapes, budgets, range, inputs and the feature network untouched,
determinism, argument checks, the objective decreasing, and whether each attack takes on the
Swiss roll in the transfer-learning setting (head = the last two Linear layers retrained on the
clean training set with the poisons in place of their bases)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medic_fast.data import make_loader, split
from medic_fast.train import fit
from medic_fast.zoo import attacks
from medic_fast.zoo.datasets import load_swiss_roll
from medic_fast.zoo.models import MLP

ATTACKS = [attacks.FeatureCollision, attacks.ConvexPolytope, attacks.BullseyePolytope]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(model, data, epochs, seed):
    fit(model, make_loader(data, batch_size=128, shuffle=True, seed=seed),
        lambda x, y: (F.cross_entropy(model(x), y), {}), epochs=epochs, lr=3e-3,
        schedule="constant", seed=seed)


@pytest.fixture(scope="module")
def roll():
    """A clean MLP on 1000 Swiss-roll points (x, z), 70/30 split; test accuracy about 0.99."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y = load_swiss_roll(1000, n_classes=4, noise=0.3, seed=0)
        train, test = split(X[:, [0, 2]], y, [0.7, 0.3], seed=0)
        torch.manual_seed(0)
        model = MLP(2, 4, (64, 64, 64, 64))
        _train(model, train, 60, 0)
        return model.eval(), train, test
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def images():
    """A small conv feature network in train mode with a frozen layer, and image data."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    net[0].weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(20, 1, 8, 8, generator=gen)
    y = torch.arange(20) % 3
    victim = torch.rand(1, 8, 8, generator=gen)
    return net, X, y, victim


def _state(net):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
            [p.grad for p in net.parameters()])


@pytest.mark.parametrize("cls", ATTACKS)
@pytest.mark.parametrize("norm,budget", [("linf", 0.05), ("l2", 0.5)])
def test_shape_range_budget_and_untouched(cls, norm, budget, images):
    net, X, y, victim = images
    net.train()
    before = _state(net)
    X0, y0, v0 = X.clone(), y.clone(), victim.clone()
    p = cls(net, budget=budget, norm=norm, steps=20).poison_for(X, y, victim, 2, 3, seed=0)
    assert p.X.shape == X.shape and p.y.shape == y.shape and p.X.dtype == X.dtype
    assert torch.equal(p.y, y)  # clean-label
    assert len(p.index) == 3 and bool((y[p.index] == 2).all())
    assert torch.equal(p.index, p.index.sort().values)
    rest = torch.ones(len(X), dtype=torch.bool)
    rest[p.index] = False
    assert torch.equal(p.X[rest], X[rest])  # only the bases are replaced
    delta = (p.X[p.index] - X[p.index]).flatten(1)
    assert float(delta.abs().max()) > 0
    if norm == "linf":
        assert float(delta.abs().max()) <= budget + 1e-6
    else:
        assert float(delta.norm(dim=1).max()) <= budget + 1e-5
    assert float(p.X.min()) >= 0 and float(p.X.max()) <= 1
    # inputs and the feature network untouched
    assert torch.equal(X, X0) and torch.equal(y, y0) and torch.equal(victim, v0)
    after = _state(net)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert all(m.training for m in net.modules())
    assert not net[0].weight.requires_grad and net[0].bias.requires_grad


@pytest.mark.parametrize("cls", ATTACKS)
def test_deterministic_and_objective_decreases(cls, roll):
    model, (Xtr, ytr), (Xte, yte) = roll
    v = attacks.draw_victim(yte, 4, seed=1)
    kw = dict(budget=0.5, norm="l2", steps=100, clamp=None)
    att = cls(model.layers[:6], **kw)
    p = att.poison_for(Xtr, ytr, Xte[v.index], v.target, 5, seed=1)
    q = cls(model.layers[:6], **kw).poison_for(Xtr, ytr, Xte[v.index], v.target, 5, seed=1)
    assert torch.equal(p.X, q.X) and torch.equal(p.index, q.index)
    before = att.objective(Xtr[p.index], Xte[v.index])
    after = att.objective(p.X[p.index], Xte[v.index])
    assert after < before / 2, (before, after)
    # no clamp: poisons may leave the data's range, but not the budget
    assert float((p.X[p.index] - Xtr[p.index]).norm(dim=1).max()) <= 0.5 + 1e-5


def test_random_bases_follow_seed(images):
    net, X, y, victim = images
    att = attacks.BullseyePolytope(net, budget=0.05, steps=2, bases="random")
    a, b = (att.poison_for(X, y, victim, 1, 3, seed=s).index for s in (0, 0))
    assert torch.equal(a, b)
    assert any(not torch.equal(a, att.poison_for(X, y, victim, 1, 3, seed=s).index)
               for s in range(1, 6))


def test_convex_polytope_coefficients_on_simplex(roll):
    model, (Xtr, ytr), (Xte, yte) = roll
    att = attacks.ConvexPolytope(model.layers[:6], budget=0.3, norm="l2", steps=30, clamp=None)
    att.poison_for(Xtr, ytr, Xte[0], int(yte[0] + 1) % 4, 4)
    c = att.coeffs
    assert c.shape == (4,) and float(c.min()) >= 0 and abs(float(c.sum()) - 1) < 1e-5
    s = attacks._project_simplex(torch.tensor([0.5, 2.0, -1.0]))
    assert torch.allclose(s, torch.tensor([0.0, 1.0, 0.0]))


def test_plain_callable_features(images):
    net, X, y, victim = images
    net.eval()
    p = attacks.FeatureCollision(lambda x: net(x), budget=0.05, steps=5, beta=0.1).poison_for(
        X, y, victim, 0, 1)
    assert len(p.index) == 1 and all(p.grad is None for p in net.parameters())


def test_bad_arguments(images):
    net, X, y, victim = images
    with pytest.raises(TypeError, match="features"):
        attacks.FeatureCollision(3, budget=0.1)
    with pytest.raises(ValueError, match="budget"):
        attacks.FeatureCollision(net, budget=0)
    with pytest.raises(ValueError, match="norm"):
        attacks.ConvexPolytope(net, budget=0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        attacks.BullseyePolytope(net, budget=0.1, steps=0)
    with pytest.raises(ValueError, match="lr"):
        attacks.BullseyePolytope(net, budget=0.1, lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        attacks.FeatureCollision(net, budget=0.1, beta=-1)
    with pytest.raises(ValueError, match="clamp"):
        attacks.FeatureCollision(net, budget=0.1, clamp=(1, 0))
    with pytest.raises(ValueError, match="bases"):
        attacks.FeatureCollision(net, budget=0.1, bases="first")
    with pytest.raises(ValueError, match="coeff_steps"):
        attacks.ConvexPolytope(net, budget=0.1, coeff_steps=-1)
    with pytest.raises(TypeError, match="module"):
        attacks.FeatureCollision(net, budget=0.1, module="net")
    att = attacks.FeatureCollision(net, budget=0.1, steps=2)
    with pytest.raises(ValueError, match="n_poisons"):
        att.poison_for(X, y, victim, 0, 0)
    with pytest.raises(ValueError, match="fewer than n_poisons"):
        att.poison_for(X, y, victim, 0, 100)
    with pytest.raises(TypeError, match="target"):
        att.poison_for(X, y, victim, 0.5, 1)
    with pytest.raises(ValueError, match="victim_x"):
        att.poison_for(X, y, victim[:, :4], 0, 1)
    with pytest.raises(ValueError, match="y must"):
        att.poison_for(X, y[:5], victim, 0, 1)
    with pytest.raises(TypeError, match="poison_for"):
        att.poison(X, y, 0.1, 0)
    with pytest.raises(ValueError, match="features must map"):
        attacks.FeatureCollision(lambda x: x.sum(), budget=0.1).poison_for(X, y, victim, 0, 1)


def test_draw_victim_is_tasks_draw():
    """draw_victim makes exactly zoo.tasks._task's draws (source, target, then the row that
    LabelFlip(source).poison picks), so tasks.py could use it."""
    y = torch.arange(200) % 4
    for seed in range(8):
        v = attacks.draw_victim(y, 4, seed)
        gen = torch.Generator().manual_seed(seed)
        source = int(torch.randint(4, (1,), generator=gen))
        target = (source + 1 + int(torch.randint(3, (1,), generator=gen))) % 4
        p = attacks.LabelFlip(source).poison(torch.zeros(200, 2), y, 1 / 200, target, seed)
        assert (v.source, v.target) == (source, target) and v.source != v.target
        assert p.index.tolist() == [v.index] and int(y[v.index]) == source
    assert attacks.draw_victim(y, 4, 3) == attacks.draw_victim(y, 4, 3)
    with pytest.raises(ValueError, match="classes"):
        attacks.draw_victim(y, 1)
    with pytest.raises(ValueError, match="y must"):
        attacks.draw_victim(y.float(), 4)
    with pytest.raises(ValueError, match="source class"):
        attacks.draw_victim(torch.zeros(5, dtype=torch.long), 4, 1)  # seed 1 draws source 3


def _take(model, train, test, cls, seed, n_poisons, budget):
    """Poison against draw_victim(test labels, seed); retrain the last two Linear layers on the
    poisoned set; (victim's class before, after, target, clean accuracy before, after)."""
    Xte, yte = test
    v = attacks.draw_victim(yte, 4, seed)
    vx = Xte[v.index]
    p = cls(model.layers[:6], budget=budget, norm="l2", steps=200, clamp=None).poison_for(
        *train, vx, v.target, n_poisons, seed)
    net = copy.deepcopy(model).requires_grad_(False)
    for m in [m for m in net.modules() if isinstance(m, nn.Linear)][-2:]:
        m.requires_grad_(True)
    _train(net, (p.X, p.y), 30, seed)
    net.eval()
    with torch.no_grad():
        acc0 = float((model(Xte).argmax(1) == yte).float().mean())
        acc = float((net(Xte).argmax(1) == yte).float().mean())
        return (int(model(vx[None]).argmax()), int(net(vx[None]).argmax()), v.target, acc0, acc)


def test_feature_collision_takes_on_swiss_roll(roll):
    """50 poisons (of ~175 target-class training points), L2 budget 1.0 (the standardised roll
    spans about +-2). Not reliable, so this is a regression test on a case known to take:
    on this module's roll, victim seeds 0-7 take 3 of 8 (0, 1, 7; clean accuracy drops <= 3.3
    points); over rolls 0-5 (each its own model, victim seed = roll seed) 3 of 6. It fails where
    the target class is too far from the victim along the 2-D roll for a budgeted move to
    collide, or the collided poisons do not outweigh the victim's clean neighbours. Victim
    seed 1 here."""
    model, train, test = roll
    before, after, target, acc0, acc = _take(model, train, test, attacks.FeatureCollision, 1,
                                             50, 1.0)
    assert before != target and after == target
    assert acc0 - acc < 0.05


# Convex Polytope and Bullseye Polytope have no take test: on the 2-D Swiss roll they took on
# 0/8 victim seeds and 0/6 rolls (5 or 20 poisons, L2 budget 0.5 or 1.0), although their
# objective reached ~0 on half the rolls; the figures are in the notes.
