"""Build the C++ extension ahead of time: ``python -m medic_fast.build``.

It is otherwise built on first use (once, cached). The GPU compile check of every kernel for
sm_80 and sm_90 is ``python tools/gpu_compile.py`` in a checkout (DESIGN.md §4).
"""
from __future__ import annotations

import argparse
import sys

from medic_fast import _extension


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medic_fast.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = p.parse_args(argv)
    try:
        path = _extension.load(verbose=args.verbose)
    except _extension.ExtensionUnavailable as e:
        print(f"medic_fast: {e}", file=sys.stderr)
        return 1
    print(f"medic_fast: extension ready at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
