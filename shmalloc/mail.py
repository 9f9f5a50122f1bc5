"""mail: messages between CPUs — cross-CPU frees going home, hand-offs of items,
and requests from the keg manager.

Every CPU has a mailbox in the arena: an ``ipc.ring.Ring`` of msgpack records
under the CPU's mailbox lock (``layout.mbox_lock_index``), with the CPU's wake
semaphore posted after each delivery.  Rings were chosen over POSIX message
queues after measuring both (docs/operations.md, "Limits"): no per-user queue budget to exhaust, a
mailbox is visible and removable with the arena's segment, and one record holds
hundreds of handles.

A message is ``[kind, src_cpu, src_gen, groups]`` with ``groups`` a list of
``[zone_id, [handle, ...]]``.  Kinds:

    MSG_XFREE    items freed by ``src`` that came from this CPU's cache: they go
                 back into it (snmalloc's batched remote frees)
    MSG_HANDOFF  items handed to this CPU (``arena.send``): ownership moves
    MSG_DRAIN    the keg manager asks for this CPU's caches (low memory): given back
                 when the mail is taken; the layers' drain-request handlers (the mbuf
                 layer's protocol drains) run at the CPU's next poll or recv
                 (``layers.run_drain_requests``)
    MSG_ZDRAIN   a CPU asleep at a zone's limit asks for this CPU's cached items of
                 that zone (groups ``[[zone_id, []]]``); at most one is in a mailbox per
                 zone (the CPU's DRAIN_ASKED bits, under its mailbox lock), and the
                 receiver gives its cache of the zone back when it takes its mail --
                 at its next recv, poll or slow path (``Arena._drain_zone``)

Items travel tagged: a hand-off ``INFLIGHT``, a remote free ``XFREE``, with the
destination as holder.  The sender writes the record, then re-tags the items,
both under the destination's mailbox lock; the receiver re-tags what it takes
under the same lock.  So whenever a mailbox lock is free, the INFLIGHT and XFREE
items of a CPU are exactly those its mailbox lists, and a CPU that dies anywhere
in between leaves nothing that recovery cannot find from the tags.

Everything received is validated: a record that does not decode, has the wrong
shape, names a dead zone, or lists a handle whose tag does not say it is in
flight to this CPU is counted (``bad``) and dropped, never trusted.

Lock: mailbox locks are leaves: nothing else is taken while one is held.
"""

from __future__ import annotations

from collections import deque

from . import layout as L
from .debug import KILLPOINTS, killpoint
from .errors import ShmallocError
from .ipc import codec
from .ipc.ring import RING_HEAD, Ring

MSG_XFREE, MSG_HANDOFF, MSG_DRAIN, MSG_ZDRAIN = 1, 2, 3, 4
_KINDS = (MSG_XFREE, MSG_HANDOFF, MSG_DRAIN, MSG_ZDRAIN)
_C = L.CPU
_STATE_HOLDER_MASK = 0xFF0F      # state and holder bits of a tag


class MailboxFullError(ShmallocError):
    """The destination's mailbox has no room now; the items stay with the sender."""


class CpuGoneError(ShmallocError):
    """The destination CPU slot is not live (closed, or its process died)."""


def mbox_words(core, cpu: int) -> int:
    """Word index of ``cpu``'s mailbox ring (0 if it has none)."""
    return core.w[L.cpu_word(cpu) + _C["MBOX_OFF"]] >> 3


def ring_of(core, cpu: int) -> Ring:
    off = core.w[L.cpu_word(cpu) + _C["MBOX_OFF"]]
    pages = core.w[L.cpu_word(cpu) + _C["MBOX_PAGES"]]
    return Ring(core.w[off >> 3:(off + pages * L.PAGE_SIZE) >> 3])


def mail_taken(core, cpu: int) -> int:
    """How far ``cpu`` has read its mailbox (a position that grows with every
    record taken): unchanged means it has not taken its mail meanwhile."""
    return ring_of(core, cpu).words[RING_HEAD]


def max_handles(core, cpu: int) -> int:
    """Handles that fit in one message to ``cpu`` (a msgpack int is <= 9 bytes)."""
    pages = core.w[L.cpu_word(cpu) + _C["MBOX_PAGES"]]
    return (pages * L.PAGE_SIZE - 8 * L.MBOX_RING_WORDS - 64) // 9


class PostOffice:
    """One CPU's side of the mail: its own mailbox and what it sends."""

    def __init__(self, arena):
        self.arena = arena
        self.core = arena._core
        self.cpu = arena.cpu_id
        self.ring = ring_of(self.core, self.cpu)
        self._rings: dict[int, tuple] = {}      # dest -> ((offset, pages), Ring)
        self.inbox: deque[int] = deque()       # handed-over handles not yet recv()'d
        self.bad = 0                           # records or handles dropped as invalid
        self.received = 0
        self.drains = 0
        self.zdrains = 0                       # drain requests of one zone acted on
        self.drain_requested = False           # MSG_DRAIN came: the layers' handlers are due
        self.draining = False                  # they are running (layers.run_drain_requests)
        self._collecting = False

    # ------------------------------------------------------------------ sending
    def post(self, dest: int, kind: int, groups, new_state: int) -> bool:
        """Send one message of ``groups`` (``(zone_id, zidx, handles, tag_indexes)``,
        optionally followed by the tag every item of the group has, as checked by
        the caller) to ``dest`` and re-tag its items ``new_state`` held by ``dest``.
        False when ``dest`` is not live or its mailbox is full (nothing changed)."""
        core, w = self.core, self.core.w
        cw = L.cpu_word(dest)
        gen = w[cw + _C["GEN"]]
        if w[cw + _C["STATE"]] != L.CPU_LIVE or not w[cw + _C["MBOX_OFF"]]:
            return False
        ring = self._ring_of(dest)
        payload = codec.encode([kind, self.cpu, w[L.cpu_word(self.cpu) + _C["GEN"]],
                                [[g[0], g[2]] for g in groups]])
        lk = core.lock(L.mbox_lock_index(dest))
        lk.acquire(owner_id=self.cpu)
        try:
            if w[cw + _C["STATE"]] != L.CPU_LIVE or w[cw + _C["GEN"]] != gen:
                return False            # the slot changed hands: so may its mailbox
            if not ring.put(payload):
                return False
            if KILLPOINTS:
                killpoint("mail.post")
            tags = core.tags
            bits = new_state | dest << 8
            for g in groups:
                if len(g) > 4:                  # one tag for all: one value to write
                    tv = (g[4] & ~_STATE_HOLDER_MASK) | bits
                    for t in g[3]:
                        tags[t] = tv
                else:
                    for t in g[3]:
                        tags[t] = (tags[t] & ~_STATE_HOLDER_MASK) | bits
        finally:
            lk.release()
        self.arena._post_wake(dest)
        return True

    def ask_drain(self, dest: int, zone_id: int) -> bool:
        """Ask CPU ``dest`` for its cached items of zone ``zone_id`` (MSG_ZDRAIN),
        unless such a request already waits in its mailbox (its DRAIN_ASKED bit for
        the zone, set here and cleared when it takes its mail).  True if sent.
        Lock: takes ``dest``'s mailbox lock."""
        core, w = self.core, self.core.w
        cw = L.cpu_word(dest)
        gen = w[cw + _C["GEN"]]
        if w[cw + _C["STATE"]] != L.CPU_LIVE or not w[cw + _C["MBOX_OFF"]]:
            return False
        bit = L.zone_bit(zone_id)
        if w[cw + _C["DRAIN_ASKED"]] & bit:          # unlocked peek; checked again below
            return False
        ring = self._ring_of(dest)
        payload = codec.encode([MSG_ZDRAIN, self.cpu, w[L.cpu_word(self.cpu) + _C["GEN"]],
                                [[zone_id, []]]])
        lk = core.lock(L.mbox_lock_index(dest))
        lk.acquire(owner_id=self.cpu)
        try:
            if (w[cw + _C["STATE"]] != L.CPU_LIVE or w[cw + _C["GEN"]] != gen
                    or w[cw + _C["DRAIN_ASKED"]] & bit or not ring.put(payload)):
                return False
            w[cw + _C["DRAIN_ASKED"]] |= bit
        finally:
            lk.release()
        self.arena._post_wake(dest)
        return True

    def _ring_of(self, dest: int) -> Ring:
        """``dest``'s mailbox, kept from one post to the next while the slot keeps
        its mailbox (``post`` checks the slot's generation under the lock)."""
        cw = L.cpu_word(dest)
        where = (self.core.w[cw + _C["MBOX_OFF"]], self.core.w[cw + _C["MBOX_PAGES"]])
        kept = self._rings.get(dest)
        if kept is None or kept[0] != where:
            kept = self._rings[dest] = (where, ring_of(self.core, dest))
        return kept[1]

    # ------------------------------------------------------------------ receiving
    def pending(self) -> bool:
        """Mail waiting (a lock-free peek, cheap enough for every slow path)."""
        return self.ring.pending() > 0

    def collect(self) -> None:
        """Take every message: remote frees go into the zones' caches, hand-offs
        into the inbox, drain requests drain the caches.  (A drain here may free
        into a zone with sleepers, whose free path takes the mail: that nested
        call returns at once, the next one takes what came meanwhile.)"""
        if self._collecting:
            return
        self._collecting = True
        try:
            self._collect()
        finally:
            self._collecting = False

    def _collect(self) -> None:
        core = self.core
        lk = core.lock(L.mbox_lock_index(self.cpu))
        lk.acquire(owner_id=self.cpu)
        try:
            records = self.ring.take_all()
            if KILLPOINTS and records:
                killpoint("mail.collect")
            xfrees, drain, zdrains = self._accept(records)
            core.w[L.cpu_word(self.cpu) + _C["DRAIN_ASKED"]] = 0    # all taken
        finally:
            lk.release()
        for zone_id, (hs, ts) in xfrees.items():
            self.arena._zone_by_id(zone_id)._cache.take_home(hs, ts)
        if drain:
            self.drains += 1
            self.drain_requested = True        # the layers' part: at the next safe point
            self.arena._drain_caches()
        for zone_id in zdrains:
            self.zdrains += 1
            self.arena._drain_zone(zone_id)

    def _accept(self, records):
        """Validate and re-tag.  Lock: own mailbox."""
        xfrees: dict[int, tuple[list, list]] = {}
        drain = False
        zdrains: list[int] = []
        live = self.core.live_zone_ids()
        for rec in records:
            msg = self._parse(rec, live)
            if msg is None:
                continue
            kind, src, groups = msg
            if kind == MSG_DRAIN:
                drain = True
                continue
            if kind == MSG_ZDRAIN:
                if len(groups) != 1 or groups[0][1]:    # one zone, no handles
                    self.bad += 1
                elif groups[0][0] not in zdrains:
                    zdrains.append(groups[0][0])
                continue
            for zone_id, handles in groups:
                zone = self.arena._zone_by_id(zone_id)
                if kind == MSG_XFREE:
                    hs, ts = xfrees.setdefault(zone_id, ([], []))
                else:
                    hs, ts = self.inbox, []
                self._take_group(kind, src, zone, handles, hs, ts)
        return xfrees, drain, zdrains

    def _take_group(self, kind, src, zone, handles, hs, ts) -> None:
        """Re-tag the items of one zone that a message from CPU ``src`` brings,
        each checked to be in flight to this CPU, and append them (and their tag
        indexes) to ``hs`` and ``ts``; the rest are counted bad.

        A remote free comes home CACHED.  A hand-off becomes ALLOC, held here; in
        a zone with xfree="local" it also becomes this CPU's own (home := here), so
        that its free is a fast-path free into this CPU's cache and whole buckets
        go back through the depot (UMA's way); with xfree="message" it keeps its
        home and goes back there when freed.  Lock: own mailbox."""
        me, tags = self.cpu, self.core.tags
        keg, zidx = zone.keg, zone.zidx
        want = (L.TAG_XFREE if kind == MSG_XFREE else L.TAG_INFLIGHT) | zidx << 4 | me << 8
        if kind == MSG_XFREE:
            new, keep = L.TAG_CACHED | zidx << 4 | me << 8 | me << 16, 0
        elif zone._cache.xfree_message:
            new, keep = L.TAG_ALLOC | zidx << 4 | me << 8, 0xFF0000      # home kept
        else:
            new, keep = L.TAG_ALLOC | zidx << 4 | me << 8 | me << 16, 0  # re-homed
        # The usual case, in one pass: every item's home is the sender (a hand-off
        # of its own items) or this CPU (a remote free coming home).  A handle
        # listed twice is bad the second time: its tag changed.
        home = me if kind == MSG_XFREE else src
        done = keg.retag(handles, want | home << 16, new | home << 16 if keep else new)
        n = len(done)
        if n:
            hs.extend(handles[:n])
            ts.extend(done)
            self.received += n
            if n == len(handles):
                return
        handles = handles[n:]
        try:                                    # other homes: the tags are masked
            tis = keg.tag_indexes(handles)
        except (IndexError, TypeError, KeyError):
            tis = ()
        n = 0
        for t in tis:                           # up to the first bad one
            tv = tags[t]
            if tv & 0xFFFF != want:
                break
            tags[t] = (tv & keep) | new
            n += 1
        if n:
            hs.extend(handles[:n])
            ts.extend(tis[:n])
            self.received += n
            if n == len(handles):
                return
        for h in handles[n:]:                   # one by one, counting the bad ones
            t = keg.tag_index_of(h) if type(h) is int else -1
            if t < 0:
                self.bad += 1
                continue
            tv = tags[t]
            if tv & 0xFFFF != want:
                self.bad += 1
                continue
            tags[t] = (tv & keep) | new
            hs.append(h)
            ts.append(t)
            self.received += 1

    def _parse(self, rec, live):
        """(kind, src_cpu, [(zone_id, handles)]) of a well-formed record naming only
        zones in ``live``, else None (counted)."""
        try:
            msg = codec.decode(rec)
        except codec.MessageError:
            self.bad += 1
            return None
        ok = (isinstance(msg, list) and len(msg) == 4 and msg[0] in _KINDS
              and isinstance(msg[1], int) and 0 <= msg[1] < L.MAX_CPUS
              and isinstance(msg[3], list))
        groups = []
        if ok:
            for g in msg[3]:
                if not (isinstance(g, list) and len(g) == 2 and isinstance(g[0], int)
                        and g[0] in live and isinstance(g[1], list)):
                    ok = False
                    break
                groups.append((g[0], g[1]))
        if not ok:
            self.bad += 1
            return None
        return msg[0], msg[1], groups
