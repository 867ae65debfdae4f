"""Launch heuristics of the decode kernels: occupancy and the split count over the context (pure Python)."""

from types import SimpleNamespace

import pytest

from constant_state.kernels.paged_attention.decode import SPLIT_OVERHEAD_TILES, programs_per_sm, wave_splits


@pytest.mark.parametrize("n_regs, shared, warps, expected", [
    (168, 37_000, 4, 3),    # fp8 on the H200: registers (5376 per warp -> 12 warps) allow 3
    (231, 9_000, 2, 4),     # int4: 231 -> 232 per thread, 7424 per warp -> 8 warps
    (64, 100_000, 4, 2),    # shared memory: 228 KiB / (100 KB + 1 KiB)
    (32, 1_000, 8, 8),      # threads: 2048 / 256
    (16, 0, 1, 32),         # at most 32 resident blocks
])
def test_programs_per_sm(n_regs, shared, warps, expected):
    assert programs_per_sm(n_regs, shared, warps) == expected


def test_programs_per_sm_reads_device_properties():
    props = SimpleNamespace(regs_per_multiprocessor=32768, shared_memory_per_multiprocessor=10**6,
                            max_threads_per_multi_processor=1536)
    assert programs_per_sm(168, 0, 4, props) == 1  # 32768 // 5376 = 6 warps
    props.regs_per_multiprocessor = 65536
    assert programs_per_sm(32, 0, 4, props) == 12  # 1536 threads / 128


def _cost(work, n_tiles, slots, s):
    chunk = -(-n_tiles // s)
    return -(-work * s // slots) * (chunk + SPLIT_OVERHEAD_TILES)


@pytest.mark.parametrize("work, n_tiles, slots, expected", [
    (256, 512, 528, 2),   # int4, batch 32 / 32k on the H200: 2 splits 587 us, 3: 684, 5: 649 (measured)
    (256, 256, 396, 3),   # fp8: 3 programs per SM; 3 splits = 1.94 waves
    (528, 512, 528, 1),   # the batch alone fills one wave
    (1056, 512, 528, 1),  # two whole waves without splitting
])
def test_wave_splits_known_cases(work, n_tiles, slots, expected):
    assert wave_splits(work, n_tiles, slots) == expected


@pytest.mark.parametrize("work", [1, 8, 64, 200, 256, 1000])
@pytest.mark.parametrize("n_tiles", [1, 7, 64, 512, 2048])
@pytest.mark.parametrize("slots", [132, 396, 528])
def test_wave_splits_is_the_cheapest_count(work, n_tiles, slots):
    s = wave_splits(work, n_tiles, slots)
    assert 1 <= s <= n_tiles
    best = min(_cost(work, n_tiles, slots, c) for c in range(1, min(n_tiles, 1024) + 1))
    assert _cost(work, n_tiles, slots, s) == best
    # and no smaller count is as cheap
    assert all(_cost(work, n_tiles, slots, c) > best for c in range(1, s))
    if work * n_tiles <= slots:  # everything fits one wave: one tile per program
        assert -(-n_tiles // s) == 1


@pytest.mark.parametrize("work, n_tiles, expected", [
    (256, 2048, 6),   # batch 32 / 32k: one wave of 1536 warps (37 splits in 6 waves: fp8 534 -> 513 us)
    (64, 2048, 24),   # batch 8 / 32k
    (64, 8192, 24),   # batch 8 / 128k (74 splits: int4 413 -> 373 us)
    (8, 256, 128),    # batch 1 / 4k: two tiles per split
])
def test_cuda_kernel_split_count(work, n_tiles, expected):
    """The CUDA decode kernel's splits (cuda_decode.SPLIT_OVERHEAD_TILES per split) at the benchmark's
    H200 shapes, 1584 warp slots (132 SMs x 3 blocks x 4 warps)."""
    from constant_state.kernels.paged_attention import cuda_decode

    assert wave_splits(work, n_tiles, 1584, cuda_decode.SPLIT_OVERHEAD_TILES) == expected
    assert wave_splits(work, n_tiles, 1584, cuda_decode.SPLIT_OVERHEAD_TILES) <= wave_splits(work, n_tiles, 1584)
