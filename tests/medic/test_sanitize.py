"""MEDIC end to end: capture and teacher gradients, statistics, sanitize (checkpoint, resume,
NaN stop), evaluate, and 2-process DDP."""
import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import medic_fast as mf
from medic_fast import data
from medic_fast.zoo import attacks, datasets, models
from medic_fast.capture import (ActivationCapture, default_layers, inplace_modified,
                                resolve_layers, teacher_signals)

torch.set_num_threads(1)


def _digits(n=None, seed=0):
    X, y = datasets.load_digits()
    if n is not None:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=g)[:n]
        X, y = X[idx], y[idx]
    return X, y


def _frozen(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def _double_backward_grads(model, layers, x, y):
    """The straightforward way: parameters and input require grad, every hooked tensor retains
    its grad, CE.backward() through everything."""
    model = copy.deepcopy(model).eval().requires_grad_(True)
    x = x.clone().requires_grad_()
    modules = dict(model.named_modules())
    acts = {}
    hooks = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: acts.__setitem__(n, o) or o.retain_grad()) for n in layers]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for h in hooks:
        h.remove()
    return [acts[n].detach() for n in layers], [acts[n].grad for n in layers]


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,shape", [(lambda: models.DigitsCNN((4, 6, 8)), (5, 1, 8, 8)),
                                        (lambda: models.wrn16_1(), (3, 3, 8, 8)),
                                        (lambda: models.MLP(3, 4, (8, 7, 6, 5)), (9, 3))])
def test_teacher_signals_match_double_backward(make, shape):
    torch.manual_seed(0)
    model = make()
    for m in model.modules():  # non-trivial BatchNorm statistics in eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    layers = default_layers(model) or [n for n, m in model.named_modules()
                                       if isinstance(m, (nn.Linear, nn.ReLU))]
    x, y = torch.randn(shape), torch.randint(0, 4, (shape[0],))
    teacher = _frozen(model)
    with ActivationCapture(teacher, layers, differentiable=True) as cap:
        acts, grads = teacher_signals(teacher, cap, x, y)
    ref_acts, ref_grads = _double_backward_grads(model, layers, x, y)
    assert len(acts) == len(layers)
    for a, g, ra, rg in zip(acts, grads, ref_acts, ref_grads):
        torch.testing.assert_close(a, ra)
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-7)
        assert not a.requires_grad and g.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_backward_reaches_hooked_tensors_only():
    """No parameter gradient and no input gradient are computed: the backward stops at the
    first hooked tensor, so the convolution before it never runs its backward."""
    model = _frozen(models.DigitsCNN((4, 4, 4)))
    calls = []
    model.features[0].register_full_backward_hook(lambda *a: calls.append("conv0"))
    layers = ["features.1", "features.3"]
    x = torch.rand(2, 1, 8, 8)
    with ActivationCapture(model, layers, differentiable=True) as cap:
        teacher_signals(model, cap, x, torch.tensor([1, 2]))
    assert calls == [] and x.grad is None


def test_inplace_outputs_are_copied():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                        nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 4, (6,))
    teacher = _frozen(net)
    assert inplace_modified(teacher, ["0", "1"], x) == ["1"]
    with ActivationCapture(teacher, ["0", "1"], differentiable=True) as cap:
        teacher(x)
        with pytest.raises(RuntimeError, match="modified in place"):
            cap.outputs()
    with ActivationCapture(teacher, ["0", "1"], differentiable=True, copy=["1"]) as cap:
        acts, grads = teacher_signals(teacher, cap, x, y)
    plain = copy.deepcopy(net)
    plain[2] = nn.ReLU()
    ref_acts, ref_grads = _double_backward_grads(plain, ["0", "1"], x, y)
    for a, g, ra, rg in zip(acts, grads, ref_acts, ref_grads):
        torch.testing.assert_close(a, ra)
        torch.testing.assert_close(g, rg)
    assert (acts[1] < 0).any()  # the BatchNorm output, not the rectified one


def test_capture_errors():
    model = models.DigitsCNN((4, 4, 4))
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        resolve_layers(model, ["nope"])
    with pytest.raises(TypeError, match="sequence of module names"):
        resolve_layers(model, "features.0")
    with pytest.raises(ValueError, match="more than once"):
        resolve_layers(model, ["features.0", "features.0"])
    with pytest.raises(ValueError, match="no conv or BatchNorm"):
        resolve_layers(models.MLP(), None)
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, shared)
    with ActivationCapture(twice, ["0"]) as cap, pytest.raises(RuntimeError, match="ran twice"):
        twice(torch.randn(2, 3))
    with ActivationCapture(model, ["features.0"]) as cap, \
            pytest.raises(RuntimeError, match="did not run"):
        cap.outputs()
    with pytest.raises(ValueError, match="differentiable"):
        teacher_signals(model, ActivationCapture(model, ["features.0"]), torch.rand(1, 1, 8, 8),
                        torch.tensor([0]))
    assert not model.features[0]._forward_hooks  # hooks removed on exit


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per", ["channel", "neuron"])
def test_collect_stats_match_torch_on_full_data(per):
    torch.manual_seed(0)
    model = models.DigitsCNN((4, 6, 8))
    model.train()
    before = copy.deepcopy(model.state_dict())
    X, y = _digits(203)
    layers = ["features.0", "features.4", "features.7"]
    stats = mf.collect_stats(model, (X, y), layers, per=per, batch_size=50)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ref = copy.deepcopy(model).eval()
    acts, _ = _double_backward_grads(ref, layers, X, y)
    assert stats.layers == layers and stats.count == 203 and stats.per == per
    for a, mu, sd in zip(acts, stats.mean, stats.std):
        dims = [0, 2, 3] if per == "channel" else [0]
        rsd, rmu = torch.std_mean(a.double(), dims, correction=0)
        torch.testing.assert_close(mu, rmu.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd, rsd.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per must be"):
        mf.collect_stats(model, (X, y), layers, per="row")


class _Tokens(nn.Module):
    """[B, T, 4] -> a [B, T, 6] hidden layer -> logits of the mean token."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)).mean(1))


@pytest.mark.parametrize("per", ["channel", "neuron"])
def test_collect_stats_on_tokens_are_per_feature(per):
    """[B, T, H] outputs: one statistic per hidden unit over all tokens (rows = [B, T]), also
    for per="neuron"; with a mask, over the real tokens only."""
    torch.manual_seed(0)
    model = _Tokens()
    X, y = torch.randn(37, 5, 4) * 2 + 1, torch.randint(3, (37,))
    stats = mf.collect_stats(model, (X, y), ["hidden"], per=per, batch_size=10)
    with torch.no_grad():
        h = model.hidden(X).double()
    rsd, rmu = torch.std_mean(h.reshape(-1, 6), 0, correction=0)
    assert stats.mean[0].shape == (6,) and stats.count == 37
    torch.testing.assert_close(stats.mean[0], rmu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.std[0], rsd.float(), rtol=1e-5, atol=1e-6)
    lengths = torch.randint(1, 6, (37,))
    X[torch.arange(5)[None, :] >= lengths[:, None]] = 0.0  # padding: all-zero tokens

    def real(x):
        return x.abs().sum(-1) > 0

    masked = mf.collect_stats(model, (X, y), ["hidden"], per=per, mask_fn=real, batch_size=10)
    with torch.no_grad():
        h = model.hidden(X).double()[real(X)]
    rsd, rmu = torch.std_mean(h, 0, correction=0)
    torch.testing.assert_close(masked.mean[0], rmu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.std[0], rsd.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"mask has shape \(10, 4\) but layer 'hidden' has rows"):
        mf.collect_stats(model, (X, y), ["hidden"], mask_fn=lambda x: real(x)[:, 1:],
                         batch_size=10)
    per_position = mf.collect_stats(model, (X, y), ["hidden"], start_dim=1, batch_size=10)
    assert per_position.mean[0].shape == (5,)


def test_capture_of_inputs():
    torch.manual_seed(0)
    model = models.MLP(3, 4, (8, 7))
    x = torch.randn(6, 3)
    with ActivationCapture(model, ["layers.2", "layers.4"], inputs=True) as cap, \
            torch.no_grad():
        model(x)
        first, last = cap.outputs()
        torch.testing.assert_close(first, model.layers[:2](x))
        torch.testing.assert_close(last, model.layers[:4](x))
    with pytest.raises(ValueError, match="outputs only"):
        ActivationCapture(model, ["layers.2"], inputs=True, differentiable=True)


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------

class _Oracle(nn.Module):
    """Predicts the class written in pixel (0, 0) * 10, or class 7 when the corner is lit."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 10).round().long()
        cls = torch.where(x[:, 0, -1, -1] > 0.5, torch.full_like(cls, 7), cls)
        return nn.functional.one_hot(cls, 10).float()


def test_evaluate_acc_and_asr():
    y = torch.tensor([0, 1, 2, 3, 7, 7, 5, 6])
    X = torch.zeros(8, 1, 4, 4)
    X[:, 0, 0, 0] = y / 10
    X[1, 0, 0, 0] = 0.9  # one wrong prediction
    trig = attacks.BadNets(size=1)
    model = _Oracle().train()
    r = mf.evaluate(model, X, y, trigger=trig, target=7)
    assert r["acc"] == pytest.approx(7 / 8) and r["asr"] == 1.0 and model.training
    r = mf.evaluate(model, X, y, trigger=attacks.BadNets(size=1, margin=1), target=7)
    assert r["asr"] == 0.0
    assert mf.evaluate(model, X, y)["asr"] is None
    half = lambda x: torch.cat([trig(x[:3]), x[3:]])  # noqa: E731  stamps 3 of the 6 victims
    assert mf.evaluate(model, X, y, trigger=half, target=7)["asr"] == pytest.approx(3 / 6)
    with pytest.raises(TypeError, match="target"):
        mf.evaluate(model, X, y, trigger=trig)
    with pytest.raises(ValueError, match="not the target"):
        mf.evaluate(model, X[4:6], y[4:6], trigger=trig, target=7)
    with pytest.raises(ValueError, match="same N"):
        mf.evaluate(model, X, y[:3])


# --------------------------------------------------------------------------------------------
# sanitize and the baselines
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trojan():
    """A small BadNets-trojaned digits CNN, its clean split and the attack."""
    X, y = datasets.load_digits()
    (Xtr, ytr), (Xc, yc), (Xte, yte) = data.split(X, y, [0.6, 0.1, 0.3], seed=0)
    atk = attacks.BadNets(size=3)
    p = atk.poison(Xtr, ytr, 0.1, 0, seed=0)
    model = mf.train_from_scratch(models.DigitsCNN((8, 16, 16)), (p.X, p.y), epochs=10,
                                  progress=False).model
    return model, (Xc, yc), (Xte, yte), atk


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
