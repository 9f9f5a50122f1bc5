"""``shmalloc launch``: a keg manager (``shmalloc serve`` in a subprocess) and N worker
CPUs running churn, pipeline or refcount, random workers SIGKILLed and replaced with
``--kill-every``, the manager killed and adopted with ``--kill-manager``; the report
(progress line, per-worker, mail, kills and recoveries, per-zone and per-lock tables,
netstat -m, vmstat -z, check) and no OS object left afterwards.

The kill tests proper (what recovery must guarantee) are in tests/test_kill.py.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys

import pytest

from shmalloc.ipc import naming
from shmalloc.workers import launcher
from shmalloc.workers.cpu import WorkerSpec, cpu_main
from shmalloc.workers.launcher import launch

TIMEOUT = 120
SIZE = 16 << 20
VMSTAT_HEADER = re.compile(r"^ITEM +SIZE +LIMIT +USED +FREE +REQ", re.MULTILINE)


def _launch(arena_name, **kw):
    out = io.StringIO()
    kw.setdefault("size", SIZE)
    kw.setdefault("seed", 5)
    summary = launch(name=arena_name, out=out, live=True, **kw)
    return summary, out.getvalue()


def _assert_clean_report(summary, text, arena_name):
    assert summary["ok"] and summary["check_ok"] and summary["errors"] == [], text
    assert "\ncheck: ok" in text and VMSTAT_HEADER.search(text), text
    assert "OS objects left: none" in text
    assert "LOCK" in text and "CONTENDED" in text and "MAX WAIT" in text
    assert naming.list_objects(arena_name) == []


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["pipeline", "refcount"])
def test_mbuf_workloads_run_report_netstat_and_mail(arena_name, workload):
    summary, text = _launch(arena_name, n=3, seconds=1.5, workload=workload)
    _assert_clean_report(summary, text, arena_name)
    assert f"workload {workload}" in text.splitlines()[0]
    assert "mbuf clusters in use (current/cache/total/max)" in text       # netstat -m
    m = re.search(r"^mail: ([\d,]+) messages, ([\d,]+) items handed over", text, re.MULTILINE)
    assert m and int(m.group(2).replace(",", "")) > 0, text
    assert re.search(r"ops/s +mail +[\d,]+ msg/s", text), "progress line"
    assert re.search(r"^mbuf_packet:\s+256,\s+\d+,\s+0,", text, re.MULTILINE), "USED 0 at the end"
    assert summary["ops"] > 0 and summary["kills"] == 0 and summary["deaths"] == 0


@pytest.mark.slow
def test_kill_every_replaces_workers_and_the_manager_recovers_them(arena_name):
    summary, text = _launch(arena_name, n=3, seconds=3.0, workload="churn", kill_every=0.5)
    _assert_clean_report(summary, text, arena_name)
    assert summary["kills"] >= 4, text
    assert summary["recoveries"] >= summary["kills"] - 1, text       # the last may race stop
    assert text.count("launch: SIGKILL worker pid") == summary["kills"]
    assert "manager: recovered CPU" in text
    assert re.search(rf"kills: {summary['kills']} by SIGKILL", text)
    for zone in ("churn256", "churn2048", "churn9216"):
        assert re.search(rf"^{zone}:\s+\d+,\s+0,\s+0,", text, re.MULTILINE), text  # USED 0


@pytest.mark.slow
def test_kill_manager_adopts_the_arena_and_loses_nothing(arena_name):
    summary, text = _launch(arena_name, n=2, seconds=2.0, workload="refcount",
                            kill_manager=True)
    _assert_clean_report(summary, text, arena_name)
    assert summary["managers"] == 2
    assert "adopting arena" in text and "killed the keg manager" in text


def _bad_cpu_main(spec, team, results):
    """Spawned in place of cpu_main: worker 0 dies by SIGKILL before reporting (nobody
    killed it), worker 1 fails (a zone that does not exist), worker 2 works."""
    if spec.index == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.index == 1:
        spec = WorkerSpec(spec.arena, spec.index, spec.gen, spec.workload, spec.seed,
                          {"zones": ["no such zone"]})
    cpu_main(spec, team, results)


@pytest.mark.slow
def test_failed_workers_are_reported_not_replaced_and_everything_is_cleaned_up(
        arena_name, monkeypatch):
    monkeypatch.setattr(launcher, "cpu_main", _bad_cpu_main)
    summary, text = _launch(arena_name, n=3, seconds=1.0, workload="churn")
    assert not summary["ok"] and summary["check_ok"]
    killed, failed = sorted(summary["errors"])
    assert "worker 0" in killed and f"status {-signal.SIGKILL} without a report" in killed
    assert "worker 1" in failed and "no such zone" in failed
    assert "error: worker 1" in text
    assert summary["deaths"] == 2                      # not replaced: they would fail again
    assert naming.list_objects(arena_name) == []


@pytest.mark.slow
def test_launch_command_with_workload_and_kills_exits_0(arena_name):
    proc = subprocess.run([sys.executable, "-m", "shmalloc.scripts.cli", "launch", "-n", "3",
                           "--workload", "churn", "--seconds", "2", "--kill-every", "0.6",
                           "--size", str(SIZE), "--name", arena_name],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: ok" in proc.stdout and "OS objects left: none" in proc.stdout
    assert "SIGKILL a worker every 0.6 s" in proc.stdout.splitlines()[0]
    assert naming.list_objects(arena_name) == []


@pytest.mark.parametrize("argv", [["--workload", "bogus"], ["--kill-every", "0"],
                                  ["--kill-every", "-1"], ["--kill-every", "x"]])
def test_bad_launch_options_exit_2(argv):
    from shmalloc.scripts import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["launch", *argv])
    assert e.value.code == 2
