"""``python -m shmalloc.scripts.soak``: a long churn that watches for leaks.

    python -m shmalloc.scripts.soak --workers 2 --ops 10000000 --plot soak.png

N workers churn over zones of 256, 2048 and 9216 bytes until the total number of
operations is reached; every second the RSS of each worker and the arena's
usage (free pages, items out of the slabs) are sampled and printed.  Flat lines
mean no leak.  Documented in docs/operations.md; not run in CI (a tiny smoke run is).
"""

import argparse
import json
import sys
from dataclasses import asdict

from shmalloc.workers.soak import soak


def main(argv=None):
    p = argparse.ArgumentParser(prog="shmalloc-soak", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ops", type=int, default=10_000_000)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--size", type=int, default=64 << 20)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    args = p.parse_args(argv)
    if args.workers < 1 or args.ops < 1 or args.interval <= 0:
        p.error("workers, ops and interval must be positive")
    print(f"{'T':>7} {'OPS':>12} {'RSS MB (per worker)':>24} {'FREE PAGES':>11} {'ITEMS':>8}")

    def show(s):
        print(f"{s.t:>7.1f} {s.ops:>12,} {' '.join(f'{r:.1f}' for r in s.rss_mb):>24} "
              f"{s.free_pages:>11} {s.items:>8}", flush=True)

    r = soak(args.workers, args.ops, args.interval, args.size, args.seed, on_sample=show)
    print(f"seed {r.seed}: {r.ops:,} operations in {r.seconds:.1f} s "
          f"({r.ops / r.seconds:,.0f}/s); check: ok")
    if r.samples:
        first, last = r.samples[0], r.samples[-1]
        print(f"RSS per worker, first -> last sample: "
              f"{', '.join(f'{a:.1f} -> {b:.1f} MB' for a, b in zip(first.rss_mb, last.rss_mb))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": r.seed, "ops": r.ops, "seconds": r.seconds,
                       "samples": [asdict(s) for s in r.samples]}, f, indent=1)
    if args.plot:
        _plot(r, args.plot)
    return 0


def _plot(r, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install 'shmalloc[plot]')")
    ts = [s.t for s in r.samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for i in range(len(r.samples[0].rss_mb)):
        ax1.plot(ts, [s.rss_mb[i] for s in r.samples], label=f"worker {i}")
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(fontsize="small")
    ax2.plot(ts, [s.free_pages for s in r.samples], label="free pages")
    ax2.plot(ts, [s.items for s in r.samples], label="items out of slabs")
    ax2.set_xlabel("seconds")
    ax2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
