"""``shmalloc launch``: run N worker CPUs on a private arena, then report and clean up.

``python -m shmalloc.scripts.launch ARGS`` is ``shmalloc launch ARGS``; the work is done by
``workers.launcher.launch``.
"""

import argparse
import sys

from shmalloc.workers.launcher import launch
from . import positive_int

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


def run(args):
    """Launch as ``args`` says; 0 if every worker succeeded and check passed, else 1."""
    summary = launch(n=args.workers, seconds=args.seconds, size=args.size, seed=args.seed,
                     name=args.name)
    return 0 if summary["ok"] else 1


def main(argv=None):
    """``shmalloc launch`` with ``argv`` (default: the command line)."""
    from .cli import main as cli_main
    return cli_main(["launch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
