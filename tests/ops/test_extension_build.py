"""A killed or stuck build of the C++ extension never hangs later runs (``_extension``'s lock);
a built one stays built (another ninja, no compiler, a read-only cache); bad settings are refused.

Real processes and signals, each with a time bound. The module builds the extension once, in a
fresh cache its tests share (or copy, to break as they like).
"""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from medic_fast import _extension

pytest.importorskip("fcntl", reason="the build lock is an flock (POSIX)")

LOAD_AND_RUN = textwrap.dedent("""
    import torch, medic_fast
    x = torch.randn(4, 6)
    loss = medic_fast.importance_clone_loss(x, x + 1, x, backend="cpp")
    print("OK", torch.allclose(loss, medic_fast.importance_clone_loss(x, x + 1, x,
                                                                      backend="reference")))
""")

BUILD_S = 480  # a build takes 1-3 minutes here


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache directory for the module: empty at first, holding a build once one finished."""
    return tmp_path_factory.mktemp("cache")


def _build_dir(cache):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MEDIC_FAST_CACHE", str(cache))
        return _extension.build_dir()


def _env(cache, **extra):
    return dict(os.environ, MEDIC_FAST_CACHE=str(cache), **extra)


def _wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _files(folder):
    """Every file under ``folder`` with its modification time and size: what a write changes."""
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def _load_and_run(cache, argv=(), **env):
    return subprocess.run([*argv, sys.executable, "-c", LOAD_AND_RUN], capture_output=True,
                          text=True, env=_env(cache, **env), timeout=BUILD_S)


@pytest.mark.faults
def test_a_build_killed_midway_does_not_block_the_next_ones(cache):
    """SIGKILL the building process a few seconds in (its compilers live on, as after the OOM
    killer; torch's lock file stays). Two processes started at once then both load and run the
    op: one waits for the leftover compilers and builds, the other waits for it."""
    bdir = _build_dir(cache)
    first = subprocess.Popen([sys.executable, "-c", "from medic_fast import _extension; "
                              "_extension.load()"], env=_env(cache), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = []
    try:
        _wait_until(lambda: (bdir / "lock").exists() or first.poll() is not None, 120)
        time.sleep(3)
        assert first.poll() is None, "the build ended before it could be killed"
        first.kill()
        first.wait(10)
        assert (bdir / "lock").exists()
        runs = [subprocess.Popen([sys.executable, "-c", LOAD_AND_RUN], env=_env(cache),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        deadline = time.monotonic() + BUILD_S
        outs = [r.communicate(timeout=max(1.0, deadline - time.monotonic())) for r in runs]
    finally:
        for r in runs:
            r.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the killed build's compilers, if still there
    for out, err in outs:
        assert "OK True" in out, err
    err = "".join(err for _, err in outs)
    assert f"left running by the killed extension build of pid {first.pid}" in err, err
    # The second waits for the first (its record may not be written yet when it looks).
    assert re.search(r"medic_fast: waiting for the extension build of (pid \d+|another process)",
                     err), err
    assert not (bdir / "lock").exists()


def test_a_live_build_is_waited_for_then_named(tmp_path):
    """Another process holds the build lock: ``load()`` waits ``MEDIC_FAST_BUILD_TIMEOUT``
    seconds, saying so, then raises one line naming the holder, the lock and the way out."""
    lock = _build_dir(tmp_path) / "build.lock"
    lock.parent.mkdir(parents=True)
    hold = textwrap.dedent("""
        import fcntl, json, os, socket, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.time()}).encode())
        print("held", flush=True)
        time.sleep(120)
    """)
    wait = textwrap.dedent("""
        import time
        from medic_fast import _extension
        start = time.monotonic()
        try:
            _extension.load()
        except _extension.ExtensionUnavailable as e:
            print(round(time.monotonic() - start), "ERR", e)
    """)
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        out = subprocess.run([sys.executable, "-c", wait], capture_output=True, text=True,
                             env=_env(tmp_path, MEDIC_FAST_BUILD_TIMEOUT="3"), timeout=60)
    finally:
        holder.kill()
        holder.wait(10)
    seconds, _, message = out.stdout.strip().partition(" ERR ")
    assert message, out.stdout + out.stderr
    assert 3 <= int(seconds) < 20
    assert "\n" not in message
    assert f"build of pid {holder.pid} on host " in message
    assert f"which holds {lock}: if that build is stuck, kill that process" in message
    assert f"delete {lock.parent} to start over" in message
    assert f"medic_fast: waiting for the extension build of pid {holder.pid}" in out.stderr
    assert not (lock.parent / "medic_fast_C.so").exists()


@pytest.mark.faults
def test_a_stale_torch_lock_file_does_not_block(cache):
    """torch's ``lock`` file, left by hand, as a killed build leaves it (it made torch wait
    forever): a build removes it and builds (here it relinks the deleted library; all of it, if
    run alone); a load of a built extension does not use it, and writes nothing, so leaves it."""
    bdir = _build_dir(cache)
    bdir.mkdir(parents=True, exist_ok=True)
    (bdir / "lock").touch()
    (bdir / "medic_fast_C.so").unlink(missing_ok=True)
    out = _load_and_run(cache)
    assert "OK True" in out.stdout, out.stderr
    assert not (bdir / "lock").exists()
    (bdir / "lock").touch()
    out = _load_and_run(cache)
    assert "OK True" in out.stdout, out.stderr
    assert (bdir / "lock").exists()


# ------------------------------------------------------------------------------------------------
# A built extension stays built: loading it runs no ninja and no compiler, and writes nothing
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(cache):
    """The module's cache, holding a current build (made here if no test has made one yet)."""
    out = _load_and_run(cache)
    assert "OK True" in out.stdout, out.stderr
    return cache


@pytest.fixture
def built_copy(built, tmp_path):
    """A copy of the module's build (times kept) for one test to break."""
    return shutil.copytree(built, tmp_path / "cache", symlinks=True)


@pytest.mark.faults
def test_another_ninja_on_path_is_used_neither_to_load_nor_to_build(built_copy, tmp_path):
    """Another ninja first on PATH (the system's 1.11 beside the venv's 1.13, with the venv
    activated or not: each switch rebuilt everything, 33-80 s). A built extension loads without
    running ninja; a build (its library deleted) runs the environment's own ninja, which relinks
    the library and compiles nothing."""
    other, calls = tmp_path / "bin", tmp_path / "calls"
    other.mkdir()
    (other / "ninja").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    (other / "ninja").chmod(0o755)
    path = f"{other}{os.pathsep}{os.environ['PATH']}"
    bdir = _build_dir(built_copy)
    files = _files(bdir)
    out = _load_and_run(built_copy, PATH=path)
    assert "OK True" in out.stdout, out.stderr
    assert not calls.exists() and _files(bdir) == files
    (bdir / "medic_fast_C.so").unlink()
    out = _load_and_run(built_copy, PATH=path)
    assert "OK True" in out.stdout, out.stderr
    assert not calls.exists(), calls.read_text()
    objects = {f: stamp for f, stamp in files.items() if f.suffix == ".o"}
    assert objects and {f: _files(bdir)[f] for f in objects} == objects


@pytest.mark.faults
def test_a_built_extension_loads_without_a_compiler(built_copy):
    """``CXX=/bin/false``: the built extension loads and runs, nothing is compiled or written."""
    bdir = _build_dir(built_copy)
    files = _files(bdir)
    out = _load_and_run(built_copy, CXX="/bin/false")
    assert "OK True" in out.stdout, out.stderr
    assert "building" not in out.stderr and _files(bdir) == files


@pytest.fixture
def read_only():
    """``read_only(folder)``: the command prefix that runs a process with ``folder`` read-only:
    bind-mounted read-only in a mount namespace of its own for root (whom modes do not stop),
    by the modes of everything in it (restored after) for anyone else."""
    modes = {}

    def prefix(folder):
        if os.geteuid() != 0:
            for p in [folder, *folder.rglob("*")]:
                modes[p] = p.stat().st_mode
                p.chmod(modes[p] & ~0o222)
            return []
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
                str(folder)]
        if shutil.which("unshare") is None or subprocess.run([*argv, "true"]).returncode:
            pytest.skip("root cannot make a folder read-only here (unshare -m, mount --bind)")
        return argv

    yield prefix
    for p, mode in modes.items():
        p.chmod(mode)


@pytest.mark.faults
def test_a_built_extension_loads_from_a_read_only_cache(built_copy, tmp_path, read_only):
    """A read-only cache holding a current build: it loads and runs (loading writes nothing, not
    even ``build.lock``). One holding no build: the error says the folder cannot be written and
    why, in one line, and does not blame the compiler."""
    out = _load_and_run(built_copy, read_only(built_copy))
    assert "OK True" in out.stdout, out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    code = ("from medic_fast import _extension\n"
            "try:\n    _extension.load()\n"
            "except _extension.ExtensionUnavailable as e:\n    print('ERR', e)\n")
    out = subprocess.run([*read_only(empty), sys.executable, "-c", code], capture_output=True,
                         text=True, env=_env(empty), timeout=120)
    message = out.stdout.partition("ERR ")[2].strip()
    assert message and "\n" not in message, out.stdout + out.stderr
    assert re.search(r"is not built \(or is out of date\) in .*, and cannot be built there: "
                     r"\S+ is not writable \((Read-only file system|Permission denied)\)",
                     message), message
    assert "g++" not in message and "compiler" not in message


@pytest.mark.parametrize("name, value, expected", [
    ("MEDIC_FAST_BUILD_TIMEOUT", "nan", "a finite number of seconds > 0, got 'nan'"),
    ("MEDIC_FAST_BUILD_TIMEOUT", "-5", "a finite number of seconds > 0, got '-5'"),
    ("MEDIC_FAST_BUILD_TIMEOUT", "15m", "a finite number of seconds > 0, got '15m'"),
    ("MEDIC_FAST_CACHE", "~/cache", "an absolute path to a directory, got '~/cache'"),
    ("MEDIC_FAST_CACHE", "{file}", "an absolute path to a directory, got '{file}': not a "
                                   "directory"),
])
def test_a_bad_setting_is_refused_in_one_line(tmp_path, name, value, expected):
    """Every ``MEDIC_FAST_*`` variable is checked before anything is built or waited for (nan
    waited forever, -5 gave up at once): a ValueError naming it and what was expected."""
    file = tmp_path / "file"
    file.touch()
    env = dict(_env(tmp_path / "cache"), **{name: value.format(file=file)})
    code = ("from medic_fast import _extension\n"
            "try:\n    _extension.load()\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert out.stdout == f"ERR {name} must be {expected.format(file=file)}\n", out.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ------------------------------------------------------------------------------------------------
# The CUDA part of the build, decided without a CUDA build: the decision functions monkeypatched
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A module state with nothing loaded yet (restored after) and a cache of its own."""
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_failure", None)
    monkeypatch.setattr(_extension, "_cuda_failure", None)
    monkeypatch.setenv("MEDIC_FAST_CACHE", str(tmp_path))


def test_the_arch_list_defaults_only_where_no_gpu_is_visible(monkeypatch):
    """A build node (CUDA torch, nvcc, no GPU): torch's detection of the visible GPUs fails
    ("list index out of range"), so the CUDA kernels are built for DEFAULT_CUDA_ARCHS. With a
    GPU, torch's default (the visible GPUs); a list that is set is kept."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _extension._default_arch_list() == _extension.DEFAULT_CUDA_ARCHS == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")  # detection as well
    assert _extension._default_arch_list() == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert _extension._default_arch_list() is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _extension._default_arch_list() is None


def test_cuda_is_built_only_with_a_toolkit_of_torchs_cuda_major_version(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", None)
    assert _extension._cuda_plan() == (False, f"this PyTorch ({torch.__version__}) is built "
                                              "without CUDA")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    build, why = _extension._cuda_plan()
    assert not build and "PyTorch has CUDA 13.0 but no CUDA toolkit was found" in why
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/cuda")
    releases = {}
    monkeypatch.setattr(_extension, "_nvcc_release", lambda nvcc: releases[nvcc])
    releases["/opt/cuda/bin/nvcc"] = "13.0"
    assert _extension._cuda_plan() == (True, "")
    assert _extension._with_cuda()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    build, why = _extension._cuda_plan()
    assert not build and not _extension._with_cuda()
    assert ("PyTorch is built with CUDA 12.8 but /opt/cuda/bin/nvcc is CUDA 13.0: the CUDA "
            "kernels need the same CUDA major version (cudaDeviceProp changed layout in CUDA "
            "13); set CUDA_HOME to a CUDA 12.x toolkit") in why
    releases["/opt/cuda/bin/nvcc"] = None
    assert _extension._cuda_plan() == (
        False, "could not read the CUDA version of /opt/cuda/bin/nvcc "
               "(`/opt/cuda/bin/nvcc --version`)")


def test_the_nvcc_release_is_read_from_its_version_banner(tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert _extension._nvcc_release(str(nvcc)) == "12.4"
    assert _extension._nvcc_release(str(tmp_path / "missing")) is None


def test_max_jobs_sets_the_builds_parallelism_and_nothing_overrides_it(monkeypatch, fresh):
    """``$MAX_JOBS`` reaches torch's build untouched (torch passes it to ninja -j); with no GPU
    and no list set, the CUDA build gets the default arch list, only while it builds."""
    from torch.utils import cpp_extension

    seen = []

    def fake_load(**kw):
        seen.append((kw["name"], kw["with_cuda"], os.environ.get("MAX_JOBS"),
                     os.environ.get("TORCH_CUDA_ARCH_LIST"), kw["extra_cflags"]))
        return f"/built/{kw['name']}.so"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("MAX_JOBS", raising=False)
    assert _extension.build_jobs() is None
    monkeypatch.setenv("MAX_JOBS", "x")
    assert _extension.build_jobs() is None  # torch ignores it too
    monkeypatch.setenv("MAX_JOBS", "3")
    assert _extension.build_jobs() == 3
    assert _extension._build(True, False) == "/built/medic_fast_C_cuda.so"
    assert _extension._build(False, False) == "/built/medic_fast_C.so"
    (cuda_name, cuda, jobs, arch, cflags), (cpu_name, cpu, jobs2, arch2, cflags2) = seen
    assert (cuda_name, cuda, jobs, arch) == ("medic_fast_C_cuda", True, "3", "8.0;9.0+PTX")
    assert "-DMEDIC_FAST_WITH_CUDA" in cflags
    assert (cpu_name, cpu, jobs2, arch2) == ("medic_fast_C", False, "3", None)
    assert "-DMEDIC_FAST_WITH_CUDA" not in cflags2
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ and os.environ["MAX_JOBS"] == "3"


COMPILER_OUTPUT = """Error building extension 'medic_fast_C_cuda': [1/3] /usr/local/cuda/bin/nvcc \
-DTORCH_EXTENSION_NAME=medic_fast_C_cuda -c pocket_search.cu -o pocket_search.cuda.o
FAILED: pocket_search.cuda.o
csrc/pocket_search.cu(42): error: identifier "planted" is undefined
1 error detected in the compilation of "csrc/pocket_search.cu".
ninja: build stopped: subcommand failed.
"""


def _fake_builds(monkeypatch, cuda_error=None, cpu_error=None):
    """``_build`` replaced: the CUDA build raises ``cuda_error`` (if any), the CPU one
    ``cpu_error``; returns the list of ``with_cuda`` of the builds tried."""
    tried = []

    def build(with_cuda, verbose):
        tried.append(with_cuda)
        error = cuda_error if with_cuda else cpu_error
        if error is not None:
            raise error
        return f"/built/{'cuda' if with_cuda else 'cpu'}.so"

    monkeypatch.setattr(_extension, "_build", build)
    return tried


def test_a_failed_cuda_build_leaves_the_cpu_kernels_and_its_reason(monkeypatch, fresh, capsys):
    """nvcc fails: the CPU sources are built alone (so backend="auto" keeps its CPU kernels), and
    cuda_unavailable() gives the compiler's error lines, not the g++ hint."""
    monkeypatch.setattr(_extension, "_cuda_plan", lambda: (True, ""))
    tried = _fake_builds(monkeypatch, cuda_error=RuntimeError(COMPILER_OUTPUT))
    assert _extension.load() == "/built/cpu.so"
    assert tried == [True, False]
    why = _extension.cuda_unavailable()
    assert why.startswith("building the CUDA kernels of the medic_fast extension failed, so it "
                          "has only its CPU kernels (RuntimeError):\n")
    assert 'csrc/pocket_search.cu(42): error: identifier "planted" is undefined' in why
    assert "nvcc -DTORCH" not in why and "g++" not in why
    assert "medic_fast: building the CPU kernels alone" in capsys.readouterr().err
    assert _extension.load() == "/built/cpu.so" and tried == [True, False]  # once per process


def test_a_cuda_build_that_works_has_no_reason(monkeypatch, fresh):
    monkeypatch.setattr(_extension, "_cuda_plan", lambda: (True, ""))
    tried = _fake_builds(monkeypatch)
    assert _extension.load() == "/built/cuda.so" and tried == [True]
    assert _extension.cuda_unavailable() is None


def test_a_skipped_cuda_build_gives_its_reason(monkeypatch, fresh):
    """A version mismatch (or no toolkit): only the CPU sources are built, and the CUDA ops say
    why."""
    mismatch = "PyTorch is built with CUDA 12.8 but /opt/cuda/bin/nvcc is CUDA 13.0: ..."
    monkeypatch.setattr(_extension, "_cuda_plan", lambda: (False, mismatch))
    tried = _fake_builds(monkeypatch)
    assert _extension.load() == "/built/cpu.so" and tried == [False]
    assert _extension.cuda_unavailable() == mismatch


def test_a_failed_cpu_build_after_a_failed_cuda_build_is_the_error(monkeypatch, fresh):
    monkeypatch.setattr(_extension, "_cuda_plan", lambda: (True, ""))
    _fake_builds(monkeypatch, cuda_error=RuntimeError(COMPILER_OUTPUT),
                 cpu_error=RuntimeError("Error building extension 'medic_fast_C'"))
    with pytest.raises(_extension.ExtensionUnavailable,
                       match="building the medic_fast C\\+\\+ extension failed: RuntimeError"):
        _extension.load()
    with pytest.raises(_extension.ExtensionUnavailable):
        _extension.cuda_unavailable()


def test_waiting_for_another_cuda_build_is_not_a_cuda_failure(monkeypatch, fresh):
    """A timeout on the build lock is raised as it is: no CPU-only build behind it."""
    monkeypatch.setattr(_extension, "_cuda_plan", lambda: (True, ""))
    tried = _fake_builds(monkeypatch, cuda_error=_extension.ExtensionUnavailable("gave up"))
    with pytest.raises(_extension.ExtensionUnavailable, match="gave up"):
        _extension.load()
    assert tried == [True]


def test_a_real_failed_cuda_build_falls_back_to_the_cpu_build(cache):
    """Through torch's real build: a CUDA build that cannot work (a CUDA toolkit that is not
    there) is tried, fails, and the CPU ops still load and run; the CUDA reason is kept."""
    code = LOAD_AND_RUN + textwrap.dedent("""
        from medic_fast import _extension
        print("CUDA", _extension.cuda_unavailable().splitlines()[0])
    """)
    code = ("import torch.utils.cpp_extension\n"
            "torch.utils.cpp_extension.CUDA_HOME = '/nonexistent/cuda'\n"
            "from medic_fast import _extension\n"
            "_extension._cuda_plan = lambda: (True, '')\n") + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(cache), timeout=BUILD_S)
    assert "OK True" in out.stdout, out.stderr
    assert ("CUDA building the CUDA kernels of the medic_fast extension failed, so it has only "
            "its CPU kernels") in out.stdout, out.stdout + out.stderr
    assert "medic_fast: building the CPU kernels alone" in out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="ELF and libstdc++ are Linux's")
def test_the_extension_uses_the_shared_cpp_runtime_and_formats_numbers_in_errors():
    """On an H200 machine whose CXX linked libstdc++ statically, every TORCH_CHECK message with an
    integer crashed the process (a second C++ runtime beside PyTorch's). The link names the
    shared runtime; the loaded library needs it, and an error's numbers come through."""
    from shared import needs_extension  # noqa: F401  (the build below is the check)

    try:
        path = _extension.load()
    except _extension.ExtensionUnavailable as e:
        pytest.skip(f"the extension did not build: {e}")
    readelf = subprocess.run(["readelf", "-d", path], capture_output=True, text=True)
    if readelf.returncode != 0:
        pytest.skip("readelf is not available")
    assert "libstdc++.so.6" in readelf.stdout
    anchors = torch.rand(2, 3, 4)
    w, b = torch.randn(5, 4), torch.randn(5)
    with pytest.raises(RuntimeError, match=r"classes must be in \[0, 5\)"):
        torch.ops.medic_fast.pocket_search_mlp(anchors, [w], [b], [False, False],
                                               torch.tensor([0, 7]), torch.tensor([1, 2]),
                                               0.1, 0.5, 3, -2.0, 2.0, 0.0)
