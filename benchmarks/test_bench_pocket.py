"""CLEAR's batched pocket search, MLP head 256-128-10, 900 problems, 200 steps with no early
exit: the batched PyTorch reference against the extension (one group)."""
import math

import pytest
import torch

from medic_fast.ops.pocket_search import pocket_search

from _harness import mlp_head, pocket_problems


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_pocket_search_mlp(benchmark, backend):
    benchmark.group = "pocket search MLP 256-128-10, 900 problems x 200 steps"
    torch.manual_seed(0)
    head = mlp_head([256, 128, 10])
    anchors, src, tgt = pocket_problems(10, 10, 5, (256,))
    kw = dict(alpha=1.0, lr=0.01, steps=200, lo=-math.inf, hi=math.inf, margin=math.inf)
    result = benchmark.pedantic(pocket_search, args=(anchors, head, src, tgt),
                                kwargs=dict(backend=backend, **kw), rounds=3, warmup_rounds=1)
    assert bool((result.stopped_at == 200).all())
