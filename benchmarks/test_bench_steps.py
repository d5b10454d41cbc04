"""One WRN-16-1 training step (batch 64, 3x32x32, the 25 tensors of the released recipe
hooked): plain cross-entropy, the ``Cloner`` step that ``sanitize`` takes, and the released
code's way (one group)."""
import pytest

from medic_fast.zoo.bench import VARIANTS, step_variants


@pytest.fixture(scope="module")
def variants():
    """The three steps, built once (teacher, statistics, students, optimisers)."""
    return step_variants()


@pytest.mark.parametrize("kind", VARIANTS)
def test_wrn16_1_step(benchmark, variants, kind):
    benchmark.group = "WRN-16-1 training step, batch 64"
    step, inputs, _ = variants
    step(kind, *inputs())
    benchmark(lambda: step(kind, *inputs()))
