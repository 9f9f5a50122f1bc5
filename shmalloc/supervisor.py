"""supervisor: the one public entry to recovery, for the process that watches an
arena (the keg manager, ``workers/manager.py``, decides *when*; this decides
*what*).

A ``Supervisor`` is a CPU of the arena that looks after the others:

    dead_cpus()            slots whose process is gone (pid + start time)
    repair_dead_owners()   every lock a dead process holds: what it guards rebuilt
                           from the tags (``recovery``), then released
    release_orphaned_locks()  a lock taken with no owner written, unchanged for
                           ``ORPHAN_SECONDS``: its holder died between the two
    recover(cpus)          the registered passes of the layers above the core (the
                           mbuf layer's frees a dead CPU's mbufs first), then the
                           core's ``recover_cpu``: cached items back, the rest freed
    serve_sleepers(grace)  a CPU that leaves a drain request for a zone with
                           sleepers unread for ``grace`` seconds has its cache taken
    trim(), reclaim()      UMA's zone_trim and vm_lowmem
    retire()               the arena's name removed once nobody else is attached

``Supervisor.create`` makes an arena (and runs what the layers register for a new
arena: the mbuf layer's ``mbuf_init``); ``Supervisor.adopt`` takes over one whose
supervisor died, repairing the locks dead processes hold before it takes a CPU
slot (which needs the vm lock).  Every method may be called from the supervisor's
thread; ``repair_dead_owners`` also from a watchdog thread beside it.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

from . import admin, layers, recovery, slots
from . import layout as L
from .arena import Arena, live_attachments
from .depot import Depot
from .errors import ShmallocError
from .ipc import naming
from .ipc.segment import Segment
from .mail import MSG_DRAIN, mail_taken
from .zone import drain_companions

ORPHAN_SECONDS = 2.0      # a lock taken with no owner for this long is released
GRACE = 1.0               # seconds a drain request may wait unread before the cache is taken
ADOPT_POLL = 0.2


class Supervisor:
    """Recovery and housekeeping for one arena, on its own CPU of it."""

    def __init__(self, arena: Arena, log=None):
        self.arena = arena
        self.log = log or (lambda msg: None)
        self.recovered = 0               # dead CPUs recovered by this supervisor
        self.repairs = 0                 # locks repaired or released by it
        self.caches_taken = 0            # items taken from unanswering CPUs for sleepers
        self._orphans: dict[int, tuple[float, int]] = {}
        self._guard = threading.Lock()   # the supervisor and its watchdog: held only
        self._repairing: set[int] = set()   # to claim a lock (never while waiting)
        self._asked: dict[tuple, tuple[float, int]] = {}    # unanswered drain requests
        slots.set_manager(arena._core, arena.cpu_id, os.getpid())

    # ------------------------------------------------------------ becoming one
    @classmethod
    def create(cls, name: str, size: int | None = None, tunables: dict | None = None, *,
               strict: bool = False, log=None) -> "Supervisor":
        """Create arena ``name`` and supervise it."""
        kw = {} if size is None else {"size": size}
        arena = Arena.create(name, tunables=tunables, strict=strict, **kw)
        try:
            layers.run_setups(arena)
            return cls(arena, log)
        except BaseException:
            arena.destroy()
            raise

    @classmethod
    def adopt(cls, name: str, log=None) -> "Supervisor":
        """Supervise arena ``name`` whose supervisor died: refused while it lives.
        The locks dead processes hold are repaired before this process takes a CPU
        slot, which takes the vm lock: a process that died holding it while no
        supervisor ran would block the attach for good.  A vm lock left taken with
        no owner (its holder died between taking the semaphore and writing its pid)
        is released once seen so for ``ORPHAN_SECONDS``."""
        log = log or (lambda msg: None)
        core = Arena._attach_core(name)
        orphans: dict[int, tuple[float, int]] = {}
        try:
            w = core.w
            pid, start = w[L.HDR["MANAGER_PID"]], w[L.HDR["MANAGER_START"]]
            if pid and pid != os.getpid() and admin.process_alive(pid, start):
                raise ShmallocError(f"arena {name!r} has a live manager, pid {pid}")
            n = recovery.repair_dead_locks(core)
            if n:
                log(f"manager: repaired {n} lock(s) before adopting")
            vm = core.lock(L.VM_LOCK)
            deadline = time.monotonic() + ORPHAN_SECONDS + 4 * ADOPT_POLL
            while not vm.owner_pid() and vm.is_taken() and time.monotonic() < deadline:
                _release_orphaned(core, [L.VM_LOCK], orphans, log)
                time.sleep(ADOPT_POLL)
        finally:
            core.close()
        arena = Arena.attach(name)
        log(f"adopting arena {name!r} (previous manager pid {pid})")
        sup = cls(arena, log)
        sup.repairs += n
        return sup

    @staticmethod
    def repair_dead_locks(arena: Arena) -> int:
        """Rebuild and release the locks whose holder died, from ``arena``'s
        attachment: what a supervisor does, for when none runs (a new one takes its
        CPU slot under the vm lock, and cannot while a dead process holds it).  Only
        while no supervisor runs.  Returns how many were repaired."""
        dead = recovery.dead_lock_owners(arena._core)
        return recovery.repair_locks(arena, dead) if dead else 0

    # ------------------------------------------------------------ the dead
    def dead_cpus(self) -> list[int]:
        """CPU slots in use whose process is gone, and slots of this process that
        no attachment here owns (an adopted supervisor's predecessor had its pid)."""
        core, w = self.arena._core, self.arena._core.w
        out = []
        for cpu in range(L.MAX_CPUS):
            cw = L.cpu_word(cpu)
            if cpu == self.arena.cpu_id or w[cw + L.CPU["STATE"]] == L.CPU_FREE:
                continue
            if not admin.process_alive(w[cw + L.CPU["PID"]], w[cw + L.CPU["START"]]):
                out.append(cpu)
            elif w[cw + L.CPU["PID"]] == os.getpid() and not self._mine(cpu):
                out.append(cpu)
        return out

    def _mine(self, cpu: int) -> bool:
        """True if slot ``cpu`` is an open attachment of this process to this arena:
        the supervisor's, a thread's, or any other (a launcher or a test that runs
        the supervisor in-process and attaches beside it)."""
        return cpu in live_attachments(self.arena.name)

    def others_attached(self) -> bool:
        """A live CPU that is not one of this process's attachments."""
        return any(not self._mine(c) for c in self.arena._core.live_cpus())

    def recover(self, cpus) -> dict[int, dict]:
        """Recover the dead CPUs ``cpus``: repair the locks dead processes hold, then
        for each CPU the passes of the layers (``recovery.passes``) and the core's
        ``recover_cpu``.  Returns the counts of each."""
        cpus = list(cpus)
        out = {}
        if not cpus:
            return out
        self.repair_dead_owners()
        for cpu in cpus:
            counts: dict = {}
            for fn in recovery.passes:
                counts.update(fn(self.arena, cpu, cpus))
            counts.update(recovery.recover_cpu(self.arena, cpu))
            self.recovered += 1
            out[cpu] = counts
        return out

    def pid_of(self, cpu: int) -> int:
        return self.arena._core.w[L.cpu_word(cpu) + L.CPU["PID"]]

    # ------------------------------------------------------------ locks
    def repair_dead_owners(self) -> int:
        """Repair every lock whose owner pid is a dead process -- rebuild what it
        protects from the tags, then release it -- and release the ownerless ones
        (``release_orphaned_locks``).  Returns locks repaired.

        Called by the supervisor and by its watchdog thread: a lock is claimed by
        one of them at a time (``_repairing``), and nothing is held while a repair
        waits, so a repair blocked by a holder that died meanwhile (a zone's rebuild
        takes its keg lock) leaves the other thread free to repair that one."""
        core = self.arena._core
        repaired, pids = 0, set()
        for idx in recovery.all_lock_indexes(core):   # vm, kegs, zones, mailboxes
            pid = core.lock(idx).owner_pid()
            if not pid or pid == os.getpid() or admin.process_alive(pid):
                continue
            with self._guard:
                if idx in self._repairing:
                    continue
                self._repairing.add(idx)
            try:
                if self._repair_lock(idx, pid):
                    repaired += 1
                    pids.add(pid)
            finally:
                with self._guard:
                    self._repairing.discard(idx)
        self.release_orphaned_locks()
        if repaired:
            _count_repairs(core, repaired, self.arena.cpu_id)
            self.repairs += repaired
            self.log(f"manager: repaired {repaired} lock(s) of dead pid "
                     + "/".join(map(str, sorted(pids))))
        return repaired

    def _repair_lock(self, idx: int, pid: int) -> bool:
        """Rebuild what lock ``idx`` protects and release it, if dead ``pid`` still
        holds it.  A zone lock waits while its keg lock is held by a live process
        (its rebuild needs the keg lock; a dead holder's is repaired first)."""
        core = self.arena._core
        lk = core.lock(idx)
        if lk.owner_pid() != pid:
            return False
        if idx == L.VM_LOCK:
            core.vm.rebuild()
        elif idx <= L.MAX_KEGS:
            core.keg(idx).rebuild()
        elif idx < L.mbox_lock_index(0):
            zone_id = idx - L.zone_lock_index(0)
            klk = core.lock(L.keg_lock_index(core.w[L.zone_word(zone_id) + L.ZONE["KEG"]]))
            if klk.owner_pid() or klk.is_taken():
                return False                     # next round
            for what in recovery.rebuild_zone(core, zone_id, self.arena.cpu_id):
                self.log(f"manager: zone lock {idx} of dead pid {pid}: {what}")
        return lk.force_release(pid)             # (a mailbox needs no rebuild)

    def release_orphaned_locks(self) -> int:
        """Post the locks found taken with no owner pid, unchanged, for
        ``ORPHAN_SECONDS``.  Returns how many were released."""
        with self._guard:
            n = _release_orphaned(self.arena._core, recovery.all_lock_indexes(self.arena._core),
                                  self._orphans, self.log)
        self.repairs += n
        return n

    # ------------------------------------------------------------ sleepers
    def serve_sleepers(self, grace: float = GRACE) -> int:
        """For each zone with sleepers: take the cached items of every live CPU
        that has had its drain request for the zone (``DRAIN_ASKED``) in its
        mailbox, unread, for ``grace`` seconds -- watched from one call to the
        next by how far it has read its mailbox, which any recv, poll or slow path
        moves -- unless its process is stopped (a stopped thread may be inside its
        alloc fast path); the zones whose cached items hold the zone's items
        (packets hold clusters) first, drained whole.  What is taken goes to the
        sleepers (``_flush`` grants first), the rest to the depot.  Returns how
        many items were taken."""
        a = self.arena
        core, w = a._core, a._core.w
        now = time.monotonic()
        watching: dict[tuple, tuple[float, int]] = {}
        taken = 0
        for z in core.live_zone_ids():
            if not w[L.zone_word(z) + L.ZONE["SLEEPERS"]]:
                continue
            bit = L.zone_bit(z)
            for cpu in core.live_cpus():
                cw = L.cpu_word(cpu)
                if cpu == a.cpu_id or not w[cw + L.CPU["DRAIN_ASKED"]] & bit:
                    continue
                key = (cpu, w[cw + L.CPU["GEN"]], z)
                read = mail_taken(core, cpu)
                seen = self._asked.get(key)
                if seen is None or seen[1] != read:
                    watching[key] = (now, read)
                    continue
                watching[key] = seen
                if now - seen[0] < grace or _stopped(w[cw + L.CPU["PID"]]):
                    continue
                taken += self._take_caches(z, cpu)
                watching[key] = (now, read)          # the next take, a grace later
        self._asked = watching
        return taken

    def _take_caches(self, zone_id: int, cpu: int) -> int:
        """Take CPU ``cpu``'s cached items of zone ``zone_id`` and of its companion
        zones for the zone's sleepers; log it.  Returns how many."""
        a = self.arena
        zone = a._zone_by_id(zone_id)
        n = 0
        for name in drain_companions(zone.name):
            zid = a._core.zone_id(name)
            if zid >= 0:
                comp = a._zone_by_id(zid)
                n += comp._cache.take_cache_of(cpu)
                comp.drain()                       # fini: what they hold goes back
        n += zone._cache.take_cache_of(cpu)
        zone._cache.drain_cache()                  # to the sleepers first
        if n:
            self.caches_taken += n
            self.log(f"manager: took {n} cached item(s) of CPU {cpu} (pid {self.pid_of(cpu)}) "
                     f"for the sleepers of zone {zone.name!r}: a drain request went "
                     f"unanswered")
        return n

    # ------------------------------------------------------------ memory
    def lowmem(self, fraction: float) -> bool:
        """Free pages under ``fraction`` of the arena's data pages, or under a
        threshold a layer registered (``layers.register_lowmem_pages``: the mbuf
        layer's ``vm.v_free_min``)."""
        core = self.arena._core
        free = core.w[L.HDR["FREE_PAGES"]]
        return (free < fraction * core.geometry.data_pages
                or any(free < fn(self.arena) for fn in layers.lowmem_pages))

    def trim(self) -> int:
        """Trim each zone's depot to its working-set estimate (UMA's zone_trim:
        wss = imax - imin, smoothed 4:1); give empty slabs back.  Returns slabs
        released."""
        core = self.arena._core
        released = 0
        for z in core.live_zone_ids():
            lk = core.lock(L.zone_lock_index(z))
            lk.acquire(owner_id=self.arena.cpu_id)
            try:
                keep = Depot(core, z).working_set()
            finally:
                lk.release()
            released += self.arena._zone_by_id(z)._cache.drain_depot(keep)
        return released

    def reclaim(self) -> int:
        """vm_lowmem: the low-memory handlers the layers registered (the mbuf
        layer's protocol drains), a drain request to every CPU (each gives its
        caches back and runs the layers' drain-request handlers: its own protocol
        drains), then every depot and every free slab.  Returns slabs released."""
        self.log("manager: low memory: reclaiming")
        for fn in layers.lowmem_handlers:
            fn(self.arena)
        for cpu in self.arena._core.live_cpus():
            if cpu != self.arena.cpu_id:
                self.arena._mail.post(cpu, MSG_DRAIN, [], L.TAG_FREE)
        return self.arena.reclaim()

    def give_back(self) -> None:
        """Send on what recovery put in the supervisor's own caches."""
        self.arena._drain_caches()

    # ------------------------------------------------------------ the end
    def retire(self) -> bool:
        """Unlink the arena's name if no other CPU is attached, checked under the vm
        lock (the lock a CPU takes its slot under): a process attaching at that
        moment is either seen here or finds no arena.  True if unlinked."""
        core = self.arena._core
        with core.lock(L.VM_LOCK):
            if self.others_attached():
                return False
            Segment.unlink(naming.object_name(self.arena.name, "arena"))
        return True

    def destroy(self) -> None:
        self.arena.destroy()


# ============================================================================ helpers
def _release_orphaned(core, idxs, orphans: dict, log) -> int:
    """Post each lock of ``idxs`` found taken with no owner pid, unchanged, for
    ``ORPHAN_SECONDS`` (``orphans`` remembers what was seen when).  Returns how many."""
    now = time.monotonic()
    released = 0
    for idx in idxs:
        lk = core.lock(idx)
        if lk.owner_pid() != 0 or not lk.is_taken():
            orphans.pop(idx, None)
            continue
        seen = orphans.get(idx)
        if seen is None or seen[1] != lk.acquisitions():
            orphans[idx] = (now, lk.acquisitions())
        elif now - seen[0] >= ORPHAN_SECONDS:
            if lk.force_release_ownerless():
                released += 1
                _count_repairs(core, 1, L.NO_CPU)
                log(f"manager: released ownerless lock {idx}")
            orphans.pop(idx, None)
    return released


def _count_repairs(core, n: int, owner_id: int) -> None:
    """Add ``n`` to the header's lock-repair count.  Lock: takes vm (gives up after 1 s:
    a count is not worth waiting on a lock that may need repair itself)."""
    vm = core.lock(L.VM_LOCK)
    if vm.acquire(timeout=1.0, owner_id=owner_id):
        try:
            core.w[L.HDR["LOCK_REPAIRS"]] += n
        finally:
            vm.release()


def _stopped(pid: int) -> bool:
    """True if process ``pid`` is stopped or traced (or cannot be looked at):
    its threads may have stopped anywhere, inside an alloc fast path included."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED,
                                                 psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return True
