"""Children's functions for tests/test_lockstat.py ('spawn' children import them by name)."""

from __future__ import annotations

import random
import traceback

from shmalloc import Arena
from shmalloc.ipc.segment import Segment


def hammer(q, tag, name: str, zone_name: str, seed: int, stop, max_pairs: int) -> None:
    """Allocate and free items of ``zone_name`` in seeded bursts of 1..8 until ``stop``
    is set or ``max_pairs`` pairs are done; report ``("ok", tag, pairs)``."""
    try:
        rng = random.Random(seed)
        arena = Arena.attach(name)
        zone = arena.zone(zone_name)
        pairs = 0
        while pairs < max_pairs and not stop.is_set():
            for _ in range(16):
                hs = [zone.alloc() for _ in range(rng.randint(1, 8))]
                for h in hs:
                    zone.free(h)
                pairs += len(hs)
        arena.close()
        q.put(("ok", tag, pairs))
    except BaseException:
        q.put(("err", tag, traceback.format_exc()))


def map_segment(q, seg_name: str, stop) -> None:
    """Map segment ``seg_name`` (no arena attachment), say so, hold it until ``stop``."""
    try:
        seg = Segment.attach(seg_name)
        q.put(("ok", 0, None))
        stop.wait(60)
        seg.close()
    except BaseException:
        q.put(("err", 0, traceback.format_exc()))
