"""cpus: an attachment's CPU -- its slot, its wake semaphore, and the CPUs of its
threads and of a forked child.

Every attachment is a CPU: it takes a slot (``slots``: pid and start time, a
mailbox) and a wake semaphore that sleepers and mail post.  Each thread that uses
an arena gets a CPU of its own on first use (``_here``), so no bucket cache is ever
shared and the fast paths take no lock; a forked child never touches its parent's
caches.  Closing a CPU gives its cached items back and leaves what it still holds
allocated and held by no CPU (``_orphan_allocated``).

``live_attachments`` and the fork and exit handlers keep this process's open
attachments in one registry.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from threading import get_ident

from . import layout as L
from .errors import ArenaClosedError, ShmallocError
from . import slots
from .sleepq import SleepQueue
from .zone import Zone
from .backend import start_time

_H, _Z, _C, _K = L.HDR, L.ZONE, L.CPU, L.KEG



# ============================================================================ arena
_live_arenas: "weakref.WeakSet" = weakref.WeakSet()   # this process's open attachments


def live_attachments(name: str) -> set[int]:
    """The CPU slots of arena ``name`` that this process holds open (its
    attachments and their threads' CPUs; not a forked parent's)."""
    return {a.cpu_id for a in list(_live_arenas)
            if a.name == name and not a._closed and not a._forked()}


_PID = os.getpid()              # this process's pid (getpid is a system call: kept
                                # here, and set anew in a forked child first thing)


def _after_fork_in_child():
    global _PID
    _PID = os.getpid()
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


class CpuSlots:
    """The CPU-slot, thread and fork half of ``Arena`` (a mixin)."""

    def _take_cpu(self) -> int:
        pid = os.getpid()
        cpu = slots.take_slot(self._core, pid, start_time(pid), self.name)
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
        for cpu in SleepQueue(self._core, zone_id).waiting() or ():   # (a peek: a
            self._post_wake(cpu)                  # stale list only wakes a CPU for nothing)

    # ------------------------------------------------------------ threads and fork
    def _forked(self) -> bool:
        return self._pid != _PID

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

    def _here(self):
        """This arena as the calling thread's own CPU: ``self`` in the thread that
        attached it, else the CPU of the calling thread (or forked child), attached
        on first use."""
        if self._owner_tid == get_ident() and self._pid == _PID:
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
                a = type(self)(self._core, self.name, creator=False, parent=self)
            else:
                a = type(self).attach(self.name)
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
