"""bulk: ``alloc_bulk`` (all or nothing, also when a ctor fails) and ``free_bulk``
(a duplicate frees nothing).  One process, on a local arena."""

import pytest

from core_helpers import arena, assert_consistent, assert_disjoint, hooked_zone, hooks
from shmalloc import M_NOWAIT, DoubleFreeError


def test_alloc_bulk_is_all_or_nothing(arena):
    z = arena.zcreate("bulk", 256, max_items=10)
    assert z.alloc_bulk(11, M_NOWAIT) is None
    s = z.stats()
    assert s.used == 0 and s.requests == 0 and s.failures == 1
    hs = z.alloc_bulk(10, M_NOWAIT)
    assert len(hs) == 10
    assert_disjoint(z, hs)
    assert z.alloc_bulk(1, M_NOWAIT) is None
    assert z.stats().used == 10
    assert_consistent(arena, z)


def test_alloc_bulk_with_a_failing_ctor_gives_back_what_it_had(arena, hooks):
    z = hooked_zone(arena, bucket_size=8)
    z.free(z.alloc(M_NOWAIT))
    hooks.calls.clear()
    hooks.ctor_count = 0
    hooks.ctor_fail_at = 3                     # the 3rd item of the bulk fails
    assert z.alloc_bulk(5, M_NOWAIT) is None
    assert len(hooks.events("ctor")) == 3
    assert len(hooks.events("dtor")) == 2      # the two good items were freed again
    s = z.stats()
    assert s.used == 0 and s.requests == s.frees == 3     # the first alloc, the 2 good ones
    assert_consistent(arena, z)


def test_free_bulk_with_a_duplicate_raises_and_frees_nothing(arena):
    z = arena.zcreate("bulk", 256)
    hs = z.alloc_bulk(6, M_NOWAIT)
    with pytest.raises(DoubleFreeError) as e:
        z.free_bulk(hs[:3] + [hs[0]] + hs[3:])
    assert str(hs[0]) in str(e.value) and "'bulk'" in str(e.value)
    assert z.stats().used == 6
    arena.check()
    z.free_bulk(hs)
    assert z.stats().used == 0
    assert_consistent(arena, z)
