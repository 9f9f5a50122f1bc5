"""The allocator core on the in-memory backend (``Arena.create_local``): one process,
no OS objects, fast.  Its arenas are bare (``bare=True``: no layer's zones, such as
the mbuf zones every arena is made with), since the counts here are the core's.

Sections follow the search order and the zone's contract: layout, arena full,
limits, bucket caches and locks, depot, secondary zones, hooks and their failure
unwinding (UMA §2.7), bad input, bulk, M_ZERO, reclaim, several CPUs, vmstat -z,
threads and M_WAITOK sleepers.
"""

import threading
import time

import pytest

from shmalloc import (
    M_NOWAIT,
    M_WAITOK,
    M_ZERO,
    Arena,
    ArenaClosedError,
    BadHandleError,
    DoubleFreeError,
    ForeignHandleError,
    ShmallocError,
    ZoneError,
)
from shmalloc import layout
from shmalloc.ipc.lock import LocalLock
from tests import hooks_mod

MiB = 1 << 20
JOIN = 10.0          # seconds: the bound of every thread join and wait-for-condition


# ============================================================================ helpers
@pytest.fixture
def arena():
    a = Arena.create_local(size=8 * MiB, bare=True)
    yield a
    a.destroy()


@pytest.fixture
def hooks():
    hooks_mod.reset()
    yield hooks_mod
    hooks_mod.reset()


def zone_lock(arena, zone):
    """LockStats of ``zone``'s lock."""
    (ls,) = [s for s in arena.lock_stats() if s.name == f"zone:{zone.name}"]
    return ls


def assert_disjoint(zone, handles):
    """No two of ``handles`` (items of ``zone.size`` bytes) overlap."""
    hs = sorted(handles)
    assert len(set(hs)) == len(hs), "a handle was handed out twice"
    for lo, hi in zip(hs, hs[1:]):
        assert lo + zone.size <= hi, f"items {lo} and {hi} of {zone.size} bytes overlap"


def assert_consistent(arena, *zones):
    """check() passes and, per zone, items out of the slabs = used + cached + depot."""
    arena.check()
    for z in zones:
        s = z.stats()
        assert s.items == s.used + s.free_cache + s.free_depot, s


def wait_until(cond, what, timeout=JOIN):
    """Poll ``cond`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


class Worker(threading.Thread):
    """Run ``fn`` in a thread; keep its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:          # re-raised by finish()
            self.error = e

    def finish(self, timeout=JOIN):
        self.join(timeout)
        assert not self.is_alive(), f"thread {self.name} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result

    @classmethod
    def run_now(cls, fn, timeout=JOIN):
        """``fn()`` in a thread of its own, bounded by ``timeout``."""
        w = cls(fn)
        w.start()
        return w.finish(timeout)


# ============================================================================ layout
def test_refcnt_cluster_keg_wastes_little_with_the_smallest_slab(arena):
    z = arena.zcreate("clust", 2048, refcnt=True)
    keg = z.keg
    room = keg.ppera * layout.PAGE_SIZE
    good = 1 - layout.MAX_WASTE
    assert keg.rsize == 2048
    # items, slab header, one u32 tag and one u32 refcount per item fit in the slab
    assert keg.ipers * 2048 + layout.SLAB_HDR_BYTES + 8 * keg.ipers <= room
    assert keg.ipers * 2048 / room >= good
    # and no smaller slab is as good
    for ppera in range(1, keg.ppera):
        r = ppera * layout.PAGE_SIZE
        n = (r - layout.SLAB_HDR_BYTES) // (2048 + 8)
        assert n * 2048 / r < good, f"{ppera} pages would hold {n} items"
    # all the bookkeeping per item (slab waste, tag, refcount) stays under 3 %
    assert (room - keg.ipers * 2048) / (keg.ipers * 2048) < 0.03


SIZES = [1, 16, 100, 256, 2048, 9216, 16384, 65536, MiB + 1]


@pytest.mark.parametrize("size", SIZES)
def test_items_of_every_size_hold_their_bytes_and_do_not_overlap(size):
    with Arena.create_local(size=16 * MiB, bare=True) as a:
        z = a.zcreate(f"s{size}", size)
        n = 2 * z.keg.ipers + 1                 # three slabs (3 items of 1 MiB)
        hs = [z.alloc(M_NOWAIT) for _ in range(n)]
        assert None not in hs
        assert_disjoint(z, hs)
        for i, h in enumerate(hs):
            v = z.view(h)
            assert len(v) == size
            v[:] = bytes([i % 251 + 1]) * size
        for i, h in enumerate(hs):
            assert bytes(z.view(h)) == bytes([i % 251 + 1]) * size, f"item {i} ({h}) changed"
        assert_consistent(a, z)
        z.free_bulk(hs)
        assert_consistent(a, z)


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


# ============================================================================ caches and locks
def test_bucket_size_zero_takes_the_zone_lock_on_every_alloc_and_free(arena):
    z = arena.zcreate("nocache", 256, bucket_size=0)
    assert z.bucket_size == 0
    hs = []
    for _ in range(10):
        before = zone_lock(arena, z).acquisitions
        hs.append(z.alloc(M_NOWAIT))
        assert zone_lock(arena, z).acquisitions >= before + 1
    for h in hs:
        before = zone_lock(arena, z).acquisitions
        z.free(h)
        assert zone_lock(arena, z).acquisitions >= before + 1
    s = z.stats()
    assert s.free_cache == 0 and s.free_depot == 0 and s.items == 0
    assert_consistent(arena, z)


def test_default_cache_takes_the_zone_lock_at_most_twice_per_bucket(arena):
    z = arena.zcreate("cached", 256)
    bsize = z.bucket_size
    assert bsize == 62                         # UMA's bucket_select(256)
    n = 5 * bsize                              # overflows the 2-bucket cache every round
    z.free_bulk([z.alloc(M_NOWAIT) for _ in range(n)])     # warm up: slabs, depot
    before = zone_lock(arena, z).acquisitions
    rounds = 10
    for _ in range(rounds):
        hs = [z.alloc(M_NOWAIT) for _ in range(n)]
        for h in hs:
            z.free(h)
    taken = zone_lock(arena, z).acquisitions - before
    buckets = rounds * 2 * n / bsize
    assert taken <= 2 * buckets, f"{taken} zone lock acquisitions for {buckets:.0f} buckets"
    assert taken > 0                           # the churn did overflow the cache
    assert_consistent(arena, z)


def _contend_once(monkeypatch, zone):
    """Make the next try of ``zone``'s lock fail once, as if another CPU held it."""
    target = f"l{layout.zone_lock_index(zone.id)}"
    real = LocalLock._try_acquire
    left = [1]

    def try_acquire(self):
        if self.name == target and left[0]:
            left[0] -= 1
            return False
        return real(self)

    monkeypatch.setattr(LocalLock, "_try_acquire", try_acquire)
    return left


def test_adaptive_bucket_grows_by_one_when_the_zone_lock_was_contended(arena, monkeypatch):
    z = arena.zcreate("adapt", 256)
    start = z.bucket_size
    left = _contend_once(monkeypatch, z)
    contended = zone_lock(arena, z).contended
    assert z.alloc(M_NOWAIT) is not None       # slow path: import under the zone lock
    assert left == [0]
    assert zone_lock(arena, z).contended == contended + 1
    assert z.bucket_size == start + 1
    assert z.stats().bucket_size == start + 1
    assert_consistent(arena, z)


def test_drain_shrinks_a_grown_bucket_back_by_one(arena, monkeypatch):
    z = arena.zcreate("adapt", 256)
    start = z.bucket_size
    _contend_once(monkeypatch, z)
    z.free(z.alloc(M_NOWAIT))
    assert z.bucket_size == start + 1
    z.drain()
    assert z.bucket_size == start
    assert_consistent(arena, z)


def test_fixed_bucket_size_does_not_grow_under_contention(arena, monkeypatch):
    z = arena.zcreate("fixed", 256, bucket_size=16)
    left = _contend_once(monkeypatch, z)
    assert z.alloc(M_NOWAIT) is not None
    assert left == [0]
    assert z.bucket_size == 16


# ============================================================================ depot
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


# ============================================================================ hooks
def hooked_zone(arena, name="hooked", bucket_size=4, **kw):
    return arena.zcreate(name, 256, bucket_size=bucket_size, ctor=hooks_mod.ctor,
                         dtor=hooks_mod.dtor, init=hooks_mod.init, fini=hooks_mod.fini, **kw)


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


# ============================================================================ bad input
@pytest.fixture
def two_zones(arena):
    z = arena.zcreate("mine", 256)
    other = arena.zcreate("other", 512)
    h = z.alloc(M_NOWAIT)
    ho = other.alloc(M_NOWAIT)
    return z, other, h, ho


def assert_names(exc, zone, handle):
    msg = str(exc)
    assert repr(zone.name) in msg, msg
    assert str(handle) in msg, msg


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


@pytest.mark.parametrize("bad", [1.5, "4096", None, True, b"\0"])
def test_free_of_a_non_int_raises_type_error(arena, two_zones, bad):
    z, _, h, _ = two_zones
    with pytest.raises(TypeError) as e:
        z.free(bad)
    assert repr(z.name) in str(e.value)
    assert type(bad).__name__ in str(e.value)
    arena.check()


def test_type_error_message_names_the_handle(arena, two_zones):
    z, _, _, _ = two_zones
    with pytest.raises(TypeError) as e:
        z.free(1.5)
    assert "1.5" in str(e.value)


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


# ============================================================================ bulk
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


# ============================================================================ how
@pytest.mark.parametrize("how", [0, M_ZERO, M_NOWAIT | M_WAITOK])
def test_alloc_without_exactly_one_wait_flag_is_refused_on_a_cache_miss(arena, how):
    z = arena.zcreate("how", 256)
    with pytest.raises(ValueError):
        z.alloc(how)
    arena.check()


def test_alloc_without_exactly_one_wait_flag_is_refused_on_a_cache_hit(arena):
    z = arena.zcreate("how", 256)
    z.free(z.alloc(M_NOWAIT))                  # the cache holds items now
    with pytest.raises(ValueError):
        z.alloc(0)


# ============================================================================ M_ZERO
def test_m_zero_hands_out_a_zeroed_item(arena):
    z = arena.zcreate("zero", 256, bucket_size=4)
    hs = z.alloc_bulk(4, M_NOWAIT)
    for h in hs:
        z.view(h)[:] = b"\xff" * 256
    z.free_bulk(hs)
    h = z.alloc(M_NOWAIT | M_ZERO)
    assert h in hs                            # a dirty item from the cache
    assert bytes(z.view(h)) == bytes(256)


def test_m_zero_zeroes_after_the_ctor(arena, hooks):
    z = hooked_zone(arena)
    hooks.ctor_fill = 0xAB
    h = z.alloc(M_NOWAIT)
    assert bytes(z.view(h)) == b"\xab" * 256
    z.free(h)
    h = z.alloc(M_NOWAIT | M_ZERO)
    assert hooks.events("ctor", h)
    assert bytes(z.view(h)) == bytes(256)


# ============================================================================ reclaim
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


# ============================================================================ several CPUs
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


# ============================================================================ vmstat -z
VMSTAT_HEADER = ("ITEM                   SIZE  LIMIT     USED     FREE      REQ"
                 "     FAILSLEEP XDOMAIN")


def vmstat_row(name, size, limit, used, free, req, fail, sleep, xdomain):
    return "%-20s %6d, %6d,%8d,%8d,%8d,%4d,%4d,%4d" % (
        name + ":", size, limit, used, free, req, fail, sleep, xdomain)


def test_vmstat_z_prints_freebsds_header_and_the_right_numbers(arena):
    b = arena.attach_local()
    try:
        small = arena.zcreate("vm256", 256, bucket_size=10)
        lim = arena.zcreate("lim", 2048, max_items=4, bucket_size=2)
        # vm256: 25 allocs = 3 imports of 10 from one slab; 5 frees stay cached
        hs = [small.alloc(M_NOWAIT) for _ in range(25)]
        small.free_bulk(hs[:5])
        # lim: 4 allocs (2 imports of 2), a 5th fails, a 6th sleeps and times out;
        # CPU b frees one of them
        ls = [lim.alloc(M_NOWAIT) for _ in range(4)]
        assert lim.alloc(M_NOWAIT) is None
        with pytest.raises(TimeoutError):      # a sleep that fails too
            lim.alloc(M_WAITOK, timeout=0)
        b.zone("lim").free(ls[0])
        out = arena.vmstat_z()
    finally:
        b.close()
    lines = out.splitlines()
    assert lines[0] == VMSTAT_HEADER
    rows = {line.split(":")[0]: line for line in lines[1:] if line}
    used, cached = 25 - 5, 5 + 5
    keg_free = small.keg.ipers - 30
    assert rows["vm256"] == vmstat_row("vm256", 256, 0, used, cached + keg_free, 25, 0, 0, 0)
    # b's cache holds the freed item; the keg's first slab gave 4
    assert rows["lim"] == vmstat_row("lim", 2048, 4, 3, 1 + lim.keg.ipers - 4, 4, 2, 1, 1)


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


# ============================================================================ M_WAITOK
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


# Items parked in another CPU's cache: the sleeper asks for them (MSG_ZDRAIN), the
# keg manager takes those of a CPU that never answers (take_cache_of).
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


def test_an_idle_cpus_cache_taken_for_a_sleeper_is_never_handed_out_twice(arena):
    z = arena.zcreate("parked", 256, max_items=4, bucket_size=4)
    b = arena.attach_local()
    try:
        zb = b.zone("parked")
        parked = [zb.alloc(M_NOWAIT) for _ in range(4)]
        zb.free_bulk(parked)                          # B's stack names all four
        assert z._cache.take_cache_of(b.cpu_id) == 4  # what the keg manager does
        mine = [z.alloc(M_NOWAIT) for _ in range(4)]
        assert sorted(mine) == sorted(parked)
        assert zb.alloc(M_NOWAIT) is None             # not one of A's four
        assert not zb._cache.items
        arena.send(b.cpu_id, mine[:1])                # one comes back to B...
        (h,) = b.recv(timeout=1)
        zb.free(h)                                    # ...and is cached there again
        assert zb.alloc(M_NOWAIT) == h
        assert zb.alloc(M_NOWAIT) is None             # once
        zb.free(h)
        z.free_bulk(mine[1:])
        zb._cache.publish()                           # (B's fast path publishes nothing)
        assert_consistent(arena, z)
        arena.check(level=2)
    finally:
        b.close()


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


def test_an_item_granted_to_a_sleeper_not_yet_awake_is_not_taken_from_it(arena):
    z = arena.zcreate("granted", 256, max_items=1)
    b = arena.attach_local()
    try:
        zb, cw = b.zone("granted"), layout.cpu_word(b.cpu_id)
        h = z.alloc(M_NOWAIT)
        w = arena._core.w
        with arena._core.lock(z._lock_index):         # B queued, as _sleep queues it
            w[cw + layout.CPU["WAIT_ZONE"]] = z.id + 1
            zb._cache.sleepq.push(b.cpu_id)
        z.free(h)                                     # F2: handed to B's grant slot
        assert w[cw + layout.CPU["GRANT_ZONE"]] == z.id + 1
        assert z._cache.take_cache_of(b.cpu_id) == 0  # B's to pick up, not the manager's
        with arena._core.lock(z._lock_index):         # B wakes and takes it
            t = w[cw + layout.CPU["GRANT_T"]]
            w[cw + layout.CPU["GRANT_ZONE"]] = w[cw + layout.CPU["WAIT_ZONE"]] = 0
            zb._cache.items.append(h)
            zb._cache.tix.append(t)
        assert zb.alloc(M_NOWAIT) == h
        zb.free(h)
        zb._cache.publish()
        assert_consistent(arena, z)
    finally:
        b.close()


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
