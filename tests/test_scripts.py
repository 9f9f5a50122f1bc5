"""The runnable tools: ``shmalloc launch|bench|stat|check|cleanup`` and their modules.

Commands run in-process through ``cli.main`` where that is enough, and as subprocesses
(console script, ``python -m``) where the entry point itself is under test. The autouse
``no_leaks`` fixture (conftest.py) fails any test that leaves an OS object behind.
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shmalloc import Arena
from shmalloc import mbuf as mb
from shmalloc.ipc import naming
from shmalloc.scripts import cli
from shmalloc.workers.launcher import launch

TIMEOUT = 120
VMSTAT_HEADER = re.compile(r"^ITEM +SIZE +LIMIT +USED +FREE +REQ", re.MULTILINE)
CONSOLE_SCRIPT = shutil.which("shmalloc", path=str(Path(sys.executable).parent))
BENCH_METRICS = {"pair", "pair_vs_shared_memory", "pair_vs_floor", "burst", "bulk_bucket64",
                 "bulk_default", "zone_lock_per_bucket", "pair_nocache"}


def run(*argv):
    """Run a command line; the finished process (text output), checked for no timeout."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


# ------------------------------------------------------------------------ launch
@pytest.mark.slow
def test_launch_in_process_runs_workers_and_reports(arena_name):
    out = io.StringIO()
    summary = launch(n=2, seconds=1.5, size=16 << 20, seed=7, name=arena_name, out=out,
                     live=False)
    text = out.getvalue()
    assert summary["ok"] and summary["check_ok"] and summary["errors"] == [], text
    assert summary["seed"] == 7 and summary["cpus"] == 2
    assert summary["ops"] > 0 and summary["ops_per_s"] > 0
    assert "seed 7" in text.splitlines()[0]
    assert VMSTAT_HEADER.search(text) and "check: ok" in text
    for zone in ("churn256", "churn2048", "churn9216"):
        assert re.search(rf"^{zone}:\s+\d+,\s+0,\s+0,", text, re.MULTILINE), text  # USED 0
    assert naming.list_objects(arena_name) == []


# failed workers during a launch: tests/test_launch.py


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["console script", "cli module", "launch module"])
def test_launch_command_exits_0_and_leaves_nothing(arena_name, entry):
    args = ["launch", "-n", "2", "--seconds", "1", "--name", arena_name]
    if entry == "console script":
        if CONSOLE_SCRIPT is None:
            pytest.skip("console script missing: pip install -e . again")
        proc = run(CONSOLE_SCRIPT, *args)
    elif entry == "cli module":
        proc = run(sys.executable, "-m", "shmalloc.scripts.cli", *args)
    else:
        proc = run(sys.executable, "-m", "shmalloc.scripts.launch", *args[1:])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: ok" in proc.stdout and VMSTAT_HEADER.search(proc.stdout)
    assert naming.list_objects(arena_name) == []


@pytest.mark.parametrize("argv", [[], ["launch", "--seconds", "11"], ["launch", "-n", "0"],
                                  ["stat", "--name", "x"], ["cleanup"]])
def test_usage_errors_exit_2(argv, capsys):
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = e.code
    assert status == 2


# ------------------------------------------------------------------------ bench
@pytest.mark.slow
def test_bench_quick_writes_json_with_every_metric(arena_name, tmp_path):
    path = tmp_path / "bench.json"
    proc = run(sys.executable, "-m", "shmalloc.scripts.bench", "--quick", "--repeat", "1",
               "--json", str(path), "--name", arena_name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("metric")
    report = json.loads(path.read_text())
    assert BENCH_METRICS <= set(report["results"])     # every section: tests/test_bench.py
    for key, row in report["results"].items():
        assert row["value"] > 0, key
    assert report["results"]["pair"]["peer_value"] > 0
    assert report["params"]["quick"] is True


# ------------------------------------------------------------------------ stat, check
@pytest.fixture
def busy_arena(arena_name):
    """An arena with a zone holding a few allocated items."""
    with Arena.create(arena_name, size=8 << 20) as arena:
        zone = arena.zcreate("frames", 2048)
        held = [zone.alloc() for _ in range(5)]
        arena.stats()               # publishes this CPU's counters for other attachments
        yield arena
        zone.free_bulk(held)


def test_stat_z_prints_vmstat(busy_arena, capsys):
    assert cli.main(["stat", "-z", "--name", busy_arena.name]) == 0
    out = capsys.readouterr().out
    assert VMSTAT_HEADER.search(out)
    assert re.search(r"^frames:\s+2048,\s+0,\s+5,", out, re.MULTILINE), out


def test_stat_z_repeats_with_wait_and_count(busy_arena, capsys):
    assert cli.main(["stat", "-z", "--name", busy_arena.name, "-w", "0.05", "-c", "3"]) == 0
    assert len(VMSTAT_HEADER.findall(capsys.readouterr().out)) == 3


def test_stat_m_prints_netstat_m(busy_arena, capsys):
    assert cli.main(["stat", "-m", "--name", busy_arena.name]) == 0
    out = capsys.readouterr().out
    assert "mbufs in use (current/cache/total)" in out
    assert "mbuf clusters in use (current/cache/total/max)" in out


def test_sysctl_reads_raises_and_refuses_to_lower(busy_arena, capsys):
    name = busy_arena.name
    assert cli.main(["sysctl", "--name", name, "kern.ipc.nmbclusters"]) == 0
    before = int(capsys.readouterr().out.split(":")[1])
    assert cli.main(["sysctl", "--name", name, f"kern.ipc.nmbclusters={before + 10}"]) == 0
    assert f"{before} -> {before + 10}" in capsys.readouterr().out
    assert cli.main(["sysctl", "--name", name, f"kern.ipc.nmbclusters={before}"]) == 1
    assert "Invalid argument" in capsys.readouterr().err
    assert cli.main(["sysctl", "--name", name, "kern.ipc.nosuch"]) == 1


def test_sysctl_command_line(arena_name, capsys):
    a = Arena.create(arena_name, 8 << 20)
    try:
        assert cli.main(["sysctl", "--name", arena_name, "kern.ipc.nmbclusters"]) == 0
        assert capsys.readouterr().out == "kern.ipc.nmbclusters: 3072\n"
        assert cli.main(["sysctl", "--name", arena_name, "kern.ipc.nmbclusters=5000"]) == 0
        assert capsys.readouterr().out == "kern.ipc.nmbclusters: 3072 -> 5000\n"
        assert a.sysctl("kern.ipc.nmbclusters") == 5000 == a.zone("mbuf_cluster").limit
        assert cli.main(["sysctl", "--name", arena_name, "kern.ipc.nmbclusters=10"]) == 1
        assert "kern.ipc.nmbclusters=10: Invalid argument" in capsys.readouterr().err
        assert cli.main(["sysctl", "--name", arena_name, "kern.ipc.bogus"]) == 1
        assert "unknown oid 'kern.ipc.bogus'" in capsys.readouterr().err
        assert cli.main(["sysctl", "--name", arena_name, "kern.ipc.maxmbufmem=1"]) == 1
        assert "read only tunable" in capsys.readouterr().err
        assert cli.main(["sysctl", "--name", arena_name, "-n", "kern.ipc.nmbjumbop"]) == 0
        assert capsys.readouterr().out == "1536\n"
        assert cli.main(["sysctl", "--name", arena_name, "-a"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == len(mb.SYSCTLS)
        assert cli.main(["sysctl", "--name", arena_name]) == 2
        text = mb.stat_m_text(arena_name)
        ipers = a.zone("mbuf_cluster").keg.ipers                # max: whole slabs
        assert text.startswith("0/") and f"/{-(-5000 // ipers) * ipers} mbuf clusters in" in text
        a.check()
    finally:
        a.destroy()


def test_sysctl_follows_sysctl8_for_n_a_and_several_names(busy_arena, capsys):
    name = busy_arena.name
    before = busy_arena.sysctl("kern.ipc.nmbjumbop")
    # -n on a change: the old and the new value, without the name
    assert cli.main(["sysctl", "--name", name, "-n", f"kern.ipc.nmbjumbop={before + 1}"]) == 0
    assert capsys.readouterr().out == f"{before} -> {before + 1}\n"
    # several names: each is done, a failure is reported and makes the status 1
    assert cli.main(["sysctl", "--name", name, "kern.ipc.nosuch", "kern.ipc.nmbjumbop",
                     f"kern.ipc.nmbjumbop={hex(before + 2)}"]) == 1
    out, err = capsys.readouterr()
    assert out == (f"kern.ipc.nmbjumbop: {before + 1}\n"
                   f"kern.ipc.nmbjumbop: {before + 1} -> {before + 2}\n")
    assert "unknown oid 'kern.ipc.nosuch'" in err
    # -a is ignored when names are given; a value that is not an integer is refused
    assert cli.main(["sysctl", "--name", name, "-a", "kern.maxusers"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert cli.main(["sysctl", "--name", name, "kern.ipc.nmbjumbop=lots"]) == 1
    assert "invalid integer 'lots'" in capsys.readouterr().err


def test_stat_of_missing_arena_exits_1(arena_name, capsys):
    assert cli.main(["stat", "-z", "--name", arena_name]) == 1
    assert arena_name in capsys.readouterr().err


def test_check_exits_0_on_a_sound_arena(busy_arena, capsys):
    assert cli.main(["check", "--name", busy_arena.name]) == 0
    assert "check: ok" in capsys.readouterr().out


# ------------------------------------------------------------------------ cleanup
@pytest.mark.slow
def test_cleanup_removes_an_abandoned_arena(arena_name, capsys):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from shmalloc import Arena\n"
         "a = Arena.create(sys.argv[1], size=8 << 20)\n"
         "a.zcreate('frames', 2048).alloc()\n"
         "print('ready', flush=True)\n"
         "time.sleep(TIMEOUT)\n".replace("TIMEOUT", str(TIMEOUT)), arena_name],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT)
        child.stdout.close()
    left = naming.list_objects(arena_name)
    assert left, "the killed creator should have left its objects"
    assert cli.main(["cleanup", "--name", arena_name]) == 0
    out = capsys.readouterr().out
    assert naming.list_objects(arena_name) == []
    for _, name in left:
        assert name in out


def test_cleanup_leaves_an_arena_in_use_alone(busy_arena, capsys):
    assert cli.main(["cleanup", "--name", busy_arena.name]) == 1
    assert f"in use by pid {os.getpid()}" in capsys.readouterr().out
    assert naming.list_objects(busy_arena.name)


def test_cleanup_of_unknown_arena_says_so(arena_name, capsys):
    assert cli.main(["cleanup", "--name", arena_name]) == 0
    assert "no OS objects" in capsys.readouterr().out


# ------------------------------------------------------------------------ serve --strict
@pytest.mark.slow
def test_serve_strict_refuses_an_arena_larger_than_dev_shm(arena_name):
    from shmalloc.ipc import shm_free_bytes
    size = shm_free_bytes() + (1 << 30)            # refused before anything is made
    if size >= 1 << 40:
        pytest.skip("/dev/shm is larger than the largest arena")
    r = run(sys.executable, "-m", "shmalloc.scripts.cli", "serve", "--name", arena_name,
            "--size", str(size), "--strict", "-q")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "bytes asked, /dev/shm has" in r.stderr and "strict" in r.stderr, r.stderr
    assert naming.list_objects(arena_name) == []
