"""Small helpers shared across the package: devices, training flags, wrappers, distributed
shards, atomic writes, torch threads, the random generators' state, digests, warnings at the
user's line, and argument checks that name the argument and what was expected."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
from contextlib import contextmanager
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["device_of", "eval_mode", "inner_module", "dist_shard", "save_atomic", "check_int",
           "check_number", "check_module", "check_device", "available_cores", "forward_macs",
           "auto_threads", "torch_threads", "preserved_rng", "digest", "user_stacklevel"]


def device_of(model: nn.Module, device=None) -> torch.device:
    """``device`` if given, else where ``model``'s parameters are (CPU for none)."""
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode inside the block; every module's training flag is restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def inner_module(model: nn.Module) -> nn.Module:
    """The module whose submodule names the user means: unwraps DistributedDataParallel /
    DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def dist_shard() -> Optional[Tuple[int, int]]:
    """``(rank, world)`` under an initialised ``torch.distributed`` process group, else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def save_atomic(state, path) -> None:
    """``torch.save(state)`` to ``path`` through a temporary file and ``os.replace``: a reader (or
    a crash) sees the old file or the new one, never half of one. Temporary files of ``path``
    left by killed writers (``path.tmp<pid>``, the pid no longer running) are removed first.
    Errors name ``path``, not the temporary file."""
    path = os.fspath(path)
    _remove_stale_temps(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_temps(path: str) -> None:
    """Remove ``path.tmp<pid>`` files beside ``path`` whose writer process is gone (POSIX)."""
    if os.name != "posix":
        return
    folder, prefix = os.path.dirname(path) or ".", os.path.basename(path) + ".tmp"
    try:
        entries = [e.name for e in os.scandir(folder)]
    except OSError:
        return
    for name in entries:
        pid = name[len(prefix):]
        if not (name.startswith(prefix) and pid.isdecimal()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass
        except (PermissionError, OverflowError):  # alive, another user's; or not a pid
            pass


def check_int(name: str, v, low: int = 1) -> int:
    """``v`` if it is an int >= ``low`` (not a bool), else a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


def check_number(name: str, v, *, positive: bool = False) -> float:
    """``v`` as a float if it is a finite number >= 0 (> 0 when ``positive``)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 \
            or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {v!r}")
    return float(v)


def check_module(name: str, m) -> nn.Module:
    """``m`` if it is an ``nn.Module``, else a TypeError naming ``name``."""
    if not isinstance(m, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    return m


def build_model(name: str, factory) -> nn.Module:
    """``factory()`` if ``factory`` is callable and returns an ``nn.Module``, else a TypeError
    naming ``name``."""
    if not callable(factory):
        raise TypeError(f"{name} must be a callable returning a fresh untrained model, got "
                        f"{type(factory).__name__}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must return an nn.Module, got {type(model).__name__}")
    return model


def check_device(name: str, device) -> torch.device:
    """``device`` as a ``torch.device`` if this process can use it, else a ValueError naming
    ``name`` (a CUDA device on a build or machine without one, say, instead of torch's
    AssertionError on first use)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{name} {device!r}: this PyTorch cannot use CUDA ({why}); use "
                             "'cpu'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: there are {torch.cuda.device_count()} GPUs, "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return d


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Below this many multiply-accumulates per training batch a model runs as fast on one thread as
# on several, and much faster on a busy machine (measured in benchmarks/RESULTS.md §10).
SMALL_BATCH_MACS = 2e8


@torch.no_grad()
def forward_macs(model: nn.Module, x) -> int:
    """Multiply-accumulates of the conv and linear layers in one forward of ``model`` on ``x``
    (the model runs in eval mode, its flags restored)."""
    total = 0

    def count(m, _inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * m.weight[0].numel()

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, kinds)]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def auto_threads(macs_per_batch: float) -> int:
    """Torch threads for training a model costing ``macs_per_batch``: one for small models
    (threads spinning at barriers cost more than they share), else every available core."""
    return 1 if macs_per_batch < SMALL_BATCH_MACS else available_cores()


@contextmanager
def torch_threads(n: Optional[int]):
    """Run the block with ``n`` torch intra-op threads (None: as they are); restored after."""
    if n is None:
        yield
        return
    check_int("threads", n)
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def preserved_rng():
    """Run the block, then put back the state of every random generator it may draw from: the
    CPU's and, once CUDA is initialised, every GPU's. So a library call that iterates a
    ``DataLoader`` (which draws a seed from the global generator) or seeds the generator leaves
    the caller's random numbers as they were. Usable as a decorator."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=gpus):
        yield


def digest(values: Iterable) -> str:
    """A short hex digest (BLAKE2b, 64 bits) of tensors, NumPy arrays, numbers and strings, nested
    in lists, tuples and dicts: their types, shapes, dtypes and bytes. Raises TypeError on
    anything else (its ``repr`` need not be the same in another process)."""
    h = hashlib.blake2b(digest_size=8)

    def add(v):
        if isinstance(v, torch.Tensor) or type(v).__module__ == "numpy":
            t = torch.as_tensor(v).detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(v, (bool, int, float, str, type(None))):
            h.update(f"{type(v).__name__}:{v!r};".encode())
        elif isinstance(v, (list, tuple)):
            h.update(f"{type(v).__name__}{len(v)}[".encode())
            for item in v:
                add(item)
        elif isinstance(v, dict):
            h.update(f"dict{len(v)}{{".encode())
            for k, item in v.items():
                add(k)
                add(item)
        else:
            raise TypeError(f"cannot digest a {type(v).__name__}")

    add(list(values))
    return h.hexdigest()


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller name the first frame
    outside this package and the ``contextlib`` wrappers of its decorators: the user's line,
    not a library source line."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level
