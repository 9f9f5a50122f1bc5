"""The chaos harness (``shmalloc chaos``, ``workers/chaos.py``): a short seeded run in
CI -- about ten workers killed at random moments and at kill points over the two
mbuf workloads, the keg manager killed and adopted once -- asserting the outcome
from the harness's result, not only its exit status: no item lost, check passing,
locks held briefly, every death recovered, no OS object left.  The long run (100
kills, 3 manager kills) is documented in docs/operations.md; ``SHMALLOC_LONG=1`` runs it
here.  Rerun a seed with ``SHMALLOC_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shmalloc.ipc import naming
from shmalloc.workers import chaos as harness

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX shm and semaphores")

LONG = bool(os.environ.get("SHMALLOC_LONG"))
SEED = int(os.environ.get("SHMALLOC_TEST_SEED", "20261122"))
TIMEOUT = 120.0
# Bugs the harness knows by the shape of their failures (harness.KNOWN_BUGS) that are
# still open: a run failing only through them is an xfail naming them and the seed.
# Empty since the merge of rec's fixes (limbo: 1a050d4, depot: bb12ddf; revived not
# seen since): the test is strict, and a regression of one of them fails it.
OPEN_BUGS: set[str] = set()


def _xfail_if_only_known(res):
    if res["failures"] and not res["new_failures"]:
        bugs = {b for k in res["known_failures"] for b in k["bug"].split("+")}
        if bugs <= OPEN_BUGS:
            pytest.xfail(f"seed {res['seed']}: only known open bug(s) {sorted(bugs)}: "
                         + "; ".join(harness.KNOWN_BUGS[b] for b in sorted(bugs)))


def _assert_ok(res, arena_prefix):
    why = f"seed {res['seed']}: " + "\n".join(res["failures"])
    assert res["failures"] == [] and res["ok"], why
    assert res["items_lost"] == 0, why
    assert res["check_ok"], why
    assert res["os_objects_left"] == [], why
    assert res["max_lock_hold"] <= harness.LOCK_LIMIT, why
    assert res["max_lock_wait"] <= harness.LOCK_LIMIT, why
    assert res["deaths"] >= res["kills_asked"], why
    assert res["manager_kills"] == res["adoptions"] == res["manager_kills_asked"], why
    # every death and every killed manager was recovered (a worker killed before it
    # attached has no CPU slot to recover)
    assert res["recoveries"] >= res["manager_kills"], why
    assert all(r["check_ok"] for r in res["rounds"]), why
    assert res["checks"] == 2 * len(res["rounds"]), why     # after the count and the close
    assert [o for o in naming.list_objects() if (naming.arena_of(o[1]) or "").startswith(
        arena_prefix)] == [], why


@pytest.mark.slow
def test_short_chaos_loses_nothing(arena_name):
    kills, manager_kills = (100, 3) if LONG else (10, 1)
    lines = []
    res = harness.chaos(seed=SEED, workers=4, kills=kills, manager_kills=manager_kills,
                        name=arena_name, timeout=600.0 if LONG else TIMEOUT, log=lines.append)
    print("\n".join(lines[-40:] + harness.report_lines(res)))
    _xfail_if_only_known(res)
    _assert_ok(res, arena_name)
    assert [r["workload"] for r in res["rounds"]][:2] == ["pipeline", "refcount"]
    assert res["random_kills"] > 0, "the harness SIGKILLed nobody"
    assert res["killpoint_kills"] > 0, "no worker died at a kill point"
    assert res["lock_repairs"] > 0, "no kill landed inside a locked section"
    assert res["max_stall"] <= harness.STALL_LIMIT
    assert res["seconds"] < TIMEOUT


@pytest.mark.slow
def test_cli_reports_and_writes_json(arena_name, tmp_path):
    path = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "shmalloc.scripts.cli", "chaos", "--seed",
                           str(SEED + 1), "--kills", "4", "--manager-kills", "0",
                           "--workloads", "refcount", "--workers", "3", "--killpoints", "none",
                           "--name", arena_name, "--json", str(path), "-q"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode and path.exists():
        _xfail_if_only_known(json.loads(path.read_text()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"seed {SEED + 1}" in out.splitlines()[0]
    for text in ("kills: ", "items lost: 0", "check: ok", "OS objects left: none",
                 "longest hold seen"):
        assert text in out, out
    res = json.loads(path.read_text())
    assert res["seed"] == SEED + 1 and res["ok"]
    assert res["killpoint_kills"] == 0 and res["random_kills"] >= 4
    assert [r["workload"] for r in res["rounds"]] == ["refcount"]


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--workers", "1"], ["--workloads", "churn"],
                                  ["--killpoints", "nowhere:0.5"], ["--kills", "0"],
                                  ["--manager-kills", "-1"], ["--timeout", "0"]])
def test_cli_refuses_bad_arguments(argv):
    proc = subprocess.run([sys.executable, "-m", "shmalloc.scripts.cli", "chaos", *argv],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stdout + proc.stderr


def test_plan_spreads_kills_and_manager_kills():
    rounds = harness.plan(100, 3, ["pipeline", "refcount"])
    assert [w for w, _, _ in rounds] == ["pipeline", "refcount", "pipeline", "refcount"]
    assert sum(d for _, d, _ in rounds) == 100 and sum(m for _, _, m in rounds) == 3
    assert harness.plan(10, 1, ["pipeline", "refcount"]) == [("pipeline", 5, 0),
                                                             ("refcount", 5, 1)]
    assert harness.plan(1, 0, ["pipeline", "refcount"]) == [("pipeline", 1, 0)]
    with pytest.raises(ValueError):
        harness.plan(0, 0, ["pipeline"])


def test_known_bugs_are_recognised_only_whole():
    limbo = ("round 4/4 (refcount, seed 15): after the count: zone mbuf_packet: USED 38, "
             "the living hold 37\nmbuf_packet 1264640: alloc held by CPU 6 (the keg manager, "
             "pid 3061), type 0 (MT_NOTMBUF: set aside for its copies), flags 0x1, "
             "refcount 1, owner 1264640")
    depot = ("round 1/4 (pipeline, seed 13): check failed: arena 'c1r0' is inconsistent:\n"
             "  zone 'mbuf_packet': depot holds 639 items, 638 are tagged depot\n"
             "  zone 'mbuf_packet': depot entry 1581568 (tag index 398290) is not a depot "
             "item of this zone")
    assert harness.known_bug(limbo) == "limbo"
    assert harness.known_bug(depot) == "depot"
    assert harness.known_bug(limbo.replace("refcount 1", "refcount 2")) is None
    assert harness.known_bug(limbo.replace("USED 38", "USED 39")) is None   # one unexplained
    assert harness.known_bug(depot + "\n  zone 'mbuf': 3 items lost") is None
    assert harness.known_bug("round 1/1 (refcount, seed 1): workers stopped") is None
    revived = ("round 1/2 (pipeline, seed 20261122): after the count: zone mbuf_packet: "
               "USED 118, the living hold 116\nmbuf_packet 1738496: alloc held by CPU 2 "
               "(worker place 1 generation 0), type 1, flags 0x1, refcount 1, owner 1738496\n"
               "mbuf_packet 1204992: alloc held by CPU 255 (no live process), type 0 "
               "(MT_NOTMBUF: set aside for its copies), flags 0x1, refcount 1, owner 1204992")
    assert harness.known_bug(revived) == "limbo+revived"
    assert harness.known_bug(revived.replace("flags 0x1, refcount 1, owner 1738496",
                                             "flags 0x3, refcount 1, owner 1738496")) is None
    assert harness.known_bug(revived.replace("owner 1738496", "owner 1738497")) is None


def test_used_problems_count_what_nobody_holds():
    from shmalloc import M_NOWAIT, Arena
    with Arena.create_local(8 << 20) as arena:
        z = arena.zcreate("z", 256)
        hs = [z.alloc(M_NOWAIT) for _ in range(5)]
        problems, lost = harness.used_problems(arena, {"z": 3})
        assert lost == 2 and problems == ["zone z: USED 5, the living hold 3"]
        assert harness.used_problems(arena, {"z": 5}) == ([], 0)
        z.free_bulk(hs)
        arena.check()


def test_describe_clusters_names_a_cluster_no_packet_holds():
    from shmalloc import M_NOWAIT, Arena
    from shmalloc import mbuf as mb
    from shmalloc.mbuf.diagnose import describe_clusters
    with Arena.create_local(16 << 20) as arena:
        m = mb.m_getcl(mb.M_NOWAIT, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
        zc = arena.zone("mbuf_cluster")
        c = zc.alloc(M_NOWAIT)
        problems, lost = harness.used_problems(arena, {"mbuf_packet": 1})
        assert lost == 1 and problems[0].startswith("zone mbuf_cluster:")
        text = describe_clusters(arena, {arena.cpu_id: "this test"})
        assert text == (f"mbuf_cluster {c}: alloc held by CPU {arena.cpu_id} (this test); "
                        f"no packet-zone item points at it")
        zc.free(c)
        mb.m_freem(m)
        assert describe_clusters(arena, {}) == ""
        arena.check()
