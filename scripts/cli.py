"""The ``shmalloc`` command line: ``shmalloc COMMAND --help`` for each command; every
command and option is in docs/cli.md, which tests/test_docs.py keeps equal to
this parser.

Exit status: 0 ok, 1 failure, 2 usage.
"""

import argparse
import errno
import itertools
import sys
import time

from shmalloc import Arena, CorruptionError, ShmallocError, admin
from shmalloc import stats as shm_stats
from shmalloc.ipc import naming
from shmalloc.workers import manager
from shmalloc.mbuf import NETSTAT_FORMATS, SYSCTLS, SysctlError

from . import bench, chaos, launch, positive_int, stress


def main(argv=None):
    """Run the command in ``argv`` (default: the command line); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"shmalloc {args.command}: interrupted", file=sys.stderr)
        return 130
    except ShmallocError as e:
        print(f"shmalloc {args.command}: {e}", file=sys.stderr)
        return 1


def _parser():
    parser = argparse.ArgumentParser(prog="shmalloc", description="FreeBSD's UMA slab "
                                     "allocator on POSIX shared memory: tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, run, help, add_arguments=None):
        p = sub.add_parser(name, help=help, description=help)
        if add_arguments is not None:
            add_arguments(p)
        p.set_defaults(run=run)
        return p

    command("launch", launch.run, "start a keg manager and N worker CPUs on a private arena, "
            "report, clean up",
            launch.add_arguments)
    command("chaos", chaos.run, "seeded fault injection: SIGKILL workers (at random and at "
            "kill points) and the keg manager, then prove nothing was lost",
            chaos.add_arguments)
    command("bench", bench.run, "benchmark shmalloc against the Python peers",
            bench.add_arguments)
    command("stress", stress.run, "lock-contention sweep: workers x bucket size x workload "
            "x cross-CPU free mode", stress.add_arguments)

    p = command("stat", _stat, "print vmstat -z (or netstat -m) of a running arena")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-z", action="store_true", help="vmstat -z: per-zone statistics")
    what.add_argument("-m", action="store_true", help="netstat -m: mbuf statistics")
    p.add_argument("--name", required=True, metavar="ARENA")
    p.add_argument("--format", choices=NETSTAT_FORMATS, default=NETSTAT_FORMATS[0],
                   help="with -m: the FreeBSD release whose netstat -m to print: 7 (7/8, "
                   "the seed's; the default) or 13 (11-14, with the delayed lines)")
    p.add_argument("-w", "--wait", type=float, metavar="SECONDS",
                   help="repeat every SECONDS, until Ctrl-C or COUNT")
    p.add_argument("-c", "--count", type=positive_int, metavar="COUNT",
                   help="with -w: stop after COUNT reports")

    p = command("lockstat", _lockstat, "print the lock profile of a running arena: per "
                "lock, acquisitions, contended ones, total/avg/max wait and hold in "
                "microseconds, as FreeBSD's LOCK_PROFILING and perf lock contention do")
    p.add_argument("--name", required=True, metavar="ARENA")
    p.add_argument("--sort", choices=list(shm_stats.LOCK_SORT_KEYS), default="wait",
                   help="column to sort by, largest first: total wait (default), total "
                        "hold, count (acquisitions) or contended (acquisitions)")
    p.add_argument("--top", type=positive_int, metavar="N", help="list the first N locks only")
    p.add_argument("--hist", action="store_true",
                   help="also print each listed lock's log2 histograms of wait and hold")
    p.add_argument("-w", "--wait", type=float, metavar="SECONDS",
                   help="repeat every SECONDS, each report counting what happened since "
                        "the previous one, until Ctrl-C or COUNT")
    p.add_argument("-c", "--count", type=positive_int, metavar="COUNT",
                   help="with -w: stop after COUNT reports")

    p = command("serve", manager.serve_from_args, "run the keg manager of an arena in the "
                "foreground (until SIGTERM/SIGINT, then remove the arena)")
    manager.add_serve_arguments(p)

    p = command("sysctl", _sysctl, "read or raise the mbuf sysctls of a running arena, "
                "as sysctl(8) does")
    p.add_argument("--name", required=True, metavar="ARENA")
    p.add_argument("-n", action="store_true", help="print values without their names")
    p.add_argument("-a", "--all", action="store_true",
                   help="print every sysctl (ignored when names are given)")
    p.add_argument("oids", nargs="*", metavar="NAME[=VALUE]")

    p = command("check", _check, "verify the invariants of a running arena")
    p.add_argument("--name", required=True, metavar="ARENA")

    p = command("cleanup", _cleanup, "remove the OS objects of arenas no live process uses")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", action="append", metavar="ARENA",
                       help="an arena to remove (repeatable)")
    which.add_argument("--all", action="store_true", help="every abandoned arena")
    return parser


# ------------------------------------------------------------------------ stat, check
def _stat(args):
    """Print vmstat -z of the arena, once or every ``args.wait`` seconds."""
    if args.wait is not None and args.wait <= 0:
        print("shmalloc stat: -w needs a positive number of seconds", file=sys.stderr)
        return 2
    with Arena.attach(args.name) as arena:
        try:
            for i in itertools.count(1):
                sys.stdout.write(arena.netstat_m(args.format) if args.m else arena.vmstat_z())
                sys.stdout.flush()
                if args.wait is None or i == args.count:
                    break
                time.sleep(args.wait)
                print()
        except KeyboardInterrupt:
            pass
    return 0


def _lockstat(args):
    """Print the lock profile of the arena: since its locks were made, then with
    ``-w`` every ``args.wait`` seconds what happened since the previous report.

    Reads the lock records without a CPU slot (``Arena._attach_core``): taking one
    would take the vm lock and add a mailbox lock to what it measures."""
    if args.wait is not None and args.wait <= 0:
        print("shmalloc lockstat: -w needs a positive number of seconds", file=sys.stderr)
        return 2
    core = Arena._attach_core(args.name)
    try:
        prev = None
        t_prev = time.monotonic()
        for i in itertools.count(1):
            now, t_now = shm_stats.lock_stats(core), time.monotonic()
            if prev is None:
                rows, when = now, "since its locks were made"
            else:
                rows = shm_stats.lock_stats_since(now, prev)
                when = f"over the last {t_now - t_prev:.2f} s"
            title = (f"lockstat: arena {args.name}, {when}; times in microseconds, "
                     f"sorted by {args.sort}")
            sys.stdout.write(shm_stats.format_lock_profile(rows, args.sort, args.top,
                                                           args.hist, title))
            sys.stdout.flush()
            if args.wait is None or i == args.count:
                break
            prev, t_prev = now, t_now
            time.sleep(args.wait)
            print()
    except KeyboardInterrupt:
        pass
    finally:
        core.close()
    return 0


def _check(args):
    """Run ``check`` on the arena; 0 if consistent, 1 listing what is not."""
    with Arena.attach(args.name) as arena:
        try:
            arena.check()
        except CorruptionError as e:
            print(f"check: FAILED\n{e}")
            return 1
    print("check: ok")
    return 0


# ------------------------------------------------------------------------ sysctl
def _sysctl(args):
    """sysctl(8) for an arena: NAME prints ``NAME: value``, NAME=VALUE sets it and prints
    ``NAME: old -> new`` (limits only rise), ``-n`` leaves the names out, ``-a`` lists
    every sysctl.  Each failure is reported on stderr and the others still run: 0 if
    all went well, 1 if one failed, 2 for nothing to do."""
    oids = args.oids or (list(SYSCTLS) if args.all else None)
    if oids is None:
        print("shmalloc sysctl: name a sysctl, or -a", file=sys.stderr)
        return 2
    status = 0
    with Arena.attach(args.name) as arena:
        for oid in oids:
            if not _sysctl_one(arena, oid, args.n):
                status = 1
    return status


def _sysctl_one(arena, oid, values_only) -> bool:
    """Read or set one ``NAME[=VALUE]``; False (said on stderr) if it failed."""
    name, sep, text = oid.partition("=")
    prefix = "" if values_only else f"{name}: "
    try:
        if not sep:
            print(f"{prefix}{_shown(arena.sysctl(name))}")
            return True
        try:
            value = int(text, 0)
        except ValueError:
            print(f"shmalloc sysctl: invalid integer '{text}'", file=sys.stderr)
            return False
        old = arena.sysctl(name)
        print(f"{prefix}{old} -> {arena.sysctl(name, value)}")
        return True
    except SysctlError as e:
        if e.errno == errno.ENOENT:
            print(f"shmalloc sysctl: unknown oid '{name}'", file=sys.stderr)
        elif e.errno == errno.EPERM:
            print(f"shmalloc sysctl: oid '{name}' is a read only tunable", file=sys.stderr)
        else:
            print(f"shmalloc sysctl: {oid}: {e.strerror}", file=sys.stderr)
        return False


def _shown(value) -> str:
    """A sysctl's value as sysctl(8) prints it: an int as is; an opaque struct
    (``kern.ipc.mbstat``) as ``sysctl -o`` does -- its format, length and first 16
    bytes in hex (plain sysctl(8) prints nothing for it)."""
    if isinstance(value, int):
        return str(value)
    raw = value.pack()
    more = "..." if len(raw) > 16 else ""
    return f"Format:{value.SYSCTL_FORMAT} Length:{len(raw)} Dump:0x{raw[:16].hex()}{more}"


# ------------------------------------------------------------------------ cleanup
def _cleanup(args):
    """Remove every OS object of the named (or all) arenas that no live process holds.

    1 if a named arena is still in use, else 0.
    """
    names = args.name or None
    removed, busy = admin.cleanup(names)
    for kind, obj in removed:
        print(f"removed {naming.KINDS[kind]} {obj}")
    for arena, pids in busy:
        print(f"arena {arena}: in use by pid {', '.join(map(str, pids))}; left alone")
    if names and not removed and not busy:
        print(f"arena {', '.join(names)}: no OS objects")
    return 1 if names and busy else 0


if __name__ == "__main__":
    sys.exit(main())
