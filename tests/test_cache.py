"""cache: a CPU's bucket cache -- how often it takes the zone lock (never cached:
every time; cached: at most twice a bucket), the adaptive bucket size (grown under
contention, shrunk by a drain), and the keg manager's revocation of an idle CPU's
cache for a sleeper (``take_cache_of``).  One process, on a local arena."""

from core_helpers import arena, assert_consistent
from shmalloc import M_NOWAIT
from shmalloc import layout
from shmalloc.ipc.lock import LocalLock


def zone_lock(arena, zone):
    """LockStats of ``zone``'s lock."""
    (ls,) = [s for s in arena.lock_stats() if s.name == f"zone:{zone.name}"]
    return ls


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


# ============================================================================ revocation
# Items parked in another CPU's cache: the keg manager takes those of a CPU that
# never answers a sleeper's request (take_cache_of).
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
