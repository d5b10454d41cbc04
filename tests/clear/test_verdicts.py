"""scan's three verdicts (flagged, clean, inconclusive) and what its report says was searched;
the bounds on its sizes, the memory refusal and --backend per method, on a small real model."""
import json
import re

import pytest
import torch

import medic_fast
from medic_fast._utils import torch_threads
from medic_fast.zoo import models
from shared import needs_extension


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _labelled(n=150):
    """A small MLP on 2-D points and ``n`` points it labels itself, so that it classifies every
    sample correctly: a scan searches every class."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = models.MLP(2, 3, (16, 16)).eval()
    X = 10 * torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, X, model(X).argmax(1)


def _sizes(y):
    return y.bincount(minlength=3).tolist()


@pytest.mark.parametrize("method", ["hull", "paper"])
def test_clean_means_every_class_was_searched(method):
    model, X, y = _labelled()
    r = medic_fast.scan(model, (X, y), method=method, restarts=2)
    assert r.verdict == "clean" and not r.flagged and r.advice == ""
    assert r.searched == [0, 1, 2] and r.skipped == {} and r.skip_reasons == {}
    assert r.n_searches == (2 * len(y) if method == "hull" else 3 * 2 * 2)
    assert 0 < r.n_steps <= r.settings["steps"]
    d = json.loads(r.to_json())
    assert (d["verdict"], d["flagged"], d["advice"]) == ("clean", False, "")
    assert d["searched"] == [0, 1, 2] and d["n_steps"] == r.n_steps


@pytest.mark.parametrize("method", ["hull", "paper"])
def test_k_beyond_every_class_is_inconclusive(method):
    model, X, y = _labelled()
    sizes = _sizes(y)
    k = max(sizes) + 1
    r = medic_fast.scan(model, (X, y), method=method, k=k, n=k)
    assert r.verdict == "inconclusive" and not r.flagged and r.target is None
    assert r.searched == [] and r.n_searches == 0 and r.n_steps == 0
    assert torch.isnan(r.P).all()
    assert r.skipped == dict(enumerate(sizes))
    assert r.skip_reasons[1] == f"{sizes[1]} of its {sizes[1]} samples are classified " \
        f"correctly; k={k} are needed"
    assert r.advice == (f"give more clean samples of classes 0, 1, 2 (fewer than k={k} correctly "
                        f"classified), or lower k to {min(sizes)}")
    assert json.loads(r.to_json())["verdict"] == "inconclusive"


@pytest.mark.parametrize("method", ["hull", "paper"])
def test_a_clean_set_of_one_class_is_inconclusive(method):
    model, X, y = _labelled()
    r = medic_fast.scan(model, (X[y == 0], y[y == 0]), method=method, restarts=2)
    assert r.verdict == "inconclusive"
    assert r.searched == [0] and r.skipped == {1: 0, 2: 0}
    assert r.skip_reasons == {1: "the data has no sample of this class",
                              2: "the data has no sample of this class"}
    assert r.advice == "give clean samples of classes 1, 2: the data has none"
    # hull: depth needs clean samples of the target, so class 0 has nothing to search against
    assert r.n_searches == (0 if method == "hull" else 2 * 2)
    assert torch.isnan(r.P[1:]).all()


def test_a_model_that_gets_classes_wrong_is_inconclusive():
    model, X, y = _labelled()
    swapped = torch.where(y == 1, 2, torch.where(y == 2, 1, y))  # the model is wrong on both
    r = medic_fast.scan(model, (X, swapped))
    sizes = _sizes(y)
    assert r.verdict == "inconclusive" and r.searched == [0] and r.skipped == {1: 0, 2: 0}
    assert r.skip_reasons[2] == f"0 of its {sizes[1]} samples are classified correctly; k=8 " \
        "are needed"
    assert r.advice == (f"the model gets most samples of classes 1, 2 wrong (0 of {sizes[2]} "
                        f"right, 0 of {sizes[1]} right): check that the data's labels and "
                        "preprocessing are the model's")
    assert r.n_searches == 0  # class 1 and 2 are no reference for depth either


def test_a_scan_without_search_steps_is_inconclusive():
    model, X, y = _labelled()
    r = medic_fast.scan(model, (X, y), steps=0)
    assert r.verdict == "inconclusive" and r.skipped == {} and r.n_steps == 0
    assert r.advice == "give steps >= 1: steps=0 ran no search step"


def test_a_flag_stands_with_a_skipped_class_and_says_what_was_not_searched():
    model, X, y = _labelled()
    keep = torch.cat([(y != 2).nonzero().squeeze(1), (y == 2).nonzero().squeeze(1)[:3]])
    r = medic_fast.scan(model, (X[keep], y[keep]), threshold=0.0)  # any find flags
    assert r.verdict == "flagged" and r.flagged and r.pairs
    assert r.searched == [0, 1] and r.skipped == {2: 3}
    assert r.advice == ("give more clean samples of class 2 (fewer than k=8 correctly "
                        "classified), or lower k to 3")


@pytest.mark.parametrize("name, value, allowed", [
    ("k", 1, "[2, 1024]"), ("k", 100_000, "[2, 1024]"), ("n", 0, "[1, 1000000]"),
    ("restarts", 0, "[1, 1000000]"), ("restarts", 10**7, "[1, 1000000]"),
    ("steps", -1, "[0, 100000]"), ("steps", 10**6, "[0, 100000]"), ("k", 2.5, "[2, 1024]"),
])
def test_sizes_out_of_range_name_the_argument_and_the_range(name, value, allowed):
    model, X, y = _labelled()
    message = f"{name} must be an int in {allowed}, got {value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        medic_fast.scan(model, (X, y), method="paper", **{name: value})


def test_a_search_too_large_for_memory_is_refused_before_it_allocates():
    model, X, y = _labelled()
    with pytest.raises(ValueError, match=r"^the search would take about [\d.]+ GiB = [\d,]+ bytes "
                       r"for 6,000,000 problems \(k=5, n=50, restarts=1000000\), above the limit "
                       r"of 1.00 GiB = 1,073,741,824 bytes, max_memory; lower restarts, n or k, "
                       r"or raise max_memory$"):
        medic_fast.scan(model, (X, y), method="paper", restarts=10**6, max_memory=2**30)
    # the default limit: half the memory available; terabytes are more than any machine's
    model, X, y = _labelled(6000)
    assert min(_sizes(y)) >= 1024
    with pytest.raises(ValueError, match=r", half the memory available on cpu; lower restarts, "
                       "n or k"):
        medic_fast.scan(model, (X, y), method="paper", k=1024, n=10**6, restarts=10**6)
    with pytest.raises(ValueError, match="max_memory must be an int >= 1"):
        medic_fast.scan(model, (X, y), max_memory=0)
    r = medic_fast.scan(model, (X[:150], y[:150]))
    assert 0 < r.settings["memory_estimate"] < r.settings["max_memory"]


def test_the_hull_search_refuses_the_extension_s_backends_before_any_work():
    model, X, y = _labelled()
    for backend in ("cpp", "cuda"):
        with pytest.raises(ValueError, match=rf"^backend='{backend}': method='hull' runs its "
                           "search in plain PyTorch and takes backend 'auto' or 'reference'"):
            medic_fast.scan(model, "not data", backend=backend)  # refused before reading it
    with pytest.raises(ValueError, match="backend='cuda' runs pocket_search on CUDA tensors"):
        medic_fast.scan(model, "not data", method="paper", backend="cuda")
    assert medic_fast.scan(model, (X, y), backend="reference").backend == "torch"


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_extension)])
def test_the_paper_search_runs_the_backend_named(backend):
    model, X, y = _labelled()
    r = medic_fast.scan(model, (X, y), method="paper", restarts=2, steps=20, backend=backend)
    assert r.backend == backend
