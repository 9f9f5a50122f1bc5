"""vm: the arena's pages -- running out of them (the allocation fails and counts a
failure), and every page coming back once everything is freed and reclaimed.  One
process, on a local arena."""

from core_helpers import MiB, arena, assert_consistent, assert_disjoint
from shmalloc import M_NOWAIT, Arena


def test_alloc_until_the_arena_is_full_returns_none_and_counts_failures():
    with Arena.create_local(size=2 * MiB, bare=True) as a:
        z = a.zcreate("big", 2048)
        slabs = a.free_pages // z.keg.ppera
        hs = []
        while (h := z.alloc(M_NOWAIT)) is not None:
            hs.append(h)
            assert len(hs) <= slabs * z.keg.ipers, "more items than the arena holds"
        assert len(hs) == slabs * z.keg.ipers
        assert z.alloc(M_NOWAIT) is None
        s = z.stats()
        assert s.failures == 2
        assert s.used == len(hs) and s.requests == len(hs)
        assert_disjoint(z, hs)
        assert_consistent(a, z)
        z.free_bulk(hs)
        assert z.stats().used == 0
        assert_consistent(a, z)


def test_reclaim_gives_every_page_back_once_everything_is_freed(arena):
    z = arena.zcreate("a", 2048)
    y = arena.zcreate("b", 100)
    initial = arena.free_pages
    hs = [z.alloc(M_NOWAIT) for _ in range(200)]
    ys = [y.alloc(M_NOWAIT) for _ in range(500)]
    assert arena.free_pages < initial
    z.free_bulk(hs)
    y.free_bulk(ys)
    released = arena.reclaim()
    assert released >= -(-200 // z.keg.ipers) + -(-500 // y.keg.ipers)
    assert arena.free_pages == initial
    for zz in (z, y):
        s = zz.stats()
        assert (s.items, s.pages, s.free_cache, s.free_depot) == (0, 0, 0, 0)
    assert_consistent(arena, z, y)
