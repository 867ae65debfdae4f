"""benchmarks/offline_sass.py: the quantized decode kernel compiles for sm_90 without a GPU and its
main loop is found (a development tool; kept working by this test)."""

import subprocess
import sys
from pathlib import Path

import pytest


def test_offline_sass_reports_the_main_loop():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "benchmarks/offline_sass.py", "--kind", "int4", "--config", "64,2,3"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "main loop:" in proc.stdout and "warp instructions per token" in proc.stdout, proc.stdout
    n = int(proc.stdout.split("main loop: ")[1].split()[0])
    assert n > 100, proc.stdout


def test_offline_sass_cuda_kernel_loop():
    """--cuda: the CUDA decode kernel (nvcc) and its main loop's instructions per token."""
    from constant_state.kernels.paged_attention import cuda_decode

    pytest.importorskip("triton")
    if cuda_decode._nvcc() is None:
        pytest.skip("nvcc not installed")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "benchmarks/offline_sass.py", "--cuda", "--kind", "kivi2"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("main loop:"))
    assert "(40 HMMA)" in line and float(line.split("= ")[1].split()[0]) > 5, proc.stdout


def test_stream_probe_compiles_for_sm90(tmp_path):
    """benchmarks/csrc/stream_probe.cu (the streaming ceiling probe run on the H200) builds with nvcc, TMA
    and mbarrier PTX included."""
    from constant_state.kernels.paged_attention import cuda_decode

    nvcc = cuda_decode._nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "probe.cubin"
    proc = subprocess.run([nvcc, "-O3", "-std=c++17", "-cubin", "-gencode=arch=compute_90,code=sm_90", "-DSTAGES=4",
                           str(root / "benchmarks" / "csrc" / "stream_probe.cu"), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 0


@pytest.mark.parametrize("define", ["CS_TIMELINE", "CS_COMPUTE_ONLY", "CS_LOADS_ONLY"])
def test_decode_diagnostic_builds_compile_for_sm90(tmp_path, define):
    """The decode kernel's diagnostic builds (benchmarks/warp_timeline.py, ab_quant_decode.py's `nomem` and `loads`)
    compile for sm_90 as the H200 runs them."""
    from constant_state.kernels.paged_attention import cuda_decode

    if cuda_decode._nvcc() is None:
        pytest.skip("nvcc not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONSTANT_STATE_CACHE", str(tmp_path))
        out = cuda_decode.build("90", defines=(define,))
    assert out.stat().st_size > 0
