"""arena: one shared-memory segment with its locks, CPU slots, zones and kegs.

``Arena.create`` formats a segment; ``Arena.attach`` maps it from another
process.  Every attachment is a *CPU*: it takes a CPU slot (pid and process
start time) and keeps private bucket caches for the zones it uses.

``Arena`` is the facade users know, assembled from one module per role:

    arena     making, attaching, formatting, closing and destroying; reading
              (stats, vmstat -z, check), reclaim; sysctl; ``Arena.extend``
    backend   the views of one mapping (``Core``) over a POSIX or local backend
    cpus      this attachment's CPU slot, its threads' CPUs, fork (``CpuSlots``)
    zcreate   making and finding zones and kegs (``ZoneTable``)
    handoff   send/recv, disown/claim, poll, drain requests (``Messages``)

and from what the layers above the core add through ``Arena.extend`` (the mbuf
layer's ``netstat_m``, Buffers' ``alloc``; see ``layers``).
"""

from __future__ import annotations

import os
import time
import warnings
from threading import get_ident

from . import layers
from . import layout as L
from . import stats as _stats
from .admin import existing_arena_error, remove_stale
from .backend import Core, LocalBackend, PosixBackend
from .check import check as _check
from .cpus import CpuSlots, _live_arenas, live_attachments  # noqa: F401  (re-exported)
from .errors import (ArenaClosedError, ArenaExistsError, ArenaFullError, ArenaSizeWarning,
                     LayoutError, NoSpaceError, ShmallocError, StaleArenaError, ZoneError)
from .handoff import Messages
from .ipc import naming
from .ipc.segment import Segment, shm_free_bytes
from .mail import PostOffice
from .zcreate import ZoneTable
from .zone import Zone


_H, _Z, _C, _K = L.HDR, L.ZONE, L.CPU, L.KEG
DEFAULT_SIZE = 64 << 20
CLOSE_WAIT = 5.0             # seconds close() waits for its threads' sleepers to leave



class Arena(CpuSlots, ZoneTable, Messages):
    """An attachment to an arena: this process's CPU on it.

    ``Arena.create(name, size)`` makes a new arena (and is its first CPU);
    ``Arena.attach(name)`` joins one from another process.  ``close()`` gives the
    CPU slot back (its cached items go to the depot); ``destroy()`` also removes
    every OS object of the arena.  ``with Arena.create(...)`` destroys on exit,
    ``with Arena.attach(...)`` closes.
    """

    def __init__(self, core: Core, name: str, creator: bool, parent: "Arena | None" = None):
        self._core = core
        self.name = name
        self._creator = creator
        self._closed = False
        self._closing = False
        self._owner_tid = get_ident()
        self._pid = os.getpid()
        self._zones: dict[int, Zone] = {}
        self._zone_by_keg: dict[tuple[int, int], Zone] = {}
        self._wakes: dict[int, tuple[int, object]] = {}   # cpu -> (gen, open semaphore)
        self._thread_arenas: dict[tuple[int, int], Arena] = {}
        self._parent = parent
        self._wake = None
        self._blocked = 0             # M_WAITOK sleeps and recv waits under way (owner thread)
        self._probing = 0             # > 0: a zone init's try before it may wait (zone._run_init)
        self._wait_deadline = None    # a waiting zone init's deadline, for the allocations it makes
        self.cpu_id = self._take_cpu()
        self._mail = PostOffice(self)
        _live_arenas.add(self)

    # ------------------------------------------------------------ constructors
    @classmethod
    def create(cls, name: str, size: int = DEFAULT_SIZE, *, debug: int | None = None,
               tunables: dict | None = None, strict: bool = False,
               replace: bool = False, bare: bool = False) -> "Arena":
        """Create arena ``name`` of ``size`` bytes (rounded up to pages).
        ``tunables``: boot-time sysctls the layers take, e.g. the mbuf layer's
        ``{"kern.ipc.nmbclusters": 0}`` (``layers.register_tunables``).  The
        layers' on-create setups run last (``layers.register_on_create``: the mbuf
        layer makes its seven zones, as FreeBSD's ``mbuf_init`` does at boot);
        ``bare=True`` skips them, for an arena of custom zones only (a layer used
        on it later sets itself up then).

        ``/dev/shm`` backs the arena's pages as they are handed out; a size
        beyond the room it has warns (ArenaSizeWarning), or with ``strict``
        raises ArenaFullError; the metadata pages are reserved here.  A name
        still held by a live process raises ArenaExistsError naming it; one left
        by processes that all died raises StaleArenaError, unless ``replace``:
        then what they left is removed and the arena made anew."""
        name = naming.validate_name(name)
        size = cls._check_size(size)
        tunables = layers.validate_tunables(tunables)
        cls._check_room(name, size, strict)
        seg_name = naming.object_name(name, "arena")
        try:
            seg = Segment.create(seg_name, size)
        except ArenaExistsError:
            err = existing_arena_error(name)
            if not (replace and isinstance(err, StaleArenaError)):
                raise err from None
            remove_stale(name)
            seg = Segment.create(seg_name, size)
        try:
            seg.reserve(0, L.Geometry(size).data_off)
            backend = PosixBackend(name, seg)
            core = Core(backend, size)
            cls._format(core, debug, tunables)
            arena = cls(core, name, creator=True)
        except NoSpaceError as e:
            _cleanup_failed_create(name, seg)
            raise ArenaFullError(f"arena {name!r}: /dev/shm has no room for its "
                                 f"{L.Geometry(size).data_off} bytes of metadata "
                                 f"({e.free} bytes free there)") from e
        except BaseException:
            _cleanup_failed_create(name, seg)
            raise
        return arena._set_up(bare)

    def _set_up(self, bare: bool) -> "Arena":
        """Run the layers' on-create setups (unless ``bare``); a failure destroys
        the new arena."""
        if not bare:
            try:
                layers.run_on_create(self)
            except BaseException:
                self.destroy()
                raise
        return self

    @staticmethod
    def _check_room(name: str, size: int, strict: bool) -> None:
        """Warn (or with ``strict`` refuse) an arena larger than the room left in
        /dev/shm: its pages would run out there before they run out in it."""
        free = shm_free_bytes()
        if free < 0 or size <= free:
            return
        msg = (f"arena {name!r}: {size} bytes asked, /dev/shm has {free} bytes free; "
               f"allocations raise ArenaFullError once its pages outgrow that")
        if strict:
            raise ArenaFullError(msg + " (strict: not created)")
        warnings.warn(msg, ArenaSizeWarning, stacklevel=3)

    @classmethod
    def create_local(cls, size: int = 8 << 20, *, debug: int | None = None,
                     tunables: dict | None = None, bare: bool = False) -> "Arena":
        """An arena on a bytearray with in-process locks (tests, one process);
        ``bare`` as for ``create``."""
        size = cls._check_size(size)
        tunables = layers.validate_tunables(tunables)
        backend = LocalBackend(size)
        core = Core(backend, size)
        cls._format(core, debug, tunables)
        return cls(core, backend.name, creator=True)._set_up(bare)

    @classmethod
    def attach(cls, name: str) -> "Arena":
        """Join an existing arena as a new CPU."""
        name = naming.validate_name(name)
        seg = Segment.attach(naming.object_name(name, "arena"))
        try:
            return cls(cls._core_of(name, seg), name, creator=False)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def _attach_core(cls, name: str) -> Core:
        """The views and locks of arena ``name`` without a CPU slot (taking one
        takes the vm lock): for a supervisor that repairs the locks of dead
        processes before it attaches.  ``core.close()`` lets go."""
        name = naming.validate_name(name)
        seg = Segment.attach(naming.object_name(name, "arena"))
        try:
            return cls._core_of(name, seg)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def _core_of(cls, name: str, seg) -> Core:
        size = cls._validate_segment(seg)
        core = Core(PosixBackend(name, seg), size)
        core.debug = max(core.w[_H["DEBUG"]], _debug_level(None))
        core.open_locks()
        return core

    def attach_local(self) -> "Arena":
        """Another CPU on the same in-process arena (local backend only)."""
        if not self._core.backend.local:
            raise ShmallocError("attach_local is for arenas made by create_local; "
                                "use Arena.attach(name) in another process")
        return Arena(self._core, self.name, creator=False, parent=self)

    @staticmethod
    def _check_size(size) -> int:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"arena size must be an int, not {type(size).__name__}")
        if size <= 0:
            raise ValueError(f"arena size must be positive, not {size}")
        size = L.round_up(size, L.PAGE_SIZE)
        if size < L.min_arena_size():
            raise ValueError(f"arena size {size} is below the minimum {L.min_arena_size()}")
        if size >= 1 << L.KEG_ID_SHIFT:
            raise ValueError(f"arena size {size} exceeds {1 << L.KEG_ID_SHIFT}")
        return size

    @staticmethod
    def _validate_segment(seg) -> int:
        size = seg.size
        if size < L.HDR_WORDS * 8:
            raise LayoutError(f"segment {seg.name} is {size} bytes: too small to be an arena")
        if size % L.PAGE_SIZE:
            raise LayoutError(f"segment {seg.name} is {size} bytes, not whole pages: "
                              f"truncated or not an arena")
        w = memoryview(seg.buf).cast("q")
        try:
            problems = L.header_problems(w, size)
        finally:
            w.release()
        if problems:
            raise LayoutError(f"segment {seg.name}: " + "; ".join(problems))
        return size

    @staticmethod
    def _format(core: Core, debug, tunables=None) -> None:
        g, w = core.geometry, core.w
        w[0:L.HDR_WORDS] = core.zero_words(L.HDR_WORDS)
        w[_H["VERSION"]] = L.LAYOUT_VERSION
        w[_H["SIZE"]] = g.size
        w[_H["PAGE_SIZE"]] = L.PAGE_SIZE
        w[_H["NPAGES"]] = g.npages
        w[_H["DATA_OFF"]] = g.data_off
        w[_H["LOCKS_OFF"]] = L.LOCKS_OFF
        w[_H["CPUS_OFF"]] = L.CPUS_OFF
        w[_H["ZONES_OFF"]] = L.ZONES_OFF
        w[_H["KEGS_OFF"]] = L.KEGS_OFF
        w[_H["PAGETAB_OFF"]] = g.pagetab_off
        w[_H["FREEMAP_OFF"]] = g.freemap_off
        w[_H["MAX_CPUS"]] = L.MAX_CPUS
        w[_H["MAX_ZONES"]] = L.MAX_ZONES
        w[_H["MAX_KEGS"]] = L.MAX_KEGS
        w[_H["MAX_LOCKS"]] = L.MAX_LOCKS
        w[_H["CREATED_NS"]] = time.time_ns()
        w[_H["CREATOR_PID"]] = os.getpid()
        w[_H["DEBUG"]] = _debug_level(debug)
        end = g.data_off // 8
        start = L.LOCKS_OFF // 8
        w[start:end] = core.zero_words(end - start)
        core.vm.format()
        core.debug = w[_H["DEBUG"]]
        core.create_lock(L.VM_LOCK)
        layers.store_tunables(w, tunables)
        w[_H["MAGIC"]] = L.MAGIC                  # last: the arena is formatted

    @property
    def size(self) -> int:
        return self._core.geometry.size

    @property
    def free_pages(self) -> int:
        return self._core.w[_H["FREE_PAGES"]]

    def _publish_all(self):
        for z in self._zones.values():
            z._cache.publish()
        for a in list(self._thread_arenas.values()):     # (one may close meanwhile)
            if not a._closed:
                a._publish_all()

    def zone_stats(self, name: str):
        self._publish_all()
        zid = self._core.zone_id(name) if isinstance(name, str) else name
        if zid not in self._core.live_zone_ids():
            raise ZoneError(f"arena {self.name!r} has no zone {name!r}")
        return _stats.zone_stats(self._core, zid)

    def stats(self):
        self._publish_all()
        return _stats.arena_stats(self._core)

    def cpu_stats(self):
        """Per-CPU counters summed over zones (live CPUs), as published."""
        self._publish_all()
        return _stats.cpu_stats(self._core)

    def cpu_slots(self):
        """The CPU slots in use (``stats.CpuSlot``: cpu, state, pid, start, gen)."""
        return _stats.cpu_slots(self._core)

    def lock_owners(self, held_only: bool = True):
        """Who holds each lock now (``stats.LockOwner``): every lock, or those held."""
        return _stats.lock_owners(self._core, held_only)

    def lock_stats(self):
        return _stats.lock_stats(self._core)

    def vmstat_z(self) -> str:
        self._publish_all()
        return _stats.vmstat_z(self._core)

    def check(self, level: int = 1) -> None:
        """Prove conservation and every structural invariant from the tags;
        raise CorruptionError naming each inconsistency."""
        self._check_open()
        self._publish_all()
        _check(self, level)

    def reclaim(self) -> int:
        """Low-memory reclaim for this process: drain this CPU's caches and every
        zone's depot, give empty slabs back.  Returns slabs released."""
        self._check_open()
        released = 0
        for zid in self._core.live_zone_ids():
            z = self._zone_by_id(zid)
            z._cache.drain_cache()
        for zid in self._core.live_zone_ids():
            released += self._zone_by_id(zid)._cache.drain_depot()
        w = self._core.w
        with self._core.lock(L.VM_LOCK):
            w[_H["RECLAIMS"]] += 1
            w[_H["SLABS_RELEASED"]] += released
        return released

    def _check_open(self):
        if self._closed:
            raise ArenaClosedError(f"arena {self.name!r} is closed in this process")

    def close(self) -> None:
        """Give this CPU's cached items back and its slot up; unmap.  The CPUs of
        this process's other threads close too; one of them asleep in an M_WAITOK
        allocation or waiting in ``recv`` is woken first and leaves with
        ArenaClosedError (``_wake_blocked``)."""
        if self._closed:
            return
        self._closing = True
        pid = os.getpid()
        threads = [a for a in list(self._thread_arenas.values())
                   if a._pid == pid and not a._closed]
        for a in threads:
            a._closing = True
        stuck = self._wake_blocked([self] + threads)
        for a in threads:
            if a not in stuck:
                a._adopt()
                a.close()
        self._thread_arenas.clear()
        if self in stuck:                     # its thread never left: leave it mapped
            self._closed = True
            _live_arenas.discard(self)
            return
        if not self._forked():
            self._adopt()
            self._drain_caches()
            self._release_cpu()
        for z in self._zones.values():
            z._cache.disable()
        self._closed = True
        self._zones.clear()
        self._zone_by_keg.clear()
        if not self._core.backend.local:
            for _, sem in self._wakes.values():
                sem.close()
        self._wakes.clear()
        _live_arenas.discard(self)
        if self._parent is None or not self._core.backend.local:
            if not self._core.backend.local:
                self._core.close()

    def _adopt(self) -> None:
        """The calling thread takes this CPU over (to close it): the fast paths
        now serve it alone, and the former owner's calls find the arena closing."""
        if self._owner_tid != get_ident() and not self._forked():
            self._owner_tid = get_ident()
            for z in self._zones.values():
                z._cache.refresh()

    def _wake_blocked(self, arenas) -> list:
        """Wake the CPUs among ``arenas`` (closing) whose thread sleeps in M_WAITOK
        or waits in ``recv``, and wait until each has left (it sees the arena
        closing at once, under its zone lock when asleep), ``CLOSE_WAIT`` seconds
        at most.  Returns those still inside then (a thread stuck in a hook or on
        a lock whose holder died), which are left open rather than unmapped under
        it; a RuntimeWarning names them."""
        me = get_ident()
        deadline = time.monotonic() + CLOSE_WAIT
        while True:
            blocked = [a for a in arenas if a._blocked and a._owner_tid != me]
            if not blocked:
                return []
            for a in blocked:
                if a._wake is not None:
                    a._wake.post()
            if time.monotonic() >= deadline:
                warnings.warn(f"arena {self.name!r}: CPU(s) "
                              f"{', '.join(str(a.cpu_id) for a in blocked)} still wait in "
                              f"an allocation or recv {CLOSE_WAIT:g} s after close; left "
                              f"open", RuntimeWarning, stacklevel=3)
                return blocked
            time.sleep(0.002)

    def destroy(self) -> None:
        """Remove every OS object of the arena (segment, semaphores, queues).
        Other processes' mappings stay valid until they close."""
        backend = self._core.backend
        self.close()
        backend.unlink_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._creator:
            self.destroy()
        else:
            self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"cpu={self.cpu_id}"
        return f"<Arena {self.name!r} size={self.size} {state}>"

    def sysctl(self, name: str, value: int | None = None):
        """Read sysctl ``name`` (``kern.ipc.nmbclusters`` ...), or set it to ``value``;
        the names are those the layers registered (``layers.register_sysctl``).  A
        value is an int, or a struct for an opaque sysctl (``kern.ipc.mbstat``).
        SysctlError with errno ENOENT for an unknown name."""
        return layers.sysctl(self, name, value)

    @classmethod
    def extend(cls, fn, name: str | None = None):
        """Add ``fn`` as method ``name`` (its own name by default): how a layer
        above the core gives the arena its facade (``arena.netstat_m()`` from the
        mbuf layer, ``arena.alloc(n)`` from Buffers).  A name the core defines is
        refused.  Returns ``fn``."""
        name = name or fn.__name__
        have = getattr(cls, name, None)
        if have is not None and getattr(have, "__module__", None) != fn.__module__:
            raise AttributeError(f"Arena.{name} is already defined by {have!r}")
        setattr(cls, name, fn)
        return fn


def _cleanup_failed_create(name, seg):
    try:
        seg.close()
    finally:
        for kind, obj in naming.list_objects(name):
            naming.remove_object(kind, obj)
        Segment.unlink(naming.object_name(name, "arena"))


def _debug_level(debug) -> int:
    if debug is None:
        env = os.environ.get("SHMALLOC_DEBUG", "0") or "0"
        try:
            debug = int(env)
        except ValueError:
            raise ValueError(f"SHMALLOC_DEBUG must be 0..3, not {env!r}") from None
    if not 0 <= debug <= 3:
        raise ValueError(f"debug level must be 0..3, not {debug}")
    return debug
