"""``shmalloc bench``: the quick run produces every section's rows, ``--only`` runs a
subset, and the rows' ratios point the same way (above 1: shmalloc is better).

The quick run is the CI smoke test of the whole comparison (seconds); the figures it
prints are not checked, only that each was measured.  The autouse ``no_leaks`` fixture
fails a test that leaves any of the benchmark's arenas behind.
"""

import importlib.util
import io
import json
import subprocess
import sys

import pytest

from shmalloc.ipc import naming
from shmalloc.scripts import bench, bench_app, bench_handoff, cli

TIMEOUT = 120
HAS_FASTER_FIFO = importlib.util.find_spec("faster_fifo") is not None
HAS_DASK = importlib.util.find_spec("distributed") is not None


def _objects_of(prefix):
    return [(k, n) for k, n in naming.list_objects()
            if (naming.arena_of(n) or "").startswith(prefix)]


@pytest.mark.slow
def test_quick_run_has_every_section(arena_name, tmp_path):
    path = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "shmalloc.scripts.bench", "--quick",
                           "--repeat", "1", "--json", str(path), "--name", arena_name],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("metric")
    assert "hand-off, producer -> consumer" in proc.stdout
    report = json.loads(path.read_text())
    results = report["results"]
    assert {r["section"] for r in results.values()} == set(bench.SECTIONS) - (
        set() if HAS_DASK else {"dask"})            # dask: rows only where Dask is installed
    for key, row in results.items():
        assert row["value"] > 0, key
        assert row["ok"] in (True, False, None), key
        if row["peer"] is not None:
            assert row["peer_value"] > 0 and row["ratio"] > 0, key
    for key in ("pair", "bulk_bucket64", "zone_lock_per_bucket", "m_getcl",
                "handoff_2k_queue", "handoff_2k_pipe", "handoff_1m_queue", "handoff_1m_pipe",
                "growth_live_1k", "growth_live_10k", "growth_arena_small", "mem_total",
                "mem_rss_worker", "scaling_two_workers", "debug0_pair", "debug1_pair",
                "debug3_m_getcl", "debug2_burst", "app_alloc_2k", "app_alloc_64k",
                "app_alloc_1m", "app_pickle", "app_pool_pickle", "app_pool_shm",
                "app_handoff_queue", "app_handoff_pipe", "app_pair"):
        assert key in results, key
    assert ("handoff_2k_faster_fifo" in results) == HAS_FASTER_FIFO
    assert results["handoff_2k_queue"]["target"] and results["handoff_64k_queue"]["target"] is None
    transports = {(r["transport"], r["size"]) for r in report["handoff"]}
    for size in bench_handoff.SIZES:
        assert {("shmalloc", size), ("mp.Queue", size), ("mp.Pipe", size)} <= transports
    assert all(r["items_per_s"] > 0 and r["runs"] for r in report["handoff"])
    assert report["memory"]["overhead"]["ipers"] > 0
    assert report["memory"]["rss_worker"]["rss"] > 0
    for setup in ("zone", "own_zone", "floor"):
        assert report["scaling"][setup]["one"] > 0
        assert len(report["scaling"][setup]["two_each"]) == 2
    assert [r["level"] for r in report["debug"]] == [0, 1, 2, 3]
    app = report["app"]
    assert [r["size"] for r in app["alloc"]] == list(bench_app.ALLOC_SIZES_QUICK)
    assert app["pickle"]["dump_us"] > 0 and app["pickle"]["shm_load_close_us"] > 0
    assert set(app["pool"]["seconds"]) == {"pickle", "shm", "shmalloc"}
    assert app["handoff"]["limit"] == bench_app.PLAIN_LIMIT and app["handoff"]["bucket"] > 0
    assert "where applications meet it" in proc.stdout
    if HAS_DASK:
        for key in ("dask_1m_copy", "dask_1m_arena", "dask_4m_copy", "dask_4m_arena"):
            assert key in results, key
        recs = report["dask"]["records"]
        assert {(r["setup"], r["size"]) for r in recs} == {
            (s, n) for s in ("dask", "shmalloc", "shmalloc-arena") for n in (1 << 20, 4 << 20)}
        for r in recs:                     # references: a few hundred bytes on the comm
            assert (r["wire"] >= r["size"]) == (r["setup"] == "dask"), r
        assert "Dask, worker A -> worker B" in proc.stdout
    else:
        assert any("Dask distributed is not installed" in n for n in report["notes"])
    assert all(r["slowdown"]["pair"] > 0 for r in report["debug"])
    assert "debug levels (SHMALLOC_DEBUG" in proc.stdout
    assert report["params"]["quick"] is True
    assert report["params"]["sections"] == list(bench.SECTIONS)
    assert _objects_of(arena_name) == []


@pytest.mark.slow
def test_only_runs_the_sections_named(arena_name, tmp_path, capsys):
    path = tmp_path / "mem.json"
    status = cli.main(["bench", "--quick", "--repeat", "1", "--only", "memory",
                       "--json", str(path), "--name", arena_name])
    assert status == 0
    report = json.loads(path.read_text())
    assert {r["section"] for r in report["results"].values()} == {"memory"}
    assert set(report["seconds"]) == {"memory"}
    assert "handoff" not in report
    assert capsys.readouterr().out.startswith("metric")
    assert _objects_of(arena_name) == []


@pytest.mark.parametrize("only", ["nope", "pair,nope", ","])
def test_only_rejects_unknown_sections(only):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--only", only])
    assert e.value.code == 2


def test_ratio_above_one_means_shmalloc_is_better():
    rows = bench._Rows()
    rows.section = "x"
    rows.add("time", "t", 1.0, "us", "peer", 4.0)                         # 4x faster
    rows.add("rate", "r", 300.0, "items/s", "peer", 100.0, better="higher")   # 3x more
    rows.add("alone", "a", 5.0, "MB")
    assert rows.results["time"]["ratio"] == 4.0
    assert rows.results["rate"]["ratio"] == 3.0
    assert rows.results["alone"]["ratio"] is None
    out = io.StringIO()
    bench.print_table(rows.results, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("metric") and len(lines) == 4
    assert "4x" in lines[1] and "3x" in lines[2]


def test_batch_and_limit_of_the_handoff_zone():
    assert bench_handoff.batch_for(2048) == bench_handoff.BATCH
    for size in bench_handoff.SIZES:
        limit = bench_handoff.limit_for(size)
        assert 1 <= bench_handoff.batch_for(size) <= limit // 4
        assert limit * size <= max(bench_handoff.INFLIGHT_BYTES, 2 * size)
