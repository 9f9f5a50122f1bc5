"""zone: typed allocation on a keg -- the public ``Zone`` object, and the map of
its paths (search order steps 1 and 2: ``cache``, ``depot``).

A zone is one kind of item on a keg (its size, ctor/dtor, init/fini, limit); each
CPU sees it through its own ``Zone`` object, whose ``alloc``/``free``/``view`` are
the fast paths of that CPU's cache.  Where an allocation or a free goes:

    module   holds                                              lock
    cache    this CPU's stack of free items, the fast paths,     none (fast paths);
             the alloc and free slow paths, bulk, drain, the     zone, then keg
             take-over of a silent CPU's cache
    depot    the zone's stack of full buckets in shared memory   zone
    sleepq   the zone's FIFO of M_WAITOK sleepers, the sleep,    zone
             the hand-over of a freed item to a sleeper
    xfree    cross-CPU frees batched and sent home by mail       zone, mailbox
    bulk     alloc_bulk and free_bulk: the cases a batch at a    zone
             time, with shortcuts through the depot
    keg      slabs (step 3), and the items' tags                 keg
    flags    M_NOWAIT, M_WAITOK, M_ZERO and their checks         -

Slow paths, in the order ``alloc`` tries them (UMA's ``cache_alloc``):

    A1  a bucket from the zone's depot (shared, zone lock: ``cache._fill``,
        ``depot.Depot.take``)
    A2  a bucket imported from the keg's slabs (zone lock, then keg lock), within
        the zone's limit; zone init runs on the imported items, outside the locks
        (for M_WAITOK the first item's init may wait, with the caller's deadline:
        ``cache._run_init``); ArenaFullError when /dev/shm cannot back a new slab
    A3  M_NOWAIT: count a failure and return None
    A4  M_WAITOK: queue on the zone's FIFO sleep queue, ask the other CPUs for their
        cached items of the zone (``sleepq.ask_for_caches``), and wait for a freed
        item to be handed over or room to open (``sleepq.SleepQueue.sleep``), the
        arena to close, or the timeout; the keg manager takes the cache of a CPU
        that does not answer (``cache.CpuCache.take_cache_of``, resynced by its
        owner: ``_resync``)

and ``free`` (UMA's ``uma_zfree_arg`` cases):

    F1  the item is ours and the stack has room: push (fast path)
    F2  the zone has sleepers: the item goes straight to the first sleeper
        (``sleepq.SleepQueue.grant``)
    F3  the stack is full: push, then move its oldest bucket to the depot, or to
        the keg when the depot is full (zone fini first: ``cache._flush``)
    F4  the item is held by another CPU (not handed over): take it over under the
        zone lock, then as F1-F3 (UMA's free-anywhere); ``take_over`` is this
        first half alone
    F5  anything else is an error: double free, foreign or bad handle
        (``Zone._raise_bad``)
    F6  the item's home is another CPU and the zone frees by message
        (``xfree="message"``): batched and sent home (``xfree``)

The bulk calls take the same steps a batch at a time: ``alloc_bulk`` into an empty
stack takes its batch from the depot directly (A1, never cached in between), and
``free_bulk`` of a batch that would overflow the stack puts it in the depot whole
(F3, as UMA's full free bucket).

Limits count items outside the slabs (caches, depot, allocated), as UMA's
``uz_items`` does.  Invariants, whenever the zone lock is free (``check``):

    ITEMS == items of the zone whose tag is not FREE (cached, depot, allocated,
             in flight, going home, importing, finishing)
    ITEMS <= max(LIMIT, OVER), when LIMIT > 0: OVER is 0 but after a limit set below
             the items already out (``set_max(n, below_use=True)``, FreeBSD 7/8's
             ``uma_zone_set_max``, which only caps further allocation), when it
             is ITEMS at that moment: the zone takes no item from its keg until
             frees bring ITEMS under the limit

Lock: the zone lock guards the zone record (depot, items, sleepers, bucket
size); the keg lock guards slabs.  Order zone -> keg -> vm.

Imports, module level only: zone -> cache -> bulk, depot, sleepq, xfree -> flags,
layout (and xfree -> mail); zone also imports flags, sleepq and xfree for the names
it re-exports (the flags, ``XFREE_BATCH``, the drain companions), which other
modules import from here.  Nothing below names ``zone`` or ``cache``: they reach
the cache as the object they are given.
"""

from __future__ import annotations

import operator
import os

from . import layout as L
from .cache import CpuCache
from .debug import trash_hooks
from .errors import BadHandleError, DoubleFreeError, ForeignHandleError
from .flags import M_NOWAIT, M_WAITOK, M_ZERO, as_handle, check_how
from .hooks import resolve
from .sleepq import SLEEP_SLICE, drain_companions, register_drain_companion
from .xfree import XFREE_BATCH, XFREE_DELAY

__all__ = [
    "Zone", "M_NOWAIT", "M_WAITOK", "M_ZERO", "BUCKET_MAX", "XFREE_BATCH", "XFREE_DELAY",
    "SLEEP_SLICE", "apply_maxcache", "as_handle", "bucket_select", "check_how",
    "drain_companions", "register_drain_companion",
]

BUCKET_MAX = 254               # UMA's BUCKET_SIZE(256) on LP64
# UMA's bucket zones: (entries, largest item size that uses them)
_BUCKET_ZONES = ((2, 4096), (4, 3072), (8, 2048), (16, 1024), (30, 512), (62, 256),
                 (126, 128), (254, 64))

_Z = L.ZONE


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
        self._cache = CpuCache(self, arena)
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
        frees bring it under the limit.  Lock: takes zone."""
        nitems = operator.index(nitems)
        if nitems < 0:
            raise ValueError(f"zone {self.name!r}: limit {nitems} < 0")
        w, zw = self._core.w, self._zw
        lk = self._cache._zlock()
        try:
            items = w[zw + _Z["ITEMS"]]
            over = nitems and nitems < items
            if over and not below_use:
                raise ValueError(f"zone {self.name!r}: limit {nitems} is below the "
                                 f"{items} items already out of the slabs")
            w[zw + _Z["OVER"]] = items if over else 0
            w[zw + _Z["LIMIT"]] = nitems
            apply_maxcache(w, zw, nitems)
        finally:
            lk.release()
        self._cache.refresh()
        self.arena._wake_sleepers(self.id)
        return nitems

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
