"""The KV blocks: chained prefix hashes, reservations, reference counts and LRU eviction."""

import pytest

from inference.runtime.engine.block_pool import BlockPool, block_hashes


def test_hashes_chain_over_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the partial third block has no hash
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert b[0] != a[0] and b[1] != a[1]  # the same second block after a different first: a different hash
    assert block_hashes([5, 6, 7, 8], 4, parent=a[0]) == a[1:]


def test_admission_reserves_and_release_returns_everything():
    pool = BlockPool(6, 4)
    assert pool.can_admit([], 6) and not pool.can_admit([], 7)
    pool.admit([], 4)
    assert pool.available() == 2 and not pool.can_admit([], 3)
    table = [pool.allocate() for _ in range(3)]
    assert pool.used() == 3 and pool.available() == 2
    pool.release(table, unused_reservation=1)
    assert pool.available() == 6 and pool.used() == 0 and pool.reserved == 0
    with pytest.raises(AssertionError):
        pool.allocate()  # without a reservation


def test_cached_blocks_are_reused_and_evicted_least_recently_released_first():
    pool = BlockPool(4, 2)
    hashes = block_hashes([1, 2, 3, 4, 5, 6], 2)
    pool.admit([], 3)
    table = [pool.allocate() for _ in range(3)]
    for block, h in zip(table, hashes):
        pool.register(block, h)
    pool.release(table, 0)
    assert len(pool.cached) == 3 and pool.lookup(hashes) == table
    assert pool.lookup(block_hashes([1, 2, 9, 9], 2)) == table[:1]  # the longest cached prefix
    # a second sequence reuses the first two blocks: they are held, so never evicted
    pool.admit(table[:2], 2)
    assert pool.refs[table[0]] == 1 and table[0] not in pool.cached
    fresh = [pool.allocate(), pool.allocate()]  # the free block first, then the least recently released
    assert table[2] in fresh and pool.lookup(hashes) == table[:2]
    assert pool.available() == 0 and not pool.can_admit([], 1)


def test_a_block_registered_twice_keeps_its_first_name():
    pool = BlockPool(3, 2)
    [h] = block_hashes([7, 7], 2)
    pool.admit([], 2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, h)
    pool.register(b, h)  # a second sequence computed the same block: it stays unnamed
    assert pool.lookup([h]) == [a] and b not in pool.hash_of
    pool.release([a, b], 0)
    assert b in pool.free and a in pool.cached
