"""medic_fast: fast backdoor removal (MEDIC) and detection (CLEAR) for PyTorch.

The core op is :func:`importance_clone_loss`, computed by fused kernels (Triton on CUDA tensors,
C++ on CPU tensors); see DESIGN.md in the project for the formulas.
"""
from medic_fast.loss import ImportanceCloneLoss, importance_clone_loss, importance_weights
from medic_fast.sanitize import Result, evaluate, finetune, sanitize, train_from_scratch
from medic_fast.stats import LayerStats, collect_stats
from medic_fast import attacks, data, models  # the evaluation harness, as submodules
from medic_fast.clear import PocketResult, ScanReport, patch, pocket_search, scan
from medic_fast.cloner import Cloner, collect_token_stats

__version__ = "0.1.0"

__all__ = ["importance_clone_loss", "importance_weights", "ImportanceCloneLoss",
           "sanitize", "finetune", "train_from_scratch", "evaluate", "Result",
           "collect_stats", "LayerStats",
           "scan", "patch", "pocket_search", "ScanReport", "PocketResult",
           "Cloner", "collect_token_stats"]
