"""The stress sweep (a smoke run: the sweep itself is a tool, not a timed test)."""

import json

from shmalloc.scripts import cli
from shmalloc.workers.stress import run_config

KEYS = {"workers", "bucket_size", "workload", "xfree", "ops_per_s",
        "zone_lock_acquisitions_per_op", "contended_share"}


def test_bucket_zero_takes_the_zone_lock_on_every_operation():
    rec = run_config(1, "0", "churn", "local", 0.3, seed=1)
    assert rec.ops > 0
    assert rec.zone_lock_acquisitions_per_op > 0.95     # alloc and free each take it (the
    # counters are read at the edges of the timed window: a few operations may fall outside)
    cached = run_config(1, "adaptive", "churn", "local", 0.3, seed=1)
    assert cached.zone_lock_acquisitions_per_op < 0.05


def test_pipeline_with_message_frees_sends_batches_home():
    rec = run_config(2, "16", "pipeline", "message", 0.5, seed=2)
    assert rec.messages > 0 and rec.items_per_message > 1


def test_cli_sweep_writes_json_records(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert cli.main(["stress", "--workers", "1", "--bucket-sizes", "0,adaptive",
                     "--workloads", "bulk", "--xfree", "local", "--seconds", "0.2",
                     "--seed", "7", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 2 and all(KEYS <= set(r) for r in records)
    assert "ZLOCK/OP" in capsys.readouterr().out


def test_cli_refuses_a_bad_bucket_size(capsys):
    try:
        cli.main(["stress", "--bucket-sizes", "999"])
    except SystemExit as e:
        assert e.code == 2
    assert "bucket size" in capsys.readouterr().err
