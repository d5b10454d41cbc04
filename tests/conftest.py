"""Run the Triton kernels on CPU tensors through Triton's interpreter where there is no GPU.

Set before any Triton kernel is defined: medic_fast imports its kernels lazily. With a GPU the
kernels compile for it, and the tests that run Triton on CPU tensors are skipped.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
