"""zcreate: making zones -- what is refused (a slab larger than the arena, no room
for a depot) and leaves nothing behind, and secondary zones on a master's keg.  One
process, on a local arena."""

import pytest

from core_helpers import MiB, arena, assert_consistent
from shmalloc import M_NOWAIT, Arena, ForeignHandleError, ZoneError
from shmalloc import layout


def test_a_zone_whose_slab_exceeds_the_arena_is_refused(arena):
    with pytest.raises(ZoneError):
        arena.zcreate("huge", 16 * MiB)
    assert arena.zones() == []
    z = arena.zcreate("fine", 256)
    assert z.alloc(M_NOWAIT) is not None
    assert_consistent(arena, z)


def test_zcreate_without_room_for_a_depot_leaves_no_keg_behind():
    with Arena.create_local(size=1 * MiB, bare=True) as a:
        z = a.zcreate("z", 3000)
        hs = []
        while (h := z.alloc(M_NOWAIT)) is not None:
            hs.append(h)
        if a.free_pages > 3:                    # what no slab can use: taken, but 3 pages
            with a._core.lock(layout.VM_LOCK):
                a._core.vm.alloc_run(a.free_pages - 3, layout.VM_INTERNAL_KEG)
        assert a.free_pages < 4                 # a depot needs 4 pages
        with pytest.raises(ZoneError):
            a.zcreate("y", 64)
        assert a.zones() == ["z"]
        a.check()
        assert [s.name for s in a.lock_stats() if s.name.startswith("keg:")] == ["keg:z"]


# ============================================================================ secondary zones
def test_secondary_zone_takes_its_items_from_the_masters_keg(arena):
    z = arena.zcreate("master", 256)
    s = arena.zsecond_create("second", z)
    assert s.keg.id == z.keg.id and s.size == z.size
    h = s.alloc(M_NOWAIT)
    assert z.keg.slab_of(h) >= 0
    assert z.stats().pages > 0                       # the slab is the master's
    st = s.stats()
    assert st.secondary and st.pages == 0 and st.free_keg == 0 and st.used == 1
    assert_consistent(arena, z, s)


def test_secondary_zone_items_are_foreign_to_the_master_and_back(arena):
    z = arena.zcreate("master", 256)
    s = arena.zsecond_create("second", z)
    hz, hs = z.alloc(M_NOWAIT), s.alloc(M_NOWAIT)
    with pytest.raises(ForeignHandleError) as e:
        z.free(hs)
    assert "'master'" in str(e.value) and str(hs) in str(e.value)
    arena.check()
    with pytest.raises(ForeignHandleError) as e:
        s.free(hz)
    assert "'second'" in str(e.value) and str(hz) in str(e.value)
    arena.check()
    z.free(hz)
    s.free(hs)
    assert z.stats().used == 0 and s.stats().used == 0
    assert_consistent(arena, z, s)
