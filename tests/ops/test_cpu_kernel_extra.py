"""The C++ loss kernel's own paths, against the float64 reference (DESIGN.md §1).

The kernel takes different routes by row length, row count and thread count (whole rows per
task with a scratch row; rows longer than the scratch, rescaled in place; few rows split across
threads), streams the gradient out during the next row's pass when rows are aligned, redoes a
chunk whose values jump far above the running maxima, and hands out the gradients of one call
as parts of one reused block. Each route is checked here, and the float16 gradient of a long row
whose softmax mass sits in a late chunk (an earlier chunk's provisional gradient used to
overflow to inf before the final rescale).
"""
import pytest
import torch

import medic_fast
from shared import needs_extension

pytestmark = needs_extension

# The gradient relative to its largest value, as tests/ops/test_importance_clone.py compares it.
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def loss_and_grad(t, c, g, mean, std, backend, **kw):
    c = c.detach().clone().requires_grad_()
    loss = medic_fast.importance_clone_loss(t, c, g, mean, std, backend=backend, **kw)
    (1.7 * loss.sum()).backward()
    return loss.detach(), c.grad


def assert_matches_float64(t, c, g, mean, std, **kw):
    loss, grad = loss_and_grad(t, c, g, mean, std, "cpp", **kw)
    d = [x.double() for x in (t, c, g)]
    stats = [None if x is None else x.double() for x in (mean, std)]
    loss64, grad64 = loss_and_grad(*d, *stats, "reference", **kw)
    assert grad.dtype == c.dtype
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=1e-7)
    scale = grad64.abs().max()
    rtol = GRAD_RTOL[c.dtype]
    torch.testing.assert_close(grad.double() / scale, grad64 / scale, rtol=rtol, atol=rtol)
    return loss, grad


def late_mass_row(m, dtype, late=100):
    """One row: neuron 0 has a large (t - c) / s^2 but, in the end, a small weight; the softmax
    mass is on neuron m - late (large |t - mu| / s and large g)."""
    t = torch.zeros(1, 1, m)
    c = torch.zeros_like(t)
    g = torch.zeros_like(t)
    c[0, 0, 0] = -30000.0
    t[0, 0, m - late] = 3.0
    g[0, 0, m - late] = 6.0
    mean, std = torch.zeros(1), torch.full((1,), 0.25)
    return [x.to(dtype) for x in (t, c, g)] + [mean, std]


# 4096: rows of a scratch row (one thread) or split across threads; 300000: longer than the
# scratch, so the provisional gradient lives in the float16 output itself.
@pytest.mark.parametrize("m", [4096, 300_000])
def test_float16_late_mass_does_not_overflow(threads, m):
    t, c, g, mean, std = late_mass_row(m, torch.float16)
    loss, grad = assert_matches_float64(t, c, g, mean, std, tau=1.0)
    # The gradient of neuron 0 is a normal float16 number (about -36.7), not -inf.
    ref = loss_and_grad(t, c, g, mean, std, "reference", tau=1.0)[1]
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(grad[0, 0, 0].float(), ref[0, 0, 0].float(), rtol=3e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 101, 50), (1, 300_001), (9, 65536)],
                         ids=["split", "beyond-scratch", "rows"])
def test_long_rows_every_dtype(threads, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(shape, generator=gen) * 1.5 + 0.3
    c = t + 0.5 * torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen) * 0.2
    mean = torch.randn(shape[1], generator=gen) * 0.3
    std = torch.rand(shape[1], generator=gen) + 0.5
    assert_matches_float64(*(x.to(dtype) for x in (t, c, g)), mean, std, tau=5.0,
                           reduction="none")


@pytest.mark.parametrize("shape,stats", [
    ((33, 1003), "channel"),        # rows not aligned: no streamed gradient
    ((17, 4, 7, 7), "channel"),     # runs of 49 neurons: not whole vectors
    ((16, 4, 32, 32), "neuron"),    # per-neuron statistics, aligned rows
    ((16, 64, 32, 32), "channel"),  # the benchmark's rows, shorter batch
])
def test_rows_path_layouts(threads, shape, stats):
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(shape, generator=gen)
    c = t + 0.3 * torch.randn(shape, generator=gen)
    g = 1e-2 * torch.randn(shape, generator=gen)
    feat = shape[1:] if stats == "neuron" else shape[1:2]
    mean = 0.1 * torch.randn(feat, generator=gen)
    std = torch.rand(feat, generator=gen) + 0.5
    for tau, criterion in [(5.0, "abs"), (100.0, "signed"), (0.0, "abs")]:
        assert_matches_float64(t, c, g, mean, std, tau=tau, criterion=criterion)


def test_new_maxima_far_above_the_running_ones(threads):
    """Each later chunk holds a larger extreme neuron, in t and g at once (so its weight is
    not negligible): each such chunk is redone against its own maxima."""
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(4, 16384, generator=gen)
    c = t + 0.3 * torch.randn(4, 16384, generator=gen)
    g = 0.1 * torch.randn(4, 16384, generator=gen)
    for k in range(1, 16):
        t[:, 1024 * k + 7 * k] = 2.0 + 0.5 * k
        g[:, 1024 * k + 7 * k] = 0.2 * k
    mean, std = torch.zeros(16384), torch.ones(16384)
    assert_matches_float64(t, c, g, mean, std, tau=100.0, reduction="none")


def test_extreme_finite_inputs_give_a_finite_loss(threads):
    """|a| up to ~1e6 (softmax(a) one-hot), small g (softmax(q) flat)."""
    gen = torch.Generator().manual_seed(4)
    t = 1e4 * torch.randn(6, 8, 64, generator=gen)
    c = t + 1e2 * torch.randn(6, 8, 64, generator=gen)
    g = 1e-3 * torch.randn(6, 8, 64, generator=gen)
    mean, std = torch.zeros(8), torch.full((8,), 0.5)
    assert_matches_float64(t, c, g, mean, std, tau=100.0, reduction="none")


def test_nan_stays_in_its_row(threads):
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(12, 4, 33, 31, generator=gen)
    c = t + 0.3 * torch.randn(t.shape, generator=gen)
    g = 0.1 * torch.randn(t.shape, generator=gen)
    mean, std = torch.zeros(4), torch.ones(4)
    t_nan = t.clone()
    t_nan[3, 1, 5, 5] = float("nan")
    loss, grad = loss_and_grad(t_nan, c, g, mean, std, "cpp", tau=5.0, reduction="none")
    loss_ok, grad_ok = loss_and_grad(t, c, g, mean, std, "cpp", tau=5.0, reduction="none")
    assert torch.isnan(loss[3]) and torch.isnan(grad[3]).all()
    others = [i for i in range(12) if i != 3]
    torch.testing.assert_close(loss[others], loss_ok[others], rtol=0, atol=0)
    torch.testing.assert_close(grad[others], grad_ok[others], rtol=0, atol=0)


def test_gradient_block_reuse():
    """The gradients of one call share a block, reused once freed: a gradient still held is
    never written by a later call, and a reused block gives the same result."""
    gen = torch.Generator().manual_seed(6)
    layers = []
    for shape, dtype in [((64, 16, 32, 32), torch.float32), ((64, 32, 16, 16), torch.bfloat16),
                         ((64, 7, 9, 9), torch.float16)]:
        t = torch.randn(shape, generator=gen)
        c = t + 0.3 * torch.randn(shape, generator=gen)
        g = 1e-2 * torch.randn(shape, generator=gen)
        layers.append([x.to(dtype) for x in (t, c, g)]
                      + [torch.zeros(shape[1]), torch.ones(shape[1])])

    def grads():
        cs = [layer[1].clone().requires_grad_() for layer in layers]
        loss = medic_fast.importance_clone_loss([x[0] for x in layers], cs,
                                                [x[2] for x in layers],
                                                [x[3] for x in layers], [x[4] for x in layers],
                                                tau=5.0, backend="cpp")
        loss.backward()
        return [c.grad for c in cs]

    first = grads()
    kept = [x.clone() for x in first]
    second = grads()  # first still held: a fresh block
    for a, b in zip(first, kept):
        assert torch.equal(a, b)
    for a, b in zip(second, kept):
        assert torch.equal(a, b)
    del first, second
    third = grads()  # a freed block, reused
    for a, b in zip(third, kept):
        assert torch.equal(a, b)
