"""Integrations with other training libraries (optional dependencies, imported on demand):
:mod:`medic_fast.integrations.hf` (Hugging Face ``Trainer``; ``pip install medic-fast[hf]``)."""
