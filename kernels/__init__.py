"""Triton kernels of medic_fast, installed as ``medic_fast.kernels``.

Each op has one module: its ``@triton.jit`` kernels and a launcher taking PyTorch tensors.
``python -m medic_fast.kernels.aot`` compiles every kernel ahead of time for sm_80 and sm_90.
"""
