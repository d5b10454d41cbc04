"""Triton kernels of medic_fast, installed as ``medic_fast.kernels`` (DESIGN.md §3).

Each op has one module: its ``@triton.jit`` kernels and a launcher taking PyTorch tensors.

In a checkout this folder sits in the repository root, where Python also finds top-level
packages whenever the working directory is on ``sys.path`` (``python -c``, ``python -m pytest``,
a REPL, a notebook). Imported there by accident as ``kernels`` (the name of Hugging Face's
package, which transformers imports), it steps aside: the name gets the next ``kernels`` on
``sys.path``, or fails as if this folder were not there. (Python lets a module replace itself in
``sys.modules`` while it runs; the import then returns the replacement.)
"""
if __name__ != "medic_fast.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])
