"""The importance clone loss, forward+backward, at issue 2's shapes: eager reference,
``torch.compile`` of the reference, and the fused kernel (one group per shape and dtype); and
its host time on tiny layers against ``F.mse_loss`` (one group per layer count)."""
import contextlib

import pytest
import torch

from _harness import host_steps, loss_case, loss_step, without_launches

CASES = [("rows64", torch.float32), ("rows64", torch.bfloat16), ("rows128", torch.float32),
         ("wrn", torch.float32)]
VARIANTS = {"eager": ("reference", None), "compile": ("reference", torch.compile),
            "fused": ("auto", None)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in CASES])
def test_loss_fwd_bwd(benchmark, case, dtype, variant):
    benchmark.group = f"loss {case} {str(dtype)[6:]} fwd+bwd"
    layers, start_dim = loss_case(case, dtype)
    backend, compiled = VARIANTS[variant]
    torch._dynamo.reset()
    step, _, loss_and_grads = loss_step(layers, start_dim, backend, backward=True,
                                        compiled=compiled)
    step()  # compile and warm up outside the timing
    benchmark(step)
    loss, grads = loss_and_grads()
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("variant", ["mse", "eager", "op", "triton"])
@pytest.mark.parametrize("layers", [1, 25])
def test_loss_host_time(benchmark, layers, variant):
    """One forward+backward on tiny layers, where the kernels cost nothing (``triton``: the
    Triton path's host code with its launches not executed)."""
    benchmark.group = f"loss host time, {layers} layer(s)"
    step = host_steps(layers)[variant]
    with without_launches() if variant == "triton" else contextlib.nullcontext():
        step()
        benchmark(step)
