"""``shmalloc bench``: shmalloc against its peers, every peer measured in the same run
on the same machine, with ratios (above 1, shmalloc is better) and the targets.

Sections (``--only SECTION[,SECTION]`` runs a subset):

    pair      (a) alloc+free pair on a cache hit (2 KiB items), against
                  multiprocessing.heap.BufferWrapper(2048) create+drop, a SharedMemory
                  segment per buffer (create+close+unlink) and the Python floor
                  ``lst.append(lst.pop())``
              (b) 64 allocs then 64 frees, per pair (overflows the cache: depot traffic)
              (c) alloc_bulk(64) + free_bulk, per item, with bucket_size=64 and the default
              (d) zone-lock acquisitions per bucket moved, in a steady-state churn
              (e) the pair with bucket_size=0 (every operation takes the zone lock)
    mbuf      (f) m_getcl+m_freem against m_gethdr+m_clget+m_freem and the raw pair
              (g) m_copym of a 1500-byte packet                        (bench_mbuf)
    handoff   (h) producer -> consumer of 2 KiB, 64 KiB and 1 MiB payloads between two
                  processes: shmalloc send/recv against mp.Queue, mp.Pipe and
                  faster_fifo (if installed)                             (bench_handoff)
    growth    (i) the pair with 1 K .. 1 M live items, and in a 64 MiB against a much
                  larger arena                                            (bench_scale)
    memory    (j) bytes per 2 KiB cluster (slab, and the whole arena at a population);
                  a worker's resident set                                (bench_memory)
    scaling   (k) two worker processes running the pair against one     (bench_scale)
    debug     (l) the pair, m_getcl+m_freem and a 64-burst at SHMALLOC_DEBUG 0..3, and
                  each level's slowdown against level 0                  (bench_debug)
    dask      (m) worker-to-worker transfers of 1, 64 and 512 MiB arrays in a Dask
                  LocalCluster of two worker processes: Dask's own frames against
                  shmalloc's references (integrations.dask), a plain numpy array
                  (one copy into the arena) and an arena array (no copy); skipped,
                  with a note, where Dask distributed is not installed  (bench_dask)
    app       (n) where applications meet shmalloc (issue 13), every peer in the same
                  run: arena.alloc(n)+close at 2 KiB .. 64 MiB against a SharedMemory
                  segment; a Buffer pickled here and loaded+closed in another process
                  against a SharedMemory passed by name; ProcessPoolExecutor.map over
                  64 arrays of 8 MiB (pickled, SharedMemory by name, arena arrays);
                  the per-item hand-off (alloc(M_WAITOK), send by 64, recv, free)
                  against mp.Queue and mp.Pipe; the pair against mp.heap (bench_app)

Times are the best of ``--repeat`` runs, for shmalloc and peers alike.
``python -m shmalloc.scripts.bench ARGS`` is ``shmalloc bench ARGS``.
"""

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import time
import timeit

from shmalloc import Arena

from . import (bench_app, bench_dask, bench_debug, bench_handoff, bench_mbuf, bench_memory,
               bench_scale, positive_int)

ITEM = 2048
BURST = 64
BULK_BUCKET = 64            # a bucket size whose cache (2 buckets) holds a whole bulk
ARENA_SIZE = 32 << 20
# iterations per timing (full run, --quick)
COUNTS = {
    "pair": (200_000, 2_000),
    "floor": (1_000_000, 10_000),
    "heap": (20_000, 500),
    "shm": (2_000, 50),
    "burst": (3_000, 50),
    "heap_burst": (300, 10),
    "bulk": (5_000, 50),
    "steady": (2_000, 50),
    "nocache": (50_000, 1_000),
}
TARGET_PAIR_US = 0.5
TARGET_PAIR_RATIO = 25.0
TARGET_BULK_US = 0.15
TARGET_LOCKS_PER_BUCKET = 2.0
TARGET_HANDOFF_VS_QUEUE = 5.0       # items/s at 2 KiB and MB/s at 1 MiB
TARGET_GROWTH = 1.2                 # pair cost within 20 % of the smallest configuration
TARGET_MEM_OVERHEAD = 0.03          # per 2 KiB cluster, all metadata included
TARGET_RSS_MB = 40.0
TARGET_SCALING = 1.7                # two workers' pairs/s over one's
TARGET_DASK = 5.0                   # Dask's transfer time over shmalloc's, 64 MiB and above
SECTIONS = ("pair", "mbuf", "handoff", "growth", "memory", "scaling", "debug", "dask", "app")


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and counts (a smoke test, seconds)")
    parser.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    parser.add_argument("--repeat", type=positive_int, default=3, metavar="K",
                        help="runs per measurement, the best is kept (default 3)")
    parser.add_argument("--only", type=_sections, metavar="SECTION[,SECTION]",
                        help=f"run these sections only, of: {', '.join(SECTIONS)}")
    parser.add_argument("--name", metavar="ARENA",
                        help="prefix of the arenas the benchmark creates "
                             "(default: bench<pid><hex>)")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile (cProfile, untimed runs) the bulk path and both "
                             "sides of the shmalloc hand-off; .prof files go to DIR")


def _sections(text):
    """argparse type: a comma-separated list of section names."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section {', '.join(bad) or repr(text)}; "
                                         f"sections: {', '.join(SECTIONS)}")
    return names


def run(args):
    """Measure, print the tables, write JSON if asked; 0 (targets missed are reported only)."""
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    report = measure(quick=args.quick, repeat=args.repeat, name=args.name,
                     only=args.only, progress=sys.stderr, profile=args.profile)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


# ------------------------------------------------------------------------ timing
def _us(stmt, setup="pass", ns=None, number=1, repeat=3, per=1):
    """Best-of-``repeat`` µs per run of ``stmt`` (``number`` runs per timing) / ``per``.

    ``setup`` runs inside the timed function, so names it binds are locals.
    """
    timer = timeit.Timer(stmt, setup, globals=ns or {})
    timer.timeit(max(1, number // 10))                       # warm up
    return min(timer.repeat(repeat, number)) / number / per * 1e6


class _Rows:
    """The results being gathered: metric key -> row, each tagged with its section.

    A row: label, value and unit (shmalloc's figure), peer and peer_value (the figure it
    is compared with), ratio (above 1: shmalloc is better; peer/value when lower is
    better, value/peer when higher is), target and ok (None when there is none)."""

    def __init__(self):
        self.results = {}
        self.section = None

    def add(self, key, label, value, unit, peer=None, peer_value=None, target=None, ok=None,
            better="lower", **extra):
        ratio = None
        if peer_value and value:
            ratio = peer_value / value if better == "lower" else value / peer_value
        self.results[key] = {"section": self.section, "label": label, "value": value,
                             "unit": unit, "peer": peer, "peer_value": peer_value,
                             "ratio": ratio, "better": better, "target": target, "ok": ok,
                             **extra}


def measure(quick=False, repeat=3, name=None, only=None, progress=None, profile=None):
    """Run the sections (``only``: a subset) on arenas named ``name``.<suffix> (default
    prefix unique); a dict: env, params, results (metric -> row), the sections' raw
    figures, notes and the seconds each section took.  ``profile``: a directory for
    cProfile dumps of the bulk and hand-off paths."""
    n = {k: v[1] if quick else v[0] for k, v in COUNTS.items()}
    base = name or f"bench{os.getpid()}{secrets.token_hex(4)}"
    ctx = {"quick": quick, "repeat": repeat, "n": n, "base": base, "notes": [], "raw": {},
           "profile": profile}
    rows = _Rows()
    seconds = {}
    env = _env()
    for section in SECTIONS:
        if only and section not in only:
            continue
        if progress is not None:
            progress.write(f"bench: {section}\n")
            progress.flush()
        t0 = time.monotonic()
        rows.section = section
        _SECTION_RUNS[section](rows, ctx)
        seconds[section] = round(time.monotonic() - t0, 2)
    env["loadavg_after"] = _loadavg()
    return {"env": env,
            "params": {"quick": quick, "repeat": repeat, "counts": n, "item_size": ITEM,
                       "sections": [s for s in SECTIONS if not only or s in only],
                       "command": "shmalloc bench " + " ".join(
                           (["--quick"] if quick else []) + [f"--repeat {repeat}"]
                           + ([f"--only {','.join(only)}"] if only else []))},
            "results": rows.results, **ctx["raw"], "notes": ctx["notes"], "seconds": seconds}


# ------------------------------------------------------------------------ sections
def _section_pair(rows, ctx):
    n, repeat = ctx["n"], ctx["repeat"]
    arena = Arena.create(f"{ctx['base']}.pair", ARENA_SIZE)
    try:
        shm = _measure_shmalloc(arena, n, repeat)
        if ctx["profile"]:
            _profile_bulk(arena.zone("bulk64"), n["bulk"],
                          os.path.join(ctx["profile"], "bulk64.prof"))
    finally:
        arena.destroy()
    peer = _measure_peers(n, repeat)
    row = rows.add
    pair_ratio = peer["heap"] / shm["pair"]
    row("pair", "(a) pair alloc+free, cache hit", shm["pair"], "us",
        "mp.heap BufferWrapper", peer["heap"],
        f"<= {TARGET_PAIR_US} us, >= {TARGET_PAIR_RATIO:g}x",
        shm["pair"] <= TARGET_PAIR_US and pair_ratio >= TARGET_PAIR_RATIO)
    row("pair_vs_shared_memory", "(a) pair vs SharedMemory per buffer", shm["pair"], "us",
        "SharedMemory per buffer", peer["shm"])
    row("pair_vs_floor", "(a) pair vs Python floor", shm["pair"], "us",
        "list append(pop())", peer["floor"])
    row("burst", f"(b) {BURST}-alloc/{BURST}-free burst, per pair", shm["burst"], "us",
        "mp.heap BufferWrapper", peer["heap_burst"])
    row("bulk_bucket64", f"(c) bulk {BURST}, per item, bucket_size={BULK_BUCKET}",
        shm["bulk64"], "us",
        "mp.heap burst", peer["heap_burst"], f"<= {TARGET_BULK_US} us",
        shm["bulk64"] <= TARGET_BULK_US)
    row("bulk_default", f"(c) bulk {BURST}, per item, bucket_size={shm['default_bucket']}",
        shm["bulk_default"], "us", "mp.heap burst", peer["heap_burst"])
    row("zone_lock_per_bucket", "(d) zone-lock acquisitions per bucket", shm["locks_per_bucket"],
        "", target=f"<= {TARGET_LOCKS_PER_BUCKET:g}",
        ok=shm["locks_per_bucket"] <= TARGET_LOCKS_PER_BUCKET)
    row("pair_nocache", "(e) pair, bucket_size=0 (zone lock)", shm["nocache"], "us",
        "mp.heap BufferWrapper", peer["heap"])


def _section_mbuf(rows, ctx):
    _mbuf_rows(rows.add, ctx["quick"])


_SIZE_KEYS = {2048: "2k", 65536: "64k", 1 << 20: "1m"}


def _size_label(size):
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def _section_handoff(rows, ctx):
    note = bench_handoff.faster_fifo_note()
    if note:
        ctx["notes"].append(note)
    recs = bench_handoff.run(ctx["quick"], ctx["repeat"], ctx["base"], ctx["profile"])
    ctx["raw"]["handoff"] = recs
    for size in bench_handoff.SIZES:
        at = {r["transport"]: r for r in recs if r["size"] == size}
        shm = at["shmalloc"]
        per_item = size < 65536                     # 2 KiB: items/s; bigger: MB/s
        metric, unit = ("items_per_s", "items/s") if per_item else ("mb_per_s", "MB/s")
        ff = [r for k, r in at.items() if k.startswith("faster_fifo")]
        peers = [("queue", "mp.Queue", at["mp.Queue"]), ("pipe", "mp.Pipe", at["mp.Pipe"])]
        if ff:
            best = max(ff, key=lambda r: r["items_per_s"])
            peers.append(("faster_fifo", best["transport"], best))
        targeted = size in (2048, 1 << 20)
        for key, label, r in peers:
            need = TARGET_HANDOFF_VS_QUEUE if key == "queue" else 1.0
            ratio = shm[metric] / r[metric]
            rows.add(f"handoff_{_SIZE_KEYS[size]}_{key}",
                     f"(h) hand-off {_size_label(size)}, {unit}", shm[metric], unit, label,
                     r[metric], (f">= {need:g}x" if key == "queue" else "> 1x (ahead)")
                     if targeted else None,
                     (ratio >= need if key == "queue" else ratio > need) if targeted else None,
                     better="higher")


def _section_growth(rows, ctx):
    g = bench_scale.growth(ctx["quick"], ctx["repeat"], ctx["base"], ctx["n"]["pair"])
    ctx["raw"]["growth"] = g
    ctx["notes"].extend(g["notes"])
    target = f"within {TARGET_GROWTH - 1:.0%}"
    for i, (count, us) in enumerate(g["live"]):
        first_count, first = g["live"][0]
        if i == 0:
            rows.add(f"growth_live_{_count_key(count)}", f"(i) pair, {count:,} live items",
                     us, "us")
        else:
            rows.add(f"growth_live_{_count_key(count)}", f"(i) pair, {count:,} live items",
                     us, "us", f"{first_count:,} live", first, target,
                     us <= TARGET_GROWTH * first)
    for i, (size, us) in enumerate(g["arena"]):
        first_size, first = g["arena"][0]
        label = f"(i) pair, {_bytes_label(size)} arena"
        if i == 0:
            rows.add("growth_arena_small", label, us, "us")
        else:
            rows.add("growth_arena_large", label, us, "us", f"{_bytes_label(first_size)} arena",
                     first, target, us <= TARGET_GROWTH * first)


def _section_memory(rows, ctx):
    m = bench_memory.overhead(ctx["base"])
    rss = bench_memory.rss_worker(ctx["base"], ctx["quick"])
    ctx["raw"]["memory"] = {"overhead": m, "rss_worker": rss}
    pop = f"{m['population']:,}"
    rows.add("mem_slab", f"(j) 2 KiB cluster slab/item bytes - 1 ({m['ppera']} pages, "
             f"{m['ipers']} items)", 100 * m["slab_overhead"], "%")
    rows.add("mem_metadata", f"(j) arena metadata per cluster at {pop}",
             m["metadata_per_item"], "B")
    rows.add("mem_total", f"(j) 2 KiB cluster, all overhead at {pop}",
             100 * m["total_overhead"], "%", target=f"<= {TARGET_MEM_OVERHEAD:.0%}",
             ok=m["total_overhead"] <= TARGET_MEM_OVERHEAD)
    rows.add("mem_rss_worker", "(j) RSS of a worker (attach + churn)", rss["rss"] / 1e6, "MB",
             target=f"<= {TARGET_RSS_MB:g} MB", ok=rss["rss"] / 1e6 <= TARGET_RSS_MB,
             uss_mb=rss["uss"] / 1e6, shmem_mb=rss.get("RssShmem", 0) / 1e6)


def _section_scaling(rows, ctx):
    sc = bench_scale.scaling(ctx["quick"], ctx["repeat"], ctx["base"])
    ctx["raw"]["scaling"] = sc
    zone, own, floor = sc["zone"], sc["own_zone"], sc["floor"]
    rows.add("scaling_two_workers", "(k) pairs/s, 2 workers on own caches, one zone",
             zone["two"], "/s", "1 worker", zone["one"], f">= {TARGET_SCALING:g}x",
             zone["two"] / zone["one"] >= TARGET_SCALING, better="higher")
    rows.add("scaling_own_zones", "(k) pairs/s, 2 workers, a zone each", own["two"], "/s",
             "1 worker", own["one"], better="higher")
    rows.add("scaling_machine", "(k) machine: 2 processes vs 1, list pop+append",
             floor["two"], "/s", "1 process", floor["one"], better="higher")


def _section_debug(rows, ctx):
    recs = bench_debug.run(ctx["quick"], ctx["repeat"], ctx["base"])
    ctx["raw"]["debug"] = recs
    zero = recs[0]
    for r in recs:
        for m in bench_debug.METRICS:
            rows.add(f"debug{r['level']}_{m}", f"(l) {m}, SHMALLOC_DEBUG={r['level']}", r[m],
                     "us", None if r is zero else "debug 0", None if r is zero else zero[m],
                     slowdown=r["slowdown"][m])


def _section_dask(rows, ctx):
    why_not = bench_dask.available()
    if why_not:
        ctx["notes"].append(why_not)
        return
    res = bench_dask.run(ctx["quick"], ctx["repeat"], ctx["base"])
    ctx["raw"]["dask"] = res
    at = {(r["setup"], r["size"]): r for r in res["records"]}
    for size in sorted({r["size"] for r in res["records"]}):
        dflt = at["dask", size]
        targeted = size >= 64 << 20
        for setup in ("shmalloc", "shmalloc-arena"):
            r = at[setup, size]
            key = f"dask_{_size_key(size)}_{'copy' if setup == 'shmalloc' else 'arena'}"
            how = "numpy, 1 copy" if setup == "shmalloc" else "arena array, no copy"
            ratio = dflt["fetch_read"] / r["fetch_read"]
            rows.add(key, f"(m) Dask {_size_label(size)} A -> B, fetch+read, {how}",
                     1e3 * r["fetch_read"], "ms", "Dask's frames", 1e3 * dflt["fetch_read"],
                     f">= {TARGET_DASK:g}x" if targeted else None,
                     ratio >= TARGET_DASK if targeted else None,
                     e2e_ms=1e3 * r["e2e"], peer_e2e_ms=1e3 * dflt["e2e"],
                     wire_bytes=r["wire"], peer_wire_bytes=dflt["wire"])


def _size_key(size):
    return f"{size >> 20}m" if size >= 1 << 20 else f"{size >> 10}k"


def _section_app(rows, ctx):
    res = bench_app.run(ctx["quick"], ctx["repeat"], ctx["base"])
    ctx["raw"]["app"] = res
    ba = bench_app
    for r in res["alloc"]:
        ratio = r["shm_us"] / r["us"]
        rows.add(f"app_alloc_{_size_key(r['size'])}",
                 f"(n) arena.alloc+close, {_size_label(r['size'])}", r["us"], "us",
                 "SharedMemory create+close+unlink", r["shm_us"],
                 f"<= {ba.TARGET_ALLOC_US:g} us, >= {ba.TARGET_ALLOC_VS_SHM:g}x",
                 r["us"] <= ba.TARGET_ALLOC_US and ratio >= ba.TARGET_ALLOC_VS_SHM)
    p = res["pickle"]
    rows.add("app_pickle", "(n) Buffer pickle here, load+close there", p["us"], "us",
             "SharedMemory by name", p["shm_us"],
             f"<= {ba.TARGET_PICKLE_US:g} us, >= {ba.TARGET_PICKLE_VS_SHM:g}x",
             p["us"] <= ba.TARGET_PICKLE_US and p["shm_us"] / p["us"] >= ba.TARGET_PICKLE_VS_SHM,
             dump_us=p["dump_us"], load_close_us=p["load_close_us"],
             peer_dump_us=p["shm_dump_us"], peer_load_close_us=p["shm_load_close_us"])
    pool = res["pool"]
    if pool is None:
        ctx["notes"].append("numpy not installed: the ProcessPoolExecutor rows are skipped")
    else:
        sec = pool["seconds"]
        what = f"{pool['arrays']} x {_size_label(pool['bytes'])}"
        for key, peer, label, need in (
                ("pickle", "pickled arrays", "pickle", ba.TARGET_POOL_VS_PICKLE),
                ("shm", "SharedMemory by name", "shm", ba.TARGET_POOL_VS_SHM)):
            rows.add(f"app_pool_{label}", f"(n) ProcessPoolExecutor.map, {what}, read",
                     1e3 * sec["shmalloc"], "ms", peer, 1e3 * sec[key], f">= {need:g}x",
                     sec[key] / sec["shmalloc"] >= need)
    h = res["handoff"]
    ips = h["items_per_s"]
    for key, need in (("mp.Queue", ba.TARGET_PLAIN_VS_QUEUE), ("mp.Pipe", 1.0)):
        ratio = ips["shmalloc"] / ips[key]
        rows.add(f"app_handoff_{key[3:].lower()}", "(n) hand-off 2 KiB, per-item API, items/s",
                 ips["shmalloc"], "items/s", key, ips[key],
                 f">= {need:g}x" if key == "mp.Queue" else "> 1x (ahead)",
                 ratio >= need if key == "mp.Queue" else ratio > need, better="higher",
                 bucket=h["bucket"], limit=h["limit"], batch=h["batch"])
    pr = res["pair"]
    rows.add("app_pair", "(n) pair alloc+free, cache hit (2 KiB zone)", pr["us"], "us",
             "mp.heap BufferWrapper", pr["heap_us"],
             f"<= {ba.TARGET_PAIR_US:g} us, >= {ba.TARGET_PAIR_VS_HEAP:g}x",
             pr["us"] <= ba.TARGET_PAIR_US and pr["heap_us"] / pr["us"] >= ba.TARGET_PAIR_VS_HEAP)


_SECTION_RUNS = {"pair": _section_pair, "mbuf": _section_mbuf, "handoff": _section_handoff,
                 "growth": _section_growth, "memory": _section_memory, "dask": _section_dask,
                 "scaling": _section_scaling, "debug": _section_debug, "app": _section_app}


def _count_key(count):
    return f"{count // 1_000_000}m" if count >= 1_000_000 else f"{count // 1000}k"


def _bytes_label(size):
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def _mbuf_rows(row, quick):
    """The mbuf layer's rows: the packet zone against two zones and a raw pair."""
    r = {x["name"]: x for x in bench_mbuf.run(quick)}
    raw, pack = r["raw_zone_2k_pair"], r["m_getcl+m_freem"]
    two, copy = r["m_gethdr+m_clget+m_freem"], r["m_copym_1500"]
    row("m_getcl", "(f) m_getcl+m_freem", pack["ns_per_op"] / 1e3, "us",
        "m_gethdr+m_clget+m_freem", two["ns_per_op"] / 1e3,
        f">= {bench_mbuf.TARGET_SPEEDUP:g}x", two["ns_per_op"] / pack["ns_per_op"]
        >= bench_mbuf.TARGET_SPEEDUP)
    row("m_getcl_vs_raw", "(f) m_getcl+m_freem vs raw 2 KiB pair", pack["ns_per_op"] / 1e3,
        "us", "raw zone pair (x slower)", raw["ns_per_op"] / 1e3,
        f"within {bench_mbuf.TARGET_VS_RAW:g}x", pack["vs_raw"] <= bench_mbuf.TARGET_VS_RAW)
    row("m_copym_1500", "(g) m_copym of a 1500-byte packet", copy["ns_per_op"] / 1e3, "us")


def _measure_shmalloc(arena, n, repeat):
    """Times (µs) and lock counts of shmalloc's paths, on zones of ``arena``."""
    zone = arena.zcreate("pair", ITEM)
    bulk64 = arena.zcreate("bulk64", ITEM, bucket_size=BULK_BUCKET)
    nocache = arena.zcreate("nocache", ITEM, bucket_size=0)
    pair, pair_setup = "fr(al())", "al = z.alloc; fr = z.free"
    burst = "hs = [al() for _ in r]\nfor h in hs: fr(h)"
    bulk, bulk_setup = f"fb(ab({BURST}))", "ab = z.alloc_bulk; fb = z.free_bulk"
    return {
        "default_bucket": zone.bucket_size,
        "pair": _us(pair, pair_setup, {"z": zone}, n["pair"], repeat),
        "burst": _us(burst, f"{pair_setup}; r = range({BURST})", {"z": zone}, n["burst"],
                     repeat, BURST),
        "bulk64": _us(bulk, bulk_setup, {"z": bulk64}, n["bulk"], repeat, BURST),
        "bulk_default": _us(bulk, bulk_setup, {"z": zone}, n["bulk"], repeat, BURST),
        "nocache": _us(pair, pair_setup, {"z": nocache}, n["nocache"], repeat),
        "locks_per_bucket": _locks_per_bucket(arena, arena.zcreate("steady", ITEM),
                                              n["steady"]),
    }


def _profile_bulk(zone, count, path):
    """``count`` rounds of alloc_bulk(BURST) + free_bulk under cProfile, dumped to ``path``."""
    import cProfile
    ab, fb = zone.alloc_bulk, zone.free_bulk

    def rounds():
        for _ in range(count):
            fb(ab(BURST))
    rounds()                                                  # warm up
    prof = cProfile.Profile()
    prof.runcall(rounds)
    prof.dump_stats(path)


def _locks_per_bucket(arena, zone, bursts):
    """Zone-lock acquisitions per bucket moved (depot get or put, keg import) over
    ``bursts`` bursts of BURST allocs then frees, after a warm-up."""
    lock = f"zone:{zone.name}"

    def sample():
        acq = next(s.acquisitions for s in arena.lock_stats() if s.name == lock)
        me = next(s for s in arena.cpu_stats() if s.cpu == arena.cpu_id)
        return acq, me.depot_gets + me.depot_puts + me.keg_imports

    def churn(k):
        for _ in range(k):
            hs = [zone.alloc() for _ in range(BURST)]
            for h in hs:
                zone.free(h)

    churn(10)
    acq0, buckets0 = sample()
    churn(bursts)
    acq1, buckets1 = sample()
    return (acq1 - acq0) / max(1, buckets1 - buckets0)


def _measure_peers(n, repeat):
    """Times (µs) of the stdlib peers and the Python floor."""
    heap = "from multiprocessing.heap import BufferWrapper as BW"
    return {
        "heap": _us(f"BW({ITEM})", heap, None, n["heap"], repeat),
        "heap_burst": _us(f"ws = [BW({ITEM}) for _ in r]\ndel ws",
                          f"{heap}; r = range({BURST})", None, n["heap_burst"], repeat, BURST),
        "shm": _us(f"s = SM(create=True, size={ITEM}); s.close(); s.unlink()",
                   "from multiprocessing.shared_memory import SharedMemory as SM", None,
                   n["shm"], repeat),
        "floor": _us("ap(po())", "lst = [0] * 64; ap = lst.append; po = lst.pop", None,
                     n["floor"], repeat),
    }


def _env():
    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu": cpu, "cpu_count": os.cpu_count(), "loadavg_before": _loadavg(),
           "dev_shm_free": bench_scale.shm_free(), "git": _git()}
    try:
        from importlib import metadata
        env["faster_fifo"] = metadata.version("faster-fifo")
    except Exception:                               # noqa: BLE001 (not installed)
        env["faster_fifo"] = None
    return env


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git():
    """The source tree's commit (with "+dirty" if it has local changes), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _lines(path):
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


# ------------------------------------------------------------------------ output
def _num(v, unit):
    if v is None:
        return "-"
    if v < 10:
        text = f"{v:.3f}"
    elif v < 1000:
        text = f"{v:.1f}"
    else:
        text = f"{v:,.0f}"
    return f"{text} {unit}".rstrip()


def print_table(results, out=None):
    """Print metric, shmalloc, peer, ratio, target, verdict: one line per result."""
    out = out or sys.stdout
    lines = []
    for r in results.values():
        peer = f"{r['peer']} {_num(r['peer_value'], r['unit'])}" if r["peer"] else "-"
        ratio = f"{r['ratio']:.3g}x" if r["ratio"] is not None else "-"
        verdict = {True: "ok", False: "MISSED", None: ""}[r["ok"]]
        lines.append((r["label"], _num(r["value"], r["unit"]), peer, ratio,
                      r["target"] or "-", verdict))
    head = ("metric", "shmalloc", "peer", "ratio", "target", "verdict")
    wl, wv, wp, wr, wt = (max(len(x[i]) for x in [head, *lines]) for i in range(5))
    for label, value, peer, ratio, target, verdict in [head, *lines]:
        out.write(f"{label:<{wl}}  {value:>{wv}}  {peer:<{wp}}  {ratio:>{wr}}  "
                  f"{target:<{wt}}  {verdict}".rstrip() + "\n")
    out.flush()


def print_handoff(recs, out=None):
    """The hand-off matrix: per size and transport, items/s, MB/s and the ratios."""
    out = out or sys.stdout
    if not recs:
        return
    out.write("\nhand-off, producer -> consumer, two processes (best of the runs; "
              "ratio = shmalloc / transport)\n")
    out.write(f"{'size':>7}  {'transport':<21} {'items/s':>10} {'MB/s':>8} {'us/item':>8}  "
              f"{'shmalloc is':>11}\n")
    for size in sorted({r["size"] for r in recs}):
        at = [r for r in recs if r["size"] == size]
        shm = next(r for r in at if r["transport"] == "shmalloc")
        for r in at:
            ratio = "" if r is shm else f"{shm['items_per_s'] / r['items_per_s']:.2f}x"
            name = r["transport"] + (f" (batch {r['batch']})" if r.get("batch") else "")
            out.write(f"{_size_label(size):>7}  {name:<21} {r['items_per_s']:>10,.0f} "
                      f"{r['mb_per_s']:>8,.0f} {r['us_per_item']:>8.2f}  {ratio:>11}\n")
    out.flush()


def print_dask(res, out=None):
    """The Dask matrix: per size and setup, end-to-end and transfer times, bytes on
    the comm, and Dask's default over each."""
    out = out or sys.stdout
    if not res:
        return
    out.write(f"\nDask, worker A -> worker B, LocalCluster of 2 processes (best of "
              f"{res['rounds']} rounds; ratio = Dask's frames / setup)\n")
    out.write(f"{'size':>7}  {'setup':<15} {'transfer':>9} {'touch':>7} {'fetch+read':>10} "
              f"{'e2e':>7} {'wire bytes':>12}  {'ratio fetch+read':>16} {'ratio e2e':>9}\n")
    recs = res["records"]
    for size in sorted({r["size"] for r in recs}):
        at = {r["setup"]: r for r in recs if r["size"] == size}
        d = at["dask"]
        for setup, r in at.items():
            rfr = "" if r is d else f"{d['fetch_read'] / r['fetch_read']:.2f}x"
            re2e = "" if r is d else f"{d['e2e'] / r['e2e']:.2f}x"
            out.write(f"{_size_label(size):>7}  {setup:<15} {1e3 * r['transfer']:>9.1f} "
                      f"{1e3 * r['touch']:>7.1f} {1e3 * r['fetch_read']:>10.1f} "
                      f"{1e3 * r['e2e']:>7.1f} {r['wire']:>12,}  {rfr:>16} {re2e:>9}\n")
    out.write("(milliseconds; transfer: Dask's transfer_incoming_log on B; touch: B's task "
              "reading a byte per page; e2e: submit to result)\n")
    out.flush()


def print_app(res, out=None):
    """The app section's details: the pickle split, the pool's three setups, the
    per-item hand-off's zone."""
    out = out or sys.stdout
    if not res:
        return
    out.write("\nwhere applications meet it (best of the rounds)\n")
    for r in res["alloc"]:
        out.write(f"  alloc+close {_size_label(r['size']):>7}: {r['us']:7.2f} us   SharedMemory "
                  f"{r['shm_us']:7.2f} us   {r['shm_us'] / r['us']:5.1f}x\n")
    p = res["pickle"]
    out.write(f"  pickle, {_size_label(p['size'])} Buffer: dumps {p['dump_us']:.2f} + loads+close "
              f"{p['load_close_us']:.2f} = {p['us']:.2f} us; SharedMemory by name: dumps "
              f"{p['shm_dump_us']:.2f} + loads+close {p['shm_load_close_us']:.2f} = "
              f"{p['shm_us']:.2f} us\n")
    if res["pool"]:
        sec = res["pool"]["seconds"]
        out.write(f"  ProcessPoolExecutor(2).map, {res['pool']['arrays']} arrays of "
                  f"{_size_label(res['pool']['bytes'])}: "
                  + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in sec.items()) + "\n")
    h = res["handoff"]
    out.write(f"  per-item hand-off, {_size_label(h['size'])}, batches of {h['batch']}, limit "
              f"{h['limit']}, bucket {h['bucket']}: "
              + ", ".join(f"{k} {v:,.0f}/s" for k, v in h["items_per_s"].items()) + "\n")
    out.flush()


def print_report(report, out=None):
    """The table, the hand-off matrix, then the run's environment and notes."""
    out = out or sys.stdout
    print_table(report["results"], out)
    print_handoff(report.get("handoff"), out)
    bench_debug.print_table(report.get("debug"), out)
    print_dask(report.get("dask"), out)
    print_app(report.get("app"), out)
    env = report["env"]
    out.write(f"\n{report['params']['command']}: CPython {env['python']}, "
              f"{env['cpu_count']} CPUs ({env['cpu']}), git {env['git']}, "
              f"load {env['loadavg_before']} -> {env['loadavg_after']}; "
              f"seconds {report['seconds']}\n")
    for note in report["notes"]:
        out.write(f"note: {note}\n")
    out.flush()


if __name__ == "__main__":       # python -m shmalloc.scripts.bench: as `shmalloc bench`
    from .cli import main
    sys.exit(main(["bench", *sys.argv[1:]]))
