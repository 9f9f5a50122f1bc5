"""The soak run behind ``scripts/soak.py``: N workers churn (``workloads.Churn``,
stamping and checking every item, without bursts) until a total number of operations
is reached while the parent samples, every ``interval`` seconds, each worker's RSS and
the arena's usage.  Flat lines mean no leak."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import secrets
import time
from dataclasses import dataclass, field

import psutil

from shmalloc import Arena

from .workloads import Churn

SIZES = (256, 2048, 9216)
WORKING_SET = 128           # live items a worker keeps at most, per zone
STEP_OPS = 256              # operations between progress reports
JOIN_TIMEOUT = 60.0


@dataclass
class Sample:
    t: float
    ops: int
    rss_mb: list
    free_pages: int
    items: int


@dataclass
class SoakResult:
    name: str
    seed: int
    ops: int
    seconds: float
    samples: list = field(default_factory=list)


def _worker(name, seed, quota, progress, stop):
    a = Arena.attach(name)
    churn = Churn(a, None, 0, seed, [f"soak{s}" for s in SIZES], working_set=WORKING_SET,
                  bursts=False)
    try:
        ops = 0
        while ops < quota and not stop.is_set():
            churn.run(STEP_OPS)
            ops = churn.counts["ops"] + churn.counts["failures"]    # allocs that got nothing too
            progress.value = ops
        churn.finish()
    except BaseException:
        churn.abandon()
        raise
    finally:
        a.close()


def soak(workers=2, ops=10_000_000, interval=1.0, size=64 << 20, seed=None, on_sample=None):
    seed = random.randrange(1 << 31) if seed is None else seed
    name = f"soak{os.getpid()}{secrets.token_hex(3)}"
    ctx = mp.get_context("spawn")
    result = SoakResult(name, seed, 0, 0.0)
    with Arena.create(name, size) as arena:
        for s in SIZES:
            arena.zcreate(f"soak{s}", s)
        progress = [ctx.RawValue("q", 0) for _ in range(workers)]
        stop = ctx.Event()
        quota = -(-ops // workers)
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(name, seed + i, quota, progress[i], stop))
                 for i in range(workers)]
        for p in procs:
            p.start()
        t0 = time.monotonic()
        try:
            while True:
                time.sleep(interval)
                if not any(p.is_alive() for p in procs):
                    break
                rss = []
                for p in procs:
                    try:
                        rss.append(round(psutil.Process(p.pid).memory_info().rss / 2**20, 1))
                    except psutil.Error:
                        rss.append(0.0)
                st = arena.stats()
                sample = Sample(round(time.monotonic() - t0, 2),
                                sum(v.value for v in progress), rss, st.free_pages,
                                sum(z.items for z in st.zones))
                result.samples.append(sample)
                if on_sample is not None:
                    on_sample(sample)
        finally:
            stop.set()
            for p in procs:
                p.join(JOIN_TIMEOUT)
                if p.is_alive():
                    p.kill()
            arena.check()
        result.ops = sum(v.value for v in progress)
        result.seconds = time.monotonic() - t0
    return result
