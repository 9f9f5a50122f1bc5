"""arena: one shared-memory segment with its locks, CPU slots, zones and kegs.

``Arena.create`` formats a segment; ``Arena.attach`` maps it from another
process.  Every attachment is a *CPU*: it takes a CPU slot (pid and process
start time) and keeps private bucket caches for the zones it uses.

The allocator core runs on any writable buffer plus lock objects: ``_Core``
holds the views, and a backend supplies the buffer and the locks, either POSIX
(``ipc``: shared memory and named semaphores) or in-process (a ``bytearray`` and
``threading`` locks, for fast single-process tests: ``Arena.create_local``).
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import time
import warnings
import weakref
from array import array
from threading import get_ident

import psutil

from . import layout as L
from .errors import (ArenaClosedError, ArenaExistsError, ArenaFullError, ArenaSizeWarning,
                     LayoutError, NoSpaceError, ShmallocError, StaleArenaError, ZoneError)
from .ipc import naming
from .ipc.lock import LocalLock, SemLock
from .ipc.segment import Segment, shm_free_bytes
from .ipc.semaphore import LocalWakeSemaphore, WakeSemaphore
from . import layers, slots
from . import stats as _stats
from .admin import existing_arena_error, remove_stale
from .check import check as _check
from .debug import LockOrderError, WitnessLock
from .hooks import DTOR_RECOVER, name_of
from .keg import Keg
from .mail import CpuGoneError, MailboxFullError, PostOffice, max_handles, MSG_HANDOFF
from .vm import Vm
from .zone import BUCKET_MAX, Zone, apply_maxcache, as_handle, bucket_select, drain_companions

_H, _Z, _C, _K = L.HDR, L.ZONE, L.CPU, L.KEG
DEFAULT_SIZE = 64 << 20
CLOSE_WAIT = 5.0             # seconds close() waits for its threads' sleepers to leave
DEPOT_CAP = 1024
_DEPOT_PAGES = -(-DEPOT_CAP * L.DEPOT_ENTRY_BYTES // L.PAGE_SIZE)


def _start_time(pid: int) -> int:
    """Process start time in microseconds (pid + start time names a process)."""
    try:
        return int(psutil.Process(pid).create_time() * 1e6)
    except psutil.Error:
        return 0


# ============================================================================ backends
class _PosixBackend:
    """Shared memory and named semaphores: the production backend."""

    local = False

    def __init__(self, name: str, segment: Segment):
        self.name = name
        self.segment = segment
        self.buf = segment.buf

    def lock_name(self, idx: int) -> str:
        return naming.object_name(self.name, f"l{idx}")

    def create_lock(self, idx: int, words):
        SemLock.unlink(self.lock_name(idx))
        return SemLock.create(self.lock_name(idx), words)

    def open_lock(self, idx: int, words):
        return SemLock.open(self.lock_name(idx), words)

    def wake_name(self, cpu: int) -> str:
        return naming.object_name(self.name, f"w{cpu}")

    def create_wake(self, cpu: int):
        WakeSemaphore.unlink(self.wake_name(cpu))
        return WakeSemaphore.create(self.wake_name(cpu))

    def open_wake(self, cpu: int):
        return WakeSemaphore.open(self.wake_name(cpu))

    def unlink_wake(self, cpu: int):
        WakeSemaphore.unlink(self.wake_name(cpu))

    def unlink_all(self):
        for kind, obj in naming.list_objects(self.name):
            naming.remove_object(kind, obj)
        Segment.unlink(naming.object_name(self.name, "arena"))

    def reserve(self, offset: int, length: int) -> None:
        """Back bytes of the segment with memory of /dev/shm (NoSpaceError)."""
        self.segment.reserve(offset, length)

    def close(self):
        self.segment.close()


class _LocalBackend:
    """A bytearray and threading locks: the pure core, in one process."""

    local = True
    _counter = itertools.count()

    def __init__(self, size: int):
        self.name = f"local{next(self._counter)}"
        self.segment = Segment.anonymous(size)
        self.buf = self.segment.buf
        self.locks: dict[int, LocalLock] = {}
        self.wakes: dict[int, LocalWakeSemaphore] = {}

    def create_lock(self, idx, words):
        self.locks[idx] = LocalLock.create(f"l{idx}", words)
        return self.locks[idx]

    def open_lock(self, idx, words):
        return self.locks[idx]

    def create_wake(self, cpu):
        self.wakes[cpu] = LocalWakeSemaphore.create(f"w{cpu}")
        return self.wakes[cpu]

    def open_wake(self, cpu):
        return self.wakes[cpu]

    def unlink_wake(self, cpu):
        self.wakes.pop(cpu, None)

    def unlink_all(self):
        self.locks.clear()
        self.wakes.clear()

    def reserve(self, offset: int, length: int) -> None:
        """A bytearray is backed already."""

    def close(self):
        pass


# ============================================================================ core
class _Core:
    """Views over one mapping of an arena, shared by the CPUs of one process."""

    def __init__(self, backend, size: int):
        self.backend = backend
        self.buf = backend.buf
        self.mv = memoryview(self.buf)
        self.w = self.mv.cast("q")
        self.tags = self.mv.cast("I")
        self.geometry = L.Geometry(size)
        g = self.geometry
        self.pt = self.w[g.pagetab_off // 8:g.pagetab_off // 8 + g.npages]
        self.vm = Vm(self)
        self._locks: dict[int, object] = {}
        self.held: list = []          # debug level 2: locks this process holds, in order
        self.debug = 0                # set from the header (and SHMALLOC_DEBUG) on open
        self.checking = False         # debug level 3: a check() under way
        self._kegs: dict[int, Keg] = {}
        self._zeros: dict[int, array] = {}

    def zero_words(self, n: int) -> array:
        z = self._zeros.get(n)
        if z is None:
            z = self._zeros[n] = array("q", [0]) * n
        return z

    def lock_words(self, idx: int) -> memoryview:
        lw = L.lock_word(idx)
        return self.w[lw:lw + L.LOCK_WORDS]

    def ensure_lock(self, idx: int):
        """Open lock ``idx``, creating it (words zeroed) the first time."""
        lk = self._locks.get(idx)
        if lk is not None:
            return lk
        try:
            return self.lock(idx)
        except (ShmallocError, KeyError):
            return self.create_lock(idx)

    def lock(self, idx: int):
        lk = self._locks.get(idx)
        if lk is None:
            lk = self._locks[idx] = self._witness(idx, self.backend.open_lock(
                idx, self.lock_words(idx)))
        return lk

    def _witness(self, idx, lk):
        """Debug level 2: locks check the order they are taken in."""
        return WitnessLock(lk, idx, self.held) if self.debug >= 2 else lk

    def assert_held(self, idx: int) -> None:
        """Debug level 2: a function's lock contract ("Lock: keg held")."""
        if self.debug >= 2 and not any(lk.idx == idx for lk in self.held):
            raise LockOrderError(f"lock {idx} must be held here")

    def create_lock(self, idx: int):
        self.w[L.lock_word(idx):L.lock_word(idx) + L.LOCK_WORDS] = self.zero_words(L.LOCK_WORDS)
        self._locks[idx] = self._witness(idx, self.backend.create_lock(idx, self.lock_words(idx)))
        return self._locks[idx]

    def open_locks(self) -> None:
        """Open the lock of the arena, of every keg and of every zone now, so
        that this attachment keeps working after the arena is destroyed (an
        unlinked semaphore stays usable through handles already open)."""
        w = self.w
        self.lock(L.VM_LOCK)
        for k in range(1, w[_H["NKEGS"]] + 1):
            if w[L.keg_word(k) + _K["FLAGS"]] & L.KF_LIVE:
                self.lock(L.keg_lock_index(k))
        for z in self.live_zone_ids():
            self.lock(L.zone_lock_index(z))

    def keg(self, keg_id: int) -> Keg:
        k = self._kegs.get(keg_id)
        if k is None:
            k = self._kegs[keg_id] = Keg(self, keg_id)
        return k

    # ---------------------------------------------------------------- table walks
    def live_zone_ids(self):
        w = self.w
        return [z for z in range(self.w[_H["NZONES"]])
                if w[L.zone_word(z) + _Z["FLAGS"]] & L.ZF_LIVE]

    def zone_name(self, zone_id: int) -> str:
        return L.read_str(self.mv, L.zone_name_off(zone_id), L.NAME_BYTES)

    def zone_id(self, name: str) -> int:
        for z in self.live_zone_ids():
            if self.zone_name(z) == name:
                return z
        return -1

    def zones_of_keg(self, keg_id: int):
        return [z for z in self.live_zone_ids() if self.w[L.zone_word(z) + _Z["KEG"]] == keg_id]

    def zone_names_of_keg(self, keg_id: int) -> str:
        names = [self.zone_name(z) for z in self.zones_of_keg(keg_id)]
        return "/".join(repr(n) for n in names) or f"<keg {keg_id}>"

    def zone_name_by_keg_zidx(self, keg_id: int, zidx: int) -> str:
        for z in self.zones_of_keg(keg_id):
            if self.w[L.zone_word(z) + _Z["ZIDX"]] == zidx:
                return self.zone_name(z)
        return f"<keg {keg_id} zone {zidx}>"

    def live_cpus(self):
        w = self.w
        return [c for c in range(L.MAX_CPUS) if w[L.cpu_word(c) + _C["STATE"]] == L.CPU_LIVE]

    def close(self):
        for lk in self._locks.values():
            lk.close()
        self._locks.clear()
        for v in (self.pt, self.tags, self.w, self.mv):
            v.release()
        self.backend.close()


# ============================================================================ arena
_live_arenas: "weakref.WeakSet[Arena]" = weakref.WeakSet()


def live_attachments(name: str) -> set[int]:
    """The CPU slots of arena ``name`` that this process holds open (its
    attachments and their threads' CPUs; not a forked parent's)."""
    return {a.cpu_id for a in list(_live_arenas)
            if a.name == name and not a._closed and not a._forked()}


def _after_fork_in_child():
    for a in list(_live_arenas):
        a._on_fork()


def _close_all_at_exit():
    """A process that ends without closing gives its CPU slot and cached items
    back (it does not destroy: that stays explicit, like shm_unlink)."""
    for a in list(_live_arenas):
        if not a._forked() and a._parent is None:
            try:
                a.close()
            except Exception:
                pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)


class Arena:
    """An attachment to an arena: this process's CPU on it.

    ``Arena.create(name, size)`` makes a new arena (and is its first CPU);
    ``Arena.attach(name)`` joins one from another process.  ``close()`` gives the
    CPU slot back (its cached items go to the depot); ``destroy()`` also removes
    every OS object of the arena.  ``with Arena.create(...)`` destroys on exit,
    ``with Arena.attach(...)`` closes.
    """

    def __init__(self, core: _Core, name: str, creator: bool, parent: "Arena | None" = None):
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
               replace: bool = False) -> "Arena":
        """Create arena ``name`` of ``size`` bytes (rounded up to pages).
        ``tunables``: boot-time sysctls the layers take, e.g. the mbuf layer's
        ``{"kern.ipc.nmbclusters": 0}`` (``layers.register_tunables``).

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
            backend = _PosixBackend(name, seg)
            core = _Core(backend, size)
            cls._format(core, debug, tunables)
            return cls(core, name, creator=True)
        except NoSpaceError as e:
            _cleanup_failed_create(name, seg)
            raise ArenaFullError(f"arena {name!r}: /dev/shm has no room for its "
                                 f"{L.Geometry(size).data_off} bytes of metadata "
                                 f"({e.free} bytes free there)") from e
        except BaseException:
            _cleanup_failed_create(name, seg)
            raise

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
                     tunables: dict | None = None) -> "Arena":
        """An arena on a bytearray with in-process locks (tests, one process)."""
        size = cls._check_size(size)
        tunables = layers.validate_tunables(tunables)
        backend = _LocalBackend(size)
        core = _Core(backend, size)
        cls._format(core, debug, tunables)
        return cls(core, backend.name, creator=True)

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
    def _attach_core(cls, name: str) -> _Core:
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
    def _core_of(cls, name: str, seg) -> _Core:
        size = cls._validate_segment(seg)
        core = _Core(_PosixBackend(name, seg), size)
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
    def _format(core: _Core, debug, tunables=None) -> None:
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

    # ------------------------------------------------------------ CPU slots
    def _take_cpu(self) -> int:
        pid = os.getpid()
        cpu = slots.take_slot(self._core, pid, _start_time(pid), self.name)
        self._wake = self._core.backend.create_wake(cpu)
        return cpu

    def _release_cpu(self):
        core, cpu = self._core, self.cpu_id
        slots.close_mailbox(core, cpu, cpu)
        self._mail.collect()                  # what arrived meanwhile
        for h in list(self._mail.inbox):      # handed over, never received: freed
            self._free_any(h)
        self._mail.inbox.clear()
        self._drain_caches()
        self._orphan_allocated()
        slots.release_slot(core, cpu)
        if self._wake is not None:
            self._wake.close()
            core.backend.unlink_wake(cpu)
            self._wake = None

    def _orphan_allocated(self):
        """Items this CPU allocated and never freed outlive its close (as memory
        outlives a thread): they are re-tagged as held by no CPU, so any CPU may
        free them later and nobody recovers them as a dead CPU's."""
        core = self._core
        w = core.w
        for k in range(1, w[_H["NKEGS"]] + 1):
            if not w[L.keg_word(k) + _K["FLAGS"]] & L.KF_LIVE:
                continue
            keg = core.keg(k)
            # the zone locks too: another CPU may be freeing one of these items
            # (free-anywhere: it takes the item over under its zone's lock), and a
            # tag read before its take-over must not be written back after it
            locks = [core.lock(L.zone_lock_index(z)) for z in sorted(core.zones_of_keg(k))]
            locks.append(core.lock(keg.lock_index))
            taken = []
            try:
                for lk in locks:
                    lk.acquire(owner_id=self.cpu_id)
                    taken.append(lk)
                for ti, tv in list(keg.held_by(self.cpu_id)):
                    if L.tag_state(tv) == L.TAG_ALLOC:
                        core.tags[ti] = L.tag(L.TAG_ALLOC, L.tag_zidx(tv))
            finally:
                for lk in reversed(taken):
                    lk.release()

    def _wake_sem(self):
        return self._wake

    def _post_wake(self, cpu: int) -> None:
        """Wake CPU ``cpu`` (a sleeper).  A slot that vanished meanwhile is fine."""
        if cpu == self.cpu_id:
            self._wake.post()
            return
        gen = self._core.w[L.cpu_word(cpu) + _C["GEN"]]
        cached = self._wakes.get(cpu)
        if cached is None or cached[0] != gen:          # the slot changed hands: reopen
            if cached is not None and not self._core.backend.local:
                cached[1].close()
            try:
                sem = self._core.backend.open_wake(cpu)
            except (ShmallocError, KeyError):
                self._wakes.pop(cpu, None)
                return
            cached = self._wakes[cpu] = (gen, sem)
        cached[1].post()

    def _wake_sleepers(self, zone_id: int) -> None:
        """Post every sleeper of a zone (after its limit was raised)."""
        w = self._core.w
        zw = L.zone_word(zone_id)
        q = zw + L.ZONE_SLEEPQ_WORD
        for pos in range(w[zw + _Z["SQ_HEAD"]], w[zw + _Z["SQ_TAIL"]]):
            cpu = w[q + pos % L.MAX_CPUS]
            if cpu >= 0:
                self._post_wake(cpu)

    # ------------------------------------------------------------ threads and fork
    def _forked(self) -> bool:
        return self._pid != os.getpid()

    def _on_fork(self):
        """In a forked child: the parent's caches are the parent's.  Route every
        call to a fresh CPU of this process (made on first use)."""
        for z in self._zones.values():
            z._cache.disable()
        self._thread_arenas = {}

    def _other_thread_zone(self, zone_id: int) -> Zone:
        """The zone as seen by the calling thread's own CPU (each thread, and a
        forked child, gets its own CPU slot on first use)."""
        return self._here()._zone_by_id(zone_id)

    def _here(self) -> "Arena":
        """This arena as the calling thread's own CPU: ``self`` in the thread that
        attached it, else the CPU of the calling thread (or forked child), attached
        on first use."""
        if self._owner_tid == get_ident() and self._pid == os.getpid():
            return self
        if self._closed or self._closing:
            raise ArenaClosedError(f"arena {self.name!r} is closed in this process")
        key = (os.getpid(), get_ident())
        a = self._thread_arenas.get(key)
        if a is None:
            self._close_ended_threads()
            if self._core.backend.local:
                if self._forked():
                    raise ShmallocError("a local arena cannot be used across fork")
                a = Arena(self._core, self.name, creator=False, parent=self)
            else:
                a = Arena.attach(self.name)
            a._owner_tid = get_ident()
            self._thread_arenas[key] = a
        return a

    def _close_ended_threads(self) -> None:
        """Give back the CPU slots of this process's threads that have ended, before
        a new thread takes one (each thread that used the arena has its own CPU):
        the calling thread adopts each such CPU and closes it (its cached items
        back, what it still holds to nobody)."""
        pid = os.getpid()
        if self._closing or self._pid != pid or not self._thread_arenas:
            return
        alive = sys._current_frames().keys()       # every thread with a Python state
        for key, a in list(self._thread_arenas.items()):
            if key[0] != pid or key[1] in alive or a._closed:
                continue
            if self._thread_arenas.pop(key, None) is not a:
                continue                             # another thread closes it
            a._owner_tid = get_ident()
            for z in a._zones.values():
                z._cache.refresh()
            a.close()

    # ------------------------------------------------------------ zones
    def zcreate(self, name: str, size: int, *, refcnt: bool = False, max_items: int = 0,
                align: int = 8, bucket_size: int | str | None = None, ctor=None, dtor=None,
                init=None, fini=None, nofree: bool = False, xfree: str = "local") -> Zone:
        """Create a zone and its keg.  ``bucket_size``: None/"adaptive" (UMA's
        choice, grows on contention), 0 (no caching), or a fixed size."""
        self._check_open()
        size = _check_int("zone size", size, 1)
        max_items = _check_int("max_items", max_items, 0)
        align = _check_int("align", align, 1)
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
            max_items = _check_int("max_items", max_items, 0)
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
        bsize = _check_int("bucket_size", bucket_size, 0)
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
        depot = self._core.vm.alloc_run(_DEPOT_PAGES, L.VM_INTERNAL_KEG)
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
        w[zw + _Z["DEPOT_CAP"]] = DEPOT_CAP
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

    # ------------------------------------------------------------ reading
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

    # ------------------------------------------------------------ lifetime
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

    # ------------------------------------------------------------ messages
    def send(self, dest_cpu: int, handles, timeout: float = 0.0) -> None:
        """Hand items to CPU ``dest_cpu``: ownership moves with the message.
        Every handle must be allocated and held by this CPU.  Raises
        MailboxFullError if the mailbox stays full for ``timeout`` seconds, and
        CpuGoneError if ``dest_cpu`` is not live; the items then stay here."""
        self._check_open()
        if (here := self._here()) is not self:
            return here.send(dest_cpu, handles, timeout)
        hs = [handles] if isinstance(handles, int) else list(handles)
        dest = _check_int("dest_cpu", dest_cpu, 0)
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
        when idle; recv, sleeping allocations and the slow paths do it too)."""
        self._check_open()
        if (here := self._here()) is not self:
            return here.poll()
        if self._mail.pending():
            self._mail.collect()
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
            e = core.pt[h >> L.PAGE_SHIFT] if h >= 0 else 0
            keg = core._kegs.get(e >> L.KEG_ID_SHIFT)
            if keg is None:
                keg = core.keg(e >> L.KEG_ID_SHIFT) if 1 <= e >> L.KEG_ID_SHIFT <= L.MAX_KEGS \
                    else None
            b = e ^ keg.kid_bits
            t = (b >> 2) + keg.offmap[h - b]
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
        half of ``disown``).  ShmallocError if it is not such an item.

        ``holder``: an item still held by that CPU is taken as well (a hand-off whose
        sender keeps it until it is taken, so that the sender's recovery frees it if
        the sender dies first).  ``check``: called under the zone lock, after the tag
        was found as required; the item is taken only if it returns True (the caller
        checks and clears a one-shot mark there, so that two claims, or a claim and a
        withdrawal, of the same item never both succeed).  Lock: takes zone."""
        if (here := self._here()) is not self:
            return here.claim(h, holder=holder, check=check)
        h = as_handle(h, "?")
        core = self._core
        kid = core.pt[h >> L.PAGE_SHIFT] >> L.KEG_ID_SHIFT if 0 <= h < core.geometry.size else 0
        keg = core.keg(kid) if 1 <= kid <= L.MAX_KEGS else None
        base = keg.slab_of(h) if keg is not None else -1
        if base < 0:
            raise ShmallocError(f"arena {self.name!r}: claim of handle {h}: not an item")
        t = (base >> 2) + keg.offmap[h - base]
        zid = next((z for z in core.zones_of_keg(kid)
                    if core.w[L.zone_word(z) + _Z["ZIDX"]] == L.tag_zidx(core.tags[t])), None)
        if zid is None:
            raise ShmallocError(f"arena {self.name!r}: claim of handle {h}: not an item of "
                                f"a zone")
        zone = self._zone_by_id(zid)
        lk = core.lock(zone._lock_index)           # against a racing free (take-over)
        lk.acquire(owner_id=self.cpu_id)
        try:
            tv = core.tags[t]
            held = L.tag_holder(tv)
            if L.tag_state(tv) != L.TAG_ALLOC or (held != L.NO_CPU and held != holder):
                whom = "none" if holder is None else f"none or CPU {holder}"
                raise ShmallocError(f"zone {zone.name!r}: claim of handle {h}: it is "
                                    f"{L.TAG_STATE_NAMES[L.tag_state(tv)]}, held by "
                                    f"{held}, not an allocated item held by {whom}")
            if check is not None and not check():
                raise ShmallocError(f"zone {zone.name!r}: claim of handle {h}: refused by "
                                    f"the caller's check")
            core.tags[t] = L.tag(L.TAG_ALLOC, zone.zidx, self.cpu_id, L.tag_home(tv))
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

    # ------------------------------------------------------------ what layers add
    def sysctl(self, name: str, value: int | None = None) -> int:
        """Read sysctl ``name`` (``kern.ipc.nmbclusters`` ...), or set it to ``value``;
        the names are those the layers registered (``layers.register_sysctl``).
        SysctlError with errno ENOENT for an unknown name."""
        return layers.sysctl(self, name, value)

    @classmethod
    def extend(cls, fn, name: str | None = None):
        """Add ``fn`` as method ``name`` (its own name by default): how a layer
        above the core gives the arena its facade (``arena.netstat_m()`` from the
        mbuf layer, ``arena.alloc(n)`` from Buffers).  A name the core defines is
        refused.  Returns ``fn``."""
        name = name or fn.__name__
        have = cls.__dict__.get(name)
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


def _check_int(what: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{what} must be >= {lo}, not {v}")
    return v


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
