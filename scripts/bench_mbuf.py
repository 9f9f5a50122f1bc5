"""Measurements of the mbuf layer for ``shmalloc bench`` (``bench.measure`` adds them).

``run(quick)`` returns one dict per measurement::

    raw_zone_2k_pair        zone.alloc + zone.free on a plain 2 KiB zone (the yardstick)
    m_getcl+m_freem         one packet-zone allocation (mbuf + cluster) and its free
    m_gethdr+m_clget+m_freem  the same packet from two zones
    m_copym_1500            m_copym of a 1500-byte packet (shares the cluster), the copy
                            freed outside the timed loop

Each is timed on an in-process arena (``Arena.create_local``: the fast paths take no
lock either way) as the best of ``reps`` rounds of ``n`` operations, in ns per
operation.  The packet rows carry their ratios and the targets of issue #3
(m_getcl + m_freem at least 1.5x faster than m_gethdr + m_clget + m_freem, and
within 4x of the raw pair).
"""

from __future__ import annotations

import time

from shmalloc import M_NOWAIT, Arena
from shmalloc import mbuf as api
from shmalloc.mbuf import M_COPYALL, M_PKTHDR, MT_DATA

TARGET_SPEEDUP = 1.5
TARGET_VS_RAW = 4.0


def _best(fn, n: int, reps: int) -> float:
    """Best ns per call of ``fn`` over ``reps`` rounds of ``n`` calls."""
    for _ in range(min(n, 2000)):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def _row(name: str, ns: float, n: int, reps: int, **extra) -> dict:
    return dict(name=name, ns_per_op=round(ns, 1), ops_per_s=round(1e9 / ns) if ns else 0,
                n=n, reps=reps, **extra)


def run(quick: bool = False) -> list[dict]:
    n, reps = (5_000, 3) if quick else (50_000, 7)
    arena = Arena.create_local(32 << 20)
    try:
        raw = arena.zcreate("bench_raw_2k", 2048)
        alloc, free = raw.alloc, raw.free

        def raw_pair():
            free(alloc(M_NOWAIT))

        getcl, gethdr, clget, freem = api.m_getcl, api.m_gethdr, api.m_clget, api.m_freem

        def packet():
            freem(getcl(M_NOWAIT, MT_DATA, M_PKTHDR, arena=arena))

        def two_zones():
            m = gethdr(M_NOWAIT, MT_DATA, arena=arena)
            clget(m, M_NOWAIT)
            freem(m)

        t_raw = _best(raw_pair, n, reps)
        t_pack = _best(packet, n, reps)
        t_two = _best(two_zones, n, reps)

        m = getcl(M_NOWAIT, MT_DATA, M_PKTHDR, arena=arena)
        api.m_append(m, 1500, bytes(range(256)) * 6)
        copym = api.m_copym
        batch = min(n, 1000)
        best_copy = float("inf")
        for _ in range(reps * max(1, n // batch)):
            t0 = time.perf_counter_ns()
            copies = [copym(m, 0, M_COPYALL, M_NOWAIT) for _ in range(batch)]
            best_copy = min(best_copy, (time.perf_counter_ns() - t0) / batch)
            for cp in copies:
                freem(cp)
        freem(m)
        arena.check()
    finally:
        arena.destroy()
    speedup = t_two / t_pack
    vs_raw = t_pack / t_raw
    return [
        _row("raw_zone_2k_pair", t_raw, n, reps),
        _row("m_getcl+m_freem", t_pack, n, reps, vs_raw=round(vs_raw, 2),
             target_vs_raw=TARGET_VS_RAW, meets_vs_raw=vs_raw <= TARGET_VS_RAW),
        _row("m_gethdr+m_clget+m_freem", t_two, n, reps, getcl_speedup=round(speedup, 2),
             target_speedup=TARGET_SPEEDUP, meets_speedup=speedup >= TARGET_SPEEDUP),
        _row("m_copym_1500", best_copy, batch, reps),
    ]
