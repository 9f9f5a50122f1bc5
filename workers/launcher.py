"""Start N worker CPUs on a private arena, watch them, report, and always clean up.

``launch`` creates an arena under a fresh name, creates the churn zones, spawns N workers
(``cpu.worker_main``), prints a live progress line while they run, then reports per CPU,
per zone and per lock, prints ``vmstat -z``, runs ``check`` and destroys the arena: in a
``finally``, so no OS object outlives a failed worker or a Ctrl-C.
"""

import functools
import multiprocessing as mp
import os
import queue
import random
import secrets
import sys
import textwrap
import time

from shmalloc import Arena, CorruptionError

from .cpu import worker_main

ZONE_SIZES = (256, 2048, 9216)
START_GRACE = 30.0      # seconds allowed past the run for workers to start, close and report
JOIN_TIMEOUT = 10.0     # seconds a worker that reported may take to exit


def launch(n=4, seconds=5.0, size=64 << 20, seed=None, name=None, out=sys.stdout, live=True):
    """Run ``n`` worker CPUs for ``seconds`` on a new arena of ``size`` bytes; report to ``out``.

    ``seed`` (random if None) seeds worker i with ``seed + i``. ``name`` defaults to a unique
    ``launch<pid><hex>``. ``live`` prints a progress line (redrawn ~4 times a second on a
    TTY, else one line a second). Returns a summary dict: name, seed, cpus, seconds, ops,
    ops_per_s, check_ok, errors (one text per failed worker), ok.
    """
    if n < 1:
        raise ValueError(f"need at least one worker, not {n}")
    seed = random.randrange(1 << 32) if seed is None else seed
    name = name or f"launch{os.getpid()}{secrets.token_hex(4)}"
    say = functools.partial(print, file=out, flush=True)
    say(f"shmalloc launch: arena {name}, {n} CPUs, {seconds:g} s, {size} bytes, seed {seed}")
    arena = Arena.create(name, size)
    procs = []
    try:
        zones = [arena.zcreate(f"churn{s}", s).name for s in ZONE_SIZES]
        ctx = mp.get_context("spawn")
        results_q = ctx.Queue()
        progress = [ctx.RawValue("q", 0) for _ in range(n)]
        procs = [ctx.Process(target=worker_main, name=f"shmalloc-cpu{i}", daemon=True,
                             args=(name, zones, seed + i, seconds, results_q, progress[i]))
                 for i in range(n)]
        for p in procs:
            p.start()
        results = _collect(procs, results_q, progress, seconds, out if live else None)
        errors = _reap(procs, results)
        summary = _report(arena, results, say)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        arena.destroy()
    for e in errors:
        say("error: " + e)
    summary.update(name=name, seed=seed, cpus=n, seconds=seconds, errors=errors,
                   ok=summary["check_ok"] and not errors)
    return summary


def _collect(procs, results_q, progress, seconds, out):
    """The workers' results by pid, gathered until all reported, all exited or time ran out.

    Prints the live line to ``out`` unless it is None.
    """
    tty = out is not None and out.isatty()
    interval = 0.25 if tty else 1.0
    results = {}
    started = last_t = time.monotonic()
    deadline = started + seconds + START_GRACE
    last_ops = 0
    due = started + interval
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            r = results_q.get(timeout=max(0.0, due - time.monotonic()))
            results[r["pid"]] = r
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results_q.empty():
                break
        now = time.monotonic()
        if now < due:
            continue
        due = now + interval
        if out is not None:
            ops = [v.value for v in progress]
            rate = (sum(ops) - last_ops) / (now - last_t)
            last_t, last_ops = now, sum(ops)
            line = (f"{now - started:5.1f} s {rate:12,.0f} ops/s   per CPU: "
                    + " ".join(f"{o:,}" for o in ops))
            out.write("\r" + line if tty else line + "\n")
            out.flush()
    if tty:
        out.write("\n")
    return results


def _reap(procs, results):
    """Join the workers (killing stragglers); a text per worker that did not succeed."""
    errors = []
    for i, p in enumerate(procs):
        p.join(JOIN_TIMEOUT if p.pid in results else 0.5)
        who = f"worker {i} (pid {p.pid})"
        if p.is_alive():
            p.kill()
            p.join()
            errors.append(f"{who} did not finish in time: killed")
        elif p.pid not in results:
            errors.append(f"{who} exited with status {p.exitcode} without a report")
        elif "error" in results[p.pid]:
            errors.append(f"{who} failed:\n" + textwrap.indent(results[p.pid]["error"], "    "))
    return errors


def _report(arena, results, say):
    """Print the per-CPU, per-zone and per-lock tables, vmstat -z and check; return totals."""
    done = sorted((r for r in results.values() if "stats" in r), key=lambda r: r["cpu"])
    say(f"\n{'CPU':>3} {'PID':>8} {'OPS':>11} {'OPS/S':>11} {'HIT%':>6} "
        f"{'DEPOT GETS':>10} {'DEPOT PUTS':>10} {'KEG IMPORTS':>11}")
    ops = rate = 0
    for r in done:
        s, c = r["stats"], r["counts"]
        ops += c["ops"]
        rate += c["ops"] / c["seconds"]
        say(f"{s.cpu:>3} {s.pid:>8} {c['ops']:>11,} {c['ops'] / c['seconds']:>11,.0f} "
            f"{100 * s.hit_ratio:>6.2f} {s.depot_gets:>10,} {s.depot_puts:>10,} "
            f"{s.keg_imports:>11,}")
    say(f"{'all':>3} {'':>8} {ops:>11,} {rate:>11,.0f}")

    say(f"\n{'ZONE':<12} {'SIZE':>6} {'BUCKET':>6} {'USED':>6} {'CACHE':>6} {'DEPOT':>6} "
        f"{'KEG':>6} {'REQ':>11} {'FAIL':>6} {'XFREE':>6} {'DEPOT GET/PUT':>15} {'PAGES':>6}")
    for z in arena.stats().zones:
        say(f"{z.name:<12} {z.size:>6} {z.bucket_size:>6} {z.used:>6} {z.free_cache:>6} "
            f"{z.free_depot:>6} {z.free_keg:>6} {z.requests:>11,} {z.failures:>6} "
            f"{z.xfree:>6} {f'{z.depot_gets:,}/{z.depot_puts:,}':>15} {z.pages:>6}")

    say(f"\n{'LOCK':<16} {'ACQUISITIONS':>12} {'CONTENDED':>9} {'MEAN WAIT':>10} "
        f"{'MAX WAIT':>10}")
    for lk in arena.lock_stats():
        say(f"{lk.name:<16} {lk.acquisitions:>12,} {100 * lk.contended_share:>8.2f}% "
            f"{lk.mean_wait_us:>8.1f}us {lk.max_wait_ns / 1e3:>8.1f}us")

    say("\n" + arena.vmstat_z())
    try:
        arena.check()
        check_ok = True
        say("check: ok")
    except CorruptionError as e:
        check_ok = False
        say(f"check: FAILED\n{e}")
    return {"ops": ops, "ops_per_s": rate, "check_ok": check_ok}
