"""MEDIC end to end: sanitize and the baselines, checkpoints and resume, the NaN stop, and
2-process DDP; a short run on each device (CUDA where there is a GPU: ``pytest -m cuda``)."""
import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import medic_fast as mf
from medic_fast import data
from medic_fast.capture import default_layers
from medic_fast.zoo import attacks, models
from shared import DEVICES, Pairs, badnets_trojan, digits

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# sanitize and the baselines
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trojan():
    return badnets_trojan(epochs=10)


def test_sanitize_end_to_end(trojan):
    model, clean, (Xte, yte), atk = trojan
    before = copy.deepcopy(model.state_dict())
    ev = mf.evaluate(model, Xte, yte, trigger=atk, target=0)
    assert ev["acc"] > 0.9 and ev["asr"] > 0.9
    r = mf.sanitize(model, clean, epochs=12, progress=False, eval_data=(Xte, yte), trigger=atk,
                    target=0)
    assert r.model is not model and not r.model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [h["epoch"] for h in r.history] == list(range(1, 13))
    assert {"loss", "ce", "clone", "lr", "time", "acc", "asr"} <= set(r.history[0])
    assert r.history[-1]["loss"] < r.history[0]["loss"] / 2
    assert r.stats.layers == default_layers(model) and r.stats.count == len(clean[1])
    final = mf.evaluate(r.model, Xte, yte, trigger=atk, target=0)
    assert final["acc"] == pytest.approx(r.history[-1]["acc"])
    assert final["acc"] > 0.85 and final["asr"] < 0.3
    assert not torch.equal(r.model.features[0].weight, model.features[0].weight)


def test_sanitize_rejects_bad_arguments(trojan):
    model, clean, _, _ = trojan
    for kwargs, err, match in [({"tau": -1.0}, ValueError, "tau"),
                               ({"lam": float("nan")}, ValueError, "lam"),
                               ({"epochs": 0}, ValueError, "epochs"),
                               ({"lr": 0}, ValueError, "lr"),
                               ({"criterion": "l1"}, ValueError, "criterion"),
                               ({"stats": "row"}, ValueError, "stats"),
                               ({"layers": ["features.99"]}, ValueError, "features.99"),
                               ({"trigger": 3, "target": 0}, TypeError, "trigger"),
                               ({"factory": 3}, TypeError, "factory")]:
        with pytest.raises(err, match=match):
            mf.sanitize(model, clean, progress=False, **{"epochs": 1, **kwargs})
    with pytest.raises(TypeError, match="data must be"):
        mf.sanitize(model, "digits", epochs=1, progress=False)
    with pytest.raises(TypeError, match="integer"):
        mf.sanitize(model, (clean[0], clean[1].float()), epochs=1, progress=False)


@pytest.mark.parametrize("method", ["sanitize", "finetune", "train_from_scratch"])
def test_bad_data_is_refused_naming_what_was_expected(trojan, method):
    """Empty data, dict or inputs-only batches, labels or a target outside the model's 10
    classes, empty eval_data, and a trigger without eval_data: one-line errors, not a bare
    StopIteration, KeyError, IndexError, NaN accuracy or an ASR of 0."""
    model, (X, y), (Xte, yte), atk = trojan
    run = getattr(mf, method)
    kw = dict(epochs=1, progress=False)
    empty = TensorDataset(X[:0], y[:0])
    for d in (empty, DataLoader(empty, batch_size=4)):
        with pytest.raises(ValueError, match="^data is empty: expected at least one sample"):
            run(model, d, **kw)
    dicts = DataLoader([{"x": a, "y": b} for a, b in zip(X[:8], y[:8])], batch_size=4)
    with pytest.raises(TypeError, match=r"^data must yield \(inputs, labels, \.\.\.\) tuple "
                       "batches, got a dict with keys"):
        run(model, dicts, **kw)
    with pytest.raises(TypeError, match=r"got a Tensor of shape \(4, 1, 8, 8\) \(inputs only\)"):
        run(model, DataLoader(X[:8], batch_size=4), **kw)
    for label in (10, -1):
        bad = y.clone()
        bad[-1] = label
        for d in ((X, bad), Pairs(X, bad)):
            with pytest.raises(ValueError, match=r"^data: labels must be in \[0, 10\) for a "
                               rf"model with 10 classes, got label {label}$"):
                run(model, d, **kw)
    with pytest.raises(ValueError, match=r"^target must be a class of the model, in \[0, 10\), "
                       "got 10$"):
        run(model, (X, y), eval_data=(Xte, yte), trigger=atk, target=10, **kw)
    with pytest.raises(ValueError, match="^eval_data is empty"):
        run(model, (X, y), eval_data=TensorDataset(Xte[:0], yte[:0]), **kw)
    with pytest.raises(ValueError, match="^trigger needs eval_data, the data the ASR is measured "
                       "on; got eval_data=None$"):
        run(model, (X, y), trigger=atk, target=0, **kw)


def test_clone_reinitialisation():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    X, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="reset_parameters"):
        mf.train_from_scratch(nn.Sequential(nn.Linear(3, 3), Scale()), (X, y), epochs=1,
                              progress=False)
    r = mf.train_from_scratch(nn.Sequential(nn.Linear(3, 3), Scale()), (X, y), epochs=1,
                              progress=False, factory=lambda: nn.Linear(3, 3))
    assert isinstance(r.model, nn.Linear)
    a = mf.train_from_scratch(models.MLP(3, 3), (X, y), epochs=1, lr=1e-9, progress=False, seed=4)
    b = mf.train_from_scratch(models.MLP(3, 3), (X, y), epochs=1, lr=1e-9, progress=False, seed=5)
    assert not torch.allclose(a.model.layers[0].weight, b.model.layers[0].weight)


def test_baselines(trojan):
    model, clean, (Xte, yte), atk = trojan
    ft = mf.finetune(model, clean, epochs=2, progress=False)
    sc = mf.train_from_scratch(model, clean, epochs=2, progress=False)
    # fine-tuning starts from the trojan's weights; from scratch does not
    dist_ft = (ft.model.features[0].weight - model.features[0].weight).abs().max()
    dist_sc = (sc.model.features[0].weight - model.features[0].weight).abs().max()
    assert dist_ft < dist_sc
    assert mf.evaluate(ft.model, Xte, yte)["acc"] > 0.9


def test_deterministic_given_seed(trojan):
    model, clean, _, _ = trojan
    a = mf.sanitize(model, clean, epochs=2, progress=False, seed=3, augment=data.RandomCropFlip())
    b = mf.sanitize(model, clean, epochs=2, progress=False, seed=3, augment=data.RandomCropFlip())
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert a.history[-1]["loss"] == b.history[-1]["loss"]


@pytest.mark.parametrize("device", DEVICES)
def test_sanitize_on_device_matches_cpu(device, tmp_path, monkeypatch):
    """A few steps of sanitize for a model on ``device``, from CPU data, with evaluation, a
    trigger and a checkpoint: the clone, its statistics and the batches follow the model's
    device, the model and the caller's GPU RNG are left as they were, the run gives the CPU run's
    losses, and resuming from the checkpoint (saved from the device, read onto the CPU) gives
    the uninterrupted run."""
    if device == "cuda":  # float32 convolutions as on the CPU; deterministic ones for the resume
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    X, y = digits(96, seed=1)
    torch.manual_seed(0)
    model = models.DigitsCNN((4, 6, 8))
    torch.manual_seed(1)
    init = models.DigitsCNN((4, 6, 8))
    # one batch per epoch: the first epoch's loss is the untrained clone's, on any device
    kw = dict(epochs=3, batch_size=96, seed=2, progress=False, eval_data=(X, y),
              trigger=attacks.BadNets(size=3), target=0, factory=lambda: copy.deepcopy(init))
    cpu = mf.sanitize(model, (X, y), **kw)
    on = copy.deepcopy(model).to(device)
    before = copy.deepcopy(on.state_dict())
    gpu_rng = torch.cuda.get_rng_state() if device == "cuda" else None
    run = mf.sanitize(on, (X, y), checkpoint=tmp_path / "state.pt", **kw)
    if gpu_rng is not None:  # not reseeded for good by the clone's seeded initialisation
        assert torch.equal(torch.cuda.get_rng_state(), gpu_rng)
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in before.items())
    assert not run.model.training
    assert all(t.device.type == device for t in [*run.model.parameters(), *run.model.buffers(),
                                                 *run.stats.mean, *run.stats.std])
    assert [set(h) for h in run.history] == [set(h) for h in cpu.history]
    for k in ("loss", "ce", "clone"):
        assert run.history[0][k] == pytest.approx(cpu.history[0][k], rel=1e-4), k
        for h, c in zip(run.history[1:], cpu.history[1:]):
            assert h[k] == pytest.approx(c[k], rel=1e-2), k
    for h in run.history:
        assert 0 <= h["acc"] <= 1 and 0 <= h["asr"] <= 1
    for a, b in zip(run.stats.mean + run.stats.std, cpu.stats.mean + cpu.stats.std):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    # interrupted after the first epoch, resumed from what the device wrote
    path = tmp_path / "resumed.pt"
    with pytest.raises(_Interrupt):
        mf.sanitize(on, (X, y), checkpoint=path, **{**kw, "augment": _StopAfter(1)})
    resumed = mf.sanitize(on, (X, y), checkpoint=path, resume=True,
                          **{**kw, "augment": _StopAfter()})
    for h, r in zip(run.history, resumed.history):
        for k in ("loss", "ce", "clone", "acc", "asr"):
            assert r[k] == pytest.approx(h[k], rel=1e-5), k
    for (k, v), w in zip(run.model.state_dict().items(), resumed.model.state_dict().values()):
        assert w.device == v.device
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------
# checkpoints, resume, NaN stop
# --------------------------------------------------------------------------------------------

class _Interrupt(Exception):
    pass


class _StopAfter:
    """Identity augmentation that interrupts training after ``n`` calls (a crash mid-run)."""

    def __init__(self, n=None):
        self.n, self.calls = n, 0

    def __call__(self, x):
        self.calls += 1
        if self.n is not None and self.calls > self.n:
            raise _Interrupt
        return x

    def __repr__(self):
        return "identity"


def test_checkpoint_resume_gives_the_uninterrupted_result(trojan, tmp_path):
    model, clean, _, _ = trojan
    kw = dict(epochs=4, progress=False, seed=1)
    full = mf.sanitize(model, clean, augment=_StopAfter(), **kw)
    path = tmp_path / "state.pt"
    steps = math.ceil(len(clean[1]) / 64)
    with pytest.raises(_Interrupt):
        mf.sanitize(model, clean, augment=_StopAfter(2 * steps + 1), checkpoint=path, **kw)
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 2 and os.listdir(tmp_path) == ["state.pt"]
    with pytest.raises(FileExistsError, match="resume=True"):
        mf.sanitize(model, clean, augment=_StopAfter(), checkpoint=path, **kw)
    with pytest.raises(ValueError, match="tau"):
        mf.sanitize(model, clean, augment=_StopAfter(), checkpoint=path, resume=True, tau=1.0, **kw)
    resumed = mf.sanitize(model, clean, augment=_StopAfter(), checkpoint=path, resume=True, **kw)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert torch.load(path, weights_only=True)["epoch"] == 4


def test_checkpoint_write_is_atomic(trojan, tmp_path, monkeypatch):
    """A failure while replacing the file (after epoch 2's state is written to the temporary
    file) leaves epoch 1's checkpoint intact and no temporary file behind."""
    model, clean, _, _ = trojan
    path = tmp_path / "state.pt"
    real_replace, snapshots = os.replace, []

    def replace_once(src, dst):
        if snapshots:
            raise OSError("disk full")
        real_replace(src, dst)
        snapshots.append(path.read_bytes())

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(OSError, match="disk full"):
        mf.finetune(model, clean, epochs=2, progress=False, checkpoint=path)
    assert path.read_bytes() == snapshots[0] and os.listdir(tmp_path) == ["state.pt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1


class _NaNAfter(_StopAfter):
    """Identity augmentation that turns every batch after the first ``n`` into NaNs."""

    def __call__(self, x):
        self.calls += 1
        return x if self.calls <= self.n else torch.full_like(x, float("nan"))


def test_nan_loss_stops_naming_the_step(trojan, tmp_path):
    model, clean, _, _ = trojan
    X, y = clean[0][:64], clean[1][:64]
    path = tmp_path / "state.pt"
    kw = dict(epochs=4, batch_size=16, progress=False, checkpoint=path)  # 4 steps per epoch
    with pytest.raises(FloatingPointError, match=r"step 9 \(epoch 3, batch 1 of 4\).*epoch 2"):
        mf.sanitize(model, (X, y), augment=_NaNAfter(8), **kw)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    r = mf.sanitize(model, (X, y), augment=_NaNAfter(10 ** 9), resume=True, **kw)
    assert len(r.history) == 4 and math.isfinite(r.history[-1]["loss"])
    with pytest.raises(FloatingPointError, match="step 1 "):
        mf.finetune(model, (torch.full_like(X, float("inf")), y), epochs=1, progress=False)


def _small_run(tmp_path, epochs=2):
    """A fresh model, random clean data (96 samples, 2 batches per epoch) and the options of a
    sanitize run checkpointed to ``tmp_path / "s.pt"``, run once."""
    model = models.DigitsCNN((4, 6, 8))
    X, y = torch.rand(96, 1, 8, 8), torch.randint(10, (96,))
    kw = dict(epochs=epochs, batch_size=48, progress=False, checkpoint=tmp_path / "s.pt")
    mf.sanitize(model, (X, y), **kw)
    return model, (X, y), kw


def test_resume_refuses_other_weights_data_version_or_settings(tmp_path):
    """The state records the library version, a digest of the teacher's weights, the data's
    shape, dtype and a digest of sampled rows, and the settings: resuming with any of them
    different is refused in one line naming what differs (not a clone of two teachers), and
    the state is left as it was."""
    model, (X, y), kw = _small_run(tmp_path)
    path = kw["checkpoint"]
    saved = path.read_bytes()
    other = models.DigitsCNN((4, 6, 8))
    cases = [
        (dict(model=other), "weights", "weights: other values (digest "),
        (dict(data=(torch.rand_like(X), y)), "data", "data: other values in the sampled rows"),
        (dict(data=(X[:90], y[:90])), "data", "data: shape [96, 1, 8, 8] (now [90, 1, 8, 8])"),
        (dict(data=(X, torch.randint(10, (96,)))), "data", "data: other values in the sampled"),
        (dict(tau=1.0), "tau", "tau 20.0 (now 1.0)"),
    ]
    for change, what, message in cases:
        run = {"model": model, "data": (X, y), **change}
        with pytest.raises(ValueError) as e:
            mf.sanitize(run.pop("model"), run.pop("data"), resume=True, **kw, **run)
        msg = str(e.value)
        assert message in msg and "\n" not in msg, msg
        assert msg.startswith(f"checkpoint {str(path)!r} was written by another run: "), msg
        assert [d[0] for d in e.value.diff] == [what]  # a CheckpointError's differences
    assert path.read_bytes() == saved
    state = torch.load(path, weights_only=True)
    assert state["version"] == mf.__version__ and set(state["inputs"]) == {"weights", "data"}
    torch.save(dict(state, version="0.0.1"), path)
    with pytest.raises(ValueError, match=r"another run: medic_fast 0\.0\.1 \(now "):
        mf.sanitize(model, (X, y), resume=True, **kw)


def test_resume_refuses_a_state_that_does_not_fit_the_run(tmp_path):
    """A state whose epoch is out of range (not 3 extra epochs for -3), whose history or
    scheduler disagree with its epoch, or whose model, optimizer or statistics tensors have
    other shapes (or a negative std): a CheckpointError naming the entry and what was expected,
    in one line, before any training (not a shape error in the middle of the run)."""
    model, data, kw = _small_run(tmp_path)
    path = kw["checkpoint"]
    state = torch.load(path, weights_only=True)
    weights = dict(state["model"], **{"features.0.weight": torch.zeros(5, 1, 3, 3)})
    adam = state["optimizer"]
    moments = {i: dict(v) for i, v in adam["state"].items()}
    moments[0]["exp_avg"] = torch.zeros(3)
    cases = [
        (dict(epoch=-3), "'epoch' is -3, expected 1 to 2 (epochs completed)"),
        (dict(epoch=0), "'epoch' is 0, expected 1 to 2"),
        (dict(epoch=7), "'epoch' is 7, expected 1 to 2"),
        (dict(history=state["history"][:1]), "'history' is not the 2 rows of epochs 1 to 2"),
        (dict(scheduler=dict(state["scheduler"], last_epoch=3)),
         "'scheduler' is at step 3, expected 4 (2 epochs of 2 steps)"),
        (dict(model=weights), "'model' does not fit the model (shape of features.0.weight: "
                              "[5, 1, 3, 3] in the file, [4, 1, 3, 3] in the model)"),
        (dict(optimizer=dict(adam, state=moments)),
         "'optimizer' exp_avg of features.0.weight is [3], expected [4, 1, 3, 3]"),
        (dict(optimizer=dict(adam, param_groups=[])),
         "'optimizer' does not hold 11 parameters in 1 group(s)"),
        (dict(stats_mean=[m[:2] for m in state["stats_mean"]]),
         "'stats_mean' of layer 'features.0' is [2], expected [4]"),
        (dict(stats_std=state["stats_std"][:2]),
         "'stats_std' is not a list of 6 tensors, one per layer cloned"),
        (dict(stats_std=[-s for s in state["stats_std"]]),
         "std of layer 'features.0' must be >= 0"),
    ]
    for change, message in cases:
        torch.save({**state, **change}, path)
        with pytest.raises(ValueError) as e:
            mf.sanitize(model, data, resume=True, **kw)
        msg = str(e.value)
        assert message in msg and "\n" not in msg, (message, msg)
        assert msg.startswith(f"checkpoint {str(path)!r} does not fit this run: "), msg
    torch.save(state, path)
    assert len(mf.sanitize(model, data, resume=True, **kw).history) == 2


def test_sanitize_and_the_baselines_leave_the_global_generator_as_it_was(tmp_path):
    """Training code that calls them gets the random numbers it would have got without the
    call: ``torch.rand`` after the call equals ``torch.rand`` without it."""
    model = models.DigitsCNN((4, 6, 8))
    X, y = torch.rand(40, 1, 8, 8), torch.randint(10, (40,))
    runs = {"sanitize": lambda: mf.sanitize(model, (X, y), epochs=2, batch_size=16,
                                            progress=False, eval_data=(X, y)),
            "sanitize, DataLoader": lambda: mf.sanitize(
                model, DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True), epochs=1,
                progress=False, checkpoint=tmp_path / "s.pt"),
            "finetune": lambda: mf.finetune(model, (X, y), epochs=1, progress=False),
            "train_from_scratch": lambda: mf.train_from_scratch(model, (X, y), epochs=1,
                                                                progress=False)}
    for name, run in runs.items():
        seed = int(torch.randint(2 ** 31, ()))
        torch.manual_seed(seed)
        expected = torch.rand(5)
        torch.manual_seed(seed)
        run()
        assert torch.equal(torch.rand(5), expected), name


class _WithAux(nn.Module):
    """A DigitsCNN returning ``(logits, aux)``, as models with auxiliary outputs do."""

    def __init__(self):
        super().__init__()
        self.net = models.DigitsCNN((4, 6, 8))

    def forward(self, x):
        logits = self.net(x)
        return logits, logits.square().mean()


def test_sanitize_takes_a_model_returning_logits_and_more():
    """A model returning ``(logits, aux)`` is sanitized as the plain model is (its first tensor
    is the logits, as the Cloner takes them), with evaluation; so are the baselines."""
    wrapped = _WithAux()
    plain = wrapped.net
    X, y = torch.rand(64, 1, 8, 8), torch.randint(10, (64,))
    kw = dict(epochs=2, batch_size=32, progress=False, eval_data=(X, y), seed=3)
    a = mf.sanitize(wrapped, (X, y), factory=lambda: copy.deepcopy(wrapped), **kw)
    b = mf.sanitize(plain, (X, y), factory=lambda: copy.deepcopy(plain), **kw)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["acc"] for h in a.history] == [h["acc"] for h in b.history]
    for run in (mf.finetune, mf.train_from_scratch):
        assert len(run(wrapped, (X, y), epochs=1, progress=False, eval_data=(X, y)).history) == 1


def test_sanitize_refuses_inputs_the_model_cannot_take_and_one_class():
    """8-bit images, float32 inputs to a float64 model (float64 inputs work), eval_data of
    another dtype, clean data of one class (tensors, or a Dataset, found in the first epoch) and
    a CUDA device where there is none: one ValueError naming what was expected."""
    model = models.DigitsCNN((4, 6, 8))
    X, y = torch.rand(64, 1, 8, 8), torch.randint(10, (64,))
    kw = dict(epochs=1, progress=False)
    cases = [
        (model, (torch.randint(256, X.shape, dtype=torch.uint8), y), {},
         "^data: inputs are torch.uint8, but the model computes in torch.float32; give "
         r"floating-point inputs \(X.to\(torch.float32\), divided by 255 for 8-bit images\)$"),
        (copy.deepcopy(model).double(), (X, y), {},
         r"^data: inputs are torch.float32, but the model computes in torch.float64; give inputs "
         r"of the model's dtype \(X.to\(torch.float64\)\), or convert the model "
         r"\(model.to\(torch.float32\)\)$"),
        (model, (X, y), {"eval_data": (X.half(), y)},
         "^eval_data: inputs are torch.float16, but the model computes in torch.float32"),
        (model, (X, torch.full_like(y, 3)), {}, "^data: every label is 3; clean data must hold "
         r"at least two classes \(a model trained on one learns to predict it alone\)"),
        (model, Pairs(X, torch.full_like(y, 3)), {}, "^data: every label is 3"),
    ]
    if not torch.cuda.is_available():
        cases.append((model, (X, y), {"device": "cuda"}, r"^device 'cuda': this PyTorch cannot "
                      r"use CUDA \(a CPU-only build\); use 'cpu'$"))
    for net, d, more, match in cases:
        with pytest.raises(ValueError, match=match):
            mf.sanitize(net, d, **kw, **more)
    r = mf.sanitize(copy.deepcopy(model).double(), (X.double(), y), eval_data=(X.double(), y),
                    **kw)
    assert math.isfinite(r.history[0]["loss"]) and r.model.features[0].weight.dtype == \
        torch.float64


# --------------------------------------------------------------------------------------------
# Default layers for any architecture
# --------------------------------------------------------------------------------------------

def _default_run(model, data, capsys, **kw):
    """``sanitize`` with the default layers for 2 epochs, and what it said on stderr."""
    capsys.readouterr()
    r = mf.sanitize(model, data, epochs=2, batch_size=32, **kw)
    return r, capsys.readouterr().err


def test_default_layers_of_an_mlp_are_its_hidden_linear_layers(capsys):
    """An MLP on flattened digits (no conv, no BatchNorm, no block list) is sanitized with the
    outputs of every Linear but the output layer; the result and the log name them, once."""
    X, y = digits(200)
    mlp = mf.train_from_scratch(models.MLP(64, 10, (32, 32, 16)), (X, y), epochs=3,
                                progress=False).model
    r, err = _default_run(mlp, (X, y), capsys)
    hidden = ["layers.0", "layers.2", "layers.4"]
    assert r.layers == r.stats.layers == hidden
    assert err.count("medic: cloning") == 1
    assert "medic: cloning the hidden Linear layers' outputs, all but the last Linear (the model " \
        "has no conv or BatchNorm layer and no repeated blocks), 3 layers: layers.0, layers.2, " \
        "layers.4\n" in err
    assert all(math.isfinite(h["clone"]) and h["clone"] > 0 for h in r.history)
    assert r.history[-1]["loss"] < r.history[0]["loss"]


def test_default_layers_of_a_cnn_without_batchnorm_are_its_convs(capsys):
    """Convolutions without BatchNorm: the conv plane as before, the hidden Linear layer after
    them not added."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10))
    r, err = _default_run(cnn, digits(96), capsys)
    assert r.layers == r.stats.layers == ["0", "2"]
    assert "medic: cloning every conv and BatchNorm output, 2 layers: 0, 2\n" in err
    assert math.isfinite(r.history[-1]["loss"])


def test_default_layers_of_a_transformer_are_its_blocks(capsys):
    """A model of repeated blocks without conv or BatchNorm (a transformer: its Linear layers
    sit inside the blocks) clones the blocks' outputs, as ``layers="blocks"`` does; named
    layers are not announced."""
    from medic_fast.zoo.transformer import TinyTransformer, make_sequences

    torch.manual_seed(0)
    model = TinyTransformer(d_model=16, depth=3, heads=2, max_len=16)
    X, y = make_sequences(64, length=16, min_length=4, seed=0)
    r, err = _default_run(model, (X, y), capsys)
    assert r.layers == r.stats.layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert "medic: cloning the repeated blocks' outputs (the model has no conv or BatchNorm " \
        "layer), 3 layers: blocks.0, blocks.1, blocks.2\n" in err
    assert math.isfinite(r.history[-1]["loss"])
    named, err = _default_run(model, (X, y), capsys, layers="blocks")
    assert named.layers == r.layers and "medic: cloning" not in err
    assert [h["loss"] for h in named.history] == [h["loss"] for h in r.history]


# --------------------------------------------------------------------------------------------
# DistributedDataParallel, 2 CPU processes with gloo
# --------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, init_file, out_dir, model, X, y):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        stats = mf.collect_stats(model, (X, y), batch_size=32)
        r = mf.sanitize(model, (X, y), epochs=3, batch_size=32, progress=False,
                        checkpoint=os.path.join(out_dir, "state.pt"))
        torch.save({"stats": (stats.mean, stats.std, stats.count), "history": r.history,
                    "model": r.model.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(trojan, tmp_path):
    model, (X, y), _, _ = trojan
    X, y = X[:150], y[:150]
    single = mf.collect_stats(model, (X, y), batch_size=32)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), model, X, y),
             nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for out in outs:
        mean, std, count = out["stats"]
        assert count == 150
        for a, b in zip(mean + std, single.mean + single.std):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h0, h1 = outs[0]["history"], outs[1]["history"]
    assert len(h0) == 3 and h0[-1]["loss"] < h0[0]["loss"]
    assert [h["loss"] for h in h0] == [h["loss"] for h in h1]  # averaged over processes
    for k, v in outs[0]["model"].items():
        assert torch.equal(v, outs[1]["model"][k]), k  # DDP keeps the replicas in step
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 3
