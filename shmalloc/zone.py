"""zone: typed allocation on a keg, with this CPU's bucket cache (search order
steps 1 and 2).

Each process (each *CPU*) keeps, per zone, one private stack of free items:
the alloc bucket at the bottom and the free bucket above it, ``2 * bucket_size``
items at most (UMA's ``uc_allocbucket`` + ``uc_freebucket``; a swap of the two
is a no-op here).  The fast paths ``alloc`` and ``free`` touch only that stack,
the item's tag and two local counters: no lock, no IPC, no shared counter.

Slow paths, in the order ``alloc`` tries them (UMA's ``cache_alloc``):

    A1  a bucket from the zone's depot (shared, zone lock)
    A2  a bucket imported from the keg's slabs (zone lock, then keg lock), within
        the zone's limit; zone init runs on the imported items, outside the locks
        (for M_WAITOK the first item's init may wait, with the caller's deadline:
        ``_run_init``); ArenaFullError when /dev/shm cannot back a new slab
    A3  M_NOWAIT: count a failure and return None
    A4  M_WAITOK: queue on the zone's FIFO sleep queue, ask the other CPUs for their
        cached items of the zone (``_ask_for_caches``), and wait for a freed item to
        be handed over or room to open (``_sleep``), the arena to close, or the
        timeout; the keg manager takes the cache of a CPU that does not answer
        (``take_cache_of``, resynced by its owner: ``_resync``)

and ``free`` (UMA's ``uma_zfree_arg`` cases):

    F1  the item is ours and the stack has room: push (fast path)
    F2  the zone has sleepers: the item goes straight to the first sleeper
    F3  the stack is full: push, then move its oldest bucket to the depot, or to
        the keg when the depot is full (zone fini first)
    F4  the item is held by another CPU (not handed over): take it over under the
        zone lock, then as F1-F3 (UMA's free-anywhere); ``take_over`` is this
        first half alone
    F5  anything else is an error: double free, foreign or bad handle

The bulk calls take the same steps a batch at a time: ``alloc_bulk`` into an empty
stack takes its batch from the depot directly (A1, never cached in between), and
``free_bulk`` of a batch that would overflow the stack puts it in the depot whole
(F3, as UMA's full free bucket).

Limits count items outside the slabs (caches, depot, allocated), as UMA's
``uz_items`` does; ``ITEMS <= LIMIT`` whenever the zone lock is free -- unless a
limit was set below the items already out (``set_max(n, below_use=True)``, FreeBSD
7/8's ``uma_zone_set_max``, which only caps further allocation): then the zone takes
no item from its keg until frees bring ITEMS under the limit, and ``ITEMS <=
max(LIMIT, OVER)`` holds instead, OVER being ITEMS when that limit was set.

Lock: the zone lock guards the zone record (depot, items, sleepers, bucket
size); the keg lock guards slabs.  Order zone -> keg -> vm.
"""

from __future__ import annotations

import operator
import os
import time
from array import array
from threading import get_ident

from . import layout as L
from .errors import (ArenaClosedError, ArenaFullError, BadHandleError, DoubleFreeError,
                     ForeignHandleError)
from .debug import KILLPOINTS, killpoint, trash_hooks
from .hooks import resolve
from .mail import MSG_XFREE

M_NOWAIT = 0x0001
M_WAITOK = 0x0002
M_ZERO = 0x0100

BUCKET_MAX = 254               # UMA's BUCKET_SIZE(256) on LP64
XFREE_DELAY = 0.005            # a remote-free batch waits at most this long (at the next free)
XFREE_BATCH = 64               # items per remote-free message, whatever the bucket size
SLEEP_SLICE = 0.05             # seconds an M_WAITOK sleeper waits between two looks
# UMA's bucket zones: (entries, largest item size that uses them)
_BUCKET_ZONES = ((2, 4096), (4, 3072), (8, 2048), (16, 1024), (30, 512), (62, 256),
                 (126, 128), (254, 64))

_Z = L.ZONE
_C = L.CPU
_CS = L.CS


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


def as_handle(h, zone_name: str) -> int:
    """``h`` as an int handle; TypeError for anything that is not an integer."""
    if isinstance(h, bool) or not hasattr(h, "__index__"):
        raise TypeError(f"zone {zone_name!r}: a handle is an int, not "
                        f"{type(h).__name__} ({h!r:.40})")
    return operator.index(h)


def check_how(how, zone_name: str) -> None:
    """``how`` must be M_NOWAIT or M_WAITOK, optionally with M_ZERO."""
    if isinstance(how, bool) or not isinstance(how, int):
        raise TypeError(f"zone {zone_name!r}: how is an int flag, not {type(how).__name__}")
    if how & ~(M_NOWAIT | M_WAITOK | M_ZERO) or (how & (M_NOWAIT | M_WAITOK)) in (0, 3):
        raise ValueError(f"zone {zone_name!r}: how must be M_NOWAIT or M_WAITOK (optionally "
                         f"| M_ZERO), not {how:#x}")


def apply_maxcache(w, zw: int, nitems: int) -> None:
    """UMA's ``uma_zone_set_maxcache``: a limit caps an adaptive zone's bucket
    size to ``nitems / (2 * ncpus) / 2``, so that a small limit is not swallowed
    by one CPU's cache.
    Lock: zone (or the zone not yet visible)."""
    if not nitems or w[zw + _Z["FLAGS"]] & L.ZF_FIXED_BUCKET:
        return                                  # no limit, or a fixed bucket size
    nb = 2 * max(os.cpu_count() or 1, 2)
    bsize = max(1, min(BUCKET_MAX, nitems // nb // 2))
    # UMA also raises the bucket for a large limit; here a limit only caps it,
    # so that a CPU never hoards more than its share of a small arena.
    bsize = min(bsize, w[zw + _Z["BUCKET_MAX"]])
    w[zw + _Z["BUCKET_SIZE"]] = min(w[zw + _Z["BUCKET_SIZE"]], bsize)
    w[zw + _Z["BUCKET_MAX"]] = bsize
    w[zw + _Z["BUCKET_MIN"]] = min(w[zw + _Z["BUCKET_MIN"]], bsize)


def bucket_select(size: int) -> int:
    """UMA's initial bucket size for items of ``size`` bytes."""
    if size > 4096:
        return max(4096 * 2 // size, 1)
    best = 1
    for entries, maxsize in _BUCKET_ZONES:
        if maxsize >= size:
            best = entries
    return best


def _keep(hs: list, ts: list, tags, tag_word: int) -> None:
    """Filter the parallel lists ``hs``/``ts`` in place to the items tagged
    ``tag_word``, each once (``_Cache._resync``)."""
    seen = set()
    kh, kt = [], []
    for h, t in zip(hs, ts):
        if tags[t] == tag_word and h not in seen:
            seen.add(h)
            kh.append(h)
            kt.append(t)
    hs[:] = kh
    ts[:] = kt


class Zone:
    """A zone as seen by one CPU.  Obtain with ``arena.zcreate`` / ``arena.zone``."""

    def __init__(self, arena, zone_id: int):
        core = arena._core
        self.arena = arena
        self.id = zone_id
        self._core = core
        zw = L.zone_word(zone_id)
        self._zw = zw
        w = core.w
        self.name = L.read_str(core.mv, L.zone_name_off(zone_id), L.NAME_BYTES)
        self.keg = core.keg(w[zw + _Z["KEG"]])
        self.zidx = w[zw + _Z["ZIDX"]]
        self.size = w[zw + _Z["SIZE"]]
        self.secondary = bool(w[zw + _Z["FLAGS"]] & L.ZF_SECONDARY)
        self.hook_names = {n: L.read_str(core.mv, L.zone_hook_off(zone_id, i), L.HOOK_BYTES)
                           for i, n in enumerate(L.HOOK_NAMES)}
        self.ctor = resolve(self.hook_names["ctor"])
        self.dtor = resolve(self.hook_names["dtor"])
        self.init = resolve(self.hook_names["init"])
        self.fini = resolve(self.hook_names["fini"])
        if core.debug >= 1 and self.init is None and self.fini is None:
            self.ctor, self.dtor, self.init, self.fini = trash_hooks(
                self, self.ctor, self.dtor, self.init, self.fini)
        self._lock_index = L.zone_lock_index(zone_id)
        self._pt, self._mv = core.pt, core.mv
        self._kid_bits, self._offmap = self.keg.kid_bits, self.keg.offmap
        self._cache = _Cache(self, arena)
        self.alloc = self._cache.alloc
        self.free = self._cache.free
        self.view = self._cache.view
        self.alloc_bulk = self._cache.alloc_bulk
        self.free_bulk = self._cache.free_bulk
        self.take_over = self._cache.take_over

    # ------------------------------------------------------------------ public
    def __repr__(self):
        return f"<Zone {self.name!r} size={self.size} cpu={self.arena.cpu_id}>"

    @property
    def limit(self) -> int:
        return self._core.w[self._zw + _Z["LIMIT"]]

    @property
    def bucket_size(self) -> int:
        return self._core.w[self._zw + _Z["BUCKET_SIZE"]]

    def view(self, h: int) -> memoryview:
        """Writable memoryview over item ``h`` (zero copy).  (Replaced per instance
        by the cache's closure, which serves valid handles; this is its slow path.)"""
        return self._view_slow(h)

    def _view_slow(self, h) -> memoryview:
        if self.keg.slab_of(as_handle(h, self.name)) < 0:
            self._raise_bad(h, "view")
        return self._mv[h:h + self.size]

    def alloc_bulk(self, n: int, how: int = M_NOWAIT, timeout: float | None = None):
        """``n`` items, all or none: a list, or None when they cannot all be had
        (M_NOWAIT).  With M_WAITOK, waits for each missing item."""
        return self._cache.alloc_bulk(n, how, timeout)

    def free_bulk(self, handles) -> None:
        """Free many items; each is checked as ``free`` checks one."""
        self._cache.free_bulk(handles)

    def set_max(self, nitems: int, *, below_use: bool = False) -> int:
        """Set the zone's limit in items (0 = none); raises it at once, waking
        sleepers that now fit.  Returns the limit.  A limit below the items
        already out of the slabs is refused (ValueError), unless ``below_use``:
        then it caps further allocation, as FreeBSD 7/8's ``uma_zone_set_max``
        does -- the items out stay, and the zone takes none from its keg until
        frees bring it under the limit."""
        return self._cache.set_max(nitems, below_use)

    def drain(self) -> None:
        """Give this CPU's cached items back to the depot, the depot's buckets
        and the keg's free slabs back to the arena (``zone_drain``)."""
        self._cache.drain_cache()
        self._cache.drain_depot()

    def stats(self):
        return self.arena.zone_stats(self.name)

    # ------------------------------------------------------------------ diagnosis
    def _raise_bad(self, h, what: str):
        """Raise the most precise error for a handle the fast path refused."""
        core = self._core
        h = as_handle(h, self.name)
        pre = f"zone {self.name!r}: {what} of handle {h}"
        if h < 0:
            raise BadHandleError(f"{pre}: negative handle")
        if h >= core.geometry.size:
            raise BadHandleError(f"{pre}: past the end of the arena ({core.geometry.size} bytes)")
        e = core.pt[h >> L.PAGE_SHIFT]
        owner = e >> L.KEG_ID_SHIFT
        if e == 0:
            raise BadHandleError(f"{pre}: not in any slab (free or metadata page)")
        if owner == L.VM_INTERNAL_KEG:
            raise BadHandleError(f"{pre}: points into arena metadata")
        if owner != self.keg.id:
            other = core.zone_names_of_keg(owner)
            raise ForeignHandleError(f"{pre}: belongs to zone {other}, not {self.name!r}")
        base = e ^ self.keg.kid_bits
        off = h - base
        if off % self.keg.rsize or off // self.keg.rsize >= self.keg.ipers:
            raise BadHandleError(f"{pre}: misaligned (items are {self.keg.rsize} bytes from "
                                 f"slab base {base})")
        t = core.tags[self.keg.tag_index(base, off // self.keg.rsize)]
        st, zidx = L.tag_state(t), L.tag_zidx(t)
        if zidx != self.zidx and st != L.TAG_FREE:
            other = core.zone_name_by_keg_zidx(self.keg.id, zidx)
            raise ForeignHandleError(f"{pre}: belongs to zone {other!r} (same keg), "
                                     f"not {self.name!r}")
        if st in (L.TAG_FREE, L.TAG_CACHED, L.TAG_DEPOT, L.TAG_IMPORT, L.TAG_FINI):
            raise DoubleFreeError(f"{pre}: item is already free "
                                  f"({L.TAG_STATE_NAMES[st]})")
        if st == L.TAG_INFLIGHT:
            raise BadHandleError(f"{pre}: item is in flight to CPU {L.tag_holder(t)}")
        raise BadHandleError(f"{pre}: unexpected tag {t:#x}")


class _Cache:
    """This CPU's cache of one zone, and the zone's slow paths."""

    def __init__(self, zone: Zone, arena):
        self.zone = zone
        self.arena = arena
        core = arena._core
        self.core = core
        self.cpu = arena.cpu_id
        self.items: list[int] = []       # handles, oldest first; top = hottest
        self.tix: list[int] = []         # their tag indexes
        zw = zone._zw
        self.zw = zw
        self.sw = L.cpu_stat_word(self.cpu, zone.id)
        self.w_cached = L.tag(L.TAG_CACHED, zone.zidx, self.cpu, self.cpu)
        self.w_alloc = L.tag(L.TAG_ALLOC, zone.zidx, self.cpu, self.cpu)
        self.w_depot = L.tag(L.TAG_DEPOT, zone.zidx)
        self.w_import = L.tag(L.TAG_IMPORT, zone.zidx, self.cpu, self.cpu)
        self.w_fini = L.tag(L.TAG_FINI, zone.zidx, self.cpu, self.cpu)
        self.rev_w = L.cpu_word(self.cpu) + _C["REVOKES"]
        self.rev = core.w[self.rev_w]    # REVOKES when this cache last matched the tags
        self.fails = self.sleeps = self.depot_gets = self.depot_puts = self.imports = 0
        self.xfrees = self.msgs_sent = self.items_sent = self.fallbacks = 0
        self.xfree_message = bool(core.w[self.zw + _Z["XFREE"]])
        self.xbatches: dict[int, tuple[list, list, float]] = {}
        self._build_fast_paths()
        self.refresh()

    # ================================================================== fast paths
    def _build_fast_paths(self):
        zone, core = self.zone, self.core
        items, tix = self.items, self.tix
        tags, pt, w = core.tags, core.pt, core.w
        kid_bits, offmap = zone.keg.kid_bits, zone.keg.offmap
        dtor = zone.dtor
        mv, size, view_slow = core.mv, zone.size, zone._view_slow
        ctor, ctor_path = zone.ctor, self._ctor_path
        W_ALLOC, W_CACHED = self.w_alloc, self.w_cached
        sleepers_w = self.zw + _Z["SLEEPERS"]
        rev_w = self.rev_w
        alloc_slow, free_slow, free_item = self._alloc_slow, self._free_slow, self._free_item
        tid = -1
        cap = 0
        rev = self.rev
        nallocs = nfrees = 0

        # how values the alloc fast path serves are M_NOWAIT and M_WAITOK (anything
        # else, M_ZERO included, takes _alloc_slow); a ctor runs through _ctor_path.
        # REVOKES unchanged: the keg manager has taken none of the stack's items
        # since the stack last matched the tags (else _alloc_slow resyncs first).
        def alloc(how=M_NOWAIT, timeout=None, arg=None, get_ident=get_ident):
            nonlocal nallocs
            if items and tid == get_ident() and w[rev_w] == rev and (
                    how == M_NOWAIT or how == M_WAITOK):
                tags[tix.pop()] = W_ALLOC
                nallocs += 1
                if ctor is None:
                    return items.pop()
                return ctor_path(items.pop(), arg, how)
            return alloc_slow(how, timeout, arg)

        def free(h, arg=None, get_ident=get_ident):
            nonlocal nfrees
            if tid != get_ident():
                return free_slow(h, arg)
            try:
                b = pt[h >> 12] ^ kid_bits
                t = (b >> 2) + offmap[h - b]
            except (IndexError, TypeError, KeyError):
                return free_slow(h, arg)        # not an item of this keg: the error path
            if tags[t] == W_ALLOC and len(items) < cap and not w[sleepers_w]:
                if dtor is not None:
                    dtor(zone, h, arg)
                tags[t] = W_CACHED
                items.append(h)
                tix.append(t)
                nfrees += 1
                return None
            return free_item(h, t, arg)

        def view(h):
            try:
                b = pt[h >> 12] ^ kid_bits
                if h - b in offmap:
                    return mv[h:h + size]
            except (IndexError, TypeError):
                pass
            return view_slow(h)

        def counts(d_allocs=0, d_frees=0):
            nonlocal nallocs, nfrees
            nallocs += d_allocs
            nfrees += d_frees
            return nallocs, nfrees

        def set_params(new_cap, new_tid):
            nonlocal cap, tid
            cap, tid = new_cap, new_tid
            self.tid = new_tid                  # for the bulk paths

        def set_rev(new_rev):
            nonlocal rev
            rev = self.rev = new_rev

        self.alloc, self.free, self.view = alloc, free, view
        self.counts, self.set_params, self.set_rev = counts, set_params, set_rev
        assert L.PAGE_SHIFT == 12

    def refresh(self):
        """Re-read the zone's bucket size and limit into the fast paths, which
        serve only the thread that owns this CPU."""
        w = self.core.w
        bsize = w[self.zw + _Z["BUCKET_SIZE"]]
        self.bsize = bsize
        usable = not (self.arena._closed or self.arena._forked())
        self.set_params(2 * bsize, self.arena._owner_tid if usable else -1)

    def disable(self):
        """Route every call to the slow path (closed arena, forked child)."""
        self.set_params(0, -1)

    # ================================================================== helpers
    def _check_thread(self, what="alloc", h=None):
        if self.arena._closed:
            of = "" if h is None else f" of handle {h!r}"
            raise ArenaClosedError(f"zone {self.zone.name!r}: {what}{of} after arena "
                                   f"{self.arena.name!r} was closed in this process")
        if self.arena._owner_tid != get_ident() or self.arena._forked():
            return self.arena._other_thread_zone(self.zone.id)._cache
        return None

    def _check_revoked(self) -> None:
        """Resync the stack if the keg manager took items of this CPU's caches
        since it last matched the tags.  The owner thread."""
        if self.core.w[self.rev_w] != self.rev:
            self._resync()

    def _resync(self) -> None:
        """``_resync_locked`` under the zone lock.  Lock: takes zone."""
        lk = self._zlock()
        try:
            self._resync_locked()
        finally:
            lk.release()

    def _resync_locked(self) -> None:
        """Keep in the stack, and in the remote-free batches, only the items whose
        tags still say this CPU caches them, each once (an item taken by the keg
        manager may have come back since, received and freed here: its old entry
        and the new one name the same item).  Lock: zone; the owner thread.

        Every path of this CPU that holds cached items outside these lists while
        it waits for a lock does so under the zone lock (``_flush``,
        ``_xfree_send``) or has re-tagged them first (FINI: ``_release_to_keg``),
        so the keg manager, which takes items under the zone lock, finds in the
        tags only what these lists name."""
        core, tags = self.core, self.core.tags
        rev = core.w[self.rev_w]
        _keep(self.items, self.tix, tags, self.w_cached)
        for home, (hs, ts, _) in list(self.xbatches.items()):
            _keep(hs, ts, tags, L.tag(L.TAG_CACHED, self.zone.zidx, self.cpu, home))
            if not hs:
                del self.xbatches[home]
        self.set_rev(rev)

    def _zlock(self):
        lk = self.core.lock(self.zone._lock_index)
        lk.acquire(owner_id=self.cpu)
        if lk.contended_last:
            self._grow_bucket()
        return lk

    def _grow_bucket(self):
        """Zone lock held: UMA grows the bucket when the zone lock was contended."""
        w, zw = self.core.w, self.zw
        if w[zw + _Z["BUCKET_SIZE"]] < w[zw + _Z["BUCKET_MAX"]]:
            w[zw + _Z["BUCKET_SIZE"]] += 1

    def publish(self):
        """Write this CPU's counters for the zone where every process can sum them;
        at debug level 3, check the whole arena (publish ends every slow path)."""
        w, sw = self.core.w, self.sw
        if w[self.rev_w] != self.rev and self.tid == get_ident():
            self._resync()
        a, f = self.counts()
        w[sw + _CS["ALLOCS"]] = a
        w[sw + _CS["FREES"]] = f
        w[sw + _CS["FAILS"]] = self.fails
        w[sw + _CS["SLEEPS"]] = self.sleeps
        if w[self.rev_w] == self.rev:
            w[sw + _CS["CACHED"]] = len(self.items) + sum(len(b[0])
                                                          for b in self.xbatches.values())
        else:                   # another thread publishes (check): count, change nothing
            tags, wc = self.core.tags, self.w_cached
            w[sw + _CS["CACHED"]] = len({h for h, t in zip(self.items, self.tix)
                                         if tags[t] == wc}) + sum(
                1 for b in self.xbatches.values() for t in b[1]
                if L.tag_state(tags[t]) == L.TAG_CACHED and L.tag_holder(tags[t]) == self.cpu)
        w[sw + _CS["DEPOT_GETS"]] = self.depot_gets
        w[sw + _CS["DEPOT_PUTS"]] = self.depot_puts
        w[sw + _CS["KEG_IMPORTS"]] = self.imports
        w[sw + _CS["XFREES"]] = self.xfrees
        w[sw + _CS["MSGS_SENT"]] = self.msgs_sent
        w[sw + _CS["ITEMS_SENT"]] = self.items_sent
        w[sw + _CS["FALLBACKS"]] = self.fallbacks
        core = self.core
        if core.debug >= 3 and not core.held and not core.checking and not self.arena._closing:
            core.checking = True
            try:
                self.arena.check()
            finally:
                core.checking = False

    # ================================================================== alloc slow path
    def _ctor_path(self, h, arg, how):
        """Run the ctor (and M_ZERO) on a freshly popped item; unwind on failure
        as UMA does: zone fini, back to the slab, limit unit returned, a failure
        counted and the allocation not."""
        zone = self.zone
        ok = True
        if zone.ctor is not None:
            try:
                ok = zone.ctor(zone, h, arg, how) is not False
            except BaseException:
                self._unwind_ctor(h)
                raise
        if not ok:
            self._unwind_ctor(h)
            return None
        if how & M_ZERO:
            self.core.mv[h:h + zone.size] = bytes(zone.size)
        return h

    def _unwind_ctor(self, h):
        self.counts(-1, 0)
        self.fails += 1
        t = self._tag_index(h)
        self._release_to_keg([h], [t], run_fini=True)
        self.publish()

    def _tag_index(self, h):
        keg = self.zone.keg
        b = self.core.pt[h >> L.PAGE_SHIFT] ^ keg.kid_bits
        return (b >> 2) + keg.offmap[h - b]

    def _alloc_slow(self, how, timeout, arg):
        other = self._check_thread()
        if other is not None:
            return other.alloc(how, timeout, arg)
        check_how(how, self.zone.name)
        self._check_revoked()
        if how & M_WAITOK:
            return self._alloc_waitok(how, timeout, arg)
        try:
            got = self.items or self._fill()    # a hit with a ctor or M_ZERO, or a refill
        except ArenaFullError:                  # /dev/shm cannot back a new slab
            self.fails += 1
            self.publish()
            raise
        if got:
            return self._pop(how, arg)
        if not self.arena._probing:             # A3 (a probe for a waiting request is not
            self.fails += 1                     # a denied request: see _run_init)
        self.publish()
        return None

    def _pop(self, how, arg):
        """Hand out the item on top of the stack (ctor and M_ZERO as asked)."""
        h = self.items.pop()
        self.core.tags[self.tix.pop()] = self.w_alloc
        self.counts(1, 0)
        if self.zone.ctor is None and not how & M_ZERO:
            return h
        return self._ctor_path(h, arg, how)

    def _alloc_waitok(self, how, timeout, arg):
        """M_WAITOK: A1/A2 with the zone init allowed to wait (``_run_init``), then
        A4 (``_sleep``).  Waits at most ``timeout`` seconds, and never past the
        deadline of a waiting allocation whose hook called this one (the packet
        init taking a cluster); TimeoutError past it, counted as one failure of
        this zone.  ArenaClosedError when the arena closes meanwhile."""
        if timeout is not None and timeout < 0:
            raise ValueError(f"zone {self.zone.name!r}: timeout must be >= 0, not {timeout}")
        arena = self.arena
        deadline = None if timeout is None else time.monotonic() + timeout
        outer = arena._wait_deadline
        if outer is not None and (deadline is None or outer < deadline):
            deadline = outer
        arena._blocked += 1
        try:
            if not (self.items or self._fill(None, how, deadline)):
                self._sleep(how, deadline)
        except (TimeoutError, ArenaFullError):
            self.fails += 1
            self.publish()
            raise
        finally:
            arena._blocked -= 1
        return self._pop(how, arg)

    def _fill(self, want: int | None = None, how: int = M_NOWAIT, deadline=None) -> bool:
        """A1/A2: put a bucket into the empty stack (``want`` items if given).
        True if it holds items now.  ``how`` and ``deadline`` go to the zone init
        (``_run_init``)."""
        mail = self.arena._mail
        if mail.pending():                  # the home CPU takes its mail first
            mail.collect()
            if self.items and want is None:
                return True
        core, w, zw = self.core, self.core.w, self.zw
        zone = self.zone
        hs, ts = [], []
        lk = self._zlock()
        try:
            self.refresh()
            bsize = max(self.bsize, 1) if want is None else want
            n = w[zw + _Z["DEPOT_N"]]
            if n:                                                   # A1
                k = min(bsize, n)
                self._depot_take(k, hs, ts)
                self.depot_gets += 1
                self.items[:0] = hs
                self.tix[:0] = ts
                return True
            limit = w[zw + _Z["LIMIT"]]
            k = bsize
            if limit:
                k = min(k, limit - w[zw + _Z["ITEMS"]])
                if k <= 0:
                    return False
            w[zw + _Z["ITEMS"]] += k                                # A2
            if KILLPOINTS:
                killpoint("zone.fill.locked")
            keg = zone.keg
            got = 0
            klk = core.lock(keg.lock_index)
            klk.acquire(owner_id=self.cpu)
            try:
                got = keg.take(k, self.w_import if zone.init else self.w_cached, hs, ts)
            finally:
                klk.release()
                if got < k:
                    w[zw + _Z["ITEMS"]] -= k - got
            if got:
                self.imports += 1
        finally:
            lk.release()
        if zone.init is not None and hs:
            hs, ts = self._run_init(hs, ts, how, deadline)
        self.items[:0] = hs
        self.tix[:0] = ts
        self.publish()
        return bool(hs)

    def _run_init(self, hs, ts, how=M_NOWAIT, deadline=None):
        """Zone init on imported items, outside the locks.  The good ones before
        the first failure are kept; the rest go back to the slab without fini
        (UMA's ``zone_alloc_bucket``).

        Only the first item's init may wait, and only for an M_WAITOK request
        (UMA's import stops blocking once it has an item).  It is first tried
        without waiting, as a probe whose failures in other zones are not counted
        (``arena._probing``): the request has not been denied, it will wait.  If
        the probe fails, the other items go back to the slab at once, so that
        nothing but that item is held while the init waits -- with ``how``, until
        ``deadline`` (``arena._wait_deadline``), in whichever zone it allocates
        from (the packet init sleeps in the cluster zone, and is counted there)."""
        zone, arena = self.zone, self.arena
        if how & M_WAITOK:
            try:
                ok = self._init_first_waitok(hs, ts, how, deadline)
            except BaseException:
                self._release_to_keg(hs, ts, run_fini=False)
                raise
            if not ok:
                self._release_to_keg(hs, ts, run_fini=False)
                return [], []
            if len(hs) == 1:
                self._mark_cached(ts)
                return hs, ts
        for i, (h, t) in enumerate(zip(hs, ts)):
            if i == 0 and how & M_WAITOK:
                continue                                # inited above
            try:
                ok = zone.init(zone, h, M_NOWAIT) is not False
            except BaseException:
                self._release_to_keg(hs[i:], ts[i:], run_fini=False)
                self._mark_cached(ts[:i])
                self.items[:0] = hs[:i]
                self.tix[:0] = ts[:i]
                self.publish()
                raise
            if not ok:
                self._release_to_keg(hs[i:], ts[i:], run_fini=False)
                hs, ts = hs[:i], ts[:i]
                break
        self._mark_cached(ts)
        return hs, ts

    def _init_first_waitok(self, hs, ts, how, deadline) -> bool:
        """The first item's init for an M_WAITOK request (``_run_init``): a probe
        without waiting, then, if it failed, the other items back to the slab
        (``hs`` and ``ts`` cut to the first) and the init again, allowed to wait.
        A failure or an exception leaves the first item to the caller."""
        zone, arena, h = self.zone, self.arena, hs[0]
        arena._probing += 1
        try:
            if zone.init(zone, h, M_NOWAIT) is not False:
                return True
        finally:
            arena._probing -= 1
        self._release_to_keg(hs[1:], ts[1:], run_fini=False)
        del hs[1:], ts[1:]
        outer, arena._wait_deadline = arena._wait_deadline, deadline
        try:
            return zone.init(zone, h, how & ~M_ZERO) is not False
        finally:
            arena._wait_deadline = outer

    def _mark_cached(self, ts):
        self._mark(ts, self.w_cached)

    def _mark(self, ts, tag_word):
        tags = self.core.tags
        for t in ts:
            tags[t] = tag_word

    def _depot_take(self, k, hs, ts, tag_word=None):
        """Pop ``k`` items from the depot (LIFO), tagged cached here (or
        ``tag_word``).  Lock: zone."""
        self.core.assert_held(self.zone._lock_index)
        w, zw = self.core.w, self.zw
        n = w[zw + _Z["DEPOT_N"]]
        cap = w[zw + _Z["DEPOT_CAP"]]
        d0 = w[zw + _Z["DEPOT_OFF"]] >> 3
        hs.extend(w[d0 + n - k:d0 + n])
        ts.extend(w[d0 + cap + n - k:d0 + cap + n])
        self._mark(ts, self.w_cached if tag_word is None else tag_word)
        w[zw + _Z["DEPOT_N"]] = n - k
        if n - k < w[zw + _Z["IMIN"]]:
            w[zw + _Z["IMIN"]] = n - k

    def _depot_put(self, hs, ts) -> bool:
        """Push items into the depot if they fit.  Lock: zone."""
        self.core.assert_held(self.zone._lock_index)
        w, zw, tags = self.core.w, self.zw, self.core.tags
        n = w[zw + _Z["DEPOT_N"]]
        cap = w[zw + _Z["DEPOT_CAP"]]
        k = len(hs)
        if n + k > cap:
            return False
        wd = self.w_depot
        for t in ts:
            tags[t] = wd
            if KILLPOINTS:
                killpoint("depot.put")
        self._depot_append(n, cap, hs, ts)
        return True

    def _depot_append(self, n, cap, hs, ts):
        """Write items tagged depot into the depot's stack above its ``n`` items.
        Lock: zone."""
        w, zw, k = self.core.w, self.zw, len(hs)
        d0 = w[zw + _Z["DEPOT_OFF"]] >> 3
        w[d0 + n:d0 + n + k] = array("q", hs)
        w[d0 + cap + n:d0 + cap + n + k] = array("q", ts)
        w[zw + _Z["DEPOT_N"]] = n + k
        if n + k > w[zw + _Z["IMAX"]]:
            w[zw + _Z["IMAX"]] = n + k

    def _release_to_keg(self, hs, ts, run_fini: bool):
        """Items this CPU holds go back to their slabs; the limit units are
        returned.  With ``run_fini`` they are tagged FINI (on their way to the
        slab: no longer in a cache) and zone fini runs first, outside the locks;
        without, they are IMPORT items whose init failed."""
        if not hs:
            return
        zone, core, tags = self.zone, self.core, self.core.tags
        error = None
        if run_fini:
            wf = self.w_fini
            for t in ts:
                tags[t] = wf
        if run_fini and zone.fini is not None:
            for h in hs:
                if KILLPOINTS:
                    killpoint("release.fini")
                try:
                    zone.fini(zone, h)
                except BaseException as e:      # a broken fini must not strand the batch
                    error = error or e
        lk = self._zlock()
        try:
            klk = core.lock(zone.keg.lock_index)
            klk.acquire(owner_id=self.cpu)
            try:
                zone.keg.give_back(hs, ts)
            finally:
                klk.release()
            core.w[self.zw + _Z["ITEMS"]] -= len(hs)
        finally:
            lk.release()
        if error is not None:
            raise error

    # ================================================================== sleeping (A4)
    def _sleep(self, how, deadline) -> None:
        """A4: wait, FIFO among this zone's sleepers, until an item is on the
        stack: a freed one handed over (``_grant``), or one imported when room
        opens (the init may fail again: then back in the queue, the same sleep).
        One sleep is counted, and no failure while asleep.  Every round checks,
        under the zone lock, for a grant first, then the arena closing
        (ArenaClosedError) and the deadline (TimeoutError, uncounted here: the
        caller counts it).  Lock: none on entry; takes zone."""
        w, zw, cw = self.core.w, self.zw, L.cpu_word(self.cpu)
        zid1 = self.zone.id + 1
        arena = self.arena
        arena._flush_xfree()                # what this CPU freed for others goes home first
        wake = arena._wake_sem()
        wake.drain()
        lk = self._zlock()
        try:
            w[cw + _C["GRANT_ZONE"]] = 0
            w[cw + _C["WAIT_ZONE"]] = zid1
            self._sleepq_push(self.cpu)
            w[zw + _Z["SLEEPS"]] += 1
        finally:
            lk.release()
        self.sleeps += 1
        self.publish()
        self.refresh()
        self._ask_for_caches()
        mail = arena._mail
        while True:
            if mail.pending():              # asleep, this CPU still answers its mail
                mail.collect()
            lk = self._zlock()
            try:
                if w[cw + _C["GRANT_ZONE"]] == zid1:
                    h, t = w[cw + _C["GRANT_H"]], w[cw + _C["GRANT_T"]]
                    w[cw + _C["GRANT_ZONE"]] = 0
                    w[cw + _C["WAIT_ZONE"]] = 0
                    self.items.append(h)
                    self.tix.append(t)
                    break
                if self.items:              # its own items, come home by mail
                    self._sleepq_remove(self.cpu)
                    w[cw + _C["WAIT_ZONE"]] = 0
                    break
                now = time.monotonic()
                if arena._closing or (deadline is not None and now >= deadline):
                    self._sleepq_remove(self.cpu)
                    w[cw + _C["WAIT_ZONE"]] = 0
                    if arena._closing:
                        raise ArenaClosedError(f"zone {self.zone.name!r}: arena "
                                               f"{arena.name!r} was closed while this "
                                               f"M_WAITOK allocation slept")
                    raise TimeoutError(f"zone {self.zone.name!r}: no item became free "
                                       f"within the time allowed")
                if not self._sleepq_contains(self.cpu):
                    # dequeued by a granter that died before granting: queue again
                    self._sleepq_push(self.cpu)
                attempt = self._sleepq_first() == self.cpu and self._room_now()
                if attempt:
                    self._sleepq_remove(self.cpu)
                    w[cw + _C["WAIT_ZONE"]] = 0
            finally:
                lk.release()
            if attempt:
                if self._fill(1, how, deadline):
                    break
                # lost the room to a racing M_NOWAIT allocation, or the zone's init
                # failed: back in the queue, still the same sleep
                lk = self._zlock()
                try:
                    w[cw + _C["WAIT_ZONE"]] = zid1
                    self._sleepq_push(self.cpu)
                finally:
                    lk.release()
            # Short slices: a slot in the arena may also open up by a free to the
            # keg from another zone (pages), which posts nobody.
            left = SLEEP_SLICE if deadline is None else deadline - time.monotonic()
            wake.wait(max(0.0, min(left, SLEEP_SLICE)))
        self.refresh()
        self.publish()

    def _ask_for_caches(self) -> None:
        """A request goes to sleep: the items it waits for may sit in caches.
        Drain this CPU's companion zones (``register_drain_companion``: their
        cached items hold items of this zone), and ask every other live CPU, by a
        message it acts on when it next takes its mail, for its cached items of
        this zone -- once per sleep, and never while such a request already waits
        in its mailbox.  Published counts lag a CPU's fast path, so every live
        CPU is asked.  A CPU that does not answer within ``GRACE`` seconds has its
        cache taken by the keg manager (``take_cache_of``).  Lock: none."""
        arena, zone = self.arena, self.zone
        arena._drain_companions(zone.name)
        mail = arena._mail
        for cpu in self.core.live_cpus():
            if cpu != self.cpu:
                mail.ask_drain(cpu, zone.id)

    def take_cache_of(self, cpu: int) -> int:
        """Take CPU ``cpu``'s cached items of this zone (its stack and its
        remote-free batches, as the tags name them) into this CPU's cache: the
        keg manager, on behalf of a sleeper, from a CPU that left a drain request
        unanswered.  The victim's REVOKES word moves with them, so that its next
        alloc (the fast path reads it) or slow path first resyncs its stack from
        the tags (``_resync``).  Returns how many were taken.

        The one race left: an alloc fast path of the victim already past its
        REVOKES read when the tags change; the manager leaves a CPU ``GRACE``
        seconds (and never takes from a stopped process), and any call of the
        victim into this zone's slow paths, or its recv or poll, answers the
        request first.  Lock: takes zone (and keg, to list the slabs)."""
        core, keg, zidx = self.core, self.zone.keg, self.zone.zidx
        tags, w = core.tags, core.w
        cached = L.TAG_CACHED | zidx << 4
        hs, ts = [], []
        lk = self._zlock()
        try:
            cw = L.cpu_word(cpu)        # an item granted to it, not yet picked up: its
            granted = w[cw + _C["GRANT_T"]] if w[cw + _C["GRANT_ZONE"]] == self.zone.id + 1 \
                else -1                 # sleep loop takes it under this lock, leave it
            found = [(ti, tv) for ti, tv in keg.held_by(cpu, keg.slab_bases_locked(self.cpu))
                     if tv & 0xFF == cached and ti != granted]
            if found:       # first: killed half-way, the victim still resyncs
                w[L.cpu_word(cpu) + _C["REVOKES"]] += 1
            for ti, tv in found:
                if tags[ti] == tv:
                    tags[ti] = self.w_cached
                    hs.append(keg.handle_of(ti))
                    ts.append(ti)
            if found:
                w[L.cpu_stat_word(cpu, self.zone.id) + _CS["CACHED"]] = 0
        finally:
            lk.release()
        if hs:
            self.take_home(hs, ts)
        return len(hs)

    def _room_now(self) -> bool:
        """Zone lock held: could an import succeed now?"""
        w, zw = self.core.w, self.zw
        if w[zw + _Z["DEPOT_N"]]:
            return True
        limit = w[zw + _Z["LIMIT"]]
        if limit and w[zw + _Z["ITEMS"]] >= limit:
            return False
        keg = self.zone.keg
        return (self.core.w[keg.kw + L.KEG["FREE_ITEMS"]] > 0
                or self.core.w[L.HDR["FREE_PAGES"]] >= keg.ppera)

    def _sleepq_first(self) -> int:
        w, zw = self.core.w, self.zw
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        q = zw + L.ZONE_SLEEPQ_WORD
        while head < tail and w[q + head % L.MAX_CPUS] < 0:
            head += 1
        w[zw + _Z["SQ_HEAD"]] = head
        return w[q + head % L.MAX_CPUS] if head < tail else -1

    def _sleepq_push(self, cpu: int) -> None:
        """Lock: zone."""
        w, zw = self.core.w, self.zw
        self._sleepq_first()                    # drop tombstones at the head
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        if tail - head >= L.MAX_CPUS:
            self._sleepq_compact()
            tail = w[zw + _Z["SQ_TAIL"]]
        w[zw + L.ZONE_SLEEPQ_WORD + tail % L.MAX_CPUS] = cpu
        w[zw + _Z["SQ_TAIL"]] = tail + 1
        w[zw + _Z["SLEEPERS"]] += 1

    def _sleepq_compact(self) -> None:
        """Squeeze tombstones out of the ring, keeping FIFO order.  Lock: zone."""
        w, zw = self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        head, tail = w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]
        live = [c for c in (w[q + i % L.MAX_CPUS] for i in range(head, tail)) if c >= 0]
        for i, c in enumerate(live):
            w[q + (head + i) % L.MAX_CPUS] = c
        w[zw + _Z["SQ_TAIL"]] = head + len(live)

    def _sleepq_contains(self, cpu: int) -> bool:
        w, zw = self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        return any(w[q + i % L.MAX_CPUS] == cpu
                   for i in range(w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]))

    def _sleepq_remove(self, cpu: int) -> None:
        """Lock: zone."""
        w, zw = self.core.w, self.zw
        q = zw + L.ZONE_SLEEPQ_WORD
        for pos in range(w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]):
            if w[q + pos % L.MAX_CPUS] == cpu:
                w[q + pos % L.MAX_CPUS] = -1
                w[zw + _Z["SLEEPERS"]] -= 1
                break
        self._sleepq_first()

    def _grant(self, h, t) -> bool:
        """F2: hand a freed (dtor'd, still inited) item to the first sleeper.
        Lock: zone."""
        first = self._sleepq_first()
        if first < 0:
            return False
        core, w = self.core, self.core.w
        self._sleepq_remove(first)
        cw = L.cpu_word(first)
        core.tags[t] = L.tag(L.TAG_CACHED, self.zone.zidx, first, first)
        w[cw + _C["GRANT_H"]] = h
        w[cw + _C["GRANT_T"]] = t
        w[cw + _C["GRANT_ZONE"]] = self.zone.id + 1
        self.arena._post_wake(first)
        return True

    # ================================================================== free slow path
    def _free_slow(self, h, arg):
        other = self._check_thread("free", h)
        if other is not None:
            return other.free(h, arg)
        h, t, tg = self._validate_free(h)
        return self._free_validated(h, t, tg, arg)

    def _free_item(self, h, t, arg):
        """The free fast path's way out for an item of this keg (tag index ``t``)
        that it cannot take: not ours or not allocated, a full stack, sleepers.
        Lock: none; the calling thread owns this CPU."""
        tg = self.core.tags[t]
        if tg & 0xFF != L.TAG_ALLOC | self.zone.zidx << 4:
            self.zone._raise_bad(h, "free")
        return self._free_validated(h, t, tg, arg)

    def _free_validated(self, h, t, tg, arg):
        """The free slow path (F2-F6) of a validated item with tag ``tg``.  While
        the zone has sleepers this CPU first takes its mail: a drain request
        waiting there gives its cache of the zone back (to them)."""
        zone, core = self.zone, self.core
        if core.w[self.zw + _Z["SLEEPERS"]] and self.arena._mail.pending():
            self.arena._mail.collect()
        if L.tag_holder(tg) != self.cpu:                            # F4
            tg = self._take_over(h, t, tg)
        home = L.tag_home(tg)
        if home != self.cpu:
            self.xfrees += 1
        if zone.dtor is not None:
            zone.dtor(zone, h, arg)
        w = core.w
        if w[self.zw + _Z["SLEEPERS"]]:                             # F2
            lk = self._zlock()
            try:
                granted = self._grant(h, t)
            finally:
                lk.release()
            if granted:
                self.counts(0, 1)
                self.publish()
                return None
        if home != self.cpu and self.xfree_message and home < L.MAX_CPUS:   # F6
            self._xfree_add(h, t, home)
            return None
        core.tags[t] = self.w_cached                                # F3
        self.items.append(h)
        self.tix.append(t)
        self.counts(0, 1)
        self.refresh()
        if len(self.items) > 2 * self.bsize:
            self._flush(max(len(self.items) - self.bsize, 1) if self.bsize else len(self.items))
        self.publish()
        return None

    def _validate_free(self, h):
        """(handle, tag index, tag) of an allocated item of this zone, or raise."""
        zone = self.zone
        h = as_handle(h, zone.name)
        keg = zone.keg
        base = keg.slab_of(h)
        if base < 0:
            zone._raise_bad(h, "free")
        t = (base >> 2) + keg.offmap[h - base]
        tg = self.core.tags[t]
        if L.tag_state(tg) != L.TAG_ALLOC or L.tag_zidx(tg) != zone.zidx:
            zone._raise_bad(h, "free")
        return h, t, tg

    def take_over(self, h) -> None:
        """F4's first half alone: allocated item ``h`` becomes this CPU's (from
        whichever CPU holds it, or none), still allocated; its free is then this
        CPU's own.  For storage that its last user is about to forget, then free:
        taken over first, it is never at once forgotten and held by another CPU,
        whose recovery could not tell it from storage still in use.  Raises as
        ``free`` would for an item that is not allocated.  Lock: takes zone when
        another CPU (or none) holds it."""
        core, keg = self.core, self.zone.keg
        try:                            # already allocated here and held here: nothing to do
            b = core.pt[h >> L.PAGE_SHIFT] ^ keg.kid_bits
            if core.tags[(b >> 2) + keg.offmap[h - b]] == self.w_alloc and \
                    self.tid == get_ident():
                return None
        except (IndexError, TypeError, KeyError):
            pass                        # not an item of this zone's keg: the checks below say why
        if self.tid != get_ident():
            other = self._check_thread("take-over", h)
            if other is not None:
                return other.take_over(h)
        h, t, tg = self._validate_free(h)
        if L.tag_holder(tg) != self.cpu:
            self._take_over(h, t, tg)
        return None

    def _take_over(self, h, t, tg):
        """F4: an item held by another CPU (or by none: its CPU closed) is freed
        here; it becomes this CPU's, keeping its home.  Returns the new tag.
        Lock: takes zone.

        What makes the free legitimate is the state and the zone (still an
        allocated item of this zone) and that no other CPU has claimed it since
        ``tg`` was read: its holder is the same, or nobody -- recovery gives a dead
        CPU's set-aside items to nobody, and a CPU that closes its own, while a
        free of them may be on its way.  Another live holder (a take-over, a
        hand-off received, recovery claiming the item to free it) refuses it."""
        lk = self._zlock()
        try:
            cur = self.core.tags[t]
            holder = L.tag_holder(cur)
            if (cur ^ tg) & 0xFF:
                self.zone._raise_bad(h, "free")
            if holder != L.tag_holder(tg) and holder != L.NO_CPU:
                raise BadHandleError(f"zone {self.zone.name!r}: free of handle {h}: CPU "
                                     f"{holder} claimed the item while this free was under way")
            home = L.tag_home(cur)
            new = L.tag(L.TAG_ALLOC, self.zone.zidx, self.cpu,
                        home if home < L.MAX_CPUS else self.cpu)
            self.core.tags[t] = new
        finally:
            lk.release()
        return new

    # ================================================================== remote frees (F6)
    def _xfree_add(self, h, t, home):
        """Batch an item freed here for its home CPU (zone option xfree="message");
        sent when the batch fills, when it is older than XFREE_DELAY, and on close."""
        self.core.tags[t] = L.tag(L.TAG_CACHED, self.zone.zidx, self.cpu, home)
        now = time.monotonic()
        batch = self.xbatches.get(home)
        if batch is None:
            batch = self.xbatches[home] = ([], [], now)
        batch[0].append(h)
        batch[1].append(t)
        self.counts(0, 1)
        if len(batch[0]) >= XFREE_BATCH or now - batch[2] > XFREE_DELAY:
            self._xfree_send(home)              # publishes

    def _xfree_send(self, home):
        """Send the batch for ``home``.  Under the zone lock (the mailbox lock, a
        leaf, inside it): the batch is never out of ``xbatches`` yet still cached
        here while the keg manager could take it.  Lock: takes zone."""
        zone = self.zone
        lk = self._zlock()
        try:
            if self.core.w[self.rev_w] != self.rev:
                self._resync_locked()
            batch = self.xbatches.pop(home, None)
            if batch is None:                   # taken by the keg manager meanwhile
                return
            hs, ts, _ = batch
            sent = self.arena._mail.post(home, MSG_XFREE, [(zone.id, zone.zidx, hs, ts)],
                                         L.TAG_XFREE)
        finally:
            lk.release()
        if sent:
            self.msgs_sent += 1
            self.items_sent += len(hs)
        else:                       # home gone or its mailbox full: free here (UMA's way)
            self.fallbacks += 1
            self._mark_cached(ts)
            self.take_home(hs, ts)
        self.publish()

    def flush_xfree(self, max_age: float = 0.0):
        """Send every batch older than ``max_age`` seconds."""
        self._check_revoked()
        now = time.monotonic()
        for home in [h for h, b in self.xbatches.items() if now - b[2] >= max_age]:
            self._xfree_send(home)

    def take_home(self, hs, ts):
        """Items tagged CACHED by this CPU (its own, back from a remote free) go
        into the cache; a full cache spills to the depot."""
        self.items.extend(hs)
        self.tix.extend(ts)
        self.refresh()
        if len(self.items) > 2 * self.bsize:
            self._flush(len(self.items) - self.bsize if self.bsize else len(self.items))
        self.publish()

    def _flush(self, k: int):
        """F3: move the ``k`` oldest cached items to the sleepers, then the depot,
        or to the keg when the depot is full (or caching is off).  The items
        leave the stack under the zone lock, or (no caching) re-tagged FINI
        before any lock is waited for: never cached here yet out of the stack
        while the keg manager might take this CPU's cache (``take_cache_of``)."""
        if not self.bsize:
            self._check_revoked()
            k = min(k, len(self.items))
            hs, ts = self.items[:k], self.tix[:k]
            del self.items[:k]
            del self.tix[:k]
            self._release_to_keg(hs, ts, run_fini=True)
            return
        lk = self._zlock()
        try:
            if self.core.w[self.rev_w] != self.rev:
                self._resync_locked()
                k = min(k, len(self.items))
            hs, ts = self.items[:k], self.tix[:k]
            del self.items[:k]
            del self.tix[:k]
            while hs and self.core.w[self.zw + _Z["SLEEPERS"]]:
                if not self._grant(hs[-1], ts[-1]):
                    break
                hs.pop()
                ts.pop()
            if not hs or self._depot_put(hs, ts):
                self.depot_puts += 1
                return
            self._mark(ts, self.w_fini)             # on their way to the slab
        finally:
            lk.release()
        self._release_to_keg(hs, ts, run_fini=True)

    # ================================================================== bulk
    def alloc_bulk(self, n, how=M_NOWAIT, timeout=None):
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"zone {self.zone.name!r}: alloc_bulk of {n} items")
        if self.tid != get_ident() and (other := self._check_thread()) is not None:
            return other.alloc_bulk(n, how, timeout)
        self._check_revoked()
        zone = self.zone
        items = self.items
        plain = type(how) is int and (how == M_NOWAIT or how == M_WAITOK)
        if not items and n and plain and zone.ctor is None:
            hs = self._depot_bulk(n)
            if hs is not None:
                return hs
        while len(items) < n and self._fill(n - len(items)):
            pass
        if not plain:
            check_how(how, zone.name)
        if zone.ctor is None and not how & M_ZERO and len(items) >= n:
            cut = len(items) - n
            hs, ts = items[cut:], self.tix[cut:]
            del items[cut:]
            del self.tix[cut:]
            tags, wa = self.core.tags, self.w_alloc
            for t in ts:
                tags[t] = wa
            self.counts(n, 0)
            hs.reverse()
            return hs
        if len(items) < n and not how & M_WAITOK:
            self.fails += 1
            self.publish()
            return None
        out = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in range(n):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                h = self.alloc(how, left)
            except BaseException:
                self.free_bulk(out)
                raise
            if h is None:
                self.free_bulk(out)
                return None
            out.append(h)
        return out

    def _depot_bulk(self, n):
        """A1 for a whole bulk allocation into an empty stack: ``n`` items straight
        from the depot, tagged allocated (the stack would hand them out at once);
        None when the depot has fewer, or mail is waiting (``_fill`` takes it first)."""
        if self.arena._mail.pending():
            return None
        lk = self._zlock()
        try:
            self.refresh()
            if self.core.w[self.zw + _Z["DEPOT_N"]] < n:
                return None
            hs, ts = [], []
            self._depot_take(n, hs, ts, self.w_alloc)
            self.depot_gets += 1
        finally:
            lk.release()
        self.counts(n, 0)
        hs.reverse()
        return hs

    def _depot_put_batch(self, hs) -> bool:
        """F3 for a whole batch: items allocated and held here go straight into the
        depot if it has room and the zone no sleepers; False (nothing changed) if
        not, or if one of them is not such an item.  Lock: takes zone."""
        w, zw = self.core.w, self.zw
        k = len(hs)
        lk = self._zlock()
        try:
            n, cap = w[zw + _Z["DEPOT_N"]], w[zw + _Z["DEPOT_CAP"]]
            if n + k > cap or w[zw + _Z["SLEEPERS"]]:
                return False
            ts = self.zone.keg.retag(hs, self.w_alloc, self.w_depot)
            if len(ts) < k:
                self._mark(ts, self.w_alloc)
                return False
            self._depot_append(n, cap, hs, ts)
            self.depot_puts += 1
        finally:
            lk.release()
        self.counts(0, k)
        return True

    def free_bulk(self, handles):
        hs = list(handles)
        if self.tid != get_ident() and (other := self._check_thread()) is not None:
            return other.free_bulk(hs)
        zone, core = self.zone, self.core
        if zone.dtor is None and not core.w[self.zw + _Z["SLEEPERS"]]:
            # F1 for the whole batch: every item allocated here and held here, and
            # room in the stack (else F3 spills below), or F3 at once: a batch that
            # would overflow the stack goes to the depot whole, as UMA's full free
            # bucket does.  All or nothing: the tags re-written before a bad handle
            # (or the second listing of one) are put back, and the handle-by-handle
            # path below names the error.
            if self.bsize and len(self.items) + len(hs) > 2 * self.bsize and \
                    self._depot_put_batch(hs):
                return None
            ts = zone.keg.retag(hs, self.w_alloc, self.w_cached)
            if len(ts) == len(hs):
                self.items.extend(hs)
                self.tix.extend(ts)
                self.counts(0, len(ts))
                if len(self.items) > 2 * self.bsize:
                    self._flush(len(self.items) - self.bsize if self.bsize else len(self.items))
                return None
            self._mark(ts, self.w_alloc)
        if len(set(hs)) != len(hs):
            dup = next(h for h in hs if hs.count(h) > 1)
            raise DoubleFreeError(f"zone {zone.name!r}: free_bulk lists handle {dup} twice")
        checked = [self._validate_free(h) for h in hs]   # all or nothing: none freed if one is bad
        for h, t, tg in checked:
            self._free_validated(h, t, tg, None)
        return None

    # ================================================================== limits, drain
    def set_max(self, nitems, below_use=False):
        nitems = operator.index(nitems)
        if nitems < 0:
            raise ValueError(f"zone {self.zone.name!r}: limit {nitems} < 0")
        w, zw = self.core.w, self.zw
        lk = self._zlock()
        try:
            items = w[zw + _Z["ITEMS"]]
            over = nitems and nitems < items
            if over and not below_use:
                raise ValueError(f"zone {self.zone.name!r}: limit {nitems} is below the "
                                 f"{items} items already out of the slabs")
            w[zw + _Z["OVER"]] = items if over else 0
            w[zw + _Z["LIMIT"]] = nitems
            apply_maxcache(w, zw, nitems)
        finally:
            lk.release()
        self.refresh()
        self.arena._wake_sleepers(self.zone.id)
        return nitems

    def drain_cache(self):
        """Give every cached item back (depot first, else keg)."""
        self._check_revoked()
        if self.items:
            self._flush(len(self.items))
        self.publish()

    def drain_depot(self, keep: int = 0):
        """Depot buckets beyond ``keep`` items go back to the keg (zone fini);
        then the keg's free slabs go back to the arena."""
        core, w, zw = self.core, self.core.w, self.zw
        hs, ts = [], []
        lk = self._zlock()
        try:
            n = w[zw + _Z["DEPOT_N"]]
            if n > keep:
                self._depot_take(n - keep, hs, ts)
                # tagged CACHED by this CPU until they reach the slab
            w[zw + _Z["IMAX"]] = w[zw + _Z["IMIN"]] = w[zw + _Z["DEPOT_N"]]
            if w[zw + _Z["BUCKET_SIZE"]] > w[zw + _Z["BUCKET_MIN"]]:
                w[zw + _Z["BUCKET_SIZE"]] -= 1
        finally:
            lk.release()
        self._release_to_keg(hs, ts, run_fini=True)
        keg = self.zone.keg
        klk = core.lock(keg.lock_index)
        klk.acquire(owner_id=self.cpu)
        try:
            released = keg.drain()
        finally:
            klk.release()
        self.refresh()
        return released

