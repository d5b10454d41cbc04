"""The Triton kernels of the importance clone loss (``kernels/importance_clone.py``).

They run on CPU tensors through Triton's interpreter and are compared with a float64 evaluation
of the fused op's formulas: split rows, grouped launches of mixed layers, strides, dtypes, tau.
The sm_80 / sm_90 compile is in ``test_gpu_compile.py``. Public-API and cross-backend
checks, and the kernels run through the op, live in ``test_importance_clone.py``.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import pytest
import torch
import triton

from medic_fast.kernels import importance_clone as ic

if not isinstance(ic._partials_kernel, triton.runtime.interpreter.InterpretedFunction):
    raise RuntimeError("medic_fast.kernels.importance_clone was imported before TRITON_INTERPRET=1 "
                       "was set; run these tests in a fresh process")

CPU = torch.device("cpu")
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
    torch.testing.assert_close(d.double(), ref, rtol=rtol,
                               atol=max(1e-3 * GRAD_RTOL[d.dtype] * ref.abs().max().item(), floor))


def make_layer(rows, m, nstat, inner, layout, dtype, tau, gen, scale=1.0):
    """Fresh random inputs of one layer; ``g`` always has row stride 2m."""
    def rand(*shape, std=scale):
        return (std * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    t = rand(rows, m + 5)[:, 2:m + 2] if layout & PADDED else rand(rows, m)
    c = rand(1, m).expand(rows, m) if layout & EXPANDED else (t + rand(rows, m, std=0.5)).to(dtype)
    g = rand(2 * rows, m, std=0.3)[::2]
    assert t.stride(0) == (m + 5 if layout & PADDED else m) and g.stride(0) == 2 * m
    assert c.stride(0) == (0 if layout & EXPANDED else m)
    acc = _acc(dtype)
    s = 0.05 + 2 * torch.rand(nstat, generator=gen, dtype=torch.float64)
    mu = (0.5 * rand(nstat)).to(acc)
    return t, c, g, mu, (1 / s).to(acc), (tau * s).to(acc), inner


def run(layers, tau, signed, row_scale, reduce_rows, need_grad):
    t, c, g, mu, inv_s, tau_s, inner = (list(x) for x in zip(*layers))
    return ic.forward(t, c, g, mu, inv_s, tau_s, inner, tau, signed, row_scale, reduce_rows,
                      need_grad)


def reference(layers, tau, signed, row_scale, reduce_rows):
    """The fused op's formulas in float64: loss, per-layer gradients, and max |a|, |q|."""
    loss, grads, spread = 0.0, [], 0.0
    for (t, c, g, mu, inv_s, tau_s, inner), rs in zip(layers, row_scale):
        t, c, g = t.double(), c.double(), g.double()
        k = (torch.arange(t.shape[1]) // inner) % mu.numel()
        mu, inv, ts = mu.double()[k], inv_s.double()[k], tau_s.double()[k]
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
    loss_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_rtol, atol=0)
    assert len(dc) == (len(layers) if need_grad else 0)
    for d, ref, layer in zip(dc, ref_grads, layers):
        assert d.dtype == layer[1].dtype and d.shape == layer[1].shape and d.is_contiguous()
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau,signed,reduce_rows,need_grad", CASES)
def test_matches_float64(dtype, tau, signed, reduce_rows, need_grad):
    """Five mixed layers (aligned and not) in one grouped launch against float64."""
    gen = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + int(tau))
    layers = [make_layer(ROWS, *shape, dtype, tau, gen) for shape in SHAPES]
    assert {ic._aligned(*layer[:3]) for layer in layers} == {False, True}
    check(layers, tau, signed, ROW_SCALE, reduce_rows, need_grad)


def test_tau_zero_is_uniform():
    """tau = 0: w = 1/m, so loss_b = mean_i r_i^2 whatever t, g and the statistics."""
    gen = torch.Generator().manual_seed(1)
    layers = [make_layer(ROWS, *shape, torch.float32, 0.0, gen) for shape in SHAPES[:3]]
    loss, _ = run(layers, 0.0, False, [1.0] * 3, False, False)
    expect = 0.0
    for t, c, _, mu, inv_s, _, inner in layers:
        inv = inv_s.double()[(torch.arange(t.shape[1]) // inner) % mu.numel()]
        expect = expect + (((t.double() - c.double()) * inv) ** 2).mean(1)
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduce_rows", [True, False])
def test_mixed_dtypes_grouped(reduce_rows):
    """Layers of several dtypes in one call: one grouped launch per dtype, losses summed,
    gradients returned in layer order."""
    gen = torch.Generator().manual_seed(2)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    layers = [make_layer(ROWS, *shape, dt, 5.0, gen) for dt, shape in zip(dtypes, SHAPES)]
    loss, dc = run(layers, 5.0, False, ROW_SCALE[:4], reduce_rows, True)
    ref_loss, ref_grads, _ = reference(layers, 5.0, False, ROW_SCALE[:4], reduce_rows)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    for d, ref in zip(dc, ref_grads):
        assert_grad_close(d, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_inputs(dtype):
    """tau = 100 on activations far from their statistics (|a| up to ~1e5): finite, and as close
    to float64 as fp32 rounding of ``a`` and ``q`` allows (softmax scales it by max |a|, |q|)."""
    gen = torch.Generator().manual_seed(3)
    layers = [make_layer(ROWS, *shape, dtype, 100.0, gen, scale=40.0) for shape in SHAPES[:3]]
    loss, dc = run(layers, 100.0, False, ROW_SCALE[:3], True, True)
    assert torch.isfinite(loss) and all(torch.isfinite(d).all() for d in dc)
    ref_loss, ref_grads, spread = reference(layers, 100.0, False, ROW_SCALE[:3], True)
    assert spread > 1e4
    cond = 8 * 2**-24 * spread
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5 + cond, atol=0)
    for d, ref in zip(dc, ref_grads):
        assert_grad_close(d, ref, cond)


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
