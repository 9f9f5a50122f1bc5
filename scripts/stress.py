"""``shmalloc stress``: how UMA's design behaves under lock contention.

A seeded sweep over workers x bucket size x workload x cross-CPU free mode
(``workers.stress``), one fresh arena per configuration, with a live line while
each runs.  For each configuration it prints its row, DPDK mempool_perf's rate line
(``workers=W bucket=B bulk=K ops/s=R``) and the lock profile of the timed window
(the ``--top`` locks by contended acquisitions, as ``shmalloc lockstat`` prints
it); then the table of every row, ``--json`` records and an optional ``--plot``:
FILE.png (throughput and zone-lock contention against workers, one line per bucket
size) and FILE-hist.png (the zone lock's log2 histograms of wait and hold, one line
per configuration); the plots need matplotlib: ``pip install 'shmalloc[plot]'``.

    shmalloc stress --workers 1,2,4 --bucket-sizes 0,16,64,adaptive \\
                    --workloads churn,pipeline,bulk --xfree message,local --seconds 2
"""

import argparse
import json
import os
import random
import sys

from shmalloc.ipc.lock import HIST_BUCKETS
from shmalloc.stats import format_lock_profile
from shmalloc.workers.stress import WORKLOADS, XFREE_MODES, rate_line, sweep

from . import positive_int

DEFAULTS = {"workers": "1,2", "bucket_sizes": "0,16,adaptive", "workloads": "churn,pipeline",
            "xfree": "message,local", "seconds": 1.0, "top": 4}


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
    p.add_argument("--name", metavar="ARENA",
                   help="prefix of the arenas the sweep creates (default: stress<pid>)")
    p.add_argument("--json", metavar="FILE", help="write the records as JSON")
    p.add_argument("--top", type=positive_int, default=DEFAULTS["top"], metavar="N",
                   help="locks in each configuration's lock profile, most contended first "
                        f"(default {DEFAULTS['top']})")
    p.add_argument("--plot", metavar="FILE.png", help="plot throughput and contention to "
                   "FILE.png and the zone lock's wait and hold histograms to FILE-hist.png")


def run(args):
    if not 0 < args.seconds <= 60:
        print("shmalloc stress: --seconds must be in (0, 60]", file=sys.stderr)
        return 2
    seed = random.randrange(1 << 31) if args.seed is None else args.seed
    live = sys.stdout.isatty()
    print(f"shmalloc stress: seed {seed}, {args.seconds:g} s per configuration")

    def progress(label, t, ops):
        if live:
            sys.stdout.write(f"\r  running {label}: {t:4.1f} s, {ops:,} ops   ")
            sys.stdout.flush()

    def record(rec):
        if live:
            sys.stdout.write("\r" + " " * 78 + "\r")
        print("\n" + format_point(rec, args.top), end="", flush=True)

    records = sweep(args.workers, args.bucket_sizes, args.workloads, args.xfree, args.seconds,
                    seed, on_record=record, on_progress=progress, name=args.name)
    print(f"\nshmalloc stress: {len(records)} configuration(s), seed {seed}")
    print(HEADER)
    for rec in records:
        print(format_row(rec))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in records], f, indent=1)
    if args.plot:
        plot(records, args.plot)
        print(f"plot: {args.plot}")
        plot_hist(records, hist_path(args.plot))
        print(f"plot: {hist_path(args.plot)}")
    return 0


def format_point(rec, top: int) -> str:
    """One configuration: its row (with the header), the rate line and the lock
    profile of its timed window, the ``top`` locks by contended acquisitions."""
    return (f"{HEADER}\n{format_row(rec)}\n{rate_line(rec)}\n"
            + format_lock_profile(rec.locks, sort="contended", top=top))


HEADER = (f"{'W':>2} {'BUCKET':>8} {'WORKLOAD':>9} {'XFREE':>7} {'OPS/S':>11} {'PER CPU':>9} "
          f"{'ZLOCK/OP':>9} {'KLOCK/OP':>9} {'CONT%':>6} {'WAIT us':>8} {'P99 us':>7} "
          f"{'MISS':>8} {'DEPOT/KOP':>9} {'MSGS':>6} {'ITEMS/MSG':>9}")


def format_row(r) -> str:
    per_cpu = sum(r.ops_per_s_per_cpu) / len(r.ops_per_s_per_cpu)
    miss = f"1/{1 / r.miss_rate:,.0f}" if r.miss_rate else "0"
    p99 = "-" if r.p99_wait_us is None else ("long" if r.p99_wait_us == float("inf")
                                               else f"<{r.p99_wait_us:.0f}")
    return (f"{r.workers:>2} {r.bucket_size:>8} {r.workload:>9} {r.xfree:>7} "
            f"{r.ops_per_s:>11,.0f} {per_cpu:>9,.0f} {r.zone_lock_acquisitions_per_op:>9.4f} "
            f"{r.keg_lock_acquisitions_per_op:>9.4f} {100 * r.contended_share:>6.1f} "
            f"{r.mean_wait_us:>8.1f} {p99:>7} {miss:>8} {r.depot_ops_per_kop:>9.2f} "
            f"{r.messages:>6} {r.items_per_message:>9.1f}")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("shmalloc stress: --plot needs matplotlib (pip install 'shmalloc[plot]')")
    return plt


def hist_path(path: str) -> str:
    """Where ``--plot FILE.png`` puts the histogram plot: FILE-hist.png."""
    root, ext = os.path.splitext(path)
    return f"{root}-hist{ext or '.png'}"


def plot(records, path):
    """Throughput and contended share against workers, a line per bucket size,
    a column per (workload, xfree)."""
    plt = _pyplot()
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
    plt.close(fig)


def _bucket_label(k: int) -> str:
    """Lower bound of histogram bucket ``k`` (ns) as 0, 1K, 2M, 4G."""
    lo = 0 if k == 0 else 1 << (k + 9)
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if lo >= 1 << shift:
            return f"{lo >> shift}{unit}"
    return str(lo)


def plot_hist(records, path):
    """The stress zone lock's log2 histograms over each timed window: contended waits
    (top row) and holds (bottom row), a line per (workers, bucket size), a column per
    (workload, xfree); counts on a symmetric log scale (0 shows), buckets labelled by
    their lower bound."""
    plt = _pyplot()
    groups = sorted({(r.workload, r.xfree) for r in records})
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 7), squeeze=False)
    edges = [k - 0.5 for k in range(HIST_BUCKETS + 1)]
    for col, (wl, xf) in enumerate(groups):
        used = []
        for r in sorted((r for r in records if (r.workload, r.xfree) == (wl, xf)),
                        key=lambda r: (r.bucket_size, r.workers)):
            z = r.zone_lock()
            if z is None:
                continue
            label = f"{r.workers} W, bucket {r.bucket_size}"
            for row, h in enumerate((z.wait_hist, z.hold_hist)):
                if any(h):
                    axes[row][col].stairs(h, edges, label=label)
                    used += [k for k, n in enumerate(h) if n]
        lo, hi = (min(used), max(used)) if used else (0, HIST_BUCKETS - 1)
        for row, what in enumerate(("contended waits", "holds")):
            ax = axes[row][col]
            ax.set_yscale("symlog", linthresh=1)
            ax.set_ylim(bottom=0)
            ax.set_xlim(lo - 0.5, hi + 0.5)
            ticks = list(range(lo, hi + 1))
            ax.set_xticks(ticks)
            ax.set_xticklabels([_bucket_label(k) for k in ticks], rotation=60, fontsize="small")
            ax.set_ylabel(f"zone lock {what}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="x-small")
        axes[0][col].set_title(f"{wl} (xfree={xf})")
        axes[1][col].set_xlabel("ns, log2 buckets (lower bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":       # python -m shmalloc.scripts.stress: as `shmalloc stress`
    from .cli import main
    sys.exit(main(["stress", *sys.argv[1:]]))
