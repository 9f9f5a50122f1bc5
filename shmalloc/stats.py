"""Statistics: per-CPU counters published on the slow paths, summed on read
(UMA's ``uma_zone_get_cur`` / libmemstat), returned as frozen snapshots, and
printed in FreeBSD's ``vmstat -z`` format.

Counters a CPU keeps on its fast path are published when it next takes a slow
path, and when it closes; a reader in another process may therefore lag a live
CPU by at most one bucket of operations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import layout as L
from .admin import process_alive
from .ipc.lock import HIST_BUCKETS, hist_bounds_ns, hist_percentile

_Z, _K, _CS, _C, _LK = L.ZONE, L.KEG, L.CS, L.CPU, L.LOCK


@dataclass(frozen=True)
class ZoneStats:
    name: str
    size: int
    limit: int
    used: int            # allocated to consumers (counted from the item tags)
    free: int            # free_cache + free_depot (+ free_keg for a primary zone)
    free_cache: int      # in CPUs' buckets and in flight home (from the tags)
    free_depot: int      # in the zone's depot of full buckets
    free_keg: int        # free in the keg's slabs (primary zones only)
    items: int           # taken from the keg, counted against the limit
    requests: int        # allocations
    frees: int
    failures: int
    sleeps: int
    sleepers: int
    xfree: int           # cross-CPU frees (FreeBSD's XDOMAIN column)
    bucket_size: int
    depot_gets: int
    depot_puts: int
    pages: int           # pages of the keg (primary zones), 0 for secondary
    secondary: bool


@dataclass(frozen=True)
class LockStats:
    """One lock's profile, read from its record (``ipc.lock``): what FreeBSD's
    LOCK_PROFILING and ``perf lock contention`` print per lock.  Times in ns;
    histograms are HIST_BUCKETS log2 buckets of nanoseconds (``ipc.lock.hist_bucket``).
    """
    name: str
    acquisitions: int
    contended: int               # taken after a failed first try (FreeBSD's cnt_lock)
    wait_ns: int                 # waited by the contended acquisitions, in total
    max_wait_ns: int
    owner_pid: int
    wait_hist: tuple = ()        # contended waits: [0, 1K), [1K, 2K) .. [2G, 4G), >= 4G ns
    hold_ns: int = 0             # held (acquire to release), in total over ``holds``
    max_hold_ns: int = 0
    hold_hist: tuple = ()        # holds, the same buckets; their sum is ``holds``

    @property
    def holds(self) -> int:
        """Holds recorded: releases by the holder (a forced release records none,
        a lock held now is counted in ``acquisitions`` only)."""
        return sum(self.hold_hist)

    @property
    def p99_wait_us(self) -> float | None:
        """Upper bound of the 99th percentile of contended waits (histogram)."""
        return hist_percentile(self.wait_hist, 0.99)

    @property
    def p99_hold_us(self) -> float | None:
        """Upper bound of the 99th percentile of holds (histogram)."""
        return hist_percentile(self.hold_hist, 0.99)

    @property
    def contended_share(self) -> float:
        return self.contended / self.acquisitions if self.acquisitions else 0.0

    @property
    def mean_wait_us(self) -> float:
        """Average wait of a contended acquisition (perf lock contention's avg wait)."""
        return self.wait_ns / self.contended / 1e3 if self.contended else 0.0

    @property
    def mean_hold_us(self) -> float:
        return self.hold_ns / self.holds / 1e3 if self.holds else 0.0

    def since(self, earlier: "LockStats | None") -> "LockStats":
        """The lock's activity from snapshot ``earlier`` of it to this one
        (``lockstat -w``, a stress window).  The counts are differences; a max is
        the interval's when the interval set it (this max exceeds the earlier one),
        else the upper end of the interval's longest histogram bucket capped at the
        max since the lock was made (a bound, within a factor of 2), 0 for an
        interval without waits (holds).  Counts that went back (the lock was made
        anew) leave this snapshot as it is."""
        if earlier is None or earlier.acquisitions > self.acquisitions:
            return self
        wait_hist = _hist_minus(self.wait_hist, earlier.wait_hist)
        hold_hist = _hist_minus(self.hold_hist, earlier.hold_hist)
        return replace(
            self, acquisitions=self.acquisitions - earlier.acquisitions,
            contended=self.contended - earlier.contended,
            wait_ns=self.wait_ns - earlier.wait_ns, hold_ns=self.hold_ns - earlier.hold_ns,
            max_wait_ns=_interval_max(self.max_wait_ns, earlier.max_wait_ns, wait_hist),
            max_hold_ns=_interval_max(self.max_hold_ns, earlier.max_hold_ns, hold_hist),
            wait_hist=wait_hist, hold_hist=hold_hist)


def _interval_max(now: int, before: int, hist: tuple) -> int:
    """The longest time of an interval (see ``LockStats.since``)."""
    used = [k for k, n in enumerate(hist) if n > 0]
    if not used:
        return 0
    if now > before:
        return now
    return int(min(now, hist_bounds_ns(used[-1])[1]))


def _hist_minus(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a, b = tuple(a) + (0,) * (n - len(a)), tuple(b) + (0,) * (n - len(b))
    return tuple(x - y for x, y in zip(a, b))


@dataclass(frozen=True)
class ArenaStats:
    size: int
    free_pages: int
    total_pages: int
    cpus: int
    zones: tuple
    recoveries: int = 0      # dead CPUs recovered (by the keg manager)
    lock_repairs: int = 0    # locks rebuilt and released after their holder died
    manager_pid: int = 0     # the keg manager (supervisor) recorded in the header, 0: none
    manager_cpu: int = -1


def zone_stats(core, zone_id: int) -> ZoneStats:
    w = core.w
    zw = L.zone_word(zone_id)
    kid = w[zw + _Z["KEG"]]
    kw = L.keg_word(kid)
    secondary = bool(w[zw + _Z["FLAGS"]] & L.ZF_SECONDARY)
    allocs, frees, fails = w[zw + _Z["ALLOCS"]], w[zw + _Z["FREES"]], w[zw + _Z["FAILS"]]
    xfree = w[zw + _Z["XFREES"]]
    dgets, dputs = w[zw + _Z["DEPOT_GETS"]], w[zw + _Z["DEPOT_PUTS"]]
    for cpu in core.live_cpus():
        sw = L.cpu_stat_word(cpu, zone_id)
        allocs += w[sw + _CS["ALLOCS"]]
        frees += w[sw + _CS["FREES"]]
        fails += w[sw + _CS["FAILS"]]
        dgets += w[sw + _CS["DEPOT_GETS"]]
        dputs += w[sw + _CS["DEPOT_PUTS"]]
        xfree += w[sw + _CS["XFREES"]]
    frees = min(frees, allocs)
    depot = w[zw + _Z["DEPOT_N"]]
    keg_free = 0 if secondary else w[kw + _K["FREE_ITEMS"]]
    used, cached = _held_from_tags(core, kid, w[zw + _Z["ZIDX"]])
    return ZoneStats(
        name=core.zone_name(zone_id), size=w[zw + _Z["SIZE"]], limit=w[zw + _Z["LIMIT"]],
        used=used, free=cached + depot + keg_free, free_cache=cached,
        free_depot=depot, free_keg=keg_free, items=w[zw + _Z["ITEMS"]], requests=allocs,
        frees=frees, failures=fails, sleeps=w[zw + _Z["SLEEPS"]],
        sleepers=w[zw + _Z["SLEEPERS"]], xfree=xfree,
        bucket_size=w[zw + _Z["BUCKET_SIZE"]], depot_gets=dgets, depot_puts=dputs,
        pages=0 if secondary else w[kw + _K["PAGES"]], secondary=secondary)


_USED_STATES = (L.TAG_ALLOC, L.TAG_INFLIGHT)
_CACHED_STATES = (L.TAG_CACHED, L.TAG_XFREE, L.TAG_IMPORT, L.TAG_FINI)


def _held_from_tags(core, keg_id: int, zidx: int) -> tuple[int, int]:
    """(allocated, cached) items of a zone, counted from the tags: exact even
    when a CPU died before publishing its last counts.  Lock: takes the keg's --
    unless a dead process holds it (killed inside the keg, no manager yet to
    repair the lock): the tags are counted without it then, which is as exact,
    since no one else changes them while the lock stays taken; so statistics of
    an arena in that state (``shmalloc stat``, a test waiting for recovery)
    never hang."""
    keg = core.keg(keg_id)
    lk = core.lock(keg.lock_index)

    def holder_dead() -> bool:
        pid = lk.owner_pid()
        return bool(pid) and not process_alive(pid)

    if not lk.acquire(on_wait=holder_dead):
        return _count_used_cached(keg.tag_counts(keg.slab_bases()), zidx)
    try:
        counts = keg.tag_counts()
    finally:
        lk.release()
    return _count_used_cached(counts, zidx)


def _count_used_cached(counts, zidx: int) -> tuple[int, int]:
    used = cached = 0
    for tv, n in counts.items():
        if tv and L.tag_zidx(tv) == zidx:
            st = L.tag_state(tv)
            if st in _USED_STATES:
                used += n
            elif st in _CACHED_STATES:
                cached += n
    return used, cached


def arena_stats(core) -> ArenaStats:
    w = core.w
    return ArenaStats(size=core.geometry.size, free_pages=w[L.HDR["FREE_PAGES"]],
                      total_pages=core.geometry.data_pages, cpus=len(core.live_cpus()),
                      zones=tuple(zone_stats(core, z) for z in core.live_zone_ids()),
                      recoveries=w[L.HDR["RECOVERIES"]], lock_repairs=w[L.HDR["LOCK_REPAIRS"]],
                      manager_pid=w[L.HDR["MANAGER_PID"]],
                      manager_cpu=w[L.HDR["MANAGER_CPU"]] if w[L.HDR["MANAGER_PID"]] else -1)


@dataclass(frozen=True)
class CpuSlot:
    """A CPU slot in use: its process (pid and start time, microseconds) and state
    ("live", or "dead": closing, or found dead and not yet recovered)."""
    cpu: int
    state: str
    pid: int
    start: int
    gen: int


def cpu_slots(core) -> list[CpuSlot]:
    """Every CPU slot that is not free, read without a lock (a snapshot)."""
    w = core.w
    out = []
    for cpu in range(L.MAX_CPUS):
        cw = L.cpu_word(cpu)
        st = w[cw + _C["STATE"]]
        if st != L.CPU_FREE:
            out.append(CpuSlot(cpu, "live" if st == L.CPU_LIVE else "dead", w[cw + _C["PID"]],
                               w[cw + _C["START"]], w[cw + _C["GEN"]]))
    return out


def lock_name(core, idx: int) -> str:
    if idx == L.VM_LOCK:
        return "vm"
    if idx <= L.MAX_KEGS:
        return "keg:" + core.zone_names_of_keg(idx).replace("'", "")
    if idx >= L.mbox_lock_index(0):
        return f"mailbox:{idx - L.mbox_lock_index(0)}"
    return "zone:" + core.zone_name(idx - 1 - L.MAX_KEGS)


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock now (``pid`` 0: nobody), since when (``time.monotonic_ns()``
    at the acquisition: the clock is the machine's, the same in every process), and
    the longest wait an acquisition of it recorded."""
    index: int
    name: str
    pid: int
    cpu: int
    since_ns: int
    max_wait_ns: int


def lock_indexes(core, mailboxes: bool = True) -> list[int]:
    """The locks of the arena: vm, each live keg's, each live zone's (the order of
    the lock order, inner last reversed: vm first), then -- with ``mailboxes`` -- the
    mailbox lock of every CPU slot (taken or not: a freed slot's lock keeps its
    record)."""
    w = core.w
    idxs = [L.VM_LOCK]
    idxs += [L.keg_lock_index(k) for k in range(1, w[L.HDR["NKEGS"]] + 1)
             if w[L.keg_word(k) + _K["FLAGS"]] & L.KF_LIVE]
    idxs += [L.zone_lock_index(z) for z in core.live_zone_ids()]
    if mailboxes:
        idxs += [L.mbox_lock_index(c) for c in range(L.MAX_CPUS)]
    return idxs


def lock_owners(core, held_only: bool = True) -> list[LockOwner]:
    """``LockOwner`` of every lock (``lock_indexes``), or of those held now.
    Lock: none; the words are read as they are (a torn read shows a hold that is
    starting or ending)."""
    w = core.w
    out = []
    for idx in lock_indexes(core):
        lw = L.lock_word(idx)
        pid = w[lw + _LK["OWNER_PID"]]
        if pid or not held_only:
            out.append(LockOwner(idx, lock_name(core, idx), pid, w[lw + _LK["OWNER_ID"]],
                                 w[lw + _LK["ACQUIRED_NS"]], w[lw + _LK["MAX_WAIT_NS"]]))
    return out


def lock_stats(core) -> list[LockStats]:
    """The vm lock, each keg's and zone's, then the mailbox lock of every CPU slot
    in use (or held: a dead holder's shows until it is repaired).

    Lock: none.  The records are read as they are: a snapshot in which an acquisition
    under way may be half counted (its count without its wait, say)."""
    w = core.w
    idxs = [L.VM_LOCK]
    idxs += [L.keg_lock_index(k) for k in range(1, w[L.HDR["NKEGS"]] + 1)
             if w[L.keg_word(k) + _K["FLAGS"]] & L.KF_LIVE]
    idxs += [L.zone_lock_index(z) for z in core.live_zone_ids()]
    idxs += [L.mbox_lock_index(c) for c in range(L.MAX_CPUS)
             if w[L.cpu_word(c) + _C["STATE"]] != L.CPU_FREE
             or w[L.lock_word(L.mbox_lock_index(c)) + _LK["OWNER_PID"]]]
    out = []
    wh, hh = _LK["WAIT_HIST"], _LK["HOLD_HIST"]
    for idx in idxs:
        lw = L.lock_word(idx)
        out.append(LockStats(
            name=lock_name(core, idx), acquisitions=w[lw + _LK["ACQUISITIONS"]],
            contended=w[lw + _LK["CONTENDED"]], wait_ns=w[lw + _LK["WAIT_NS"]],
            max_wait_ns=w[lw + _LK["MAX_WAIT_NS"]], owner_pid=w[lw + _LK["OWNER_PID"]],
            wait_hist=tuple(w[lw + wh:lw + wh + HIST_BUCKETS]),
            hold_ns=w[lw + _LK["HOLD_NS"]], max_hold_ns=w[lw + _LK["MAX_HOLD_NS"]],
            hold_hist=tuple(w[lw + hh:lw + hh + HIST_BUCKETS])))
    return out


def lock_stats_since(now, earlier) -> list[LockStats]:
    """``now`` (a list of LockStats) as counts since the snapshot ``earlier`` (a list
    of LockStats, matched by name); a lock new since then counts from zero."""
    before = {s.name: s for s in earlier}
    return [s.since(before.get(s.name)) for s in now]


# ---------------------------------------------------------------- lock profile report
# The columns of ``perf lock contention`` (contended, total wait, max wait, avg wait)
# with the hold columns of FreeBSD's LOCK_PROFILING (total, avg, max) and its count,
# all times in microseconds.  Sort keys, descending (``shmalloc lockstat --sort``):
LOCK_SORT_KEYS = {
    "wait": lambda s: (s.wait_ns, s.contended, s.acquisitions),
    "hold": lambda s: (s.hold_ns, s.acquisitions),
    "count": lambda s: (s.acquisitions, s.contended),
    "contended": lambda s: (s.contended, s.wait_ns, s.acquisitions),
}
LOCK_PROFILE_HEADER = ("%10s %10s %12s %10s %10s %12s %10s %10s  %s"
                       % ("count", "contended", "total wait", "avg wait", "max wait",
                          "total hold", "avg hold", "max hold", "name"))
HIST_WIDTH = 40


def sort_lock_stats(rows, key: str = "wait") -> list[LockStats]:
    """``rows`` sorted by ``key`` (of LOCK_SORT_KEYS), largest first; ties keep
    their order (vm, kegs, zones, mailboxes)."""
    try:
        k = LOCK_SORT_KEYS[key]
    except KeyError:
        raise ValueError(f"lock sort key {key!r} is not one of "
                         f"{', '.join(LOCK_SORT_KEYS)}") from None
    return sorted(rows, key=k, reverse=True)


def format_lock_row(s: LockStats) -> str:
    return ("%10d %10d %12.1f %10.1f %10.1f %12.1f %10.1f %10.1f  %s"
            % (s.acquisitions, s.contended, s.wait_ns / 1e3, s.mean_wait_us,
               s.max_wait_ns / 1e3, s.hold_ns / 1e3, s.mean_hold_us, s.max_hold_ns / 1e3,
               s.name))


def format_lock_profile(rows, sort: str = "wait", top: int | None = None,
                        hist: bool = False, title: str | None = None) -> str:
    """The lock profile of ``rows`` (LockStats) as text: an optional title line, the
    header, a row per lock sorted by ``sort`` (the first ``top`` only, if given),
    then with ``hist`` each listed lock's log2 histograms of wait and hold."""
    rows = sort_lock_stats(rows, sort)[:top]
    out = [] if title is None else [title + "\n"]
    out.append(LOCK_PROFILE_HEADER + "\n")
    out += [format_lock_row(s) + "\n" for s in rows]
    if hist:
        for s in rows:
            if s.acquisitions or s.holds:
                out.append("\n" + format_hist(s.wait_hist, f"{s.name} wait (ns), "
                                               f"{sum(s.wait_hist)} contended acquisitions"))
                out.append(format_hist(s.hold_hist, f"{s.name} hold (ns), {s.holds} holds"))
    return "".join(out)


def _ns_label(v) -> str:
    """A bucket bound as bpftrace prints it: 512, 1K, 2M, 4G."""
    if v == float("inf"):
        return "..."          # the last bucket: [4G, ...)
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if v >= 1 << shift and v % (1 << shift) == 0:
            return f"{v >> shift}{unit}"
    return str(v)


def format_hist(hist, label: str, width: int = HIST_WIDTH) -> str:
    """A log2 histogram (HIST_BUCKETS counts) as text bars, as bpftrace's ``hist()``
    prints them: one line per bucket, [low, high) in nanoseconds, from the first to
    the last one counted."""
    used = [k for k, n in enumerate(hist) if n]
    if not used:
        return f"{label}: none\n"
    top = max(hist)
    out = [f"{label}:\n"]
    for k in range(used[0], used[-1] + 1):
        lo, hi = hist_bounds_ns(k)
        rng = f"[{_ns_label(lo)}, {_ns_label(hi)})"
        bar = "@" * (hist[k] * width // top)
        out.append(f"  {rng:>16} {hist[k]:>10} |{bar:<{width}}|\n")
    return "".join(out)


# FreeBSD 13/14 vmstat -z (usr.bin/vmstat/vmstat.c:domemstat_zone)
VMSTAT_Z_HEADER = "%-20s %6s %6s %8s %8s %8s %8s%4s %4s"
VMSTAT_Z_ROW = "%-20s %6d, %6d,%8d,%8d,%8d,%4d,%4d,%4d\n"


def format_vmstat_z(rows) -> str:
    out = [VMSTAT_Z_HEADER % ("ITEM", "SIZE", "LIMIT", "USED", "FREE", "REQ", "FAIL",
                              "SLEEP", "XDOMAIN") + "\n\n"]
    for s in rows:
        out.append(VMSTAT_Z_ROW % (s.name + ":", s.size, s.limit, s.used, s.free,
                                   s.requests, s.failures, s.sleeps, s.xfree))
    return "".join(out)


def vmstat_z(core) -> str:
    return format_vmstat_z(zone_stats(core, z) for z in core.live_zone_ids())


@dataclass(frozen=True)
class CpuStats:
    cpu: int
    pid: int
    allocs: int
    frees: int
    fails: int
    sleeps: int
    cached: int
    depot_gets: int      # alloc misses served by the depot
    depot_puts: int      # full buckets given to the depot
    keg_imports: int     # alloc misses served by the keg
    xfrees: int
    msgs_sent: int = 0   # remote-free messages sent home
    items_sent: int = 0  # items in them
    fallbacks: int = 0   # remote frees done locally (home gone or its mailbox full)

    @property
    def ops(self) -> int:
        return self.allocs + self.frees

    @property
    def misses(self) -> int:
        return self.depot_gets + self.depot_puts + self.keg_imports

    @property
    def hit_ratio(self) -> float:
        """Share of operations served by this CPU's bucket cache alone."""
        return 1 - self.misses / self.ops if self.ops else 1.0


def cpu_stats(core) -> list[CpuStats]:
    w = core.w
    out = []
    zones = core.live_zone_ids()
    for cpu in core.live_cpus():
        sums = dict.fromkeys(_CS, 0)
        for z in zones:
            sw = L.cpu_stat_word(cpu, z)
            for k, i in _CS.items():
                sums[k] += w[sw + i]
        out.append(CpuStats(
            cpu=cpu, pid=w[L.cpu_word(cpu) + _C["PID"]], allocs=sums["ALLOCS"],
            frees=sums["FREES"], fails=sums["FAILS"], sleeps=sums["SLEEPS"],
            cached=sums["CACHED"], depot_gets=sums["DEPOT_GETS"], depot_puts=sums["DEPOT_PUTS"],
            keg_imports=sums["KEG_IMPORTS"], xfrees=sums["XFREES"], msgs_sent=sums["MSGS_SENT"],
            items_sent=sums["ITEMS_SENT"], fallbacks=sums["FALLBACKS"]))
    return out
