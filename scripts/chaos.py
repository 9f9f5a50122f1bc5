"""``shmalloc chaos``: seeded fault injection at scale (issue #7).

    shmalloc chaos [--seed N] [--workers 4] [--kills 100] [--manager-kills 3]
                   [--workloads pipeline,refcount] [--killpoints SPEC|default|none]
                   [--round-kills 25] [--timeout SECONDS] [--json FILE] [-q]

Runs the pipeline and refcount workloads on fleets of worker CPUs under a keg
manager, SIGKILLs workers at random moments while others die at the kill points
inside locked sections, SIGKILLs the manager and adopts its arena, replaces every
dead worker, and proves after each round that no item was lost, no lock was held
longer than about two seconds, the workers kept going, ``check()`` passes and no OS
object is left (``workers.chaos``).  Prints a progress line, the managers' and the
harness's log lines (unless ``-q``), and a final report; exit status 1 on any
failure, with the seed to run it again.

``python -m shmalloc.scripts.chaos ARGS`` is ``shmalloc chaos ARGS``.
"""

import argparse
import json
import sys

from shmalloc.debug import _parse
from shmalloc.workers import chaos as harness
from . import positive_int, positive_seconds


def _workloads(text):
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in harness.WORKLOADS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"workloads are of {', '.join(harness.WORKLOADS)}, "
                                         f"not {text!r}")
    return items


def _killpoints(text):
    """argparse type: 'default' (each workload's), 'none', or a kill-point spec."""
    if text == "default":
        return None
    if text == "none":
        return ""
    try:
        _parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _nonnegative(text):
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return n


def add_arguments(p):
    p.add_argument("--seed", type=int, help="seed of the kills and workloads (default random, "
                   "printed)")
    p.add_argument("--workers", type=positive_int, default=4, metavar="N",
                   help="worker CPUs per fleet (default 4, at least 2)")
    p.add_argument("--kills", type=positive_int, default=100, metavar="N",
                   help="workers to kill in all, at random moments and at kill points "
                   "(default 100)")
    p.add_argument("--manager-kills", type=_nonnegative, default=3, metavar="N",
                   help="times the keg manager is SIGKILLed and adopted (default 3)")
    p.add_argument("--workloads", type=_workloads, default=list(harness.WORKLOADS),
                   metavar="W[,W]", help="of pipeline, refcount; rounds take turns "
                   "(default pipeline,refcount)")
    p.add_argument("--killpoints", type=_killpoints, default=None, metavar="SPEC",
                   help="SHMALLOC_KILLPOINTS for the workers: 'default' (tuned per "
                   "workload), 'none', or name[:prob],... (see shmalloc/debug.py)")
    p.add_argument("--round-kills", type=positive_int, default=harness.ROUND_KILLS,
                   metavar="N", help="deaths per round: a fresh arena and fleet each "
                   f"(default {harness.ROUND_KILLS})")
    p.add_argument("--timeout", type=positive_seconds, default=harness.TIMEOUT,
                   metavar="SECONDS", help=f"bound on the whole run (default {harness.TIMEOUT:g})")
    p.add_argument("--lock-limit", type=positive_seconds, default=harness.LOCK_LIMIT,
                   metavar="SECONDS", help="longest lock hold or wait allowed "
                   f"(default {harness.LOCK_LIMIT:g})")
    p.add_argument("--name", help="arena name prefix (default chaos<pid><hex>)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no log lines, only the progress line and the report")


def run(args):
    """Run the chaos; 0 if every proof held, else 1 (the seed is printed)."""
    if args.workers < 2:
        print("shmalloc chaos: --workers must be at least 2", file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()

    def say(text):
        print(("\r\033[K" if tty else "") + text, flush=True)

    def progress(text):
        if tty:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
        else:
            print(text, flush=True)

    import random
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    say(f"shmalloc chaos: seed {seed}, {args.workers} workers, {args.kills} kills, "
        f"{args.manager_kills} manager kills, workloads {','.join(args.workloads)}, "
        f"kill points {'default' if args.killpoints is None else args.killpoints or 'none'}, "
        f"timeout {args.timeout:g} s")
    res = harness.chaos(seed=seed, workers=args.workers, kills=args.kills,
                        manager_kills=args.manager_kills, workloads=args.workloads,
                        killpoints=args.killpoints, round_kills=args.round_kills,
                        timeout=args.timeout, lock_limit=args.lock_limit, name=args.name,
                        log=None if args.quiet else say, progress=progress)
    if tty:
        print()
    for line in harness.report_lines(res):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if not res["ok"]:
        print(f"shmalloc chaos: FAILED; run again with --seed {seed}", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":       # python -m shmalloc.scripts.chaos: as `shmalloc chaos`
    from .cli import main
    sys.exit(main(["chaos", *sys.argv[1:]]))
