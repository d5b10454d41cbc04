"""MEDIC's settings table (``medic_fast.medic.recipes``): the one source of sanitize's, the CLI's
and the demo's defaults; ``recipe="paper"``; the step budget, augmentation, logit distillation
and threads."""
import math

import pytest
import torch
import torch.nn.functional as F

import medic_fast as mf
from medic_fast import cli
from medic_fast._utils import auto_threads, forward_macs, torch_threads, SMALL_BATCH_MACS
from medic_fast.data import RandomCropFlip
from medic_fast.medic import recipes
from medic_fast.medic.cloner import distill_loss
from medic_fast.zoo import models
from medic_fast.zoo.demo import DEMO_SETTINGS

torch.set_num_threads(1)


def _sanitize_parser():
    action = next(a for a in cli._parser()._actions if a.dest == "command")
    return action.choices["sanitize"]


def test_cli_defaults_are_the_table():
    """Every sanitize option the table holds defaults to None (or 'recipe') in the CLI and in
    the function, so both read the table; --help shows the table's values."""
    sub = _sanitize_parser()
    dests = {a.dest: a for a in sub._actions}
    for key, value in recipes.RECIPES["default"].items():
        if key in ("kd_temperature",):
            continue
        assert key in dests, key
        assert dests[key].default in (None, "recipe"), key
        if value is not None and key not in ("layers", "criterion", "stats"):
            assert str(value) in dests[key].help, key
    assert dests["recipe"].choices == tuple(recipes.RECIPES)


def test_paper_recipe_is_the_released_one():
    paper = recipes.recipe("paper")
    assert paper == {"layers": None, "tau": 5.0, "lam": 10.0, "criterion": "abs",
                     "stats": "channel", "epochs": 60, "min_steps": 0, "lr": 0.01,
                     "batch_size": 64, "weight_decay": 1e-4, "augment": "crop+flip", "kd": 0.0,
                     "kd_temperature": 4.0, "cache": "auto"}
    assert recipes.recipe("paper", tau=2.0)["tau"] == 2.0
    assert recipes.recipe("default", tau=None)["tau"] == recipes.RECIPES["default"]["tau"]
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipes.recipe("fast")
    with pytest.raises(ValueError, match="unknown recipe options"):
        recipes.recipe("default", taus=1.0)
    assert set(recipes.WHY) == set(recipes.RECIPES["default"])


def test_demo_reads_the_table():
    d = recipes.RECIPES["default"]
    for key in ("tau", "lam", "lr", "batch_size"):
        assert DEMO_SETTINGS[key] == d[key], key


def test_training_epochs_and_augment():
    assert recipes.training_epochs(60, 250, 1) == 250
    assert recipes.training_epochs(60, 250, 2) == 125
    assert recipes.training_epochs(60, 250, 40) == 60
    assert recipes.training_epochs(3, 0, 1) == 3
    x = torch.rand(2, 1, 8, 8)
    crop = recipes.make_augment("crop", x)
    assert isinstance(crop, RandomCropFlip) and crop.padding == 1 and not crop.flip
    both = recipes.make_augment("crop+flip", torch.rand(2, 3, 32, 32))
    assert both.padding == 4 and both.flip
    assert recipes.make_augment(None, x) is None
    fn = lambda t: t  # noqa: E731
    assert recipes.make_augment(fn, x) is fn
    with pytest.raises(ValueError, match="needs images"):
        recipes.make_augment("crop", torch.rand(2, 5))
    with pytest.raises(ValueError, match="augment must be"):
        recipes.make_augment("rotate", x)


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    return models.DigitsCNN((4, 8, 8)), (X, y)


def test_sanitize_step_budget(small):
    """min_steps extends the epochs of a small set; epochs given alone are exactly that many;
    the paper recipe trains its 60 epochs whatever the size."""
    model, data = small
    r = mf.sanitize(model, data, min_steps=7, epochs=2, progress=False)
    assert len(r.history) == 7  # 40 samples: one batch of 64 per epoch
    assert len(mf.sanitize(model, data, epochs=3, progress=False).history) == 3
    assert len(mf.sanitize(model, data, recipe="paper", epochs=2, progress=False).history) == 2
    with pytest.raises(ValueError, match="min_steps"):
        mf.sanitize(model, data, min_steps=-1, progress=False)
    with pytest.raises(ValueError, match="recipe must be one of"):
        mf.sanitize(model, data, recipe="fast", progress=False)


def test_sanitize_augment_and_kd_are_applied(small):
    """The recipe's augmentation reaches the loop (a different result than none), and kd adds a
    logged term; augment=None turns the paper recipe's crops off (it then equals the default
    recipe at the paper's tau, with the epochs given)."""
    model, data = small
    kw = dict(epochs=2, progress=False)
    plain = mf.sanitize(model, data, tau=recipes.RECIPES["paper"]["tau"], **kw)
    paper = mf.sanitize(model, data, recipe="paper", **kw)
    paper_none = mf.sanitize(model, data, recipe="paper", augment=None, **kw)
    assert plain.history[0]["loss"] == paper_none.history[0]["loss"]
    assert paper.history[0]["loss"] != paper_none.history[0]["loss"]
    kd = mf.sanitize(model, data, kd=0.5, **kw)
    assert "kd" in kd.history[0] and "kd" not in plain.history[0]
    assert kd.history[0]["loss"] == pytest.approx(
        kd.history[0]["ce"] + 10 * kd.history[0]["clone"] + 0.5 * kd.history[0]["kd"], rel=1e-5)
    default = mf.sanitize(model, data, **kw)
    assert default.history[0]["clone"] != plain.history[0]["clone"]  # tau 20, not 5


def test_distill_loss_against_float64():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g) * 3
    T = 2.5
    got = distill_loss(s, t, T)
    p = F.softmax(t.double() / T, 1)
    want = T ** 2 * (p * (p.log() - F.log_softmax(s.double() / T, 1))).sum(1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert s.grad.abs().sum() > 0
    assert distill_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    tok = torch.randn(2, 3, 7, generator=g)  # [B, T, V], classes last
    assert distill_loss(tok, tok.flip(0), 1.0, class_dim=-1) > 0


def test_threads_follow_model_size_and_are_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with torch_threads(0):
            pass
    macs = forward_macs(models.DigitsCNN(), torch.rand(64, 1, 8, 8))
    want = 64 * (16 * 9 * 64 + 32 * 16 * 9 * 64 + 32 * 32 * 9 * 16 + 512 * 10)
    assert macs == want
    assert auto_threads(macs) == 1 and macs < SMALL_BATCH_MACS
    assert auto_threads(math.inf) >= 1
