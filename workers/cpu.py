"""The worker runtime: one process playing one CPU of an arena.

A fleet (``launcher.Fleet``) starts each worker with ``cpu_main(spec, team,
results)``.  The worker attaches to the arena as a new CPU, writes its CPU id
into the team's table (that is how the others address it: the ring of a
pipeline is the table in worker order), and runs its workload in steps, obeying
the phase the supervisor sets in the team:

    RUN    work: the workload's ``step`` (allocate, fill, send, receive, verify, free)
    HOLD   quiesce: send nothing, keep receiving and holding; kill points off
    COUNT  take the last mail, put ``("holdings", index, gen, what it holds)`` on
           ``results``, then stand still (the supervisor counts the arena)
    STOP   free everything held (checking it), close the CPU, report, exit

A worker acknowledges a phase in its row (``ack``) once it is in it, so the
supervisor knows when every worker has stopped sending.  Its counters (ops, mail
sent and received, packets dropped ...) go to its row of shared counters every
``PUBLISH_SECONDS``; the supervisor sums the rows (and those of dead workers,
folded into ``retired``) for its progress line, and producers read the sums to
bound what they have in flight.

A worker ends with one ``("final", result)`` on ``results``: index, generation,
pid, cpu, seed and either counts and the CPU's published ``CpuStats``, or an
error (a traceback).  A worker whose supervisor died stops by itself.

``worker_main`` is the older fixed-length churn worker (``churn`` for ``seconds``),
kept for callers that run one without a fleet.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
import traceback
from dataclasses import dataclass, field

from shmalloc import Arena, debug

from .workloads import WORKLOADS, churn

RUN, HOLD, COUNT, STOP = range(4)
PHASES = ("run", "hold", "count", "stop")
PUBLISH_SECONDS = 0.02
PARENT_CHECK_SECONDS = 0.5

# one row of shared counters per worker (and one more for the retired ones)
FIELDS = ("ops", "msgs_sent", "items_sent", "items_received", "mbox_full", "cpu_gone",
          "made", "done", "dropped", "free_retries", "bad_mail", "ack", "pid", "gen")
F = {name: i for i, name in enumerate(FIELDS)}
NF = len(FIELDS)
COUNTERS = FIELDS[:FIELDS.index("ack")]           # summed over rows; the rest are states


class Team:
    """What a fleet's processes share: CPU ids by worker index, the phase, and a
    row of counters per worker.  Made by the supervisor from a multiprocessing
    context and handed to each worker when it is started."""

    def __init__(self, ctx, n: int):
        self.n = n
        self.cpus = ctx.RawArray("q", [-1] * n)          # CPU id of worker i, -1: none
        self.rows = ctx.RawArray("q", n * NF)
        self.retired = ctx.RawArray("q", NF)             # counters of dead workers
        self.phase = ctx.RawValue("q", RUN)

    def get(self, index: int, name: str) -> int:
        return self.rows[index * NF + F[name]]

    def set(self, index: int, name: str, value: int) -> None:
        self.rows[index * NF + F[name]] = value

    def total(self, name: str) -> int:
        """``name`` summed over the live rows and the retired ones."""
        i = F[name]
        return self.retired[i] + sum(self.rows[r * NF + i] for r in range(self.n))

    def retire(self, index: int) -> None:
        """Worker ``index`` is gone: fold its counters into ``retired``, clear its row."""
        base = index * NF
        for name in COUNTERS:
            self.retired[F[name]] += self.rows[base + F[name]]
        for i in range(NF):
            self.rows[base + i] = 0
        self.cpus[index] = -1

    def next_cpu(self, index: int) -> int:
        """The CPU after worker ``index`` in the ring (worker order, skipping empty
        places), or -1 when it is alone."""
        for k in range(1, self.n):
            cpu = self.cpus[(index + k) % self.n]
            if cpu >= 0:
                return cpu
        return -1

    def other_cpus(self, index: int) -> list[int]:
        return [c for i, c in enumerate(self.cpus) if i != index and c >= 0]


@dataclass
class WorkerSpec:
    """What one worker runs: arena, place in the team, generation (how many
    workers held this place before), workload and its options, seed."""
    arena: str
    index: int
    gen: int
    workload: str
    seed: int
    options: dict = field(default_factory=dict)


def cpu_main(spec: WorkerSpec, team: Team, results) -> None:
    """Run one worker (the target of a spawned process); see the module docstring."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # kill -USR1: where is it?
    result = {"index": spec.index, "gen": spec.gen, "pid": os.getpid(), "seed": spec.seed,
              "workload": spec.workload}
    arena = work = None
    try:
        arena = Arena.attach(spec.arena)
        result["cpu"] = arena.cpu_id
        work = WORKLOADS[spec.workload](arena, team, spec.index, spec.seed, **spec.options)
        team.set(spec.index, "pid", os.getpid())
        team.set(spec.index, "gen", spec.gen)
        team.cpus[spec.index] = arena.cpu_id
        started = time.monotonic()
        _run(work, team, spec, results)
        result["counts"] = work.finish()
        result["counts"]["seconds"] = time.monotonic() - started
        _publish(work, team, spec.index)
        result["stats"] = next(s for s in arena.cpu_stats() if s.cpu == arena.cpu_id)
        result["mail"] = {"bad": arena._mail.bad, "received": arena._mail.received}
    except KeyboardInterrupt:
        result["error"] = "interrupted"
    except BaseException:  # noqa: BLE001 - reported to the supervisor, which prints it
        result["error"] = traceback.format_exc()
        if work is not None:
            work.abandon()
    finally:
        if arena is not None:
            try:
                arena.close()
            except Exception:  # noqa: BLE001 - the manager recovers what close left
                result.setdefault("error", traceback.format_exc())
    results.put(("final", result))
    if "error" in result:
        raise SystemExit(1)


def _run(work, team: Team, spec: WorkerSpec, results) -> None:
    """Step the workload through the phases until STOP."""
    index = spec.index
    parent = os.getppid()
    next_publish = next_parent_check = 0.0
    counted = False
    while True:
        phase = team.phase.value
        if phase == RUN:
            counted = False
            work.step()
        elif phase == STOP:
            debug.KILLPOINTS.clear()                 # finishing is not part of the run
            work.hold(last=True)                     # the last mail (nobody sends now)
            break
        else:
            debug.KILLPOINTS.clear()                 # kill points are for the run
            if phase == HOLD:
                work.hold()
            elif not counted:                        # COUNT: nobody sends any more
                work.hold(last=True)
                _publish(work, team, index)
                results.put(("holdings", index, spec.gen, work.holdings()))
                counted = True
            else:
                time.sleep(0.005)                    # stand still while counted
        team.set(index, "ack", phase)
        now = time.monotonic()
        if now >= next_publish:
            next_publish = now + PUBLISH_SECONDS
            _publish(work, team, index)
        if now >= next_parent_check:
            next_parent_check = now + PARENT_CHECK_SECONDS
            if os.getppid() != parent:
                raise RuntimeError("the supervisor is gone")


def _publish(work, team: Team, index: int) -> None:
    base = index * NF
    rows = team.rows
    for name, value in work.counts.items():
        i = F.get(name)
        if i is not None:
            rows[base + i] = value
    rows[base + F["bad_mail"]] = work.arena._mail.bad


def worker_main(arena_name, zone_names, seed, seconds, result_queue, progress_value=None):
    """Attach to ``arena_name`` as a new CPU, churn ``zone_names`` for ``seconds``, close.

    Every item is freed before the CPU closes (close gives its cache back). Puts one dict
    on ``result_queue``: pid, seed, cpu, and either counts (from ``churn``) and stats (this
    CPU's ``CpuStats``, published) or error (a traceback). ``progress_value`` (a shared
    ``'q'`` value, or None) is set to the ops done so far, every ~1000 ops. Exits with
    status 1 after an error.
    """
    def progress(ops):
        progress_value.value = ops

    result = {"pid": os.getpid(), "seed": seed}
    try:
        with Arena.attach(arena_name) as arena:
            result["cpu"] = arena.cpu_id
            result["counts"] = churn(arena, zone_names, seed, time.monotonic() + seconds,
                                     progress if progress_value is not None else None)
            result["stats"] = next(s for s in arena.cpu_stats() if s.cpu == arena.cpu_id)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
    except Exception:  # noqa: BLE001 - reported to the launcher, which prints it
        result["error"] = traceback.format_exc()
    result_queue.put(result)
    if "error" in result:
        raise SystemExit(1)
