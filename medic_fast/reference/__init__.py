"""The ops in plain PyTorch, written for clarity: the readable specifications of
``docs/DESIGN.md``, what ``backend="reference"`` runs, and the oracles the fused kernels are
tested against (:mod:`.importance_clone` also in float64, :mod:`.pocket_search` step by step)."""
