"""The one GPU compile check (``python tools/gpu_compile.py``) and its ptxas parser.

The check runs for real (no GPU needed) in a subprocess: every Triton kernel variant and every
CUDA kernel compiles for sm_80 and sm_90 without spills. The parser is tested on ``ptxas -v``
output captured from ``nvcc -Xptxas -v`` (nvcc 13.0) and from Triton's own ptxas.
"""
import json
import os
import shutil
import subprocess
import sys

import gpu_compile  # tools/, on sys.path through pyproject.toml's pythonpath
import pytest

ARCHS = ["sm_80", "sm_90"]
NO_NVCC = "nvcc is not installed: the CUDA sources cannot be compiled here"
NO_TRITON = gpu_compile._triton_missing((80, 90))  # why Triton's ptxas cannot run, or None

# nvcc -std=c++17 -O3 -arch=sm_80 -Xptxas -v -c csrc/pocket_search.cu (long lines wrapped by "\")
NVCC_POCKET = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN10medic_fast6pocket18step_update_kernelEPKfS2_P\
KaPKlS6_PfPlS7_PaS8_illNS0_8StepCoefE' for 'sm_80'
ptxas info    : Function properties for _ZN10medic_fast6pocket18step_update_kernelEPKfS2_PKa\
PKlS6_PfPlS7_PaS8_illNS0_8StepCoefE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 0 barriers, 468 bytes cmem[0]
ptxas info    : Compile time = 17.000 ms
ptxas info    : Compiling entry function '_ZN10medic_fast6pocket18step_logits_kernelEPKfS2_P\
KlS4_S4_PfPaiilfff' for 'sm_80'
ptxas info    : Function properties for _ZN10medic_fast6pocket18step_logits_kernelEPKfS2_PKl\
S4_S4_PfPaiilfff
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 436 bytes cmem[0]
ptxas info    : Compile time = 32.691 ms
ptxas info    : Compiling entry function '_ZN10medic_fast6pocket17mlp_search_kernelENS0_9Mlp\
ParamsEPKfPKlS5_PfPaPlilfffNS0_8StepCoefE' for 'sm_80'
ptxas info    : Function properties for _ZN10medic_fast6pocket17mlp_search_kernelENS0_9MlpPa\
ramsEPKfPKlS5_PfPaPlilfffNS0_8StepCoefE
    144 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 144 bytes cumulative stack size, 680 byt\
es cmem[0], 8 bytes cmem[2]
ptxas info    : Compile time = 92.761 ms
"""
# nvcc -O3 -arch=sm_80 -Xptxas -v: two kernels, then a __noinline__ device function
NVCC_DEVICE_FUNCTION = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z13second_kernelPKfPf' for 'sm_80'
ptxas info    : Function properties for _Z13second_kernelPKfPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 368 bytes cmem[0]
ptxas info    : Compile time = 2.208 ms
ptxas info    : Compiling entry function '_Z12first_kernelPKfPfi' for 'sm_80'
ptxas info    : Function properties for _Z12first_kernelPKfPfi
    128 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 128 bytes cumulative stack size, 372 byt\
es cmem[0]
ptxas info    : Compile time = 13.588 ms
ptxas info    : Function properties for _Z6helperPKfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
# nvcc -O3 -arch=sm_90 -Xptxas -v: a kernel that spills and has static shared memory
NVCC_SPILLS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z12heavy_kernelPKfPf' for 'sm_90'
ptxas info    : Function properties for _Z12heavy_kernelPKfPf
    592 bytes stack frame, 764 bytes spill stores, 1008 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 592 bytes cumulative stack size, 1024 by\
tes smem
ptxas info    : Compile time = 45.501 ms
"""
# Triton's ptxas -v --regAllocOptLevel=2 --gpu-name=sm_90a on the PTX of _partials_kernel
TRITON_PARTIALS = """\
ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function '_partials_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _partials_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 122 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 62.176 ms
"""


def _usage(rec):
    return (rec["registers"], rec["spill_stores"], rec["spill_loads"], rec["stack"], rec["shared"])


def test_parse_nvcc_output():
    recs = gpu_compile.parse_ptxas(NVCC_POCKET)
    assert [gpu_compile._kernel_name(r["symbol"]) for r in recs] == [
        "step_update_kernel", "step_logits_kernel", "mlp_search_kernel"]
    assert all(r["entry"] for r in recs)
    assert [_usage(r) for r in recs] == [(48, 0, 0, 0, 0), (40, 0, 0, 0, 0), (48, 0, 0, 144, 0)]


def test_parse_nvcc_spills_and_device_function():
    (heavy,) = gpu_compile.parse_ptxas(NVCC_SPILLS)
    assert _usage(heavy) == (32, 764, 1008, 592, 1024)
    assert gpu_compile._record("cuda", "heavy_kernel", 90, "x.cu", heavy)["problem"] == "SPILLS"
    recs = gpu_compile.parse_ptxas(NVCC_DEVICE_FUNCTION)
    assert [(gpu_compile._kernel_name(r["symbol"]), r["entry"]) for r in recs] == [
        ("second_kernel", True), ("first_kernel", True), ("helper", False)]
    # The device function's properties, listed last, are its own, not the last kernel's.
    assert [_usage(r) for r in recs] == [(10, 0, 0, 0, 0), (40, 0, 0, 128, 0), (0, 0, 0, 0, 0)]


def test_parse_triton_ptxas_output():
    (rec,) = gpu_compile.parse_ptxas(TRITON_PARTIALS)
    assert rec["symbol"] == "_partials_kernel" and rec["entry"]
    assert _usage(rec) == (122, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """Run ``python tools/gpu_compile.py --json PATH`` once: (returncode, output,
    records). In this process's environment (``TRITON_INTERPRET=1`` where there is no GPU: the
    check must compile all the same), with an empty Triton cache, so that every kernel really
    compiles (a cached kernel skips Triton's front end)."""
    path = tmp_path_factory.mktemp("gpu") / "records.json"
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")))
    proc = subprocess.run([sys.executable, gpu_compile.__file__, "--json", str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr, json.loads(path.read_text())


def _assert_clean(check, kind, expected):
    """Every record of ``kind`` compiled without spills; every expected kernel for both arches."""
    rc, output, records = check
    assert rc == 0, output
    recs = [r for r in records if r["kind"] == kind]
    assert all(r["problem"] is None and r["spill_stores"] == r["spill_loads"] == 0 for r in recs)
    assert {(r["kernel"], r["arch"]) for r in recs} >= {(k, a) for k in expected for a in ARCHS}


@pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))
def test_check_gpu_triton_kernels(check):
    from medic_fast.kernels import importance_clone as ic

    kernels = [n for n in vars(ic) if n.endswith("_kernel")]
    assert len(kernels) == 4
    _assert_clean(check, "triton", kernels)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NO_NVCC)
def test_check_gpu_cuda_kernels(check):
    _assert_clean(check, "cuda", ["mlp_search_kernel", "step_logits_kernel", "step_update_kernel"])
