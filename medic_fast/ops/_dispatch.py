"""The ops' one backend vocabulary, and the one resolver that picks what runs.

``backend=`` takes, for every op:

* ``"auto"``: the op's fused kernel for the tensors' device, else the reference;
* ``"reference"``: plain PyTorch (:mod:`medic_fast.reference`), the readable specification;
* a fused kernel, named by what runs it: ``"cpp"`` (CPU tensors, the C++ extension), ``"triton"``
  (CUDA tensors, Triton), ``"cuda"`` (CUDA tensors, the extension's CUDA code).

:data:`KERNELS` says which fused kernel of each op serves which device. A fused kernel named
explicitly runs or raises, in one line saying why; ``"auto"`` instead falls back to the reference,
with one warning per process when it is the extension that is missing.
"""
from __future__ import annotations

import warnings

import torch

from medic_fast import _extension
from medic_fast._utils import user_stacklevel

__all__ = ["BACKENDS", "KERNELS", "check", "resolve"]

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")
# op -> {device type: the fused kernel for tensors there}
KERNELS = {
    "importance_clone_loss": {"cpu": "cpp", "cuda": "triton"},
    "pocket_search": {"cpu": "cpp", "cuda": "cuda"},
}
# The fused kernels that come with the extension, and per op one of its dispatcher ops, whose
# kernel for a device tells whether this build of the extension serves that device.
_IN_EXTENSION = ("cpp", "cuda")
_PROBE = {"importance_clone_loss": "medic_fast::importance_clone_loss_cpu",
          "pocket_search": "medic_fast::pocket_step_update"}
_warned = False


def check(op: str, backend) -> None:
    """Raise ``ValueError`` unless ``backend`` is a name ``op`` takes."""
    names = ("auto", "reference", *dict.fromkeys(KERNELS[op].values()))
    if backend not in names:
        raise ValueError(f"backend must be one of {names} for {op}, got {backend!r}")


def resolve(op: str, backend: str, device: torch.device, *, unsupported: str = "") -> str:
    """The backend that runs ``op`` on tensors on ``device``: ``"reference"`` or a fused kernel.

    ``unsupported``: why the fused kernel cannot take these inputs (their dtype, say), or ``""``.
    A named fused kernel that cannot run raises ``ValueError`` (wrong device), ``TypeError``
    (``unsupported``) or :class:`~medic_fast._extension.ExtensionUnavailable`.
    """
    check(op, backend)
    if backend == "reference":
        return backend
    kernels = KERNELS[op]
    fused = kernels.get(device.type)
    if backend == "auto":
        if fused is None or unsupported:
            return "reference"
    elif backend != fused:
        where = next(dev for dev, name in kernels.items() if name == backend)
        there = (f"where the fused kernel is {fused!r}" if fused else
                 "which has no fused kernel (backend='auto' or 'reference' runs there)")
        raise ValueError(f"backend={backend!r} runs {op} on {where.upper()} tensors; these are on "
                         f"{device.type}, {there}")
    elif unsupported:
        raise TypeError(f"backend={backend!r} cannot run {op} here: {unsupported} (backend='auto' "
                        "or 'reference' can)")
    if fused in _IN_EXTENSION:
        error = _extension_error(op, device.type)
        if error:
            if backend != "auto":
                raise _extension.ExtensionUnavailable(error)
            _warn_once(error)
            return "reference"
    return fused


@torch.compiler.assume_constant_result
def _extension_error(op: str, device_type: str) -> str:
    """Load the extension; why it cannot run ``op`` on ``device_type`` tensors, or ``""``.

    A constant to torch.compile, which calls it while tracing instead of tracing into it.
    """
    try:
        path = _extension.load()
    except _extension.ExtensionUnavailable as e:
        return str(e)
    key = torch._C._dispatch_key_for_device(device_type)
    if torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE[op], key):
        return ""
    return (f"the medic_fast extension at {path} has no {device_type} kernels for {op}: it was "
            "built without CUDA (no CUDA toolkit found; set CUDA_HOME and rebuild with "
            "`python -m medic_fast.build`)")


def _warn_once(error: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("medic_fast: backend='auto' runs the plain-PyTorch reference instead of the "
                      "fused kernels: same results, several times slower. To get them back: "
                      f"{error}", stacklevel=user_stacklevel())
