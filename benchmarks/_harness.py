"""Shared measuring and reporting code of the benchmark scripts, which import from here only
(run as ``python benchmarks/<script>.py``, this directory is on ``sys.path``).

* :func:`median_ms`: median wall-clock of a callable over repeats, after warm-up calls;
* :func:`peak_extra_bytes`: peak resident-memory growth over one step (Linux);
* :func:`add_output_options` and :func:`write_rows`: every script's ``--json PATH`` and
  ``--csv PATH``, its result rows (flat dicts) stamped with the run's context, as in
  Liger-Kernel's benchmark CSV (one self-describing line per measurement).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

import medic_fast

__all__ = ["median_ms", "peak_extra_bytes", "add_output_options", "write_rows"]


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median milliseconds of ``repeat`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _trim() -> None:
    """Give freed memory back, so each timed call sees the allocator as a user's step would."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_bytes(step: Callable[[], object], reset: Callable[[], object]) -> int:
    """Peak resident-memory growth over one ``step``, gradients included (Linux).

    After a warm-up step, ``reset`` drops the previous gradients, freed memory goes back to the
    OS, and the kernel's high-water mark is reset (``/proc/self/clear_refs``), so the peak counts
    every byte the step touches anew, as in a user's training step.
    """
    step()
    reset()
    _trim()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return (_status_kb("VmHWM") - base) * 1024


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--json PATH`` and ``--csv PATH`` (the arguments of :func:`write_rows`)."""
    parser.add_argument("--json", metavar="PATH", help="also write the result rows to this JSON "
                        "file (a list of objects)")
    parser.add_argument("--csv", metavar="PATH", help="also write the result rows to this CSV "
                        "file")


def write_rows(rows: Iterable[dict], benchmark: str, *, json_path: Optional[str] = None,
               csv_path: Optional[str] = None) -> None:
    """Write the result ``rows`` (flat dicts) to ``json_path`` and / or ``csv_path``.

    Each row gets the run's columns after its own: ``benchmark``, ``torch`` and ``medic_fast``
    versions, torch ``threads`` and ``timestamp`` (a row's own value of one of them wins). The
    CSV's columns are the rows' keys in first-seen order, then the run's; a missing value is
    empty.
    """
    run = {"benchmark": benchmark, "torch": torch.__version__,
           "medic_fast": medic_fast.__version__, "threads": torch.get_num_threads(),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = list(rows)
    fields = list(dict.fromkeys([k for row in rows for k in row] + list(run)))
    rows = [{**row, **{k: v for k, v in run.items() if k not in row}} for row in rows]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
