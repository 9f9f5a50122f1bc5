"""arena and cpus: closing an attachment (its cached items go back, what it holds
stays allocated, and it refuses to be used), and threads sharing one zone object,
each on a CPU of its own.  One process, on a local arena."""

import threading

import pytest

from core_helpers import JOIN, Worker, arena, assert_consistent, assert_names
from shmalloc import M_NOWAIT, ArenaClosedError


# ============================================================================ close
def test_free_after_close_raises_arena_closed_error(arena):
    z = arena.zcreate("z", 256)
    h = z.alloc(M_NOWAIT)
    other = arena.attach_local()        # a second CPU stays open to check the arena
    try:
        arena.close()
        with pytest.raises(ArenaClosedError):
            z.free(h)
        with pytest.raises(ArenaClosedError):
            z.alloc(M_NOWAIT)
        with pytest.raises(ArenaClosedError):
            arena.check()
        other.check()
    finally:
        other.close()


def test_close_gives_the_cpus_cached_items_back(arena):
    z = arena.zcreate("z", 256)
    z.free_bulk(z.alloc_bulk(10, M_NOWAIT))
    other = arena.attach_local()
    try:
        arena.close()
        s = other.zone("z").stats()
        assert s.free_cache == 0 and s.used == 0 and s.items == s.free_depot
        other.check()
    finally:
        other.close()


def test_check_passes_while_a_closed_cpus_item_is_still_allocated(arena):
    z = arena.zcreate("z", 256)
    h = z.alloc(M_NOWAIT)
    other = arena.attach_local()
    try:
        arena.close()
        other.check()
        assert other.zone("z").stats().used == 1
        other.zone("z").free(h)
        other.check()
    finally:
        other.close()


def test_arena_closed_error_names_the_zone_and_the_handle(arena):
    z = arena.zcreate("z", 256)
    h = z.alloc(M_NOWAIT)
    arena.close()
    with pytest.raises(ArenaClosedError) as e:
        z.free(h)
    assert_names(e.value, z, h)


# ============================================================================ threads
def test_two_threads_sharing_a_zone_object_get_their_own_cpus(arena):
    z = arena.zcreate("shared", 128, bucket_size=8)
    start = threading.Barrier(2, timeout=JOIN)
    # both threads stay alive until both are done: a thread that first uses the arena
    # after the other ended would take over the ended thread's CPU slot
    done = threading.Barrier(2, timeout=JOIN)
    attached = threading.Barrier(2, timeout=JOIN)

    def churn(mark):
        start.wait()
        mine = [z.alloc(M_NOWAIT)]
        z.view(mine[0])[:] = bytes([mark]) * 128
        attached.wait()         # both CPUs exist: neither thread ends before the other
        for i in range(3000):   # starts (a new thread's first call closes ended threads' CPUs)
            if len(mine) < 40 and (i % 3 or not mine):
                h = z.alloc(M_NOWAIT)
                assert h is not None
                z.view(h)[:] = bytes([mark]) * 128
                mine.append(h)
            else:
                h = mine.pop(0)
                assert bytes(z.view(h)) == bytes([mark]) * 128, "another thread wrote my item"
                z.free(h)
        for h in mine:
            assert bytes(z.view(h)) == bytes([mark]) * 128, "another thread wrote my item"
        z.free_bulk(mine)
        done.wait()

    workers = [Worker(lambda m=m: churn(m)) for m in (0x11, 0x22)]
    for w in workers:
        w.start()
    for w in workers:
        w.finish()
    busy = [c for c in arena.cpu_stats() if c.allocs]
    assert len(busy) == 2 and arena.cpu_id not in {c.cpu for c in busy}
    for c in busy:
        assert c.allocs == c.frees > 0
    assert z.stats().used == 0
    assert_consistent(arena, z)
