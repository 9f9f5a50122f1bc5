"""The lock profile: LockStats with hold times, its sort orders, deltas and histograms
(shmalloc.stats), and ``shmalloc lockstat`` over a live arena (scripts/cli.py).

The contention test runs children from tests/lockstat_workers.py; every join and queue
get is bounded, the children are seeded, and the test asserts that the contention it
needs was observed.
"""

import multiprocessing
import os
import time

import pytest

import lockstat_workers as lw
from shmalloc import Arena, LockStats, admin
from shmalloc import layout as L
from shmalloc import stats as S
from shmalloc.ipc import naming
from shmalloc.ipc.lock import HIST_BUCKETS, hist_bucket
from shmalloc.scripts import cli

SPAWN = multiprocessing.get_context("spawn")
WAIT = 60.0


def hist(**buckets):
    """A HIST_BUCKETS tuple with counts at the buckets named b<k>."""
    h = [0] * HIST_BUCKETS
    for k, n in buckets.items():
        h[int(k[1:])] = n
    return tuple(h)


def reports(text):
    """Each table of ``lockstat`` output: {lock name: (count, contended, total wait,
    avg wait, max wait, total hold, avg hold, max hold)}, in the order printed."""
    out, rows = [], None
    for line in text.splitlines():
        parts = line.split()
        if parts[:2] == ["count", "contended"]:
            rows = {}
            out.append(rows)
        elif rows is not None and len(parts) == 9 and "|" not in line:
            rows[parts[-1]] = tuple(float(x) for x in parts[:8])
        else:
            rows = None
    return out


def first_names(text):
    """The lock names of the first table of ``text``, in order."""
    return list(reports(text)[0])


# --------------------------------------------------------------------- formatter
ROWS = [
    LockStats("vm", acquisitions=10, contended=0, wait_ns=0, max_wait_ns=0, owner_pid=0,
              hold_ns=9_000_000, max_hold_ns=5_000_000, hold_hist=hist(b13=10)),
    LockStats("keg:a", acquisitions=5000, contended=1, wait_ns=1_000, max_wait_ns=1_000,
              owner_pid=0, wait_hist=hist(b1=1), hold_ns=10_000, max_hold_ns=100,
              hold_hist=hist(b0=5000)),
    LockStats("zone:a", acquisitions=900, contended=300, wait_ns=600_000, max_wait_ns=9_000,
              owner_pid=0, wait_hist=hist(b2=300), hold_ns=900_000, max_hold_ns=3_000,
              hold_hist=hist(b10=900)),
    LockStats("zone:b", acquisitions=800, contended=200, wait_ns=8_000_000,
              max_wait_ns=90_000, owner_pid=0, wait_hist=hist(b7=200), hold_ns=800_000,
              max_hold_ns=2_000, hold_hist=hist(b10=800)),
]


@pytest.mark.parametrize("key, first", [("count", "keg:a"), ("contended", "zone:a"),
                                        ("wait", "zone:b"), ("hold", "vm")])
def test_each_sort_key_puts_its_largest_first(key, first):
    assert S.sort_lock_stats(ROWS, key)[0].name == first
    text = S.format_lock_profile(ROWS, sort=key)
    assert first_names(text)[0] == first
    assert first_names(S.format_lock_profile(ROWS, sort=key, top=2)) == \
        [s.name for s in S.sort_lock_stats(ROWS, key)[:2]]


def test_sorting_is_descending_and_ties_keep_their_order():
    assert [s.name for s in S.sort_lock_stats(ROWS, "count")] == ["keg:a", "zone:a",
                                                                  "zone:b", "vm"]
    tied = [LockStats(n, 1, 0, 0, 0, 0) for n in ("vm", "keg:x", "zone:x")]
    assert [s.name for s in S.sort_lock_stats(tied, "contended")] == ["vm", "keg:x", "zone:x"]
    with pytest.raises(ValueError, match="sort key"):
        S.sort_lock_stats(ROWS, "name")


def test_profile_columns_are_in_microseconds():
    text = S.format_lock_profile(ROWS, sort="wait", title="t")
    assert text.splitlines()[0] == "t"
    assert text.splitlines()[1].split() == ["count", "contended", "total", "wait", "avg",
                                            "wait", "max", "wait", "total", "hold", "avg",
                                            "hold", "max", "hold", "name"]
    (rows,) = reports(text)
    # zone:b: 200 contended waits of 8 ms in all: avg 40 us, max 90 us; holds 800 us in
    # all over 800 holds: avg 1 us, max 2 us
    assert rows["zone:b"] == (800, 200, 8000.0, 40.0, 90.0, 800.0, 1.0, 2.0)
    assert rows["vm"] == (10, 0, 0.0, 0.0, 0.0, 9000.0, 900.0, 5000.0)


def test_lockstats_derived_values():
    s = ROWS[2]
    assert s.holds == 900 and s.mean_hold_us == 1.0 and s.mean_wait_us == 2.0
    assert s.contended_share == pytest.approx(1 / 3)
    assert s.p99_wait_us == 4.096 and s.p99_hold_us == 1048.576     # [2K, 4K), [512K, 1M) ns
    old = LockStats("zone:old", 3, 1, 5, 5, 0)            # the fields before hold times
    assert (old.hold_ns, old.holds, old.mean_hold_us, old.p99_hold_us) == (0, 0, 0.0, None)


def test_since_subtracts_counts_and_bounds_the_interval_max():
    before = ROWS[2]
    after = LockStats("zone:a", acquisitions=1000, contended=310, wait_ns=700_000,
                      max_wait_ns=12_000, owner_pid=0, wait_hist=hist(b2=305, b4=5),
                      hold_ns=1_000_000, max_hold_ns=3_000, hold_hist=hist(b10=999))
    d = after.since(before)
    assert (d.acquisitions, d.contended, d.wait_ns, d.hold_ns) == (100, 10, 100_000, 100_000)
    assert d.wait_hist == hist(b2=5, b4=5) and d.hold_hist == hist(b10=99)
    assert d.max_wait_ns == 12_000          # a new record: the interval's own max
    assert d.max_hold_ns == 3_000           # the [512K, 1M) bucket's end, capped at the max
    quiet = LockStats("zone:a", 1000, 300, 600_000, 12_000, 0, wait_hist=hist(b2=300),
                      hold_ns=1_000_000, max_hold_ns=3_000, hold_hist=hist(b1=100, b10=900))
    q = quiet.since(before)
    assert q.max_wait_ns == 0               # no contended wait in the interval
    assert q.max_hold_ns == 2_048           # holds only in [1K, 2K): at most 2048 ns
    assert after.since(None) is after
    assert before.since(after) is before                   # counts went back: made anew
    new = LockStats("mailbox:3", 4, 0, 0, 0, 0, hold_hist=hist(b1=4))
    assert S.lock_stats_since([after, new], [before]) == [d, new]


def test_format_hist_prints_log2_buckets_as_bars():
    h = hist(b1=2, b3=8, b11=4)
    lines = S.format_hist(h, "zone:a wait (ns)").splitlines()
    assert lines[0] == "zone:a wait (ns):"
    assert [ln.split("|")[0].split()[:2] for ln in lines[1:]] == [
        ["[1K,", "2K)"], ["[2K,", "4K)"], ["[4K,", "8K)"], ["[8K,", "16K)"],
        ["[16K,", "32K)"], ["[32K,", "64K)"], ["[64K,", "128K)"], ["[128K,", "256K)"],
        ["[256K,", "512K)"], ["[512K,", "1M)"], ["[1M,", "2M)"]]
    bars = {ln.split()[0] + ln.split()[1]: ln.split("|")[1] for ln in lines[1:]}
    assert bars["[4K,8K)"] == "@" * S.HIST_WIDTH
    assert bars["[1K,2K)"] == "@" * (S.HIST_WIDTH // 4) + " " * (S.HIST_WIDTH * 3 // 4)
    assert bars["[8K,16K)"].strip() == ""
    assert S.format_hist(hist(b0=1, b23=1), "x").splitlines()[1].split()[:2] == ["[0,", "1K)"]
    assert S.format_hist(hist(b22=1), "x").splitlines()[1].split()[:2] == ["[2G,", "4G)"]
    assert S.format_hist(hist(b23=1), "x").splitlines()[1].split()[:2] == ["[4G,", "...)"]
    assert S.format_hist(hist(), "x") == "x: none\n"


def test_profile_with_hist_lists_both_histograms_of_each_lock():
    text = S.format_lock_profile(ROWS, sort="contended", top=1, hist=True)
    assert "zone:a wait (ns), 300 contended acquisitions:" in text
    assert "zone:a hold (ns), 900 holds:" in text
    assert "zone:b wait" not in text


# --------------------------------------------------------------------- the command
def zone_lock(arena, name):
    (s,) = [s for s in arena.lock_stats() if s.name == f"zone:{name}"]
    return s


@pytest.mark.slow
def test_lockstat_sort_contended_lists_the_contended_zone_lock_first(arena_name, capsys):
    """Three processes hammer zone "hot" (bucket_size=0: every operation takes its
    lock) while this one uses zone "cold" alone, more often than any of them."""
    stop = SPAWN.Event()
    q = SPAWN.Queue()
    procs = []
    with Arena.create(arena_name, 16 << 20) as arena:
        arena.zcreate("hot", 256, bucket_size=0)
        cold = arena.zcreate("cold", 256, bucket_size=0)
        try:
            for i in range(3):
                p = SPAWN.Process(target=lw.hammer, daemon=True,
                                  args=(q, i, arena_name, "hot", 1300 + i, stop, 400_000))
                p.start()
                procs.append(p)
            deadline = time.monotonic() + WAIT
            while zone_lock(arena, "hot").contended < 50 and time.monotonic() < deadline \
                    and any(p.is_alive() for p in procs):
                for _ in range(100):
                    cold.free(cold.alloc())
        finally:
            stop.set()
            results = []
            for p in procs:
                p.join(WAIT)
                if p.is_alive():
                    p.kill()
                    p.join(WAIT)
            while len(results) < len(procs):
                results.append(q.get(timeout=WAIT))
        assert all(r[0] == "ok" for r in results), results
        hot, cold_s = zone_lock(arena, "hot"), zone_lock(arena, "cold")
        assert hot.contended >= 50, f"no contention observed on the hot zone: {hot}"
        assert cold_s.contended == 0 and cold_s.acquisitions > 0
        for _ in range(hot.acquisitions // 2 + 1):       # cold now leads by count
            cold.free(cold.alloc())
        assert zone_lock(arena, "cold").acquisitions > hot.acquisitions
        capsys.readouterr()

        assert cli.main(["lockstat", "--name", arena_name, "--sort", "contended"]) == 0
        out = capsys.readouterr().out
        assert first_names(out)[0] == "zone:hot"
        (rows,) = reports(out)
        assert rows["zone:hot"][1] >= 50 and rows["zone:cold"][1] == 0
        assert rows["zone:hot"][5] > 0                     # holds were timed

        assert cli.main(["lockstat", "--name", arena_name, "--sort", "count"]) == 0
        assert first_names(capsys.readouterr().out)[0] in ("zone:cold", "keg:cold")

        assert cli.main(["lockstat", "--name", arena_name, "--sort", "contended",
                         "--top", "1", "--hist"]) == 0
        out = capsys.readouterr().out
        assert first_names(out) == ["zone:hot"]
        assert "zone:hot wait (ns), " in out and "zone:hot hold (ns), " in out
        assert "|@" in out


def test_lockstat_w_reports_the_delta_since_the_previous_report(arena_name, capsys,
                                                                 monkeypatch):
    """-w: the first report counts since the locks were made, each next one what
    happened in between (here: the pairs the patched sleep makes)."""
    with Arena.create(arena_name, 8 << 20) as arena:
        z = arena.zcreate("z", 256, bucket_size=0)
        for _ in range(10):
            z.free(z.alloc())
        base = zone_lock(arena, "z")
        pairs = iter([25, 0])
        sleeps = []

        def pairs_instead_of_sleep(seconds):
            sleeps.append(seconds)
            for _ in range(next(pairs)):
                z.free(z.alloc())

        monkeypatch.setattr(cli.time, "sleep", pairs_instead_of_sleep)
        assert cli.main(["lockstat", "--name", arena_name, "--sort", "count",
                         "-w", "0.5", "-c", "3"]) == 0
        monkeypatch.undo()
        out = capsys.readouterr().out
        first, second, third = reports(out)
        assert sleeps == [0.5, 0.5]
        assert first["zone:z"][0] == base.acquisitions >= 20
        assert second["zone:z"][0] == 50                    # 25 allocs + 25 frees
        assert second["zone:z"][1] == 0 and second["zone:z"][5] > 0
        assert third["zone:z"][:2] == (0, 0) and third["zone:z"][5] == 0.0
        assert third["zone:z"][7] == 0.0                   # no hold in the interval
        assert second["zone:z"][7] > 0                     # holds in the interval
        assert third["vm"][0] == 0
        titles = [ln for ln in out.splitlines() if ln.startswith("lockstat:")]
        assert "since its locks were made" in titles[0]
        assert "over the last" in titles[1] and "over the last" in titles[2]


def test_lockstat_refuses_a_bad_interval_and_a_missing_arena(arena_name, capsys):
    assert cli.main(["lockstat", "--name", arena_name, "-w", "0"]) == 2
    assert "-w needs a positive" in capsys.readouterr().err
    assert cli.main(["lockstat", "--name", arena_name]) == 1
    assert arena_name in capsys.readouterr().err
    for argv in (["lockstat", "--name", arena_name, "--sort", "name"], ["lockstat"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2


@pytest.mark.parametrize("debug", [0, 2])
def test_hold_times_are_recorded_on_a_live_arena(debug):
    """Every release by the holder counts one hold: a zone with bucket_size=0 takes
    its lock once per alloc and once per free (at debug level 2 through WitnessLock)."""
    a = Arena.create_local(debug=debug)
    try:
        assert (type(a._core.lock(L.VM_LOCK)).__name__ == "WitnessLock") == (debug == 2)
        z = a.zcreate("z", 64, bucket_size=0)
        before = zone_lock(a, "z")
        for _ in range(7):
            z.free(z.alloc())
        after = zone_lock(a, "z").since(before)
        assert after.acquisitions == after.holds == 14
        assert after.hold_ns > 0 and sum(after.hold_hist) == 14
        assert hist_bucket(zone_lock(a, "z").max_hold_ns) == max(
            k for k, n in enumerate(zone_lock(a, "z").hold_hist) if n)
    finally:
        a.destroy()


# --------------------------------------------------------------------- the layout bump
def test_an_arena_of_another_layout_version_is_held_by_its_creator(arena_name):
    """Lock records grew (layout 5), so the CPU table moved: an arena whose header
    names another version is judged by the pids its header holds, never by a CPU
    table read at this version's offsets (which would find nobody and remove it)."""
    with Arena.create(arena_name, 8 << 20) as arena:
        w = memoryview(arena._core.buf).cast("q")
        version = w[L.HDR["VERSION"]]
        w[L.HDR["VERSION"]] = version - 1
        try:
            assert [role for role, _, _ in admin.holder_table(arena_name)] == ["creator"]
            assert admin.holders(arena_name) == [os.getpid()]
            removed, busy = admin.cleanup([arena_name])
            assert removed == [] and busy == [(arena_name, [os.getpid()])]
        finally:
            w[L.HDR["VERSION"]] = version
            w.release()
        assert [role for role, _, _ in admin.holder_table(arena_name)] == [f"CPU {arena.cpu_id}"]


@pytest.mark.slow
def test_an_arena_of_another_layout_version_is_held_by_the_processes_mapping_it(arena_name):
    """Its creator gone, an arena of another layout is still held by any process that
    maps its segment: cleanup leaves it."""
    stop = SPAWN.Event()
    q = SPAWN.Queue()
    with Arena.create(arena_name, 8 << 20) as arena:
        w = memoryview(arena._core.buf).cast("q")
        saved = w[L.HDR["VERSION"]], w[L.HDR["CREATOR_PID"]]
        child = SPAWN.Process(target=lw.map_segment, daemon=True,
                              args=(q, naming.object_name(arena_name, "arena"), stop))
        child.start()
        try:
            assert q.get(timeout=WAIT)[0] == "ok"
            w[L.HDR["VERSION"]], w[L.HDR["CREATOR_PID"]] = saved[0] + 1, 0
            assert admin.holder_table(arena_name) == [("mapping", child.pid, True)]
            assert admin.cleanup([arena_name])[0] == []
        finally:
            w[L.HDR["VERSION"]], w[L.HDR["CREATOR_PID"]] = saved
            w.release()
            stop.set()
            child.join(WAIT)
        assert child.exitcode == 0
