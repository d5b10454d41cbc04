"""MEDIC (Xu et al., CVPR 2023): remove a backdoor by importance-driven cloning
(docs/DESIGN.md §1). :class:`Cloner` is the clone objective of one training step;
:func:`sanitize` trains a fresh clone with it, beside the baselines it is compared with."""
from medic_fast.medic.cloner import Cloner
from medic_fast.medic.sanitize import Result, finetune, sanitize, train_from_scratch

__all__ = ["Cloner", "sanitize", "finetune", "train_from_scratch", "Result"]
