"""The lock-contention stress sweep behind ``shmalloc stress``.

One *configuration* = a number of worker CPUs, a bucket size (0: every operation
takes the zone lock; N fixed; "adaptive": UMA's, grown on contention), a workload
and a cross-CPU free mode.  Each configuration gets a fresh arena with one zone,
its workers start together at a barrier, run for ``seconds``, report, and meet
at a second barrier so that the lock counters are read over the timed window
only.  Workloads:

    churn     random alloc/free over a small live set (mostly cache hits):
              ``workloads.Churn`` without bursts or stamps
    bulk      alloc_bulk(32) then free_bulk
    pipeline  allocate batches, hand them to the next CPU of the ring (send);
              free what arrives (recv): every free is a cross-CPU free, so the
              xfree mode decides where items go (home by message, or local)

Each Record carries the lock profile of its timed window (``locks``: LockStats of
every lock, counts since the window opened, as ``shmalloc lockstat -w`` prints them)
and the dimensions DPDK's ``mempool_perf_autotest`` names: workers (its cores),
bucket (its cache size) and bulk (objects per get/put call: BATCH for the bulk
workload, 1 for churn and the pipeline, which allocate and free one item a call).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import time
import traceback
from dataclasses import asdict, dataclass

from shmalloc import M_NOWAIT, Arena, ShmallocError
from shmalloc.mail import CpuGoneError, MailboxFullError
from shmalloc.stats import lock_stats_since

from .workloads import Churn

WORKLOADS = ("churn", "pipeline", "bulk")
XFREE_MODES = ("message", "local")
ITEM_SIZE = 256
ARENA_SIZE = 64 << 20
BATCH = 32
BULK = {"churn": 1, "pipeline": 1, "bulk": BATCH}   # objects per alloc/free call
STEP_OPS = 64               # operations between looks at the clock
CHURN_WORKING_SET = 64      # live items a churn worker keeps at most
JOIN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Record:
    workers: int
    bucket_size: str
    workload: str
    xfree: str
    seconds: float
    ops: int
    ops_per_s: float
    ops_per_s_per_cpu: list
    zone_lock_acquisitions_per_op: float
    keg_lock_acquisitions_per_op: float
    contended_share: float
    mean_wait_us: float
    p99_wait_us: float | None
    miss_rate: float
    depot_ops_per_kop: float
    messages: int
    items_per_message: float
    fallbacks: int
    seed: int
    bulk: int = 1            # objects per alloc/free call (DPDK's n_get_bulk)
    locks: tuple = ()        # LockStats of every lock over the timed window

    def as_dict(self) -> dict:
        return asdict(self)

    def zone_lock(self):
        """The LockStats of the stress zone's lock over the window (None if absent)."""
        return next((s for s in self.locks if s.name == "zone:stress"), None)


def rate_line(r: Record) -> str:
    """DPDK mempool_perf's summary of a configuration: ``workers=W bucket=B bulk=K ops/s=R``."""
    return f"workers={r.workers} bucket={r.bucket_size} bulk={r.bulk} ops/s={r.ops_per_s:.0f}"


def _worker(name, workload, seconds, seed, idx, n, ring, barrier, results, progress):
    try:
        a = Arena.attach(name)
    except BaseException:
        results.put((idx, {"error": traceback.format_exc()}))
        barrier.abort()
        return
    z = a.zone("stress")
    alloc, free = z.alloc, z.free
    churn = None
    if workload == "churn":
        churn = Churn(a, None, idx, seed, ["stress"], working_set=CHURN_WORKING_SET,
                      bursts=False, stamps=False)
    ops = 0
    err = None
    try:
        ring[idx] = a.cpu_id
        barrier.wait(JOIN_TIMEOUT)
        nxt = ring[(idx + 1) % n]
        end = time.monotonic() + seconds
        while True:
            if churn is not None:
                churn.run(STEP_OPS)
                ops = churn.counts["ops"] + churn.counts["failures"]
            else:
                for _ in range(STEP_OPS):
                    if workload == "bulk":
                        hs = z.alloc_bulk(BATCH)
                        if hs:
                            z.free_bulk(hs)
                            ops += 2 * BATCH
                    else:                                       # pipeline
                        hs = [h for h in (alloc(M_NOWAIT) for _ in range(BATCH))
                              if h is not None]
                        ops += len(hs)
                        try:
                            a.send(nxt, hs)
                        except (MailboxFullError, CpuGoneError):
                            z.free_bulk(hs)
                            ops += len(hs)
                        for h in a.recv(timeout=0):
                            free(h)
                            ops += 1
            progress.value = ops
            if time.monotonic() >= end:
                break
        stats = {c.cpu: c for c in a.cpu_stats()}[a.cpu_id]
        report = {"cpu": a.cpu_id, "ops": ops, "stats": asdict(stats)}
    except BaseException:
        err = traceback.format_exc()
        report = {"error": err}
    results.put((idx, report))
    try:
        barrier.wait(JOIN_TIMEOUT)          # the parent reads the lock counters now
    except BaseException:
        pass
    try:
        if churn is not None:
            churn.abandon()
        for h in a.recv(timeout=0.05):
            free(h)
    except ShmallocError:
        pass
    a.close()


def _lock_snapshot(arena):
    return arena.lock_stats()


def run_config(workers: int, bucket: str, workload: str, xfree: str, seconds: float,
               seed: int, on_progress=None, name: str | None = None) -> Record:
    """Run one configuration on a fresh arena (``name``<hex>: default
    stress<pid><hex>); its Record."""
    if workload not in WORKLOADS or xfree not in XFREE_MODES:
        raise ValueError(f"unknown workload {workload!r} or xfree mode {xfree!r}")
    name = f"{name or f'stress{os.getpid()}'}{secrets.token_hex(3)}"
    ctx = mp.get_context("spawn")
    bucket_arg = None if bucket == "adaptive" else int(bucket)
    with Arena.create(name, ARENA_SIZE) as arena:
        arena.zcreate("stress", ITEM_SIZE, bucket_size=bucket_arg, xfree=xfree)
        ring = ctx.RawArray("q", workers)
        progress = [ctx.RawValue("q", 0) for _ in range(workers)]
        barrier = ctx.Barrier(workers + 1)
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(name, workload, seconds, seed + i, i, workers, ring,
                                   barrier, results, progress[i]))
                 for i in range(workers)]
        for p in procs:
            p.start()
        try:
            barrier.wait(JOIN_TIMEOUT)
            before = _lock_snapshot(arena)
            t0 = time.monotonic()
            got = {}
            while len(got) < workers:
                if on_progress is not None:
                    on_progress(time.monotonic() - t0, sum(v.value for v in progress))
                try:
                    idx, rep = results.get(timeout=0.25)
                except Exception:
                    if time.monotonic() - t0 > seconds + JOIN_TIMEOUT:
                        raise TimeoutError(f"stress: workers did not report (seed {seed})")
                    continue
                got[idx] = rep
            after = _lock_snapshot(arena)
            barrier.wait(JOIN_TIMEOUT)
        finally:
            for p in procs:
                p.join(JOIN_TIMEOUT)
                if p.is_alive():
                    p.kill()
                    p.join()
            results.close()
        errors = [r["error"] for r in got.values() if "error" in r]
        if errors:
            raise RuntimeError(f"stress worker failed (seed {seed}):\n" + errors[0])
        arena.check()
    return _record(workers, bucket, workload, xfree, seconds, seed, got, before, after)


def _record(workers, bucket, workload, xfree, seconds, seed, got, before, after) -> Record:
    ops = sum(r["ops"] for r in got.values())
    stats = [r["stats"] for r in got.values()]
    locks = tuple(lock_stats_since(after, before))
    zone = next(s for s in locks if s.name == "zone:stress")
    keg = next(s for s in locks if s.name == "keg:stress")
    acq, cont = zone.acquisitions, zone.contended
    misses = sum(s["depot_gets"] + s["depot_puts"] + s["keg_imports"] for s in stats)
    msgs = sum(s["msgs_sent"] for s in stats)
    items = sum(s["items_sent"] for s in stats)
    per = max(ops, 1)
    return Record(
        workers=workers, bucket_size=str(bucket), workload=workload, xfree=xfree,
        seconds=seconds, ops=ops, ops_per_s=ops / seconds,
        ops_per_s_per_cpu=[round(got[i]["ops"] / seconds) for i in sorted(got)],
        zone_lock_acquisitions_per_op=acq / per,
        keg_lock_acquisitions_per_op=keg.acquisitions / per,
        contended_share=cont / acq if acq else 0.0,
        mean_wait_us=zone.mean_wait_us,
        p99_wait_us=zone.p99_wait_us,
        miss_rate=misses / per,
        depot_ops_per_kop=1000 * sum(s["depot_gets"] + s["depot_puts"] for s in stats) / per,
        messages=msgs, items_per_message=items / msgs if msgs else 0.0,
        fallbacks=sum(s["fallbacks"] for s in stats), seed=seed, bulk=BULK[workload],
        locks=locks)


def sweep(workers, buckets, workloads, xfrees, seconds, seed, on_record=None, on_progress=None,
          name=None):
    """Every configuration of the grid (xfree varies only for the pipeline, the
    one workload whose frees cross CPUs), on arenas whose names start with ``name``;
    the list of Records."""
    out = []
    for workload in workloads:
        modes = xfrees if workload == "pipeline" else xfrees[:1]
        for xfree in modes:
            for bucket in buckets:
                for n in workers:
                    label = f"{n} CPU{'s' if n > 1 else ''} bucket={bucket} {workload} {xfree}"
                    rec = run_config(n, bucket, workload, xfree, seconds, seed,
                                     on_progress=(lambda t, ops, label=label:
                                                  on_progress(label, t, ops))
                                     if on_progress else None, name=name)
                    out.append(rec)
                    if on_record is not None:
                        on_record(rec)
    return out
