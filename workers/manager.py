"""The keg manager: the service that owns an arena.

``shmalloc serve --name A [--size S] [--tunable k=v ...] [--adopt]`` runs it in the
foreground.  It creates the arena and the mbuf zones, is a CPU itself, and every
``POLL`` seconds:

1. watches the CPU slots: a slot whose process is gone (pid plus start time, so
   a reused pid is not taken for the living) is dead;
2. repairs every lock a dead process held, rebuilding what the lock protects
   from the item tags, and releases a lock found taken with no owner for longer
   than ``ORPHAN_SECONDS`` (a holder that died between taking the semaphore and
   writing its pid) -- and so does a lock watchdog thread, every ``POLL``
   seconds, so that a recovery waiting for a lock whose holder died meanwhile
   does not wait for good;
3. recovers each dead CPU: first its mbufs (``mbuf_recovery``: copies and
   packets freed with m_free, giving back their cluster references; packets
   waiting for their sharers and clusters left to the references), then its
   cached items back, its other allocated items freed through the zone's dtor,
   what was in flight to it, its mailbox and its slot (``shmalloc.recovery``);
4. serves sleepers whose items sit in a cache nobody answers for: a CPU that has
   left a drain request for a zone with sleepers in its mailbox, unread, for
   ``GRACE`` seconds (it has not called into the arena's slow paths, recv or poll
   since) and whose process is not stopped has its cached items of the zone (and
   of the zones that hold them: packets hold clusters) taken from the tags and
   handed to the sleepers (``zone.take_cache_of``);
5. every ``TRIM_SECONDS`` trims each zone's depot to its working-set estimate
   (UMA's ``zone_trim``) and gives empty slabs back;
6. when free pages fall under ``lowmem`` of the arena, runs the low-memory
   reclaim: the registered protocol drains (``mb_reclaim``), a drain request by
   message to every CPU, then every depot and every free slab.

On SIGTERM or SIGINT it removes every OS object of the arena; with ``--idle-exit
SECONDS`` it also does so once no CPU but its own has been attached for SECONDS
(the lifetime of ``shmalloc.connect``'s default arena): it unlinks the arena's name
under the vm lock -- the lock a CPU takes its slot under -- after checking once more
that no CPU came, so a process attaching at that moment either is seen or finds no
arena.  Killed itself,
it can be restarted with ``--adopt`` on the same arena: it recovers the old
manager like any dead CPU and carries on, losing nothing.  A step that raises
is logged and the next round tries again: the arena is never removed because a
recovery failed.  ``kill -USR1`` prints where every thread is (faulthandler).
"""

from __future__ import annotations

import faulthandler
import os

import psutil
import signal
import sys
import threading
import time
import traceback

from shmalloc import Arena, admin, recovery, slots
from shmalloc import layout as L
from shmalloc.errors import ShmallocError
from shmalloc.ipc import naming
from shmalloc.ipc.segment import Segment
from shmalloc.mail import MSG_DRAIN, mail_taken
from shmalloc.zone import drain_companions

from .mbuf_recovery import recover_mbufs

try:        # the mbuf layer's lock repair (its refcount journal) must be known to
    from shmalloc import mbuf as _mbuf   # noqa: F401 - every repair, adopting too
except ImportError:
    _mbuf = None

POLL = 0.2
ORPHAN_SECONDS = 2.0
TRIM_SECONDS = 20.0
LOWMEM = 0.05
GRACE = 1.0            # seconds a drain request may wait unread before the cache is taken


class Manager:
    def __init__(self, name: str, size: int | None = None, tunables: dict | None = None,
                 adopt: bool = False, lowmem: float = LOWMEM, log=None,
                 idle_exit: float | None = None, strict: bool = False):
        self.log = log or (lambda msg: None)
        self.idle_exit = idle_exit
        self._busy_at = time.monotonic()
        self.lowmem = lowmem
        self.stopping = False
        self.recovered = 0
        self.repairs = 0
        self._orphans: dict[int, tuple[float, int]] = {}
        self._repair_guard = threading.Lock()      # step and the lock watchdog: held
        self._repairing: set[int] = set()          # only to claim a lock (never waits)
        self._last_trim = time.monotonic()
        self._last_lowmem = 0.0
        self._asked: dict[tuple, tuple[float, int]] = {}    # unanswered drain requests
        self.caches_taken = 0                              # items taken for sleepers
        if adopt:
            self._repair_before_adopting(name)
            self.arena = Arena.attach(name)
            self.log(f"adopting arena {name!r} (previous manager pid "
                     f"{self.arena._core.w[L.HDR['MANAGER_PID']]})")
        else:
            kw = {} if size is None else {"size": size}
            self.arena = Arena.create(name, tunables=tunables, strict=strict, **kw)
            try:
                self._make_mbuf_zones()
            except BaseException:
                self.arena.destroy()
                raise
        slots.set_manager(self.arena._core, self.arena.cpu_id, os.getpid())
        self.log(f"manager of arena {name!r}: pid {os.getpid()}, CPU {self.arena.cpu_id}")

    def _make_mbuf_zones(self):
        try:
            from shmalloc.mbuf import mbuf_init
        except ImportError:
            return
        mbuf_init(self.arena)

    def _repair_before_adopting(self, name: str) -> None:
        """Refuse an arena whose manager lives; else repair the locks that dead
        processes hold before taking a CPU slot, which takes the vm lock: a process
        that died holding it while no manager ran would block the attach for good.
        A vm lock left taken with no owner (its holder died between taking the
        semaphore and writing its pid) is released once seen so for
        ``ORPHAN_SECONDS``, as the manager does in every round."""
        core = Arena._attach_core(name)
        try:
            w = core.w
            pid, start = w[L.HDR["MANAGER_PID"]], w[L.HDR["MANAGER_START"]]
            if pid and pid != os.getpid() and admin.process_alive(pid, start):
                raise ShmallocError(f"arena {name!r} has a live manager, pid {pid}")
            self._count_repairs(recovery.repair_dead_locks(core), "before adopting")
            vm = core.lock(L.VM_LOCK)
            deadline = time.monotonic() + ORPHAN_SECONDS + 4 * POLL
            while not vm.owner_pid() and vm.is_taken() and time.monotonic() < deadline:
                self._release_orphaned_locks(core, [L.VM_LOCK])
                time.sleep(POLL)
        finally:
            core.close()

    # ------------------------------------------------------------ the loop
    def run(self, poll: float = POLL) -> None:
        """Serve until SIGTERM/SIGINT, then remove every OS object of the arena."""
        old = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        watchdog_stop = threading.Event()
        watchdog = threading.Thread(target=self._watch_locks, args=(watchdog_stop, poll),
                                    name="lock watchdog", daemon=True)
        watchdog.start()
        try:
            while not self.stopping:
                try:
                    self.step()
                except Exception:  # noqa: BLE001
                    # a recovery that fails must not take the arena down with it:
                    # log, and the next round tries again
                    self.log("manager: step failed:\n" + traceback.format_exc().rstrip())
                if self.idle_exit is not None and self._retire():
                    break
                time.sleep(poll)
        finally:
            watchdog_stop.set()
            watchdog.join()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.shutdown()

    def _watch_locks(self, stop: threading.Event, poll: float) -> None:
        """The lock watchdog, a thread of its own: every ``poll`` seconds repair the
        locks whose holder died and release ownerless ones, also while ``step``
        waits for one of them.  (Recovery takes zone locks without a timeout: a
        process dying with a zone lock while the manager recovers another would
        otherwise block the manager, the one process that could repair it.)"""
        while not stop.wait(poll):
            try:
                self.repair_dead_owners()
            except Exception as e:  # noqa: BLE001 - logged; the next round tries again
                self.log(f"manager: lock watchdog: {e!r}")

    def repair_dead_owners(self) -> int:
        """Repair every lock whose owner pid is a dead process -- rebuild what it
        protects from the tags, then release it -- and release the ownerless ones
        (``_release_orphaned_locks``).  Returns locks repaired.

        Called by ``step`` and by the watchdog: a lock is claimed by one of them at
        a time (``_repairing``), and nothing is held while a repair waits, so a
        repair blocked by a holder that died meanwhile (a zone's rebuild takes its
        keg lock) leaves the other thread free to repair that one."""
        core = self.arena._core
        repaired, pids = 0, set()
        for idx in recovery.all_lock_indexes(core):   # vm, kegs, zones, mailboxes
            pid = core.lock(idx).owner_pid()
            if not pid or pid == os.getpid() or admin.process_alive(pid):
                continue
            with self._repair_guard:
                if idx in self._repairing:
                    continue
                self._repairing.add(idx)
            try:
                if self._repair_lock(idx, pid):
                    repaired += 1
                    pids.add(pid)
            finally:
                with self._repair_guard:
                    self._repairing.discard(idx)
        with self._repair_guard:
            self._release_orphaned_locks()
        if repaired:
            vm = core.lock(L.VM_LOCK)
            if vm.acquire(timeout=1.0, owner_id=self.arena.cpu_id):
                try:
                    core.w[L.HDR["LOCK_REPAIRS"]] += repaired
                finally:
                    vm.release()
            self._count_repairs(repaired, "of dead pid " + "/".join(map(str, sorted(pids))))
        return repaired

    def _count_repairs(self, n: int, what: str) -> None:
        """Count ``n`` lock repairs (the header counts them too) and log them."""
        if n:
            self.repairs += n
            self.log(f"manager: repaired {n} lock(s) {what}")

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

    def _stop(self, signum, frame):
        self.stopping = True

    def _others_attached(self) -> bool:
        """A live CPU that is not the manager's (nor one of its threads')."""
        return any(not self._mine(c) for c in self.arena._core.live_cpus())

    def _retire(self) -> bool:
        """--idle-exit: True once no other CPU has been attached for ``idle_exit``
        seconds; the arena's name is then unlinked (under the vm lock, no CPU having
        come meanwhile) and ``run`` removes the rest."""
        now = time.monotonic()
        if self._others_attached():
            self._busy_at = now
            return False
        if now - self._busy_at < self.idle_exit:
            return False
        core = self.arena._core
        with core.lock(L.VM_LOCK):
            if self._others_attached():
                self._busy_at = now
                return False
            Segment.unlink(naming.object_name(self.arena.name, "arena"))
        self.log(f"manager: no CPU attached for {self.idle_exit:g} s: retiring")
        return True

    def shutdown(self) -> None:
        self.log(f"manager: removing arena {self.arena.name!r}")
        self.arena.destroy()

    def step(self) -> None:
        """One round: recover the dead, repair orphaned locks, trim, reclaim."""
        dead = self.dead_cpus()
        if dead:
            pids = {self._pid(c) for c in dead}
            self.repair_dead_owners()
            for cpu in dead:
                counts = recover_mbufs(self.arena, cpu, dead)   # before the core's pass
                counts.update(recovery.recover_cpu(self.arena, cpu))
                self.recovered += 1
                self.log(f"manager: recovered CPU {cpu} (pid {self._pid_was(cpu, pids)}): {counts}")
        with self._repair_guard:
            self._release_orphaned_locks()
        self.arena.poll()
        self.serve_sleepers()
        now = time.monotonic()
        if now - self._last_trim >= TRIM_SECONDS:
            self._last_trim = now
            self.trim()
        if self.lowmem_now() and now - self._last_lowmem >= 1.0:
            self._last_lowmem = now
            self.reclaim()
        self.arena._drain_caches()            # what recovery put in the manager's cache

    def serve_sleepers(self, grace: float = GRACE) -> int:
        """For each zone with sleepers: take the cached items of every live CPU
        that has had its drain request for the zone (``DRAIN_ASKED``) in its
        mailbox, unread, for ``grace`` seconds -- watched from one round to the
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
            self.log(f"manager: took {n} cached item(s) of CPU {cpu} (pid {self._pid(cpu)}) "
                     f"for the sleepers of zone {zone.name!r}: a drain request went "
                     f"unanswered")
        return n

    def dead_cpus(self) -> list[int]:
        core, w = self.arena._core, self.arena._core.w
        out = []
        for cpu in range(L.MAX_CPUS):
            cw = L.cpu_word(cpu)
            if cpu == self.arena.cpu_id or w[cw + L.CPU["STATE"]] == L.CPU_FREE:
                continue
            if not admin.process_alive(w[cw + L.CPU["PID"]], w[cw + L.CPU["START"]]):
                out.append(cpu)
            elif w[cw + L.CPU["PID"]] == os.getpid() and not self._mine(cpu):
                out.append(cpu)           # a slot of this pid not attached here: an adopted
        return out                        # manager's predecessor had the same pid

    def _mine(self, cpu: int) -> bool:
        """True if slot ``cpu`` is an open attachment of this process to this arena:
        the manager's, a thread's, or any other (a launcher or a test that runs the
        manager in-process and attaches beside it)."""
        from shmalloc.arena import _live_arenas
        a = self.arena
        if cpu == a.cpu_id or any(t.cpu_id == cpu for t in list(a._thread_arenas.values())):
            return True
        return any(x.cpu_id == cpu and x.name == a.name and not x._closed
                   and not x._forked() for x in list(_live_arenas))

    def _pid(self, cpu: int) -> int:
        return self.arena._core.w[L.cpu_word(cpu) + L.CPU["PID"]]

    @staticmethod
    def _pid_was(cpu, pids):
        return "/".join(map(str, sorted(pids)))

    def _release_orphaned_locks(self, core=None, idxs=None) -> None:
        """Post the locks found taken with no owner pid, unchanged, for
        ``ORPHAN_SECONDS`` (of ``core``, by default the manager's; all by default)."""
        core = core or self.arena._core
        now = time.monotonic()
        if idxs is None:
            idxs = recovery.all_lock_indexes(core)
        for idx in idxs:
            lk = core.lock(idx)
            if lk.owner_pid() != 0 or not lk.is_taken():
                self._orphans.pop(idx, None)
                continue
            seen = self._orphans.get(idx)
            if seen is None or seen[1] != lk.acquisitions():
                self._orphans[idx] = (now, lk.acquisitions())
            elif now - seen[0] >= ORPHAN_SECONDS:
                if lk.force_release_ownerless():
                    self.repairs += 1
                    vm = core.lock(L.VM_LOCK)
                    if vm.acquire(timeout=1.0, owner_id=L.NO_CPU):
                        try:
                            core.w[L.HDR["LOCK_REPAIRS"]] += 1
                        finally:
                            vm.release()
                    self.log(f"manager: released ownerless lock {idx}")
                self._orphans.pop(idx, None)

    # ------------------------------------------------------------ memory
    def lowmem_now(self) -> bool:
        core = self.arena._core
        return core.w[L.HDR["FREE_PAGES"]] < self.lowmem * core.geometry.data_pages

    def trim(self) -> int:
        """Trim each zone's depot to its working-set estimate (UMA's zone_trim:
        wss = imax - imin, smoothed 4:1); give empty slabs back."""
        core, w = self.arena._core, self.arena._core.w
        released = 0
        for z in core.live_zone_ids():
            zw = L.zone_word(z)
            lk = core.lock(L.zone_lock_index(z))
            lk.acquire(owner_id=self.arena.cpu_id)
            try:
                wss = w[zw + L.ZONE["IMAX"]] - w[zw + L.ZONE["IMIN"]]
                w[zw + L.ZONE["WSS"]] = (4 * wss + w[zw + L.ZONE["WSS"]]) // 5
                keep = w[zw + L.ZONE["WSS"]]
            finally:
                lk.release()
            released += self.arena._zone_by_id(z)._cache.drain_depot(keep)
        return released

    def reclaim(self) -> int:
        """vm_lowmem: protocol drains, every CPU's caches (by message), every
        depot and every free slab."""
        self.log("manager: low memory: reclaiming")
        try:
            from shmalloc.mbuf.reclaim import vm_lowmem
        except ImportError:
            vm_lowmem = None
        if vm_lowmem is not None:
            vm_lowmem(self.arena)
        core = self.arena._core
        for cpu in core.live_cpus():
            if cpu != self.arena.cpu_id:
                self.arena._mail.post(cpu, MSG_DRAIN, [], L.TAG_FREE)
        return self.arena.reclaim()


def _stopped(pid: int) -> bool:
    """True if process ``pid`` is stopped or traced (or cannot be looked at):
    its threads may have stopped anywhere, inside an alloc fast path included."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED,
                                                 psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return True


def serve_main(name: str, size: int | None, tunables: dict, adopt: bool, quiet: bool,
               idle_exit: float | None = None, strict: bool = False) -> int:
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # kill -USR1: where is it?
    mgr = Manager(name, size=size, tunables=tunables, adopt=adopt, log=log, idle_exit=idle_exit,
                  strict=strict)
    mgr.run()
    return 0
