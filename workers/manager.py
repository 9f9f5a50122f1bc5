"""The keg manager: the service that owns an arena -- the policy around the core's
``shmalloc.Supervisor``, which does the work (what is recovered and how lives
there; when, how often, logging, signals and lifetime live here).

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
3. recovers each dead CPU: first the passes of the layers (the mbuf layer's,
   ``shmalloc.mbuf.recovery``: copies and packets freed with m_free, giving back
   their cluster references; packets waiting for their sharers and clusters left
   to the references), then its cached items back, its other allocated items
   freed through the zone's dtor, what was in flight to it, its mailbox and its
   slot (``shmalloc.recovery``);
4. serves sleepers whose items sit in a cache nobody answers for: a CPU that has
   left a drain request for a zone with sleepers in its mailbox, unread, for
   ``GRACE`` seconds (it has not called into the arena's slow paths, recv or poll
   since) and whose process is not stopped has its cached items of the zone (and
   of the zones that hold them: packets hold clusters) taken from the tags and
   handed to the sleepers (``Supervisor.serve_sleepers``);
5. every ``TRIM_SECONDS`` trims each zone's depot to its working-set estimate
   (UMA's ``zone_trim``) and gives empty slabs back;
6. when free pages fall under ``lowmem`` of the arena, runs the low-memory
   reclaim: the low-memory handlers the layers registered (the mbuf layer's
   protocol drains, ``mb_reclaim``), a drain request by message to every CPU, then
   every depot and every free slab.

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

import argparse
import faulthandler
import signal
import sys
import threading
import time
import traceback

from shmalloc import Supervisor

from . import positive_int, positive_seconds
from shmalloc.supervisor import GRACE, ORPHAN_SECONDS  # noqa: F401  (re-exported)

POLL = 0.2
TRIM_SECONDS = 20.0
LOWMEM = 0.05


class Manager:
    """The keg manager of one arena: a ``Supervisor`` and the loop that drives it."""

    def __init__(self, name: str, size: int | None = None, tunables: dict | None = None,
                 adopt: bool = False, lowmem: float = LOWMEM, log=None,
                 idle_exit: float | None = None, strict: bool = False):
        self.log = log or (lambda msg: None)
        self.idle_exit = idle_exit
        self._busy_at = time.monotonic()
        self.lowmem = lowmem
        self.stopping = False
        self._last_trim = time.monotonic()
        self._last_lowmem = 0.0
        if adopt:
            self.supervisor = Supervisor.adopt(name, log=self.log)
        else:
            self.supervisor = Supervisor.create(name, size, tunables, strict=strict, log=self.log)
        self.arena = self.supervisor.arena
        self.log(f"manager of arena {name!r}: pid {self.supervisor.pid_of(self.arena.cpu_id)}, "
                 f"CPU {self.arena.cpu_id}")

    # what the supervisor counted
    recovered = property(lambda self: self.supervisor.recovered)
    repairs = property(lambda self: self.supervisor.repairs)
    caches_taken = property(lambda self: self.supervisor.caches_taken)

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
                self.supervisor.repair_dead_owners()
            except Exception as e:  # noqa: BLE001 - logged; the next round tries again
                self.log(f"manager: lock watchdog: {e!r}")

    def step(self) -> None:
        """One round: recover the dead, repair orphaned locks, serve sleepers, trim,
        reclaim."""
        sup = self.supervisor
        dead = sup.dead_cpus()
        if dead:
            pids = {cpu: sup.pid_of(cpu) for cpu in dead}
            pid_list = "/".join(map(str, sorted(set(pids.values()))))
            for cpu, counts in sup.recover(dead).items():
                self.log(f"manager: recovered CPU {cpu} (pid {pid_list}): {counts}")
        sup.release_orphaned_locks()
        self.arena.poll()
        sup.serve_sleepers()
        now = time.monotonic()
        if now - self._last_trim >= TRIM_SECONDS:
            self._last_trim = now
            sup.trim()
        if sup.lowmem(self.lowmem) and now - self._last_lowmem >= 1.0:
            self._last_lowmem = now
            sup.reclaim()
        sup.give_back()                     # what recovery put in the manager's cache

    def _stop(self, signum, frame):
        self.stopping = True

    def _retire(self) -> bool:
        """--idle-exit: True once no other CPU has been attached for ``idle_exit``
        seconds; the arena's name is then unlinked (``Supervisor.retire``) and
        ``run`` removes the rest."""
        now = time.monotonic()
        if self.supervisor.others_attached():
            self._busy_at = now
            return False
        if now - self._busy_at < self.idle_exit:
            return False
        if not self.supervisor.retire():
            self._busy_at = now
            return False
        self.log(f"manager: no CPU attached for {self.idle_exit:g} s: retiring")
        return True

    def shutdown(self) -> None:
        self.log(f"manager: removing arena {self.arena.name!r}")
        self.supervisor.destroy()


# ============================================================================ entry points
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``shmalloc serve`` (and ``python -m shmalloc.workers.manager``,
    the command ``shmalloc.connect`` starts)."""
    p.add_argument("--name", required=True, metavar="ARENA")
    p.add_argument("--size", type=positive_int, metavar="BYTES",
                   help="arena size (default 64 MiB)")
    p.add_argument("--tunable", action="append", default=[], metavar="NAME=VALUE",
                   help="boot-time tunable, e.g. kern.ipc.nmbclusters=0 (repeatable)")
    p.add_argument("--adopt", action="store_true",
                   help="take over an existing arena whose manager died")
    p.add_argument("--idle-exit", type=positive_seconds, metavar="SECONDS",
                   help="remove the arena and exit once no other process has been attached "
                   "for SECONDS")
    p.add_argument("--strict", action="store_true",
                   help="refuse to create an arena larger than /dev/shm has room for "
                   "(default: warn)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not log recoveries")


def serve_from_args(args) -> int:
    """Run the keg manager the parsed ``add_serve_arguments`` describe, until
    SIGTERM/SIGINT."""
    return serve_main(args.name, args.size, _tunables(args.tunable), args.adopt, args.quiet,
                      idle_exit=args.idle_exit, strict=args.strict)


def serve_main(name: str, size: int | None, tunables: dict, adopt: bool, quiet: bool,
               idle_exit: float | None = None, strict: bool = False) -> int:
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # kill -USR1: where is it?
    mgr = Manager(name, size=size, tunables=tunables, adopt=adopt, log=log, idle_exit=idle_exit,
                  strict=strict)
    mgr.run()
    return 0


def _tunables(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"shmalloc serve: --tunable needs NAME=VALUE, not {item!r}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise SystemExit(f"shmalloc serve: {key}: {value!r} is not an integer") from None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shmalloc.workers.manager",
                                description="run the keg manager of an arena in the foreground")
    add_serve_arguments(p)
    return serve_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
