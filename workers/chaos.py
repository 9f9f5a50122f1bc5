"""Chaos: seeded fault injection at scale (issue #7, item 3).

``chaos`` runs the mbuf workloads (``pipeline``, ``refcount``) on fleets of worker
CPUs under a keg manager (``launcher.Fleet``) and kills processes until ``kills``
workers have died:

- at random moments: the harness SIGKILLs a random worker (mostly one at work)
  every ``KILL_GAP`` seconds;
- inside locked sections: the workers run with ``SHMALLOC_KILLPOINTS``
  (``shmalloc.debug``), so some SIGKILL themselves with a lock held or a state
  change half done;
- the keg manager: SIGKILLed ``manager_kills`` times, left dead a moment (a worker
  is killed meanwhile, half the time), then replaced by ``serve --adopt``.

A killed worker's place is taken by a new one (the fleet's ``replace``).  The run is
cut into rounds of about ``round_kills`` deaths, one fresh arena and fleet per round,
the workloads taking turns (so every round starts with kill points armed: workers
disarm theirs once quiesced).  Each round ends with the proof, every failure of which
is recorded with the seed:

- the fleet is quiesced and every zone's USED equals what the living workers hold
  (``items_lost`` counts what nobody holds), ``check()`` passes from a fresh
  attachment, every lock is free or held by a live process and can be taken;
- no lock was held longer than ``lock_limit`` seconds: the harness samples every
  lock's owner words and acquisition time (``max_hold``: the longest hold it saw,
  by the living or the dead) and reads the longest wait any acquisition recorded
  (``max_wait``); how long each dead CPU waited for its recovery is timed too;
- no surviving worker went ``stall_limit`` seconds without progress, and all of them
  go on after the count;
- the workers free everything and close: USED is 0 (but the clusters of cached
  packets), ``check()`` passes, the manager exits 0 on SIGTERM and no OS object of
  the arena is left.

The whole run is bounded by ``timeout`` seconds (a round that cannot reach its
deaths in time fails, and a watchdog interrupts a run stuck past the bound).
``chaos`` returns a JSON-ready dict: the seed, totals, one record per round and
``failures`` (texts naming the round, workload and seed); ``ok`` is true when there
are none.
"""

from __future__ import annotations

import _thread
import math
import os
import random
import re
import secrets
import threading
import time

from shmalloc import Arena, CorruptionError, admin, recovery
from shmalloc import layout as L
from shmalloc.ipc import naming

from .launcher import Fleet, FleetError, lock_repairs, recoveries

WORKLOADS = ("pipeline", "refcount")
ROUND_KILLS = 25                 # deaths per round (one fresh arena and fleet per round)
KILL_GAP = (0.1, 0.4)            # seconds between two SIGKILLs from the harness
MANAGER_DOWN = (0.05, 0.5)       # seconds a killed manager stays dead before adoption
LOCK_LIMIT = 2.5                 # seconds a lock may be held or waited for ("about two")
STALL_LIMIT = 5.0                # seconds a worker may go without progress
TIMEOUT = 900.0                  # seconds for the whole run
WAIT = 30.0                      # seconds for one phase of the proof
SIZE = 32 << 20
POLL = 0.01
# The kill points each workload passes, with probabilities low enough that the
# often-passed ones do not kill a worker at once (the kill tests' figures).
KILLPOINTS = {
    "pipeline": "mail.post:0.001,mail.collect:0.001,depot.put:0.001,keg.take:0.0001,"
                "zone.fill.locked:0.01,release.fini:0.02",
    "refcount": "mail.post:0.0005,mail.collect:0.001,depot.put:0.001,keg.take:0.0001,"
                "zone.fill.locked:0.01,release.fini:0.02",
}


class ChaosFailure(Exception):
    """One proof of a round failed (the text says which)."""


# ============================================================================ watching
class Watch:
    """Samples the arena while the chaos runs: how long each lock is held (owner
    words and acquisition time), and how long each dead CPU waits for recovery.

    Lock: none taken; reads shared words only (a torn read costs one sample)."""

    def __init__(self, arena):
        self.arena = arena
        self.max_hold = 0.0                       # seconds, any holder
        self.max_hold_dead = 0.0                  # seconds, a holder that was dead
        self.worst: dict | None = None            # the longest hold: lock, pid, dead
        self.long_holds: list[dict] = []          # holds over the limit (one per hold)
        self.recovery_waits: list[float] = []     # per dead CPU: death seen -> slot free
        self.worst_recovery: dict | None = None   # the longest of them: cpu, pid, times
        self._dead_seen: dict[tuple[int, int], float] = {}   # (cpu, pid) -> first seen
        self._alive: dict[int, bool] = {}
        self._reported: set = set()

    def _is_alive(self, pid: int) -> bool:
        alive = self._alive.get(pid)
        if alive is None:
            alive = self._alive[pid] = admin.process_alive(pid)
        return alive

    def lock_indexes(self) -> list[int]:
        core = self.arena._core
        return recovery.lock_indexes(core) + [L.mbox_lock_index(c) for c in range(L.MAX_CPUS)]

    def poll(self, limit: float = LOCK_LIMIT) -> None:
        self._alive.clear()
        core = self.arena._core
        w = core.w
        now_ns = time.monotonic_ns()
        for idx in self.lock_indexes():
            lw = L.lock_word(idx)
            pid = w[lw + L.LOCK["OWNER_PID"]]
            if not pid:
                continue
            since = w[lw + L.LOCK["ACQUIRED_NS"]]
            held = (now_ns - since) / 1e9
            if held <= 0 or held > 3600:          # torn read, or not yet written
                continue
            dead = not self._is_alive(pid)
            if held > self.max_hold:
                self.max_hold = held
                self.worst = {"lock": self._name(idx), "pid": pid, "dead": dead,
                              "seconds": round(held, 3)}
            if dead:
                self.max_hold_dead = max(self.max_hold_dead, held)
            key = (idx, pid, since)
            if held > limit and key not in self._reported:
                self._reported.add(key)
                self.long_holds.append({"lock": self._name(idx), "pid": pid, "dead": dead,
                                        "pid_is_manager": pid == w[L.HDR["MANAGER_PID"]]})
        now = time.monotonic()
        gone = set(self._dead_seen)
        for cpu in range(L.MAX_CPUS):
            cw = L.cpu_word(cpu)
            if w[cw + L.CPU["STATE"]] == L.CPU_FREE:
                continue
            pid = w[cw + L.CPU["PID"]]
            key = (cpu, pid)
            gone.discard(key)
            if key not in self._dead_seen and not admin.process_alive(
                    pid, w[cw + L.CPU["START"]]):
                self._dead_seen[key] = now
        for key in gone:                           # slot freed (or taken again): recovered
            seen = self._dead_seen.pop(key)
            self.recovery_waits.append(now - seen)
            if now - seen >= max(self.recovery_waits):
                self.worst_recovery = {"cpu": key[0], "pid": key[1], "seen": seen,
                                       "recovered": now, "seconds": round(now - seen, 3)}

    def _name(self, idx: int) -> str:
        from shmalloc.stats import lock_name
        try:
            return lock_name(self.arena._core, idx)
        except Exception:  # noqa: BLE001 - a name for a report only
            return f"lock {idx}"

    def max_wait(self) -> tuple[float, str]:
        """The longest wait any acquisition recorded (seconds) and its lock."""
        w = self.arena._core.w
        best, name = 0.0, "-"
        for idx in self.lock_indexes():
            ns = w[L.lock_word(idx) + L.LOCK["MAX_WAIT_NS"]]
            if ns / 1e9 > best:
                best, name = ns / 1e9, self._name(idx)
        return best, name

    def max_recovery_wait(self) -> float:
        pending = [time.monotonic() - t for t in self._dead_seen.values()]
        return max(self.recovery_waits + pending, default=0.0)


# ============================================================================ accounting
def expected_used(held: dict) -> dict[str, int]:
    """Zone -> items the living workers of an mbuf workload hold, from their
    holdings reports: their mbufs, and a packet for every distinct cluster owner."""
    owners = set()
    for h in held.values():
        owners.update(h["owners"])
    return {"mbuf": sum(h["used"]["mbuf"] for h in held.values()),
            "mbuf_packet": len(owners)}


def used_problems(arena, expected: dict) -> tuple[list[str], int]:
    """(texts, items lost): every zone whose USED differs from ``expected`` (a
    cluster counts for every packet outside the slabs), and how many items are
    used that nobody holds."""
    zones = {z.name: z for z in arena.stats().zones}
    out, lost = [], 0
    for name, z in zones.items():
        want = expected.get(name, 0)
        if name == "mbuf_cluster" and "mbuf_packet" in zones:
            p = zones["mbuf_packet"]
            want = p.used + p.free_cache + p.free_depot
        if z.used != want:
            out.append(f"zone {name}: USED {z.used}, the living hold {want}")
            lost += max(0, z.used - want)
    return out, lost


def _settled_used(arena, expected, timeout=3.0):
    """``used_problems`` once they are gone or ``timeout`` passed (the manager may
    be between two frees of a recovery)."""
    deadline = time.monotonic() + timeout
    while True:
        problems, lost = used_problems(arena, expected)
        if not problems or time.monotonic() > deadline:
            return problems, lost
        time.sleep(0.05)


def lock_problems(arena) -> list[str]:
    """Locks held by a dead process, or not takeable within 3 s."""
    core = arena._core
    out = []
    idxs = recovery.lock_indexes(core) + [L.mbox_lock_index(c) for c in core.live_cpus()]
    for idx in idxs:
        lk = core.lock(idx)
        pid = lk.owner_pid()
        if pid and not admin.process_alive(pid):
            out.append(f"lock {idx} held by dead pid {pid}")
        if not lk.acquire(timeout=3.0, owner_id=arena.cpu_id):
            out.append(f"lock {idx} not taken within 3 s (owner pid {lk.owner_pid()})")
        else:
            lk.release()
    return out


# ============================================================================ the run
def plan(kills: int, manager_kills: int, workloads, round_kills: int = ROUND_KILLS):
    """Rounds as (workload, deaths, manager kills): ``kills`` deaths cut into rounds
    of about ``round_kills``, workloads taking turns, the manager kills spread."""
    if kills < 1:
        raise ValueError(f"need at least one kill, not {kills}")
    if manager_kills < 0:
        raise ValueError(f"manager kills must be >= 0, not {manager_kills}")
    n = max(math.ceil(kills / round_kills), len(workloads) if kills >= len(workloads) else 1,
            1)
    n = min(n, kills)
    out = []
    for r in range(n):
        deaths = kills * (r + 1) // n - kills * r // n
        mk = manager_kills * (r + 1) // n - manager_kills * r // n
        out.append((workloads[r % len(workloads)], deaths, mk))
    return out


def chaos(seed=None, workers=4, kills=100, manager_kills=3, workloads=WORKLOADS,
          killpoints=None, size=SIZE, round_kills=ROUND_KILLS, timeout=TIMEOUT,
          lock_limit=LOCK_LIMIT, stall_limit=STALL_LIMIT, name=None, log=None,
          progress=None) -> dict:
    """Run the chaos (see the module docstring).

    ``killpoints``: None for each workload's ``KILLPOINTS``, "" for none, or a spec
    for every workload.  ``log(text)`` receives the harness's and the managers'
    log lines; ``progress(text)`` a progress line about once a second.  ``name``:
    prefix of the rounds' arenas (default ``chaos<pid><hex>``).  Returns the
    result dict (see the module docstring).
    """
    for wl in workloads:
        if wl not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not {wl!r}")
    if workers < 2:
        raise ValueError(f"need at least two workers, not {workers}")
    seed = random.randrange(1 << 32) if seed is None else seed
    name = name or f"chaos{os.getpid()}{secrets.token_hex(3)}"
    log = log or (lambda text: None)
    rounds = plan(kills, manager_kills, list(workloads), round_kills)
    result = {"seed": seed, "workers": workers, "kills_asked": kills,
              "manager_kills_asked": manager_kills, "workloads": list(workloads),
              "killpoints": killpoints, "timeout": timeout, "lock_limit": lock_limit,
              "stall_limit": stall_limit, "rounds": [], "failures": []}
    started = time.monotonic()
    deadline = started + timeout
    stuck = threading.Event()

    def interrupt():                  # the bound: a proof stuck past every timeout
        stuck.set()
        _thread.interrupt_main()

    guard = threading.Timer(timeout + 2 * WAIT, interrupt)
    guard.daemon = True
    guard.start()
    try:
        for r, (workload, deaths, mk) in enumerate(rounds):
            if r and time.monotonic() > deadline:
                result["failures"].append(f"out of time: {len(rounds) - r} of {len(rounds)} "
                                          f"rounds not run within {timeout:g} s; seed {seed}")
                break
            spec = KILLPOINTS[workload] if killpoints is None else killpoints
            rec = _round(f"{name}r{r}", r, len(rounds), workload, deaths, mk, spec,
                         random.Random(seed * 1009 + r), seed, workers, size, deadline,
                         lock_limit, stall_limit, log, progress, result, started)
            result["rounds"].append(rec)
            result["failures"] += rec["failures"]
    except KeyboardInterrupt:
        if not stuck.is_set():
            raise
        result["failures"].append(f"the run passed its bound of {timeout:g} s (+{2 * WAIT:g} "
                                  f"s) and was interrupted; seed {seed}")
    finally:
        guard.cancel()
    _totals(result, time.monotonic() - started)
    return result


def _totals(result, seconds):
    rs = result["rounds"]

    def total(key):
        return sum(r[key] for r in rs)

    result.update(
        seconds=round(seconds, 1), deaths=total("deaths"), random_kills=total("random_kills"),
        random_kills_at_work=total("random_kills_at_work"),
        killpoint_kills=total("killpoint_kills"), manager_kills=total("manager_kills"),
        adoptions=total("adoptions"), recoveries=total("recoveries"),
        lock_repairs=total("lock_repairs"), items_lost=total("items_lost"),
        check_ok=any(r["checks"] for r in rs) and all(r["check_ok"] is not False for r in rs),
        checks=total("checks"),
        max_lock_hold=max((r["max_lock_hold"] for r in rs), default=0.0),
        max_lock_wait=max((r["max_lock_wait"] for r in rs), default=0.0),
        max_recovery_wait=max((r["max_recovery_wait"] for r in rs), default=0.0),
        max_adoption=max((r["max_adoption"] for r in rs), default=0.0),
        max_stall=max((r["max_stall"] for r in rs), default=0.0),
        os_objects_left=[o for r in rs for o in r["os_objects_left"]],
        known_failures=[{"bug": known_bug(f), "failure": f} for f in result["failures"]
                        if known_bug(f)],
        new_failures=[f for f in result["failures"] if not known_bug(f)],
        ok=not result["failures"] and len(rs) > 0)


def _round(name, r, nrounds, workload, deaths, manager_kills, killpoints, rng, seed, workers,
           size, deadline, lock_limit, stall_limit, log, progress, result, started):
    """One round: a fleet on a fresh arena, killed until ``deaths`` workers died,
    then proved (see the module docstring).  Returns its record."""
    where = f"round {r + 1}/{nrounds} ({workload}, seed {seed})"
    rec = {"round": r, "workload": workload, "arena": name, "killpoints": killpoints,
           "deaths_asked": deaths, "manager_kills_asked": manager_kills, "deaths": 0,
           "random_kills": 0, "random_kills_at_work": 0, "killpoint_kills": 0,
           "manager_kills": 0, "adoptions": 0, "adoption_seconds": [], "recoveries": 0,
           "lock_repairs": 0, "items_lost": 0,
           "check_ok": None, "checks": 0, "max_lock_hold": 0.0, "max_lock_hold_dead": 0.0,
           "longest_hold": None, "max_lock_wait": 0.0, "max_recovery_wait": 0.0,
           "max_adoption": 0.0, "max_stall": 0.0, "os_objects_left": [], "failures": [],
           "_manager_down": []}
    t0 = time.monotonic()
    log(f"chaos: {where}: arena {name}, {workers} workers, {deaths} deaths, "
        f"{manager_kills} manager kills, kill points {killpoints or 'none'}")
    fleet = Fleet(name, workers, workload, seed=seed * 100 + r, size=size,
                  killpoints=killpoints, log=log)
    watch = None
    try:
        fleet.start()
        watch = Watch(fleet.observer)
        fleet.wait_running(WAIT)
        _kill_phase(fleet, watch, rng, deaths, manager_kills, deadline, rec, where, log,
                    progress, result, started, r, nrounds)
        _prove(fleet, watch, workload, rec, where, stall_limit, lock_limit)
    except (ChaosFailure, FleetError) as e:
        rec["failures"].append(f"{where}: {e}")
    except CorruptionError as e:
        rec["check_ok"] = False
        rec["failures"].append(f"{where}: check failed: {e}")
    finally:
        if watch is not None:
            if fleet.observer is not None:
                try:
                    watch.poll(lock_limit)
                    _read_waits(rec, watch)
                except Exception as e:  # noqa: BLE001 - the arena may be broken
                    rec["failures"].append(f"{where}: reading the locks: {e!r}")
            _lock_figures(rec, watch, where, lock_limit)
        _count_deaths(fleet, rec)
        errors = fleet.errors()
        for e in errors:
            rec["failures"].append(f"{where}: {e}")
        left = fleet.close()
        if left:
            rec["os_objects_left"] = [obj for _, obj in left]
            rec["failures"].append(f"{where}: OS objects left behind (removed now): "
                                   + ", ".join(rec["os_objects_left"]))
        rec["max_stall"] = round(max(fleet.max_stall.values(), default=0.0), 3)
        rec["counters"] = fleet.counters()      # the workers' (mail, drops, free retries)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    log(f"chaos: {where}: {rec['deaths']} deaths ({rec['random_kills']} random, "
        f"{rec['killpoint_kills']} at kill points), {rec['manager_kills']} manager kills, "
        f"{rec['recoveries']} recoveries, items lost {rec['items_lost']}, max lock hold "
        f"{rec['max_lock_hold']:.2f} s, {'ok' if not rec['failures'] else 'FAILED'} "
        f"in {rec['seconds']:g} s")
    return rec


def _count_deaths(fleet, rec):
    ds = fleet.deaths
    rec["deaths"] = sum(1 for d in ds if fleet._expected(d))
    rec["random_kills"] = sum(1 for d in ds if d["killed"])
    rec["killpoint_kills"] = rec["deaths"] - rec["random_kills"]


def _read_waits(rec, watch):
    """The longest wait any acquisition recorded, into ``rec`` (while attached)."""
    wait, wait_lock = watch.max_wait()
    rec["max_lock_wait"] = round(wait, 3)
    rec["max_lock_wait_lock"] = wait_lock


def _lock_figures(rec, watch, where, lock_limit):
    """The lock and recovery figures of the round, and their failures."""
    rec["max_lock_hold"] = round(watch.max_hold, 3)
    rec["max_lock_hold_dead"] = round(watch.max_hold_dead, 3)
    rec["longest_hold"] = watch.worst
    rec["max_recovery_wait"] = round(watch.max_recovery_wait(), 3)
    worst = watch.worst_recovery
    if worst is not None:
        down = rec.pop("_manager_down", [])
        overlap = any(a < worst["recovered"] and worst["seen"] < b for a, b in down)
        rec["worst_recovery"] = {"cpu": worst["cpu"], "pid": worst["pid"],
                                 "seconds": worst["seconds"], "manager_was_down": overlap}
    rec.pop("_manager_down", None)
    if watch.long_holds:
        rec["failures"].append(f"{where}: locks held longer than {lock_limit:g} s: "
                               f"{watch.long_holds}")
    if rec["max_lock_wait"] > lock_limit:
        rec["failures"].append(f"{where}: an acquisition of {rec.get('max_lock_wait_lock')} "
                               f"waited {rec['max_lock_wait']:.2f} s (limit {lock_limit:g})")


def _kill_phase(fleet, watch, rng, deaths, manager_kills, deadline, rec, where, log,
                progress, result, started, r, nrounds):
    """SIGKILL random workers every KILL_GAP seconds (kill points add their own
    deaths) until ``deaths`` died, killing and adopting the manager at evenly
    spaced points (all of its kills are done, and at least one SIGKILL from the
    harness, even when kill points got to ``deaths`` first)."""
    at = [deaths * (j + 1) // (manager_kills + 1) for j in range(manager_kills)]
    next_kill = time.monotonic() + rng.uniform(*KILL_GAP)
    next_line = time.monotonic() + 1.0
    last_ops = (time.monotonic(), fleet.counters()["ops"])
    while True:
        fleet.poll()
        watch.poll()
        if fleet.errors():
            raise ChaosFailure("\n".join(fleet.errors()))
        n = sum(1 for d in fleet.deaths if fleet._expected(d))
        if n >= deaths and not at and rec["random_kills"]:     # kill points may get
            return                                            # there first
        now = time.monotonic()
        if now > deadline:
            raise ChaosFailure(f"out of time: {n} of {deaths} deaths when the run's "
                               f"timeout passed")
        if at and n >= at[0]:
            at.pop(0)
            _kill_manager(fleet, watch, rng, rec, log)
            continue
        if now >= next_kill and (n < deaths or not rec["random_kills"]):
            working = [i for i in fleet.alive() if fleet.team.get(i, "ops") > 0]
            if working:
                if rng.random() < 0.9:
                    pid = fleet.kill(rng.choice(working))     # mostly workers at work,
                    rec["random_kills_at_work"] += bool(pid)
                else:
                    pid = fleet.kill_random(rng)              # some maybe starting up
                if pid:
                    rec["random_kills"] += 1          # (recounted from the deaths at the end)
                    log(f"chaos: SIGKILL worker pid {pid}")
            next_kill = now + rng.uniform(*KILL_GAP)
        if progress is not None and now >= next_line:
            ops = fleet.counters()["ops"]
            rate = (ops - last_ops[1]) / max(now - last_ops[0], 1e-9)
            last_ops = (now, ops)
            next_line = now + 1.0
            kp = sum(1 for d in fleet.deaths if fleet._expected(d) and not d["killed"])
            done = sum(x["deaths"] for x in result["rounds"]) + n
            progress(f"{now - started:6.1f} s  round {r + 1}/{nrounds} {rec['workload']:<8} "
                     f"deaths {done}/{result['kills_asked']} (this round {n - kp} random, "
                     f"{kp} at kill points)  manager kills "
                     f"{sum(x['manager_kills'] for x in result['rounds']) + rec['manager_kills']}"
                     f"/{result['manager_kills_asked']}  recoveries "
                     f"{recoveries(fleet.observer)}  max lock hold {watch.max_hold:.2f} s  "
                     f"{rate:9,.0f} ops/s  workers {len(fleet.alive())}/{fleet.n}")
        time.sleep(POLL)


def _kill_manager(fleet, watch, rng, rec, log):
    """SIGKILL the manager, leave it dead a moment (half the time a worker dies
    meanwhile: the adopter must recover it), then adopt the arena."""
    fleet.kill_manager()
    killed_at = time.monotonic()
    rec["manager_kills"] += 1
    down_until = time.monotonic() + rng.uniform(*MANAGER_DOWN)
    victim = rng.random() < 0.5
    while time.monotonic() < down_until:
        fleet.poll()
        watch.poll()
        if victim:
            victim = False
            pid = fleet.kill_random(rng)
            if pid:
                log(f"chaos: SIGKILL worker pid {pid} while no manager runs")
        time.sleep(POLL)
    t0 = time.monotonic()
    fleet.start_manager(adopt=True)
    took = time.monotonic() - t0
    rec["adoptions"] += 1
    rec["_manager_down"].append((killed_at, time.monotonic()))
    rec["adoption_seconds"].append(round(took, 3))
    rec["max_adoption"] = round(max(rec["max_adoption"], took), 3)
    log(f"chaos: adopted by a new manager (pid {fleet.manager.pid}) in {took:.2f} s")


def _run_for(fleet, watch, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        fleet.poll()
        watch.poll()
        time.sleep(POLL)


def _prove(fleet, watch, workload, rec, where, stall_limit, lock_limit):
    """The end of a round: every place works again, every death is recovered,
    then the count, the check, the locks, going on, stopping and the OS objects."""
    fleet.wait_running(WAIT)
    fleet.wait_recovered(WAIT)
    watch.poll(lock_limit)
    rec["recoveries"] = recoveries(fleet.observer)
    rec["lock_repairs"] = lock_repairs(fleet.observer)
    stalls = {f"{i}.{g}": round(v, 2) for (i, g), v in fleet.max_stall.items()
              if v > stall_limit}
    if stalls:
        raise ChaosFailure(f"workers (place.generation) went without progress for {stalls} s "
                           f"(limit {stall_limit:g} s)")
    held = fleet.quiesce(WAIT)
    if fleet.errors():
        raise ChaosFailure("\n".join(fleet.errors()))
    fleet.wait_recovered(WAIT)        # a worker may have died at a kill point as it was
                                      # told to hold: its recovery is not the count's
    with Arena.attach(fleet.name) as fresh:
        fresh.check()
        rec["checks"] += 1
        rec["check_ok"] = True                    # every check() run so far passed
        problems, lost = _settled_used(fresh, expected_used(held))
        rec["items_lost"] = lost
        if problems:
            roles = _roles(fleet, fresh)
            raise ChaosFailure("after the count: " + "; ".join(problems) + "\n"
                               + describe_unaccounted(fresh, held, roles))
        locks = lock_problems(fresh)
        if locks:
            raise ChaosFailure("locks: " + "; ".join(locks))
    before = [fleet.team.get(i, "ops") for i in range(fleet.n)]
    fleet.resume()
    limit = time.monotonic() + WAIT
    while True:
        _run_for(fleet, watch, 0.1)
        after = [fleet.team.get(i, "ops") for i in range(fleet.n)]
        if all(a > b for a, b in zip(after, before)):
            break
        if time.monotonic() > limit:
            raise ChaosFailure(f"workers stopped after the count: ops {before} -> {after}")
    finals = fleet.stop()
    if fleet.errors():
        raise ChaosFailure("\n".join(fleet.errors()))
    if len(finals) != fleet.n:
        raise ChaosFailure(f"{len(finals)} final reports of {fleet.n} workers")
    watch.poll(lock_limit)
    _read_waits(rec, watch)
    fleet.observer.check()
    rec["checks"] += 1
    rec["check_ok"] = True
    problems, lost = _settled_used(fleet.observer, {})
    rec["items_lost"] = max(rec["items_lost"], lost)
    if problems:
        roles = _roles(fleet, fleet.observer)
        raise ChaosFailure("after the workers closed: " + "; ".join(problems) + "\n"
                           + describe_unaccounted(fleet.observer, {}, roles))
    fleet.detach()
    status = fleet.stop_manager()
    if status != 0:
        raise ChaosFailure(f"the keg manager exited with status {status} on SIGTERM")
    left = naming.list_objects(fleet.name)
    if left:
        rec["os_objects_left"] = [obj for _, obj in left]
        raise ChaosFailure("OS objects left after the manager stopped: "
                           + ", ".join(rec["os_objects_left"]))


def describe_unaccounted(arena, held, roles) -> str:
    """For a failure message: the allocated mbuf-zone items that the holdings
    ``held`` (per worker: "handles", "owners") do not account for, then the
    clusters no packet points at; ``roles`` names the CPUs (slot -> who)."""
    return "\n".join(filter(None, (_describe_unheld(arena, held, roles),
                                    _describe_clusters(arena, roles))))


def _describe_unheld(arena, held, roles, limit=8) -> str:
    """Allocated mbuf-zone items that no living worker accounts for: holder (and
    its role), tag state, and the mbuf's type, flags, refcount and cluster owner,
    for a failure message."""
    from shmalloc.mbuf.zones import BTYPE, EXT_OWNER, EXT_REFCNT, FLAGS, FLAGS_MASK
    known = set()
    for h in held.values():
        known.update(h.get("handles", ()))
        known.update(h.get("owners", ()))
    core = arena._core
    w, tags = core.w, core.tags
    out = []
    for zname in ("mbuf_packet", "mbuf"):
        if zname not in arena.zones():
            continue
        z = arena.zone(zname)
        keg = z.keg
        for _, base in keg.slabs():
            t0 = (base + keg.tagoff) >> 2
            for k, tv in enumerate(tags[t0:t0 + keg.ipers]):
                if L.tag_zidx(tv) != z.zidx or L.tag_state(tv) not in (L.TAG_ALLOC,
                                                                       L.TAG_INFLIGHT):
                    continue
                h = base + k * keg.rsize
                if h in known:
                    continue
                cpu = L.tag_holder(tv)
                i = h >> 3
                typ = core.mv[h + BTYPE]
                aside = " (MT_NOTMBUF: set aside for its copies)" if typ == 0 else ""
                out.append(f"{zname} {h}: {L.TAG_STATE_NAMES[L.tag_state(tv)]} held by CPU "
                           f"{cpu} ({roles.get(cpu, 'no live process')}), type {typ}{aside}, "
                           f"flags {w[i + FLAGS] & FLAGS_MASK:#x}, refcount {tags[w[i + EXT_REFCNT] >> 2]}, "
                           f"owner {w[i + EXT_OWNER]}")
                if len(out) >= limit:
                    return "\n".join(out)
    return "\n".join(out)


def _describe_clusters(arena, roles, limit=8) -> str:
    """Allocated clusters that no packet (allocated, in flight, cached, in the depot
    or on its way home) points at: the cluster's holder and every packet-zone item
    that points at it, with its state -- for a failure message."""
    from shmalloc.mbuf.zones import BTYPE, EXT_BUF, EXT_OWNER, FLAGS, FLAGS_MASK
    if not {"mbuf_packet", "mbuf_cluster"} <= set(arena.zones()):
        return ""
    core = arena._core
    w, tags = core.w, core.tags

    def items(zone):
        keg = zone.keg
        for _, base in keg.slabs():
            t0 = (base + keg.tagoff) >> 2
            for k, tv in enumerate(tags[t0:t0 + keg.ipers]):
                if L.tag_zidx(tv) == zone.zidx and L.tag_state(tv) != L.TAG_FREE:
                    yield base + k * keg.rsize, tv

    counted = (L.TAG_ALLOC, L.TAG_INFLIGHT, L.TAG_CACHED, L.TAG_DEPOT, L.TAG_XFREE)
    by_cluster: dict[int, list] = {}
    for h, tv in items(arena.zone("mbuf_packet")):
        by_cluster.setdefault(w[(h >> 3) + EXT_BUF], []).append((h, tv))
    out = []
    for cl, tv in items(arena.zone("mbuf_cluster")):
        if L.tag_state(tv) != L.TAG_ALLOC:
            continue
        packets = by_cluster.get(cl, [])
        if any(L.tag_state(ptv) in counted for _, ptv in packets):
            continue
        cpu = L.tag_holder(tv)
        seen = "; ".join(f"packet {h}: {L.TAG_STATE_NAMES[L.tag_state(ptv)]} held by CPU "
                         f"{L.tag_holder(ptv)} ({roles.get(L.tag_holder(ptv), 'no live process')})"
                         f", type {core.mv[h + BTYPE]}, flags {w[(h >> 3) + FLAGS] & FLAGS_MASK:#x}, owner "
                         f"{w[(h >> 3) + EXT_OWNER]}" for h, ptv in packets)
        out.append(f"mbuf_cluster {cl}: alloc held by CPU {cpu} "
                   f"({roles.get(cpu, 'no live process')}); "
                   + (seen or "no packet-zone item points at it"))
        if len(out) >= limit:
            break
    return "\n".join(out)


def _roles(fleet, fresh) -> dict[int, str]:
    """CPU slot -> who holds it (manager, observer, this check, worker place.gen)."""
    w = fresh._core.w
    out = {fresh.cpu_id: "the checking attachment"}
    if fleet.observer is not None:
        out[fleet.observer.cpu_id] = "the harness's observer"
    out[w[L.HDR["MANAGER_CPU"]]] = f"the keg manager, pid {w[L.HDR['MANAGER_PID']]}"
    for i in range(fleet.n):
        cpu = fleet.team.cpus[i]
        if cpu >= 0:
            out[cpu] = f"worker place {i} generation {fleet.gens[i] - 1}"
    for cpu in range(L.MAX_CPUS):
        cw = L.cpu_word(cpu)
        if cpu not in out and w[cw + L.CPU["STATE"]] != L.CPU_FREE:
            out[cpu] = f"pid {w[cw + L.CPU['PID']]}"
    return out


# ============================================================================ known bugs
# Bugs this harness met, recognised by the exact shape of the failure they cause, so
# that a report names a known one (a regression) apart from a new one.  A failure is
# known only if every line of it fits (``known_bug``).  "limbo" and "depot" were fixed
# on branch ``rec`` (1a050d4, bb12ddf); "revived" (found here: seed 20261122, short
# run, before 1a050d4) went through the code 1a050d4 replaced and was not seen since.
KNOWN_BUGS = {
    "limbo": "a packet set aside for its copies (_limbo, typed MT_NOTMBUF) by a CPU "
             "killed in m_free before it dropped its own reference is never freed "
             "(shmalloc/mbuf/refs.py drop_ref): its refcount stays 1 and nobody frees it "
             "(fixed: 1a050d4)",
    "depot": "after kills at kill points the packet zone's depot count exceeds its "
             "depot-tagged items (check: 'depot holds N items, N-1 are tagged depot'; "
             "fixed: bb12ddf)",
    "revived": "a packet that was set aside for its copies (M_PKTHDR cleared) and marked "
               "MT_DATA again by its last copy stays allocated, held by a living worker "
               "that does not know it, refcount 1 (the free that should have returned it "
               "never completed; found by chaos; not seen since 1a050d4)",
}
_USED_HEAD = re.compile(r"after the (?:count|workers closed): zone mbuf_packet: USED "
                        r"(\d+), the living hold (\d+)$")
_LIMBO_ITEM = re.compile(r"mbuf_packet \d+: alloc held by CPU \d+ \([^)]*\), type 0 "
                         r"\(MT_NOTMBUF: set aside for its copies\), flags 0x[0-9a-f]+, "
                         r"refcount 1, owner \d+$")
_REVIVED_ITEM = re.compile(r"mbuf_packet (\d+): alloc held by CPU \d+ \(worker place \d+ "
                           r"generation \d+\), type 1, flags 0x([0-9a-f]+), refcount 1, "
                           r"owner (\d+)$")
_DEPOT_HEAD = re.compile(r"check failed: arena '[^']+' is inconsistent:$")
_DEPOT_LINES = (re.compile(r"\s+zone '\w+': depot holds (\d+) items, (\d+) are tagged "
                           r"depot$"),
                re.compile(r"\s+zone '\w+': depot entry \d+ \(tag index \d+\) is not a "
                           r"depot item of this zone$"))


def _unheld_item_bug(line: str) -> str | None:
    if _LIMBO_ITEM.fullmatch(line):
        return "limbo"
    m = _REVIVED_ITEM.fullmatch(line)
    if m and not int(m[2], 16) & 0x2 and m[1] == m[3]:         # M_PKTHDR cleared, own
        return "revived"
    return None


def known_bug(failure: str) -> str | None:
    """The name of the open bug (a key of KNOWN_BUGS; "a+b" for two) that explains
    ``failure`` entirely, or None."""
    head, *rest = failure.split(": ", 1)[-1].splitlines() or [""]
    m = _USED_HEAD.search(head)
    if m and rest and len(rest) == int(m[1]) - int(m[2]):
        bugs = {_unheld_item_bug(x) for x in rest}
        if None not in bugs:
            return "+".join(sorted(bugs))
    if _DEPOT_HEAD.search(head) and rest and all(
            any(p.fullmatch(x) for p in _DEPOT_LINES) for x in rest):
        return "depot"
    return None


# ============================================================================ report
def report_lines(res: dict) -> list[str]:
    """The final report of a run, as lines."""
    out = [f"\n{'ROUND':>5} {'WORKLOAD':<9} {'DEATHS':>6} {'RANDOM':>6} {'KILLPT':>6} "
           f"{'MGR':>3} {'RECOV':>5} {'REPAIR':>6} {'LOST':>4} {'CHECK':>5} {'HOLD S':>6} "
           f"{'WAIT S':>6} {'RECOV S':>7} {'ADOPT S':>7} {'STALL S':>7} {'SECONDS':>7}"]
    for r in res["rounds"]:
        out.append(f"{r['round'] + 1:>5} {r['workload']:<9} {r['deaths']:>6} "
                   f"{r['random_kills']:>6} {r['killpoint_kills']:>6} {r['manager_kills']:>3} "
                   f"{r['recoveries']:>5} {r['lock_repairs']:>6} {r['items_lost']:>4} "
                   f"{ {True: 'ok', False: 'FAIL', None: '-'}[r['check_ok']]:>5} "
                   f"{r['max_lock_hold']:>6.2f} "
                   f"{r['max_lock_wait']:>6.2f} {r['max_recovery_wait']:>7.2f} "
                   f"{r['max_adoption']:>7.2f} {r['max_stall']:>7.2f} {r['seconds']:>7.1f}")
    out += [
        "",
        f"kills: {res['deaths']} workers died ({res['random_kills']} SIGKILLed at random "
        f"moments, {res['random_kills_at_work']} of them picked at work; "
        f"{res['killpoint_kills']} at kill points); keg manager SIGKILLed "
        f"{res['manager_kills']} times, adopted {res['adoptions']} times",
        f"recoveries: {res['recoveries']} dead CPUs recovered, {res['lock_repairs']} locks "
        f"repaired; longest wait for a recovery {res['max_recovery_wait']:.2f} s, longest "
        f"adoption {res['max_adoption']:.2f} s",
        f"locks: longest hold seen {res['max_lock_hold']:.2f} s, longest wait recorded "
        f"{res['max_lock_wait']:.2f} s (limit {res['lock_limit']:g} s)",
        f"progress: longest stretch of a worker without progress {res['max_stall']:.2f} s "
        f"(limit {res['stall_limit']:g} s)",
        f"items lost: {res['items_lost']}",
        "check: " + ("not run" if not res["checks"] else
                     f"{'ok' if res['check_ok'] else 'FAILED'} ({res['checks']} run: each "
                     f"round's after the count and after the workers closed)"),
        "OS objects left: " + (", ".join(res["os_objects_left"]) or "none"),
        f"time: {res['seconds']:g} s, seed {res['seed']}",
    ]
    for f in res["failures"]:
        bug = known_bug(f)
        out.append(f"FAILURE{f' (known open bug {bug!r})' if bug else ''}: {f}")
    out.append(("ok" if res["ok"] else "FAILED") + f" (seed {res['seed']})")
    return out

