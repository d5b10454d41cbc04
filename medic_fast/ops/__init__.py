"""The library's ops, each a ``torch.library`` custom op with a readable reference
(:mod:`medic_fast.reference`) and fused kernels (Triton in ``kernels/``, C++/CUDA in ``csrc/``):

* :mod:`~medic_fast.ops.importance_clone`: MEDIC's importance clone loss;
* :mod:`~medic_fast.ops.pocket_search`: CLEAR's batched pocket search.
"""
from medic_fast.ops.importance_clone import (ImportanceCloneLoss, importance_clone_loss,
                                             importance_weights)
from medic_fast.ops.pocket_search import PocketResult, pocket_search

__all__ = ["importance_clone_loss", "importance_weights", "ImportanceCloneLoss", "pocket_search",
           "PocketResult"]
