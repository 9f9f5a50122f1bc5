"""Memory costs, for ``shmalloc bench`` (section ``memory``).

    overhead  2 KiB mbuf clusters (``mbuf_cluster``: refcount trailers): the slab's
              bytes over its items' bytes (keg ``ppera`` x page / ``ipers`` x item size:
              header, tags, trailers and the tail the items leave), and everything the
              arena spends at a population of POPULATION clusters, measured: the arena's
              used bytes (size - free pages) over the clusters' bytes, in an arena sized
              to hold them.  The metadata part (header, lock, CPU, zone and keg tables,
              page table and free map, the seven mbuf zones' depots, the creator's
              mailbox) is the used bytes outside the cluster keg's slabs.
    RSS       a worker: a fresh interpreter (``python -c``, nothing imported but
              shmalloc) that attaches, churns WORKER_ROUNDS bursts of BURST allocs,
              each item written in full, then frees, and reports its own resident set
              (psutil: RSS, USS; /proc: anonymous, file and shared-memory parts).
"""

from __future__ import annotations

import json
import subprocess
import sys

from shmalloc import Arena
from shmalloc import layout as L
from shmalloc.mbuf import mbuf_init

POPULATION = 100_000
ITEM = 2048
RSS_ARENA = 64 << 20
WORKER_ROUNDS = (2_000, 200)          # full, quick
BURST = 64
PAGE = 4096


def overhead(name: str, population: int = POPULATION) -> dict:
    """Slab and whole-arena overhead of ``population`` 2 KiB clusters."""
    size = (int(population * ITEM * 1.04) + (8 << 20) + 0xFFFFF) & ~0xFFFFF   # a tight fit
    arena = Arena.create(f"{name}.mem", size, tunables={"kern.ipc.nmbclusters": 0})
    try:
        mbuf_init(arena)
        zone = arena.zone("mbuf_cluster")
        keg = zone.keg
        page = PAGE
        held = []
        while len(held) < population:
            got = zone.alloc_bulk(min(65_536, population - len(held)))
            if got is None:
                raise MemoryError(f"no room for {population} clusters")
            held.extend(got)
        st = arena.stats()
        used = arena.size - st.free_pages * page
        slab_pages = zone.stats().pages
        items = population * zone.size
        slab_bytes = keg.ppera * page
        zone.free_bulk(held)
        geo = L.Geometry(arena.size)
        return {
            "zone": zone.name, "item": zone.size, "rsize": keg.rsize, "ipers": keg.ipers,
            "ppera": keg.ppera, "slab_bytes": slab_bytes,
            "slab_overhead": slab_bytes / (keg.ipers * zone.size) - 1,
            "population": population, "arena_size": arena.size, "arena_used": used,
            "slab_pages": slab_pages,
            "metadata_bytes": used - slab_pages * page,
            "metadata_per_item": (used - slab_pages * page) / population,
            "metadata_parts": {                     # bytes
                "tables": L.PAGETAB_OFF,            # header, locks, CPU, zone, keg tables
                "page_table_and_free_map": geo.data_off - L.PAGETAB_OFF,
                "depots_and_mailboxes": used - slab_pages * page - geo.data_off},
            "total_overhead": used / items - 1,
        }
    finally:
        arena.destroy()


def rss_worker(name: str, quick: bool) -> dict:
    """Run the worker in a fresh interpreter on a new arena; its memory figures (bytes)."""
    arena = Arena.create(f"{name}.rss", RSS_ARENA)
    try:
        arena.zcreate("churn", ITEM)
        code = (f"from shmalloc.scripts.bench_memory import _rss_main; "
                f"_rss_main({arena.name!r}, {WORKER_ROUNDS[1 if quick else 0]})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS worker exited {proc.returncode}: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        arena.destroy()


def _rss_main(arena_name: str, rounds: int) -> None:
    """The worker: attach, churn, print its memory as one JSON line."""
    import psutil
    arena = Arena.attach(arena_name)
    try:
        zone = arena.zone("churn")
        al, fr, view = zone.alloc, zone.free, zone.view
        fill = bytes(range(256)) * (zone.size // 256)
        for i in range(rounds):
            hs = [al() for _ in range(BURST)]
            for h in hs:
                view(h)[:] = fill
            for h in hs:
                fr(h)
        me = psutil.Process()
        full = me.memory_full_info()
        out = {"rss": full.rss, "uss": full.uss, "pss": getattr(full, "pss", None),
               "rounds": rounds, "items_touched": zone.stats().items}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssFile", "RssShmem", "VmHWM")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    finally:
        arena.close()
    print(json.dumps(out))
