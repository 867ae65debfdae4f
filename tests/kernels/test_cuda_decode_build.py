"""The CUDA quantized decode kernels on a machine without a GPU: it compiles (nvcc), its parameter block
matches the ctypes mirror, and the dispatch falls back or errors clearly. Its numerics: on the CPU
under the warp emulation (test_cuda_decode_emulated.py) and on the GPU
(tests/gpu/test_paged_attention_gpu.py: test_cuda_decode, test_decode[...:cuda])."""

import ctypes

import pytest
import torch

from constant_state.kernels.paged_attention import cuda_decode


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    nvcc = cuda_decode._nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    with pytest.MonkeyPatch.context() as mp:  # the user's own cache setting comes back afterwards
        mp.setenv("CONSTANT_STATE_CACHE", str(tmp_path_factory.mktemp("cuda_cache")))
        return cuda_decode.build("90", nvcc)


def test_builds_and_parameter_layout_matches(library):
    lib = ctypes.CDLL(str(library))
    assert lib.cs_decode_params_size() == ctypes.sizeof(cuda_decode._Params)
    for name in ("cs_decode", "cs_decode_occupancy"):
        assert hasattr(lib, name)


def test_build_is_cached_and_atomic(library, monkeypatch):
    monkeypatch.setenv("CONSTANT_STATE_CACHE", str(library.parent))
    mtime = library.stat().st_mtime_ns
    assert cuda_decode.build("90") == library and library.stat().st_mtime_ns == mtime  # no rebuild
    assert not [p for p in library.parent.iterdir() if p.is_dir()]  # no temporary left behind


def test_build_error_names_the_compiler_output(tmp_path, monkeypatch):
    if cuda_decode._nvcc() is None:
        pytest.skip("nvcc not installed")
    monkeypatch.setenv("CONSTANT_STATE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvcc failed on paged_decode.cu"):
        cuda_decode.build("nope")  # no such architecture


def test_cpu_tensors_are_not_served():
    q = torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16)
    k = torch.zeros(4, 16, 2, 128, dtype=torch.uint8)
    assert not cuda_decode.supports("fp8", 128, q, (k, k, None, None, None, None), 2)


def test_backend_cuda_without_the_kernel_is_a_clear_error(monkeypatch):
    from constant_state.cache.formats import get_format
    from constant_state.kernels.paged_attention import decode

    monkeypatch.setattr(decode, "_INTERPRET", False)
    monkeypatch.setattr(decode, "DECODE_BACKEND", "cuda")
    st = get_format("int8").make_storage(4, 16, 2, 128, "cpu")
    q = torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16)
    bt = torch.arange(4, dtype=torch.int32)[None]
    with pytest.raises(ValueError, match="CONSTANT_STATE_DECODE=cuda"):
        decode.paged_attention(q, st.cache, bt, torch.tensor([5], dtype=torch.int32), 0.1)
