"""The repository's top-level folders never shadow other packages (DESIGN.md §3), and a built
wheel carries everything: the Triton kernels as ``medic_fast.kernels``, the C++ sources."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path, *flags: str, python: str = sys.executable, **env):
    """Run ``code`` in a fresh interpreter in ``cwd`` (on its ``sys.path``, as ``python -c`` puts
    it); fail with its output unless it exits 0."""
    r = subprocess.run([python, *flags, "-c", textwrap.dedent(code)], cwd=cwd,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": "", **env})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_kernels_at_the_repo_root_gives_way_to_hugging_face_kernels():
    """From the root of a checkout, ``import kernels`` is Hugging Face's package (transformers
    >= 5.25 imports it), even after medic_fast has imported its own Triton kernels."""
    where = _python("import importlib.util; print(importlib.util.find_spec('kernels').origin)",
                    ROOT.parent)
    if "site-packages" not in where:
        pytest.skip("Hugging Face's kernels is not installed (a dependency of transformers)")
    out = _python("""
        import medic_fast, medic_fast.kernels.importance_clone
        import kernels
        from kernels import CUDAProperties  # what transformers' hub_kernels imports
        from transformers import GPT2LMHeadModel
        print(kernels.__file__)
        print(medic_fast.kernels.importance_clone.__file__)
        """, ROOT)
    hf, ours = out.split()
    assert hf == where.strip()
    assert Path(ours).parent == ROOT / "kernels"


def test_kernels_is_not_importable_from_the_repo_root_when_nothing_else_has_the_name():
    """``-S``: no site-packages, so no other ``kernels``; the repo's folder does not stand in."""
    out = _python("""
        try:
            import kernels
        except ModuleNotFoundError as e:
            print(e.name)
        """, ROOT, "-S")
    assert out.split() == ["kernels"]


def test_no_other_top_level_folder_is_a_package():
    """A folder without ``__init__.py`` is at most a namespace-package portion, which Python uses
    only when no regular package or module of that name exists anywhere on ``sys.path``: it can
    never shadow one. ``medic_fast`` is the package; ``kernels`` steps aside (tested above)."""
    packages = sorted(p.name for p in ROOT.iterdir()
                      if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["kernels", "medic_fast"]


@pytest.mark.slow
def test_built_wheel_runs_its_triton_kernels_in_a_fresh_venv(tmp_path):
    """``pip wheel .``, installed with ``--no-deps`` into a new venv that sees this environment's
    packages (torch, triton) behind its own; run from outside the checkout, its
    ``medic_fast.kernels`` and C++ sources are the wheel's, and one Triton case runs in the
    interpreter against the reference."""
    pytest.importorskip("triton")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = wheels.glob("medic_fast-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    site = Path(_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path,
                        python=python).strip())
    # This environment's site directories (a venv's and, with --system-site-packages, the base
    # one's), after the new venv's own: its packages but not its .pth files (editable installs).
    paths = dict.fromkeys(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    (site / "outer_environment.pth").write_text("\n".join(paths) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=600)
    out = _python("""
        import torch
        import medic_fast
        from medic_fast import _extension
        from medic_fast.kernels import importance_clone as ic

        torch.manual_seed(0)
        t, c, g = torch.randn(3, 4, 40).unbind(0)
        mean, std = torch.randn(40), torch.rand(40) + 0.5
        tau, eps = 2.0, 1e-5
        loss, _ = ic.forward([t], [c], [g], [mean], [std], [1], [1], [1], tau, eps, 0, [0.25],
                             True, False)
        ref = medic_fast.importance_clone_loss(t, c, g, mean, std, tau=tau, eps=eps,
                                               backend="reference")
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        print(ic.__file__)
        print(_extension.source_dir())
        """, tmp_path, python=python, TRITON_INTERPRET="1")
    kernels, csrc = out.split()
    assert Path(kernels).is_relative_to(site / "medic_fast" / "kernels")
    assert Path(csrc) == site / "medic_fast" / "csrc"
    assert (Path(csrc) / "pocket_search.cu").is_file()


def test_cpu_paths_need_no_triton():
    """With ``import triton`` failing (a CPU-only install has none): medic_fast imports without a
    word on stderr, the C++ loss runs forward and backward, and torch.compile traces the op."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # blocks the import, as if it were not installed
        import torch, medic_fast
        x = torch.randn(4, 8, 4, 4)
        c = (x + 1).requires_grad_()
        stats = torch.zeros(8), torch.ones(8)
        medic_fast.importance_clone_loss(x, c, x, *stats, tau=5.0).backward()
        f = torch.compile(lambda c: medic_fast.importance_clone_loss(x, c, x, *stats),
                          fullgraph=True, backend="aot_eager")
        print("OK", bool(torch.isfinite(c.grad).all()), float(f(x + 1)) > 0)
        """)], cwd=ROOT.parent, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and out.stdout.split() == ["OK", "True", "True"], \
        out.stdout + out.stderr
    assert out.stderr == "", out.stderr
