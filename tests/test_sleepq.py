"""sleepq: M_WAITOK sleepers -- woken by a free or a raised limit, first come first
served, timing out, woken with ArenaClosedError when the arena closes, waiting in a
zone whose init waits, and asking other CPUs for their cached items.  One process,
on a local arena; the sleepers are threads."""

import time

import pytest

from core_helpers import MiB, Worker, arena, assert_consistent, hooked_zone, hooks, wait_until
from shmalloc import M_NOWAIT, M_WAITOK, Arena, ArenaClosedError
from shmalloc import layout
from tests import hooks_mod


@pytest.fixture
def full_zone(arena):
    """A zone at its limit of 2, both items held by the main thread."""
    z = arena.zcreate("waitok", 256, max_items=2)
    hs = [z.alloc(M_NOWAIT), z.alloc(M_NOWAIT)]
    assert z.alloc(M_NOWAIT) is None
    return z, hs


def test_waitok_sleeper_is_woken_by_a_free(arena, full_zone):
    z, (h1, h2) = full_zone
    sleeper = Worker(lambda: z.alloc(M_WAITOK, timeout=5))
    sleeper.start()
    wait_until(lambda: z.stats().sleepers == 1, "the sleeper to queue")
    z.free(h1)
    assert sleeper.finish() == h1              # handed over directly
    s = z.stats()
    assert s.sleepers == 0 and s.sleeps == 1 and s.used == 2 and s.items == 2
    arena.check()


def test_waitok_sleepers_are_served_first_come_first_served(arena, full_zone):
    z, (h1, h2) = full_zone
    first = Worker(lambda: z.alloc(M_WAITOK, timeout=5))
    first.start()
    wait_until(lambda: z.stats().sleepers == 1, "the first sleeper to queue")
    second = Worker(lambda: z.alloc(M_WAITOK, timeout=5))
    second.start()
    wait_until(lambda: z.stats().sleepers == 2, "the second sleeper to queue")
    z.free(h1)
    assert first.finish() == h1
    assert second.is_alive() and z.stats().sleepers == 1
    z.free(h2)
    assert second.finish() == h2
    assert z.stats().sleepers == 0 and z.stats().sleeps == 2
    arena.check()


def test_raising_the_limit_wakes_a_sleeper(arena, full_zone):
    z, _ = full_zone
    sleeper = Worker(lambda: z.alloc(M_WAITOK, timeout=5))
    sleeper.start()
    wait_until(lambda: z.stats().sleepers == 1, "the sleeper to queue")
    z.set_max(3)
    assert sleeper.finish() is not None
    s = z.stats()
    assert s.sleepers == 0 and s.items == 3 and s.used == 3
    arena.check()


def test_waitok_sleeper_on_a_full_arena_is_woken_by_a_free():
    with Arena.create_local(size=1 * MiB, bare=True) as a:
        z = a.zcreate("nolimit", 2048)
        hs = []
        while (h := z.alloc(M_NOWAIT)) is not None:
            hs.append(h)
        sleeper = Worker(lambda: z.alloc(M_WAITOK, timeout=1))
        sleeper.start()
        wait_until(lambda: z.stats().sleepers == 1, "the sleeper to queue")
        z.free(hs[0])
        assert sleeper.finish() == hs[0]
        a.check()


def test_waitok_times_out_when_nobody_frees(arena, full_zone):
    z, _ = full_zone
    fails = z.stats().failures
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        z.alloc(M_WAITOK, timeout=0.2)
    took = time.monotonic() - t0
    assert 0.2 <= took < 3
    s = z.stats()
    assert s.sleepers == 0 and s.sleeps == 1 and s.failures == fails + 1
    assert s.items == 2
    assert_consistent(arena, z)


@pytest.mark.parametrize("how", ["destroy", "close"])
def test_close_from_another_thread_wakes_an_m_waitok_sleeper(how):
    a = Arena.create_local(size=1 * MiB, bare=True)
    z = a.zcreate("waitok", 256, max_items=1)
    assert z.alloc(M_NOWAIT) is not None
    sleeper = Worker(lambda: z.alloc(M_WAITOK))             # no timeout
    sleeper.start()
    wait_until(lambda: z.stats().sleepers == 1, "the sleeper to queue")
    Worker.run_now(getattr(a, how))                         # returns: no deadlock
    with pytest.raises(ArenaClosedError, match="closed while this M_WAITOK"):
        sleeper.finish()
    assert a._closed


def test_close_wakes_the_threads_waiting_in_recv_and_in_m_waitok():
    a = Arena.create_local(size=1 * MiB, bare=True)
    z = a.zcreate("waitok", 256, max_items=1)
    assert z.alloc(M_NOWAIT) is not None
    receiver = Worker(lambda: a.recv(timeout=None))
    receiver.start()
    sleeper = Worker(lambda: z.alloc(M_WAITOK, timeout=60))
    sleeper.start()
    wait_until(lambda: z.stats().sleepers == 1 and len(a._thread_arenas) == 2,
               "the sleeper to queue and the receiver to attach")
    Worker.run_now(a.close)
    for w in (receiver, sleeper):
        with pytest.raises(ArenaClosedError):
            w.finish()


# A zone whose init can fail (a secondary zone like the packet zone): its init takes
# a part from the limited zone "parts", with the caller's how.
@pytest.fixture
def pairs(arena, hooks):
    """(pairs, parts, the two parts held): every part is out, held bare."""
    parts = arena.zcreate("parts", 64, max_items=2, bucket_size=1)
    base = arena.zcreate("base", 256)
    pairs = arena.zsecond_create("pairs", base, init=hooks_mod.pair_init,
                                 fini=hooks_mod.pair_fini)
    held = [parts.alloc(M_NOWAIT), parts.alloc(M_NOWAIT)]
    assert None not in held and parts.alloc(M_NOWAIT) is None
    return pairs, parts, held


def test_waitok_in_a_zone_whose_init_waits_honours_the_timeout(arena, pairs):
    pairs, parts, _ = pairs
    before = parts.stats().failures
    t0 = time.monotonic()
    waiter = Worker(lambda: pairs.alloc(M_WAITOK, timeout=0.5))
    waiter.start()
    with pytest.raises(TimeoutError):
        waiter.finish()
    took = time.monotonic() - t0
    assert 0.5 <= took < 3, took
    p, s = parts.stats(), pairs.stats()
    # the wait was the part's: one sleep in "parts", none in "pairs"; one failure
    # each for the request that timed out, none while it slept
    assert (p.sleeps, p.failures - before, p.sleepers) == (1, 1, 0)
    assert (s.sleeps, s.failures, s.items) == (0, 1, 0)
    assert_consistent(arena, parts, pairs)


def test_waitok_in_a_zone_whose_init_waits_is_served_by_a_free_of_the_other_zone(arena, pairs):
    pairs, parts, held = pairs
    before = parts.stats().failures
    waiter = Worker(lambda: pairs.alloc(M_WAITOK, timeout=5))
    waiter.start()
    wait_until(lambda: parts.stats().sleepers == 1, "the part request to sleep in 'parts'")
    parts.free(held[0])
    h = waiter.finish()
    assert hooks_mod.pair_part(pairs, h) == held[0]       # handed over to the sleeper
    p, s = parts.stats(), pairs.stats()
    assert (p.sleeps, p.failures - before) == (1, 0)
    assert (s.sleeps, s.failures, s.used) == (0, 0, 1)
    # nothing else of the bucket was held while the init slept
    assert s.items == 1
    assert_consistent(arena, parts, pairs)


def test_waitok_with_an_init_that_keeps_failing_sleeps_once_and_times_out(arena, hooks):
    z = hooked_zone(arena, "failing")
    hooks.init_fails = True
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        Worker.run_now(lambda: z.alloc(M_WAITOK, timeout=0.3))
    assert 0.3 <= time.monotonic() - t0 < 3
    s = z.stats()
    assert (s.sleeps, s.failures, s.sleepers, s.items) == (1, 1, 0, 0)
    assert len(hooks.events("init")) >= 2                 # it did try again while asleep
    assert_consistent(arena, z)


# Items parked in another CPU's cache: the sleeper asks for them (MSG_ZDRAIN).
def test_a_sleeper_asks_every_other_cpu_for_its_cached_items(arena):
    z = arena.zcreate("parked", 256, max_items=4, bucket_size=4)
    b = arena.attach_local()
    try:
        zb = b.zone("parked")
        parked = [zb.alloc(M_NOWAIT) for _ in range(4)]
        zb.free_bulk(parked)                          # all four in B's cache
        assert z.stats().free_cache == 4 and z.alloc(M_NOWAIT) is None
        sleeper = Worker(lambda: z.alloc(M_WAITOK, timeout=5))
        sleeper.start()
        wait_until(lambda: z.stats().sleepers == 1, "the sleeper to queue")
        assert b._core.w[layout.cpu_word(b.cpu_id) + layout.CPU["DRAIN_ASKED"]]
        b.poll()                                      # B calls in: it answers
        assert sleeper.finish() in parked
        assert b._mail.zdrains == 1 and not zb._cache.items
        s = z.stats()
        assert (s.sleeps, s.failures, s.used, s.free_cache) == (1, 1, 1, 0)   # the M_NOWAIT
        assert_consistent(arena, z)
    finally:
        b.close()
