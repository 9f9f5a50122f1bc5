"""shmalloc.integrations.ray with a real local Ray instance: Buffers and SharedArrays
go into Ray's object store by value, read any number of times, results of tasks
included; the arena holds nothing once they are dropped, and removes itself.

Optional: Ray is heavy and not in the test extra, so this module is skipped where
``ray`` does not import (``pip install -e '.[test,ray]'`` to run it).
"""

import gc
import time

import numpy as np
import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: the Ray integration is optional "
                  "(pip install -e '.[test,ray]' to run this test)")

import shmalloc  # noqa: E402
from shmalloc.integrations import ray as sr  # noqa: E402
from shmalloc.ipc import naming  # noqa: E402

WAIT = 60.0
REF_ZONES = ("mbuf", "mbuf_packet", "mbuf_jumbo_page", "mbuf_jumbo_9k", "mbuf_jumbo_16k",
             "mbuf_ext_refcnt")


def in_use(arena) -> dict:
    gc.collect()
    return {z: arena.zone_stats(z).used for z in arena.zones()
            if (z in REF_ZONES or z.startswith("buf_")) and arena.zone_stats(z).used}


def wait_for(what, cond, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@ray.remote
def make_shared(n, value):
    a = shmalloc.connect().ndarray(n)
    a[:] = value
    return a


@ray.remote
def describe(a):
    return type(a).__name__, float(np.asarray(a).sum()), bool(np.asarray(a).flags.writeable)


def test_buffers_and_shared_arrays_go_into_rays_store_by_value(arena_name, monkeypatch):
    env = {"SHMALLOC_ARENA": arena_name, "SHMALLOC_IDLE_EXIT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "shmalloc.integrations.ray.register",
                          "env_vars": env})
    arena = shmalloc.connect(arena_name)
    try:
        sr.register()
        x = arena.ndarray((1000, 100))
        x[:] = 2.0
        ref = ray.put(x)                              # one copy into Ray's store
        x[:] = 5.0                                    # a value: later writes do not show
        for _ in range(3):                            # read any number of times
            y = ray.get(ref)
            assert type(y) is np.ndarray and not y.flags.writeable and y.sum() == 200_000
        assert ray.get(describe.remote(ref)) == ("ndarray", 200_000.0, False)
        b = arena.from_bytes(b"spam" * 5000)
        got = ray.get(ray.put(b))
        assert isinstance(got, memoryview) and got.readonly and got.tobytes() == b.tobytes()
        r = make_shared.remote(300_000, 3.0)          # a task's result, made in a worker
        assert ray.get(describe.remote(r)) == ("ndarray", 900_000.0, False)
        assert float(ray.get(r).sum()) == 900_000.0 == float(ray.get(r).sum())
        del x, y, b, got
        wait_for(f"an empty arena ({in_use(arena)})", lambda: not in_use(arena))
        arena.check()
    finally:
        ray.shutdown()
        arena.close()
    wait_for(f"arena {arena_name} to remove itself", lambda: not naming.list_objects(arena_name))
