"""``python -m medic_fast.kernels.aot``: the Triton part of ``python -m medic_fast.build
--check-gpu`` (every kernel variant compiled for sm_80 and sm_90, no GPU needed)."""
import sys

from medic_fast import build

if __name__ == "__main__":
    sys.exit(build.main(["--check-gpu", "--kind", "triton", *sys.argv[1:]]))
