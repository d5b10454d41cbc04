"""CLEAR (Zhu et al., ICCV 2021): detect and patch sample-targeted backdoors by searching the
feature space for pockets (DESIGN.md §2)."""
from medic_fast.clear.mitigate import patch
from medic_fast.clear.detect import ScanReport, scan
from medic_fast.clear.search import PocketResult, pocket_search

__all__ = ["scan", "patch", "pocket_search", "ScanReport", "PocketResult"]
