"""A smoke run of the soak (the real one is documented, not run in CI)."""

import pytest

from shmalloc.scripts import soak as soak_script
from shmalloc.workers.soak import soak

pytestmark = pytest.mark.slow


def test_a_short_soak_samples_and_ends_consistent():
    r = soak(workers=2, ops=60_000, interval=0.1, size=16 << 20, seed=3)
    assert r.ops >= 60_000
    assert r.samples and all(s.rss_mb for s in r.samples)
    assert max(max(s.rss_mb) for s in r.samples) < 100


def test_the_script_prints_a_summary(capsys):
    assert soak_script.main(["--workers", "1", "--ops", "20000", "--interval", "0.1",
                             "--size", str(16 << 20), "--seed", "1"]) == 0
    assert "check: ok" in capsys.readouterr().out
