"""Compile every Triton kernel of ``medic_fast.kernels`` ahead of time for sm_80 and sm_90.

``python -m medic_fast.kernels.aot`` needs no GPU: each kernel module lists the specialisations
it launches (``aot_variants()``); each is compiled to cubin with ``triton.compile`` for
``GPUTarget("cuda", 80 | 90, 32)``, and its registers and spills are read by running Triton's own
``ptxas -v`` on the generated PTX (the system ``ptxas`` may be older than Triton's PTX version).
Compiles in parallel (one process per CPU), prints one line per (kernel, arch, variant) and exits
non-zero on a failure, a spill, or a ``*_kernel`` of a module that no variant covers.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (80, 90)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill + stack bytes)`` that ``ptxas -v`` reports for ``ptx`` (one kernel),
    with the flags Triton compiles with (the counts match the cubin Triton builds)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    return regs, spills + stack


def _compile(kernel, signature, constexprs, num_warps, arch):
    """``triton.compile`` for ``sm_<arch>``; pointers 16-byte aligned, as torch allocates them."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "enable_fp_fusion": True})
    pointers = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]]
                for k, v in signature.items() if v.startswith("*")}
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                    attrs=pointers)
    return triton.compile(src, target=target, options=options.__dict__)


def _report(module_name: str, index: int, arch: int) -> tuple[str, bool]:
    """Compile variant ``index`` of a kernel module for ``arch``: its table line, and whether it
    failed or spilled."""
    module = importlib.import_module(module_name)
    kernel, signature, constexprs, num_warps, variant = list(module.aot_variants())[index]
    name = f"{kernel.__name__:<18} sm_{arch:<3}"
    try:
        compiled = _compile(kernel, signature, constexprs, num_warps, arch)
        regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    except Exception as e:  # report every variant, fail at the end
        return f"{name} FAILED  {variant}: {e}", True
    return (f"{name} {regs:>4} {spills:>6} {compiled.metadata.shared:>6}  {variant}"
            f"{'  SPILLS' if spills else ''}"), spills > 0


def main() -> int:
    if os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: TRITON_INTERPRET was set; unset it for this process (it compiles, it does not "
              "interpret)", file=sys.stderr)
    import triton

    from medic_fast import kernels

    start = time.perf_counter()
    failed = False
    jobs = []
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name == Path(__file__).stem:
            continue
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        variants = list(module.aot_variants())
        uncovered = {name for name, obj in vars(module).items()
                     if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
        uncovered -= {kernel.__name__ for kernel, *_ in variants}
        for name in sorted(uncovered):
            print(f"{name:<18} not compiled: {module.__name__}.aot_variants() does not list it")
            failed = True
        jobs += [(module.__name__, i, arch) for i in range(len(variants)) for arch in ARCHS]

    print(f"{'kernel':<18} {'arch':<6} {'regs':>4} {'spills':>6} {'shared':>6}  variant")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(os.cpu_count(), mp_context=spawn) as pool:
        for line, bad in pool.map(_report, *zip(*jobs)):
            print(line, flush=True)
            failed |= bad
    print(f"aot: {'FAILED' if failed else 'ok'}, {len(jobs)} compiles in "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
