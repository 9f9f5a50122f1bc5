"""zcreate: making zones and kegs, and finding them (UMA's ``uma_zcreate`` and
``uma_zsecond_create``).

A zone record is filled under the vm lock (the arena's tables) and made visible
last (``ZF_LIVE``); a primary zone gets a keg of its own, a secondary zone sits on
its master's keg with its own hooks, caches and limit.  Hooks are stored by name
(``hooks.name_of``).  ``zone(name)`` finds a zone any process made.
"""

from __future__ import annotations

import time

from . import layout as L
from .errors import ZoneError
from .hooks import name_of
from .keg import Keg
from .zone import BUCKET_MAX, Zone, apply_maxcache, bucket_select


_H, _Z, _C, _K = L.HDR, L.ZONE, L.CPU, L.KEG
DEPOT_CAP = 1024             # depot entries per zone (4 pages)
SMALL_DATA_PAGES = 64        # an arena with fewer data pages (256 KiB) gives each zone
SMALL_DEPOT_CAP = L.PAGE_SIZE // L.DEPOT_ENTRY_BYTES    # a one-page depot (256 entries)


def depot_cap(data_pages: int) -> int:
    """Depot entries of a zone in an arena of ``data_pages``: DEPOT_CAP, or one page
    of them in a small arena, where the depots of the mbuf layer's seven zones (made
    with every arena) would otherwise take more pages than the arena has."""
    return DEPOT_CAP if data_pages >= SMALL_DATA_PAGES else SMALL_DEPOT_CAP



class ZoneTable:
    """The zone-making half of ``Arena`` (a mixin)."""

    def zcreate(self, name: str, size: int, *, refcnt: bool = False, max_items: int = 0,
                align: int = 8, bucket_size: int | str | None = None, ctor=None, dtor=None,
                init=None, fini=None, nofree: bool = False, xfree: str = "local") -> Zone:
        """Create a zone and its keg.  ``bucket_size``: None/"adaptive" (UMA's
        choice, grows on contention), 0 (no caching), or a fixed size."""
        self._check_open()
        size = check_int("zone size", size, 1)
        max_items = check_int("max_items", max_items, 0)
        align = check_int("align", align, 1)
        if align & (align - 1) or align > L.PAGE_SIZE:
            raise ZoneError(f"zone {name!r}: align {align} is not a power of two <= page size")
        align = max(align, 8)
        self._check_zone_options(name, bucket_size, xfree)
        hooks = [name_of(h) for h in (ctor, dtor, init, fini)]
        core, w = self._core, self._core.w
        with core.lock(L.VM_LOCK):
            self._check_new_zone_name(name)
            keg_id = w[_H["NKEGS"]] + 1
            if keg_id > L.MAX_KEGS:
                raise ZoneError(f"arena {self.name!r}: all {L.MAX_KEGS} kegs are in use")
            rsize = L.round_up(size, align)
            ppera, _, _ = L.keg_layout(rsize, refcnt, max(1, core.geometry.data_pages // 8))
            if ppera > core.geometry.data_pages:
                raise ZoneError(f"zone {name!r}: one slab of {size}-byte items needs {ppera} "
                                f"pages; the arena has {core.geometry.data_pages}")
            depot = self._reserve_depot(name)           # the one step that can fail
            Keg.format(core, keg_id, size, align, refcnt, nofree)
            w[_H["NKEGS"]] = keg_id
            core.create_lock(L.keg_lock_index(keg_id))
            zone_id = self._new_zone_record(name, keg_id, 0, size, max_items, bucket_size,
                                            hooks, refcnt, xfree, depot, secondary=False)
        return self._zone_by_id(zone_id)

    def zsecond_create(self, name: str, master, *, ctor=None, dtor=None, init=None, fini=None,
                       max_items: int = 0, bucket_size=None, xfree: str = "local") -> Zone:
        """A secondary zone on ``master``'s keg, with its own hooks and caches
        (UMA's ``uma_zsecond_create``; the mbuf packet zone)."""
        self._check_open()
        master = self.zone(master) if isinstance(master, str) else master
        self._check_zone_options(name, bucket_size, xfree)
        hooks = [name_of(h) for h in (ctor, dtor, init, fini)]
        core = self._core
        with core.lock(L.VM_LOCK):
            self._check_new_zone_name(name)
            kid = master.keg.id
            zidx = len(core.zones_of_keg(kid))
            if zidx >= L.MAX_ZONES_PER_KEG:
                raise ZoneError(f"keg of {master.name!r} already carries {zidx} zones")
            max_items = check_int("max_items", max_items, 0)
            depot = self._reserve_depot(name)
            zone_id = self._new_zone_record(name, kid, zidx, master.size, max_items, bucket_size,
                                            hooks, master.keg.refcnt, xfree, depot,
                                            secondary=True)
        return self._zone_by_id(zone_id)

    @staticmethod
    def _check_zone_options(name, bucket_size, xfree):
        if xfree not in ("local", "message"):
            raise ZoneError(f"zone {name!r}: xfree must be 'local' or 'message', not {xfree!r}")
        if bucket_size is None or bucket_size == "adaptive":
            return
        bsize = check_int("bucket_size", bucket_size, 0)
        if bsize > BUCKET_MAX:
            raise ZoneError(f"zone {name!r}: bucket_size {bsize} > {BUCKET_MAX}")

    def _check_new_zone_name(self, name):
        if not isinstance(name, str):
            raise TypeError(f"a zone name is a str, not {type(name).__name__}")
        if not name or len(name.encode()) >= L.NAME_BYTES or "\0" in name:
            raise ZoneError(f"zone name {name!r} must be 1..{L.NAME_BYTES - 1} bytes, no NUL")
        if self._core.zone_id(name) >= 0:
            raise ZoneError(f"arena {self.name!r} already has a zone {name!r}")
        if self._core.w[_H["NZONES"]] >= L.MAX_ZONES:
            raise ZoneError(f"arena {self.name!r}: all {L.MAX_ZONES} zones are in use")

    def _reserve_depot(self, name) -> int:
        """Pages for a new zone's depot.  Lock: vm."""
        cap = depot_cap(self._core.geometry.data_pages)
        pages = -(-cap * L.DEPOT_ENTRY_BYTES // L.PAGE_SIZE)
        depot = self._core.vm.alloc_run(pages, L.VM_INTERNAL_KEG)
        if depot < 0:
            raise ZoneError(f"arena {self.name!r} has no room for the depot of zone {name!r}")
        return depot

    def _new_zone_record(self, name, keg_id, zidx, size, max_items, bucket_size, hooks,
                         refcnt, xfree, depot, secondary) -> int:
        """Fill the next zone record (arguments already checked).  Lock: vm."""
        core, w = self._core, self._core.w
        zone_id = w[_H["NZONES"]]
        fixed = not (bucket_size is None or bucket_size == "adaptive")
        if fixed:
            bmin = bsize = bmax = bucket_size
        else:
            bmin = bsize = bucket_select(size)
            bmax = BUCKET_MAX
        zw = L.zone_word(zone_id)
        w[zw:zw + L.ZONE_WORDS] = core.zero_words(L.ZONE_WORDS)
        L.write_str(core.mv, L.zone_name_off(zone_id), L.NAME_BYTES, name)
        for i, h in enumerate(hooks):
            L.write_str(core.mv, L.zone_hook_off(zone_id, i), L.HOOK_BYTES, h)
        w[zw + _Z["KEG"]] = keg_id
        w[zw + _Z["ZIDX"]] = zidx
        w[zw + _Z["SIZE"]] = size
        w[zw + _Z["LIMIT"]] = max_items
        w[zw + _Z["DEPOT_OFF"]] = depot
        w[zw + _Z["DEPOT_CAP"]] = depot_cap(core.geometry.data_pages)
        w[zw + _Z["BUCKET_SIZE"]] = bsize
        w[zw + _Z["BUCKET_MIN"]] = bmin
        w[zw + _Z["BUCKET_MAX"]] = bmax
        w[zw + _Z["XFREE"]] = 1 if xfree == "message" else 0
        w[zw + _Z["CREATED_NS"]] = time.time_ns()
        core.create_lock(L.zone_lock_index(zone_id))
        w[zw + _Z["FLAGS"]] = (L.ZF_LIVE | (L.ZF_SECONDARY if secondary else 0)
                               | (L.ZF_REFCNT if refcnt else 0)
                               | (L.ZF_FIXED_BUCKET if fixed else 0))
        apply_maxcache(w, zw, max_items)
        w[L.keg_word(keg_id) + _K["NZONES"]] += 1
        w[_H["NZONES"]] = zone_id + 1
        return zone_id

    def zone(self, name: str) -> Zone:
        """The zone called ``name`` (made by any process)."""
        self._check_open()
        zid = self._core.zone_id(name)
        if zid < 0:
            raise ZoneError(f"arena {self.name!r} has no zone {name!r}")
        return self._zone_by_id(zid)

    def _zone_by_id(self, zone_id: int) -> Zone:
        z = self._zones.get(zone_id)
        if z is None:
            z = self._zones[zone_id] = Zone(self, zone_id)
        return z

    def zones(self) -> list[str]:
        return [self._core.zone_name(z) for z in self._core.live_zone_ids()]


def check_int(what: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{what} must be >= {lo}, not {v}")
    return v
