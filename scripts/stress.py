"""``shmalloc stress``: how UMA's design behaves under lock contention.

A seeded sweep over workers x bucket size x workload x cross-CPU free mode
(``workers.stress``), one fresh arena per configuration, with a live line while
each runs, a table at the end, ``--json`` records and an optional ``--plot``
(throughput and zone-lock contention against workers, one line per bucket size;
needs matplotlib: ``pip install 'shmalloc[plot]'``).

    shmalloc stress --workers 1,2,4 --bucket-sizes 0,16,64,adaptive \\
                    --workloads churn,pipeline,bulk --xfree message,local --seconds 2
"""

import argparse
import json
import random
import sys

from shmalloc.workers.stress import WORKLOADS, XFREE_MODES, sweep

DEFAULTS = {"workers": "1,2", "bucket_sizes": "0,16,adaptive", "workloads": "churn,pipeline",
            "xfree": "message,local", "seconds": 1.0}


def _list(kind, allowed=None, ints=False):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        for x in items:
            if allowed is not None and x not in allowed:
                raise argparse.ArgumentTypeError(f"{kind} {x!r} is not one of {', '.join(allowed)}")
            if ints and not (x.isdigit() and int(x) > 0):
                raise argparse.ArgumentTypeError(f"{kind} {x!r} is not a positive integer")
        return [int(x) for x in items] if ints else items
    parse.__name__ = kind
    return parse


def _bucket(text):
    items = _list("bucket size")(text)
    for x in items:
        if x != "adaptive" and not (x.isdigit() and int(x) <= 254):
            raise argparse.ArgumentTypeError(f"bucket size {x!r} is not 0..254 or 'adaptive'")
    return items


def add_arguments(p):
    p.add_argument("--workers", type=_list("workers", ints=True), default=DEFAULTS["workers"],
                   help=f"worker CPU counts (default {DEFAULTS['workers']})")
    p.add_argument("--bucket-sizes", type=_bucket, default=DEFAULTS["bucket_sizes"],
                   help="0 (no cache), fixed sizes, 'adaptive' "
                        f"(default {DEFAULTS['bucket_sizes']})")
    p.add_argument("--workloads", type=_list("workload", WORKLOADS),
                   default=DEFAULTS["workloads"], help=f"of {', '.join(WORKLOADS)}")
    p.add_argument("--xfree", type=_list("xfree mode", XFREE_MODES), default=DEFAULTS["xfree"],
                   help="cross-CPU free modes for the pipeline (message, local)")
    p.add_argument("--seconds", type=float, default=DEFAULTS["seconds"],
                   help="timed run per configuration (default 1)")
    p.add_argument("--seed", type=int, help="seed (default random, printed)")
    p.add_argument("--json", metavar="FILE", help="write the records as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot throughput and contention")


def run(args):
    if not 0 < args.seconds <= 60:
        print("shmalloc stress: --seconds must be in (0, 60]", file=sys.stderr)
        return 2
    seed = random.randrange(1 << 31) if args.seed is None else args.seed
    live = sys.stdout.isatty()
    print(f"shmalloc stress: seed {seed}, {args.seconds:g} s per configuration")
    print(HEADER)

    def progress(label, t, ops):
        if live:
            sys.stdout.write(f"\r  running {label}: {t:4.1f} s, {ops:,} ops   ")
            sys.stdout.flush()

    def record(rec):
        if live:
            sys.stdout.write("\r" + " " * 78 + "\r")
        print(format_row(rec), flush=True)

    records = sweep(args.workers, args.bucket_sizes, args.workloads, args.xfree, args.seconds,
                    seed, on_record=record, on_progress=progress)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in records], f, indent=1)
    if args.plot:
        plot(records, args.plot)
        print(f"plot: {args.plot}")
    return 0


HEADER = (f"{'W':>2} {'BUCKET':>8} {'WORKLOAD':>9} {'XFREE':>7} {'OPS/S':>11} {'PER CPU':>9} "
          f"{'ZLOCK/OP':>9} {'KLOCK/OP':>9} {'CONT%':>6} {'WAIT us':>8} {'P99 us':>7} "
          f"{'MISS':>8} {'DEPOT/KOP':>9} {'MSGS':>6} {'ITEMS/MSG':>9}")


def format_row(r) -> str:
    per_cpu = sum(r.ops_per_s_per_cpu) / len(r.ops_per_s_per_cpu)
    miss = f"1/{1 / r.miss_rate:,.0f}" if r.miss_rate else "0"
    p99 = "-" if r.p99_wait_us is None else ("long" if r.p99_wait_us == float("inf")
                                               else f"<{r.p99_wait_us:g}")
    return (f"{r.workers:>2} {r.bucket_size:>8} {r.workload:>9} {r.xfree:>7} "
            f"{r.ops_per_s:>11,.0f} {per_cpu:>9,.0f} {r.zone_lock_acquisitions_per_op:>9.4f} "
            f"{r.keg_lock_acquisitions_per_op:>9.4f} {100 * r.contended_share:>6.1f} "
            f"{r.mean_wait_us:>8.1f} {p99:>7} {miss:>8} {r.depot_ops_per_kop:>9.2f} "
            f"{r.messages:>6} {r.items_per_message:>9.1f}")


def plot(records, path):
    """Throughput and contended share against workers, a line per bucket size,
    a column per (workload, xfree)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("shmalloc stress: --plot needs matplotlib (pip install 'shmalloc[plot]')")
    groups = sorted({(r.workload, r.xfree) for r in records})
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 7), squeeze=False)
    for col, (wl, xf) in enumerate(groups):
        for bucket in sorted({r.bucket_size for r in records}):
            rs = sorted((r for r in records if (r.workload, r.xfree, r.bucket_size)
                         == (wl, xf, bucket)), key=lambda r: r.workers)
            if not rs:
                continue
            xs = [r.workers for r in rs]
            axes[0][col].plot(xs, [r.ops_per_s for r in rs], marker="o", label=f"bucket {bucket}")
            axes[1][col].plot(xs, [100 * r.contended_share for r in rs], marker="o",
                              label=f"bucket {bucket}")
        axes[0][col].set_title(f"{wl} (xfree={xf})")
        axes[0][col].set_ylabel("ops/s")
        axes[1][col].set_ylabel("zone lock contended %")
        axes[1][col].set_xlabel("workers")
        axes[0][col].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":       # python -m shmalloc.scripts.stress: as `shmalloc stress`
    from .cli import main
    sys.exit(main(["stress", *sys.argv[1:]]))
