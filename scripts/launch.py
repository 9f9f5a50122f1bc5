"""``shmalloc launch``: run a keg manager and N worker CPUs on a private arena, then
report and clean up.

    shmalloc launch [-n N] [--workload churn|pipeline|refcount] [--seconds S]
                    [--kill-every SECONDS] [--kill-manager] [--size BYTES] [--seed SEED]
                    [--name ARENA]

``python -m shmalloc.scripts.launch ARGS`` is ``shmalloc launch ARGS``; the work is done by
``workers.launcher.launch``.
"""

import argparse
import sys

from shmalloc.workers.launcher import WORKLOAD_NAMES, launch
from . import positive_int, positive_seconds

MAX_SECONDS = 10.0


def _seconds(text):
    """argparse type: a run length in (0, MAX_SECONDS] seconds."""
    s = float(text)
    if not 0 < s <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_SECONDS:g}] seconds, not {text}")
    return s


def add_arguments(parser):
    parser.add_argument("-n", "--workers", type=positive_int, default=4, metavar="N",
                        help="worker CPUs to start (default 4)")
    parser.add_argument("--seconds", type=_seconds, default=5.0, metavar="S",
                        help=f"how long the workers churn, at most {MAX_SECONDS:g} (default 5)")
    parser.add_argument("--size", type=positive_int, default=64 << 20, metavar="BYTES",
                        help="arena size in bytes (default 64 MiB)")
    parser.add_argument("--seed", type=int, help="workload seed (default: random, printed)")
    parser.add_argument("--name", help="arena name (default: launch<pid><random hex>)")
    parser.add_argument("--workload", choices=WORKLOAD_NAMES, default="churn",
                        help="churn: random allocs and frees over three zones; pipeline: "
                        "CPU 0 builds packets that go round a ring of CPUs, copied and "
                        "dropped on the way; refcount: copies of shared clusters scattered "
                        "over the CPUs and freed concurrently (default churn)")
    parser.add_argument("--kill-every", type=positive_seconds, metavar="SECONDS",
                        help="SIGKILL a random worker every SECONDS; a new one takes its "
                        "place and the keg manager recovers what the dead one held")
    parser.add_argument("--strict", action="store_true",
                        help="refuse an arena larger than /dev/shm has room for (default: "
                        "the manager warns)")
    parser.add_argument("--kill-manager", action="store_true",
                        help="SIGKILL the keg manager halfway and adopt the arena with a "
                        "new one (shmalloc serve --adopt)")


def run(args):
    """Launch as ``args`` says; 0 if every worker succeeded (the killed ones aside),
    check passed and no OS object was left, else 1."""
    summary = launch(n=args.workers, seconds=args.seconds, size=args.size, seed=args.seed,
                     name=args.name, workload=args.workload, kill_every=args.kill_every,
                     kill_manager=args.kill_manager, strict=args.strict)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":       # python -m shmalloc.scripts.launch: as `shmalloc launch`
    from .cli import main
    sys.exit(main(["launch", *sys.argv[1:]]))
