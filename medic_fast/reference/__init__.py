"""The ops in plain PyTorch, written for clarity: the readable specifications of
``docs/DESIGN.md``, what ``backend="reference"`` runs, and the oracles the fast kernels are
tested against (in float64)."""
