"""Build and load the C++/CUDA extension ``medic_fast._C`` from ``csrc/``.

The extension is compiled with ninja the first time a fast CPU path needs it (one line on stderr
says so) into a cache directory, or ahead of time with ``python -m medic_fast.build``. CPU sources
are always built; ``.cu`` sources only where PyTorch itself has CUDA. It holds no op definitions,
only CPU (and CUDA) kernels of the ops ``medic_fast.ops`` defines in ``torch.ops.medic_fast``; they
register themselves when the library loads. If the build fails, :class:`ExtensionUnavailable`
says why, ``backend="auto"`` falls back to the reference, and ``backend="reference"`` works.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path

import torch

__all__ = ["ExtensionUnavailable", "load", "cache_dir", "source_dir", "sources"]

_lock = threading.Lock()
_loaded: str | None = None
_failure: str | None = None


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded; the message says why."""


def source_dir() -> Path:
    """Directory holding the extension's sources (``csrc/`` in a checkout)."""
    spec = importlib.util.find_spec("medic_fast.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise ExtensionUnavailable("the C++ sources (medic_fast.csrc) are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(with_cuda: bool | None = None) -> list[Path]:
    """The translation units of the extension: every ``.cpp``, plus ``.cu`` when CUDA is built."""
    with_cuda = _with_cuda() if with_cuda is None else with_cuda
    src = source_dir()
    files = sorted(src.glob("*.cpp"))
    if with_cuda:
        files += sorted(src.glob("*.cu"))
    return files


def _cpu_tag() -> str:
    """Short hash of what the compiled code depends on: torch, python, the CPU's features, and
    which source tree it comes from (two checkouts must not rebuild over each other)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    key = f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{flags}|{source_dir()}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def cache_dir() -> Path:
    """Where the extension is built: ``$MEDIC_FAST_CACHE`` or ``~/.cache/medic_fast``."""
    root = os.environ.get("MEDIC_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "medic_fast"
    )
    return Path(root) / f"ext-{_cpu_tag()}"


def _cflags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Built on the machine that runs it (the cache key includes the CPU's flags), so the
        # at::vec code can use the widest vectors the CPU has.
        flags.append("-march=native")
        cap = torch.backends.cpu.get_cpu_capability()
        if cap in ("AVX512", "AVX2"):
            flags.append(f"-DCPU_CAPABILITY_{cap}")
            flags.append(f"-DCPU_CAPABILITY={cap}")
    return flags


def load(verbose: bool = False) -> str:
    """Build (if needed) and load the extension; return the path of the loaded library.

    Raises :class:`ExtensionUnavailable` with the compiler's reason if it cannot be built.
    """
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise ExtensionUnavailable(_failure)
        try:
            _loaded = _build_and_load(verbose)
        except ExtensionUnavailable as e:
            _failure = str(e)
            raise
        except Exception as e:  # compiler errors, missing ninja, ...
            _failure = (
                f"building the medic_fast C++ extension failed: {type(e).__name__}: {e}\n"
                "Check that a C++ compiler (g++) and ninja are installed, or use "
                'backend="reference".'
            )
            raise ExtensionUnavailable(_failure) from e
        return _loaded


def _build_and_load(verbose: bool) -> str:
    from torch.utils import cpp_extension

    with_cuda = _with_cuda()
    srcs = sources(with_cuda)
    if not srcs:
        raise ExtensionUnavailable(f"no C++ sources found in {source_dir()}")
    build_dir = cache_dir() / ("cuda" if with_cuda else "cpu")
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / "medic_fast_C.so"
    if not lib.exists() or _stale(lib, srcs):
        print(f"medic_fast: building the C++ extension in {build_dir} (once)...", file=sys.stderr)
    cpp_extension.load(
        name="medic_fast_C",
        sources=[str(s) for s in srcs],
        extra_cflags=_cflags() + (["-DMEDIC_FAST_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(source_dir())],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    return str(lib)


def _stale(lib: Path, srcs: list[Path]) -> bool:
    built = lib.stat().st_mtime
    deps = list(srcs) + list(source_dir().glob("*.h")) + list(source_dir().glob("*.cuh"))
    return any(p.stat().st_mtime > built for p in deps)
