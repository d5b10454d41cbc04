"""The baseline defences of medic_fast.zoo.defences (distillation of logits, Fine-Pruning, NAD) on
a tiny BadNets-trojaned digits CNN, their objectives against float64 hand computations, and their
argument checks."""
import copy
import math

import pytest
import torch

import medic_fast as mf
from medic_fast.zoo import attacks, defences, models
from shared import badnets_trojan

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trojan():
    """A small BadNets-trojaned DigitsCNN, its clean split, a test split and the attack."""
    return badnets_trojan(epochs=6)


RUNS = {
    "distill": lambda m, d, **kw: defences.distill(m, d, epochs=2, **kw),
    "fine_prune": lambda m, d, **kw: defences.fine_prune(m, d, epochs=2, **kw),
    "nad": lambda m, d, **kw: defences.nad(m, d, epochs=2, teacher_epochs=1, **kw),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_defence_returns_a_new_model_and_is_deterministic(trojan, name):
    model, clean, (Xte, yte), atk = trojan
    before = copy.deepcopy(model.state_dict())
    kw = dict(progress=False, eval_data=(Xte, yte), trigger=atk, target=0, seed=3)
    r1 = RUNS[name](model, clean, **kw)
    r2 = RUNS[name](model, clean, **kw)
    assert r1.model is not model and not r1.model.training
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    assert len(r1.history) == 2
    for row in r1.history:
        assert 0 <= row["acc"] <= 1 and 0 <= row["asr"] <= 1 and math.isfinite(row["loss"])
    for a, b in zip(r1.model.state_dict().values(), r2.model.state_dict().values()):
        assert torch.equal(a, b)  # same seed, same model
    assert [{k: v for k, v in row.items() if k != "time"} for row in r1.history] == \
        [{k: v for k, v in row.items() if k != "time"} for row in r2.history]


# --------------------------------------------------------------------------------------------
# distillation of logits
# --------------------------------------------------------------------------------------------

def test_distill_objective_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    T, alpha = 2.5, 0.7
    loss, ce, kd = defences.distill_objective(s, t, y, temperature=T, alpha=alpha)
    sd, td = s.double(), t.double()
    ps, pt = torch.softmax(sd / T, 1), torch.softmax(td / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()  # KL(teacher || student), batch mean
    ce_hand = -torch.log_softmax(sd, 1)[torch.arange(6), y].mean()
    want = (1 - alpha) * ce_hand + alpha * T ** 2 * kl
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(kd) == pytest.approx(float(T ** 2 * kl), rel=1e-5)
    assert float(ce) == pytest.approx(float(ce_hand), rel=1e-5)
    s = s.requires_grad_()
    t = t.requires_grad_()
    defences.distill_objective(s, t, y, temperature=T, alpha=alpha)[0].backward()
    assert s.grad is not None and t.grad is None  # no gradient into the teacher


def test_distill_starts_from_scratch_and_factory_is_used(trojan):
    model, clean, _, _ = trojan
    built = []

    def factory():
        built.append(1)
        return models.DigitsCNN((8, 16, 16))

    r = defences.distill(model, clean, epochs=1, progress=False, factory=factory)
    assert built == [1] and {"ce", "kd"} <= set(r.history[0])


# --------------------------------------------------------------------------------------------
# Fine-Pruning
# --------------------------------------------------------------------------------------------

def test_fine_prune_keeps_pruned_channels_zero(trojan):
    model, clean, (Xte, yte), atk = trojan
    r = defences.fine_prune(model, clean, prune_ratio=0.5, max_acc_drop=1.0, epochs=2,
                            progress=False)
    assert isinstance(r, defences.PruneResult) and r.layer == "features.7"
    assert len(r.pruned) == 8  # no accuracy stop at max_acc_drop=1: floor(0.5 * 16)
    assert all(row["pruned"] == 8 for row in r.history)
    conv, bn = r.model.features[7], r.model.features[8]
    for c in r.pruned:
        assert torch.count_nonzero(conv.weight[c]) == 0
        assert float(bn.weight[c].detach()) == 0 and float(bn.bias[c].detach()) == 0
    kept = sorted(set(range(16)) - set(r.pruned))
    assert torch.count_nonzero(conv.weight[kept]) > 0
    with torch.no_grad():
        out = r.model.features(Xte[:32])
    assert torch.count_nonzero(out[:, r.pruned]) == 0
    assert not conv.weight._backward_hooks and not bn.bias._backward_hooks  # masks removed


def test_fine_prune_respects_ratio_and_accuracy_drop(trojan):
    model, clean, _, _ = trojan
    r = defences.fine_prune(model, clean, prune_ratio=0.2, max_acc_drop=1.0, epochs=1,
                            progress=False)
    assert len(r.pruned) == 3  # floor(0.2 * 16)
    # the least active channels go first: by mean ReLU output (after the BN) on the clean data
    with torch.no_grad():
        acts = model.features[:10](clean[0])
    assert r.pruned == acts.mean((0, 2, 3)).argsort(stable=True)[:3].tolist()
    # the stop: the longest run of the ranking whose every prefix loses <= max_acc_drop
    full = defences.fine_prune(model, clean, prune_ratio=0.99, max_acc_drop=1.0, epochs=1,
                               progress=False, layer="features.3").pruned
    assert len(full) == 15  # floor(0.99 * 16)
    base = mf.evaluate(model, *clean)["acc"]
    pruned, want = copy.deepcopy(model), []
    with torch.no_grad():
        for c in full:
            for p in (pruned.features[3].weight, pruned.features[4].weight,
                      pruned.features[4].bias):
                p[c] = 0
            if base - mf.evaluate(pruned, *clean)["acc"] > 0.02:
                break
            want.append(c)
    r0 = defences.fine_prune(model, clean, prune_ratio=0.99, max_acc_drop=0.02, epochs=1,
                             progress=False, layer=model.features[3])
    assert r0.layer == "features.3" and r0.pruned == want


# --------------------------------------------------------------------------------------------
# NAD
# --------------------------------------------------------------------------------------------

def test_attention_map_and_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 2, 3, generator=g), torch.randn(3, 4, 2, 3, generator=g)
    p = 3.0
    ad = a.double()
    want = torch.tensor([[sum(abs(float(ad[n, c, i, j])) ** p for c in range(4)) / 4
                          for i in range(2) for j in range(3)] for n in range(3)],
                        dtype=torch.float64)
    got = defences.attention_map(a, p)
    assert got.shape == (3, 6)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    ma, mb = want, defences.attention_map(b.double(), p)
    dist = ((ma / ma.norm(dim=1, keepdim=True) - mb / mb.norm(dim=1, keepdim=True))
            .norm(dim=1).mean())
    loss = defences.attention_loss([a, a], [b, b], p)
    assert float(loss) == pytest.approx(2 * float(dist), rel=1e-5)
    assert float(defences.attention_loss([a], [a.clone()], p)) == pytest.approx(0, abs=1e-6)


def test_nad_default_layers_and_history(trojan):
    model, clean, _, _ = trojan
    assert defences.nad_layers(model, clean[0][:4]) == ["features.5", "features.9"]
    r = defences.nad(model, clean, epochs=1, teacher_epochs=1, progress=False,
                     layers=["features.2", "features.9"])
    assert {"ce", "at"} <= set(r.history[0]) and r.history[0]["at"] >= 0


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda m, d: defences.distill(m, d, temperature=0), "temperature"),
    (lambda m, d: defences.distill(m, d, temperature=-1.0), "temperature"),
    (lambda m, d: defences.distill(m, d, alpha=1.5), r"alpha must be a number in \[0, 1\]"),
    (lambda m, d: defences.distill(m, d, alpha=-0.1), "alpha"),
    (lambda m, d: defences.distill(m, d, epochs=0), "epochs"),
    (lambda m, d: defences.fine_prune(m, d, prune_ratio=0), r"prune_ratio .*\(0, 1\)"),
    (lambda m, d: defences.fine_prune(m, d, prune_ratio=1.0), "prune_ratio"),
    (lambda m, d: defences.fine_prune(m, d, max_acc_drop=-0.1), "max_acc_drop"),
    (lambda m, d: defences.fine_prune(m, d, layer="nope"), "not a submodule"),
    (lambda m, d: defences.fine_prune(m, d, layer="features.8"), "not a convolution"),
    (lambda m, d: defences.nad(m, d, beta=-1), "beta"),
    (lambda m, d: defences.nad(m, d, p=0), "p must be"),
    (lambda m, d: defences.nad(m, d, teacher_epochs=0), "teacher_epochs"),
    (lambda m, d: defences.nad(m, d, layers=["nope"]), "not a submodule"),
    (lambda m, d: defences.nad(m, d, trigger=attacks.BadNets()), "target"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments(trojan, call, match):
    model, clean, _, _ = trojan
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        call(model, clean)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fine_prune_refuses_a_model_without_conv():
    X = torch.randn(20, 3)
    y = torch.randint(0, 2, (20,))
    with pytest.raises(ValueError, match="no conv layer"):
        defences.fine_prune(models.MLP(3, 2, (4,)), (X, y), progress=False)
