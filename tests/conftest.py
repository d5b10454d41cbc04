"""Run the Triton kernels on CPU tensors through Triton's interpreter (no GPU here).

Set before any Triton kernel is defined: medic_fast imports its kernels lazily.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
