"""A killed or stuck build of the C++ extension never hangs later runs (``_extension``'s lock).

Real processes and signals, each with a time bound. The module builds the extension once, in a
fresh cache its tests share.
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

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
    forever): the next ``load()`` removes it and loads (and builds first, if run alone)."""
    bdir = _build_dir(cache)
    bdir.mkdir(parents=True, exist_ok=True)
    (bdir / "lock").touch()
    out = subprocess.run([sys.executable, "-c", LOAD_AND_RUN], capture_output=True, text=True,
                         env=_env(cache), timeout=BUILD_S)
    assert "OK True" in out.stdout, out.stderr
    assert not (bdir / "lock").exists()
