"""What the debug levels cost, for ``shmalloc bench`` (section ``debug``).

``run(quick, repeat, base)`` creates one arena per level (``Arena.create(...,
debug=N)``, N = 0..3: the level is fixed at create, as ``SHMALLOC_DEBUG`` would fix
it) and times on each, as the best of ``repeat`` rounds:

    pair      zone.alloc + zone.free of a 2 KiB item on a cache hit
    m_getcl   m_getcl + m_freem (a packet: mbuf and cluster from the packet zone)
    burst     64 allocs then 64 frees, per pair: overflows the cache, so every few
              operations take a slow path (depot, keg) -- where level 3 runs check()

Level 1 adds the trash fill on free and its check on the next alloc (hooks around
the zone's own ctor/dtor, on zones without an init/fini of their own), level 2 the
WITNESS lock-order and lock-contract checks on the slow paths, level 3 a ``check()``
after every slow-path operation.  Each level's row carries its times in µs and its
slowdown against level 0.
"""

from __future__ import annotations

import sys
import time

from shmalloc import M_NOWAIT, Arena
from shmalloc import mbuf as api
from shmalloc.mbuf import M_PKTHDR, MT_DATA

LEVELS = (0, 1, 2, 3)
ITEM = 2048
BURST = 64
ARENA_SIZE = 16 << 20
# operations per round (full run, --quick); the burst counts pairs
COUNTS = {"pair": (100_000, 2_000), "m_getcl": (50_000, 1_000), "burst": (300, 4)}
METRICS = ("pair", "m_getcl", "burst")


def _best_us(fn, n: int, repeat: int, per: int = 1) -> float:
    """Best µs per operation of ``fn`` (``per`` operations a call) over ``repeat``
    rounds of ``n // per`` calls, after a warm-up."""
    calls = max(1, n // per)
    for _ in range(min(calls, 2000)):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / (calls * per))
    return best / 1e3


def measure_level(level: int, name: str, quick: bool, repeat: int) -> dict:
    """The three timings on a new arena ``name`` created at debug ``level``."""
    n = {k: v[1] if quick else v[0] for k, v in COUNTS.items()}
    arena = Arena.create(name, ARENA_SIZE, debug=level)
    try:
        z = arena.zcreate("debug_pair", ITEM)
        alloc, free = z.alloc, z.free

        def pair():
            free(alloc(M_NOWAIT))

        getcl, freem = api.m_getcl, api.m_freem

        def packet():
            freem(getcl(M_NOWAIT, MT_DATA, M_PKTHDR, arena=arena))

        r = range(BURST)

        def burst():
            hs = [alloc(M_NOWAIT) for _ in r]
            for h in hs:
                free(h)

        out = {"level": level,
               "pair": _best_us(pair, n["pair"], repeat),
               "m_getcl": _best_us(packet, n["m_getcl"], repeat),
               "burst": _best_us(burst, n["burst"] * BURST, repeat, BURST)}
        arena.check()
    finally:
        arena.destroy()
    return out


def run(quick: bool = False, repeat: int = 3, base: str = "benchdebug") -> list[dict]:
    """One row per level: level, the µs of each metric and ``slowdown`` (metric ->
    time over level 0's)."""
    rows = [measure_level(level, f"{base}.debug{level}", quick, repeat) for level in LEVELS]
    zero = rows[0]
    for row in rows:
        row["slowdown"] = {m: round(row[m] / zero[m], 2) for m in METRICS}
        for m in METRICS:
            row[m] = round(row[m], 3)
    return rows


def print_table(rows, out=None) -> None:
    """Per level: µs and slowdown against level 0 of each metric."""
    out = out or sys.stdout
    if not rows:
        return
    out.write("\ndebug levels (SHMALLOC_DEBUG, arena created with debug=N): us per "
              "operation, slowdown vs level 0\n")
    out.write(f"{'level':>5}  {'pair (cache hit)':>18}  {'m_getcl+m_freem':>18}  "
              f"{'64-burst, per pair':>20}\n")
    for r in rows:
        cells = [f"{r[m]:8.3f} us {r['slowdown'][m]:5.2f}x" for m in METRICS]
        out.write(f"{r['level']:>5}  {cells[0]:>18}  {cells[1]:>18}  {cells[2]:>20}\n")
    out.flush()
