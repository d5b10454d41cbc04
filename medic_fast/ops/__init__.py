"""The library's ops, each with a readable reference (:mod:`medic_fast.reference`) and fused
kernels (Triton in ``kernels/``, C++/CUDA in ``csrc/``) behind ``torch.library`` ops of one
namespace, ``torch.ops.medic_fast``, all defined here (schemas, fake and autograd kernels):

* :mod:`~medic_fast.ops.importance_clone`: MEDIC's importance clone loss;
* :mod:`~medic_fast.ops.pocket_search`: CLEAR's batched pocket search.

Both take ``backend=`` in one vocabulary, resolved by one rule (:mod:`~medic_fast.ops._dispatch`).
"""
from medic_fast.ops.importance_clone import (ImportanceCloneLoss, importance_clone_loss,
                                             importance_weights)
from medic_fast.ops.pocket_search import PocketResult, pocket_search

__all__ = ["importance_clone_loss", "importance_weights", "ImportanceCloneLoss", "pocket_search",
           "PocketResult"]
