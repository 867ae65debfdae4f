"""Block pool bookkeeping: property tests over long random operation sequences, and unit cases."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from constant_state.cache.block_pool import BlockManager, BlockPool, KVCacheFullError, SeqBlocks


def _check(mgr: BlockManager, seqs: list[SeqBlocks]) -> None:
    pool = mgr.pool
    pool.check()
    # Every ref count equals the number of table entries pointing at the block.
    counts = [0] * pool.num_blocks
    for s in seqs:
        for b in s.blocks:
            counts[b] += 1
        assert len(s.blocks) == -(-s.num_tokens // pool.block_size)
    assert counts == pool.ref


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 5), st.integers(4, 40))
def test_random_operations_never_leak_or_corrupt(seed, log_bs, num_blocks):
    rng = random.Random(seed)
    bs = 2 ** (log_bs - 1)
    mgr = BlockManager(BlockPool(num_blocks, bs))
    seqs: list[SeqBlocks] = []
    for _ in range(300):
        op = rng.choice(["new", "append", "append", "fork", "free", "copy"])
        if op == "new" or not seqs:
            seqs.append(SeqBlocks())
        elif op == "append":
            s = rng.choice(seqs)
            before = (list(s.blocks), s.num_tokens, list(mgr.pool.ref))
            try:
                mgr.reserve([s], rng.randint(1, 3 * bs))
            except KVCacheFullError:
                assert (s.blocks, s.num_tokens, mgr.pool.ref) == before  # untouched
        elif op == "fork":
            seqs.append(mgr.fork(rng.choice(seqs)))
        elif op == "copy":
            try:
                s, _ = mgr.copy(rng.choice(seqs))
                seqs.append(s)
            except KVCacheFullError:
                pass
        else:
            mgr.free(seqs.pop(rng.randrange(len(seqs))))
        _check(mgr, seqs)
    for s in seqs:
        mgr.free(s)
    assert mgr.pool.num_free == num_blocks
    mgr.pool.check()


def test_copy_on_write_only_for_shared_partial_block():
    mgr = BlockManager(BlockPool(8, 4))
    a = SeqBlocks()
    mgr.reserve([a], 6)  # 2 blocks, the second half full
    b = mgr.fork(a)
    copies, writes = mgr.reserve([b], 1)
    assert len(copies) == 1 and copies[0][0] == a.blocks[1] and b.blocks[1] == copies[0][1]
    assert b.blocks[0] == a.blocks[0]  # full block still shared
    assert mgr.pool.ref[a.blocks[0]] == 2 and mgr.pool.ref[a.blocks[1]] == 1
    copies, _ = mgr.reserve([a], 1)  # a's last block is no longer shared: no copy
    assert copies == []


def test_full_pool_raises_and_leaves_others_untouched():
    mgr = BlockManager(BlockPool(3, 4))
    a, b = SeqBlocks(), SeqBlocks()
    mgr.reserve([a], 8)
    snapshot = (list(a.blocks), a.num_tokens)
    with pytest.raises(KVCacheFullError, match="num_blocks=3"):
        mgr.reserve([a, b], 5)  # needs 1 + 2 blocks, 1 free
    assert (a.blocks, a.num_tokens) == snapshot and b.blocks == [] and mgr.pool.num_free == 1


def test_double_free_is_caught():
    pool = BlockPool(2, 4)
    (b,) = pool.allocate(1)
    pool.decref(b)
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref(b)


def test_prefix_sharing_reuses_full_blocks_and_survives_free():
    mgr = BlockManager(BlockPool(16, 4))
    tokens = list(range(11))
    a = SeqBlocks()
    mgr.reserve([a], len(tokens))
    mgr.register_prefix(a, tokens)  # 2 full blocks indexed
    b = SeqBlocks()
    assert mgr.match_prefix(b, tokens[:9] + [99, 98], max_tokens=10) == 8
    assert b.blocks == a.blocks[:2] and mgr.pool.ref[a.blocks[0]] == 2
    mgr.free(a)
    mgr.free(b)
    # Freed blocks keep their hash until reused: a later sequence still hits them.
    c = SeqBlocks()
    assert mgr.match_prefix(c, tokens, max_tokens=10) == 8
    # A different first block breaks the chain.
    d = SeqBlocks()
    assert mgr.match_prefix(d, [7] + tokens[1:], max_tokens=10) == 0
    mgr.pool.check()
