"""Shadow calibration (medic_fast/clear/shadows.py, ``scan(shadows=N, factory=...)``): the rule's
false-alarm rate, on draws and on a small seeded family of real clean models; the cache; the
report's fields; the refusals; ``medic-fast scan --shadows``."""
import json
import sys
import textwrap

import pytest
import torch

import medic_fast
from medic_fast import cli
from medic_fast._utils import torch_threads
from medic_fast.clear import calibrate, shadows
from medic_fast.zoo.models import MLP

CENTRES = torch.tensor([[0.0, 0], [4, 0], [0, 4]])
FAST = dict(epochs=30)  # a shadow's training: 30 epochs of one or two batches


@pytest.fixture(autouse=True)
def one_thread_and_own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIC_FAST_CACHE", str(tmp_path / "cache"))
    with torch_threads(1):
        yield


def blobs(seed: int, per_class: int = 60):
    """Three Gaussian blobs in 2-D, ``per_class`` samples each."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat(per_class)
    return CENTRES[y] + torch.randn(len(y), 2, generator=g), y


def factory():
    return MLP(2, 3, (16, 16))


def test_the_bound_is_exceeded_at_the_stated_rate_by_log_normal_maxima():
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 12):
        draws = (1 + 0.5 * torch.randn(4000, n + 1, generator=g)).exp()  # all > 1 but rarely
        over = sum(float(d[-1]) > shadows.threshold_for(d[:-1].tolist(), 0.05) for d in draws)
        assert 0.04 < over / len(draws) < 0.06, (n, over)
    # a depth at most 1 is no pocket: it counts as 1 (log 0)
    assert shadows.threshold_for([0.0, 0.5, 1.0], 0.05) == 1.0
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"false_alarm must be a number in \(0, 1\)"):
            shadows.threshold_for([2.0, 3.0], bad)
    with pytest.raises(ValueError, match="at least 2"):
        shadows.threshold_for([2.0], 0.05)


def test_false_alarm_rate_on_a_small_seeded_family_of_clean_models():
    """Calibrated on the scan data with 5 shadows, 8 other clean models (trained on another draw,
    as a model to scan is trained on data the scan never sees) are flagged at most once; the
    threshold is no blanket refusal to flag (below 3x the shadows' largest depth)."""
    data = blobs(0)
    first = shadows._train(factory, blobs(100), 100, {**shadows.TRAIN, **FAST}, "cpu")
    r = medic_fast.scan(first, data, shadows=5, factory=factory, shadow_train=FAST)
    assert r.threshold_source == "shadows" and len(r.calibration["maxima"]) == 5
    assert r.threshold < 3 * max(r.calibration["maxima"])
    alarms = 0
    for seed in range(101, 109):
        model = shadows._train(factory, blobs(seed), seed, {**shadows.TRAIN, **FAST}, "cpu")
        alarms += medic_fast.scan(model, data, threshold=r.threshold).flagged
    assert alarms <= 1, f"{alarms}/8 clean models flagged at false_alarm 0.05"


def test_the_second_call_trains_nothing_and_the_key_follows_data_architecture_and_seed(tmp_path):
    data = blobs(0)
    model = factory()
    kw = dict(shadows=3, factory=factory, shadow_train=FAST)
    first = medic_fast.scan(model, data, **kw).calibration
    assert (first["trained"], first["scanned"]) == (3, 3) and first["train_seconds"] > 0
    files = sorted((tmp_path / "cache" / "shadows").glob("*.pt"))
    assert [f.name for f in files] == [f"{first['cache']}-{i}.pt" for i in range(3)]
    again = medic_fast.scan(model, data, **kw)
    assert (again.calibration["trained"], again.calibration["scanned"]) == (0, 0)
    assert again.calibration["maxima"] == first["maxima"]
    assert again.calibration["train_seconds"] == again.calibration["scan_seconds"] == 0
    other = medic_fast.scan(model, data, k=6, **kw).calibration  # another search: scans again
    assert (other["trained"], other["scanned"]) == (0, 3)

    recipe = {**shadows.TRAIN, **FAST}
    key = shadows.shadow_key(model, data, 0, recipe)
    moved = (data[0] + 1e-3, data[1])
    assert key == shadows.shadow_key(factory(), blobs(0), 0, recipe)  # not the initial weights
    assert len({key, shadows.shadow_key(model, moved, 0, recipe),
                shadows.shadow_key(MLP(2, 3, (16, 17)), data, 0, recipe),
                shadows.shadow_key(model, data, 1, recipe),
                shadows.shadow_key(model, data, 0, {**recipe, "lr": 1e-3})}) == 5


def test_the_report_says_which_threshold_rule_was_used():
    data = blobs(0)
    model = factory()
    fixed, given = medic_fast.scan(model, data), medic_fast.scan(model, data, threshold=4.0)
    assert (fixed.threshold_source, fixed.threshold, fixed.calibration) == ("fixed", 10.0, {})
    assert (given.threshold_source, given.threshold) == ("given", 4.0)
    r = medic_fast.scan(model, data, shadows=3, factory=factory, false_alarm=0.1,
                        shadow_train=FAST)
    d = json.loads(r.to_json())
    assert d["threshold_source"] == "shadows" and d["threshold"] == r.threshold
    c = d["calibration"]
    assert c["false_alarm"] == 0.1 and c["shadows"] == 3 and c["incomplete"] == 0
    assert r.threshold == pytest.approx(shadows.threshold_for(c["maxima"], 0.1))
    assert {"rule", "trained", "scanned", "train_seconds", "scan_seconds", "cache",
            "cache_dir"} <= set(c)
    assert 0 < r.timing["shadows"] <= r.timing["total"]
    assert r.pairs == [p for p in r.pairs if p[2] > r.threshold]
    assert "(shadows)" in repr(r)
    # calibrate() with false_alarm applies the same rule to clean models the user has
    models = [model, factory()]
    assert calibrate(models, data, false_alarm=0.1) == pytest.approx(
        shadows.threshold_for([float(medic_fast.scan(m, data).P.nan_to_num(0).max())
                               for m in models], 0.1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(shadows=3), "needs factory"),
    (dict(shadows=1, factory=factory), "shadows must be an int >= 2"),
    (dict(factory=factory), "shadows must be an int >= 2"),
    (dict(shadows=3, factory=factory, method="paper"), "shadows calibrate method='hull'"),
    (dict(shadows=3, factory=factory, threshold=5.0), "give threshold or shadows, not both"),
    (dict(shadows=3, factory=factory, false_alarm=1.0), r"false_alarm must be a number in"),
    (dict(shadows=3, factory=factory, shadow_train=dict(epoch=3)), "shadow_train takes the keys"),
    (dict(shadows=3, factory=factory, shadow_train=dict(lr=0)), r"shadow_train\['lr'\]"),
])
def test_bad_shadow_settings_are_refused_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        medic_fast.scan(factory(), blobs(0), **kwargs)


def test_a_factory_that_returns_no_module_is_refused():
    with pytest.raises(TypeError, match="factory must return an nn.Module"):
        medic_fast.scan(factory(), blobs(0), shadows=2, factory=lambda: "mlp")


def test_cli_shadows_builds_the_shadows_from_model(tmp_path, monkeypatch, capsys):
    from test_scan_cli import USER_MODULE  # the tiny user model and data of the CLI's tests

    monkeypatch.chdir(tmp_path)
    (tmp_path / "usermod.py").write_text(textwrap.dedent(USER_MODULE))
    torch.manual_seed(1)
    torch.save(factory().state_dict(), tmp_path / "in.pt")
    args = ["scan", "--model", "usermod:model", "--weights", "in.pt", "--data", "usermod:data",
            "--threads", "1", "--no-progress"]
    try:
        status = cli.main(args + ["--shadows", "3", "--false-alarm", "0.1"])
        report = json.loads(capsys.readouterr().out)
        assert status in (0, 1) and report["threshold_source"] == "shadows"
        assert report["calibration"]["shadows"] == 3 and report["calibration"]["trained"] == 3
        assert report["calibration"]["false_alarm"] == 0.1
        assert cli.main(args + ["--shadows", "3", "--threshold", "2"]) == 2
        assert "give --threshold or --shadows, not both" in capsys.readouterr().err
        assert cli.main(args + ["--shadows", "3", "--method", "paper"]) == 2
        assert "--shadows calibrates --method hull" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            cli.main(args + ["--shadows", "1"])
        assert "--shadows: must be an integer >= 2" in capsys.readouterr().err
    finally:
        sys.modules.pop("usermod", None)
