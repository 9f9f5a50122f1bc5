"""Seeded workloads a worker CPU runs against an arena.

``churn`` allocates and frees at random over a few zones, keeping a bounded working set
of live items per zone. Every item it allocates is stamped (its handle, this CPU and a
sequence number, then a fill byte); every item it frees is checked first, so an item handed
to two holders at once, or written by someone else, raises ``CorruptionError``.
"""

import contextlib
import random
import struct
import time

from shmalloc import CorruptionError, ShmallocError

BURST = 64                  # items per burst: more than a CPU caches (2 buckets) for items
                            # of 512 bytes or more, so bursts reach the depot and the keg
BURST_SHARE = 0.02          # share of steps that are bursts
PROGRESS_EVERY = 1024       # ops between progress reports
WORKING_SET_BYTES = 512 << 10
_STAMP = struct.Struct("<QQ")


def working_set(size):
    """How many live items of ``size`` bytes a churn keeps at most, per zone."""
    return max(32, WORKING_SET_BYTES // size)


class _Items:
    """The live items of one zone held by this churn, with their stamps."""

    def __init__(self, zone, cpu):
        self.zone = zone
        self.limit = working_set(zone.size)
        self.live = []                      # [(handle, stamp)]
        self.cpu = cpu
        self.seq = 0
        fill = (cpu * 37 + zone.size) & 0xFF
        self.fill = bytes([fill]) * max(zone.size - _STAMP.size, 0)

    def stamp(self, h):
        """Write a fresh pattern into item ``h``; return what was written."""
        self.seq += 1
        stamp = (_STAMP.pack(h, self.cpu << 48 | self.seq) + self.fill)[:self.zone.size]
        self.zone.view(h)[:] = stamp
        return stamp

    def verify(self, h, stamp):
        """Raise CorruptionError unless item ``h`` still holds ``stamp``."""
        got = self.zone.view(h).tobytes()
        if got != stamp:
            first = next(i for i, (a, b) in enumerate(zip(got, stamp)) if a != b)
            raise CorruptionError(f"zone {self.zone.name!r}: item {h} changed while held by "
                                  f"CPU {self.cpu} (first bad byte at offset {first})")

    def alloc(self):
        """Allocate one item into the working set; False if the zone could not give one."""
        h = self.zone.alloc()
        if h is None:
            return False
        self.live.append((h, self.stamp(h)))
        return True

    def free_random(self, rng):
        """Check and free one live item chosen at random."""
        i = rng.randrange(len(self.live))
        self.live[i], self.live[-1] = self.live[-1], self.live[i]
        h, stamp = self.live.pop()
        self.verify(h, stamp)
        self.zone.free(h)

    def burst(self, rng, counts):
        """Allocate BURST items (one by one or in bulk), check them, free them all."""
        bulk = rng.random() < 0.5
        if bulk:
            hs = self.zone.alloc_bulk(BURST) or []
            counts["bulk_allocs"] += bool(hs)
        else:
            hs = [h for h in (self.zone.alloc() for _ in range(BURST)) if h is not None]
        counts["failures"] += BURST - len(hs)
        stamps = [self.stamp(h) for h in hs]
        for h, stamp in zip(hs, stamps):
            self.verify(h, stamp)
        if rng.random() < 0.5:
            self.zone.free_bulk(hs)
            counts["bulk_frees"] += bool(hs)
        else:
            for h in hs:
                self.zone.free(h)
        counts["bursts"] += 1
        return len(hs)

    def release_all(self):
        """Check and free every live item; return how many."""
        n = len(self.live)
        while self.live:
            h, stamp = self.live.pop()
            self.verify(h, stamp)
            self.zone.free(h)
        return n

    def abandon(self):
        """Free every live item without checking (after a failure), ignoring errors."""
        for h, _ in self.live:
            with contextlib.suppress(ShmallocError):
                self.zone.free(h)
        self.live.clear()


def churn(arena, zones, seed, stop_at, progress=None):
    """Allocate and free at random over ``zones`` (names) until ``time.monotonic() >= stop_at``.

    Each step picks a zone, then: a burst (BURST allocs then frees, BURST_SHARE of steps),
    an alloc (while under the zone's working set, half the time) or a free of a random live
    item. ``progress(ops)`` is called every PROGRESS_EVERY ops. Every item is freed before
    returning (unchecked when the churn fails). Returns a dict of counts: allocs, frees (ops is
    their sum), bursts, bulk_allocs, bulk_frees, failures, seconds.
    """
    rng = random.Random(seed)
    sets = [_Items(arena.zone(name), arena.cpu_id) for name in zones]
    counts = dict.fromkeys(("allocs", "frees", "bursts", "bulk_allocs", "bulk_frees",
                            "failures"), 0)
    started = time.monotonic()
    reported = 0
    try:
        while time.monotonic() < stop_at:
            items = rng.choice(sets)
            r = rng.random()
            if r < BURST_SHARE:
                n = items.burst(rng, counts)
                counts["allocs"] += n
                counts["frees"] += n
            elif items.live and (len(items.live) >= items.limit or r < 0.5):
                items.free_random(rng)
                counts["frees"] += 1
            elif items.alloc():
                counts["allocs"] += 1
            else:
                counts["failures"] += 1
            ops = counts["allocs"] + counts["frees"]
            if progress is not None and ops - reported >= PROGRESS_EVERY:
                progress(ops)
                reported = ops
    except BaseException:
        for items in sets:
            items.abandon()
        raise
    counts["frees"] += sum(items.release_all() for items in sets)
    counts["ops"] = counts["allocs"] + counts["frees"]
    counts["seconds"] = time.monotonic() - started
    if progress is not None:
        progress(counts["ops"])
    return counts
