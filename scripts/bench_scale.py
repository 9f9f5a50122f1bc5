"""How the cache-hit pair scales, for ``shmalloc bench`` (sections ``growth`` and
``scaling``).

    growth    the alloc+free pair on a cache hit (2 KiB zone) with 1 K, 10 K, 100 K and
              1 M items of the same zone allocated and held beforehand (one arena, the
              population grown between measurements), and in a 64 MiB arena against a
              much larger one (LARGE_ARENAS: the largest that fits in half of the free
              space of /dev/shm; --quick: QUICK_LARGE_ARENA) with 1 K live items
    scaling   two worker processes, each running the pair loop on its own CPU's cache
              for a fixed time, against one: total pairs/s of both over one's; with
              every worker on one zone (the figure), with a zone per worker (no slab
              shared between the workers' items: their tags, written on every
              alloc and free, never share a cache line) and without the allocator
              (a Python list: how far the machine itself scales)

Sizes that do not fit in /dev/shm are skipped, with a note.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import threading
import time
import timeit

from shmalloc import Arena

ITEM = 2048
LIVE = (1_000, 10_000, 100_000, 1_000_000)
QUICK_LIVE = LIVE[:3]
SMALL_ARENA = 64 << 20
LARGE_ARENAS = (8 << 30, 4 << 30, 2 << 30, 1 << 30)
QUICK_LARGE_ARENA = 512 << 20
BULK_CHUNK = 65_536
SHM_DIR = "/dev/shm"
WORKER_SECONDS = (2.0, 0.3)             # full, quick
WORKER_CHUNK = 2_000                    # pairs between clock reads
CTX = mp.get_context("fork")


def shm_free() -> int:
    """Free bytes of /dev/shm (0 if it cannot be read)."""
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return 0


def arena_for(live: int, item: int = ITEM) -> int:
    """An arena size that holds ``live`` items of ``item`` bytes with room to spare
    (slabs waste up to 3 %; tables, depots and mailboxes take a few MiB)."""
    return (int(live * item * 1.05) + (64 << 20) + 0xFFFFF) & ~0xFFFFF


def pair_us(zone, n: int, repeat: int) -> float:
    """Best-of-``repeat`` µs of ``zone.free(zone.alloc())`` over ``n`` iterations."""
    timer = timeit.Timer("fr(al())", globals={"al": zone.alloc, "fr": zone.free})
    timer.timeit(max(1, n // 10))                                    # warm up
    return min(timer.repeat(repeat, n)) / n * 1e6


def hold(zone, held: list, count: int) -> None:
    """Allocate items until ``held`` lists ``count`` of them."""
    while len(held) < count:
        got = zone.alloc_bulk(min(BULK_CHUNK, count - len(held)))
        if got is None:
            raise MemoryError(f"zone {zone.name!r}: no room for {count} live items")
        held.extend(got)


# ------------------------------------------------------------------ growth
def growth(quick: bool, repeat: int, name: str, pair_n: int) -> dict:
    """{"live": [(count, µs)], "arena": [(size, µs)], "notes": [...]}."""
    notes = []
    free = shm_free()
    counts = [c for c in (QUICK_LIVE if quick else LIVE) if arena_for(c) <= free // 2]
    for c in (QUICK_LIVE if quick else LIVE):
        if c not in counts:
            notes.append(f"{c:,} live items skipped: an arena of {arena_for(c) >> 20} MiB "
                         f"does not fit in half of /dev/shm's {free >> 20} MiB free")
    live = []
    if counts:
        arena = Arena.create(f"{name}.live", arena_for(max(counts)))
        try:
            zone = arena.zcreate("pair", ITEM)
            held: list[int] = []
            for c in counts:
                hold(zone, held, c)
                live.append((c, pair_us(zone, pair_n, repeat)))
        finally:
            arena.destroy()
    sizes = [SMALL_ARENA]
    big = QUICK_LARGE_ARENA if quick else next((s for s in LARGE_ARENAS if s <= free // 2), 0)
    if big and big <= free // 2:
        sizes.append(big)
    else:
        notes.append(f"no large arena: /dev/shm has {free >> 20} MiB free")
    if not quick and big and big < LARGE_ARENAS[0]:
        notes.append(f"largest arena {big >> 30} GiB: {LARGE_ARENAS[0] >> 30} GiB does not fit "
                     f"in half of /dev/shm's {free >> 20} MiB free")
    arenas = []
    for i, size in enumerate(sizes):
        arena = Arena.create(f"{name}.size{i}", size)
        try:
            zone = arena.zcreate("pair", ITEM)
            hold(zone, [], LIVE[0])
            arenas.append((size, pair_us(zone, pair_n, repeat)))
        finally:
            arena.destroy()
    return {"live": live, "arena": arenas, "notes": notes}


# ------------------------------------------------------------------ 2 workers vs 1
def scaling(quick: bool, repeat: int, name: str) -> dict:
    """Pairs/s of 1 and of 2 worker processes, best of ``repeat`` each, in three setups:
    "zone" (every worker on one 2 KiB zone: the target), "own_zone" (a zone each, so
    no two workers' items share a slab) and "floor" (no allocator: ``lst.append(
    lst.pop())``, how the machine itself scales).  {setup: {"one", "two", "two_each"}}."""
    seconds = WORKER_SECONDS[1 if quick else 0]
    arena = Arena.create(f"{name}.smp", SMALL_ARENA)
    out = {"seconds": seconds}
    try:
        for z in ("pair", "pair0", "pair1"):
            arena.zcreate(z, ITEM)
        setups = {"zone": ("pair", "pair"), "own_zone": ("pair0", "pair1"),
                  "floor": (None, None)}
        runs = {(setup, k): [] for setup in setups for k in (1, 2)}
        for _ in range(repeat):                 # rounds over every setup: drift in the
            for setup, zones in setups.items():     # machine's load hits all alike
                for k in (1, 2):
                    runs[setup, k].append(_workers_run(arena.name, zones[:k], seconds))
        for setup in setups:
            one, two = (max(runs[setup, k], key=sum) for k in (1, 2))
            out[setup] = {"one": sum(one), "two": sum(two), "two_each": two}
    finally:
        arena.destroy()
    return out


def _workers_run(arena_name: str, zones, seconds: float) -> list[float]:
    """Start one worker per entry of ``zones`` (a zone name, or None for the Python
    floor) together; each one's pairs/s."""
    k = len(zones)
    start = CTX.Barrier(k + 1)
    results = CTX.SimpleQueue()
    procs = [CTX.Process(target=_pair_worker, args=(arena_name, z, seconds, start, results),
                         daemon=True) for z in zones]
    for p in procs:
        p.start()
    try:
        try:
            start.wait(60)
        except threading.BrokenBarrierError:
            pass                                # a worker failed: its message follows
        out = []
        deadline = time.monotonic() + seconds + 60
        while len(out) < k:
            if not results.empty():
                r = results.get()
                if isinstance(r, str):
                    raise RuntimeError(f"pair worker failed: {r}")
                out.append(r)
            elif time.monotonic() > deadline or all(p.exitcode is not None for p in procs):
                raise RuntimeError(f"pair workers gave {len(out)} of {k} results "
                                   f"(exit codes {[p.exitcode for p in procs]})")
            else:
                time.sleep(0.01)
        return out
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


def _pair_worker(arena_name, zone_name, seconds, start, results):
    """Attach, warm this CPU's cache, wait for the others, run pairs for ``seconds``
    (``zone_name`` None: no arena, the loop ``lst.append(lst.pop())``)."""
    arena = None
    try:
        if zone_name is None:
            lst = [0] * 64
            al, fr = lst.pop, lst.append
        else:
            arena = Arena.attach(arena_name)
            zone = arena.zone(zone_name)
            al, fr = zone.alloc, zone.free
        for _ in range(10_000):                 # fill this CPU's cache
            fr(al())
        r = range(WORKER_CHUNK)
        start.wait(60)
        ops = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            for _ in r:
                fr(al())
            ops += WORKER_CHUNK
            t = time.perf_counter()
            if t >= end:
                break
        results.put(ops / (t - t0))
    except BaseException as e:                  # reported to the parent
        start.abort()
        results.put(f"{type(e).__name__}: {e}")
    finally:
        if arena is not None:
            arena.close()
