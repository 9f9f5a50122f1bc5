"""The stress sweep (a smoke run: the sweep itself is a tool, not a timed test)."""

import json
import re

import pytest

from shmalloc.scripts import cli
from shmalloc.scripts import stress as stress_script
from shmalloc.workers.stress import BATCH, rate_line, run_config

KEYS = {"workers", "bucket_size", "workload", "xfree", "ops_per_s",
        "zone_lock_acquisitions_per_op", "contended_share", "bulk", "locks"}
RATE = re.compile(r"^workers=(\d+) bucket=(\w+) bulk=(\d+) ops/s=(\d+)$", re.M)


@pytest.mark.slow
def test_bucket_zero_takes_the_zone_lock_on_every_operation(arena_name):
    rec = run_config(1, "0", "churn", "local", 0.3, seed=1, name=arena_name)
    assert rec.ops > 0
    assert rec.zone_lock_acquisitions_per_op > 0.95     # alloc and free each take it (the
    # counters are read at the edges of the timed window: a few operations may fall outside)
    zone = rec.zone_lock()
    assert zone.acquisitions == pytest.approx(rec.ops, rel=0.05)
    assert zone.holds > 0 and zone.hold_ns > 0 and sum(zone.hold_hist) == zone.holds
    cached = run_config(1, "adaptive", "churn", "local", 0.3, seed=1, name=arena_name)
    assert cached.zone_lock_acquisitions_per_op < 0.05


@pytest.mark.slow
def test_pipeline_with_message_frees_sends_batches_home(arena_name):
    rec = run_config(2, "16", "pipeline", "message", 0.5, seed=2, name=arena_name)
    assert rec.messages > 0 and rec.items_per_message > 1
    assert rec.bulk == 1
    assert rate_line(rec) == f"workers=2 bucket=16 bulk=1 ops/s={rec.ops_per_s:.0f}"


@pytest.mark.slow
def test_cli_sweep_prints_a_rate_line_and_a_lock_profile_per_point(tmp_path, capsys,
                                                                   arena_name):
    out = tmp_path / "s.json"
    assert cli.main(["stress", "--workers", "1", "--bucket-sizes", "0,adaptive",
                     "--workloads", "bulk", "--xfree", "local", "--seconds", "0.2",
                     "--seed", "7", "--json", str(out), "--top", "2",
                     "--name", arena_name]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 2 and all(KEYS <= set(r) for r in records)
    text = capsys.readouterr().out
    assert "ZLOCK/OP" in text
    rates = RATE.findall(text)
    assert [(w, b, k) for w, b, k, _ in rates] == [("1", "0", str(BATCH)),
                                                   ("1", "adaptive", str(BATCH))]
    assert [float(r) for *_, r in rates] == [round(r["ops_per_s"]) for r in records]
    # after each rate line, the window's lock profile: its header and the top 2 locks,
    # among them the zone lock (taken by every bulk call with no cache) for bucket 0
    first = text.split("workers=1 bucket=0 ", 1)[1].splitlines()
    assert first[1].split()[:2] == ["count", "contended"]
    assert "zone:stress" in (first[2].split()[-1], first[3].split()[-1]) and first[4] == ""
    locks = {lk["name"]: lk for lk in records[0]["locks"]}
    assert locks["zone:stress"]["acquisitions"] > 0 and len(locks["zone:stress"]["hold_hist"]) == 24


def test_hist_plot_goes_beside_the_plot(tmp_path):
    assert stress_script.hist_path(str(tmp_path / "s.png")) == str(tmp_path / "s-hist.png")
    assert stress_script.hist_path("sweep") == "sweep-hist.png"


def test_cli_plots_the_sweep_and_the_histograms(tmp_path, capsys, arena_name):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    assert cli.main(["stress", "--workers", "1", "--bucket-sizes", "0",
                     "--workloads", "churn", "--xfree", "local", "--seconds", "0.2",
                     "--seed", "3", "--plot", str(png), "--name", arena_name]) == 0
    hist_png = tmp_path / "sweep-hist.png"
    for p in (png, hist_png):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {hist_png}" in capsys.readouterr().out


def test_cli_refuses_a_bad_bucket_size(capsys):
    try:
        cli.main(["stress", "--bucket-sizes", "999"])
    except SystemExit as e:
        assert e.code == 2
    assert "bucket size" in capsys.readouterr().err
