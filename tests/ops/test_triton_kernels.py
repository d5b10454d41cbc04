"""The Triton kernels of the importance clone loss (``kernels/importance_clone.py``).

They are compared with a float64 evaluation of the fused op's formulas: split rows, grouped
launches of mixed layers, strides, dtypes, tau. The kernel tests take ``device`` from
``shared.DEVICES``: where there is no GPU they run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py``); on a GPU machine they run compiled, on
CUDA tensors (the ``cuda`` cases), and the interpreter cases are skipped. The sm_80 / sm_90
compile is in ``test_gpu_compile.py``. Public-API and cross-backend checks, and the kernels run
through the op, live in ``test_importance_clone.py``.
"""
import pytest
import torch
import triton
from shared import CUDA, DEVICES
from triton.runtime.interpreter import InterpretedFunction

from medic_fast.kernels import importance_clone as ic

INTERPRETED = isinstance(ic._partials_kernel, InterpretedFunction)
if not CUDA and not INTERPRETED:
    raise RuntimeError("medic_fast.kernels.importance_clone was imported before TRITON_INTERPRET=1 "
                       "was set (tests/conftest.py sets it); run these tests in a fresh process")

CPU = torch.device("cpu")
# The layer plans of test_shapes_split_rows: few programs per layer (the interpreter's target),
# forced on every device so that the same splits run everywhere; and every tile its own split,
# as on a GPU (about 4 programs per SM).
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
    return lambda target: monkeypatch.setattr(ic, "_target_programs", lambda device: target)
ROWS = 4
PADDED, EXPANDED = 1, 2  # layout bits: t misaligned inside wider rows; c of row stride 0
# (m, nstat, inner, layout): split rows of several tiles per split and a tail; a single tile;
# statistic indices that wrap ((i // 16) % 7); a one-neuron row; one exactly full tile with
# scalar statistics. Layers 0 and 4 start every row on 16 bytes (the ALIGNED kernels).
SHAPES = [(9000, 9, 1000, EXPANDED), (777, 777, 1, PADDED), (3000, 7, 16, PADDED | EXPANDED),
          (1, 1, 1, 0), (2048, 1, 2048, 0)]
ROW_SCALE = [0.25, 1.0, 0.5, 2.0, 1.0]
# Relative tolerance of the gradient per input dtype. 16-bit gradients are rounded twice (tile
# and rescale) and the interpreter converts fp32 -> bf16 by truncation (the GPU rounds to
# nearest): two ulps of bf16 (2**-7 each) and two half-ulps of fp16.
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 * 2**-7,
             torch.float16: 2 * 2**-11}


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


def make_layer(rows, m, nstat, inner, layout, dtype, tau, gen, scale=1.0, device=CPU):
    """Fresh random inputs of one layer on ``device``; ``g`` always has row stride 2m."""
    def rand(*shape, std=scale):
        return (std * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype)

    t = rand(rows, m + 5)[:, 2:m + 2] if layout & PADDED else rand(rows, m)
    c = rand(1, m).expand(rows, m) if layout & EXPANDED else (t + rand(rows, m, std=0.5)).to(dtype)
    g = rand(2 * rows, m, std=0.3)[::2]
    assert t.stride(0) == (m + 5 if layout & PADDED else m) and g.stride(0) == 2 * m
    assert c.stride(0) == (0 if layout & EXPANDED else m)
    acc = _acc(dtype)
    s = (0.05 + 2 * torch.rand(nstat, generator=gen, dtype=torch.float64)).to(device)
    mu = (0.5 * rand(nstat)).to(acc)
    return t, c, g, mu, (1 / s).to(acc), (tau * s).to(acc), inner


def run(layers, tau, signed, row_scale, reduce_rows, need_grad):
    t, c, g, mu, inv_s, tau_s, inner = (list(x) for x in zip(*layers))
    return ic.forward(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, reduce_rows,
                      need_grad)


def reference(layers, tau, signed, row_scale, reduce_rows):
    """The fused op's formulas in float64 on CPU: loss, per-layer gradients, and max |a|, |q|."""
    loss, grads, spread = 0.0, [], 0.0
    for (t, c, g, mu, inv_s, tau_s, inner), rs in zip(layers, row_scale):
        t, c, g = t.double().cpu(), c.double().cpu(), g.double().cpu()
        k = (torch.arange(t.shape[1]) // inner) % mu.numel()
        mu, inv, ts = mu.double().cpu()[k], inv_s.double().cpu()[k], tau_s.double().cpu()[k]
        z = (t - mu) * inv
        a, q, r = tau * (z if signed else z.abs()), ts * g, (t - c) * inv
        w = torch.exp((torch.log_softmax(a, 1) + torch.log_softmax(q, 1)) / 2)
        row = (w * r * r).sum(1)
        loss = loss + (rs * row.sum() if reduce_rows else row)
        grads.append(-2 * rs * w * r * inv)
        spread = max(spread, a.abs().max().item(), q.abs().max().item())
    return loss, grads, spread


def check(layers, tau, signed, row_scale, reduce_rows, need_grad):
    before = [[x.clone() for x in layer[:6]] for layer in layers]
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


def test_shapes_split_rows():
    """SHAPES give split rows of several tiles, of one tile per split, single tiles and tails."""
    target = ic._target_programs(CPU)
    for dtype, (block, _) in ic.CONFIGS.items():
        plans = [(ic._splits(ROWS, triton.cdiv(m, block), target), m % block) for m, *_ in SHAPES]
        assert any(nsplit > 1 and per > 1 and tail for (nsplit, per), tail in plans), dtype
        assert any(nsplit > 1 and per == 1 for (nsplit, per), _ in plans), dtype
        assert any(nsplit == per == 1 for (nsplit, per), _ in plans), dtype


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES = [(0.0, False, True, True), (1.0, True, False, True), (5.0, False, False, False),
         (100.0, True, True, True)]


@on_devices
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau,signed,reduce_rows,need_grad", CASES)
def test_matches_float64(device, split, dtype, tau, signed, reduce_rows, need_grad):
    """Five mixed layers (aligned and not) in one grouped launch against float64."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + int(tau))
    layers = [make_layer(ROWS, *shape, dtype, tau, gen, device=device) for shape in SHAPES]
    assert {ic._aligned(*layer[:3]) for layer in layers} == {False, True}
    check(layers, tau, signed, ROW_SCALE, reduce_rows, need_grad)


@on_devices
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tile_its_own_split(device, split, dtype):
    """The GPU's plan (about 4 programs per SM: every tile of these rows its own split), forced
    on any device: partials of single tiles, merged and rescaled, against float64."""
    split(TILE_SPLITS)
    assert all(ic._splits(ROWS, triton.cdiv(m, ic.CONFIGS[dtype][0]), TILE_SPLITS)[1] == 1
               for m, *_ in SHAPES)
    gen = torch.Generator().manual_seed(20 + DTYPES.index(dtype))
    layers = [make_layer(ROWS, *shape, dtype, 5.0, gen, device=device) for shape in SHAPES]
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
    t = torch.zeros(ROWS, m, dtype=torch.float64)
    g = torch.zeros(ROWS, m, dtype=torch.float64)
    s = torch.ones(m, dtype=torch.float64)
    s[first], t[:, first], g[:, first] = 0.01, 0.1, 1000.0  # tau = 1: a = 10, q = 10
    t[:, last], g[:, last] = 30.0, 40.0  # a = 30, q = 40
    c = t.clone()
    c[:, first] -= 4.0  # |r| / s = 4e4
    c[:, last] -= 1.0
    half = [x.to(device, torch.float16) for x in (t, c, g)]
    stats = [x.to(device, torch.float32) for x in (torch.zeros(m), 1 / s, s)]
    layer = (*half, *stats, 1)
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
    layers = [make_layer(ROWS, *shape, torch.float32, 0.0, gen, device=device)
              for shape in SHAPES[:3]]
    loss, _ = run(layers, 0.0, False, [1.0] * 3, False, False)
    expect = 0.0
    for t, c, _, mu, inv_s, _, inner in layers:
        inv = inv_s.double().cpu()[(torch.arange(t.shape[1]) // inner) % mu.numel()]
        expect = expect + (((t.double() - c.double()).cpu() * inv) ** 2).mean(1)
    torch.testing.assert_close(loss.double().cpu(), expect, rtol=1e-5, atol=0)


@on_devices
@pytest.mark.parametrize("reduce_rows", [True, False])
def test_mixed_dtypes_grouped(device, split, reduce_rows):
    """Layers of several dtypes in one call: one grouped launch per dtype, losses summed,
    gradients returned in layer order."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(2)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    layers = [make_layer(ROWS, *shape, dt, 5.0, gen, device=device)
              for dt, shape in zip(dtypes, SHAPES)]
    loss, dc = run(layers, 5.0, False, ROW_SCALE[:4], reduce_rows, True)
    ref_loss, ref_grads, _ = reference(layers, 5.0, False, ROW_SCALE[:4], reduce_rows)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=0)
    for d, ref in zip(dc, ref_grads):
        assert_grad_close(d, ref)


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_inputs(device, split, dtype):
    """tau = 100 on activations far from their statistics (|a| up to ~1e5): finite, and as close
    to float64 as fp32 rounding of ``a`` and ``q`` allows (softmax scales it by max |a|, |q|)."""
    split(FEW_SPLITS)
    gen = torch.Generator().manual_seed(3)
    layers = [make_layer(ROWS, *shape, dtype, 100.0, gen, scale=40.0, device=device)
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
def test_tables_uploaded_in_one_copy(device):
    """The int64 and float layer tables travel in one buffer (pinned, for CUDA) and read back
    as written: int64 fields, then the float rows in the accumulation dtype."""
    tab = [ic.Layer(*range(i, i + len(ic.Layer._fields))) for i in (0, 100, 200)]  # odd length
    for acc in (torch.float32, torch.float64):
        ftab = [ic.LayerScalars(0.25, -2.0, 1.5), ic.LayerScalars(1.0, -0.5, 7.25)]
        itab, ftab_dev = ic._upload(tab, ftab, acc, device)
        assert itab.device.type == ftab_dev.device.type == device.type and ftab_dev.dtype == acc
        assert itab.cpu().tolist() == [v for row in tab for v in row]
        assert ftab_dev.cpu().tolist()[:6] == [v for row in ftab for v in row]
        assert itab.data_ptr() % 16 == ftab_dev.data_ptr() % 16 == 0


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.cuda,
                         pytest.mark.skipif(torch.cuda.device_count() < 2,
                                            reason="needs two GPUs")])])
def test_launches_on_the_tensors_gpu(device):
    """Tensors on cuda:1 while cuda:0 is current: the launches run on cuda:1 (Triton launches on
    the current device and stream; ``forward`` makes the tensors' device current)."""
    gen = torch.Generator().manual_seed(6)
    layers = [make_layer(ROWS, *shape, torch.float32, 5.0, gen, device=torch.device("cuda:1"))
              for shape in SHAPES[:3]]
    with torch.cuda.device(0):
        check(layers, 5.0, False, ROW_SCALE[:3], True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_aligned_only_when_every_row_is(dtype):
    """``_aligned`` (it picks the kernels with 16-byte accesses) agrees with the row addresses."""
    gen = torch.Generator().manual_seed(5)
    for m in (1, 6, 8, 64, 777, 2048):
        for layout in range(4):
            t, c, g = make_layer(3, m, 1, 1, layout, dtype, 1.0, gen)[:3]
            starts = [x[r].data_ptr() for x in (t, c, g) for r in range(3)]
            dc_rows = m * t.element_size()  # the gradient is a new contiguous tensor
            every_row = all(p % 16 == 0 for p in starts) and dc_rows % 16 == 0
            assert ic._aligned(t, c, g) == every_row, (m, layout)


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
