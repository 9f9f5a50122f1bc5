"""``shmalloc bench``: shmalloc's fast and slow paths against the Python peers, in one run.

Measured on this machine, in this process, with ``timeit`` (best of ``--repeat``):

    (a) alloc+free pair on a cache hit (2048-byte items), against
        multiprocessing.heap.BufferWrapper(2048) create+drop, a SharedMemory segment per
        buffer (create+close+unlink) and the Python floor ``lst.append(lst.pop())``
    (b) 64 allocs then 64 frees, per pair (overflows the cache: depot traffic)
    (c) alloc_bulk(64) + free_bulk, per item, with bucket_size=64 and with the default
    (d) zone-lock acquisitions per bucket moved, in a steady-state churn
    (e) the pair with bucket_size=0 (every operation takes the zone lock)

Ratios are peer time / shmalloc time: above 1, shmalloc is faster.
``python -m shmalloc.scripts.bench ARGS`` is ``shmalloc bench ARGS``.
"""

import json
import os
import platform
import secrets
import sys
import timeit

from shmalloc import Arena

from . import bench_mbuf, positive_int

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


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="tiny iteration counts (a smoke test, seconds)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--repeat", type=positive_int, default=3, metavar="K",
                        help="timings per measurement, the best is kept (default 3)")
    parser.add_argument("--name", metavar="ARENA",
                        help="name of the arena the benchmark creates (default: bench<pid><hex>)")


def run(args):
    """Measure, print the table, write JSON if asked; 0 (targets missed are reported only)."""
    report = measure(quick=args.quick, repeat=args.repeat, name=args.name)
    print_table(report["results"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def main(argv=None):
    """``shmalloc bench`` with ``argv`` (default: the command line)."""
    from .cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


# ------------------------------------------------------------------------ timing
def _us(stmt, setup="pass", ns=None, number=1, repeat=3, per=1):
    """Best-of-``repeat`` µs per run of ``stmt`` (``number`` runs per timing) / ``per``.

    ``setup`` runs inside the timed function, so names it binds are locals.
    """
    timer = timeit.Timer(stmt, setup, globals=ns or {})
    timer.timeit(max(1, number // 10))                       # warm up
    return min(timer.repeat(repeat, number)) / number / per * 1e6


def measure(quick=False, repeat=3, name=None):
    """Run every measurement on a new arena ``name`` (default unique); a dict: env, params,
    results (metric -> row)."""
    n = {k: v[1] if quick else v[0] for k, v in COUNTS.items()}
    arena = Arena.create(name or f"bench{os.getpid()}{secrets.token_hex(4)}", ARENA_SIZE)
    try:
        shm = _measure_shmalloc(arena, n, repeat)
    finally:
        arena.destroy()
    peer = _measure_peers(n, repeat)
    results = {}

    def row(key, label, value, unit, peer_name=None, peer_value=None, target=None, ok=None):
        ratio = peer_value / value if peer_value is not None and value else None
        results[key] = {"label": label, "value": value, "unit": unit, "peer": peer_name,
                        "peer_value": peer_value, "ratio": ratio, "target": target, "ok": ok}

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
    _mbuf_rows(row, quick)
    return {"env": _env(), "params": {"quick": quick, "repeat": repeat, "counts": n,
                                      "item_size": ITEM},
            "results": results}


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
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count()}


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
    return f"{v:.3f} {unit}".rstrip() if v < 10 else f"{v:,.1f} {unit}".rstrip()


def print_table(results, out=sys.stdout):
    """Print metric, shmalloc, peer, ratio, target, verdict: one line per result."""
    out.write(f"{'metric':<42} {'shmalloc':>10}  {'peer':<32} {'ratio':>8}  "
              f"{'target':<20} verdict\n")
    for r in results.values():
        peer = f"{r['peer']} {_num(r['peer_value'], r['unit'])}" if r["peer"] else "-"
        ratio = f"{r['ratio']:.3g}x" if r["ratio"] is not None else "-"
        verdict = {True: "ok", False: "MISSED", None: ""}[r["ok"]]
        out.write(f"{r['label']:<42} {_num(r['value'], r['unit']):>10}  {peer:<32} {ratio:>8}  "
                  f"{r['target'] or '-':<20} {verdict}\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
