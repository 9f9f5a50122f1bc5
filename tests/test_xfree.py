"""xfree: frees by a CPU that is not an item's home -- counted as cross-CPU frees,
and batches of them sent home never again once the keg manager took them for a
sleeper.  One process, on a local arena."""

import pytest

from core_helpers import arena, assert_consistent
from shmalloc import M_NOWAIT, DoubleFreeError


def test_item_freed_by_another_cpu_counts_as_xfree(arena):
    b = arena.attach_local()
    try:
        assert b.cpu_id != arena.cpu_id
        za = arena.zcreate("x", 256)
        zb = b.zone("x")
        hs = [za.alloc(M_NOWAIT) for _ in range(3)]
        zb.free(hs[0])
        zb.free_bulk(hs[1:])
        s = zb.stats()
        assert s.xfree == 3 and s.used == 0
        (cb,) = [c for c in arena.cpu_stats() if c.cpu == b.cpu_id]
        assert cb.xfrees == 3 and cb.frees == 3
        arena.check()
        b.check()
        # the other CPU's double free is still a double free
        with pytest.raises(DoubleFreeError):
            za.free(hs[0])
        b.check()
    finally:
        b.close()
    arena.check()


def test_remote_free_batches_taken_for_a_sleeper_are_never_sent_home(arena):
    z = arena.zcreate("homed", 256, xfree="message", bucket_size=8)
    b = arena.attach_local()
    try:
        zb = b.zone("homed")
        mine = [z.alloc(M_NOWAIT) for _ in range(3)]
        arena.send(b.cpu_id, mine)
        got = b.recv(timeout=1)
        for h in got:
            zb.free(h)                                # batched in B, homed at A
        assert sum(len(x[0]) for x in zb._cache.xbatches.values()) == 3
        assert z._cache.take_cache_of(b.cpu_id) == 3  # what the keg manager does
        b.poll()                                      # B sends its batches: none left
        assert not zb._cache.xbatches and zb._cache.msgs_sent == 0
        assert sorted(z._cache.items[-3:]) == sorted(mine)
        zb._cache.publish()
        assert_consistent(arena, z)
        arena.check(level=2)
    finally:
        b.close()
    arena.check()
