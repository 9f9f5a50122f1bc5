"""zone: a zone's limit (``max_items``, ``set_max``) and the errors a free raises for
a handle that is not the zone's to take (double free, bad handle, another zone's
item).  One process, on a local arena."""

import pytest

from core_helpers import arena, assert_consistent, assert_disjoint, assert_names, two_zones
from shmalloc import M_NOWAIT, BadHandleError, DoubleFreeError, ForeignHandleError, ShmallocError
from shmalloc import layout


# ============================================================================ limits
def test_max_items_is_honoured_exactly(arena):
    z = arena.zcreate("lim", 256, max_items=10)
    hs = [z.alloc(M_NOWAIT) for _ in range(10)]
    assert None not in hs
    assert z.alloc(M_NOWAIT) is None
    assert z.alloc(M_NOWAIT) is None
    s = z.stats()
    assert (s.limit, s.items, s.used, s.failures) == (10, 10, 10, 2)
    assert_consistent(arena, z)


def test_freed_items_can_be_allocated_again_under_the_limit(arena):
    z = arena.zcreate("lim", 256, max_items=4)
    hs = [z.alloc(M_NOWAIT) for _ in range(4)]
    z.free(hs[0])
    h = z.alloc(M_NOWAIT)
    assert h is not None
    assert z.alloc(M_NOWAIT) is None
    assert z.stats().items == 4
    assert_consistent(arena, z)


def test_a_limit_below_the_items_out_caps_further_allocation(arena):
    """FreeBSD 7/8 uma_core.c uma_zone_set_max: the limit only stops new slabs, so one
    below the items in use is taken (set_max(below_use=True)); the items out stay, the
    zone takes none from its keg until frees bring it under, and check() accepts it.
    Without below_use it is refused, nothing changed."""
    z = arena.zcreate("lim", 256, bucket_size=0)
    hs = [z.alloc(M_NOWAIT) for _ in range(10)]
    with pytest.raises(ValueError, match="below the 10 items"):
        z.set_max(4)
    assert z.limit == 0
    assert z.set_max(4, below_use=True) == 4
    assert_consistent(arena, z)                     # 10 out, limit 4: sound
    assert z.alloc(M_NOWAIT) is None
    for h in hs[6:]:
        z.free(h)
    assert z.alloc(M_NOWAIT) is None                # 6 out, still over
    assert_consistent(arena, z)
    for h in hs[3:6]:
        z.free(h)
    h = z.alloc(M_NOWAIT)                           # 3 out: under the limit again
    assert h is not None and z.alloc(M_NOWAIT) is None
    assert z.stats().items == 4
    assert_consistent(arena, z)
    z.free_bulk(hs[:3] + [h])


def test_raising_the_limit_allows_exactly_the_new_number_of_items(arena):
    z = arena.zcreate("lim", 2048, max_items=3)
    hs = [z.alloc(M_NOWAIT) for _ in range(3)]
    assert z.alloc(M_NOWAIT) is None
    assert z.set_max(7) == 7
    assert z.limit == 7 and z.stats().limit == 7
    hs += [z.alloc(M_NOWAIT) for _ in range(4)]
    assert None not in hs
    assert z.alloc(M_NOWAIT) is None
    assert z.stats().failures == 2
    assert_disjoint(z, hs)
    assert_consistent(arena, z)


def test_lowering_the_limit_below_the_items_held_never_breaks_check(arena):
    z = arena.zcreate("lim", 256, max_items=10)
    hs = [z.alloc(M_NOWAIT) for _ in range(10)]
    try:
        z.set_max(5)
    except ValueError:
        pass                                   # refusing is a fine answer too
    arena.check()
    z.free_bulk(hs)


def test_one_cpus_cache_cannot_hoard_a_limited_zone(arena):
    b = arena.attach_local()
    try:
        z = arena.zcreate("lim", 256, max_items=40)
        z.free(z.alloc(M_NOWAIT))              # CPU a used one item, and holds none
        assert b.zone("lim").alloc(M_NOWAIT) is not None
    finally:
        b.close()


def test_set_max_zero_removes_the_limit(arena):
    z = arena.zcreate("lim", 256, max_items=2)
    hs = [z.alloc(M_NOWAIT) for _ in range(2)]
    assert z.alloc(M_NOWAIT) is None
    z.set_max(0)
    hs += [z.alloc(M_NOWAIT) for _ in range(100)]
    assert None not in hs and z.stats().limit == 0
    assert_consistent(arena, z)


def test_set_max_rejects_a_negative_limit(arena):
    z = arena.zcreate("lim", 256, max_items=3)
    with pytest.raises(ValueError):
        z.set_max(-1)
    assert z.limit == 3


# ============================================================================ bad input
def test_double_free_raises_double_free_error(arena, two_zones):
    z, _, h, _ = two_zones
    z.free(h)
    with pytest.raises(DoubleFreeError) as e:
        z.free(h)
    assert_names(e.value, z, h)
    assert isinstance(e.value, ShmallocError) and isinstance(e.value, ValueError)
    assert z.stats().used == 0
    arena.check()


def test_double_free_after_the_item_went_back_to_its_slab(arena, two_zones):
    z, _, h, _ = two_zones
    pin = z.alloc(M_NOWAIT)                    # keeps the slab out of the vm
    z.free(h)
    arena.reclaim()
    assert z.stats().items == 1
    with pytest.raises(DoubleFreeError) as e:
        z.free(h)
    assert_names(e.value, z, h)
    arena.check()
    z.free(pin)


def test_free_of_an_item_whose_slab_went_back_to_the_vm_is_a_bad_handle(arena, two_zones):
    z, _, h, _ = two_zones
    z.free(h)
    arena.reclaim()
    assert z.stats().pages == 0
    with pytest.raises(BadHandleError) as e:
        z.free(h)
    assert_names(e.value, z, h)
    arena.check()


def test_free_of_another_zones_item_raises_foreign_handle_error(arena, two_zones):
    z, other, h, ho = two_zones
    with pytest.raises(ForeignHandleError) as e:
        z.free(ho)
    assert_names(e.value, z, ho)
    assert "'other'" in str(e.value)
    assert other.stats().used == 1
    arena.check()
    other.free(ho)


@pytest.mark.parametrize("where", ["misaligned", "negative", "past the end", "far past the end",
                                   "metadata", "depot page", "free page"])
def test_free_of_a_bad_int_raises_bad_handle_error(arena, two_zones, where):
    z, _, h, _ = two_zones
    bad = {
        "misaligned": h + 8,
        "negative": -z.keg.rsize,
        "past the end": arena.size,
        "far past the end": 1 << 60,
        "metadata": 0,
        # the first data page: the depot of the arena's first zone
        "depot page": arena.size - arena.stats().total_pages * layout.PAGE_SIZE,
        "free page": arena.size - layout.PAGE_SIZE,
    }[where]
    with pytest.raises(BadHandleError) as e:
        z.free(bad)
    assert type(e.value) is BadHandleError
    assert_names(e.value, z, bad)
    assert z.stats().used == 1
    arena.check()
