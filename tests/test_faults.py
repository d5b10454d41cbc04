"""Fault injection: processes killed mid-write, non-finite clean data or weights, no compiler."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import medic_fast
from medic_fast._utils import save_atomic
from medic_fast.zoo import models
from shared import digits

pytestmark = pytest.mark.faults

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Atomic saves
# --------------------------------------------------------------------------------------------

def test_save_atomic_removes_the_temp_file_of_a_killed_writer(tmp_path):
    """A writer SIGKILLed inside torch.save leaves ``<target>.tmp<pid>``; the next save of the
    same target removes it, and only temp files of that target whose process is gone."""
    target = tmp_path / "ckpt.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from medic_fast._utils import save_atomic
        torch.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        save_atomic({{"x": 1}}, {str(target)!r})
    """)
    with subprocess.Popen([sys.executable, "-c", script]) as killed:
        assert killed.wait(timeout=120) == -9
    stale = tmp_path / f"ckpt.pt.tmp{killed.pid}"
    assert stale.exists() and not target.exists()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            keep = [tmp_path / f"ckpt.pt.tmp{alive.pid}",   # a writer still at work
                    tmp_path / f"other.pt.tmp{killed.pid}",      # another target's
                    tmp_path / "ckpt.pt.tmpx"]               # not ours
            for p in keep:
                p.write_bytes(b"partial")
            save_atomic({"x": 2}, target)
        finally:
            alive.kill()
    assert not stale.exists() and all(p.exists() for p in keep)
    assert torch.load(target, weights_only=True) == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt.pt", *(p.name for p in keep)])


def test_save_atomic_errors_name_the_target_not_the_temp_file(tmp_path):
    path = tmp_path / "missing" / "ckpt.pt"
    with pytest.raises(FileNotFoundError) as e:
        save_atomic({"x": 1}, path)
    assert str(path) in str(e.value) and ".tmp" not in str(e.value)


# --------------------------------------------------------------------------------------------
# Non-finite clean data or weights
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_collect_stats_names_the_first_non_finite_sample(bad):
    torch.manual_seed(0)
    model = models.DigitsCNN((4, 6, 8))
    X, y = digits(100)
    X[70, 0, 3, 3] = X[90, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=r"data: sample 70 has NaN or infinite values"):
        medic_fast.collect_stats(model, (X, y), batch_size=32)


def test_collect_stats_names_the_first_layer_that_is_not_finite():
    torch.manual_seed(0)
    model = models.DigitsCNN((4, 6, 8))
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = float("nan")
    X, y = digits(40)
    with pytest.raises(ValueError, match=r"data: the output of layer 'features\.3' is not finite "
                       r"\(NaN or inf\) on sample 0, while the inputs are finite"):
        medic_fast.collect_stats(model, (X, y), batch_size=5)


def test_collect_stats_ignores_non_finite_padding():
    """Rows left out by the mask do not count, finite or not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    X, y = torch.randn(10, 5, 4), torch.zeros(10, dtype=torch.long)
    X[3, 4] = float("nan")
    with pytest.raises(ValueError, match="data: sample 3 has NaN"):
        medic_fast.collect_stats(model, (X, y), ["0"], batch_size=4)
    stats = medic_fast.collect_stats(model, (X, y), ["0"], batch_size=4,
                                     mask_fn=lambda x: ~x.isnan().any(-1))
    assert torch.isfinite(stats.mean[0]).all() and torch.isfinite(stats.std[0]).all()


def _mlp_and_data(n=60):
    torch.manual_seed(0)
    X = torch.randn(n, 3)
    return models.MLP(3, 2, (16, 16)), (X, (X[:, 0] > 0).long())


def test_scan_names_the_first_non_finite_sample():
    model, (X, y) = _mlp_and_data(300)
    X[260, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data: sample 260 has NaN or infinite values"):
        medic_fast.scan(model, (X, y))
    with torch.no_grad():
        model.layers[2].bias[3] = float("inf")
    with pytest.raises(ValueError, match=r"output of layer 'layers\.2' is not finite .*sample 0,"):
        medic_fast.scan(model, (X[:200], y[:200]))


def test_patch_names_the_first_non_finite_sample_it_uses():
    model, (X, y) = _mlp_and_data()
    report = medic_fast.scan(model, (X, y), restarts=1, steps=1)
    X[41, 0] = float("nan")
    with pytest.raises(ValueError, match=r"data: sample 41 has NaN or infinite values"):
        medic_fast.patch(model, report, (X, y), epochs=1)
    patched = medic_fast.patch(model, report, (X, y), epochs=1, per_class=10)  # 41 is not used
    assert all(torch.isfinite(p).all() for p in patched.parameters())
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"output of layer 'layers\.0' is not finite"):
        medic_fast.patch(model, report, (X[:41], y[:41]), epochs=1)


# --------------------------------------------------------------------------------------------
# No C++ compiler
# --------------------------------------------------------------------------------------------

USER_MODULE = """
import torch
from medic_fast.zoo import datasets, models

def cnn():
    return models.DigitsCNN((4, 8, 8))

def digits():
    X, y = datasets.load_digits()
    return X[:128], y[:128]

def mlp():
    return models.MLP(3, 2, (16, 16))

def blobs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g)
    return X, (X[:, 0] > 0).long()
"""


def test_sanitize_and_scan_work_without_a_compiler(tmp_path):
    """The extension's build fails (the compiler is /bin/false, the cache is empty): each
    command warns once and runs the reference."""
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    torch.manual_seed(0)
    torch.save(models.DigitsCNN((4, 8, 8)).state_dict(), tmp_path / "cnn.pt")
    mlp = models.MLP(3, 2, (16, 16))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g)
    opt = torch.optim.Adam(mlp.parameters(), 0.01)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(X), (X[:, 0] > 0).long()).backward()
        opt.step()
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    env = dict(os.environ, CXX="/bin/false", MEDIC_FAST_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medic_fast.cli"]
    warning = "backend='auto' runs the plain-PyTorch reference"
    r = subprocess.run(cmd + ["sanitize", "--model", "usermod:cnn", "--checkpoint", "cnn.pt",
                              "--data", "usermod:digits", "--out", "clone.pt", "--epochs", "1",
                              "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(warning) == 1 and "wrote clone.pt" in r.stdout
    models.DigitsCNN((4, 8, 8)).load_state_dict(torch.load(tmp_path / "clone.pt",
                                                           weights_only=True))
    r = subprocess.run(cmd + ["scan", "--model", "usermod:mlp", "--checkpoint", "mlp.pt",
                              "--data", "usermod:blobs"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert r.stderr.count(warning) == 1 and report["backend"] == "reference"
    assert report["n_searches"] == 20
