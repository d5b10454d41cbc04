"""The GPU check: every GPU claim of the library, measured on the machine it runs on.

    python tools/gpu_check.py [--out DIR] [--stages env,build,...] [--cpu-dry-run]

Run it from a source checkout (it uses ``tests/`` and ``benchmarks/``; it is not installed with
the package) on a machine with a CUDA GPU, with nothing to download. Installed or not: where
``medic_fast.kernels`` is not importable (no editable install), it links ``medic_fast/kernels``
and ``medic_fast/csrc`` to the repository's ``kernels/`` and ``csrc/`` (as an editable install
maps them; both links are git-ignored) and runs every stage with the checkout on
``PYTHONPATH``. Stages, each in its own process with its own time limit, so that a crash or a
hang in one (an illegal address kills the CUDA context) leaves the others' results:

* ``env``: versions (Python, PyTorch, Triton, CUDA, nvcc), the GPU, the tools found;
* ``build``: builds the C++/CUDA extension against the PyTorch there and lists which of its ops
  have CUDA kernels;
* ``loss``: ``benchmarks/bench_loss.py`` on the GPU at issue 2's shapes (rows64, rows128, wrn;
  float32 and bfloat16) and a transformer's ``[8, 1024, 4096]`` (start_dim=2): eager,
  ``torch.compile`` and Triton, forward+backward, GB/s against a device copy of the same run and
  the ratio to the byte floor, the bytes per element the kernels move by design, and the fused
  call replayed in a CUDA graph, after a check of each case against float64;
* ``host``: ``benchmarks/bench_loss.py --host``: the host time of one eager forward+backward
  (1 and 25 tiny layers) on this GPU's host, against ``F.mse_loss``;
* ``pocket``: ``benchmarks/bench_pocket.py`` on the GPU: the CUDA extension against the batched
  PyTorch loop and the GEMM floor, after a check against the reference;
* ``steps``: ``benchmarks/bench_sanitize.py --parts steps``: a WRN-16-1 training step with
  ``Cloner`` (the step ``sanitize`` takes) and the released code's way, against a plain step;
* ``tests``: every test that has a CUDA form (``pytest -m cuda``);
* ``sanitizer``: ``compute-sanitizer`` memcheck and racecheck on small cases of the CUDA
  pocket-search kernels and the Triton loss kernels (:func:`sanitizer_cases`).

``--cpu-dry-run`` runs the same stages on CPU with the CPU backends at small sizes (the tests:
the CPU cases of the same device-parametrised tests; the sanitizer's cases: without it). Each
stage's output goes to ``DIR/gpu_check.log``, the results to ``DIR/gpu_check.json``, and a table
is printed last. The exit status is 1 if any stage failed, a mismatch against the reference
included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

STAGES = ("env", "build", "loss", "host", "pocket", "steps", "tests", "sanitizer")
# Seconds each stage may take before it is stopped (and counted as failed).
LIMITS = {"env": 60, "build": 600, "loss": 420, "host": 300, "pocket": 240, "steps": 240,
          "tests": 420, "sanitizer": 300}
THIS = Path(__file__).resolve()


def repo_root() -> Path:
    """The source checkout this tool runs from (it must hold ``tests/`` and ``benchmarks/``)."""
    root = THIS.parents[1]
    if not ((root / "benchmarks" / "bench_loss.py").exists() and (root / "tests").is_dir()):
        raise SystemExit(f"gpu_check: {root} is not a medic_fast source checkout (no benchmarks/ "
                         "or tests/ there); run it from a clone of the repository")
    return root


def _link_sources() -> None:
    """Where ``medic_fast.kernels`` cannot be imported (a checkout run without an editable
    install), link ``medic_fast/kernels`` and ``medic_fast/csrc`` to the repository's folders,
    which an install maps there."""
    probe = subprocess.run([sys.executable, "-c", "import medic_fast.kernels"], cwd=repo_root(),
                           capture_output=True,
                           env=dict(os.environ, PYTHONPATH=str(repo_root())))
    if probe.returncode == 0:
        return
    for name in ("kernels", "csrc"):
        link = repo_root() / "medic_fast" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
            print(f"gpu_check: linked {link} -> ../{name} (no editable install)", flush=True)


def _commands(stage: str, dry: bool, tmp: Path, tests: str = "tests") -> list[list[str]]:
    """The commands a stage runs (``tmp``: where they write their JSON; ``tests``: the test
    paths, space-separated, relative to the checkout)."""
    py, dev = sys.executable, "cpu" if dry else "cuda"
    bench = str(repo_root() / "benchmarks")
    if stage == "build":
        return [[py, str(THIS), "--worker", "build", "--result", str(tmp / "build.json")]]
    if stage == "host":
        return [[py, f"{bench}/bench_loss.py", "--host", "--device", dev, "--rounds",
                 "1" if dry else "15", "--calls", "20" if dry else "200", "--json",
                 str(tmp / "host.json")]]
    if stage == "loss":
        common = [py, f"{bench}/bench_loss.py", "--device", dev, "--passes", "fwd+bwd"]
        if dry:
            return [common + ["--cases", "small,tokens_small", "--dtypes", "float32,bfloat16",
                              "--repeat", "3", "--json", str(tmp / "loss.json")]]
        # The targets' case first, so that a tight budget still measures it.
        return [common + ["--cases", "rows64", "--dtypes", "float32,bfloat16", "--repeat", "20",
                          "--json", str(tmp / "loss.json")],
                common + ["--cases", "tokens", "--dtypes", "bfloat16", "--repeat", "20",
                          "--json", str(tmp / "loss_tokens.json")],
                common + ["--cases", "rows128,wrn", "--dtypes", "float32,bfloat16", "--repeat",
                          "20", "--json", str(tmp / "loss_more.json")]]
    if stage == "pocket":
        cases = "small" if dry else "mlp,mlp100,conv"
        return [[py, f"{bench}/bench_pocket.py", "--device", dev, "--cases", cases, "--singles",
                 "2", "--json", str(tmp / "pocket.json")] + (["--quick"] if dry else [])]
    if stage == "steps":
        return [[py, f"{bench}/bench_sanitize.py", "--device", dev, "--parts", "steps",
                 "--rounds", "1" if dry else "3", "--repeats", "2" if dry else "10",
                 "--backends", "auto", "--json", str(tmp / "steps.json")]]
    if stage == "tests":
        marks = "device and not cuda" if dry else "cuda"
        return [[py, "-m", "pytest", "-q", "-m", marks, "-p", "no:cacheprovider",
                 f"--junitxml={tmp / 'tests.xml'}"] + [str(repo_root() / t) for t in tests.split()]]
    if stage == "sanitizer":
        cases = [py, str(THIS), "--worker", "sanitizer-cases"]
        tool = shutil.which("compute-sanitizer")
        if dry or tool is None:
            return [cases + ["--device", dev]]
        return [[tool, "--tool", t, "--error-exitcode", "99", "--print-limit", "20"] + cases
                + ["--device", dev] for t in ("memcheck", "racecheck")]
    raise ValueError(stage)


def _env(dry: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "dry_run": dry}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    for tool in ("nvcc", "compute-sanitizer", "ncu", "ninja"):
        info[tool] = shutil.which(tool)
    if info["nvcc"]:
        out = subprocess.run([info["nvcc"], "--version"], capture_output=True, text=True).stdout
        info["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else None
    return info


def _build_worker() -> dict:
    """Build and load the extension; which ops have CUDA kernels."""
    import torch

    from medic_fast import _extension

    start = time.perf_counter()
    path = _extension.load(verbose=False)
    ops = ("importance_clone_loss_cpu", "pocket_search_mlp", "pocket_step_logits",
           "pocket_step_update")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    kernels = {op: [key for key in ("CPU", "CUDA") if has(f"medic_fast::{op}", key)]
               for op in ops}
    return {"library": path, "seconds": time.perf_counter() - start, "kernels": kernels}


def sanitizer_cases(device: str) -> dict:
    """Small cases of every GPU kernel, for compute-sanitizer: the Triton loss (one-pass and
    split rows, float32 / bfloat16 / float16, per-token rows, several layers, forward and
    backward with its scale) and the CUDA pocket search (the fused MLP search and the per-step
    path of a conv head). Each is compared with the reference; returns the worst relative
    errors."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import medic_fast
    from medic_fast.ops.pocket_search import pocket_search

    torch.manual_seed(0)
    out = {}
    # Split rows (fp32, 9000 > ROW_MAX), one-pass rows of each dtype, per-token rows, two layers;
    # the backward scales by 2.5 (the scale kernel stores).
    for dtype, shape, start_dim in ((torch.float32, (4, 9000), 1), (torch.bfloat16, (2, 4, 700), 1),
                                    (torch.float16, (3, 5, 64), 2), (torch.float32, (6, 40), 1)):
        t = torch.randn(shape, device=device).to(dtype)
        c = (t.float() + 0.3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
        g = (1e-2 * torch.randn(shape, device=device)).to(dtype)
        layers = ([t, t[:2]], [c, c[:2]], [g, g[:2]]) if dtype == torch.float32 else (t, c, g)
        res = {}
        for backend in ("auto", "reference"):
            loss = medic_fast.importance_clone_loss(*layers, tau=5.0, start_dim=start_dim,
                                                    backend=backend)
            (grad,) = torch.autograd.grad(2.5 * loss, c)
            res[backend] = (loss.double(), grad.double())
        err = max(float((res["auto"][i] - res["reference"][i]).norm().detach()
                        / res["reference"][i].norm().detach()) for i in range(2))
        out[f"loss {str(dtype)[6:]} {tuple(shape)}"] = err

    mlp = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).to(device)

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 2 * 2, 4)

        def forward(self, x):
            return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))

    for name, head, feat in (("mlp", mlp, (16,)), ("conv", Conv().to(device), (3, 4, 4))):
        head = head.eval().requires_grad_(False)
        anchors = torch.rand(6, 3, *feat, device=device)
        src = torch.tensor([0, 1, 2, 3, 0, 1], device=device)
        tgt = torch.tensor([1, 2, 3, 0, 2, 3], device=device)
        kw = dict(alpha=1.0, lr=0.05, steps=15, lo=-float("inf"), hi=float("inf"),
                  margin=float("inf"))
        fast = pocket_search(anchors, head, src, tgt, backend="auto", **kw)
        ref = pocket_search(anchors, head, src, tgt, backend="reference", **kw)
        out[f"pocket {name}"] = float((fast.anchors - ref.anchors).abs().max())
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def _run_worker(name: str, result: str | None, device: str) -> int:
    data = _build_worker() if name == "build" else sanitizer_cases(device)
    text = json.dumps(data, indent=1)
    print(text)
    if result:
        Path(result).write_text(text)
    if name == "sanitizer-cases":
        tol = {"loss float32": 1e-4, "loss bfloat16": 2e-2, "loss float16": 5e-3, "pocket": 1e-3}
        bad = {k: v for k, v in data.items()
               if not v <= next(t for p, t in tol.items() if k.startswith(p))}
        if bad:
            print(f"MISMATCH against the reference: {bad}", file=sys.stderr)
            return 1
    return 0


def _collect(stage: str, tmp: Path) -> dict:
    """The results a stage's commands left in ``tmp``."""
    def load(name):
        path = tmp / name
        return json.loads(path.read_text()) if path.exists() else None

    if stage == "build":
        return load("build.json") or {}
    if stage == "loss":
        return {"rows": [r for name in ("loss.json", "loss_tokens.json", "loss_more.json")
                         for r in load(name) or []]}
    if stage in ("host", "pocket", "steps"):
        return {"rows": load(f"{stage}.json") or []}
    if stage == "tests" and (tmp / "tests.xml").exists():
        suite = ET.parse(tmp / "tests.xml").getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        return {**counts, "failed": failed}
    return {}


def run_stage(stage: str, dry: bool, tmp: Path, log, deadline: float = float("inf"),
              tests: str = "tests") -> dict:
    """Run one stage's commands in turn, each within the stage's remaining time (``LIMITS``)
    and before ``deadline`` (``time.perf_counter()`` seconds); its record."""
    start = time.perf_counter()
    limit = min(LIMITS[stage], deadline - start)
    if stage == "env":
        return {"status": "ok", "seconds": time.perf_counter() - start, **_env(dry)}
    notes, status = [], "ok"
    if stage == "sanitizer" and not dry and shutil.which("compute-sanitizer") is None:
        notes.append("compute-sanitizer not found: the cases ran without it")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root()),
                                                      os.environ.get("PYTHONPATH")]))
    if stage == "sanitizer":
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # so memcheck sees each tensor's bounds
    for cmd in _commands(stage, dry, tmp, tests):
        left = limit - (time.perf_counter() - start)
        if left <= 0:
            status = "failed"
            notes.append(f"not run: the time was up ({limit:.0f} s): {Path(cmd[0]).name} "
                         f"{' '.join(cmd[1:3])}")
            continue
        log.write(f"\n===== {stage}: {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=max(left, 1), cwd=repo_root())
            if proc.returncode != 0:
                status = "failed"
                notes.append(f"exit status {proc.returncode}: {Path(cmd[0]).name} "
                             f"{' '.join(cmd[1:3])}")
        except subprocess.TimeoutExpired:
            status = "failed"
            notes.append(f"stopped after {limit:.0f} s")
    return {"status": status, "seconds": time.perf_counter() - start, "notes": notes,
            **_collect(stage, tmp)}


def summary(results: dict) -> list[str]:
    """The printed table: one line per stage, then the key figures of the benchmarks."""
    lines = [f"{'stage':10s} {'status':7s} {'seconds':>8s}  notes"]
    for stage, r in results["stages"].items():
        note = "; ".join(r.get("notes", []))
        if stage == "env":
            note = (f"{r.get('gpu', 'no GPU')}, torch {r['torch']}, triton {r['triton']}, "
                    f"python {r['python']}")
        if stage == "tests" and "tests" in r:
            note = (f"{r['tests']} tests, {r['failures'] + r['errors']} failed, {r['skipped']} "
                    f"skipped" + (f"; {note}" if note else ""))
        lines.append(f"{stage:10s} {r['status']:7s} {r['seconds']:8.1f}  {note}")
    loss = results["stages"].get("loss", {}).get("rows", [])
    if loss:
        lines.append("\nloss fwd+bwd: case dtype | eager / compile / fused / graph ms | "
                     "x compile | %copy | x floor | bytes/elem | rel err")
        for r in loss:
            lines.append(f"  {r['case']:12s} {r['dtype']:9s} | {r['eager_ms']:.3f} / "
                         f"{r['compile_ms']:.3f} / {r['fused_ms']:.3f} / "
                         f"{r.get('graph_ms', float('nan')):.3f} | {r['x_compile']:.2f} | "
                         f"{r['pct_copy']:.1f} | {r['x_floor']:.2f} | "
                         f"{r.get('design_bytes', float('nan')):.1f}E | {r['rel_error']:.1e}"
                         f"{'  MISMATCH' if r['mismatch'] else ''}")
    host = results["stages"].get("host", {}).get("rows", [])
    if host:
        lines.append("\nhost time per eager fwd+bwd: layers | path | op us | x mse_loss")
        for r in host:
            lines.append(f"  {r['layers']:3d} | {r['path']} | {r['op_us']:.1f} | "
                         f"{r['x_mse']:.2f}")
    pocket = results["stages"].get("pocket", {}).get("rows", [])
    if pocket:
        lines.append("\npocket search: case | method | seconds | vs extension")
        for r in pocket:
            ratio = f"{r['vs_extension']:.2f}x" if r["vs_extension"] else ""
            lines.append(f"  {r['case']} | {r['method']} | {r['seconds']:.4f} | {ratio}")
    steps = results["stages"].get("steps", {}).get("rows", [])
    if steps:
        lines.append("\nWRN-16-1 step: backend | plain / Cloner / cached / released ms | "
                     "Cloner / plain | cached / plain | captured: Cloner / plain")
        for r in steps:
            graph = r.get("graph_ours_vs_plain")
            lines.append(f"  {r['backend']} | {r['plain_ms']:.2f} / {r['ours_ms']:.2f} / "
                         f"{r['cached_ms']:.2f} / {r['released_ms']:.2f} | "
                         f"{r['ours_vs_plain']:.2f}x | {r['cached_vs_plain']:.2f}x | "
                         f"{'' if graph is None else f'{graph:.2f}x'}")
    lines.append(f"\ngpu_check: {'ok' if results['ok'] else 'FAILED'}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out",
                   help="directory for gpu_check.json and gpu_check.log (default: %(default)s)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages, in order (default: all: %(default)s)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="the same stages on CPU with the CPU backends, at small sizes")
    p.add_argument("--budget", type=float, default=float("inf"), metavar="SECONDS",
                   help="stop whatever runs when this many seconds have passed, and start no "
                        "more (the results so far are kept)")
    p.add_argument("--tests", default="tests", metavar="PATHS",
                   help="space-separated test paths of the tests stage (default: %(default)s)")
    p.add_argument("--worker", choices=("build", "sanitizer-cases"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _run_worker(args.worker, args.result, args.device)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    repo_root()
    _link_sources()
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA GPU is visible to PyTorch here; use --cpu-dry-run to run the same "
                    "stages on CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}
    deadline = time.perf_counter() + args.budget
    with tempfile.TemporaryDirectory() as tmp, open(out / "gpu_check.log", "w") as log:
        for stage in stages:
            print(f"gpu_check: {stage}...", flush=True)
            r = run_stage(stage, args.cpu_dry_run, Path(tmp), log, deadline, args.tests)
            results["stages"][stage] = r
            results["ok"] = all(s["status"] == "ok" for s in results["stages"].values())
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
            print(f"gpu_check: {stage} {r['status']} in {r['seconds']:.1f} s", flush=True)
    for line in summary(results):
        print(line)
    print(f"(results: {out / 'gpu_check.json'}, log: {out / 'gpu_check.log'})")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
