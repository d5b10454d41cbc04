"""CLEAR (Zhu et al., ICCV 2021): detect and patch sample-targeted backdoors by searching for
pockets (docs/DESIGN.md §2). The default search is :mod:`medic_fast.clear.hull`; the paper's
Algorithm 1 is the op :func:`medic_fast.ops.pocket_search`. :func:`calibrate` sets a threshold
from clean models of the task."""
from medic_fast.clear.detect import ScanReport, calibrate, scan
from medic_fast.clear.mitigate import patch

__all__ = ["scan", "calibrate", "patch", "ScanReport"]
