"""The importance clone loss: every backend against a float64 reference, forward and gradient.

The tests are parametrised over ``(device, backend)`` (:func:`device_backends`, ids like
``cpu-cpp`` and ``cuda-triton``). On CPU tensors, the Triton kernels run on small sizes under
TRITON_INTERPRET=1, as the op's CPU kernel (``backend_arg`` in conftest.py), so through the real
op: autograd, gradcheck, compile, opcheck. On CUDA tensors (a GPU machine; ``pytest -m cuda``)
``"auto"`` and ``"triton"`` run the compiled kernels against the same float64 reference, which
always runs on CPU.
"""
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from shared import CUDA, DEVICES

import medic_fast
from medic_fast import _extension


def device_backends(cpu, cuda=("auto", "triton")):
    """``(device, backend)`` parameters for ``@pytest.mark.parametrize("device, backend", ...)``:
    the backends ``cpu`` on CPU tensors (``"triton"`` through the interpreter, see
    ``backend_arg`` in conftest.py) and ``cuda`` on CUDA tensors, with the marks of
    ``shared.DEVICES`` (the CUDA cases are marked ``cuda`` and skipped without a GPU). Ids read
    ``cpu-cpp``, ``cuda-triton``."""
    out = []
    for entry in DEVICES:
        device, marks = (entry, ()) if isinstance(entry, str) else (entry.values[0], entry.marks)
        out += [pytest.param(device, backend, id=f"{device}-{backend}", marks=marks)
                for backend in (cpu if device == "cpu" else cuda)]
    return out


# (device, backend) cases: every backend, the fused ones, and one fused kernel per device.
ALL = device_backends(["reference", "cpp", "triton"], ["reference", "auto", "triton"])
FAST = device_backends(["cpp", "triton"], ["auto", "triton"])
ONE = device_backends(["cpp"], ["triton"])
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]


def make(shape, *, stats="channel", start_dim=1, dtype=torch.float32, seed=0, layers=1,
         device="cpu"):
    """Fresh random inputs (never zeros), drawn on CPU then moved to ``device``: per layer
    (t, c, g, mean, std)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        # Later layers have other feature sizes but the same rows (as reduction="none" needs).
        shp = tuple(shape[:start_dim]) + tuple(s + i for s in shape[start_dim:])
        t = torch.randn(shp, generator=gen) * 1.5 + 0.3
        c = t + 0.5 * torch.randn(shp, generator=gen)
        g = torch.randn(shp, generator=gen) * 0.2
        feat = shp[start_dim:]
        if stats == "channel":
            mean = torch.randn(feat[0], generator=gen) * 0.3
            std = torch.rand(feat[0], generator=gen) + 0.5
        elif stats == "neuron":
            mean = torch.randn(feat, generator=gen) * 0.3
            std = torch.rand(feat, generator=gen) + 0.5
        else:
            mean = std = None
        out.append(tuple(x.to(device, dtype) for x in (t, c, g))
                   + tuple(None if x is None else x.to(device) for x in (mean, std)))
    return out


def _loss_args(layers, single):
    """Fresh ``acts_c`` leaves that require grad, and the loss's positional arguments (one layer,
    or lists of layers)."""
    cs = [c.detach().clone().requires_grad_() for _, c, _, _, _ in layers]
    args = [[layer[0] for layer in layers], cs, [layer[2] for layer in layers],
            None if layers[0][3] is None else [layer[3] for layer in layers],
            None if layers[0][4] is None else [layer[4] for layer in layers]]
    if single:
        args = [a if a is None else a[0] for a in args]
    return cs, args


def run(layers, backend, *, single=True, grad_scale=1.7, **kw):
    """Loss and d(grad_scale * sum(loss))/d acts_c for each layer, via the public API."""
    cs, args = _loss_args(layers, single)
    loss = medic_fast.importance_clone_loss(*args, backend=backend, **kw)
    (grad_scale * loss.sum()).backward()
    return loss.detach(), [c.grad for c in cs]


def run64(layers, **kw):
    """The float64 reference, on CPU whatever the layers' device."""
    up = [tuple(None if x is None else x.double().cpu() for x in layer) for layer in layers]
    return run(up, "reference", **kw)


TOL = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.bfloat16: dict(rtol=2e-2, atol=1e-4),
       torch.float16: dict(rtol=3e-3, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-13)}


def assert_matches(layers, backend, dtype=torch.float32, **kw):
    loss, grads = run(layers, backend, **kw)
    loss64, grads64 = run64(layers, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and loss.device == layers[0][0].device
    tol = TOL[dtype]
    # The loss is accumulated in fp32 whatever the input dtype: fp32 tolerance for it.
    ltol = TOL[acc]
    torch.testing.assert_close(loss.double().cpu(), loss64, rtol=ltol["rtol"], atol=ltol["atol"])
    for gr, gr64 in zip(grads, grads64):
        assert gr.dtype == dtype and gr.device == layers[0][0].device
        scale = gr64.abs().max()
        torch.testing.assert_close(gr.double().cpu() / scale, gr64 / scale, rtol=tol["rtol"],
                                   atol=tol["rtol"])


# --- all backends, one layer ---------------------------------------------------------------

@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("criterion", ["abs", "signed"])
@pytest.mark.parametrize("stats", ["channel", "neuron", None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_layer(device, backend_arg, criterion, stats, reduction):
    layers = make((3, 5, 4, 7), stats=stats, device=device)
    assert_matches(layers, backend_arg, tau=5.0, criterion=criterion, reduction=reduction)


@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("tau", [0.0, 1.0, 5.0, 100.0])
def test_tau(device, backend_arg, tau):
    layers = make((4, 6, 5, 5), seed=int(tau), device=device)
    assert_matches(layers, backend_arg, tau=tau)


@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("tau", [1e10, 1e30])
def test_huge_tau_is_a_hard_argmax(device, backend_arg, tau):
    """At tau ~1e10 and above the weights are a one-hot argmax of a and of q (0 where the two
    argmax differ): the loss and gradient are finite and the reference's (it was inf or NaN on
    the C++ kernel, whose fused multiply-add put the largest a' one rounding of ~2^9 below its
    reference, so 2^(a' - ra) underflowed the row's sums). Rows of one chunk and of several."""
    for shape in ((4, 6, 5, 5), (3, 5000)):
        layers = make(shape, device=device)
        loss, grads = run(layers, backend_arg, tau=tau)
        loss64, grads64 = run64(layers, tau=tau)
        assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(loss.double().cpu(), loss64, rtol=1e-5, atol=1e-30)
        for gr, gr64 in zip(grads, grads64):
            torch.testing.assert_close(gr.double().cpu(), gr64, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("stats", ["channel", "neuron"])
def test_start_dim_2_tokens(device, backend_arg, stats):
    layers = make((2, 5, 33), start_dim=2, stats=stats, device=device)
    assert_matches(layers, backend_arg, tau=5.0, start_dim=2, reduction="none")


@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("shape", [(5, 1), (1, 1), (3, 1, 1, 1), (7, 3), (2, 3, 1, 17), (1, 2049)])
def test_odd_sizes(device, backend_arg, shape):
    layers = make(shape, device=device)
    assert_matches(layers, backend_arg, tau=5.0)


@pytest.mark.parametrize("device, backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, backend_arg, dtype):
    layers = make((4, 8, 6, 6), dtype=dtype, device=device)
    assert_matches(layers, backend_arg, dtype=dtype, tau=5.0)


@pytest.mark.parametrize("device, backend", device_backends(["reference", "cpp"], ["triton"]))
def test_float64(device, backend_arg):
    layers = make((3, 4, 5, 6), dtype=torch.float64, device=device)
    assert_matches(layers, backend_arg, dtype=torch.float64, tau=5.0)


# --- rows split across programs / threads -------------------------------------------------

def test_cpp_long_rows_split_across_threads():
    """Few rows much longer than a chunk: the split-row path (chunks in parallel, then merge)."""
    layers = make((2, 3, 101, 50))  # m = 15150, 15 chunks per row
    assert_matches(layers, "cpp", tau=5.0)
    assert_matches(layers, "cpp", tau=100.0, reduction="none")


def test_cpp_many_rows():
    """Enough rows for the whole-rows-per-task path, with rows longer than one chunk."""
    layers = make((33, 4, 20, 20))
    assert_matches(layers, "cpp", tau=5.0)


@pytest.mark.parametrize("device, backend", device_backends(["triton"]))
def test_triton_long_rows(device, backend_arg):
    """Rows of several tiles: split across programs (on a GPU, every tile its own split)."""
    layers = make((2, 4100), device=device)
    assert_matches(layers, backend_arg, tau=5.0)


@pytest.mark.parametrize("device, backend", device_backends(["cpp"]))
def test_large_tau_far_apart_chunks(device, backend_arg):
    """Chunk maxima far apart (tau=100, one extreme neuron): merge rescaling stays finite."""
    layers = make((2, 5000), stats="neuron", device=device)
    t, c, g, mean, std = layers[0]
    t = t.clone()
    t[0, 4321] = 40.0
    g = g.clone()
    g[1, 17] = 3.0
    assert_matches([(t, c, g, mean, std)], backend_arg, tau=100.0, reduction="none")


def fp16_overflow_case(device):
    """fp16 rows of three 2048-wide tiles whose first tile, alone, puts its weight on one neuron
    with ``|r / s|`` large: normalised by that tile alone its gradient is about 8e4 (over fp16's
    65504), while the row's softmax mass sits in the last tile (final gradient about 2)."""
    m = 3 * 2048
    t, g = torch.zeros(2, m), torch.zeros(2, m)
    mean, std = torch.zeros(m), torch.ones(m)
    first, last = 100, 2 * 2048 + 7
    std[first], t[:, first], g[:, first] = 0.01, 0.1, 1000.0  # a = 10, q = 10 (tau = 1)
    t[:, last], g[:, last] = 30.0, 40.0  # a = 30, q = 40
    c = t.clone()
    c[:, first] -= 4.0  # r / s = 4e4
    c[:, last] -= 1.0
    return [tuple(x.to(device, torch.float16) for x in (t, c, g))
            + (mean.to(device), std.to(device))]


@pytest.mark.parametrize("split", ["few-splits", "tile-splits"])
@pytest.mark.parametrize("device, backend", device_backends(["triton"]))
def test_fp16_tile_gradient_does_not_overflow(device, backend_arg, split, monkeypatch):
    """A 16-bit tile's provisional gradient (normalised by its split's prefix) may exceed fp16's
    range before the rescale: it is kept in range, and the gradient is the reference's. Both
    the interpreter's split (few programs) and a GPU's (every tile its own split) are forced."""
    from medic_fast.kernels import importance_clone as ic

    target = ic._PROGRAMS_INTERPRETER if split == "few-splits" else 1 << 30
    monkeypatch.setattr(ic, "target_programs", lambda device: target)
    layers = fp16_overflow_case(device)
    _, grads64 = run64(layers, tau=1.0, reduction="sum")
    assert grads64[0].abs().max() < 10  # finite and small in fp16 too
    loss, grads = run(layers, backend_arg, tau=1.0, reduction="sum")
    assert torch.isfinite(grads[0]).all()
    assert_matches(layers, backend_arg, dtype=torch.float16, tau=1.0, reduction="sum")


# --- several layers -----------------------------------------------------------------------

@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_layer_lists(device, backend_arg, reduction):
    layers = make((3, 4, 5, 5), layers=3, device=device)
    assert_matches(layers, backend_arg, single=False, tau=5.0, reduction=reduction)


@pytest.mark.parametrize("device, backend", ONE)
def test_layer_lists_mixed_dtypes_and_start_dims(device, backend_arg):
    layers = make((4, 6, 3, 3), layers=2, device=device)
    (t0, c0, g0, m0, s0), (t1, c1, g1, m1, s1) = layers
    mixed = [(t0, c0, g0, m0, s0), (t1.bfloat16(), c1.bfloat16(), g1.bfloat16(), m1, s1)]
    loss, grads = run(mixed, backend_arg, single=False, tau=5.0)
    loss_ref, grads_ref = run(mixed, "reference", single=False, tau=5.0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(grads[1], grads_ref[1], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("device, backend", FAST)
def test_float32_and_float64_layers_in_one_call(device, backend_arg):
    """Layers of float32 and float64 together (it raised an internal error on the C++ kernel):
    the loss in float64, each gradient in its layer's dtype, as the reference gives them."""
    layers = make((4, 6, 3, 3), layers=2, device=device)
    mixed = [layers[0], tuple(x.double() if x.dim() > 1 else x for x in layers[1])]
    loss, grads = run(mixed, backend_arg, single=False, tau=5.0)
    loss_ref, grads_ref = run64(mixed, single=False, tau=5.0)
    assert loss.dtype == torch.float64
    assert [g.dtype for g in grads] == [torch.float32, torch.float64]
    torch.testing.assert_close(loss.cpu(), loss_ref, rtol=1e-5, atol=1e-7)
    for gr, gr64 in zip(grads, grads_ref):
        torch.testing.assert_close(gr.double().cpu(), gr64, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device, backend", ONE)
def test_list_equals_sum_of_layers(device, backend_arg):
    layers = make((3, 4, 5, 5), layers=3, device=device)
    total, _ = run(layers, backend_arg, single=False, tau=5.0)
    parts = [run([layer], backend_arg, tau=5.0)[0] for layer in layers]
    torch.testing.assert_close(total, sum(parts), rtol=1e-6, atol=0)


# --- layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("device, backend", FAST)
def test_non_contiguous_inputs(device, backend_arg):
    (t, c, g, mean, std), = make((4, 6, 5, 5), device=device)
    big = [torch.randn(8, 6, 5, 10, device=device) for _ in range(3)]
    for b, x in zip(big, (t, c, g)):
        b[::2, :, :, ::2] = x
    tv, cv, gv = (b[::2, :, :, ::2] for b in big)
    assert not tv.is_contiguous()
    cl = [x.contiguous(memory_format=torch.channels_last) for x in (t, c, g)]
    for layer in ([(tv, cv, gv, mean, std)], [tuple(cl) + (mean, std)]):
        assert_matches(layer, backend_arg, tau=5.0)


@pytest.mark.parametrize("device, backend", ONE)
def test_row_stride_zero_teacher(device, backend_arg):
    """An expanded (stride-0) teacher is read in place."""
    (t, c, g, mean, std), = make((5, 3, 4, 4), device=device)
    t0 = t[:1].expand_as(t)
    assert_matches([(t0, c, g, mean, std)], backend_arg, tau=5.0)


@pytest.mark.parametrize("device, backend", device_backends(["reference", "cpp"],
                                                            ["reference", "triton"]))
def test_inputs_not_modified(device, backend_arg):
    layers = make((4, 6, 5, 5), device=device)
    before = [x.clone() for x in layers[0] if x is not None]
    run(layers, backend_arg, tau=5.0)
    for x, y in zip(before, (x for x in layers[0] if x is not None)):
        assert torch.equal(x, y)


# --- devices ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_mixed_devices_refused_by_name(device):
    """Every layer, and its statistics, on the device of the first layer's acts_t: a tensor
    elsewhere is refused by name, layer and both devices (here meta for CPU, CPU for CUDA)."""
    other = "meta" if device == "cpu" else "cpu"
    (t, c, g, mean, std), (t1, c1, g1, mean1, std1) = make((3, 4, 3, 3), layers=2, device=device)
    device = re.escape(str(t.device))  # as the message names it: cuda:0

    def refused(match, ts=(t, t1), cs=(c, c1), gs=(g, g1), means=(mean, mean1), stds=(std, std1)):
        for backend in ("auto", "reference"):
            with pytest.raises(ValueError, match=match):
                medic_fast.importance_clone_loss(list(ts), list(cs), list(gs), list(means),
                                                 list(stds), backend=backend)

    moved = [x.to(other) for x in (t1, c1, g1, mean1, std1)]
    refused(rf"^acts_t \(layer 1\) is on {other} but acts_t \(layer 0\) is on {device}",
            ts=(t, moved[0]), cs=(c, moved[1]), gs=(g, moved[2]),
            means=(mean, moved[3]), stds=(std, moved[4]))
    refused(rf"^grads \(layer 1\) is on {other} but acts_t \(layer 1\) is on {device}",
            gs=(g, moved[2]))
    refused(rf"^mean \(layer 1\) is on {other} but acts_t \(layer 1\) is on {device}",
            means=(mean, moved[3]))
    refused(rf"^std \(layer 0\) is on {other} but acts_t \(layer 0\) is on {device}",
            stds=(std.to(other), std1))
    with pytest.raises(ValueError, match=rf"^std is on {other} but acts_t is on {device}; all "
                       r"tensors \(of every layer, statistics included\) must be on one device"):
        medic_fast.importance_clone_loss(t, c, g, mean, std.to(other))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.cuda
def test_tensors_on_another_gpu_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the Triton launches run on cuda:1 (a device
    guard; Triton launches on the current device and stream), loss and gradient as on cuda:0."""
    layers = make((3, 4, 5, 5), layers=2, device="cuda:1")
    layers[1] = tuple(None if x is None else x.half() if x.dim() > 1 else x for x in layers[1])
    with torch.cuda.device(0):
        loss, grads = run(layers, "triton", single=False, tau=5.0)
    torch.cuda.synchronize(1)
    ref, ref_grads = run([tuple(None if x is None else x.to("cuda:0") for x in layer)
                          for layer in layers], "triton", single=False, tau=5.0)
    assert loss.device == torch.device("cuda:1")
    torch.testing.assert_close(loss.cpu(), ref.cpu(), rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)


# --- autograd and compile -----------------------------------------------------------------

@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(device, backend_arg, reduction):
    (t, c, g, mean, std), = make((2, 3, 2, 3), dtype=torch.float64, stats="neuron", device=device)
    mean, std = mean.double(), std.double()
    c = c.clone().requires_grad_()

    def f(c_):
        return medic_fast.importance_clone_loss(t, c_, g, mean, std, tau=5.0, backend=backend_arg,
                                                reduction=reduction)

    assert torch.autograd.gradcheck(f, (c,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device, backend", device_backends(["reference", "cpp"],
                                                            ["reference", "triton"]))
def test_gradient_only_to_acts_c(device, backend_arg):
    (t, c, g, mean, std), = make((3, 4, 3, 3), device=device)
    t = t.clone().requires_grad_()
    g = g.clone().requires_grad_()
    c = c.clone().requires_grad_()
    mean = mean.clone().requires_grad_()
    loss = medic_fast.importance_clone_loss(t, c, g, mean, std, backend=backend_arg)
    gt, gc, gg, gm = torch.autograd.grad(loss, (t, c, g, mean), allow_unused=True)
    assert gt is None and gg is None and gm is None and gc is not None


@pytest.mark.parametrize("device, backend", ONE)
def test_no_grad_returns_loss_only(device, backend_arg):
    layers = make((3, 4, 3, 3), device=device)
    with torch.no_grad():
        loss = medic_fast.importance_clone_loss(*layers[0], backend=backend_arg)
    assert not loss.requires_grad
    ref = run64(layers)[0]
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("device, backend", FAST)
def test_second_backward_recomputes(device, backend_arg):
    """retain_graph=True: the second backward gives the same gradient as the first."""
    (t, c, g, mean, std), = make((3, 4, 3, 3), device=device)
    c = c.clone().requires_grad_()
    loss = medic_fast.importance_clone_loss(t, c, g, mean, std, backend=backend_arg)
    (g1,) = torch.autograd.grad(2 * loss, c, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * loss, c, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, c)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    torch.testing.assert_close(g3, g1 / 2, rtol=1e-6, atol=0)


def run_double(layers, backend, coef, *, single=True, **kw):
    """``total = sum(u * loss) + coef * sum_l |G_l|^2``, ``G_l = d sum(u * loss) / d acts_c[l]``
    taken with ``create_graph=True`` and ``u`` fixed random row weights: ``total``, the ``G_l``
    and ``d total / d acts_c`` (on CPU)."""
    cs, args = _loss_args(layers, single)
    loss = medic_fast.importance_clone_loss(*args, backend=backend, **kw)
    u = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    u = u.to(loss.device, loss.dtype)
    first = (u * loss).sum()
    gs = torch.autograd.grad(first, cs, create_graph=True)
    assert all(gr.requires_grad for gr in gs)
    total = first + coef * sum(gr.to(loss.dtype).pow(2).sum() for gr in gs)
    total.backward()
    return total.detach().cpu(), [gr.detach().cpu() for gr in gs], [c.grad.cpu() for c in cs]


@pytest.mark.parametrize("device, backend", ALL)
@pytest.mark.parametrize("case", [
    dict(shape=(3, 4, 5, 5), layers=2, reduction="mean"),
    dict(shape=(3, 4, 3, 3), stats="neuron", reduction="sum", criterion="signed"),
    dict(shape=(2, 5, 33), start_dim=2, reduction="none"),
    dict(shape=(4, 6, 5), stats=None, reduction="none", criterion="signed"),
    dict(shape=(4, 8, 6, 6), dtype=torch.bfloat16, reduction="mean"),
], ids=["channel-2layers-mean", "neuron-sum-signed", "tokens-none", "batchstats-none",
        "bf16-mean"])
def test_double_backward_matches_reference(device, backend_arg, case):
    """A gradient penalty, ``loss + coef * |grad|^2``: value, first-order gradient and the
    gradient through it (second order) against the float64 reference."""
    case = dict(case)
    made = {k: case.pop(k) for k in ("shape", "layers", "stats", "start_dim", "dtype") if k in case}
    layers = make(made.pop("shape"), device=device, **made)
    dtype = made.get("dtype", torch.float32)
    kw = dict(case, tau=5.0, start_dim=made.get("start_dim", 1), single=len(layers) == 1)
    up = [tuple(None if x is None else x.double().cpu() for x in layer) for layer in layers]
    first64, g64, _ = run_double(up, "reference", 0.0, **kw)
    coef = float(first64) / sum(float(g.pow(2).sum()) for g in g64)  # two terms of one size
    total64, g64, d64 = run_double(up, "reference", coef, **kw)
    total, gs, ds = run_double(layers, backend_arg, coef, **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(total.double(), total64, rtol=tol["rtol"], atol=0)
    for got, want in [*zip(gs, g64), *zip(ds, d64)]:
        assert got.dtype == dtype
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol["rtol"],
                                   atol=tol["rtol"])
    for d, g in zip(d64, g64):  # the second-order part is not negligible
        assert (d - g).norm() > 0.1 * g.norm()


@pytest.mark.parametrize("device, backend", FAST)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck(device, backend_arg, reduction):
    """Second derivatives in float64, in ``acts_c`` and in the incoming gradient; two layers,
    per-channel statistics read in runs (``inner > 1``)."""
    layers = make((2, 2, 4, 4), dtype=torch.float64, layers=2, device=device)
    ts, cs, gs, ms, ss = (list(x) for x in zip(*layers))
    ms, ss = [m.double() for m in ms], [s.double() for s in ss]
    cs = [c.clone().requires_grad_() for c in cs]

    def f(*cs_):
        return medic_fast.importance_clone_loss(ts, list(cs_), gs, ms, ss, tau=5.0,
                                                criterion="signed", reduction=reduction,
                                                backend=backend_arg)

    assert torch.autograd.gradgradcheck(f, cs, eps=1e-6, atol=1e-7)


def _compiled_double_backward(t, c, g, mean, std, backend):
    """``loss + |d loss / d c|^2`` through a compiled loss: ``None`` when the gradient does not
    require grad (no second order), else the error of the backward through it (or ``""``)."""
    c = c.clone().requires_grad_()
    torch._dynamo.reset()
    f = torch.compile(lambda c_: medic_fast.importance_clone_loss(t, c_, g, mean, std,
                                                                  backend=backend),
                      fullgraph=True, backend="inductor")
    loss = f(c)
    (gr,) = torch.autograd.grad(loss, c, create_graph=True)
    if not gr.requires_grad:
        return None
    try:
        (loss + gr.pow(2).sum()).backward()
    except RuntimeError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("device, backend", ONE)
def test_double_backward_under_compile_is_first_order_as_in_torch(device, backend_arg):
    """torch.compile traces the backward without grad mode, so its gradient is first-order only,
    as for any compiled function: the backward through it is an error (torch 2.13), or the
    gradient does not require grad (torch 2.11, on CUDA), exactly as when plain PyTorch (the
    reference) is compiled. Never a second order computed wrong."""
    (t, c, g, mean, std), = make((3, 4, 5), device=device)
    fused = _compiled_double_backward(t, c, g, mean, std, backend_arg)
    plain = _compiled_double_backward(t, c, g, mean, std, "reference")
    assert fused is None or "does not currently support double backward" in fused, fused
    assert (fused is None) == (plain is None), (fused, plain)


@pytest.mark.parametrize("device, backend", device_backends(["reference", "cpp", "triton"],
                                                            ["auto"]))
def test_torch_compile_fullgraph(device, backend_arg):
    layers = make((4, 6, 5, 5), layers=2, device=device)
    ts, cs, gs, ms, ss = (list(x) for x in zip(*layers))

    def step(cs_):
        loss = medic_fast.importance_clone_loss(ts, cs_, gs, ms, ss, tau=5.0, backend=backend_arg)
        return 3.0 * loss + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    c_eager = [c.clone().requires_grad_() for c in cs]
    c_comp = [c.clone().requires_grad_() for c in cs]
    le, lc = step(c_eager), compiled(c_comp)
    le.backward()
    lc.backward()
    # The fused kernels run the same code compiled or not; Inductor's code for the plain-PyTorch
    # reference reorders fp32 sums (a few ulps).
    rtol = 1e-5 if backend_arg == "reference" else 1e-6
    torch.testing.assert_close(lc, le, rtol=rtol, atol=1e-7)
    for a, b in zip(c_comp, c_eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=1e-9)


def test_traced_op_shows_its_triton_kernels():
    """Under AOTAutograd (what torch.compile hands to Inductor) the op on CUDA tensors decomposes
    into its Triton launches, ``triton_kernel_wrapper_functional`` nodes that Inductor schedules:
    one for a layer of short rows (the row kernel), two for a split layer. Traced on fake CUDA
    tensors, so it runs on a machine without a GPU, in a process where the kernels are compiled
    Triton functions (not the interpreter's)."""
    code = textwrap.dedent("""
        import torch, medic_fast
        from torch._functorch.aot_autograd import aot_export_module
        from torch._subclasses.fake_tensor import FakeTensorMode
        from medic_fast.kernels import importance_clone as ic
        ic.target_programs = lambda device: 528  # an H100's 132 SMs x 4: no GPU to ask
        mode = FakeTensorMode()
        with mode:
            layers = [[torch.randn(shape, device="cuda") for _ in range(3)]
                      + [torch.randn(shape[1], device="cuda"), torch.rand(shape[1], device="cuda")]
                      for shape in ((8, 16, 8, 8), (4, 16, 32, 32))]

        class Loss(torch.nn.Module):
            def forward(self, *flat):
                ts, cs, gs, ms, ss = (list(flat[i::5]) for i in range(5))
                return (medic_fast.importance_clone_loss(ts, cs, gs, ms, ss, tau=5.0),)

        with mode:
            gm, _ = aot_export_module(Loss(), tuple(x for layer in layers for x in layer),
                                      trace_joint=False)
        nodes = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        print("WRAPPERS", len(nodes), sorted({str(n.target) for n in nodes}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "WRAPPERS 3 ['triton_kernel_wrapper_functional']" in out.stdout, \
        out.stdout + out.stderr[-3000:]


def test_op_is_not_tagged_cudagraph_unsafe():
    """Nothing is copied from the host per call any more: CUDA graphs may capture the op."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    assert tag is None or tag not in torch.ops.medic_fast.importance_clone_loss.default.tags


@pytest.mark.parametrize("device, backend", device_backends([], ["auto"]))
def test_reduce_overhead_compile_follows_new_inputs(device, backend_arg):
    """torch.compile(mode="reduce-overhead") captures the op in its CUDA graphs (no skip), and
    every call with new inputs gives eager's loss and gradient."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def step(t, c, g, mean, std):
        return 2.0 * medic_fast.importance_clone_loss(t, c, g, mean, std, tau=5.0,
                                                      backend=backend_arg) + 1.0

    compiled = torch.compile(step, mode="reduce-overhead")
    for seed in range(4):
        (t, c, g, mean, std), = make((4, 6, 5, 5), seed=seed, device=device)
        c_eager, c_comp = c.clone().requires_grad_(), c.clone().requires_grad_()
        le, lc = step(t, c_eager, g, mean, std), compiled(t, c_comp, g, mean, std)
        le.backward()
        lc.backward()
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c_comp.grad, c_eager.grad, rtol=1e-6, atol=1e-9)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@pytest.mark.parametrize("device, backend", device_backends([], ["triton"]))
def test_cuda_graph_capture_replays_with_new_inputs(device, backend_arg):
    """A CUDA graph captured by hand around the loss's forward and backward (two layers: one
    row kernel, one split) replays with new inputs copied into the captured tensors, and gives
    eager's loss and gradients each time."""
    shapes = [(8, 16, 8, 8), (4, 16, 32, 32)]
    static = [make(s, device=device)[0] for s in shapes]
    ts, cs, gs, ms, ss = (list(x) for x in zip(*static))
    cs = [c.detach().requires_grad_() for c in cs]

    def step():
        for c in cs:
            c.grad = None
        loss = medic_fast.importance_clone_loss(ts, cs, gs, ms, ss, tau=5.0, weight=0.5,
                                                backend=backend_arg)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: compile, plan, allocator
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for seed in range(1, 4):
        fresh = [make(s, seed=seed, device=device)[0] for s in shapes]
        for layer, new in zip(zip(ts, cs, gs, ms, ss), fresh):
            for x, y in zip(layer, new):
                x.data.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        le, ge = run(fresh, "reference", single=False, grad_scale=0.5, tau=5.0)
        torch.testing.assert_close(loss.detach().cpu(), 0.5 * le.cpu(), rtol=1e-5, atol=1e-7)
        for c, gr in zip(cs, ge):
            torch.testing.assert_close(c.grad.cpu(), gr.cpu(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device, backend", device_backends(["triton"], ["triton"]))
def test_no_host_sync(device, backend_arg, monkeypatch):
    """Nothing reads a device value on the host: ``Tensor.item``, ``Tensor.__bool__`` and
    ``torch.cuda.synchronize`` raise while the loss runs (forward and, on CUDA tensors, backward:
    on CPU tensors the backward reads the incoming gradient, which costs nothing there)."""
    layers = make((3, 4, 5, 5), layers=2, device=device)
    cs, args = _loss_args(layers, single=False)
    medic_fast.importance_clone_loss(*args, tau=5.0, backend=backend_arg)  # plan outside
    for c in cs:
        c.grad = None

    def refuse(*a, **k):
        raise AssertionError("a host sync")

    with monkeypatch.context() as patch:
        for name in ("item", "__bool__"):
            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(torch.cuda, "synchronize", refuse)
        loss = medic_fast.importance_clone_loss(*args, tau=5.0, backend=backend_arg)
        if device != "cpu":
            loss.backward()
    if device == "cpu":
        loss.backward()
    assert all(c.grad is not None for c in cs)
    # Under the profiler, a steady-state call: no scalar read back, no host-to-device copy.
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        loss = medic_fast.importance_clone_loss(*args, tau=5.0, backend=backend_arg)
        if device != "cpu":
            loss.backward()
    names = {e.name for e in prof.events()}
    assert "aten::_local_scalar_dense" not in names, names
    assert not any("HtoD" in n for n in names), names


@pytest.mark.parametrize("device, backend", device_backends(["triton"], ["triton"]))
def test_launches_per_call(device, backend_arg, monkeypatch):
    """One launch per layer whose rows fit ROW_MAX (the one-pass row kernel), two for a split
    layer (partials, then merge and rescale in one launch); with an incoming gradient of 1 the
    backward multiplies nothing on CPU tensors, and on CUDA tensors launches one scale kernel
    that reads the gradient on the device."""
    from medic_fast.kernels import importance_clone as ic

    launched = []
    call = ic.Launch.__call__
    monkeypatch.setattr(ic.Launch, "__call__", lambda self, *a, **k: (
        launched.append(self.kernel.__name__ if hasattr(self.kernel, "__name__")
                        else self.kernel.fn.__name__), call(self, *a, **k))[1])
    m = ic.ROW_MAX[torch.float32]
    fits, long = make((2, m), stats="neuron", device=device)[0], \
        make((2, m + 1), stats="neuron", device=device)[0]
    cs, args = _loss_args([fits], single=True)
    loss = medic_fast.importance_clone_loss(*args, backend=backend_arg)
    assert launched == ["_row_kernel"]
    launched.clear()
    muls = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        torch.Tensor.mul_, mul = (lambda self, *a: muls.append(1) or mul(self, *a)), \
            torch.Tensor.mul_
        try:
            loss.backward()
        finally:
            torch.Tensor.mul_ = mul
    assert muls == [] and launched == ([] if device == "cpu" else ["_scale_kernel"])
    _, args = _loss_args([long], single=True)
    launched.clear()
    medic_fast.importance_clone_loss(*args, backend=backend_arg)
    assert launched == ["_split_kernel", "_finish_kernel"]


@pytest.mark.parametrize("device, backend", ONE)
def test_module_form(device, backend_arg):
    layers = make((3, 4, 3, 3), device=device)
    mod = medic_fast.ImportanceCloneLoss(tau=5.0, criterion="signed", reduction="sum",
                                         backend=backend_arg)
    assert "tau=5.0" in repr(mod)
    loss = mod(*layers[0])
    ref = run64(layers, tau=5.0, criterion="signed", reduction="sum")[0]
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_importance_weights(device):
    (t, c, g, mean, std), = make((3, 4, 5, 5), device=device)
    w = medic_fast.importance_weights(t, g, mean, std, tau=5.0)
    assert w.shape == t.shape and (w > 0).all()
    # w_i = sqrt(p_i q_i) with p, q distributions: sum_i w_i <= 1 (Cauchy-Schwarz), and the loss
    # is sum_i w_i r_i^2.
    assert (w.flatten(1).sum(1) <= 1 + 1e-6).all()
    s = std.view(-1, 1, 1) + 1e-5
    rows = (w * ((t - c) / s) ** 2).flatten(1).sum(1)
    loss = medic_fast.importance_clone_loss(t, c, g, mean, std, tau=5.0, reduction="none")
    torch.testing.assert_close(loss, rows, rtol=1e-5, atol=1e-7)
    uniform = medic_fast.importance_weights(t, g, mean, std, tau=0.0)
    torch.testing.assert_close(uniform, torch.full_like(t, 1 / 100))


# --- bad input ----------------------------------------------------------------------------

def _args():
    (t, c, g, mean, std), = make((3, 4, 3, 3))
    return t, c, g, mean, std


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a, k: (a.__setitem__(1, a[1][:, :2]),), ValueError, "acts_c has shape"),
    (lambda a, k: (a.__setitem__(2, a[2].unsqueeze(0)),), ValueError, "grads has shape"),
    (lambda a, k: (a.__setitem__(3, torch.zeros(5)),), ValueError, "mean has shape"),
    (lambda a, k: (a.__setitem__(4, torch.zeros(2, 3)),), ValueError, "std has shape"),
    (lambda a, k: k.update(tau=-1.0), ValueError, "tau"),
    (lambda a, k: k.update(tau=float("nan")), ValueError, "tau"),
    (lambda a, k: k.update(eps=0.0), ValueError, "eps"),
    (lambda a, k: k.update(criterion="l2"), ValueError, "criterion"),
    (lambda a, k: k.update(reduction="avg"), ValueError, "reduction"),
    (lambda a, k: k.update(backend="cuda"), ValueError, "backend"),
    (lambda a, k: k.update(start_dim=4), ValueError, "start_dim"),
    (lambda a, k: (a.__setitem__(0, a[0].long()),), TypeError, "acts_t must have a floating"),
    (lambda a, k: (a.__setitem__(2, a[2].int()),), TypeError, "grads must have a floating"),
    (lambda a, k: (a.__setitem__(1, "x"),), TypeError, "acts_c must be a Tensor"),
    (lambda a, k: (a.__setitem__(0, torch.empty(0, 4)), a.__setitem__(1, torch.empty(0, 4)),
                   a.__setitem__(2, torch.empty(0, 4)), a.__setitem__(3, None),
                   a.__setitem__(4, None)), ValueError, "empty"),
    (lambda a, k: (a.__setitem__(1, a[1].to("meta")),), ValueError, "on meta"),
])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_input(mutate, exc, match, backend):
    args, kw = list(_args()), {"backend": backend}
    mutate(args, kw)
    with pytest.raises(exc, match=match):
        medic_fast.importance_clone_loss(*args, **kw)


def test_bad_layer_lists():
    t, c, g, mean, std = _args()
    with pytest.raises(ValueError, match="same number of layers"):
        medic_fast.importance_clone_loss([t, t], [c], [g, g])
    with pytest.raises(ValueError, match="mean has 1 layers"):
        medic_fast.importance_clone_loss([t, t], [c, c], [g, g], [mean], [std, std])
    t2, c2, g2 = (x[:2] for x in (t, c, g))
    with pytest.raises(ValueError, match="same number of rows"):
        medic_fast.importance_clone_loss([t, t2], [c, c2], [g, g2], reduction="none")
    with pytest.raises(ValueError, match=r"acts_c \(layer 1\) has shape"):
        medic_fast.importance_clone_loss([t, t], [c, c[:, :1]], [g, g])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_negative_std_refused_and_zero_std_warned_once(backend, monkeypatch):
    """CPU statistics are read at each call (by the C++ kernel itself, or by the reference's
    checks): a negative std is refused by name; a zero std warns once per process."""
    from medic_fast.ops import _validate

    monkeypatch.setattr(_validate, "_zero_std_warned", False)
    t, c, g, mean, std = _args()
    neg = std.clone()
    neg[1] = -0.25
    with pytest.raises(ValueError, match=r"^std must be >= 0 \(a standard deviation\), got a "
                       "minimum of -0.25$"):
        medic_fast.importance_clone_loss(t, c, g, mean, neg, backend=backend)
    with pytest.raises(ValueError, match=r"^std \(layer 1\) must be >= 0"):
        medic_fast.importance_clone_loss([t, t], [c, c], [g, g], [mean, mean], [std, neg],
                                         backend=backend)
    with pytest.raises(ValueError, match="std must be >= 0"):
        medic_fast.importance_weights(t, g, mean, neg)
    zero = torch.zeros_like(std)
    with pytest.warns(RuntimeWarning, match=r"^std is 0 at 4 of 4 entries: eps alone divides"):
        medic_fast.importance_clone_loss(t, c, g, mean, zero, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        medic_fast.importance_clone_loss(t, c, g, mean, zero, backend=backend)
    if backend == "cpp":  # the plan is made: the kernel itself refuses a negative std
        zero[1] = -0.5
        with pytest.raises(ValueError, match=r"^std must be >= 0 \(a standard deviation\), got "
                           "a minimum of -0.5$"):
            medic_fast.importance_clone_loss(t, c, g, mean, zero, backend=backend)


def test_wrong_backend_for_device():
    """A fused kernel named for tensors it does not run on: one line saying what would work.
    (This process runs under TRITON_INTERPRET=1: the library makes no exception for it.)"""
    t, c, g, _, _ = _args()
    with pytest.raises(ValueError, match="backend='triton' runs importance_clone_loss on CUDA "
                       "tensors; these are on cpu, where the fused kernel is 'cpp'"):
        medic_fast.importance_clone_loss(t, c, g, backend="triton")
    meta = [x.to("meta") for x in (t, c, g)]
    with pytest.raises(ValueError, match="backend='cpp' runs importance_clone_loss on CPU tensors; "
                       "these are on meta, which has no fused kernel"):
        medic_fast.importance_clone_loss(*meta, backend="cpp")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpp', "
                       r"'triton'\) for importance_clone_loss, got 'cuda'"):
        medic_fast.ImportanceCloneLoss(backend="cuda")


def test_build_failure_is_explained_and_auto_falls_back_with_one_warning(tmp_path):
    """A broken extension source: a named fused kernel raises why; "auto" runs the reference with
    one warning for the whole process (both ops), saying what is lost and why; "reference" works."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("this is not C++;\n")
    code = textwrap.dedent(f"""
        import pathlib, warnings, torch, medic_fast
        from medic_fast import _extension
        _extension.source_dir = lambda: pathlib.Path({str(src)!r})
        x = torch.randn(2, 3)
        try:
            medic_fast.importance_clone_loss(x, x, x, backend="cpp")
        except _extension.ExtensionUnavailable as e:
            print("ERR", str(e).splitlines()[0])
        head = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                   torch.nn.Linear(4, 2)).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = [medic_fast.importance_clone_loss(x, x + 1, x) for _ in range(2)]
            found = medic_fast.pocket_search(torch.randn(1, 2, 3), head, torch.tensor([0]),
                                             torch.tensor([1]), alpha=0.1, lr=0.1, steps=2,
                                             lo=-9.0, hi=9.0, margin=0.0)
        print("WARN", len(caught), str(caught[0].message).splitlines()[0])
        ref = medic_fast.importance_clone_loss(x, x + 1, x, backend="reference")
        print("AUTO", all(torch.equal(a, ref) for a in auto), found.backend)
    """)
    env = dict(os.environ, MEDIC_FAST_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "ERR building the medic_fast C++ extension failed" in out.stdout, out.stderr
    assert ("WARN 1 medic_fast: backend='auto' runs the plain-PyTorch reference instead of the "
            "fused kernels: same results, several times slower. To get them back: building the "
            "medic_fast C++ extension failed") in out.stdout, out.stdout + out.stderr
    assert "AUTO True reference" in out.stdout, out.stderr


# --- the op itself ------------------------------------------------------------------------

def test_extension_loaded_before_the_ops_are_defined():
    """The extension only registers kernels; loaded before medic_fast defines the ops (and their
    schemas), the dispatcher still pairs them up."""
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({_extension.load()!r})
        import medic_fast
        x = torch.randn(2, 5)
        c = (x + 1).requires_grad_()
        loss = medic_fast.importance_clone_loss(x, c, x, backend="cpp")
        loss.backward()
        ref = medic_fast.importance_clone_loss(x, x + 1, x, backend="reference")
        print("OK", torch.allclose(loss, ref), c.grad is not None)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "OK True True" in out.stdout, out.stderr



def op_args(seed, *, need_grad, reduce_rows, signed, device="cpu"):
    """Fresh random arguments of ``medic_fast::importance_clone_loss`` on ``device``: three
    layers of 3 rows, with per-neuron statistics, per-channel ones ([3, 3, 16], start_dim 1),
    and bfloat16 rows with a padded row stride and float64 statistics."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    layers = []
    for shape, nstat, inner, dtype, pad in [((3, 20), 20, 1, torch.float32, 0),
                                            ((3, 3, 16), 3, 16, torch.float32, 0),
                                            ((3, 33), 33, 1, torch.bfloat16, 5)]:
        m = shape[-1]
        t = rand(*shape[:-1], m + pad).to(dtype)[..., :m]
        c = (t.float() + 0.5 * rand(*shape)).to(dtype).requires_grad_(need_grad)
        std = torch.rand(nstat, generator=gen, dtype=torch.float64 if pad else torch.float32)
        layers.append((t, c, (0.2 * rand(*shape)).to(dtype), 0.3 * rand(nstat),
                       (std + 0.5).to(device), 1, inner))
    t, c, g, mean, std, start_dim, inner = (list(x) for x in zip(*layers))
    return (t, c, g, mean, std, start_dim, inner, inner, 5.0, 1e-5, int(signed), [1 / 3] * 3,
            reduce_rows, need_grad)


@pytest.mark.parametrize("device, backend", device_backends(["cpp", "triton"], ["triton"]))
@pytest.mark.parametrize("need_grad, reduce_rows, signed",
                         [(True, True, False), (True, False, True), (False, True, True)])
def test_opcheck(device, backend_arg, need_grad, reduce_rows, signed):
    """torch.library.opcheck, every sub-test: the schema (no input mutated, no output aliasing
    an input), the autograd registration, the fake kernel against the real one, and AOTAutograd
    (outputs and gradients, dynamic shapes) against eager. The CPU tensors' op too."""
    args = op_args(4 * need_grad + 2 * reduce_rows + signed, need_grad=need_grad,
                   reduce_rows=reduce_rows, signed=signed, device=device)
    torch.library.opcheck(torch.ops.medic_fast.importance_clone_loss.default, args)
    if device == "cpu":
        torch.library.opcheck(torch.ops.medic_fast.importance_clone_loss_cpu.default, args,
                              test_utils=("test_schema", "test_faketensor"))


# --- the plan cache ------------------------------------------------------------------------

@pytest.mark.parametrize("device, backend", FAST)
def test_plan_follows_new_layouts(device, backend_arg):
    """A call whose shapes, strides or dtypes differ from an earlier call's gets its own plan:
    every result is the reference's."""
    from medic_fast.ops import importance_clone as ic

    ic._PLANS.clear()
    base = make((3, 4, 5, 5), device=device)[0]
    variants = {
        "base": base,
        "shape": make((2, 4, 5, 5), device=device)[0],
        "strides": tuple(x if x is None or x.dim() == 1 else x.transpose(2, 3) for x in base),
        "dtype": tuple(x if x is None or x.dim() == 1 else x.double() for x in base),
        "channels_last": tuple(x if x is None or x.dim() == 1
                               else x.contiguous(memory_format=torch.channels_last)
                               for x in base),
    }
    for name, layer in variants.items():
        dtype = layer[0].dtype
        loss, grads = run([layer], backend_arg)
        loss64, grads64 = run64([layer])
        torch.testing.assert_close(loss.double().cpu(), loss64, **TOL[dtype], msg=name)
        torch.testing.assert_close(grads[0].double().cpu(), grads64[0], **TOL[dtype], msg=name)
    assert len(ic._PLANS) >= len(variants)


@pytest.mark.parametrize("device, backend", FAST)
@pytest.mark.parametrize("how", ["in_place", "data", "numpy"])
def test_statistics_changed_in_place_give_the_new_result(device, backend_arg, how):
    """A plan holds layouts, never values: statistics changed in place (through ``.data`` or a
    NumPy view too, which do not bump ``_version``) give the new loss at the next call."""
    (t, c, g, mean, std), = make((4, 6, 5, 5), device=device)

    def loss():
        return float(medic_fast.importance_clone_loss(t, c, g, mean, std, tau=5.0,
                                                      backend=backend_arg))

    def reference():
        return float(medic_fast.importance_clone_loss(t, c, g, mean, std, tau=5.0,
                                                      backend="reference"))

    before = loss()
    if how == "in_place":
        std.mul_(3.0)
    elif how == "data":
        std.data.mul_(3.0)
    else:
        std.numpy()[:] *= 3.0
    after = loss()
    assert after != before
    assert after == pytest.approx(reference(), rel=1e-5)


@pytest.mark.parametrize("device, backend", FAST)
def test_weight_is_folded_into_the_loss(device, backend_arg):
    """``weight=w`` gives ``w`` times the loss and its gradient, for every reduction."""
    layers = make((3, 4, 5), layers=2, device=device)
    for reduction in ("mean", "sum", "none"):
        loss, grads = run(layers, backend_arg, single=False, reduction=reduction, weight=0.37)
        loss64, grads64 = run64(layers, single=False, reduction=reduction)
        torch.testing.assert_close(loss.double().cpu(), 0.37 * loss64, rtol=2e-5, atol=1e-7)
        for gr, gr64 in zip(grads, grads64):
            torch.testing.assert_close(gr.double().cpu(), 0.37 * gr64, rtol=2e-5, atol=1e-7)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        medic_fast.importance_clone_loss(*layers[0], weight=float("inf"), backend=backend_arg)
