"""Transformers: tuple capture, masked per-token statistics and loss, the Cloner training step
(against a plain PyTorch reference, under autocast, checkpointing, DDP, torch.compile).

The tests parametrised over ``device`` run on CUDA too where there is a GPU (``pytest -m cuda``):
there ``backend="auto"`` is the Triton kernel."""
import copy
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import medic_fast
from medic_fast.capture import ActivationCapture
from medic_fast.medic.cache import TeacherCache
from medic_fast.medic.cloner import Cloner, masked_clone_loss
from medic_fast.medic.recipes import RECIPES
from medic_fast.stats import collect_stats
from medic_fast.zoo import datasets, models
from medic_fast.zoo.transformer import (TinyTransformer, TokenTrigger, make_sequences,
                                        padding_mask)
from shared import CUDA, DEVICES, float64_clone_rows

LAYERS = ["blocks.0", "blocks.1.self_attn", "blocks.1.mlp"]


def _models(seed=0, device="cpu", **kw):
    """Teacher (frozen, eval) and student, initialised on the CPU (the same weights on any
    device), then moved to ``device``."""
    torch.manual_seed(seed)
    teacher = TinyTransformer(d_model=32, depth=2, heads=4, max_len=16, **kw)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    student = TinyTransformer(d_model=32, depth=2, heads=4, max_len=16, **kw)
    return teacher.to(device), student.to(device)


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _exact_fp32(monkeypatch, device):
    """No TF32 in cuDNN convolutions on CUDA (allowed by default), so CUDA results can be held
    to float32 tolerances; the CPU is unaffected."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(scope="module")
def data():
    return make_sequences(48, length=16, min_length=4, seed=0)


@pytest.fixture(scope="module")
def stats(data):
    teacher, _ = _models()
    return collect_stats(teacher, data, LAYERS, mask_fn=padding_mask, batch_size=20)


def _record(model, names):
    """Outputs of ``names`` on the next forward, by plain hooks (tuple outputs: element 0)."""
    store, handles = {}, []
    mods = dict(model.named_modules())
    for n in names:
        handles.append(mods[n].register_forward_hook(
            lambda m, i, o, n=n: store.__setitem__(n, o[0] if isinstance(o, tuple) else o)))
    return store, handles


def test_tuple_capture_selects_and_passes_replacement_on(data):
    X, _ = data
    teacher, _ = _models()
    store, handles = _record(teacher, ["blocks.1.self_attn"])
    with torch.no_grad():
        expected_logits = teacher(X)
    for sel in (None, 0, lambda out: out[0]):
        with ActivationCapture(teacher, ["blocks.1.self_attn"], select=sel) as cap, torch.no_grad():
            teacher(X)
            (a,) = cap.outputs()
        assert torch.equal(a, store["blocks.1.self_attn"])
    # The teacher's capture replaces the (grad-free) tensor by a leaf: it must go back into the
    # tuple, so the loss depends on it and the model's output is unchanged.
    with ActivationCapture(teacher, ["blocks.0.self_attn"], differentiable=True) as cap:
        logits = teacher(X)
        (a,) = cap.outputs()
    assert a.is_leaf and a.requires_grad
    assert torch.allclose(logits, expected_logits, atol=1e-6)
    (g,) = torch.autograd.grad(logits.sum(), [a])
    assert g.abs().sum() > 0
    for h in handles:
        h.remove()
    with pytest.raises(ValueError, match="select=3"):
        with ActivationCapture(teacher, ["blocks.0.self_attn"], select=3) as cap:
            teacher(X)
    with pytest.raises(ValueError, match="must return one of the tensors"):
        with ActivationCapture(teacher, ["blocks.0.self_attn"], select=lambda o: o[0] * 1,
                          differentiable=True) as cap:
            teacher(X)
    with pytest.raises(TypeError, match="select"):
        ActivationCapture(teacher, ["blocks.0"], select="first")


def test_token_stats_equal_direct_masked_computation(data, stats):
    X, _ = data
    teacher, _ = _models()
    store, handles = _record(teacher, LAYERS)
    with torch.no_grad():
        teacher(X)
    for h in handles:
        h.remove()
    mask = padding_mask(X)
    for name, mean, std in zip(LAYERS, stats.mean, stats.std):
        rows = store[name][mask].double()
        assert torch.allclose(mean.double(), rows.mean(0), atol=1e-5)
        assert torch.allclose(std.double(), rows.std(0, correction=0), atol=1e-5)
        # padding changes the statistics, so the mask was applied
        assert not torch.allclose(mean.double(), store[name].reshape(-1, 32).double().mean(0),
                                  atol=1e-3)
    assert stats.count == len(X)


def test_masked_loss_ignores_padded_tokens():
    gen = torch.Generator().manual_seed(0)
    B, T, H = 3, 7, 40
    t, g = torch.randn(B, T, H, generator=gen), 1e-2 * torch.randn(B, T, H, generator=gen)
    c = t + 0.3 * torch.randn(B, T, H, generator=gen)
    mean, std = torch.zeros(H), torch.rand(H, generator=gen) + 0.5
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 2:] = False

    def run(t, c, g):
        c = c.clone().requires_grad_()
        loss = masked_clone_loss(t, c, g, mean, std, mask, tau=5.0)
        loss.backward()
        return loss, c.grad

    loss, grad = run(t, c, g)

    def junk(x):
        return torch.where(mask[..., None], x, 1e3 * torch.randn(x.shape, generator=gen))
    loss2, grad2 = run(junk(t), junk(c), junk(g))
    assert torch.allclose(loss, loss2) and torch.allclose(grad, grad2)
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().max() > 0
    rows = medic_fast.importance_clone_loss(t, c, g, mean, std, tau=5.0, start_dim=2,
                                            reduction="none", backend="reference").reshape(B, T)
    assert torch.allclose(loss, rows[mask].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="mask has shape"):
        masked_clone_loss(t, c, g, mean, std, mask[:, :3], tau=5.0)


def _reference_loss(teacher, student, X, y, mask, stats, tau=5.0, lam=10.0):
    """The Cloner's loss written out in float64 PyTorch, hooks and autograd only."""
    tref = copy.deepcopy(teacher).double().requires_grad_(True)
    store_t, ht = _record(tref, LAYERS)
    ce_t = F.cross_entropy(tref(X), y)
    acts_t = [store_t[n] for n in LAYERS]
    grads = torch.autograd.grad(ce_t, acts_t)
    store_c, hc = _record(student, LAYERS)
    logits = student(X)
    for h in ht + hc:
        h.remove()
    total = F.cross_entropy(logits, y)
    for n, t, g, mu, sd in zip(LAYERS, acts_t, grads, stats.mean, stats.std):
        rows = float64_clone_rows(t, store_c[n], g, mu, sd, tau)
        total = total + lam * rows[mask].mean()
    return total


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_cloner_gradients_equal_reference(data, stats, device, backend):
    """The fused kernel of the device ("auto": C++ on the CPU, Triton on CUDA) and the reference
    backend, against the loss written out in float64."""
    X, y = _on(device, *data)
    teacher, student = _models(device=device)
    mask = padding_mask(X)
    cloner = Cloner(teacher, student, LAYERS, stats, tau=5.0, lam=10.0, backend=backend)
    loss = cloner(X, y, mask)
    assert loss.device == X.device
    assert all(t.device == X.device for t in cloner.stats.mean + cloner.stats.std)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref = _reference_loss(teacher, student, X, y, mask, cloner.stats)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    assert torch.allclose(loss.double(), ref, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r.float(), rtol=1e-3, atol=1e-5)
    # without a mask every token counts: a different loss
    assert not torch.allclose(cloner(X, y), loss, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16(data, stats, device):
    X, y = _on(device, *data)
    teacher, student = _models(device=device)
    cloner = Cloner(teacher, student, LAYERS, stats)
    ref = cloner(X, y, padding_mask(X))
    seen = {}
    h = student.blocks[1].mlp.register_forward_hook(lambda m, i, o: seen.update(dt=o.dtype))
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = cloner(X, y, padding_mask(X))
    h.remove()
    assert seen["dt"] == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss) and abs(float(loss.detach()) / float(ref.detach()) - 1) < 0.05
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in student.parameters())


def test_checkpointed_student(data, stats):
    X, y = data
    teacher, plain = _models()
    mask = padding_mask(X)
    ref = torch.autograd.grad(Cloner(teacher, plain, LAYERS, stats)(X, y, mask),
                              list(plain.parameters()))
    _, ckpt = _models(checkpoint="non_reentrant")
    loss = Cloner(teacher, ckpt, LAYERS, stats)(X, y, mask)
    grads = torch.autograd.grad(loss, list(ckpt.parameters()))
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)
    _, reentrant = _models(checkpoint="reentrant")
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        Cloner(teacher, reentrant, LAYERS, stats)(X, y, mask)


def test_two_training_steps_and_nothing_kept(data, stats):
    X, y = data
    teacher, student = _models()
    teacher_state = copy.deepcopy(teacher.state_dict())
    kept = []
    h = teacher.blocks[0].register_forward_hook(lambda m, i, o: kept.append(weakref.ref(o)))
    cloner = Cloner(teacher, student, LAYERS, stats)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    before = copy.deepcopy(student.state_dict())
    losses = []
    for _ in range(2):
        loss = cloner(X, y, padding_mask(X))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    del loss
    gc.collect()
    h.remove()
    # Teacher activations freed; the first call also runs one forward without gradients to find
    # outputs modified in place (copy=None).
    assert len(kept) == 3 and all(r() is None for r in kept)
    assert losses[1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(m._forward_hooks for m in student.modules())


@pytest.mark.parametrize("device", DEVICES)
def test_cloner_follows_models_moved_after_construction(data, stats, device):
    """A Cloner built with the models (and statistics) on the CPU keeps working after the models
    move to ``device``: its statistics follow the activations, and the step gives the CPU's
    gradients."""
    X, y = data
    teacher, student = _models()
    cloner = Cloner(teacher, student, LAYERS, stats)
    ref = torch.autograd.grad(cloner(X, y, padding_mask(X)), list(student.parameters()))
    teacher.to(device)
    student.to(device)
    X, y = _on(device, X, y)
    loss = cloner(X, y, padding_mask(X))
    assert all(t.device == X.device for t in cloner.stats.mean + cloner.stats.std)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    for g, r in zip(grads, ref):
        assert g.device == X.device
        torch.testing.assert_close(g.cpu(), r, rtol=1e-3, atol=1e-5)


def test_cloner_argument_errors(stats):
    teacher, student = _models()
    with pytest.raises(ValueError, match="stats are for layers"):
        Cloner(teacher, student, LAYERS[:2], stats)
    with pytest.raises(ValueError, match="not a submodule"):
        Cloner(teacher, student, ["blocks.7"], stats)
    with pytest.raises(TypeError, match="stats must be a LayerStats"):
        Cloner(teacher, student, LAYERS, None)
    with pytest.raises(ValueError, match="tau"):
        Cloner(teacher, student, LAYERS, stats, tau=-1)


def test_compiled_student(data, stats):
    """Dynamo traces the student with the Cloner's hooks; a compiled step runs the Cloner eagerly
    around it. (aot_eager: the graphs without Inductor's code generation, which costs ~40 s
    here; benchmarks/bench_transformer.py runs Inductor.)"""
    X, y = data
    teacher, student = _models()
    mask = padding_mask(X)
    ref = torch.autograd.grad(Cloner(teacher, student, LAYERS, stats)(X, y, mask),
                              list(student.parameters()))
    cloner = Cloner(teacher, torch.compile(student, backend="aot_eager"), LAYERS, stats)
    step = torch.compile(lambda x, y, m: cloner(x, y, m), backend="aot_eager")
    grads = torch.autograd.grad(step(X, y, mask), list(student.parameters()))
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)


def test_token_trigger(data):
    X, y = data
    trig = TokenTrigger(pattern=(5, 6))
    p = trig.poison(X, y, 0.25, target=1, seed=0)
    assert p.X.dtype == X.dtype and torch.equal(p.X[~torch.isin(torch.arange(len(X)), p.index)],
                                                X[~torch.isin(torch.arange(len(X)), p.index)])
    assert (p.y[p.index] == 1).all() and (y[p.index] != 1).all()
    stamped = trig(X)
    assert torch.equal(padding_mask(stamped), padding_mask(X))
    hits = (stamped.unfold(1, 2, 1) == torch.tensor([5, 6])).all(-1).any(1)
    assert hits.all()


def _ddp_worker(rank, world, init_file, result):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        X, y = make_sequences(48, length=16, min_length=4, seed=0)
        teacher, student = _models()
        stats = collect_stats(teacher, (X, y), LAYERS, mask_fn=padding_mask, batch_size=8)
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        xs, ys = X[rank::world], y[rank::world]
        Cloner(teacher, ddp, LAYERS, stats)(xs, ys, padding_mask(xs)).backward()
        if rank == 0:
            # numpy arrays pickle by value (tensors would pass file descriptors that die with us)
            result.put([[x.numpy() for x in xs] for xs in
                        (stats.mean, stats.std, [p.grad for p in student.parameters()])])
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes(data, stats, tmp_path):
    X, y = data
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    init_file = tmp_path / "rendezvous"
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(init_file), result))
             for r in range(2)]
    for p in procs:
        p.start()
    means, stds, grads = ([torch.from_numpy(a) for a in xs] for xs in result.get(timeout=300))
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    for a, b in zip(means + stds, stats.mean + stats.std):
        assert torch.allclose(a, b, atol=1e-5)
    # DDP averages the two shards' gradients
    teacher, student = _models()
    cloner = Cloner(teacher, student, LAYERS, stats)
    loss = sum(cloner(X[r::2], y[r::2], padding_mask(X[r::2])) for r in range(2)) / 2
    ref = torch.autograd.grad(loss, list(student.parameters()))
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# one clone objective: in-place activations, and the same loss as sanitize
# --------------------------------------------------------------------------------------------

def _convnet(inplace: bool) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                         nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_relu_after_batchnorm_under_cloner(device, monkeypatch):
    """BatchNorm followed by ReLU(inplace=True): the Cloner finds it and clones the BatchNorm's
    own output, giving the loss and gradients of the same network without in-place ReLU. The
    statistics come from CPU data for a model on ``device``."""
    _exact_fp32(monkeypatch, device)
    X, y = datasets.load_digits()
    X, y = X[:40], y[:40]
    losses, grads = [], []
    for inplace in (True, False):
        teacher = _convnet(inplace).eval().requires_grad_(False).to(device)
        student = _convnet(inplace).to(device)
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(0.5)
        stats = collect_stats(teacher, (X, y), ["0", "1"])
        assert all(t.device.type == device for t in stats.mean + stats.std)
        cloner = Cloner(teacher, student, ["0", "1"], stats)
        loss = cloner(*_on(device, X, y))
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(student.parameters())))
        if inplace:
            assert cloner.copy == ["1"]
    tol = {} if device == "cpu" else dict(rtol=1e-4, atol=1e-6)  # cuDNN: atomics in backward
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_sanitize_trains_on_the_cloner_loss(device, monkeypatch):
    """One step of sanitize (the whole set is one batch) logs the loss a Cloner built by hand
    gives on the same batch, with the same CE and clone parts; for a model on ``device`` and CPU
    data, the clone and the statistics are on the model's device."""
    _exact_fp32(monkeypatch, device)
    X, y = datasets.load_digits()
    X, y = X[:64], y[:64]
    torch.manual_seed(0)
    trojan = models.DigitsCNN((4, 6, 8)).to(device)
    torch.manual_seed(1)
    init = models.DigitsCNN((4, 6, 8))
    r = medic_fast.sanitize(trojan, (X, y), epochs=1, batch_size=64, progress=False,
                            factory=lambda: copy.deepcopy(init))
    assert all(t.device.type == device for t in [*r.model.parameters(), *r.model.buffers(),
                                                 *r.stats.mean, *r.stats.std])
    teacher = copy.deepcopy(trojan).eval().requires_grad_(False)
    settings = RECIPES["default"]
    cloner = Cloner(teacher, copy.deepcopy(init).to(device).train(), r.stats.layers, r.stats,
                    tau=settings["tau"], lam=settings["lam"])
    loss = cloner(*_on(device, X, y))
    row = r.history[0]
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert row["ce"] == pytest.approx(float(cloner.last.ce), rel=1e-5)
    assert row["clone"] == pytest.approx(float(cloner.last.clone), rel=1e-5)


def test_kd_term_is_distillation_from_the_teacher_in_eval_mode():
    """``kd``: ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` at ``kd_temperature``
    on the step's own inputs, with the teacher's eval-mode logits (its BatchNorm running
    statistics, although its user left it in train mode), weighted by ``kd`` alone beside CE
    and the clone loss; the same on a step whose teacher signals come from the cache."""
    X, y = datasets.load_digits()
    X, y = X[:32], y[:32]
    torch.manual_seed(0)
    teacher = models.DigitsCNN((4, 6, 8))
    for m in teacher.modules():  # running statistics far from any batch's
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.2, 3.0)
    reference = copy.deepcopy(teacher).eval()
    teacher.train().requires_grad_(False)
    torch.manual_seed(1)
    student = models.DigitsCNN((4, 6, 8))
    layers = ["features.0", "features.4"]
    stats = collect_stats(reference, (X, y), layers)
    T, kd, lam = 3.0, 0.7, 0.01  # a small lam: the clone loss does not drown the kd term
    cloner = Cloner(teacher, student, layers, stats, lam=lam, kd=kd, kd_temperature=T,
                    cache=TeacherCache(len(y)))
    index = torch.arange(len(y))
    for _ in range(2):  # the second step's teacher signals are the cache's
        loss = cloner(X, y, index=index)
        with torch.no_grad():
            s, t = student(X), reference(X)  # the student in train mode, as in the step
        want = T ** 2 * F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1),
                                 log_target=True, reduction="batchmean")
        assert float(cloner.last.kd) == pytest.approx(float(want), rel=1e-5)
        rest = loss.detach() - cloner.last.ce - lam * cloner.last.clone
        torch.testing.assert_close(rest, kd * want, rtol=1e-4, atol=1e-5)
    assert cloner.cache.complete and teacher.training


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cloner_step_captured_in_a_cuda_graph(monkeypatch):
    """A whole Cloner step (the teacher's pass, the student's, CE + lam * clone loss, backward)
    captured by hand in one CUDA graph and replayed with new batches copied into its inputs:
    the student's gradients are eager's each time."""
    _exact_fp32(monkeypatch, "cuda")
    X, y = (x.cuda() for x in datasets.load_digits())
    torch.manual_seed(0)
    teacher = models.DigitsCNN((8, 16, 16)).cuda().eval().requires_grad_(False)
    student = models.DigitsCNN((8, 16, 16)).cuda().train()
    layers = [n for n, m in teacher.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    stats = collect_stats(teacher, (X, y), layers)
    cloner = Cloner(teacher, student, layers, stats, tau=20.0, lam=10.0)
    x_in, y_in = X[:64].clone(), y[:64].clone()

    def step():
        student.zero_grad(set_to_none=False)
        cloner(x_in, y_in).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: gradients allocated, plans made, kernels compiled
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for b in range(1, 4):
        x_in.copy_(X[64 * b:64 * (b + 1)])
        y_in.copy_(y[64 * b:64 * (b + 1)])
        graph.replay()
        replayed = [p.grad.clone() for p in student.parameters()]
        student.zero_grad(set_to_none=False)
        cloner(X[64 * b:64 * (b + 1)], y[64 * b:64 * (b + 1)]).backward()
        for g, e in zip(replayed, (p.grad for p in student.parameters())):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
