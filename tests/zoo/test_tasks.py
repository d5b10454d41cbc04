"""CLEAR's evaluation tasks (medic_fast/zoo/tasks.py): each attack takes on a seeded case, the
transfer form leaves the features alone, the end-to-end form does not, the paper's rule for an
attack that counts, and bad arguments."""
import pytest
import torch

from medic_fast._utils import torch_threads
from medic_fast.clear import graph
from medic_fast.zoo.tasks import ATTACKS, make_task


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("attack", ATTACKS)
def test_each_attack_takes_on_the_digits_mlp(attack):
    # seed 100: a tuning seed (benchmarks/RESULTS.md §4), where every attack took
    t = make_task("digits_mlp", attack, "transfer", seed=100)
    assert t.target_x.shape == (1, 1, 8, 8) and t.source != t.target
    assert t.target_class() == t.target and t.took
    assert t.accuracy() > t.clean_accuracy - 0.05
    assert t.name == f"digits_mlp/{attack}/transfer"


def _features_params(model):
    cut = graph.default_cut(model)
    head = {id(p) for p in graph.split(model, cut).parameters()}
    return [p.detach().clone() for p in model.parameters() if id(p) not in head]


def test_transfer_trains_the_head_only_and_end2end_everything():
    clean = make_task("swiss_roll", form="transfer", seed=3, poisoned=False, epochs=5)
    poisoned = make_task("swiss_roll", form="transfer", seed=3, epochs=5)
    e2e = make_task("swiss_roll", form="end2end", seed=3, epochs=5)
    assert clean.target_x is None and not clean.took and clean.name == "swiss_roll/clean/transfer"
    a, b, c = (_features_params(t.model) for t in (clean, poisoned, e2e))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same first phase, frozen after
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(not m.training for m in poisoned.model.modules())


def test_the_cnn_task_cuts_before_its_last_conv_block():
    t = make_task("digits_cnn", seed=0, poisoned=False, epochs=1)
    assert graph.default_cut(t.model) == "features.7"  # the input of the last conv


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("cifar")
    with pytest.raises(ValueError, match="attack must be one of"):
        make_task("swiss_roll", "badnets")
    with pytest.raises(ValueError, match="form must be one of"):
        make_task("swiss_roll", form="scratch")
