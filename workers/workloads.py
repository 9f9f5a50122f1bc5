"""Seeded workloads a worker CPU runs against an arena.

The churn (``Churn``) allocates and frees at random over a few zones, keeping a bounded
working set of live items per zone. Every item it allocates is stamped (its handle, this
CPU and a sequence number, then a fill byte); every item it frees is checked first, so an
item handed to two holders at once, or written by someone else, raises
``CorruptionError``.  Its one loop (``Churn.run``) serves ``churn`` (a worker churning
until a deadline), the fleet workload below, the stress sweep (``workers.stress``:
without bursts or stamps, to measure the allocator alone) and the soak
(``workers.soak``: without bursts).

The fleet workloads (``WORKLOADS``, run by ``cpu.cpu_main`` in steps) share one shape:
``step()`` does a little work, ``hold(last=False)`` receives without sending (the
supervisor is quiescing the fleet), ``holdings()`` says what this CPU holds,
``finish()`` checks and frees everything, ``abandon()`` frees without checking.

    churn     ``Churn``: the churn above, in steps
    pipeline  ``Pipeline``: worker 0 builds packets (m_getcl; a header with a sequence
              number and the CRC-32 of the payload, written through mtod) and sends
              them round the ring of CPUs; every stage checks each packet, drops some,
              m_copym's some (the copy shares the cluster: one goes on, the other is
              freed now or kept a while) and forwards the rest; a packet back at worker
              0, or past its hop limit, is freed
    refcount  ``Refcount``: worker 0 makes clusters and many m_copym copies of each,
              scattered over every CPU (itself too); everybody checks the shared data,
              sometimes copies a copy or passes one on, and frees them in random order,
              concurrently; worker 0 frees each original now or later

Producers bound what they have in flight from the team's counters (``made`` minus
``done``, summed over every worker, dead ones included); what a killed worker held
never comes back as ``done``, so a producer that sees no progress for ``STALL_SECONDS``
writes it off.
"""

import contextlib
import random
import time
import zlib
from collections import deque

from shmalloc import (BadHandleError, CorruptionError, DoubleFreeError, ForeignHandleError,
                      ShmallocError)
from shmalloc import mbuf as mb
from shmalloc.mail import CpuGoneError, MailboxFullError

BURST = 64                  # items per burst: more than a CPU caches (2 buckets) for items
                            # of 512 bytes or more, so bursts reach the depot and the keg
BURST_SHARE = 0.02          # share of steps that are bursts
PROGRESS_EVERY = 1024       # ops between progress reports
CHECK_EVERY = 32            # ops between looks at the clock
WORKING_SET_BYTES = 512 << 10
STAMP_SIZE = 16            # an item's stamp: its handle, then CPU << 48 | sequence


def working_set(size):
    """How many live items of ``size`` bytes a churn keeps at most, per zone."""
    return max(32, WORKING_SET_BYTES // size)


class _Items:
    """The live items of one zone held by a churn, with their stamps (when stamped)."""

    def __init__(self, zone, cpu, limit=None, stamped=True):
        self.zone = zone
        self.alloc, self.free = zone.alloc, zone.free
        self.limit = working_set(zone.size) if limit is None else limit
        self.live = []                      # handles
        self.stamps = {} if stamped else None   # handle -> its stamp's sequence number
        self.cpu = cpu
        self.seq = 0
        fill = (cpu * 37 + zone.size) & 0xFF
        self.fill = bytes([fill]) * max(zone.size - STAMP_SIZE, 0)

    def _pattern(self, h, seq):
        mark = h.to_bytes(8, "little") + (self.cpu << 48 | seq).to_bytes(8, "little")
        return (mark + self.fill)[:self.zone.size]

    def stamp(self, h):
        """Write a fresh pattern into item ``h``; return its sequence number (which,
        with ``h``, says what was written)."""
        self.seq += 1
        self.zone.view(h)[:] = self._pattern(h, self.seq)
        return self.seq

    def verify(self, h, seq):
        """Raise CorruptionError unless item ``h`` still holds the pattern ``stamp``
        wrote with ``seq``."""
        got = self.zone.view(h).tobytes()
        stamp = self._pattern(h, seq)
        if got != stamp:
            first = next(i for i, (a, b) in enumerate(zip(got, stamp)) if a != b)
            raise CorruptionError(f"zone {self.zone.name!r}: item {h} changed while held by "
                                  f"CPU {self.cpu} (first bad byte at offset {first})")

    def verify_all(self):
        if self.stamps is not None:
            for h in self.live:
                self.verify(h, self.stamps[h])

    def burst(self, rng, counts):
        """Allocate BURST items (one by one or in bulk), check them, free them all."""
        bulk = rng.random() < 0.5
        if bulk:
            hs = self.zone.alloc_bulk(BURST) or []
            counts["bulk_allocs"] += bool(hs)
        else:
            hs = [h for h in (self.alloc() for _ in range(BURST)) if h is not None]
        counts["failures"] += BURST - len(hs)
        if self.stamps is not None:
            seqs = [self.stamp(h) for h in hs]
            for h, seq in zip(hs, seqs):
                self.verify(h, seq)
        if rng.random() < 0.5:
            self.zone.free_bulk(hs)
            counts["bulk_frees"] += bool(hs)
        else:
            for h in hs:
                self.free(h)
        counts["bursts"] += 1
        return len(hs)

    def release_all(self):
        """Check and free every live item; return how many."""
        n = len(self.live)
        stamps = self.stamps
        while self.live:
            h = self.live.pop()
            if stamps is not None:
                self.verify(h, stamps.pop(h))
            self.free(h)
        return n

    def abandon(self):
        """Free every live item without checking (after a failure), ignoring errors."""
        for h in self.live:
            with contextlib.suppress(ShmallocError):
                self.free(h)
        self.live.clear()
        if self.stamps is not None:
            self.stamps.clear()


def churn(arena, zones, seed, stop_at, progress=None):
    """Churn (``Churn``, with bursts and stamps) over ``zones`` (names) until
    ``time.monotonic() >= stop_at``.

    ``progress(ops)`` is called every PROGRESS_EVERY ops or so. Every item is freed before
    returning (unchecked when the churn fails). Returns a dict of counts: allocs, frees (ops is
    their sum), bursts, bulk_allocs, bulk_frees, failures, seconds.
    """
    work = Churn(arena, None, 0, seed, zones)
    started = time.monotonic()
    reported = 0
    try:
        while time.monotonic() < stop_at:
            work.run(CHECK_EVERY)
            ops = work.counts["ops"]
            if progress is not None and ops - reported >= PROGRESS_EVERY:
                progress(ops)
                reported = ops
    except BaseException:
        work.abandon()
        raise
    counts = work.finish()
    counts["seconds"] = time.monotonic() - started
    if progress is not None:
        progress(counts["ops"])
    return counts


# ============================================================================ fleet workloads
class Churn:
    """The churn: allocate and free at random over a few zones, keeping a bounded working
    set of live items per zone -- the one churn loop (``run``) behind ``churn``, the
    fleet workload (``step``: STEP_OPS operations), the stress sweep and the soak.

    Each operation picks a zone, then: a burst (BURST allocs, then frees, in one go or
    in bulk; BURST_SHARE of the operations, with ``bursts``), a free of a random live
    item (when the zone holds ``working_set`` items -- default ``working_set(size)`` --
    and otherwise half the time) or an alloc.  With ``stamps`` every item allocated is
    stamped and checked before it is freed (module docstring); without, items are not
    touched, so that what is measured is the allocator.  ``counts``: ops (allocs +
    frees), allocs, frees, bursts, bulk_allocs, bulk_frees, failures (allocs that got
    nothing)."""

    STEP_OPS = 32

    def __init__(self, arena, team, index, seed, zones=(), *, working_set=None, bursts=True,
                 stamps=True):
        self.arena = arena
        self.rng = random.Random(seed)
        self.sets = [_Items(arena.zone(name), arena.cpu_id, working_set, stamps)
                     for name in zones]
        if not self.sets:
            raise ValueError("churn needs at least one zone")
        self.burst_share = BURST_SHARE if bursts else 0.0
        self.counts = dict.fromkeys(("ops", "allocs", "frees", "bursts", "bulk_allocs",
                                     "bulk_frees", "failures"), 0)

    def run(self, n):
        """``n`` churn operations."""
        rng, counts, sets = self.rng, self.counts, self.sets
        random_, randrange, choice = rng.random, rng.randrange, rng.choice
        one = sets[0] if len(sets) == 1 else None
        burst_share = self.burst_share
        allocs = frees = failures = 0
        for _ in range(n):
            items = one or choice(sets)
            live = items.live
            r = random_()
            if r < burst_share:
                k = items.burst(rng, counts)
                allocs += k
                frees += k
            elif live and (len(live) >= items.limit or r < 0.5):
                i = randrange(len(live))
                live[i], live[-1] = live[-1], live[i]
                h = live.pop()
                if items.stamps is not None:
                    items.verify(h, items.stamps.pop(h))
                items.free(h)
                frees += 1
            else:
                h = items.alloc()
                if h is None:
                    failures += 1
                    continue
                live.append(h)
                if items.stamps is not None:
                    items.stamps[h] = items.stamp(h)
                allocs += 1
        counts["allocs"] += allocs
        counts["frees"] += frees
        counts["failures"] += failures
        counts["ops"] = counts["allocs"] + counts["frees"]

    def step(self):
        self.run(self.STEP_OPS)

    def hold(self, last=False):
        if not last:
            time.sleep(0.005)

    def holdings(self):
        for items in self.sets:
            items.verify_all()
        return {"used": {items.zone.name: len(items.live) for items in self.sets}}

    def finish(self):
        self.counts["frees"] += sum(items.release_all() for items in self.sets)
        self.counts["ops"] = self.counts["allocs"] + self.counts["frees"]
        return dict(self.counts)

    def abandon(self):
        for items in self.sets:
            items.abandon()


# A packet's data is this header, then the payload: the fields' widths in bytes,
# little-endian (it is the workload's payload, not arena metadata).
PKT_FIELDS = (("seq", 8), ("cpu", 4), ("plen", 4), ("crc", 4))
PKT_SIZE = sum(width for _, width in PKT_FIELDS)


def pack_packet_header(*values):
    return b"".join(v.to_bytes(width, "little") for v, (_, width) in zip(values, PKT_FIELDS))


def unpack_packet_header(data):
    out, at = [], 0
    for _, width in PKT_FIELDS:
        out.append(int.from_bytes(data[at:at + width], "little"))
        at += width
    return out
PAYLOAD_MIN, PAYLOAD_MAX = 16, 1400
STALL_SECONDS = 0.5


class _MbufWork:
    """What the mbuf workloads share: making, checking, sending and freeing packets."""

    def __init__(self, arena, team, index, seed):
        self.mb = mb
        self.arena = arena
        self.team = team
        self.index = index
        self.rng = random.Random(seed)
        self.seq = 0
        self.counts = dict.fromkeys(("ops", "msgs_sent", "items_sent", "items_received",
                                     "mbox_full", "cpu_gone", "made", "done", "dropped",
                                     "free_retries", "packets", "copies", "checked"), 0)
        self._written_off = 0
        self._stalled_since = None
        self._last_done = -1

    # ------------------------------------------------------------------ packets
    def new_packet(self):
        """A packet (m_getcl) holding a header and a random payload, or None."""
        mb = self.mb
        m = mb.m_getcl(mb.M_NOWAIT, mb.MT_DATA, mb.M_PKTHDR, arena=self.arena)
        if m is None:
            return None
        self.seq += 1
        payload = self.rng.randbytes(self.rng.randrange(PAYLOAD_MIN, PAYLOAD_MAX))
        n = PKT_SIZE + len(payload)
        buf = mb.mtod(m)
        buf[:n] = pack_packet_header(self.seq, self.arena.cpu_id, len(payload),
                                     zlib.crc32(payload)) + payload
        m.m_len = n
        m.m_pkthdr.len = n
        self.counts["packets"] += 1
        return m

    def check(self, m, what):
        """Raise CorruptionError unless ``m`` holds an intact packet."""
        n = m.m_len
        data = self.mb.mtod(m)
        problem = None
        if not PKT_SIZE <= n <= len(data):
            problem = f"length {n}"
        else:
            seq, src, plen, crc = unpack_packet_header(data)
            if plen != n - PKT_SIZE or m.m_pkthdr.len != n:
                problem = f"lengths {plen}/{n}/{m.m_pkthdr.len} disagree"
            elif zlib.crc32(data[PKT_SIZE:n]) != crc:
                problem = f"CRC mismatch (packet {seq} of CPU {src})"
            elif m.refcnt < 1:
                problem = f"refcount {m.refcnt}"
        if problem is not None:
            raise CorruptionError(f"CPU {self.arena.cpu_id}: {what} mbuf {m.handle}: {problem}")
        self.counts["checked"] += 1

    def copy(self, m):
        """An m_copym copy of ``m`` sharing its cluster, or None."""
        mb = self.mb
        c = mb.m_copym(m, 0, mb.M_COPYALL, mb.M_NOWAIT)
        if c is not None:
            self.counts["copies"] += 1
        return c

    def free(self, m):
        """m_freem ``m``.  A free-anywhere that read an item's tag just before the
        keg manager re-tagged it for a dead CPU (workers.mbuf_recovery) is refused
        with nothing changed: that one is retried once."""
        try:
            self.mb.m_freem(m)
        except BadHandleError as e:
            if isinstance(e, (DoubleFreeError, ForeignHandleError)):
                raise
            self.counts["free_retries"] += 1
            time.sleep(0.001)
            self.mb.m_freem(m)

    def receive(self, timeout):
        """Mbufs handed to this CPU within ``timeout`` seconds."""
        hs = self.arena.recv(timeout=timeout)
        self.counts["items_received"] += len(hs)
        return [self.mb.Mbuf.from_handle(self.arena, h) for h in hs]

    def send(self, cpu, ms) -> bool:
        """Hand ``ms`` to ``cpu``; False (the mbufs stay here) when its mailbox is
        full; CpuGoneError when it is not live."""
        try:
            self.arena.send(cpu, [m.handle for m in ms])
        except MailboxFullError:
            self.counts["mbox_full"] += 1
            return False
        except CpuGoneError:
            self.counts["cpu_gone"] += 1
            raise
        self.counts["msgs_sent"] += 1
        self.counts["items_sent"] += len(ms)
        return True

    def room(self, window) -> bool:
        """True if the fleet has fewer than ``window`` units in flight (made - done,
        over every worker), writing off what dead workers took with them."""
        done = self.team.total("done")
        inflight = self.team.total("made") - done - self._written_off
        if inflight < window:
            self._stalled_since = None
            return True
        now = time.monotonic()
        if done != self._last_done or self._stalled_since is None:
            self._last_done, self._stalled_since = done, now
        elif now - self._stalled_since > STALL_SECONDS:
            self._written_off += inflight - window // 2
            self._stalled_since = None
        return False

    # ------------------------------------------------------------------ holding
    def held(self):
        """Every mbuf this CPU holds (subclasses)."""
        raise NotImplementedError

    def holdings(self):
        ms = self.held()
        for m in ms:
            self.check(m, "held")
        packets = sum(1 for m in ms if m.m_ext.owner == m.handle)
        return {"used": {"mbuf_packet": packets, "mbuf": len(ms) - packets},
                "owners": [m.m_ext.owner for m in ms], "handles": [m.handle for m in ms]}

    def finish(self):
        for m in self.held():
            self.check(m, "held")
            self.free(m)
            self.counts["done"] += 1
        self._forget()
        return dict(self.counts)

    def abandon(self):
        for m in self.held():
            with contextlib.suppress(Exception):
                self.mb.m_freem(m)
        self._forget()

    def _forget(self):
        raise NotImplementedError


class Pipeline(_MbufWork):
    """Packets round a ring of CPUs (see the module docstring).  Counts: ``made``
    packets built, ``done`` packets ended (dropped, back home, past the hop limit,
    or freed because the next CPU was gone)."""

    WINDOW = 192            # packets in flight in the whole ring
    BATCH = 16              # packets per message
    DROP = 0.1              # share of packets a stage drops
    COPY = 0.3              # share it copies
    KEEP = 32               # copies a stage keeps at most

    def __init__(self, arena, team, index, seed):
        super().__init__(arena, team, index, seed)
        self.producer = index == 0
        self.backlog: deque = deque()       # received, not yet looked at
        self.outbox: list = []              # to forward
        self.kept: list = []                # copies kept a while (their twin went on)
        self.hop_limit = 4 * team.n

    def step(self):
        idle = not (self.backlog or self.outbox) and not self.producer
        self.backlog.extend(self.receive(0.005 if idle else 0.0))
        if self.producer and not self.outbox and self.room(self.WINDOW):
            for _ in range(self.BATCH):
                m = self.new_packet()
                if m is None:
                    break
                self.counts["made"] += 1
                self.counts["ops"] += 1
                self.outbox.append(m)
        for _ in range(min(len(self.backlog), 4 * self.BATCH)):
            self._stage(self.backlog.popleft())
        rng = self.rng
        while self.kept and (len(self.kept) > self.KEEP or rng.random() < 0.2):
            m = self.kept.pop(rng.randrange(len(self.kept)))
            self.check(m, "kept")
            self.free(m)
        self._forward()
        if self.producer and not self.outbox and not self.backlog:
            time.sleep(0.0005)

    def _stage(self, m):
        """One received packet: check it, then drop, copy or forward it."""
        self.check(m, "received")
        self.counts["ops"] += 1
        hops = m.m_pkthdr.ether_vtag + 1
        if self.producer or hops > self.hop_limit:
            self._end(m)                                 # home, or gone round too long
            return
        r = self.rng.random()
        if r < self.DROP:
            self.counts["dropped"] += 1
            self._end(m)
            return
        if r < self.DROP + self.COPY:
            c = self.copy(m)
            if c is not None:
                self.check(c, "copied")
                if self.rng.random() < 0.5:
                    m, c = c, m                          # the copy goes on
                    self.free(c)                         # the original waits for it
                else:
                    self.kept.append(c)
        m.m_pkthdr.ether_vtag = hops & 0xFFFF
        self.outbox.append(m)

    def _end(self, m):
        self.free(m)
        self.counts["done"] += 1

    def _forward(self):
        while self.outbox:
            cpu = self.team.next_cpu(self.index)
            batch = self.outbox[:self.BATCH]
            if cpu < 0:                                   # alone: nobody to hand to
                for m in batch:
                    self._end(m)
            else:
                try:
                    if not self.send(cpu, batch):
                        return                            # full: try again next step
                except CpuGoneError:
                    for m in batch:
                        self.counts["dropped"] += 1
                        self._end(m)
            del self.outbox[:len(batch)]

    def hold(self, last=False):
        self.backlog.extend(self.receive(0.0 if last else 0.005))

    def held(self):
        return [*self.backlog, *self.outbox, *self.kept]

    def _forget(self):
        self.backlog.clear()
        self.outbox.clear()
        self.kept.clear()


class Refcount(_MbufWork):
    """Copies of shared clusters freed concurrently (see the module docstring).
    Counts: ``made`` copies made, ``done`` copies freed."""

    WINDOW = 768            # copies alive in the whole fleet
    PER_CPU = 4             # copies of each cluster per CPU
    POOL = 64               # copies a CPU holds at most
    ORIGINALS = 16          # originals worker 0 keeps at most

    def __init__(self, arena, team, index, seed):
        super().__init__(arena, team, index, seed)
        self.producer = index == 0
        self.pool: list = []                  # copies held
        self.originals: list = []             # worker 0: originals not yet freed

    def step(self):
        rng = self.rng
        got = self.receive(0.0 if self.pool or self.producer else 0.005)
        for m in got:
            self.check(m, "received")
        self.pool.extend(got)
        if self.producer and self.room(self.WINDOW):
            self._produce()
        for _ in range(8):
            if not self.pool or len(self.pool) <= self.POOL and rng.random() < 0.5:
                break
            m = self.pool.pop(rng.randrange(len(self.pool)))
            self.check(m, "pooled")
            r = rng.random()
            if r < 0.1:                                   # a copy of a copy: +1 here
                c = self.copy(m)
                if c is not None:
                    self.check(c, "copied")
                    self.counts["made"] += 1
                    self.pool.append(c)
            elif r < 0.15 and self._pass_on(m):
                continue
            self.free(m)
            self.counts["done"] += 1
            self.counts["ops"] += 1
        while self.originals and (len(self.originals) > self.ORIGINALS or rng.random() < 0.1):
            m = self.originals.pop(rng.randrange(len(self.originals)))
            self.check(m, "original")
            self.free(m)

    def _produce(self):
        m = self.new_packet()
        if m is None:
            time.sleep(0.001)
            return
        cpus = [self.arena.cpu_id, *self.team.other_cpus(self.index)]
        for cpu in cpus:
            copies = [c for c in (self.copy(m) for _ in range(self.PER_CPU)) if c is not None]
            self.counts["made"] += len(copies)
            self.counts["ops"] += len(copies)
            if cpu == self.arena.cpu_id:
                self.pool.extend(copies)
                continue
            try:
                if self.send(cpu, copies):
                    continue
            except CpuGoneError:
                pass
            for c in copies:                              # not handed over: free here
                self.free(c)
                self.counts["done"] += 1
        if self.rng.random() < 0.5:
            self.free(m)                                  # now: it waits for its copies
        else:
            self.originals.append(m)                      # later: maybe after them

    def _pass_on(self, m) -> bool:
        """Hand copy ``m`` to another CPU; False if it stays here."""
        others = self.team.other_cpus(self.index)
        if not others:
            return False
        try:
            return self.send(self.rng.choice(others), [m])
        except CpuGoneError:
            return False

    def hold(self, last=False):
        got = self.receive(0.0 if last else 0.005)
        self.pool.extend(got)

    def held(self):
        return [*self.pool, *self.originals]

    def _forget(self):
        self.pool.clear()
        self.originals.clear()


WORKLOADS = {"churn": Churn, "pipeline": Pipeline, "refcount": Refcount}
