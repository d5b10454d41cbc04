"""Build the C++ extension ahead of time: ``python -m medic_fast.build``.

``--check-cuda`` also compiles every ``csrc/*.cu`` with the machine's ``nvcc`` for sm_80 and sm_90
(``-Xptxas -v``) and fails on a compile error or a register spill; it works without a GPU and
without a CUDA build of PyTorch, because the ``.cu`` files include no PyTorch headers.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile

from medic_fast import _extension

ARCHS = ("sm_80", "sm_90")


def check_cuda(archs=ARCHS, verbose: bool = True) -> list[dict]:
    """Compile each ``.cu`` for each arch; return one record per (file, arch, kernel).

    Raises ``RuntimeError`` on a compile error or a spill. Returns ``[]`` when there is no nvcc.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    records = []
    for cu in sorted(_extension.source_dir().glob("*.cu")):
        for arch in archs:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-c",
                       str(cu), "-I", str(_extension.source_dir()), "-o", f"{tmp}/out.o"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {cu.name} for {arch}:\n{proc.stderr}")
            for rec in _parse_ptxas(proc.stderr):
                rec.update(file=cu.name, arch=arch)
                records.append(rec)
                if verbose:
                    print(f"{cu.name:28s} {arch}  {rec['kernel'][:48]:48s} regs={rec['registers']:3d} "
                          f"spill_stores={rec['spill_stores']} spill_loads={rec['spill_loads']} "
                          f"smem={rec['shared']}")
    spills = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    if spills:
        raise RuntimeError(f"register spills in: {[(r['file'], r['arch'], r['kernel']) for r in spills]}")
    return records


def _parse_ptxas(text: str) -> list[dict]:
    """Read kernel name, registers, spills and shared memory from ``ptxas -v`` output."""
    out, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = {"kernel": m.group(1), "registers": 0, "spill_stores": 0, "spill_loads": 0, "shared": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["shared"] = int(m.group(1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medic_fast.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    p.add_argument("--check-cuda", action="store_true",
                   help="also compile csrc/*.cu with nvcc for sm_80 and sm_90 and fail on spills")
    args = p.parse_args(argv)
    try:
        path = _extension.load(verbose=args.verbose)
    except _extension.ExtensionUnavailable as e:
        print(f"medic_fast: {e}", file=sys.stderr)
        return 1
    print(f"medic_fast: extension ready at {path}")
    if args.check_cuda:
        if shutil.which("nvcc") is None:
            print("medic_fast: nvcc not found; CUDA sources not checked")
            return 0
        try:
            recs = check_cuda()
        except RuntimeError as e:
            print(f"medic_fast: {e}", file=sys.stderr)
            return 1
        print(f"medic_fast: {len(recs)} CUDA kernels compiled for {', '.join(ARCHS)}, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
