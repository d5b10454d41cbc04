"""Build and load the C++/CUDA extension ``medic_fast._C`` from ``csrc/``.

The extension is compiled with ninja the first time a fast CPU path needs it (one line on stderr
says so) into a cache directory, or ahead of time with ``python -m medic_fast.build``. CPU sources
are always built; ``.cu`` sources only where PyTorch itself has CUDA, a CUDA toolkit is found and
its ``nvcc`` has PyTorch's CUDA major version. It holds no op definitions, only CPU (and CUDA)
kernels of the ops ``medic_fast.ops`` defines in ``torch.ops.medic_fast``; they register
themselves when the library loads. If the build fails, :class:`ExtensionUnavailable` says why,
``backend="auto"`` falls back to the reference, and ``backend="reference"`` works.

The CUDA part never takes the CPU kernels down with it: when the ``.cu`` sources cannot be built
(or are skipped), the CPU sources are built alone, in their own directory, and
:func:`cuda_unavailable` keeps the reason (the compiler's, or the version mismatch) for the CUDA
ops to report. With no GPU visible and no ``TORCH_CUDA_ARCH_LIST`` set (a build node), the CUDA
kernels are built for :data:`DEFAULT_CUDA_ARCHS`; with one, for the visible GPUs (torch's
default). ``MAX_JOBS`` sets how many compilers run at once (torch reads it; nothing here
overrides it; :func:`build_jobs` tells what it is).

A built extension stays built. After a build, ``<library>.inputs`` beside the library records
a hash of what it was built from (the sources' and headers' contents, the flags, the CUDA archs;
the cache directory's name covers torch, Python and the CPU). While that record matches, the
library is loaded as it is: no ninja, no compiler, nothing written, so a read-only cache works,
and switching ninja versions (whose build logs are incompatible: a full rebuild each switch) or
setting ``CXX`` changes nothing. Builds run the environment's own ninja (the ``ninja`` package's,
or the one beside ``sys.executable``) ahead of any other on ``PATH``, where torch looks for it.

One process at a time builds, holding ``build.lock`` in the build directory: an ``flock``, which
the OS drops when its holder dies, however it dies, so a killed build never blocks later ones
(torch's own lock file, which a killed build leaves behind, is removed under it). Others wait for
it, at most ``$MEDIC_FAST_BUILD_TIMEOUT`` seconds (default 15 minutes); a load shares that lock,
read-only, so that it never reads a library a build is writing. Every ``MEDIC_FAST_*`` variable
is checked first; a bad value raises a ValueError naming it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: torch's lock file alone guards the build, as before
    fcntl = None

__all__ = ["ExtensionUnavailable", "load", "cache_dir", "build_dir", "source_dir", "sources",
           "cuda_unavailable", "build_jobs", "DEFAULT_CUDA_ARCHS"]

# What the CUDA kernels are built for when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset:
# A100 and H100 machine code, and PTX that later GPUs compile when they load it.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

_lock = threading.Lock()
_loaded: str | None = None
_failure: str | None = None
_cuda_failure: str | None = None  # why the loaded extension has no CUDA kernels


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded; the message says why."""


def source_dir() -> Path:
    """Directory holding the extension's sources: ``medic_fast/csrc`` in an installed wheel,
    the repository's ``csrc/`` in a checkout (an editable install, or ``PYTHONPATH``).

    Found by location, not imported: ``csrc/`` is a folder of sources, not a Python package, so
    that nothing named ``csrc`` is importable from a checkout's root (DESIGN.md §3).
    """
    package = Path(__file__).resolve().parent
    for where in (package / "csrc", package.parent / "csrc"):
        if (where / "importance_clone.cpp").is_file():
            return where
    raise ExtensionUnavailable(f"the C++ sources are not installed: no csrc/ with "
                               f"importance_clone.cpp in {package} or beside it")


def _with_cuda() -> bool:
    """Whether the build includes the ``.cu`` sources (see :func:`_cuda_plan`)."""
    return _cuda_plan()[0]


def _cuda_plan() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and if not, why: PyTorch has no CUDA, no CUDA toolkit
    is found, or its ``nvcc`` has another CUDA major version than PyTorch (structs such as
    ``cudaDeviceProp`` change layout between majors, CUDA 13 for one: code built against one
    major and run against the other reads them wrong)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, f"this PyTorch ({torch.__version__}) is built without CUDA"
    if CUDA_HOME is None:
        return False, (f"PyTorch has CUDA {torch.version.cuda} but no CUDA toolkit was found "
                       "(set CUDA_HOME to one with nvcc)")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    release = _nvcc_release(nvcc)
    if release is None:
        return False, f"could not read the CUDA version of {nvcc} (`{nvcc} --version`)"
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, (f"PyTorch is built with CUDA {torch.version.cuda} but {nvcc} is CUDA "
                       f"{release}: the CUDA kernels need the same CUDA major version "
                       "(cudaDeviceProp changed layout in CUDA 13); set CUDA_HOME to a CUDA "
                       f"{torch.version.cuda.split('.')[0]}.x toolkit and rebuild")
    return True, ""


@lru_cache(maxsize=None)
def _nvcc_release(nvcc: str) -> str | None:
    """``"13.0"`` from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return f"{found[1]}.{found[2]}" if found else None


def _default_arch_list() -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` to build the CUDA kernels with when none (or ``native``) is
    set and no GPU is visible, where torch's detection of the visible GPUs fails ("list index
    out of range"): :data:`DEFAULT_CUDA_ARCHS`. None otherwise: the list set, or torch's default,
    the visible GPUs."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "native") not in ("", "native"):
        return None
    return None if torch.cuda.device_count() > 0 else DEFAULT_CUDA_ARCHS


def build_jobs() -> int | None:
    """How many compilers the build runs at once: ``$MAX_JOBS``, which torch passes to ninja
    (``ninja -j``); None when unset (or not a number, which torch ignores): ninja's default, one
    more than the CPUs."""
    value = os.environ.get("MAX_JOBS", "")
    return int(value) if value.isdigit() else None


def cuda_unavailable() -> str | None:
    """Why the extension has no CUDA kernels: its CUDA build failed (the compiler's reason) or
    was skipped (no CUDA in PyTorch, no toolkit, a CUDA version mismatch); None when it has
    them. Loads the extension first (raising :class:`ExtensionUnavailable` if even its CPU part
    cannot be built)."""
    load()
    return _cuda_failure


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
    """Where the extension is built: ``$MEDIC_FAST_CACHE`` or ``~/.cache/medic_fast``.

    ``$MEDIC_FAST_CACHE`` must be an absolute path (a relative one would move with the working
    directory, a build in each) and not a file; ValueError otherwise.
    """
    root = os.environ.get("MEDIC_FAST_CACHE")
    if root:
        expected = "MEDIC_FAST_CACHE must be an absolute path to a directory"
        if not os.path.isabs(root):
            raise ValueError(f"{expected}, got {root!r}")
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"{expected}, got {root!r}: not a directory")
    else:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                            "medic_fast")
    return Path(root) / f"ext-{_cpu_tag()}"


def build_dir(with_cuda: bool | None = None) -> Path:
    """The build directory in :func:`cache_dir`: ``cpu``, or ``cuda`` when CUDA is built (the
    CPU-only build after a failed CUDA build goes to ``cpu``)."""
    with_cuda = _with_cuda() if with_cuda is None else with_cuda
    return cache_dir() / ("cuda" if with_cuda else "cpu")


def _lib_name(with_cuda: bool) -> str:
    """The library's name: one per build directory, so that a CPU-only build after a failed CUDA
    build in the same process is not renamed by torch (it versions a reused name: ``_v1``)."""
    return "medic_fast_C_cuda" if with_cuda else "medic_fast_C"


def _ldflags() -> list[str]:
    """``-fopenmp``, and on Linux the shared C++ runtime by name (``-l:libstdc++.so.6``).

    Some toolchains link libstdc++ statically by default (a GPU machine's ``CXX=/opt/gcc/bin/g++``
    did): the extension then carries a second C++ runtime beside the one PyTorch loaded, and
    formatting a number into an error message (any ``TORCH_CHECK`` with an integer) crashes or
    loses the number. Naming the shared library first makes the link take it, whatever the
    compiler's default; elsewhere it is what the link takes anyway.
    """
    return ["-fopenmp"] + (["-l:libstdc++.so.6"] if platform.system() == "Linux" else [])


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

    Raises :class:`ExtensionUnavailable` with the compiler's reason if it cannot be built (or
    the cache's, if it cannot be written), ValueError for a bad ``MEDIC_FAST_*`` variable.
    """
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        cache_dir()  # every MEDIC_FAST_* variable is checked before anything is built or
        _timeout()  # waited for: a bad value raises a ValueError naming it
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
    """Build and load with CUDA when :func:`_cuda_plan` says so; if that fails, or CUDA is not
    built, the CPU sources alone. Records why there are no CUDA kernels in ``_cuda_failure``."""
    global _cuda_failure
    with_cuda, why_not = _cuda_plan()
    if with_cuda:
        try:
            return _build(True, verbose)
        except ExtensionUnavailable:  # waiting for another build timed out: not a CUDA problem
            raise
        except Exception as e:  # nvcc or the CUDA glue failed: keep the CPU kernels
            why_not = _cuda_build_error(e)
            print(f"medic_fast: {why_not}\nmedic_fast: building the CPU kernels alone",
                  file=sys.stderr)
    _cuda_failure = why_not
    return _build(False, verbose)


def _cuda_build_error(e: Exception, max_lines: int = 12) -> str:
    """One message for a failed CUDA build: what failed and the compiler's error lines (not the
    compile commands, which torch's message puts on its first line, after the prefix)."""
    text = re.sub(r"^(Error building extension '[^']*'): .*", r"\1", str(e), flags=re.MULTILINE)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not re.match(r"\s*\[\d+/\d+\] ", line)]
    errors = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE)]
    detail = "\n".join((errors or lines)[:max_lines])
    return ("building the CUDA kernels of the medic_fast extension failed, so it has only its CPU "
            f"kernels ({type(e).__name__}):\n{detail}\nFix the CUDA toolkit (CUDA_HOME, nvcc) and "
            "rebuild with `python -m medic_fast.build`, or use backend=\"reference\" on CUDA "
            "tensors.")


def _build(with_cuda: bool, verbose: bool) -> str:
    """Load the extension, with or without its CUDA sources, as built when its record of inputs
    matches; else build it first. The path of the loaded library."""
    from torch.utils import cpp_extension

    srcs = sources(with_cuda)
    if not srcs:
        raise ExtensionUnavailable(f"no C++ sources found in {source_dir()}")
    bdir = build_dir(with_cuda)
    args = dict(
        name=_lib_name(with_cuda),
        sources=[str(s) for s in srcs],
        extra_cflags=_cflags() + (["-DMEDIC_FAST_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_ldflags=_ldflags(),
        extra_include_paths=[str(source_dir())],
        with_cuda=with_cuda,
    )
    lib = bdir / f"{args['name']}.so"
    record = bdir / f"{args['name']}.inputs"
    arch = _default_arch_list() if with_cuda else None
    inputs = _inputs(args, (arch or os.environ.get("TORCH_CUDA_ARCH_LIST")) if with_cuda else None)
    timeout = _timeout()
    with _shared_lock(bdir, timeout):
        if _built(lib, record, inputs):
            torch.ops.load_library(str(lib))
            return str(lib)
    with contextlib.ExitStack() as held:
        try:
            bdir.mkdir(parents=True, exist_ok=True)
            held.enter_context(_build_lock(bdir, timeout))
            built = _built(lib, record, inputs)  # by another process, while this one waited
            if not built:
                record.unlink(missing_ok=True)  # no record while the library is rewritten
        except OSError as e:
            raise ExtensionUnavailable(_not_writable(bdir, e)) from None
        if built:
            torch.ops.load_library(str(lib))
            return str(lib)
        jobs = build_jobs()
        how = [f"{jobs} compilers at once (MAX_JOBS)"] if jobs else []
        if arch:
            how.append(f"no GPU visible: CUDA kernels for TORCH_CUDA_ARCH_LIST={arch}")
        print(f"medic_fast: building the C++ extension in {bdir} (once)"
              + (f"; {'; '.join(how)}" if how else "") + "...", file=sys.stderr)
        ninja = _ninja_dir()
        with _env("TORCH_CUDA_ARCH_LIST", arch), \
                _env("PATH", ninja and os.pathsep.join([ninja, os.environ.get("PATH", "")])):
            path = cpp_extension.load(**args, build_directory=str(bdir), is_python_module=False,
                                      verbose=verbose)
        tmp = record.with_name(f"{record.name}.tmp")
        tmp.write_text(inputs)
        os.replace(tmp, record)
    return str(path) if isinstance(path, (str, os.PathLike)) else str(lib)


def _inputs(args: dict, arch: str | None) -> str:
    """Hash of what the library is built from: ``args`` (names, flags), the CUDA arch list and
    the contents of every source and header. Not the compiler nor ninja: a built extension stays
    built when they change (delete its build directory to rebuild it with another compiler)."""
    h = hashlib.sha256(json.dumps([args, arch]).encode())
    files = set(map(Path, args["sources"])) | set(source_dir().glob("*.h")) \
        | set(source_dir().glob("*.cuh"))
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _built(lib: Path, record: Path, inputs: str) -> bool:
    """Whether ``lib`` is there and was built from ``inputs`` (its record says so)."""
    try:
        return lib.is_file() and record.read_text() == inputs
    except OSError:
        return False


def _ninja_dir() -> str | None:
    """The folder of the environment's own ninja: the ``ninja`` package's, else the one beside
    ``sys.executable`` (a venv's, activated or not); None if neither (torch takes ``PATH``'s).

    One ninja for every build of an environment: ninja versions read each other's build logs
    as empty, which rebuilds everything."""
    try:
        import ninja

        folders = [ninja.BIN_DIR]
    except (ImportError, AttributeError):
        folders = []
    folders.append(os.path.dirname(sys.executable))
    return next((d for d in folders if os.access(os.path.join(d, "ninja"), os.X_OK)), None)


def _not_writable(bdir: Path, e: OSError) -> str:
    """The message for a build directory that cannot be written: what the OS said, not a
    compiler's fault."""
    return (f"the medic_fast C++ extension is not built (or is out of date) in {bdir}, and "
            f"cannot be built there: {e.filename or bdir} is not writable ({e.strerror}). Build "
            "it where that cache is writable (`python -m medic_fast.build`), set "
            "MEDIC_FAST_CACHE to a writable directory, or use backend=\"reference\".")


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """Inside, ``$name`` is ``value`` (unchanged when ``value`` is None); restored after."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


_POLL_S = 0.2


def _timeout() -> float:
    """Seconds to wait for another process's build: ``$MEDIC_FAST_BUILD_TIMEOUT``, else 15 min;
    ValueError unless it is a finite number > 0 (nan waited forever, -5 gave up at once)."""
    value = os.environ.get("MEDIC_FAST_BUILD_TIMEOUT") or "900"
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError("MEDIC_FAST_BUILD_TIMEOUT must be a finite number of seconds > 0, got "
                         f"{value!r}")
    return seconds


@contextlib.contextmanager
def _shared_lock(bdir: Path, timeout: float):
    """Share ``bdir/build.lock`` while loading a built library, waiting (bounded) for a build
    that holds it; opened read-only, and skipped where there is none: loading writes nothing."""
    path = bdir / "build.lock"
    try:
        fd = os.open(path, os.O_RDONLY) if fcntl else None
    except OSError:  # none: nothing was ever built here (or it is not ours to read)
        fd = None
    if fd is None:
        yield
        return
    try:
        _acquire(fd, path, time.monotonic() + timeout, timeout, shared=True)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _build_lock(bdir: Path, timeout: float):
    """Hold ``bdir/build.lock`` for a build and load, waiting at most ``timeout`` seconds.

    The file names its holder (JSON: pid, process group, host, start time) while held, and is
    emptied on release; a record found on acquiring is a holder killed mid-build, whose ninja and
    compilers may still run: they are waited for, so two builds never write the same files.
    """
    if fcntl is None:
        yield
        return
    path = bdir / "build.lock"
    deadline = time.monotonic() + timeout
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, deadline, timeout)
        killed = _holder(path)
        me = {"pid": os.getpid(), "pgid": os.getpgid(0), "host": socket.gethostname(),
              "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            if killed:
                _await_leftovers(bdir, killed, deadline, timeout)
            # torch's lock file: stale, as every build holds build.lock; left, it blocks forever
            (bdir / "lock").unlink(missing_ok=True)
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _wait(blocker, deadline: float, timeout: float, waiting_for, give_up) -> None:
    """Poll ``blocker()`` until it returns a falsy value: one line on stderr when it must wait
    (``waiting_for(blocked)``), an :class:`ExtensionUnavailable` at ``deadline`` saying what was
    waited for and how to clear it (``give_up(blocked)``)."""
    waiting = False
    while blocked := blocker():
        if not waiting:
            print(f"medic_fast: waiting for {waiting_for(blocked)}", file=sys.stderr)
            waiting = True
        if time.monotonic() >= deadline:
            raise ExtensionUnavailable(f"gave up after {timeout:g} s (MEDIC_FAST_BUILD_TIMEOUT) "
                                       f"waiting for {give_up(blocked)}")
        time.sleep(_POLL_S)


def _acquire(fd: int, path: Path, deadline: float, timeout: float, shared: bool = False) -> None:
    """``flock`` ``fd`` (exclusive, or ``shared``), waiting (bounded) while a build holds it."""
    def held() -> str:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return ""
        except BlockingIOError:
            return _describe(_holder(path))

    _wait(held, deadline, timeout,
          lambda who: f"the extension build of {who} (lock {path})",
          lambda who: f"the extension build of {who}, which holds {path}: if that build is "
                      f"stuck, kill that process, or delete {path.parent} to start over")


def _holder(path: Path) -> dict:
    """The record in the lock file; empty when nobody holds it (or has not written it yet)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started at {started}"


def _await_leftovers(bdir: Path, killed: dict, deadline: float, timeout: float) -> None:
    """Wait until the processes a killed build left running in ``bdir`` have exited."""
    if killed.get("host") != socket.gethostname():
        return
    who = _describe(killed)
    _wait(lambda: _leftovers(bdir, killed.get("pgid")), deadline, timeout,
          lambda pids: f"processes {pids}, left running by the killed extension build of {who}, "
                       "to exit",
          lambda pids: f"processes {pids}, left running in {bdir} by the killed extension build "
                       f"of {who}: kill them, or delete {bdir} to start over")


def _leftovers(bdir: Path, pgid: int | None) -> list[int]:
    """Processes of group ``pgid`` working in ``bdir`` (ninja and the compilers it started: what a
    killed builder leaves running); read from ``/proc``, so none where there is no ``/proc``."""
    here = os.path.realpath(bdir)
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(proc.name)
            if (pid != os.getpid() and os.getpgid(pid) == pgid
                    and os.readlink(proc / "cwd") == here):
                found.append(pid)
        except (OSError, ValueError):
            continue
    return found
