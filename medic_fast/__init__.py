"""medic_fast: fast backdoor removal (MEDIC) and detection (CLEAR) for PyTorch.

* ops: :func:`importance_clone_loss` (fused kernels: Triton on CUDA tensors, C++ on CPU tensors)
  and :func:`pocket_search` (a C++/CUDA extension);
* MEDIC: :class:`Cloner` for a training loop of your own, :func:`sanitize` for the whole job;
* CLEAR: :func:`scan` and :func:`patch`;
* shared machinery: :func:`collect_stats`, :func:`evaluate`.

The formulas are in ``docs/DESIGN.md``; the evaluation harness (data, attacks, models, tasks)
is :mod:`medic_fast.zoo`.
"""
from medic_fast.clear import ScanReport, patch, scan
from medic_fast.medic import Cloner, Result, finetune, sanitize, train_from_scratch
from medic_fast.ops import (ImportanceCloneLoss, PocketResult, importance_clone_loss,
                            importance_weights, pocket_search)
from medic_fast.stats import LayerStats, collect_stats
from medic_fast.train import evaluate

__version__ = "0.1.0"

__all__ = ["importance_clone_loss", "importance_weights", "ImportanceCloneLoss",
           "pocket_search", "PocketResult",
           "Cloner", "sanitize", "finetune", "train_from_scratch", "Result",
           "collect_stats", "LayerStats", "evaluate",
           "scan", "patch", "ScanReport"]
