"""hooks: a zone's ctor, dtor, init and fini (named hooks, ``hooks_mod``) -- the
order they run in, and the unwinding when one fails or raises (UMA §2.7): the
allocation fails or the exception propagates, and no item is lost.  One process,
on a local arena."""

import pytest

from core_helpers import arena, assert_consistent, hooked_zone, hooks
from shmalloc import M_NOWAIT
from tests import hooks_mod


def test_hooks_run_init_ctor_dtor_fini_in_order(arena, hooks):
    z = hooked_zone(arena)
    h = z.alloc(M_NOWAIT, arg="a1")
    z.free(h, arg="f1")
    z.drain()
    mine = [c[:2] for c in hooks.events(handle=h)]
    assert mine == [("init", "hooked"), ("ctor", "hooked"), ("dtor", "hooked"),
                    ("fini", "hooked")]
    assert hooks.events("ctor", h)[0][3:] == ("a1", M_NOWAIT)
    assert hooks.events("dtor", h)[0][3:] == ("f1",)
    # the whole imported bucket was inited, then finied by the drain
    assert len(hooks.events("init")) == 4
    assert sorted(c[2] for c in hooks.events("fini")) == sorted(c[2] for c in hooks.events("init"))
    assert_consistent(arena, z)


def test_reuse_from_the_cache_runs_ctor_and_dtor_but_not_init_again(arena, hooks):
    z = hooked_zone(arena)
    for _ in range(3):
        z.free(z.alloc(M_NOWAIT))
    counts = {k: len(hooks.events(k)) for k in ("init", "ctor", "dtor", "fini")}
    assert counts == {"init": 4, "ctor": 3, "dtor": 3, "fini": 0}


def test_failing_ctor_fails_the_alloc_runs_fini_and_returns_the_item_to_its_slab(arena, hooks):
    z = hooked_zone(arena)
    z.free(z.alloc(M_NOWAIT))                  # 4 items imported and inited, all cached
    before = z.stats()
    hooks.ctor_fails = True
    hooks.calls.clear()
    assert z.alloc(M_NOWAIT) is None
    (ctor,) = hooks.events("ctor")
    h = ctor[2]
    assert [c[0] for c in hooks.calls] == ["ctor", "fini"]
    assert hooks.events("fini")[0][2] == h
    assert hooks.events("dtor") == []
    after = z.stats()
    assert after.failures == before.failures + 1
    assert after.items == before.items - 1
    assert after.free_keg == before.free_keg + 1
    assert after.requests == before.requests and after.used == 0
    assert_consistent(arena, z)


def test_failing_init_keeps_the_good_items_before_it_and_returns_the_rest_without_fini(
        arena, hooks):
    z = hooked_zone(arena, bucket_size=8)
    hooks.init_fail_at = 3
    h = z.alloc(M_NOWAIT)
    inits = hooks.events("init")
    assert len(inits) == 3                     # items 1 and 2 good, item 3 failed
    assert h in (inits[0][2], inits[1][2])
    assert hooks.events("fini") == []
    s = z.stats()
    assert (s.items, s.used, s.free_cache) == (2, 1, 1)
    assert s.free_keg == z.keg.ipers - 2
    assert_consistent(arena, z)


def test_init_failing_inside_a_bucket_counts_no_failure_when_the_alloc_succeeds(arena, hooks):
    z = hooked_zone(arena, bucket_size=8)
    hooks.init_fail_at = 3
    assert z.alloc(M_NOWAIT) is not None
    assert z.stats().failures == 0


def test_init_failing_on_the_first_item_fails_the_alloc(arena, hooks):
    z = hooked_zone(arena)
    hooks.init_fail_at = 1
    assert z.alloc(M_NOWAIT) is None
    s = z.stats()
    assert s.failures >= 1 and s.items == 0 and s.used == 0
    assert hooks.events("fini") == [] and hooks.events("ctor") == []
    assert_consistent(arena, z)
    assert z.alloc(M_NOWAIT) is not None       # init succeeds again


def test_exception_in_ctor_propagates_and_the_item_goes_back(arena, hooks):
    z = hooked_zone(arena)
    z.free(z.alloc(M_NOWAIT))
    before = z.stats()
    hooks.ctor_raises = True
    with pytest.raises(hooks_mod.HookBoom):
        z.alloc(M_NOWAIT)
    after = z.stats()
    assert after.items == before.items - 1 and after.used == 0
    assert_consistent(arena, z)
    hooks.ctor_raises = False
    assert z.alloc(M_NOWAIT) is not None


def test_exception_in_init_propagates_and_the_arena_stays_consistent(arena, hooks):
    z = hooked_zone(arena)
    hooks.init_raise_at = 2
    with pytest.raises(hooks_mod.HookBoom):
        z.alloc(M_NOWAIT)
    assert z.stats().used == 0
    assert_consistent(arena, z)
    hs = [z.alloc(M_NOWAIT) for _ in range(6)]
    assert None not in hs
    z.free_bulk(hs)
    arena.reclaim()
    assert z.stats().items == 0
    assert_consistent(arena, z)


def test_exception_in_dtor_propagates_and_the_item_stays_allocated(arena, hooks):
    z = hooked_zone(arena)
    h = z.alloc(M_NOWAIT)
    hooks.dtor_raises = True
    with pytest.raises(hooks_mod.HookBoom):
        z.free(h)
    assert z.stats().used == 1
    assert_consistent(arena, z)
    hooks.dtor_raises = False
    z.free(h)
    assert z.stats().used == 0
    assert_consistent(arena, z)


def test_exception_in_fini_propagates_and_loses_no_item(arena, hooks):
    z = hooked_zone(arena)
    pages = arena.free_pages
    z.free_bulk([z.alloc(M_NOWAIT) for _ in range(20)])
    hooks.fini_raises = True
    with pytest.raises(hooks_mod.HookBoom):
        z.drain()
    assert_consistent(arena, z)
    hooks.fini_raises = False
    arena.reclaim()
    assert z.stats().items == 0, "items stranded by the fini that raised"
    assert arena.free_pages == pages
    assert_consistent(arena, z)
