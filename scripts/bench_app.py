"""Where applications meet shmalloc, against the peers they would use instead, for
``shmalloc bench`` (section ``app``; issue 13).  Every peer is measured in the same
run, in interleaved rounds (a change of load hits both sides alike); best of
``repeat`` rounds.

    alloc     ``arena.alloc(n)`` + ``close()`` at n = 2 KiB, 64 KiB, 1 MiB and 64 MiB
              (one arena of ALLOC_ARENA bytes), against
              ``SharedMemory(create=True, size=n)`` + ``close()`` + ``unlink()`` (the
              stdlib's default: tracked by the resource tracker)
    pickle    Buffers of PICKLE_SIZE through ``pickle.dumps`` in this process, each
              once per round (as ``Pool.map`` pickles a list of arrays), then
              ``pickle.loads`` + ``close()`` in another (a forked child with its own
              attachment, the pickles sent to it through a pipe: the cost a Pool
              task pays for an argument), against ``SharedMemory`` segments passed
              by name the same way (dumps; loads attaches one; close)
    pool      ``ProcessPoolExecutor(2).map`` over POOL_ARRAYS numpy arrays of
              POOL_BYTES each, the workers reading every element (``a.sum()``): the
              arrays pickled (the default), in ``SharedMemory`` segments passed by
              name, and made in the arena (``arena.ndarray``: pickled as references);
              end to end (submit to the last result), the arrays made and filled
              beforehand, one pool for all three
    handoff   2 KiB items through the plain per-item API: the producer takes each
              item with ``zone.alloc(M_WAITOK)``, writes it, and ``send``\\ s a batch
              of PLAIN_BATCH; the consumer ``recv``\\ s, reads each item and frees it
              with ``zone.free``; a zone limit of PLAIN_LIMIT items and the default
              bucket; against ``mp.Queue`` and ``mp.Pipe`` (``bench_handoff``'s)
    pair      the cache-hit pair ``zone.free(zone.alloc())`` (2 KiB zone) against
              ``multiprocessing.heap.BufferWrapper(2048)`` create and drop

``run(quick, repeat, name)`` returns a dict of sections, each with its rows' figures.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import timeit

from shmalloc import M_WAITOK, Arena

from . import bench_handoff

ALLOC_SIZES = (2048, 64 << 10, 1 << 20, 64 << 20)
ALLOC_SIZES_QUICK = (2048, 64 << 10, 1 << 20)
ALLOC_ARENA = 1 << 30
ALLOC_ARENA_QUICK = 32 << 20
PICKLE_SIZE = 64 << 10
POOL_ARRAYS, POOL_BYTES = 64, 8 << 20
POOL_QUICK = (4, 256 << 10)
PLAIN_BATCH = 64
PLAIN_LIMIT = 256
PLAIN_SIZE = 2048
COUNTS = {                      # full, quick
    "alloc_small": (20_000, 300),
    "alloc_large": (5_000, 100),
    "shm": (500, 30),
    "pickle": (1_000, 50),
    "plain": (100_000, 3_000),
    "pair": (200_000, 2_000),
    "heap": (20_000, 500),
}
CTX = mp.get_context("fork")
DEADLINE = 120.0

TARGET_ALLOC_US = 3.0
TARGET_ALLOC_VS_SHM = 10.0
TARGET_PICKLE_US = 8.0
TARGET_PICKLE_VS_SHM = 3.0
TARGET_POOL_VS_PICKLE = 5.0
TARGET_POOL_VS_SHM = 1.5
TARGET_PLAIN_VS_QUEUE = 5.0
TARGET_PAIR_US = 0.30
TARGET_PAIR_VS_HEAP = 20.0


def _rounds(stmts: dict, number: dict, repeat: int) -> dict:
    """Best µs per run of each statement (name -> (stmt, names)), timed with
    ``timeit`` (no call around the statement; ``names`` bound as locals) in
    interleaved rounds."""
    timers = {k: timeit.Timer(stmt, "; ".join(f"{x} = _g[{x!r}]" for x in g) or "pass",
                              globals={"_g": g})
              for k, (stmt, g) in stmts.items()}
    for k, t in timers.items():
        t.timeit(max(1, number[k] // 10))                   # warm up
    best = {k: float("inf") for k in timers}
    for _ in range(repeat):
        for k, t in timers.items():
            best[k] = min(best[k], t.timeit(number[k]) / number[k] * 1e6)
    return best


def run(quick: bool = False, repeat: int = 3, name: str = "bench") -> dict:
    q = 1 if quick else 0
    n = {k: v[q] for k, v in COUNTS.items()}
    _start_resource_tracker()
    out = {"alloc": alloc_close(quick, repeat, f"{name}.aa", n),
           "pickle": pickle_round_trip(repeat, f"{name}.ap", n["pickle"])}
    out["pool"] = pool_map(quick, repeat, f"{name}.apm")
    out["handoff"] = handoff_plain(n["plain"], repeat, f"{name}.ah", quick)
    out["pair"] = pair(repeat, f"{name}.app", n)
    return out


def _start_resource_tracker() -> None:
    """Start the stdlib's resource tracker (a process of its own, which
    SharedMemory talks to) and let it settle, so that its start-up is timed in no
    row: neither the peer's first segment nor shmalloc's rounds beside it."""
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    time.sleep(0.3)


# ============================================================================ alloc + close
def alloc_close(quick: bool, repeat: int, name: str, n: dict) -> list[dict]:
    """Per size: µs of ``arena.alloc(n)`` + ``close()`` and of a SharedMemory segment."""
    from multiprocessing.shared_memory import SharedMemory
    sizes = ALLOC_SIZES_QUICK if quick else ALLOC_SIZES
    arena = Arena.create(name, ALLOC_ARENA_QUICK if quick else ALLOC_ARENA)
    rows = []
    try:
        for size in sizes:
            g = {"al": arena.alloc, "n": size, "SM": SharedMemory}
            count = n["alloc_small"] if size <= 64 << 10 else n["alloc_large"]
            best = _rounds({"shmalloc": ("al(n).close()", g),
                            "shm": ("s = SM(create=True, size=n); s.close(); s.unlink()", g)},
                           {"shmalloc": count, "shm": n["shm"]}, repeat)
            rows.append({"size": size, "us": best["shmalloc"], "shm_us": best["shm"]})
    finally:
        arena.destroy()
    return rows


# ============================================================================ pickle
def _load_close_child(conn):
    """In a forked child: receive rounds of pickles through ``conn`` (bytes made in
    this process, as a Pool worker's arguments are), load and close each, and
    answer the µs per pickle.  The first pickle of a round is loaded and closed
    untimed (the first load attaches the arena, or maps the segment's module)."""
    try:
        while True:
            pickles = conn.recv()
            if pickles is None:
                return
            pickle.loads(pickles[0]).close()
            t0 = time.perf_counter()
            for p in pickles[1:]:
                pickle.loads(p).close()
            conn.send(("ok", (time.perf_counter() - t0) / (len(pickles) - 1) * 1e6))
    except BaseException as e:                           # noqa: BLE001 (reported)
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _in_child(conn, pickles) -> float:
    conn.send(pickles)
    if not conn.poll(DEADLINE):
        raise RuntimeError(f"pickle child silent for {DEADLINE:g} s")
    kind, val = conn.recv()
    if kind != "ok":
        raise RuntimeError(f"pickle child failed: {val}")
    return val


def pickle_round_trip(repeat: int, name: str, count: int) -> dict:
    """µs per reference: dumps here + loads and close in a forked child (one child
    for every round, started before them), for ``count`` Buffers of PICKLE_SIZE
    each pickled once per round (as ``Pool.map`` pickles a list of arrays), and for
    as many SharedMemory segments passed by name."""
    from multiprocessing.shared_memory import SharedMemory
    arena = Arena.create(name, max(64 << 20, 2 * (count + 1) * PICKLE_SIZE))
    segs = []
    best = {"shmalloc": (float("inf"), 0, 0), "shm": (float("inf"), 0, 0)}
    conn, child_end = CTX.Pipe()
    child = CTX.Process(target=_load_close_child, args=(child_end,), daemon=True)
    try:
        bufs = [arena.alloc(PICKLE_SIZE) for _ in range(count + 1)]
        segs = [SharedMemory(create=True, size=PICKLE_SIZE) for _ in range(count + 1)]
        child.start()
        child_end.close()
        dumps = pickle.dumps
        for _ in range(repeat):
            for kind, objs in (("shmalloc", bufs), ("shm", segs)):
                t0 = time.perf_counter()
                pickles = [dumps(obj) for obj in objs]
                dump_us = (time.perf_counter() - t0) / len(objs) * 1e6
                load_us = _in_child(conn, pickles)
                if dump_us + load_us < best[kind][0]:
                    best[kind] = (dump_us + load_us, dump_us, load_us)
        conn.send(None)
        child.join(DEADLINE)
        for b in bufs:
            b.close()
        arena.check()
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
        conn.close()
        for s in segs:
            s.close()
            s.unlink()
        arena.destroy()
    return {"us": best["shmalloc"][0], "dump_us": best["shmalloc"][1],
            "load_close_us": best["shmalloc"][2], "shm_us": best["shm"][0],
            "shm_dump_us": best["shm"][1], "shm_load_close_us": best["shm"][2],
            "size": PICKLE_SIZE, "n": count}


# ============================================================================ pool
def _read_array(a) -> float:
    """A pool task: read every element."""
    return float(a.sum())


def _read_shm(args) -> float:
    """A pool task: attach a SharedMemory segment by name, read it, close it."""
    import numpy as np
    from multiprocessing.shared_memory import SharedMemory
    name, count = args
    s = SharedMemory(name=name)
    try:
        a = np.ndarray((count,), np.float64, buffer=s.buf)
        total = float(a.sum())
        del a
    finally:
        s.close()
    return total


def _warm(_):
    return os.getpid()


def pool_map(quick: bool, repeat: int, name: str) -> dict | None:
    """Seconds of ``ProcessPoolExecutor.map`` over the arrays in each setup (best of
    ``repeat`` interleaved rounds); None without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.shared_memory import SharedMemory
    n_arrays, nbytes = POOL_QUICK if quick else (POOL_ARRAYS, POOL_BYTES)
    count = nbytes // 8
    arena = Arena.create(name, max(64 << 20, 2 * n_arrays * nbytes + (32 << 20)))
    segs = []
    try:
        plain = [np.full(count, float(i)) for i in range(n_arrays)]
        in_arena = []
        for i in range(n_arrays):
            a = arena.ndarray(count, np.float64)
            a[:] = float(i)
            in_arena.append(a)
        for i in range(n_arrays):
            s = SharedMemory(create=True, size=nbytes)
            np.ndarray((count,), np.float64, buffer=s.buf)[:] = float(i)
            segs.append(s)
        shm_args = [(s.name, count) for s in segs]
        want = [float(i) * count for i in range(n_arrays)]
        setups = {"pickle": (_read_array, plain), "shm": (_read_shm, shm_args),
                  "shmalloc": (_read_array, in_arena)}
        best = {k: float("inf") for k in setups}
        with ProcessPoolExecutor(max_workers=2, mp_context=CTX) as ex:
            list(ex.map(_warm, range(8)))
            list(ex.map(_read_array, in_arena[:2]))          # the workers attach the arena
            for _ in range(repeat):
                for k, (fn, args) in setups.items():
                    t0 = time.perf_counter()
                    got = list(ex.map(fn, args, timeout=DEADLINE))
                    best[k] = min(best[k], time.perf_counter() - t0)
                    if got != want:
                        raise RuntimeError(f"pool {k}: wrong sums")
        del in_arena, a
        arena.check()
    finally:
        for s in segs:
            s.close()
            s.unlink()
        arena.destroy()
    return {"arrays": n_arrays, "bytes": nbytes, "seconds": best}


# ============================================================================ hand-off, per item
def _plain_producer(arena, zone, payload, dest, batch_max):
    alloc, view, send, poll = zone.alloc, zone.view, arena.send, arena.poll

    def post(batch):
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                send(dest[0], batch)
                return
            except bench_handoff.MailboxFullError:
                if time.monotonic() > deadline:
                    raise
                poll()
                time.sleep(50e-6)

    def produce(k):
        batch = []
        for _ in range(k):
            h = alloc(M_WAITOK, DEADLINE)
            view(h)[:] = payload
            batch.append(h)
            if len(batch) == batch_max:
                post(batch)
                batch = []
        if batch:
            post(batch)
    return produce


def _plain_consumer(arena_name, n_warm, n, check, ack):
    size, first, last = check
    end = size - 1
    bad = 0
    arena = Arena.attach(arena_name)
    try:
        zone = arena.zone(bench_handoff.ZONE)
        ack.send(arena.cpu_id)
        view, free, recv = zone.view, zone.free, arena.recv
        deadline = time.monotonic() + DEADLINE
        for phase in (n_warm, n):
            got = 0
            while got < phase:
                hs = recv(1.0)
                for h in hs:
                    m = view(h)
                    if len(m) != size or m[0] != first or m[end] != last:
                        bad += 1
                    free(h)
                got += len(hs)
                if not hs and time.monotonic() > deadline:
                    raise bench_handoff.HandoffError("consumer: nothing received")
            ack.send((time.perf_counter(), bad))
        arena.poll()
    finally:
        arena.close()


def _plain_shmalloc(payload, n, n_warm, arena_name):
    arena = Arena.create(arena_name, 32 << 20)
    try:
        zone = arena.zcreate(bench_handoff.ZONE, len(payload), max_items=PLAIN_LIMIT)
        dest = []
        produce = _plain_producer(arena, zone, payload, dest, PLAIN_BATCH)
        dt = bench_handoff._timed(produce, _plain_consumer,
                                  (arena_name, n_warm, n, (len(payload), payload[0],
                                                           payload[-1])),
                                  n_warm, n, on_ready=dest.append)
        arena.poll()
        arena.check()
        return dt, zone.bucket_size
    finally:
        arena.destroy()


def handoff_plain(n: int, repeat: int, name: str, quick: bool) -> dict:
    """Items/s of the per-item hand-off and of mp.Queue and mp.Pipe (interleaved rounds)."""
    n_warm = bench_handoff.WARMUP[1 if quick else 0]
    runs = {"shmalloc": [], "mp.Queue": [], "mp.Pipe": []}
    bucket = None
    for i in range(repeat):
        payload = os.urandom(PLAIN_SIZE)
        dt, bucket = _plain_shmalloc(payload, n, n_warm, f"{name}{i}")
        runs["shmalloc"].append(dt)
        for kind in ("mp.Queue", "mp.Pipe"):
            runs[kind].append(bench_handoff._run_one(kind, PLAIN_SIZE, n, n_warm, f"{name}{i}q"))
    return {"size": PLAIN_SIZE, "n": n, "batch": PLAIN_BATCH, "limit": PLAIN_LIMIT,
            "bucket": bucket, "runs": runs,
            "items_per_s": {k: n / min(v) for k, v in runs.items()}}


# ============================================================================ pair
def pair(repeat: int, name: str, n: dict) -> dict:
    from multiprocessing.heap import BufferWrapper
    arena = Arena.create(name, 32 << 20)
    try:
        zone = arena.zcreate("pair", 2048)
        g = {"al": zone.alloc, "fr": zone.free, "BW": BufferWrapper}
        best = _rounds({"pair": ("fr(al())", g), "heap": ("BW(2048)", g)},
                       {"pair": n["pair"], "heap": n["heap"]}, repeat)
    finally:
        arena.destroy()
    return {"us": best["pair"], "heap_us": best["heap"]}
