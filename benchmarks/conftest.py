"""The pytest-benchmark suite (``test_bench_*.py``): regression timings of the loss, the pocket
search and the training steps, on the inputs and steps of ``_harness`` that the scripts use.

    pytest benchmarks --benchmark-only --benchmark-autosave    # time; save to benchmarks/results
    pytest benchmarks --benchmark-only --benchmark-compare     # time; compare with the last save
    pytest benchmarks --benchmark-disable                      # run each once, untimed (CI)

Each group holds the variants of one measurement (e.g. eager, compiled and fused loss at one
shape), so pytest-benchmark's table shows their ratios side by side. Saved runs go to
``benchmarks/results/`` unless ``--benchmark-storage`` says otherwise.
"""
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent / "results"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = f"file://{RESULTS}"
