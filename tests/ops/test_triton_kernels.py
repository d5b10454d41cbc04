"""The Triton kernels of the importance clone loss (``kernels/importance_clone.py``).

They are compared with the reference formula (``medic_fast.reference.importance_clone``) in
float64: one-pass rows up to ``ROW_MAX`` and split rows above it, strides, statistics layouts,
dtypes, tau, the backward's scale. The kernel tests take ``device`` from ``shared.DEVICES``:
where there is no GPU they run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
set by ``tests/conftest.py``); on a GPU machine they run compiled, on CUDA tensors (the ``cuda``
cases), and the interpreter cases are skipped. The sm_80 / sm_90 compile is in
``test_gpu_compile.py``. Public-API and cross-backend checks, and the kernels run through the op,
live in ``test_importance_clone.py``.
"""
import pytest
import torch
from shared import CUDA, DEVICES
from triton.runtime.interpreter import InterpretedFunction

from medic_fast.kernels import importance_clone as ic
from medic_fast.reference import importance_clone as formula

INTERPRETED = isinstance(ic._row_kernel, InterpretedFunction)
if not CUDA and not INTERPRETED:
    raise RuntimeError("medic_fast.kernels.importance_clone was imported before TRITON_INTERPRET=1 "
                       "was set (tests/conftest.py sets it); run these tests in a fresh process")

CPU = torch.device("cpu")
EPS = 1e-5
# Split plans: few programs per layer (the interpreter's target), forced on every device so that
# the same splits run everywhere; and every tile its own split, as on a GPU.
FEW_SPLITS, TILE_SPLITS = ic._PROGRAMS_INTERPRETER, 1 << 30


@pytest.fixture
def device(request):
    """The kernels' device, from the test's ``device`` parameter: the interpreter case is skipped
    where the kernels compile for a GPU instead."""
    device = torch.device(request.param)
    if device.type == "cpu" and not INTERPRETED:
        pytest.skip("Triton compiles for the GPU here: its interpreter runs the kernels on CPU "
                    "tensors only where there is no GPU (the cuda cases run them)")
    return device


def on_devices(test):
    """Parametrise ``test`` over ``shared.DEVICES`` through the :func:`device` fixture."""
    return pytest.mark.parametrize("device", DEVICES, indirect=True)(test)


@pytest.fixture
def split(monkeypatch):
    """``split(target)``: plan layers for ``target`` programs on any device."""
    return lambda target: monkeypatch.setattr(ic, "target_programs", lambda device: target)


ROWS = 4
PADDED, EXPANDED = 1, 2  # layout bits: t misaligned inside wider rows; c of row stride 0
# (m, (mean's numel, inner), (std's numel, inner), layout): split rows (fp32) of several tiles
# and a tail, with statistics per channel; one-pass rows with per-neuron statistics; statistic
# indices that wrap ((i // 16) % 7) and a std of another layout than the mean's; a one-neuron
# row; a full row block with scalar statistics.
SHAPES = [(9000, (9, 1000), (9, 1000), EXPANDED), (777, (777, 1), (777, 1), PADDED),
          (3000, (7, 16), (3000, 1), PADDED | EXPANDED), (1, (1, 1), (1, 1), 0),
          (2048, (1, 2048), (1, 2048), 0)]
ROW_SCALE = [0.25, 1.0, 0.5, 2.0, 1.0]
# Relative tolerance of the gradient per input dtype. 16-bit gradients of split rows are rounded
# twice (tile and rescale) and the interpreter converts fp32 -> bf16 by truncation (the GPU
# rounds to nearest): two ulps of bf16 (2**-7 each) and two half-ulps of fp16.
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 * 2**-7,
             torch.float16: 2 * 2**-11}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_grad_close(d, ref, extra_rtol=0.0):
    """Relative accuracy for gradients near the layer's largest, absolute accuracy far below it
    (fp32 exp of the softmax tail) and below the smallest normal of the computation (fp16
    subnormals, underflow)."""
    rtol = GRAD_RTOL[d.dtype] + extra_rtol
    floor = 2**-24 if d.dtype == torch.float16 else torch.finfo(_acc(d.dtype)).tiny
    if d.is_cuda and _acc(d.dtype) == torch.float32:
        # A GPU flushes fp32 subnormals to zero: a weight w = h_a * h_q below 2**-126 vanishes
        # before it is multiplied by -2 * row_scale * r * inv_s / sqrt(Sa Sq) (< 2**20 here).
        floor *= 2**20
    torch.testing.assert_close(d.double().cpu(), ref, rtol=rtol,
                               atol=max(1e-3 * GRAD_RTOL[d.dtype] * ref.abs().max().item(), floor))


def make_layer(rows, m, mean_layout, std_layout, layout, dtype, gen, scale=1.0, device=CPU,
               stat_dtype=torch.float32):
    """Fresh random inputs of one layer on ``device``; ``g`` always has row stride 2m. Returns
    ``(t, c, g, mean, std, mean_inner, std_inner)``."""
    def rand(*shape, std=scale):
        return (std * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype)

    t = rand(rows, m + 5)[:, 2:m + 2] if layout & PADDED else rand(rows, m)
    c = rand(1, m).expand(rows, m) if layout & EXPANDED else (t + rand(rows, m, std=0.5)).to(dtype)
    g = rand(2 * rows, m, std=0.3)[::2]
    assert t.stride(0) == (m + 5 if layout & PADDED else m) and g.stride(0) == 2 * m
    assert c.stride(0) == (0 if layout & EXPANDED else m)
    mean = (0.5 * torch.randn(mean_layout[0], generator=gen, dtype=torch.float64))
    std = 0.05 + 2 * torch.rand(std_layout[0], generator=gen, dtype=torch.float64)
    return (t, c, g, mean.to(device, stat_dtype), std.to(device, stat_dtype), mean_layout[1],
            std_layout[1])


def run(layers, tau, signed, row_scale, reduce_rows, need_grad, **kw):
    t, c, g, mean, std, mi, si = (list(x) for x in zip(*layers))
    return ic.forward(t, c, g, mean, std, [1] * len(t), mi, si, tau, EPS, int(signed), row_scale,
                      reduce_rows, need_grad, **kw)


def per_neuron(stat, inner, m):
    return stat.double().cpu()[(torch.arange(m) // inner) % stat.numel()]


def reference(layers, tau, signed, row_scale, reduce_rows):
    """The formula in float64 on CPU: loss, per-layer gradients, and max |a|, |q|."""
    loss, grads, spread = 0.0, [], 0.0
    crit = formula.Criterion(int(signed))
    for (t, c, g, mean, std, mi, si), rs in zip(layers, row_scale):
        t, c, g = t.double().cpu(), c.double().cpu(), g.double().cpu()
        m = t.shape[1]
        mu, s = per_neuron(mean, mi, m), per_neuron(std, si, m) + EPS
        row = formula.row_losses(t, c, g, mu, s, tau=tau, criterion=crit)
        loss = loss + (rs * row.sum() if reduce_rows else rs * row)
        grads.append(rs * formula.gradient(t, c, g, mu, s, tau=tau, criterion=crit))
        z = (t - mu) / s
        spread = max(spread, (tau * z).abs().max().item(), (tau * s * g).abs().max().item())
    return loss, grads, spread


def check(layers, tau, signed, row_scale, reduce_rows, need_grad):
    before = [[x.clone() for x in layer[:5]] for layer in layers]
    loss, dc = run(layers, tau, signed, row_scale, reduce_rows, need_grad)
    ref_loss, ref_grads, _ = reference(layers, tau, signed, row_scale, reduce_rows)
    dtype = layers[0][0].dtype
    assert loss.dtype == _acc(dtype) and loss.shape == (() if reduce_rows else (ROWS,))
    assert loss.device == layers[0][0].device
    loss_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=loss_rtol, atol=0)
    assert len(dc) == (len(layers) if need_grad else 0)
    for d, ref, layer in zip(dc, ref_grads, layers):
        assert d.dtype == layer[1].dtype and d.shape == layer[1].shape and d.is_contiguous()
        assert d.device == layer[1].device
        assert_grad_close(d, ref)
    for layer, old in zip(layers, before):
        for x, y in zip(layer, old):
            assert torch.equal(x, y), "an input was modified"


def _plans(layers, need_grad=True):
    return [ic.plan_layer(t.shape[0], t.shape[1], (t.stride(0), c.stride(0), g.stride(0)),
                          (mi, mean.numel()), (si, std.numel()), t.dtype, t.device, signed=False,
                          need_grad=need_grad, per_row=False)
            for t, c, g, mean, std, mi, si in layers]


def test_shapes_cover_both_paths():
    """SHAPES give, for every dtype, one-pass rows and split rows (several tiles per split with
    a tail, at the interpreter's split)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        layers = [make_layer(ROWS, *shape, dtype, gen) for shape in SHAPES]
        plans = _plans(layers)
        assert {p.split for p in plans} == {False, True}, dtype
        nsplit, per, ntiles = plans[0].args[-4:-1]
        assert plans[0].split and nsplit > 1 and per > 1 and 9000 % ic.SPLIT[dtype][0], dtype


CASES = [(0.0, False, True, True), (1.0, True, False, True), (5.0, False, False, False),
         (100.0, True, True, True)]


@on_devices
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau,signed,reduce_rows,need_grad", CASES)
def test_matches_float64(device, split, dtype, tau, signed, reduce_rows, need_grad):
    """Five layers of both paths, strided and expanded rows, statistics of every layout, in one
    call against float64."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + int(tau))
    layers = [make_layer(ROWS, *shape, dtype, gen, device=device) for shape in SHAPES]
    check(layers, tau, signed, ROW_SCALE, reduce_rows, need_grad)


@on_devices
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_at_and_above_row_max(device, split, dtype):
    """A row of exactly ROW_MAX neurons runs the one-pass kernel, one neuron more is split; both
    match float64. Statistics in float64 and bfloat16 (any float dtype is read)."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(30 + DTYPES.index(dtype))
    m = ic.ROW_MAX[dtype]
    layers = [make_layer(3, m, (m, 1), (m, 1), 0, dtype, gen, device=device,
                         stat_dtype=torch.float64),
              make_layer(3, m + 1, (m + 1, 1), (m + 1, 1), 0, dtype, gen, device=device,
                         stat_dtype=torch.bfloat16)]
    assert [p.split for p in _plans(layers)] == [False, True]
    global ROWS
    rows, ROWS = ROWS, 3
    try:
        check(layers, 5.0, False, [0.5, 1.0], True, True)
        check(layers, 5.0, True, [0.5, 1.0], False, True)
    finally:
        ROWS = rows


@on_devices
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tile_its_own_split(device, split, dtype):
    """The GPU's plan (about 4 programs per SM: every tile of these rows its own split), forced
    on any device: partials of single tiles, merged and rescaled, against float64."""
    split(TILE_SPLITS)
    gen = torch.Generator().manual_seed(20 + DTYPES.index(dtype))
    layers = [make_layer(ROWS, *shape, dtype, gen, device=device) for shape in SHAPES]
    plan = _plans(layers)[0]
    assert plan.split and plan.args[-3] == 1  # one tile per split
    check(layers, 5.0, False, ROW_SCALE, False, True)


@on_devices
@pytest.mark.parametrize("plan", [FEW_SPLITS, TILE_SPLITS], ids=["few-splits", "tile-splits"])
def test_fp16_tile_gradient_stays_in_range(device, split, plan):
    """fp16 rows of three tiles whose first tile alone puts its weight on one neuron with a large
    ``|r| / s``: normalised by that tile (the split's prefix) its gradient is about 8e4, over
    fp16's 65504, while the row's softmax mass sits in the last tile and its final gradient is
    small. The stored tile stays in range (scaled by a power of two), and the gradient matches
    float64, with the interpreter's split and the GPU's."""
    split(plan)
    m, first, last = 3 * 2048, 100, 2 * 2048 + 7
    assert m > ic.ROW_MAX[torch.float16]
    t = torch.zeros(ROWS, m, dtype=torch.float64)
    g = torch.zeros(ROWS, m, dtype=torch.float64)
    s = torch.ones(m, dtype=torch.float64)
    s[first], t[:, first], g[:, first] = 0.01, 0.1, 1000.0  # tau = 1: a = 10, q = 10
    t[:, last], g[:, last] = 30.0, 40.0  # a = 30, q = 40
    c = t.clone()
    c[:, first] -= 4.0  # |r| / s = 4e4
    c[:, last] -= 1.0
    half = [x.to(device, torch.float16) for x in (t, c, g)]
    layer = (*half, torch.zeros(m, device=device), (s - EPS).to(device), 1, 1)
    _, ref_grads, _ = reference([layer], 1.0, False, [1.0], False)
    provisional = 2 * 4e4 * (1 / (1 + 2047 * torch.e**-10))  # the first tile's own weight ~ 1
    assert provisional > 65504 and ref_grads[0].abs().max() < 4
    _, dc = run([layer], 1.0, False, [1.0], False, True)
    assert torch.isfinite(dc[0]).all()
    check([layer], 1.0, False, [1.0], False, True)


@on_devices
def test_tau_zero_is_uniform(device, split):
    """tau = 0: w = 1/m, so loss_b = mean_i r_i^2 whatever t, g and the statistics."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(1)
    layers = [make_layer(ROWS, *shape, torch.float32, gen, device=device)
              for shape in SHAPES[:3]]
    loss, _ = run(layers, 0.0, False, [1.0] * 3, False, False)
    expect = 0.0
    for t, c, _, _, std, _, si in layers:
        s = per_neuron(std, si, t.shape[1]) + EPS
        expect = expect + (((t.double() - c.double()).cpu() / s) ** 2).mean(1)
    torch.testing.assert_close(loss.double().cpu(), expect, rtol=1e-5, atol=0)


@on_devices
@pytest.mark.parametrize("reduce_rows", [True, False])
@pytest.mark.parametrize("flat", [False, True])
def test_mixed_dtypes_in_one_call(device, split, reduce_rows, flat):
    """Layers of several dtypes in one call: losses summed, gradients returned in layer order
    (``flat``: those of one dtype views of one buffer, each starting on 16 elements)."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(2)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    layers = [make_layer(ROWS, *shape, dt, gen, device=device)
              for dt, shape in zip(dtypes, SHAPES)]
    out = run(layers, 5.0, False, ROW_SCALE[:4], reduce_rows, True, flat=flat)
    loss, dc = out[:2]
    ref_loss, ref_grads, _ = reference(layers, 5.0, False, ROW_SCALE[:4], reduce_rows)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=0)
    for d, ref in zip(dc, ref_grads):
        assert_grad_close(d, ref)
    if flat:
        buffers = out[2]
        assert {b.dtype for b in buffers} == {torch.float32, torch.bfloat16, torch.float16}
        assert len(buffers) == 3
        for d in dc:
            base = next(b for b in buffers if b.dtype == d.dtype)
            assert d.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            assert d.storage_offset() % 16 == 0


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_inputs(device, split, dtype):
    """tau = 100 on activations far from their statistics (|a| up to ~1e5): finite, and as close
    to float64 as fp32 rounding of ``a`` and ``q`` allows (softmax scales it by max |a|, |q|)."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(3)
    layers = [make_layer(ROWS, *shape, dtype, gen, scale=40.0, device=device)
              for shape in SHAPES[:3]]
    loss, dc = run(layers, 100.0, False, ROW_SCALE[:3], True, True)
    assert torch.isfinite(loss) and all(torch.isfinite(d).all() for d in dc)
    ref_loss, ref_grads, spread = reference(layers, 100.0, False, ROW_SCALE[:3], True)
    assert spread > 1e4
    cond = 8 * 2**-24 * spread
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5 + cond, atol=0)
    for d, ref in zip(dc, ref_grads):
        assert_grad_close(d, ref, cond)


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_scale_multiplies_by_the_gradient_read_on_the_device(device, dtype):
    """``scale_(x, grad)``: x times grad in place, in x's dtype (fp32 or fp64 grad); with grad 1,
    x is left as it was."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3 * ic.SCALE_BLOCK + 5, generator=gen).to(device, dtype)
    want = x.double() * 2.5
    grad = torch.tensor(2.5, dtype=_acc(dtype), device=device)
    y = x.clone()
    ic.scale_(y, grad)
    torch.testing.assert_close(y.double(), want.to(dtype).double(), rtol=0, atol=0)
    y = x.clone()
    ic.scale_(y, torch.ones((), dtype=_acc(dtype), device=device))
    assert torch.equal(y, x)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.cuda,
                         pytest.mark.skipif(torch.cuda.device_count() < 2,
                                            reason="needs two GPUs")])])
def test_launches_on_the_tensors_gpu(device):
    """Tensors on cuda:1 while cuda:0 is current: the launches run on cuda:1 (Triton launches on
    the current device and stream; ``forward`` makes the tensors' device current)."""
    gen = torch.Generator().manual_seed(6)
    layers = [make_layer(ROWS, *shape, torch.float32, gen, device=torch.device("cuda:1"))
              for shape in SHAPES[:3]]
    with torch.cuda.device(0):
        check(layers, 5.0, False, ROW_SCALE[:3], True, True)


def test_magic_division():
    """``_magic`` divides exactly with a 32-bit multiplier for every n < 2**31 (edges, random)."""
    gen = torch.Generator().manual_seed(4)
    divisors = [1, 2, 3, 7, 16, 1000, 777, 2**20 + 1, 2**24, 2**31 - 1]
    divisors += torch.randint(1, 2**31, (200,), generator=gen).tolist()
    for d in divisors:
        mul, shift = ic._magic(d)
        ns = [0, 1, d - 1, d, d + 1, 2**31 - 1, 2**31 - 2, (2**31 - 1) // d * d - 1]
        ns += torch.randint(0, 2**31, (200,), generator=gen).tolist()
        for n in ns:
            if 0 <= n < 2**31:
                assert (2 * n * mul) >> (32 + shift) == n // d, (n, d)
        assert 0 < mul < 2**32
