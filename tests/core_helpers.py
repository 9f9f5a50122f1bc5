"""What the one-process core tests (``test_zone.py``, ``test_cache.py``,
``test_sleepq.py`` and the other files named after a core module) share: the
``arena`` fixture, a local arena (``Arena.create_local``: a ``bytearray`` and
in-process locks, no OS objects, fast), the ``hooks`` fixture of ``hooks_mod``'s
recorder, a zone with every hook, two zones with an item each, and the checks and
thread helpers the tests use.  Its arenas are bare (``bare=True``: no layer's zones,
such as the mbuf zones every arena is made with), since the counts there are the
core's.

Test modules import what they use by name (``from core_helpers import arena``).
"""

import threading
import time

import pytest

from shmalloc import M_NOWAIT, Arena
from tests import hooks_mod

MiB = 1 << 20
JOIN = 10.0          # seconds: the bound of every thread join and wait-for-condition


@pytest.fixture
def arena():
    a = Arena.create_local(size=8 * MiB, bare=True)
    yield a
    a.destroy()


@pytest.fixture
def hooks():
    hooks_mod.reset()
    yield hooks_mod
    hooks_mod.reset()


def assert_disjoint(zone, handles):
    """No two of ``handles`` (items of ``zone.size`` bytes) overlap."""
    hs = sorted(handles)
    assert len(set(hs)) == len(hs), "a handle was handed out twice"
    for lo, hi in zip(hs, hs[1:]):
        assert lo + zone.size <= hi, f"items {lo} and {hi} of {zone.size} bytes overlap"


def assert_consistent(arena, *zones):
    """check() passes and, per zone, items out of the slabs = used + cached + depot."""
    arena.check()
    for z in zones:
        s = z.stats()
        assert s.items == s.used + s.free_cache + s.free_depot, s


def wait_until(cond, what, timeout=JOIN):
    """Poll ``cond`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


class Worker(threading.Thread):
    """Run ``fn`` in a thread; keep its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:          # re-raised by finish()
            self.error = e

    def finish(self, timeout=JOIN):
        self.join(timeout)
        assert not self.is_alive(), f"thread {self.name} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result

    @classmethod
    def run_now(cls, fn, timeout=JOIN):
        """``fn()`` in a thread of its own, bounded by ``timeout``."""
        w = cls(fn)
        w.start()
        return w.finish(timeout)


def hooked_zone(arena, name="hooked", bucket_size=4, **kw):
    return arena.zcreate(name, 256, bucket_size=bucket_size, ctor=hooks_mod.ctor,
                         dtor=hooks_mod.dtor, init=hooks_mod.init, fini=hooks_mod.fini, **kw)


@pytest.fixture
def two_zones(arena):
    z = arena.zcreate("mine", 256)
    other = arena.zcreate("other", 512)
    h = z.alloc(M_NOWAIT)
    ho = other.alloc(M_NOWAIT)
    return z, other, h, ho


def assert_names(exc, zone, handle):
    msg = str(exc)
    assert repr(zone.name) in msg, msg
    assert str(handle) in msg, msg
