"""The evaluation harness, apart from the library: toy data sets bundled with scikit-learn,
backdoor attacks, reference models, the baseline defences MEDIC is compared with, the poisoned
tasks of the demos and benchmarks, and a small transformer test bed. The library itself never
imports from here."""
from medic_fast.zoo import attacks, datasets, defences, models

__all__ = ["attacks", "datasets", "defences", "models"]
