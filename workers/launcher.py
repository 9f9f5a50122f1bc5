"""A keg manager and N worker CPUs on one arena, supervised; and ``launch``, which runs
one, shows it live, reports, and always cleans up.

``Fleet`` is the supervisor (``launch`` and the kill tests both drive one):

- the keg manager runs as ``shmalloc serve`` in a subprocess (as in production), so
  it can be SIGKILLed and replaced by ``serve --adopt``; its log lines are kept;
- the supervisor attaches as a CPU of its own (the *observer*: statistics, check);
- workers are spawned processes running ``cpu.cpu_main``; worker i keeps its place
  in the team (and in a pipeline's ring) across replacements: a dead worker's
  counters are folded into the team's retired row and, with ``replace``, a new
  worker (the next generation) takes the place;
- ``quiesce`` stops the sending (HOLD), then has every worker report what it holds
  (COUNT); ``resume`` goes on; ``stop`` has every worker free everything and close;
- ``poll`` reaps dead workers, replaces them, gathers reports and measures each
  worker's longest stretch without progress (``max_stall``) while running.

``launch`` creates the churn zones (for ``churn``), runs the fleet for ``seconds``,
SIGKILLs a random worker every ``kill_every`` seconds (and, with ``kill_manager``, the
manager once, then adopts the arena with a new one), prints a progress line (ops/s,
mail traffic, kills and recoveries), then stops the workers and reports per worker,
per zone and per lock, ``netstat -m``, ``vmstat -z`` and ``check``; at the end the
manager is stopped (it removes the arena) and no OS object may be left.
"""

from __future__ import annotations

import collections
import functools
import multiprocessing as mp
import os
import queue
import random
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time

from shmalloc import Arena, ArenaNotFoundError, CorruptionError, LayoutError, ShmallocError
from shmalloc.errors import IpcError
from shmalloc import Supervisor, admin
from shmalloc.ipc import naming

from .cpu import COUNT, COUNTERS, HOLD, PHASES, RUN, STOP, Team, WorkerSpec, cpu_main

ZONE_SIZES = (256, 2048, 9216)
START_TIMEOUT = 30.0    # seconds for the manager to create the arena, or a phase to be reached
JOIN_TIMEOUT = 10.0     # seconds a worker told to stop may take to report and exit
MANAGER_IDLE_EXIT = 10.0  # a manager left alone this long (its fleet crashed) removes the
                          # arena and exits (serve --idle-exit)
WORKLOAD_NAMES = ("churn", "pipeline", "refcount")


class FleetError(ShmallocError):
    """The fleet could not do what it was asked (manager did not start, a phase
    was not reached in time ...)."""


def recoveries(arena) -> int:
    """Dead CPUs recovered over the arena's life."""
    return arena.stats().recoveries


def lock_repairs(arena) -> int:
    return arena.stats().lock_repairs


def unrecovered_cpus(arena) -> list[int]:
    """CPU slots taken by a process that is gone (the manager has not recovered
    them yet)."""
    return [s.cpu for s in arena.cpu_slots() if not admin.process_alive(s.pid, s.start)]


def manager_pid(arena) -> int:
    return arena.stats().manager_pid


class Fleet:
    """A keg manager and ``n`` worker CPUs running ``workload`` on arena ``name``.

    ``killpoints`` ("name[:prob],...", see ``shmalloc.debug``) is given to the
    workers (each its own ``SHMALLOC_KILL_SEED``), never to the manager.
    ``replace``: start a new worker in the place of one that died while running.
    ``log(text)`` receives the fleet's and the manager's log lines.
    """

    def __init__(self, name: str, n: int, workload: str = "churn", *, seed: int = 0,
                 size: int = 64 << 20, tunables: dict | None = None, killpoints: str = "",
                 replace: bool = True, log=None, strict: bool = False):
        if n < 1:
            raise ValueError(f"need at least one worker, not {n}")
        if workload not in WORKLOAD_NAMES:
            raise ValueError(f"workload must be one of {', '.join(WORKLOAD_NAMES)}, "
                             f"not {workload!r}")
        self.name, self.n, self.workload, self.seed = name, n, workload, seed
        self.size, self.tunables = size, dict(tunables or {})
        self.killpoints, self.replace, self.strict = killpoints, replace, strict
        self.log = log or (lambda text: None)
        self.ctx = mp.get_context("spawn")
        self.team = Team(self.ctx, n)
        self.results = self.ctx.Queue()
        self.procs: list = [None] * n
        self.gens = [0] * n
        self.options: dict = {}
        self.observer: Arena | None = None
        self.manager: subprocess.Popen | None = None
        self.manager_lines: collections.deque = collections.deque(maxlen=1000)
        self.managers_started = 0
        self.kills: list[tuple[float, int, int]] = []     # (time, index, pid) we SIGKILLed
        self.deaths: list[dict] = []                      # every worker that died running
        self.finals: dict[tuple[int, int], dict] = {}     # (index, gen) -> final report
        self.holdings: dict[int, tuple[int, dict]] = {}   # index -> (gen, holdings)
        self.max_stall: dict[tuple[int, int], float] = {}
        self._progress: dict[int, tuple[int, float]] = {}
        self._killed_pids: set[int] = set()
        self.started_at = time.monotonic()

    # ------------------------------------------------------------------ life
    def start(self) -> "Fleet":
        """Start the manager (it creates the arena), attach, make the workload's
        zones, spawn the workers."""
        try:
            self.start_manager()
            if self.workload == "churn":
                zones = [self.observer.zcreate(f"churn{s}", s).name for s in ZONE_SIZES]
                self.options = {"zones": zones}
            for i in range(self.n):
                self._spawn(i)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self) -> list:
        """Kill what still runs, detach, stop the manager (it removes the arena),
        remove whatever is left.  Returns the OS objects that had to be removed
        here (empty when the manager cleaned up after itself)."""
        for p in self.procs:
            if p is not None and p.is_alive():
                p.kill()
        for p in self.procs:
            if p is not None:
                p.join(JOIN_TIMEOUT)
        self.procs = [None] * self.n
        if self.observer is not None:
            # closing takes locks the workers just killed may hold: let a manager
            # (a new one if the old is gone or stuck) recover them first
            for attempt in range(2):
                try:
                    if self.manager is None or self.manager.poll() is not None:
                        self.start_manager(adopt=True)
                    self.wait_recovered(START_TIMEOUT / 2)
                    break
                except FleetError as e:
                    self.log(f"fleet: closing: {e}")
                    if self.manager is not None and self.manager.poll() is None:
                        self.kill_manager()
            if self.manager is None or self.manager.poll() is not None:
                self.repair_dead_locks()        # no manager could: never hang in close
        self.detach()
        self.stop_manager()
        left = naming.list_objects(self.name)
        if left:
            admin.cleanup([self.name])
        self.results.close()
        self.results.join_thread()
        return left

    def detach(self) -> None:
        if self.observer is not None:
            self.observer.close()
            self.observer = None

    # ------------------------------------------------------------------ manager
    def start_manager(self, adopt: bool = False) -> None:
        """Run ``shmalloc serve`` (``--adopt``: take over the arena of a dead
        manager) and wait until it runs the arena; attach the observer."""
        cmd = [sys.executable, "-m", "shmalloc.scripts.cli", "serve", "--name", self.name,
               "--idle-exit", str(MANAGER_IDLE_EXIT)]
        if adopt:
            cmd.append("--adopt")
            if self.observer is not None:
                self.repair_dead_locks()
        else:
            cmd += ["--size", str(self.size)]
            cmd += [f"--tunable={k}={v}" for k, v in self.tunables.items()]
            if self.strict:
                cmd.append("--strict")
        env = {k: v for k, v in os.environ.items()
               if k not in ("SHMALLOC_KILLPOINTS", "SHMALLOC_KILL_SEED")}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        self.manager = proc
        self.managers_started += 1
        threading.Thread(target=self._read_manager_log, args=(proc,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                time.sleep(0.1)                        # let the reader catch the last lines
                raise FleetError(f"the keg manager exited with status {proc.returncode}:\n"
                                 + "\n".join(list(self.manager_lines)[-10:]))
            if self.observer is None:
                try:
                    self.observer = Arena.attach(self.name)
                except (ArenaNotFoundError, LayoutError, IpcError):
                    pass                    # not there yet, or not sized or formatted yet
            if self.observer is not None and manager_pid(self.observer) == proc.pid:
                return
            if time.monotonic() > deadline:
                proc.kill()
                raise FleetError(f"the keg manager did not start in {START_TIMEOUT:g} s")
            time.sleep(0.02)

    def _read_manager_log(self, proc) -> None:
        for line in proc.stderr:
            line = line.rstrip()
            self.manager_lines.append(line)
            self.log(line)

    def repair_dead_locks(self) -> int:
        """Repair and release the locks whose holder died, from the observer's
        attachment: what the manager does, for when there is none (a new manager
        takes its CPU slot under the vm lock, and cannot while a dead process holds
        it).  Only while no manager runs."""
        if self.manager is not None and self.manager.poll() is None:
            return 0
        n = Supervisor.repair_dead_locks(self.observer)
        if n:
            self.log(f"fleet: repaired {n} lock(s) of dead processes")
        return n

    def kill_manager(self) -> int:
        """SIGKILL the keg manager; returns its pid."""
        pid = self.manager.pid
        self.manager.kill()
        self.manager.wait(JOIN_TIMEOUT)
        self.log(f"fleet: killed the keg manager (pid {pid})")
        return pid

    def stop_manager(self) -> int | None:
        """SIGTERM the manager and wait for it (it removes every OS object of the
        arena); its exit status, or None if there was none running."""
        proc, self.manager = self.manager, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(JOIN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    # ------------------------------------------------------------------ workers
    def _spawn(self, index: int) -> None:
        gen = self.gens[index]
        self.gens[index] += 1
        spec = WorkerSpec(self.name, index, gen, self.workload,
                          self.seed * 1000 + index * 100 + gen, self.options)
        p = self.ctx.Process(target=cpu_main, args=(spec, self.team, self.results),
                             name=f"shmalloc-cpu{index}.{gen}", daemon=True)
        saved = {k: os.environ.get(k) for k in ("SHMALLOC_KILLPOINTS", "SHMALLOC_KILL_SEED")}
        try:
            if self.killpoints:
                os.environ["SHMALLOC_KILLPOINTS"] = self.killpoints
                os.environ["SHMALLOC_KILL_SEED"] = str(spec.seed)
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.procs[index] = p
        self._progress[index] = (0, time.monotonic())

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.is_alive()]

    def kill(self, index: int) -> int:
        """SIGKILL worker ``index``; returns its pid (0 if it was not running)."""
        p = self.procs[index]
        if p is None or not p.is_alive():
            return 0
        self._killed_pids.add(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        self.kills.append((time.monotonic(), index, p.pid))
        return p.pid

    def kill_random(self, rng: random.Random) -> int:
        live = self.alive()
        return self.kill(rng.choice(live)) if live else 0

    def poll(self) -> None:
        """Gather reports, reap (and replace) dead workers, measure stalls."""
        self._drain_results()
        now = time.monotonic()
        phase = self.team.phase.value
        for i, p in enumerate(self.procs):
            if p is None or p.is_alive():
                continue
            p.join(0.1)
            gen = self.gens[i] - 1
            if (i, gen) not in self.finals:
                self._drain_results()
            death = None
            if (i, gen) not in self.finals or "error" in self.finals[i, gen]:
                death = {"index": i, "gen": gen, "pid": p.pid, "status": p.exitcode,
                         "killed": p.pid in self._killed_pids,
                         "final": self.finals.get((i, gen))}
                self.deaths.append(death)
            self.team.retire(i)
            self.procs[i] = None
            if self.replace and phase != STOP and death is not None and self._expected(death):
                self._spawn(i)          # a worker that failed by itself is not replaced
        if phase == RUN:
            for i, p in enumerate(self.procs):
                if p is None:
                    continue
                ops = self.team.get(i, "ops")
                last_ops, since = self._progress[i]
                if ops != last_ops:
                    self._progress[i] = (ops, now)
                else:
                    key = (i, self.gens[i] - 1)
                    self.max_stall[key] = max(self.max_stall.get(key, 0.0), now - since)

    def _drain_results(self) -> None:
        while True:
            try:
                msg = self.results.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            if msg[0] == "holdings":
                _, index, gen, held = msg
                self.holdings[index] = (gen, held)
            elif msg[0] == "final":
                r = msg[1]
                self.finals[r["index"], r["gen"]] = r

    def _expected(self, death) -> bool:
        """Killed by us, or (with kill points) by itself at a kill point."""
        return death["killed"] or bool(self.killpoints) and death["status"] == -signal.SIGKILL

    def unexpected_deaths(self) -> list[dict]:
        """Workers that died running without having been killed (by us or by a
        kill point, when the fleet has kill points)."""
        return [d for d in self.deaths if not self._expected(d)]

    def errors(self) -> list[str]:
        """A text per worker that failed: raised, or died without being killed."""
        out = []
        for d in self.unexpected_deaths():
            who = f"worker {d['index']} (generation {d['gen']}, pid {d['pid']})"
            if d["final"] is not None and "error" in d["final"]:
                out.append(f"{who} failed:\n" + textwrap.indent(d["final"]["error"], "    "))
            else:
                out.append(f"{who} exited with status {d['status']} without a report")
        return out

    # ------------------------------------------------------------------ phases
    def _phase(self, phase: int, timeout: float) -> None:
        """Set ``phase`` and wait until every worker acknowledges it."""
        self.team.phase.value = phase
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            waiting = [i for i, p in enumerate(self.procs)        # (an empty place: a
                       if p is not None and (self.team.get(i, "ack") != phase   # worker
                                             or self.team.get(i, "pid") != p.pid)]  # failed)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"workers {waiting} did not reach phase {PHASES[phase]} "
                                 f"in {timeout:g} s")
            time.sleep(0.01)

    def wait_running(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every place has a live worker that has done some work."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if all(p is not None and p.is_alive() and self.team.get(i, "pid") == p.pid
                   and self.team.get(i, "ops") > 0 for i, p in enumerate(self.procs)):
                return
            if time.monotonic() > deadline:
                raise FleetError(f"the workers did not all run within {timeout:g} s")
            time.sleep(0.01)

    def wait_recovered(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until the manager has recovered every dead CPU; returns the wait."""
        started = time.monotonic()
        while unrecovered_cpus(self.observer):
            self.poll()
            if time.monotonic() - started > timeout:
                raise FleetError(f"CPUs {unrecovered_cpus(self.observer)} not recovered "
                                 f"in {timeout:g} s")
            time.sleep(0.01)
        return time.monotonic() - started

    def quiesce(self, timeout: float = START_TIMEOUT) -> dict[int, dict]:
        """HOLD (nobody sends), then COUNT: every worker reports what it holds.
        Returns index -> holdings; the workers stand still until ``resume`` or
        ``stop``."""
        self._phase(HOLD, timeout)
        self.holdings.clear()
        self._phase(COUNT, timeout)
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            places = {i for i, p in enumerate(self.procs) if p is not None}
            if places <= set(self.holdings):
                break
            if time.monotonic() > deadline:
                raise FleetError(f"workers {sorted(places - set(self.holdings))} "
                                 f"did not report their holdings")
            time.sleep(0.01)
        return {i: held for i, (gen, held) in self.holdings.items()}

    def resume(self) -> None:
        now = time.monotonic()
        for i in range(self.n):
            self._progress[i] = (self.team.get(i, "ops"), now)
        self.team.phase.value = RUN

    def stop(self, timeout: float = JOIN_TIMEOUT) -> list[dict]:
        """Have every worker free what it holds, close and report; returns the final
        reports of the workers that were running (a worker that fails or does not
        finish in time is recorded in ``deaths``).  The workers are quiesced first
        (HOLD): a hand-off arriving after a worker freed everything would be
        freed by ``Arena.close`` through its zone, which the mbuf dtor refuses for
        a copy (M_EXT)."""
        if self.team.phase.value == RUN:
            self._phase(HOLD, timeout)          # nothing in flight when they finish
        running = {(i, self.gens[i] - 1): p for i, p in enumerate(self.procs) if p is not None}
        self.team.phase.value = STOP
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in running.values()) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.01)
        late = set()
        for key, p in running.items():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                late.add(key)
                p.kill()
                p.join()
        self.poll()
        recorded = {(d["index"], d["gen"]) for d in self.deaths}
        for (i, gen), p in running.items():
            final = self.finals.get((i, gen))
            if (i, gen) in recorded or final is not None and "error" not in final:
                continue
            status = "did not finish in time: killed" if (i, gen) in late else p.exitcode
            self.deaths.append({"index": i, "gen": gen, "pid": p.pid, "status": status,
                                "killed": False, "final": final})
        self.procs = [None] * self.n
        return [self.finals[k] for k in sorted(running) if k in self.finals
                and "error" not in self.finals[k]]

    # ------------------------------------------------------------------ reading
    def counters(self) -> dict[str, int]:
        return {name: self.team.total(name) for name in COUNTERS}

    def recoveries(self) -> int:
        return recoveries(self.observer)


# ============================================================================ launch
def launch(n=4, seconds=5.0, size=64 << 20, seed=None, name=None, out=sys.stdout, live=True,
           workload="churn", kill_every=None, kill_manager=False, strict=False):
    """Run ``n`` worker CPUs doing ``workload`` for ``seconds`` on a new arena of ``size``
    bytes under a keg manager; report to ``out``.

    ``seed`` (random if None) seeds the workers and the kills. ``name`` defaults to a
    unique ``launch<pid><hex>``. ``live`` prints a progress line (redrawn ~4 times a
    second on a TTY, else one line a second) and the manager's log. ``kill_every``:
    SIGKILL a random worker every that many seconds (a new one takes its place);
    ``kill_manager``: SIGKILL the manager halfway and adopt the arena with a new one.
    ``strict``: the manager refuses an arena larger than /dev/shm has room for.
    Returns a summary dict: name, seed, cpus, workload, seconds, ops, ops_per_s, kills,
    recoveries, check_ok, leftovers, errors (one text per failed worker), ok.
    """
    if n < 1:
        raise ValueError(f"need at least one worker, not {n}")
    seed = random.randrange(1 << 32) if seed is None else seed
    name = name or f"launch{os.getpid()}{secrets.token_hex(4)}"
    say = functools.partial(print, file=out, flush=True)
    tty = live and out.isatty()
    kills = f", SIGKILL a worker every {kill_every:g} s" if kill_every else ""
    say(f"shmalloc launch: arena {name}, {n} CPUs, workload {workload}, {seconds:g} s, "
        f"{size} bytes, seed {seed}{kills}{', kill the manager once' if kill_manager else ''}")

    def log(text):
        if live:
            say(("\r\033[K" if tty else "") + text)

    fleet = Fleet(name, n, workload, seed=seed, size=size, log=log, strict=strict)
    summary = {"name": name, "seed": seed, "cpus": n, "workload": workload,
               "seconds": seconds, "check_ok": False, "ops": 0, "ops_per_s": 0.0}
    errors: list[str] = []
    try:
        fleet.start()
        rng = random.Random(seed)
        _run(fleet, seconds, kill_every, kill_manager, rng, out if live else None)
        fleet.wait_recovered()
        finals = fleet.stop()
        errors = fleet.errors()
        summary.update(_report(fleet, finals, say))
    finally:
        leftovers = fleet.close()
    if leftovers:
        errors.append("OS objects left behind (removed now): "
                      + ", ".join(obj for _, obj in leftovers))
    say("OS objects left: " + (", ".join(obj for _, obj in leftovers) or "none"))
    for e in errors:
        say("error: " + e)
    summary.update(errors=errors, leftovers=leftovers, kills=len(fleet.kills),
                   deaths=len(fleet.deaths), managers=fleet.managers_started,
                   ok=summary["check_ok"] and not errors)
    return summary


def _run(fleet, seconds, kill_every, kill_manager, rng, out):
    """Run the fleet for ``seconds``: kill as asked, print the progress line."""
    tty = out is not None and out.isatty()
    interval = 0.25 if tty else 1.0
    started = time.monotonic()
    end = started + seconds
    next_kill = started + kill_every if kill_every else float("inf")
    manager_kill = started + seconds / 2 if kill_manager else float("inf")
    due = started + interval
    last = (started, fleet.counters())
    while True:
        now = time.monotonic()
        if now >= end:
            break
        fleet.poll()
        if now >= next_kill:
            next_kill += kill_every
            pid = fleet.kill_random(rng)
            if pid:
                fleet.log(f"launch: SIGKILL worker pid {pid}")
        if now >= manager_kill:
            manager_kill = float("inf")
            fleet.kill_manager()
            time.sleep(0.3)                       # a moment without a manager
            fleet.start_manager(adopt=True)
        if now >= due and out is not None:
            due = now + interval
            counters = fleet.counters()
            line = _progress_line(fleet, now - started, last, (now, counters))
            last = (now, counters)
            out.write("\r\033[K" + line if tty else line + "\n")
            out.flush()
        time.sleep(0.02)
    if tty:
        out.write("\n")


def _progress_line(fleet, elapsed, last, now):
    (t0, c0), (t1, c1) = last, now
    dt = max(t1 - t0, 1e-9)

    def rate(key):
        return (c1[key] - c0[key]) / dt

    return (f"{elapsed:5.1f} s {rate('ops'):10,.0f} ops/s   mail {rate('msgs_sent'):7,.0f} msg/s "
            f"{rate('items_sent'):8,.0f} items/s (full {c1['mbox_full']:,}, gone "
            f"{c1['cpu_gone']:,})   kills {len(fleet.kills)}  recoveries "
            f"{fleet.recoveries()}  workers {len(fleet.alive())}/{fleet.n}")


def _report(fleet, finals, say):
    """Print the per-worker, per-zone and per-lock tables, netstat -m, vmstat -z and
    check; return totals."""
    arena = fleet.observer
    say(f"\n{'CPU':>3} {'PLACE':>5} {'GEN':>3} {'PID':>8} {'OPS':>11} {'OPS/S':>10} "
        f"{'SENT':>9} {'RECEIVED':>9} {'HIT%':>6} {'DEPOT GETS':>10} {'KEG IMPORTS':>11}")
    ops = rate = 0
    lifetime = max(time.monotonic() - fleet.started_at, 1e-9)
    for r in sorted(finals, key=lambda r: r["index"]):
        s, c = r["stats"], r["counts"]
        ops += c["ops"]
        say(f"{s.cpu:>3} {r['index']:>5} {r['gen']:>3} {s.pid:>8} {c['ops']:>11,} "
            f"{c['ops'] / max(c.get('seconds', lifetime), 1e-9):>10,.0f} "
            f"{c.get('items_sent', 0):>9,} "
            f"{c.get('items_received', 0):>9,} {100 * s.hit_ratio:>6.2f} "
            f"{s.depot_gets:>10,} {s.keg_imports:>11,}")
    total = fleet.counters()
    rate = total["ops"] / lifetime
    say(f"{'all':>3} {'':>5} {'':>3} {'':>8} {total['ops']:>11,} {rate:>10,.0f}   "
        f"(every worker, the killed ones too)")
    say(f"\nmail: {total['msgs_sent']:,} messages, {total['items_sent']:,} items handed over, "
        f"{total['items_received']:,} received; mailbox full {total['mbox_full']:,} times, "
        f"destination gone {total['cpu_gone']:,} times; {total['bad_mail']:,} bad records "
        f"dropped")
    deaths = len(fleet.deaths)
    say(f"kills: {len(fleet.kills)} by SIGKILL ({deaths} workers died, "
        f"{sum(fleet.gens) - fleet.n} replaced); recoveries by the keg manager: "
        f"{recoveries(arena)}, locks repaired: {lock_repairs(arena)}; managers started: "
        f"{fleet.managers_started}")

    say(f"\n{'ZONE':<16} {'SIZE':>6} {'BUCKET':>6} {'USED':>6} {'CACHE':>6} {'DEPOT':>6} "
        f"{'KEG':>6} {'REQ':>11} {'FAIL':>6} {'XFREE':>6} {'PAGES':>6}")
    for z in arena.stats().zones:
        say(f"{z.name:<16} {z.size:>6} {z.bucket_size:>6} {z.used:>6} {z.free_cache:>6} "
            f"{z.free_depot:>6} {z.free_keg:>6} {z.requests:>11,} {z.failures:>6} "
            f"{z.xfree:>6} {z.pages:>6}")

    say(f"\n{'LOCK':<20} {'ACQUISITIONS':>12} {'CONTENDED':>9} {'MEAN WAIT':>10} "
        f"{'MAX WAIT':>10} {'OWNER':>7}")
    for lk in arena.lock_stats():
        if lk.acquisitions:
            say(f"{lk.name:<20} {lk.acquisitions:>12,} {100 * lk.contended_share:>8.2f}% "
                f"{lk.mean_wait_us:>8.1f}us {lk.max_wait_ns / 1e3:>8.1f}us "
                f"{lk.owner_pid or '-':>7}")

    if "mbuf" in arena.zones():
        say("\n" + arena.netstat_m().rstrip())
    say("\n" + arena.vmstat_z().rstrip())
    try:
        arena.check()
        check_ok = True
        say("\ncheck: ok")
    except CorruptionError as e:
        check_ok = False
        say(f"\ncheck: FAILED\n{e}")
    return {"ops": total["ops"], "ops_per_s": rate, "check_ok": check_ok,
            "recoveries": recoveries(arena)}
