"""depot: a zone's stack of full buckets -- frees that overflow a CPU's cache go
there, and allocations take them back without the keg.  One process, on a local
arena (``test_keg.py`` reads a depot's contents back)."""

from core_helpers import arena, assert_consistent
from shmalloc import M_NOWAIT


def test_overflowing_frees_go_to_the_depot_and_come_back_without_the_keg(arena):
    z = arena.zcreate("dep", 256)
    n = 4 * z.bucket_size
    hs = [z.alloc(M_NOWAIT) for _ in range(n)]
    s0 = z.stats()
    assert s0.depot_puts == 0 and s0.free_depot == 0
    z.free_bulk(hs)
    s1 = z.stats()
    assert s1.depot_puts >= 1
    assert s1.free_depot > 0
    assert s1.free_cache <= 2 * z.bucket_size
    assert s1.items == s0.items                # nothing went back to the slabs
    imports = arena.cpu_stats()[0].keg_imports
    hs = [z.alloc(M_NOWAIT) for _ in range(n)]
    s2 = z.stats()
    assert s2.depot_gets > s1.depot_gets
    assert s2.free_depot < s1.free_depot
    assert arena.cpu_stats()[0].keg_imports == imports    # no import from the keg
    assert s2.items == s0.items and s2.pages == s0.pages
    assert_consistent(arena, z)
