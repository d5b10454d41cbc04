"""CLEAR's figures: ScanReport.plot (the P heatmap), clear.plots.decision_regions and
pocket_inputs, and the message without matplotlib (an optional dependency: the plot extra)."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from medic_fast._utils import torch_threads

import medic_fast
from medic_fast.capture import ActivationCapture
from medic_fast.clear import plots

PNG = b"\x89PNG\r\n\x1a\n"



@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def swiss():
    """The poisoned Swiss-roll task (seed 0) and a short real scan of it."""
    pytest.importorskip("matplotlib")
    from medic_fast.zoo.tasks import swiss_roll_task

    with torch_threads(1):  # module fixtures are set up before the autouse one above
        task = swiss_roll_task(seed=0)
        report = medic_fast.scan(task.model, task.val, method="paper", restarts=2, steps=200,
                                 threads=1)
    return task, report


def _axes():
    from matplotlib.figure import Figure

    return Figure().add_subplot()


def _features(model, X, cut):
    with ActivationCapture(model, [cut], inputs=True) as cap, torch.no_grad():
        model(X)
        return cap.outputs()[0]


# ------------------------------------------------------------------------------------------------
# The heatmap of P
# ------------------------------------------------------------------------------------------------

def test_heatmap_of_a_real_scan(swiss, tmp_path):
    _, report = swiss
    pyplot = "matplotlib.pyplot" in sys.modules
    fig = report.plot(tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    assert fig.axes[0].get_title().startswith(
        f"CLEAR scan: {'flagged: target class' if report.flagged else report.verdict}")
    report.plot(str(tmp_path / "p.svg"))  # the type from the extension
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")
    assert ("matplotlib.pyplot" in sys.modules) == pyplot  # no pyplot, no global state


def test_heatmap_blanks_cells_not_searched_and_outlines_flagged_pairs(swiss, tmp_path):
    from matplotlib.patches import Rectangle

    _, real = swiss
    P = torch.tensor([[math.nan, 0.9, 0.0, 0.6],
                      [math.nan, math.nan, math.nan, math.nan],   # class 1 skipped
                      [0.1, 0.0, math.nan, 0.2],
                      [0.0, 0.5, 0.0, math.nan]])
    report = dataclasses.replace(real, P=P, threshold=0.5, verdict="flagged", target=1,
                                 pairs=[(0, 1, 0.9), (0, 3, 0.6)], skipped={1: 2})
    ax = _axes()
    fig = report.plot(None, ax=ax)
    assert fig is ax.figure
    shown = ax.images[0].get_array()
    assert (shown.mask == torch.isnan(P).numpy()).all()  # NaN cells masked: drawn grey
    outlined = sorted(p.get_xy() for p in ax.patches if isinstance(p, Rectangle))
    assert outlined == [(0.5, -0.5), (2.5, -0.5)]  # (target - 0.5, source - 0.5); not P = 0.5
    assert ax.get_title().startswith("CLEAR scan: flagged: target class 1")
    assert "threshold 0.5" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1 (skipped)", "2", "3"]
    bar = fig.axes[1]
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in bar.lines)  # threshold line
    # nothing searched at all (every class skipped): P all NaN still draws
    empty = dataclasses.replace(real, P=torch.full((3, 3), math.nan), pairs=[],
                                verdict="inconclusive", target=None, skipped={0: 1, 1: 0, 2: 3})
    assert empty.plot(None, ax=_axes()).axes[0].get_title().startswith("CLEAR scan: inconclusive")
    empty.plot(tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="path"):
        report.plot(None)


# ------------------------------------------------------------------------------------------------
# Decision regions on 2-D inputs
# ------------------------------------------------------------------------------------------------

def test_decision_regions_on_the_swiss_roll(swiss, tmp_path):
    task, report = swiss
    X, y = task.val
    task.model.train()
    fig = plots.decision_regions(task.model, X, y, tmp_path / "r.png", report=report,
                                 attacked=task.target_x, target=task.target, resolution=80)
    assert task.model.training  # its mode is restored
    assert (tmp_path / "r.png").read_bytes().startswith(PNG)
    ax = fig.axes[0]
    labels = {c.get_label(): c for c in ax.collections}
    assert len(labels["samples"].get_offsets()) == len(X)
    star = labels[f"attacked sample (attack: class {task.target})"].get_offsets()
    assert torch.allclose(torch.as_tensor(star.data, dtype=torch.float32), task.target_x)
    if report.n_found:
        assert len(labels["pocket centroids"].get_offsets()) == report.n_found
    # the grid's classes are the model's
    grid = ax.images[0].get_array()
    assert grid.shape == (80, 80) and set(grid.ravel().tolist()) <= set(range(4))


def test_pocket_centroids_are_mapped_to_the_input_with_the_nearest_features(swiss):
    task, report = swiss
    X, y = task.val
    model, cut = task.model.eval(), report.cut
    pick = torch.tensor([3, 17, 42])
    found, dist = plots.pocket_inputs(model, _features(model, X[pick], cut), cut, X[:200])
    assert torch.equal(found, X[pick]) and (dist < 1e-4).all()
    # a report whose pockets are the features of known points: drawn at the grid point nearest
    # in feature space, which is near the point in input space too
    fake = dataclasses.replace(report, pocket_samples=_features(model, X[pick], cut),
                               pocket_sources=y[pick], pocket_targets=(y[pick] + 1) % 4)
    ax = _axes()
    plots.decision_regions(model, X, y, report=fake, resolution=60, ax=ax)
    drawn = next(c for c in ax.collections if c.get_label() == "pocket centroids")
    drawn = torch.as_tensor(drawn.get_offsets().data, dtype=torch.float32)
    cell = (X.max(0).values - X.min(0).values) * 1.2 / 59
    assert ((drawn - X[pick]).abs() <= 2 * cell).all()
    with pytest.raises(ValueError, match="features"):
        plots.pocket_inputs(model, torch.zeros(2, 7), cut, X[:10])


def test_decision_regions_needs_2d_inputs(swiss, tmp_path):
    task, report = swiss
    X, y = task.val
    for bad in (torch.cat([X, X[:, :1]], 1), X[:, None, :], X[:, 0]):  # [N, 3], [N, 1, 2], [N]
        with pytest.raises(ValueError, match=r"2-D inputs: X must be \[N, 2\]"):
            plots.decision_regions(task.model, bad, y, tmp_path / "r.png")
    with pytest.raises(ValueError, match="attacked must be"):
        plots.decision_regions(task.model, X, y, tmp_path / "r.png", attacked=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="labels"):
        plots.decision_regions(task.model, X, y[:-1], tmp_path / "r.png")
    with pytest.raises(ValueError, match="report"):
        plots.decision_regions(task.model, X, y, tmp_path / "r.png", cut=report.cut)
    assert not (tmp_path / "r.png").exists()


# ------------------------------------------------------------------------------------------------
# Without matplotlib
# ------------------------------------------------------------------------------------------------

def _hide_matplotlib(monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_the_error_names_the_extra(monkeypatch, tmp_path):
    X = torch.randn(20, 2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    report = medic_fast.scan(model, (X, model(X).argmax(1).detach()), method="paper", k=2, n=2,
                             restarts=1, steps=1, backend="reference", threads=1)
    _hide_matplotlib(monkeypatch)
    for draw in (lambda: report.plot(tmp_path / "p.png"),
                 lambda: plots.decision_regions(model, X, torch.zeros(20), tmp_path / "p.png")):
        with pytest.raises(ModuleNotFoundError) as e:
            draw()
        assert 'pip install "medic_fast[plot]"' in str(e.value)
        assert 'pip install -e ".[plot]"' in str(e.value)
    assert not (tmp_path / "p.png").exists()


def test_importing_medic_fast_never_needs_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import medic_fast, medic_fast.clear.plots, medic_fast.cli\n"
            "medic_fast.cli._parser()\n"
            "assert not [m for m in sys.modules if m.startswith('matplotlib.')]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
