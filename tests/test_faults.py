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
    report = medic_fast.scan(model, (X, y), method="paper", restarts=1, steps=1)
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
    command warns once, in one line of its own words (no library source line), and runs the
    reference; ``sanitize`` called from a script warns at the script's line."""
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
    r = subprocess.run(cmd + ["sanitize", "--model", "usermod:cnn", "--weights", "cnn.pt",
                              "--data", "usermod:digits", "--out", "clone.pt", "--epochs", "1",
                              "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(warning) == 1 and "wrote clone.pt" in r.stdout
    lines = r.stderr.splitlines()
    assert [line for line in lines if warning in line] == \
        [line for line in lines if line.startswith(f"medic-fast: warning: {warning}")]
    assert "Warning:" not in r.stderr and ".py:" not in r.stderr, r.stderr
    (tmp_path / "user.py").write_text(textwrap.dedent("""
        import json, warnings
        import medic_fast
        from usermod import cnn, digits

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            medic_fast.sanitize(cnn(), digits(), epochs=1, progress=False)
        print(json.dumps([[str(w.message), w.filename, w.lineno] for w in caught]))
    """))
    r = subprocess.run([sys.executable, "user.py"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (message, filename, lineno), = json.loads(r.stdout.splitlines()[-1])
    assert warning in message and (filename, lineno) == (str(tmp_path / "user.py"), 8)
    models.DigitsCNN((4, 8, 8)).load_state_dict(torch.load(tmp_path / "clone.pt",
                                                           weights_only=True))
    r = subprocess.run(cmd + ["scan", "--model", "usermod:mlp", "--weights", "mlp.pt",
                              "--data", "usermod:blobs", "--method", "paper"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert r.stderr.count(warning) == 1 and report["backend"] == "reference"
    assert report["n_searches"] == 20


# --------------------------------------------------------------------------------------------
# Corrupt training states; a writer killed while saving a large one
# --------------------------------------------------------------------------------------------

def _training_state(path, epoch=1, model=None):
    """A training state as :func:`medic_fast.train.fit` writes it (config ``{"run": 1}``)."""
    from medic_fast.train import CHECKPOINT_FORMAT

    save_atomic({"format": CHECKPOINT_FORMAT, "version": medic_fast.__version__,
                 "config": {"run": 1}, "epoch": epoch, "model": model or {"w": torch.ones(3)},
                 "optimizer": {}, "scheduler": {},
                 "history": [{"epoch": e + 1, "time": 0.0} for e in range(epoch)]}, path)


class _Mkdir:
    """Pickles as a call of ``os.mkdir(path)``: what a malicious file could run when loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_load_checkpoint_says_what_a_file_holds_that_is_not_a_training_state(tmp_path):
    """Empty, random, a torch.save file cut short (early or late: not "Invalid argument"), a
    pickle cut short, a plain pickle, a pickle that would run code (blocked: nothing runs), a
    missing entry, a pickled module, model weights: one ``CheckpointError`` ``checkpoint <path>
    is not a readable medic_fast training state (<what the file holds>)``, never a bare
    EOFError/KeyError or torch's advice to load with weights_only=False."""
    import pickle

    from medic_fast.train import load_checkpoint

    good = tmp_path / "good.pt"
    _training_state(good)
    assert load_checkpoint(good, True, {"run": 1})["epoch"] == 1
    no_optimizer = torch.load(good, weights_only=True)
    del no_optimizer["optimizer"]
    bad_epoch = dict(no_optimizer, optimizer={}, epoch="1")
    whole, pwned = good.read_bytes(), tmp_path / "pwned"
    cases = {
        "empty": (b"", "the file is empty"),
        "random": (bytes(range(7, 256)) * 8, "not a torch.save file (neither a zip archive nor "
                                             "a pickle: it starts with b'\\x07\\x08')"),
        "early": (whole[:200], "a zip archive cut short at 200 bytes: a truncated torch.save"),
        "late": (whole[:len(whole) // 2], f"a zip archive cut short at {len(whole) // 2} bytes"),
        "pickle_cut": (pickle.dumps(list(range(300)), protocol=2)[:100],
                       "a pickle (protocol 2) cut short at 100 bytes (truncated)"),
        "plain_pickle": (pickle.dumps({"w": [1.0]}, protocol=4),
                         "a pickle (protocol 4), not a torch.save file"),
        "malicious_pickle": (pickle.dumps(_Mkdir(pwned), protocol=4),
                             "a pickle (protocol 4) that refers to posix.mkdir, not a torch.save"),
        "malicious": ({"model": _Mkdir(pwned)}, "it holds a pickled posix.mkdir, blocked: only "
                                                "tensors and plain containers are loaded"),
        "no_optimizer": (no_optimizer, "no 'optimizer' entry"),
        "bad_epoch": (bad_epoch, "'epoch' is str, expected int"),
        "module": (models.MLP(), "it holds a pickled medic_fast.zoo.models.MLP, blocked"),
        "weights": (models.MLP().state_dict(), "a model's state_dict, not a training"),
        "list": ([1, 2], "no 'format': 'medic_fast.train/1' entry"),
    }
    said = {}
    for name, (content, _) in cases.items():
        path = tmp_path / f"{name}.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(ValueError) as e:  # a CheckpointError
            load_checkpoint(path, True, {"run": 1})
        said[name] = str(e.value)
    assert not pwned.exists()
    assert {n: m for n, m in said.items() if cases[n][1] not in m} == {}
    for name, msg in said.items():
        assert "\n" not in msg and "weights_only" not in msg, (name, msg)
        path = str(tmp_path / f"{name}.pt")
        assert msg.startswith(f"checkpoint {path!r} is not a readable medic_fast training "
                              "state ("), (name, msg)


def test_a_writer_killed_while_saving_keeps_the_previous_state_readable(tmp_path):
    """SIGKILL while save_atomic writes a 64 MB training state: the previous state still loads
    (for resume); the next save removes the killed writer's temp file."""
    import time

    from medic_fast.train import load_checkpoint

    target = tmp_path / "state.pt"
    script = textwrap.dedent(f"""
        import torch
        from medic_fast._utils import save_atomic
        from medic_fast.train import CHECKPOINT_FORMAT

        big = torch.ones(2 ** 24)
        for epoch in range(1, 10 ** 6):
            w = big[:3].clone() if epoch == 1 else big
            save_atomic({{"format": CHECKPOINT_FORMAT, "version": {medic_fast.__version__!r},
                         "config": {{"run": 1}}, "epoch": epoch, "model": {{"w": w}},
                         "optimizer": {{}}, "scheduler": {{}}, "history": []}}, {str(target)!r})
    """)
    with subprocess.Popen([sys.executable, "-c", script]) as writer:
        temp = tmp_path / f"state.pt.tmp{writer.pid}"
        try:
            deadline = time.monotonic() + 120
            while writer.poll() is None and time.monotonic() < deadline and not (
                    target.exists() and temp.exists() and temp.stat().st_size > 0):
                time.sleep(0.01)
        finally:
            writer.kill()
        assert writer.wait(timeout=60) == -9
    assert temp.exists()  # killed mid-write
    state = load_checkpoint(target, True, {"run": 1})
    assert state["epoch"] >= 1 and state["model"]["w"].numel() in (3, 2 ** 24)
    _training_state(target, epoch=99)
    assert not temp.exists() and load_checkpoint(target, True, {"run": 1})["epoch"] == 99
