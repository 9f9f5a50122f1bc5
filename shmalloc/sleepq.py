"""sleepq: a zone's FIFO queue of M_WAITOK sleepers, the sleep itself (case A4)
and the hand-over of a freed item to the first sleeper (case F2).

An M_WAITOK allocation that finds nothing in its cache, the depot or the keg
(within the zone's limit) queues its CPU here and sleeps; it wakes when

    F2  a free hands it an item (``grant``): the item is tagged CACHED by the
        sleeper and parked in its CPU slot's grant words; frees bypass every
        cache while the zone has sleepers, so no item is stranded in one
    --  room opens (depot items, a raised limit, free items or pages) and it is
        first in the queue: it leaves the queue and tries an import itself
    --  its own items come home by mail, the arena closes (ArenaClosedError), or
        its deadline passes (TimeoutError)

Going to sleep it asks every other live CPU for its cached items of the zone
(``ask_for_caches``: a drain request, issue 11's MSG_ZDRAIN), and drains this
CPU's zones whose cached items hold items of this one (``register_drain_companion``:
a cached packet holds a cluster).

Words (``layout``): zone record SQ_HEAD, SQ_TAIL (positions, growing; entry ``i``
at ring word ``i % MAX_CPUS``), the ring of CPU ids at ZONE_SLEEPQ_WORD (-1 a
tombstone: a sleeper gone from the middle), SLEEPERS, SLEEPS; per CPU slot
WAIT_ZONE (zone id + 1 it waits on), GRANT_ZONE, GRANT_H, GRANT_T.

Invariants, whenever the zone lock is free (``check`` executes the first two):

    0 <= SQ_TAIL - SQ_HEAD <= MAX_CPUS
    SLEEPERS == entries >= 0 in ring[SQ_HEAD:SQ_TAIL]
    a CPU is queued at most once, with WAIT_ZONE == zone id + 1
    GRANT_ZONE == zone id + 1  =>  the CPU is not queued, and item GRANT_H (tag
        index GRANT_T) is tagged CACHED, held by it

Lock: the queue's methods need the zone lock held on entry and on return
(``Lock: zone``); ``SleepQueue.sleep`` takes it itself.
"""

from __future__ import annotations

import time

from . import layout as L
from .errors import ArenaClosedError

SLEEP_SLICE = 0.05             # seconds an M_WAITOK sleeper waits between two looks

_Z = L.ZONE
_C = L.CPU


# Zone name -> names of the zones whose cached items hold items of it (a cached packet
# holds a cluster): when a request sleeps on the zone, those are drained first, here
# and by the CPUs asked for their caches.  Upper layers register (the mbuf layer:
# mbuf_cluster <- mbuf_packet); the core names none.
_DRAIN_COMPANIONS: dict[str, tuple[str, ...]] = {}


def register_drain_companion(name: str, companion: str) -> None:
    """Items of zone ``name`` sit inside cached items of zone ``companion`` (its
    init takes one, its fini gives it back): a sleeper on ``name`` also needs
    ``companion``'s caches and depot drained."""
    if companion not in _DRAIN_COMPANIONS.get(name, ()):
        _DRAIN_COMPANIONS[name] = _DRAIN_COMPANIONS.get(name, ()) + (companion,)


def drain_companions(name: str) -> tuple[str, ...]:
    return _DRAIN_COMPANIONS.get(name, ())


class SleepQueue:
    """The sleep queue of zone ``zone_id``; ``wake(cpu)`` posts a sleeper (the
    arena's), needed by ``grant`` only."""

    __slots__ = ("core", "zone_id", "zw", "zidx", "wake")

    def __init__(self, core, zone_id: int, wake=None):
        self.core = core
        self.zone_id = zone_id
        self.zw = L.zone_word(zone_id)
        self.zidx = core.w[self.zw + _Z["ZIDX"]]
        self.wake = wake

    # ------------------------------------------------------------------ the queue
    def first(self) -> int:
        """The first sleeper, or -1; tombstones at the head are dropped.
        Lock: zone."""
        w, zw = self.core.w, self.zw
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        q = zw + L.ZONE_SLEEPQ_WORD
        while head < tail and w[q + head % L.MAX_CPUS] < 0:
            head += 1
        w[zw + _Z["SQ_HEAD"]] = head
        return w[q + head % L.MAX_CPUS] if head < tail else -1

    def push(self, cpu: int) -> None:
        """Queue ``cpu`` last.  Lock: zone."""
        w, zw = self.core.w, self.zw
        self.first()                            # drop tombstones at the head
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        if tail - head >= L.MAX_CPUS:
            self.compact()
            tail = w[zw + _Z["SQ_TAIL"]]
        w[zw + L.ZONE_SLEEPQ_WORD + tail % L.MAX_CPUS] = cpu
        w[zw + _Z["SQ_TAIL"]] = tail + 1
        w[zw + _Z["SLEEPERS"]] += 1

    def compact(self) -> None:
        """Squeeze tombstones out of the ring, keeping FIFO order.  Lock: zone."""
        w, zw = self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        live = [c for c in (w[q + i % L.MAX_CPUS] for i in range(head, tail)) if c >= 0]
        for i, c in enumerate(live):
            w[q + (head + i) % L.MAX_CPUS] = c
        w[zw + _Z["SQ_TAIL"]] = head + len(live)

    def contains(self, cpu: int) -> bool:
        """Lock: zone."""
        w, zw = self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        return any(w[q + i % L.MAX_CPUS] == cpu
                   for i in range(w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]))

    def remove(self, cpu: int) -> None:
        """Take ``cpu`` out of the queue (a tombstone where it was).  Lock: zone."""
        w, zw = self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        for pos in range(w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]):
            if w[q + pos % L.MAX_CPUS] == cpu:
                w[q + pos % L.MAX_CPUS] = -1
                w[zw + _Z["SLEEPERS"]] -= 1
                break
        self.first()

    def waiting(self) -> list[int] | None:
        """The queued CPUs in order (tombstones left out), or None when the head
        and tail are not 0..MAX_CPUS apart.  Lock: zone."""
        w, zw = self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        if not 0 <= tail - head <= L.MAX_CPUS:
            return None
        return [c for c in (w[q + i % L.MAX_CPUS] for i in range(head, tail)) if c >= 0]

    def rebuild(self) -> None:
        """Keep the live CPUs that still wait on this zone, in order, each once
        (after a dead lock holder, or a dead sleeper).  Lock: zone (or repaired)."""
        core, w, zw = self.core, self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        if not 0 <= tail - head <= L.MAX_CPUS:
            head = tail = 0
        live = set(core.live_cpus())
        keep = []
        for i in range(head, tail):
            c = w[q + i % L.MAX_CPUS]
            if c in live and c not in keep and \
                    w[L.cpu_word(c) + _C["WAIT_ZONE"]] == self.zone_id + 1:
                keep.append(c)
        for i, c in enumerate(keep):
            w[q + i] = c
        w[zw + _Z["SQ_HEAD"]] = 0
        w[zw + _Z["SQ_TAIL"]] = len(keep)
        w[zw + _Z["SLEEPERS"]] = len(keep)

    # ------------------------------------------------------------------ F2, room
    def grant(self, h: int, t: int) -> bool:
        """F2: hand a freed (dtor'd, still inited) item ``h`` (tag index ``t``) to
        the first sleeper: tagged CACHED by it, parked in its grant words, the
        sleeper posted.  False when nobody sleeps.  Lock: zone."""
        first = self.first()
        if first < 0:
            return False
        core, w = self.core, self.core.w
        self.remove(first)
        cw = L.cpu_word(first)
        core.tags[t] = L.tag(L.TAG_CACHED, self.zidx, first, first)
        w[cw + _C["GRANT_H"]] = h
        w[cw + _C["GRANT_T"]] = t
        w[cw + _C["GRANT_ZONE"]] = self.zone_id + 1
        self.wake(first)
        return True

    def room_now(self, keg) -> bool:
        """Could an import succeed now (depot items, room under the limit, free
        items in ``keg`` or pages for a slab)?  Lock: zone."""
        core, w, zw = self.core, self.core.w, self.zw
        if w[zw + _Z["DEPOT_N"]]:
            return True
        limit = w[zw + _Z["LIMIT"]]
        if limit and w[zw + _Z["ITEMS"]] >= limit:
            return False
        return (core.w[keg.kw + L.KEG["FREE_ITEMS"]] > 0
                or core.w[L.HDR["FREE_PAGES"]] >= keg.ppera)

    # ------------------------------------------------------------------ A4
    def sleep(self, cache, how, deadline) -> None:
        """A4: ``cache``'s CPU waits, FIFO among this zone's sleepers, until an
        item is on its stack: a freed one handed over (``grant``), or one imported
        when room opens (the init may fail again: then back in the queue, the
        same sleep).  One sleep is counted, and no failure while asleep.  Every
        round checks, under the zone lock, for a grant first, then the arena
        closing (ArenaClosedError) and the deadline (TimeoutError, uncounted here:
        the caller counts it).  Lock: none on entry; takes zone."""
        w, zw, cpu = self.core.w, self.zw, cache.cpu
        cw = L.cpu_word(cpu)
        zid1 = self.zone_id + 1
        arena = cache.arena
        arena._flush_xfree()                # what this CPU freed for others goes home first
        wake = arena._wake_sem()
        wake.drain()
        lk = cache._zlock()
        try:
            w[cw + _C["GRANT_ZONE"]] = 0
            w[cw + _C["WAIT_ZONE"]] = zid1
            self.push(cpu)
            w[zw + _Z["SLEEPS"]] += 1
        finally:
            lk.release()
        cache.sleeps += 1
        cache.publish()
        cache.refresh()
        ask_for_caches(cache)
        mail = arena._mail
        while True:
            if mail.pending():              # asleep, this CPU still answers its mail
                mail.collect()
            lk = cache._zlock()
            try:
                if w[cw + _C["GRANT_ZONE"]] == zid1:
                    h, t = w[cw + _C["GRANT_H"]], w[cw + _C["GRANT_T"]]
                    w[cw + _C["GRANT_ZONE"]] = 0
                    w[cw + _C["WAIT_ZONE"]] = 0
                    cache.items.append(h)
                    cache.tix.append(t)
                    break
                if cache.items:             # its own items, come home by mail
                    self.remove(cpu)
                    w[cw + _C["WAIT_ZONE"]] = 0
                    break
                now = time.monotonic()
                if arena._closing or (deadline is not None and now >= deadline):
                    self.remove(cpu)
                    w[cw + _C["WAIT_ZONE"]] = 0
                    if arena._closing:
                        raise ArenaClosedError(f"zone {cache.zone.name!r}: arena "
                                               f"{arena.name!r} was closed while this "
                                               f"M_WAITOK allocation slept")
                    raise TimeoutError(f"zone {cache.zone.name!r}: no item became free "
                                       f"within the time allowed")
                if not self.contains(cpu):
                    # dequeued by a granter that died before granting: queue again
                    self.push(cpu)
                attempt = self.first() == cpu and self.room_now(cache.zone.keg)
                if attempt:
                    self.remove(cpu)
                    w[cw + _C["WAIT_ZONE"]] = 0
            finally:
                lk.release()
            if attempt:
                if cache._fill(1, how, deadline):
                    break
                # lost the room to a racing M_NOWAIT allocation, or the zone's init
                # failed: back in the queue, still the same sleep
                lk = cache._zlock()
                try:
                    w[cw + _C["WAIT_ZONE"]] = zid1
                    self.push(cpu)
                finally:
                    lk.release()
            # Short slices: a slot in the arena may also open up by a free to the
            # keg from another zone (pages), which posts nobody.
            left = SLEEP_SLICE if deadline is None else deadline - time.monotonic()
            wake.wait(max(0.0, min(left, SLEEP_SLICE)))
        cache.refresh()
        cache.publish()


def ask_for_caches(cache) -> None:
    """A request of ``cache``'s CPU goes to sleep: the items it waits for may sit
    in caches.  Drain this CPU's companion zones (``register_drain_companion``:
    their cached items hold items of this zone), and ask every other live CPU, by
    a message it acts on when it next takes its mail, for its cached items of this
    zone -- once per sleep, and never while such a request already waits in its
    mailbox.  Published counts lag a CPU's fast path, so every live CPU is asked.
    A CPU that does not answer within ``GRACE`` seconds has its cache taken by the
    keg manager (``CpuCache.take_cache_of``).  Lock: none."""
    arena, zone = cache.arena, cache.zone
    arena._drain_companions(zone.name)
    mail = arena._mail
    for cpu in cache.core.live_cpus():
        if cpu != cache.cpu:
            mail.ask_drain(cpu, zone.id)
