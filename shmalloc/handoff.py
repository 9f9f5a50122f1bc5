"""handoff: items passed between CPUs -- ``send``/``recv`` of allocated items
(ownership moves with the message), ``disown``/``claim`` of references that travel
by other means (a pickle), ``poll``, and giving back what a CPU holds in its caches
when asked to drain.

Every item has a holder, the CPU its tag names; ``send`` checks that the caller
holds every item, the mailbox (``mail``) re-tags them in flight, and the receiver's
``recv`` takes them as its own.  A full mailbox or a dead destination leaves the
items with the sender (``MailboxFullError``, ``CpuGoneError``).
"""

from __future__ import annotations

import time

from . import layers
from . import layout as L
from .errors import ArenaClosedError, ShmallocError
from .hooks import DTOR_RECOVER
from .mail import CpuGoneError, MailboxFullError, max_handles, MSG_HANDOFF
from .zone import as_handle, drain_companions
from .zcreate import check_int

_H, _Z, _C, _K = L.HDR, L.ZONE, L.CPU, L.KEG



class Messages:
    """The hand-off half of ``Arena`` (a mixin)."""

    def send(self, dest_cpu: int, handles, timeout: float = 0.0) -> None:
        """Hand items to CPU ``dest_cpu``: ownership moves with the message.
        Every handle must be allocated and held by this CPU.  Raises
        MailboxFullError if the mailbox stays full for ``timeout`` seconds, and
        CpuGoneError if ``dest_cpu`` is not live; the items then stay here."""
        self._check_open()
        if (here := self._here()) is not self:
            return here.send(dest_cpu, handles, timeout)
        hs = [handles] if isinstance(handles, int) else list(handles)
        dest = check_int("dest_cpu", dest_cpu, 0)
        if dest >= L.MAX_CPUS:
            raise ValueError(f"dest_cpu {dest} >= {L.MAX_CPUS}")
        if not hs:
            return
        if len(set(hs)) != len(hs):
            raise ShmallocError(f"arena {self.name!r}: send lists a handle twice")
        limit = max_handles(self._core, dest) if self._core.w[
            L.cpu_word(dest) + _C["STATE"]] == L.CPU_LIVE else 1 << 30
        if len(hs) > limit:
            raise ValueError(f"send of {len(hs)} handles: at most {limit} fit in one message")
        groups = self._held_groups(hs)
        deadline = time.monotonic() + max(timeout, 0.0)
        while not self._mail.post(dest, MSG_HANDOFF, groups, L.TAG_INFLIGHT):
            if self._core.w[L.cpu_word(dest) + _C["STATE"]] != L.CPU_LIVE:
                raise CpuGoneError(f"arena {self.name!r}: CPU {dest} is not live; "
                                   f"the {len(hs)} items stay with CPU {self.cpu_id}")
            if time.monotonic() >= deadline:
                raise MailboxFullError(f"arena {self.name!r}: CPU {dest}'s mailbox is full; "
                                       f"the {len(hs)} items stay with CPU {self.cpu_id}")
            time.sleep(0.001)

    def recv(self, timeout: float | None = 1.0) -> list[int]:
        """Handles handed to this CPU (``[]`` when none came within ``timeout``)."""
        self._check_open()
        if (here := self._here()) is not self:
            return here.recv(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._blocked += 1
        try:
            while True:
                if self._mail.pending():
                    self._mail.collect()
                if self._mail.drain_requested:
                    layers.run_drain_requests(self)
                if self._mail.inbox:
                    out = list(self._mail.inbox)
                    self._mail.inbox.clear()
                    return out
                if self._closing:
                    raise ArenaClosedError(f"arena {self.name!r} was closed while recv "
                                           f"waited")
                self._flush_xfree()            # idle: what was freed here goes home now
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._wake.wait(0.05 if left is None else min(left, 0.05))
        finally:
            self._blocked -= 1

    def poll(self) -> None:
        """Take this CPU's mail and send its pending remote frees home (call it
        when idle; recv, sleeping allocations and the slow paths do it too); run
        the layers' drain-request handlers when the keg manager asked for a drain
        (``layers.register_drain_request``)."""
        self._check_open()
        if (here := self._here()) is not self:
            return here.poll()
        if self._mail.pending():
            self._mail.collect()
        if self._mail.drain_requested:
            layers.run_drain_requests(self)
        self._flush_xfree()

    def _flush_xfree(self) -> None:
        for z in list(self._zones.values()):
            if z._cache.xbatches:
                z._cache.flush_xfree()

    def _held_groups(self, hs):
        """The items ``hs`` grouped by zone for ``mail.post``, each allocated and
        held by this CPU, else ShmallocError naming the first that is not:
        ``[(zone_id, zidx, handles, tag_indexes[, tag])]``, with ``tag`` the one tag
        of every item when they have one.  A batch from one zone (the usual case) is
        checked in two passes, page table (``Keg.tag_indexes``) then tags; anything
        else, or any error, goes handle by handle through ``_held_item``."""
        zone, _ = self._held_item(hs[0])
        tags = self._core.tags
        try:
            ts = zone.keg.tag_indexes(hs)
        except (IndexError, TypeError, KeyError):
            ts = None                           # not all items of this keg
        want = L.TAG_ALLOC | zone.zidx << 4 | self.cpu_id << 8
        if ts is not None:
            held = {tags[t] for t in ts}
            if len(held) == 1 and next(iter(held)) & 0xFFFF == want:   # one home, too
                return [(zone.id, zone.zidx, hs, ts, held.pop())]
            if {tv & 0xFFFF for tv in held} == {want}:
                return [(zone.id, zone.zidx, hs, ts)]
        groups = {}
        for h in hs:
            zone, t = self._held_item(h)
            groups.setdefault(zone.id, (zone.id, zone.zidx, [], []))
            groups[zone.id][2].append(h)
            groups[zone.id][3].append(t)
        return list(groups.values())

    def _held_item(self, h):
        """(zone, tag index) of item ``h`` allocated and held by this CPU."""
        core = self._core
        try:
            keg, t = _keg_and_tag(core, h)
        except (IndexError, TypeError, AttributeError, KeyError):
            as_handle(h, "?")
            raise ShmallocError(f"arena {self.name!r}: handle {h} is not an item") from None
        tv = core.tags[t]
        if tv & 0xFF0F != L.TAG_ALLOC | self.cpu_id << 8:
            zone = self._zone_of(keg.id, L.tag_zidx(tv))
            name = zone.name if zone is not None else "?"
            raise ShmallocError(f"zone {name!r}: handle {h} is not allocated and held by "
                                f"CPU {self.cpu_id} ({L.TAG_STATE_NAMES[L.tag_state(tv)]}, "
                                f"holder {L.tag_holder(tv)})")
        return self._zone_of(keg.id, L.tag_zidx(tv)), t

    def _zone_of(self, keg_id: int, zidx: int):
        """The zone (of this CPU) that is zone ``zidx`` of keg ``keg_id``, or None."""
        z = self._zone_by_keg.get((keg_id, zidx))
        if z is None:
            core = self._core
            zid = next((z for z in core.zones_of_keg(keg_id)
                        if core.w[L.zone_word(z) + _Z["ZIDX"]] == zidx), -1)
            if zid < 0:
                return None
            z = self._zone_by_keg[keg_id, zidx] = self._zone_by_id(zid)
        return z

    def disown(self, h) -> None:
        """Let go of item ``h`` (allocated and held by this CPU) without freeing
        it: it stays allocated, held by no CPU, until a process ``claim``s it.
        For references that travel by other means than ``send`` (a pickle)."""
        if (here := self._here()) is not self:
            return here.disown(h)
        zone, t = self._held_item(h)
        self._core.tags[t] = L.tag(L.TAG_ALLOC, zone.zidx, L.NO_CPU,
                                   L.tag_home(self._core.tags[t]))

    def claim(self, h, *, holder: int | None = None, check=None) -> None:
        """Make item ``h``, allocated and held by no CPU, this CPU's (the other
        half of ``disown``); in an xfree="local" zone it also becomes this CPU's
        own (its home moves here, as a hand-off's does in ``recv``).  ShmallocError
        if it is not such an item.

        ``holder``: an item still held by that CPU is taken as well (a hand-off whose
        sender keeps it until it is taken, so that the sender's recovery frees it if
        the sender dies first).  ``check``: called under the zone lock, after the tag
        was found as required; the item is taken only if it returns True (the caller
        checks and clears a one-shot mark there, so that two claims, or a claim and a
        withdrawal, of the same item never both succeed).  Lock: takes zone."""
        if (here := self._here()) is not self:
            return here.claim(h, holder=holder, check=check)
        if h.__class__ is not int:
            h = as_handle(h, "?")
        core = self._core
        try:
            keg, t = _keg_and_tag(core, h)
        except (IndexError, TypeError, AttributeError, KeyError):
            raise ShmallocError(f"arena {self.name!r}: claim of handle {h}: not an item") \
                from None
        tags = core.tags
        zone = self._zone_of(keg.id, tags[t] >> 4 & 0xF)
        if zone is None:
            raise ShmallocError(f"arena {self.name!r}: claim of handle {h}: not an item of "
                                f"a zone")
        lk = core.lock(zone._lock_index)           # against a racing free (take-over)
        lk.acquire(owner_id=self.cpu_id)
        try:
            tv = tags[t]
            held = tv >> 8 & 0xFF
            if tv & 0xF != L.TAG_ALLOC or (held != L.NO_CPU and held != holder):
                whom = "none" if holder is None else f"none or CPU {holder}"
                raise ShmallocError(f"zone {zone.name!r}: claim of handle {h}: it is "
                                    f"{L.TAG_STATE_NAMES[L.tag_state(tv)]}, held by "
                                    f"{held}, not an allocated item held by {whom}")
            if check is not None and not check():
                raise ShmallocError(f"zone {zone.name!r}: claim of handle {h}: refused by "
                                    f"the caller's check")
            # as a hand-off received (mail._take_group): in an xfree="local" zone the
            # item becomes this CPU's own (home := here), its free a fast-path free
            me = self.cpu_id
            if zone._cache.xfree_message:
                tags[t] = tv & 0xFF0000 | L.TAG_ALLOC | zone.zidx << 4 | me << 8
            else:
                tags[t] = L.TAG_ALLOC | zone.zidx << 4 | me << 8 | me << 16
        finally:
            lk.release()

    def _free_any(self, h) -> None:
        """Free an item this CPU holds as recovery would (a dtor that refuses,
        such as that of an mbuf copy, gives its references back instead); an item
        the dtor still keeps is let go of, held by no CPU."""
        zone, _ = self._held_item(h)
        try:
            zone.free(h, DTOR_RECOVER)
        except ShmallocError:
            if self._held_item_or_none(h) is not None:
                self.disown(h)

    def _held_item_or_none(self, h):
        try:
            return self._held_item(h)
        except ShmallocError:
            return None

    def _drain_caches(self) -> None:
        """Send pending remote frees and give every cached item back (close,
        or a drain request from the keg manager)."""
        for z in list(self._zones.values()):
            z._cache.flush_xfree()
        for z in list(self._zones.values()):
            z._cache.drain_cache()

    def _drain_zone(self, zone_id: int) -> None:
        """A drain request for one zone (MSG_ZDRAIN, a CPU asleep on it): give
        this CPU's cached items of the zone back -- to the sleepers first --
        after draining the zones whose cached items hold items of it."""
        if zone_id not in self._core.live_zone_ids():
            return
        self._drain_companions(self._core.zone_name(zone_id))
        z = self._zones.get(zone_id)
        if z is not None:
            z._cache.flush_xfree()
            z._cache.drain_cache()

    def _drain_companions(self, name: str) -> None:
        """Drain (caches, depot) every zone registered as holding items of zone
        ``name`` in its cached items (``zone.register_drain_companion``)."""
        for companion in drain_companions(name):
            zid = self._core.zone_id(companion)
            if zid >= 0:
                self._zone_by_id(zid).drain()


def _keg_and_tag(core, h: int):
    """(keg, tag index) of handle ``h``: ``Keg.tag_index_of`` without its keg
    lookup by name, for the paths that check every handle (``send``, the claim of
    every unpickled Buffer).  IndexError, TypeError, AttributeError or KeyError
    when ``h`` is no item of any keg.  Lock: none."""
    e = core.pt[h >> L.PAGE_SHIFT] if h >= 0 else 0
    keg = core._kegs.get(e >> L.KEG_ID_SHIFT)
    if keg is None:
        keg = core.keg(e >> L.KEG_ID_SHIFT) if 1 <= e >> L.KEG_ID_SHIFT <= L.MAX_KEGS else None
    b = e ^ keg.kid_bits
    return keg, (b >> 2) + keg.offmap[h - b]
