"""backend: one process's mapping of an arena -- the views every CPU of the process
shares (``Core``) over a buffer and locks a backend supplies.

The allocator core runs on any writable buffer plus lock objects, so a backend is
either POSIX (``PosixBackend``: a shared-memory segment and named semaphores, from
``ipc``) or in-process (``LocalBackend``: a ``bytearray`` and ``threading`` locks,
for fast one-process tests: ``Arena.create_local``).  ``Core`` holds the word, tag
and page-table views, opens the locks (WITNESS-checked at debug level 2) and keeps
this process's ``Keg`` objects.
"""

from __future__ import annotations

import itertools
from array import array

import psutil

from . import layout as L
from .errors import ShmallocError
from .ipc import naming
from .ipc.lock import LocalLock, SemLock
from .ipc.segment import Segment
from .ipc.semaphore import LocalWakeSemaphore, WakeSemaphore
from .debug import LockOrderError, WitnessLock
from .keg import Keg
from .vm import Vm

_H, _Z, _C, _K = L.HDR, L.ZONE, L.CPU, L.KEG


def start_time(pid: int) -> int:
    """Process start time in microseconds (pid + start time names a process)."""
    try:
        return int(psutil.Process(pid).create_time() * 1e6)
    except psutil.Error:
        return 0


class PosixBackend:
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


class LocalBackend:
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
class Core:
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
