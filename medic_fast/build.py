"""Build the C++ extension ahead of time: ``python -m medic_fast.build``.

``--check-gpu`` instead compiles every GPU kernel for sm_80 and sm_90: the Triton kernels of
``medic_fast.kernels`` (each variant that ``aot_variants()`` lists) and ``csrc/*.cu`` (with the
machine's ``nvcc``). It prints one table (registers, spills, stack frame, shared memory) and exits
non-zero on a compile failure, a spill, or a kernel no variant covers. It needs no GPU and no CUDA
build of PyTorch (the ``.cu`` files include no PyTorch headers); a part whose compiler is missing
is skipped, with a note. ``python -m medic_fast.kernels.aot`` is ``--check-gpu --kind triton``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from medic_fast import _extension, gpu_compile


def check_gpu(kinds=gpu_compile.KINDS, json_path: str | None = None) -> int:
    """Run :func:`medic_fast.gpu_compile.check`; print the table (on stderr when the JSON goes to
    stdout) and a summary, write the records as JSON; 1 on any problem."""
    out = sys.stderr if json_path == "-" else sys.stdout
    start = time.perf_counter()
    records = gpu_compile.check(kinds, log=lambda line: print(line, file=out, flush=True))
    failed = any(r["problem"] for r in records)
    for line in gpu_compile.summary(records):
        print(line, file=out)
    print(f"check-gpu: {'FAILED' if failed else 'ok'}, {len(records)} records for "
          f"{', '.join(f'sm_{a}' for a in gpu_compile.ARCHS)} in "
          f"{time.perf_counter() - start:.1f} s", file=out)
    if json_path == "-":
        json.dump(records, sys.stdout, indent=1)
    elif json_path:
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medic_fast.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    p.add_argument("--check-gpu", action="store_true",
                   help="compile every Triton and CUDA kernel for sm_80 and sm_90, fail on spills")
    p.add_argument("--kind", choices=gpu_compile.KINDS, action="append",
                   help="with --check-gpu: only this kind of kernel (repeatable)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="with --check-gpu: write the records as JSON to PATH (stdout if none)")
    args = p.parse_args(argv)
    if (args.kind or args.json) and not args.check_gpu:
        p.error("--kind and --json go with --check-gpu")
    if args.check_gpu:
        return check_gpu(args.kind or gpu_compile.KINDS, args.json)
    try:
        path = _extension.load(verbose=args.verbose)
    except _extension.ExtensionUnavailable as e:
        print(f"medic_fast: {e}", file=sys.stderr)
        return 1
    print(f"medic_fast: extension ready at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
