"""keg: the item/tag iterators every tag walk goes through (``Keg.items``,
``held_by``, ``tags_of``, ``tag_counts``, ``tag_index_of``, ``handle_of``), the
zone's shared structures the walks rebuild (``depot.Depot``, ``sleepq.SleepQueue``),
and where a bucket fill starts (two CPUs' tags in different cache lines), one
process, on a local arena."""

import pytest

from core_helpers import arena
from shmalloc import M_NOWAIT, Arena
from shmalloc import layout as L
from shmalloc.depot import Depot
from shmalloc.sleepq import SleepQueue


@pytest.fixture
def pair():
    a = Arena.create_local(8 << 20)
    b = a.attach_local()
    try:
        yield a, b
    finally:
        b.close()
        a.destroy()


def test_items_filter_by_zone_holder_and_state_and_agree_with_the_arithmetic(pair):
    a, b = pair
    z = a.zcreate("z", 64, bucket_size=8)
    mine = [z.alloc(M_NOWAIT) for _ in range(5)]
    theirs = [b.zone("z").alloc(M_NOWAIT) for _ in range(3)]
    z.free(mine.pop())                                  # cached here now
    keg, core = z.keg, a._core
    with core.lock(keg.lock_index):
        every = list(keg.items())
        allocated = {h for h, _, _ in keg.items(zidx=z.zidx, states=(L.TAG_ALLOC,))}
        held_by_b = [(ti, tv) for _, ti, tv in keg.items(holder=b.cpu_id)]
        counts = keg.tag_counts()
        nslabs = len(list(keg.slabs()))
        assert list(keg.held_by(b.cpu_id)) == held_by_b
    assert allocated == set(mine) | set(theirs)
    assert {keg.handle_of(ti) for ti, _ in held_by_b} >= set(theirs)
    for h, ti, tv in every:
        assert tv != L.TAG_FREE and core.tags[ti] == tv
        assert keg.tag_index_of(h) == ti and keg.handle_of(ti) == h
    assert counts[L.TAG_FREE] + len(every) == nslabs * keg.ipers
    cached = [h for h, _, tv in every if L.tag_state(tv) == L.TAG_CACHED]
    assert cached and all(keg.tag_index_of(h) >= 0 for h in cached)
    # the page table's slabs, no lock needed, hold the same items
    assert {x[0] for x in keg.items(keg.slab_bases())} == {x[0] for x in every}
    base = keg.slab_of(mine[0])
    assert list(keg.tags_of(base))[(mine[0] - base) // keg.rsize] == \
        core.tags[keg.tag_index_of(mine[0])]
    for bad in (mine[0] + 1, -64, a.stats().size, 0):
        assert keg.tag_index_of(bad) == -1
    z.free_bulk(mine)
    b.zone("z").free_bulk(theirs)
    a.check()


def test_the_depot_and_the_sleep_queue_read_back_what_they_hold(pair):
    a, b = pair
    z = a.zcreate("q", 64, bucket_size=4)
    core = a._core
    hs = [z.alloc(M_NOWAIT) for _ in range(16)]
    z.free_bulk(hs)                                    # overflows the stack: to the depot
    with core.lock(z._lock_index):
        depot = Depot(core, z.id)
        got = depot.contents()
        assert got is not None and depot.count() == len(got[0]) > 0
        assert all(core.tags[t] == depot.w_depot for t in got[1])
        assert [z.keg.tag_index_of(h) for h in got[0]] == got[1]
        q = SleepQueue(core, z.id)
        assert q.waiting() == [] and q.first() == -1
        for cpu in (b.cpu_id, a.cpu_id):
            core.w[L.cpu_word(cpu) + L.CPU["WAIT_ZONE"]] = z.id + 1
            q.push(cpu)
        assert q.waiting() == [b.cpu_id, a.cpu_id] and q.contains(a.cpu_id)
        q.remove(b.cpu_id)
        assert q.first() == a.cpu_id and q.waiting() == [a.cpu_id]
        q.push(b.cpu_id)
        q.rebuild()                                    # both live and waiting: kept in order
        assert q.waiting() == [a.cpu_id, b.cpu_id]
        for cpu in (a.cpu_id, b.cpu_id):
            q.remove(cpu)
            core.w[L.cpu_word(cpu) + L.CPU["WAIT_ZONE"]] = 0
        assert q.waiting() == [] and core.w[L.zone_word(z.id) + L.ZONE["SLEEPERS"]] == 0
    a.check()


def test_two_cpus_bucket_fills_put_their_tags_in_different_cache_lines(arena):
    from shmalloc.keg import TAG_LINE
    z = arena.zcreate("lines", 2048, bucket_size=8)
    other = arena.attach_local()
    try:
        zo = other.zone("lines")
        mine = [z.alloc() for _ in range(8)]
        theirs = [zo.alloc() for _ in range(8)]
        lines = [{4 * z._cache._tag_index(h) // TAG_LINE for h in hs} for hs in (mine, theirs)]
        assert not lines[0] & lines[1]
        more = [z.alloc() for _ in range(60)]        # the items skipped are still found
        z.free_bulk(mine + more)
        zo.free_bulk(theirs)
        arena.check()
    finally:
        other.close()
    arena.check()
