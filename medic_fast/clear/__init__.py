"""CLEAR (Zhu et al., ICCV 2021): detect and patch sample-targeted backdoors by searching the
feature space for pockets (docs/DESIGN.md §2). The search itself is the op
:func:`medic_fast.ops.pocket_search`."""
from medic_fast.clear.detect import ScanReport, scan
from medic_fast.clear.mitigate import patch

__all__ = ["scan", "patch", "ScanReport"]
