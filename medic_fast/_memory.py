"""Bytes allocated per phase of a step, from the profiler's allocation events.

The library marks its phases with ``torch.profiler.record_function`` ranges (the ``Cloner``:
``PHASES``); :func:`allocated_by_phase` runs a step under the profiler with ``profile_memory``
and reports, for each named range, the bytes allocated at its start and at its peak, above what
was allocated when the step began. CPU and CUDA alike, and exact (every allocation and free is
an event), unlike a resident-set high-water mark, which the allocator's reuse blurs.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["allocated_by_phase", "PHASES"]

# The Cloner's phases: the teacher's pass (forward, and backward to the hooked layers), the
# student's forward (and its CE), the clone loss.
PHASES = ("medic_fast.teacher", "medic_fast.student", "medic_fast.loss")


def allocated_by_phase(step: Callable[[], object], names: Iterable[str] = PHASES,
                       device=None) -> Dict[str, Dict[str, int]]:
    """Run ``step`` once under the profiler; per range name found (the earliest range of that
    name), ``{"start": bytes, "peak": bytes}`` allocated above the step's start, and ``"step"``:
    the peak over the whole call. ``device``: whose allocations count (default: CPU; a CUDA
    device counts its own)."""
    device = torch.device(device or "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    allocs, ranges = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        extra = node.typed[1]
        if type(extra).__name__ == "_ExtraFields_Allocation":
            if torch.device(extra.device) == device or (
                    device.type == "cpu" and torch.device(extra.device).type == "cpu"):
                allocs.append((node.start_time_ns, extra.alloc_size))
        elif node.name in names and (node.name not in ranges
                                     or node.start_time_ns < ranges[node.name][0]):
            ranges[node.name] = (node.start_time_ns, node.end_time_ns)
    allocs.sort()
    out, level, peak = {}, 0, 0
    levels = []
    for t, size in allocs:
        level += size
        peak = max(peak, level)
        levels.append((t, level))
    for name, (start, end) in ranges.items():
        before = [lv for t, lv in levels if t < start]
        inside = [lv for t, lv in levels if start <= t <= end]
        at_start = before[-1] if before else 0
        out[name] = {"start": at_start, "peak": max(inside + [at_start])}
    out["step"] = {"start": 0, "peak": peak}
    return out
