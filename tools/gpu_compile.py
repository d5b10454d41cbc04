"""One GPU compile check for every kernel, without a GPU (``docs/DESIGN.md`` §4).

    python tools/gpu_compile.py [--kind triton|cuda] [--json PATH]

It compiles every GPU kernel for sm_80 and sm_90: the Triton kernels of ``medic_fast.kernels``
and ``csrc/*.cu`` (with the machine's ``nvcc``). It prints one table (registers, spills, stack
frame, shared memory) and exits non-zero on a compile failure, a spill, or a kernel no variant
covers. It needs no GPU and no CUDA build of PyTorch (the ``.cu`` files include no PyTorch
headers). Run it from a checkout (it is not installed with the package).

Each Triton kernel module of ``medic_fast.kernels`` lists the specialisations it launches
(``aot_variants()``, yielding ``(kernel, signature, constexprs, num_warps, variant)``); each is
compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` and Triton's own ``ptxas -v``
runs on its PTX (the system ``ptxas`` may be older than Triton's PTX version). Each ``csrc/*.cu``
is compiled with the machine's ``nvcc -Xptxas -v``. Both outputs are read by :func:`parse_ptxas`;
the compiles run in spawned processes. A part whose compiler is missing is skipped, with a note.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import os
import pkgutil
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (80, 90)
KINDS = ("triton", "cuda")
HEADER = (f"{'kind':<6} {'kernel':<20} {'arch':<5} {'regs':>4} {'spills':>6} {'stack':>5} "
          f"{'shared':>6}  variant")
_PTXAS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame",
          "shared": r"(\d+) bytes smem"}


def parse_ptxas(text: str) -> list[dict]:
    """One dict per function in ``ptxas -v`` output (``nvcc -Xptxas -v`` or Triton's ptxas):
    ``symbol``, ``entry`` (a kernel, or a non-inlined device function), ``registers``, and the
    bytes of ``spill_stores``, ``spill_loads``, ``stack`` (frame) and static ``shared`` memory."""
    out = []
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        props = re.search(r"Function properties for (\S+)", line)
        if entry or (props and (not out or out[-1]["symbol"] != props.group(1))):
            out.append(dict(symbol=(entry or props).group(1), entry=bool(entry),
                            **dict.fromkeys(_PTXAS, 0)))
        elif out:
            for key, pattern in _PTXAS.items():
                if m := re.search(pattern, line):
                    out[-1][key] = int(m.group(1))
    return out


def _kernel_name(symbol: str) -> str:
    """Unqualified name of a kernel symbol, C++ demangled: ``_ZN2ns3fooE...`` -> ``foo``."""
    if not symbol.startswith("_Z"):
        return symbol
    nested = symbol.startswith("_ZN")
    name, pos = symbol, 2 + nested
    while m := re.compile(r"L?(\d+)").match(symbol, pos):
        pos = m.end() + int(m.group(1))
        name = symbol[m.end():pos]
        if not nested:
            break
    return name


def _record(kind, kernel, arch, variant, usage=None, problem=None) -> dict:
    """One row of the check; ``problem`` is None when the kernel compiled without spills."""
    usage = usage or dict.fromkeys(_PTXAS, 0)
    if problem is None and (usage["spill_stores"] or usage["spill_loads"]):
        problem = "SPILLS"
    return dict(kind=kind, kernel=kernel, arch=arch and f"sm_{arch}", variant=variant,
                **{k: usage[k] for k in _PTXAS}, problem=problem)


def format_row(r: dict) -> str:
    """A record as a line of the table under :data:`HEADER`."""
    return (f"{r['kind']:<6} {r['kernel']:<20} {r['arch'] or '-':<5} {r['registers']:>4} "
            f"{r['spill_stores'] + r['spill_loads']:>6} {r['stack']:>5} {r['shared']:>6}  "
            f"{r['variant']}{'  ' + r['problem'] if r['problem'] else ''}")


def _worker_init():
    """Workers compile: Triton kernels must be defined as JIT functions, not interpreted."""
    os.environ.pop("TRITON_INTERPRET", None)


@contextlib.contextmanager
def _no_interpreter():
    """Inside, ``$TRITON_INTERPRET`` is unset (restored after). Spawned workers inherit the
    environment and import Triton (through the main module and torch) before their initializer
    runs: with the variable set, Triton's own ``@jit`` helpers would be defined interpreted, and
    compiling then fails (Triton 3.6: an assert in gluon's ``_standard.py``)."""
    before = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if before is not None:
            os.environ["TRITON_INTERPRET"] = before


def _triton_jobs(archs) -> tuple[list[tuple], list[dict]]:
    """(In a worker.) The ``(module, variant index, arch)`` compiles of every kernel module, and
    a failure record for each module that does not import and each ``*_kernel`` not listed."""
    import triton

    from medic_fast import kernels

    jobs, problems = [], []
    for info in pkgutil.iter_modules(kernels.__path__):
        name = f"{kernels.__name__}.{info.name}"
        try:
            module = importlib.import_module(name)
            variants = list(getattr(module, "aot_variants", list)())
        except Exception as e:  # report it as a failure of the check
            problems.append(_record("triton", info.name, None, name, problem=f"FAILED: {e}"))
            continue
        listed = {kernel.__name__ for kernel, *_ in variants}
        problems += [_record("triton", k, None, name,
                             problem=f"NOT COMPILED: {name}.aot_variants() does not list it")
                     for k, obj in sorted(vars(module).items()) if k.endswith("_kernel")
                     and isinstance(obj, triton.runtime.JITFunction) and k not in listed]
        jobs += [(name, i, arch) for i in range(len(variants)) for arch in archs]
    return jobs, problems


def _compile_triton(module_name: str, index: int, arch: int) -> list[dict]:
    """(In a worker.) Compile variant ``index`` of a kernel module for ``sm_<arch>`` with the
    flags Triton uses; pointers 16-byte aligned, as torch allocates them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    kernel, signature, constexprs, num_warps, variant = \
        list(importlib.import_module(module_name).aot_variants())[index]
    name = kernel.__name__
    try:
        target = GPUTarget("cuda", arch, 32)
        options = triton.compiler.make_backend(target).parse_options(
            {"num_warps": num_warps, "enable_fp_fusion": True})
        pointers = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]]
                    for k, v in signature.items() if v.startswith("*")}
        src = triton.compiler.ASTSource(
            fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
            constexprs=constexprs, attrs=pointers)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "k.ptx").write_text(compiled.asm["ptx"])
            log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={sm_arch_from_capability(arch)}", f"{tmp}/k.ptx",
                                  "-o", f"{tmp}/k.cubin"], capture_output=True, text=True,
                                 check=True).stderr
        (usage,) = [u for u in parse_ptxas(log) if u["entry"]]
    except Exception as e:  # report every variant, fail at the end
        detail = (getattr(e, "stderr", None) or str(e)).strip()
        if not detail:  # a bare assert in the compiler: say where it was
            frame = traceback.extract_tb(e.__traceback__)[-1]
            detail = f"at {frame.filename}:{frame.lineno}: {frame.line}"
        return [_record("triton", name, arch, variant,
                        problem=f"FAILED: {type(e).__name__}: {detail}")]
    usage["shared"] += compiled.metadata.shared  # Triton's shared memory is dynamic
    return [_record("triton", name, arch, variant, usage)]


def _compile_cuda(path: str, arch: int) -> list[dict]:
    """(In a worker.) ``nvcc -Xptxas -v`` on one ``.cu`` for ``sm_<arch>``; a record per
    function, and a failure record per ``__global__`` of the source that ptxas did not report."""
    cu = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([shutil.which("nvcc"), "-std=c++17", "-O3", f"-arch=sm_{arch}",
                               "-Xptxas", "-v", "-c", str(cu), "-I", str(cu.parent),
                               "-o", f"{tmp}/out.o"], capture_output=True, text=True)
    if proc.returncode != 0:
        return [_record("cuda", cu.stem, arch, cu.name, problem=f"FAILED: {proc.stderr}")]
    records = [_record("cuda", _kernel_name(u["symbol"]), arch, cu.name, u)
               for u in parse_ptxas(proc.stderr)]
    kernels = re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(",
                         cu.read_text())
    missing = sorted(set(kernels) - {r["kernel"] for r in records})
    return records + [_record("cuda", k, arch, cu.name, problem="NOT COMPILED: ptxas did not "
                              "report it") for k in missing]


def _triton_missing(archs) -> str | None:
    """Why the Triton part cannot run here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in archs:
            get_ptxas(arch)
    except (ImportError, RuntimeError) as e:
        return f"Triton's ptxas not available ({e}): Triton kernels not checked"
    return None


def check(kinds=KINDS, archs=ARCHS, log=print) -> list[dict]:
    """Compile every kernel of ``kinds`` for each arch of ``archs``; one record per compiled
    function (see :func:`format_row`), plus one per failure or kernel left uncompiled. ``log``
    gets the notes on skipped parts, then the table, row by row."""
    from medic_fast import _extension

    kinds = set(kinds)
    if "cuda" in kinds and not shutil.which("nvcc"):
        log("gpu_compile: nvcc not found: CUDA sources not checked")
        kinds.discard("cuda")
    if "triton" in kinds and (why := _triton_missing(archs)):
        log(f"gpu_compile: {why}")
        kinds.discard("triton")
    records, futures = [], []
    spawn = multiprocessing.get_context("spawn")
    with _no_interpreter(), ProcessPoolExecutor(os.cpu_count(), mp_context=spawn,
                                                initializer=_worker_init) as pool:
        if "cuda" in kinds:
            futures += [pool.submit(_compile_cuda, str(cu), arch) for cu in
                        sorted(_extension.source_dir().glob("*.cu")) for arch in archs]
        if "triton" in kinds:
            jobs, records = pool.submit(_triton_jobs, archs).result()
            futures += [pool.submit(_compile_triton, *job) for job in jobs]
        log(HEADER)
        for r in records:
            log(format_row(r))
        for future in futures:
            for r in future.result():
                log(format_row(r))
                records.append(r)
    return records


def summary(records: list[dict]) -> list[str]:
    """One line per kernel: compiles, most registers, spill bytes, problems."""
    lines = []
    for kind, kernel in dict.fromkeys((r["kind"], r["kernel"]) for r in records):
        rs = [r for r in records if (r["kind"], r["kernel"]) == (kind, kernel)]
        bad = sum(r["problem"] is not None for r in rs)
        lines.append(f"{kind:<6} {kernel:<20} {len(rs):>3} compiles, max "
                     f"{max(r['registers'] for r in rs):>3} registers, "
                     f"{sum(r['spill_stores'] + r['spill_loads'] for r in rs)} bytes spilled"
                     f"{f', {bad} with problems' if bad else ''}")
    return lines


def main(argv=None) -> int:
    """Run :func:`check`; print the table (on stderr when the JSON goes to stdout) and a
    summary, write the records as JSON; 1 on any problem."""
    p = argparse.ArgumentParser(prog="python tools/gpu_compile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=KINDS, action="append",
                   help="only this kind of kernel (repeatable; default: both)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the records as JSON to PATH (stdout if none)")
    args = p.parse_args(argv)
    out = sys.stderr if args.json == "-" else sys.stdout
    start = time.perf_counter()
    records = check(args.kind or KINDS, log=lambda line: print(line, file=out, flush=True))
    failed = any(r["problem"] for r in records)
    for line in summary(records):
        print(line, file=out)
    print(f"gpu_compile: {'FAILED' if failed else 'ok'}, {len(records)} records for "
          f"{', '.join(f'sm_{a}' for a in ARCHS)} in {time.perf_counter() - start:.1f} s",
          file=out)
    if args.json == "-":
        json.dump(records, sys.stdout, indent=1)
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
