"""shmalloc.integrations.dask with the real engine: a ``distributed.LocalCluster`` of
two worker processes (with nannies) on this machine, set up with ``--preload
shmalloc.integrations.dask``, on an arena of its own.

A task on worker A makes a 64 MiB array; a task on worker B reads it and checks its
checksum; Dask's own transfer log on A shows that the bytes did not cross the comm
(a few hundred bytes written for 64 MiB of values); after the futures are released
the arena holds nothing; a worker killed mid-transfer (between the frame's arrival
and the take) loses nothing.  The frames themselves (fall back, refusals) are tested
in this process, without a cluster.

One cluster serves the module (its start takes a few seconds).  Its arena is named
"dask<pid>_...", not "t<pid>_...": while the workers hold it, conftest's leak check
counts its objects as another session's, and the module's teardown checks instead
that every one of them is gone once the cluster and the arena's idle time are over.
Each test waits (bounded) for the arena to be empty again before it ends.
Randomised tests print their seed (rerun with SHMALLOC_TEST_SEED=<seed>).
"""

import gc
import os
import random
import signal
import subprocess
import sys
import time
import types
import uuid
import zlib

import numpy as np
import pytest

distributed = pytest.importorskip(
    "distributed", reason="Dask distributed is not installed: pip install -e '.[test,dask]'")

import dask_tasks as T  # noqa: E402
import shmalloc  # noqa: E402
from shmalloc import buffer as B  # noqa: E402
from shmalloc import layout as L  # noqa: E402
from shmalloc.integrations import dask as sd  # noqa: E402
from shmalloc.ipc import naming  # noqa: E402
from distributed.protocol import deserialize, serialize  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
ARENA_SIZE = 512 * MiB
IDLE_EXIT = 2.0
WAIT = 60.0
REF_ZONES = ("mbuf", "mbuf_packet", "mbuf_jumbo_page", "mbuf_jumbo_9k", "mbuf_jumbo_16k",
             "mbuf_ext_refcnt")
ENV = ("SHMALLOC_ARENA", "SHMALLOC_IDLE_EXIT", "SHMALLOC_SIZE")


@pytest.fixture
def seed():
    s = int(os.environ.get("SHMALLOC_TEST_SEED") or random.randrange(1 << 32))
    print(f"seed {s} (rerun with SHMALLOC_TEST_SEED={s})")
    return s


def wait_for(what, cond, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def in_use(arena) -> dict:
    """Items allocated in the zones Buffers use, counted from the tags (exact)."""
    gc.collect()
    out = {}
    for z in arena.zones():
        if z in REF_ZONES or z.startswith("buf_"):
            used = arena.zone_stats(z).used
            if used:
                out[z] = used
    return out


def recovered(arena, pid) -> bool:
    """No CPU slot of ``pid`` is left: live, or dead and being recovered by the
    keg manager (a slot is freed once its items and references are given back)."""
    w = arena._core.w
    return not any(w[L.cpu_word(c) + L.CPU["PID"]] == pid
                   and w[L.cpu_word(c) + L.CPU["STATE"]] != L.CPU_FREE
                   for c in range(L.MAX_CPUS))


@pytest.fixture(scope="module")
def cl():
    name = f"dask{os.getpid()}_{uuid.uuid4().hex[:6]}"
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(SHMALLOC_ARENA=name, SHMALLOC_IDLE_EXIT=str(IDLE_EXIT),
                      SHMALLOC_SIZE=str(ARENA_SIZE))
    arena = shmalloc.connect(name)            # starts the arena's keg manager
    cluster = client = None
    try:
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
            preload=["shmalloc.integrations.dask"], silence_logs=40)
        client = distributed.Client(cluster)
        client.wait_for_workers(2, timeout=WAIT)
        yield types.SimpleNamespace(name=name, arena=arena, cluster=cluster, client=client)
    finally:
        if client is not None:
            client.close(timeout=WAIT)
        if cluster is not None:
            cluster.close(timeout=WAIT)
        arena.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        wait_for(f"arena {name} to remove itself", lambda: not naming.list_objects(name),
                 WAIT + IDLE_EXIT)


def workers(cl):
    cl.client.wait_for_workers(2, timeout=WAIT)
    return sorted(cl.client.scheduler_info()["workers"])


def settle(cl):
    """Every worker's pending references resolved, the arena empty and consistent.

    A transfer that failed (its peer was killed) leaves its value alive in the
    sender: distributed logs the error, and keeps its last log records in memory
    (``DequeHandler``, ``distributed.admin.log-length``), the exception's traceback
    with them, whose frame holds the message.  Without shmalloc the same bytes stay
    in the worker's memory.  Those records are cleared, and the garbage collected,
    before the arena is looked at."""
    from distributed.utils import DequeHandler

    def empty():
        cl.client.run(DequeHandler.clear_all_instances)
        cl.client.run(gc.collect)
        return not in_use(cl.arena)

    wait_for("the workers' pending references",
             lambda: all(c["pending"] == 0 for c in cl.client.run(T.counts).values()))
    wait_for("an empty arena", empty)
    cl.arena.check()


@pytest.mark.slow
def test_64_mib_from_worker_a_to_b_does_not_cross_the_comm(cl, seed):
    A, B_ = workers(cl)
    c = cl.client
    before = c.run(T.counts)
    x = c.submit(T.make, SIZE, seed, workers=[A], pure=False)
    got = c.submit(T.describe, x, workers=[B_], pure=False).result(WAIT)
    expect = zlib.crc32(np.random.default_rng(seed).random(SIZE // 8).tobytes())
    assert got["crc"] == expect and got["type"] == "SharedArray" and got["writeable"]
    total, wire = c.run(T.outgoing, workers=[A])[A][-1]   # Dask's own transfer log
    assert total == SIZE and wire < 4096, (total, wire)
    after = c.run(T.counts)
    assert after[A]["sent_by_reference"] - before[A]["sent_by_reference"] == 1
    assert after[A]["bytes_copied_in"] - before[A]["bytes_copied_in"] == SIZE  # one memcpy
    assert after[B_]["taken"] - before[B_]["taken"] == 1
    del x
    settle(cl)


@pytest.mark.slow
def test_arena_arrays_and_their_views_go_with_no_copy(cl, seed):
    A, B_ = workers(cl)
    c = cl.client
    before = c.run(T.counts, workers=[A])[A]
    x = c.submit(T.make_shared, SIZE, seed, (4096, SIZE // 8 // 4096), workers=[A],
                 pure=False)
    v = c.submit(T.view, x, (slice(1, None, 3), slice(None, None, -2)), workers=[A],
                 pure=False)
    on_a = c.submit(T.describe, x, workers=[A], pure=False).result(WAIT)
    view_on_a = c.submit(T.describe, v, workers=[A], pure=False).result(WAIT)
    on_b = c.submit(T.describe, x, workers=[B_], pure=False).result(WAIT)
    view_on_b = c.submit(T.describe, v, workers=[B_], pure=False).result(WAIT)
    assert on_b["crc"] == on_a["crc"] and view_on_b["crc"] == view_on_a["crc"]
    assert on_b["offset"] == on_a["offset"]            # the same bytes of the arena ...
    assert view_on_b["offset"] == view_on_a["offset"]  # ... and the same view of them
    assert not on_b["writeable"] and not view_on_b["writeable"]   # shared: read-only there
    after = c.run(T.counts, workers=[A])[A]
    assert after["sent_by_reference"] - before["sent_by_reference"] == 2
    assert after["bytes_copied_in"] == before["bytes_copied_in"]  # no copy at all
    nbytes = c.run_on_scheduler(lambda dask_scheduler, k=x.key: dask_scheduler.tasks[k].nbytes)
    assert nbytes == SIZE                              # dask.sizeof of a SharedArray
    del x, v
    settle(cl)


@pytest.mark.slow
def test_many_transfers_both_ways_at_once(cl, seed):
    """Seeded: 24 arrays and Buffers of 64 KiB to 3 MiB, half made on each worker,
    plain or in the arena, each read on the other worker; all at once."""
    rng = random.Random(seed)
    A, B_ = workers(cl)
    c = cl.client
    before = sum(v["sent_by_reference"] for v in c.run(T.counts).values())
    made, reads = [], []
    for i in range(24):
        src, dst = (A, B_) if i % 2 else (B_, A)
        kind = rng.choice((T.make, T.make_shared, T.make_buffer))
        n = rng.randrange(64 << 10, 3 * MiB) // 8 * 8
        x = c.submit(kind, n, seed + i, workers=[src], pure=False)
        made.append(c.submit(T.crc, x, workers=[src], pure=False))
        reads.append(c.submit(T.crc, x, workers=[dst], pure=False))
    assert c.gather(reads) == c.gather(made)
    after = sum(v["sent_by_reference"] for v in c.run(T.counts).values())
    assert after - before == 24                        # every one of them by reference
    del made, reads, x
    settle(cl)


@pytest.mark.slow
def test_buffers_go_by_reference_and_count_their_size(cl, seed):
    A, B_ = workers(cl)
    c = cl.client
    b = c.submit(T.make_buffer, 3 * MiB + 5, seed, workers=[A], pure=False)
    on_a = c.submit(T.describe, b, workers=[A], pure=False).result(WAIT)
    on_b = c.submit(T.describe, b, workers=[B_], pure=False).result(WAIT)
    assert on_b["type"] == "Buffer" and on_b["crc"] == on_a["crc"]
    assert on_b["offset"] == on_a["offset"]
    nbytes = c.run_on_scheduler(lambda dask_scheduler, k=b.key: dask_scheduler.tasks[k].nbytes)
    assert nbytes == 3 * MiB + 5                       # dask.sizeof of a Buffer
    del b
    settle(cl)


@pytest.mark.slow
def test_spilling_releases_the_reference(cl, seed):
    A, B_ = workers(cl)
    c = cl.client
    x = c.submit(T.make, SIZE, seed, workers=[A], pure=False)
    y = c.submit(T.view, x, slice(None), workers=[B_], pure=False)  # B holds its own copy
    distributed.wait(y, timeout=WAIT)
    assert c.submit(T.describe, y, workers=[B_], pure=False).result(WAIT)["type"] == \
        "SharedArray"
    held = in_use(cl.arena)
    assert held.get("buf_64m") == 1, held

    def evict_all(dask_worker):
        n = 0
        while dask_worker.data.fast:
            assert dask_worker.data.evict() > 0
            n += 1
        return n

    assert c.run(evict_all, workers=[B_])[B_] >= 1     # to disk: as bytes, no reference
    wait_for("the spilled array's reference", lambda: "buf_64m" not in in_use(cl.arena))
    got = c.submit(T.describe, y, workers=[B_], pure=False).result(WAIT)   # read back
    assert got["type"] == "ndarray"
    assert got["crc"] == zlib.crc32(np.random.default_rng(seed).random(SIZE // 8).tobytes())
    del x, y
    settle(cl)


@pytest.mark.slow
def test_worker_metrics_show_the_arena_and_dev_shm(cl):
    A, _ = workers(cl)

    def shm_metrics():
        info = cl.client.scheduler_info()["workers"].get(A, {})
        return info.get("metrics", {}).get("shmalloc")

    m = wait_for("the shmalloc metrics in a heartbeat", shm_metrics)
    assert m["arena_bytes"] == cl.arena.size
    assert 0 < m["arena_free_bytes"] <= m["arena_bytes"]
    assert 0 < m["dev_shm_free_bytes"] <= m["dev_shm_bytes"]
    assert {"pending", "sent_by_reference", "taken", "withdrawn"} <= set(m)


@pytest.mark.slow
def test_a_client_that_is_set_up_gathers_by_reference(cl, seed):
    A, _ = workers(cl)
    c = cl.client
    sd.setup_client(c)                   # this process: registered, attached, advertised
    try:
        x = c.submit(T.make_shared, 4 * MiB, seed, workers=[A], pure=False)
        direct = c.gather(x, direct=True)
        assert type(direct) is shmalloc.SharedArray and not direct.flags.writeable
        assert direct.buffer.offset == c.submit(T.describe, x, workers=[A]).result(WAIT)[
            "offset"]
        assert sd._state.counts["taken"] >= 1
        del direct, x
    finally:
        c.rpc.connection_args.get("handshake_overrides", {}).pop(sd.KEY, None)
    settle(cl)


@pytest.mark.slow
def test_a_receiver_killed_mid_transfer_loses_nothing(cl, seed, tmp_path):
    A, B_ = workers(cl)
    c = cl.client
    pid_b = c.run(os.getpid, workers=[B_])[B_]
    x = c.submit(T.make_shared, SIZE, seed, workers=[A], pure=False)
    distributed.wait(x, timeout=WAIT)
    held_by_a = in_use(cl.arena)                       # x: storage, a reference, a count
    c.run(sd.configure, claim_timeout=3600, workers=[A])   # only B's death can end it
    c.run(T.pause_before_take, str(tmp_path), workers=[B_])
    y = c.submit(T.crc, x, workers=[B_], pure=False)
    wait_for("B to receive the frame", lambda: (tmp_path / "reached").exists())
    assert in_use(cl.arena)["mbuf"] == held_by_a["mbuf"] + 1   # the reference in flight
    os.kill(pid_b, signal.SIGKILL)
    # A sees B gone and withdraws the reference B never took; what A holds stays
    wait_for("A to withdraw the reference", lambda: in_use(cl.arena) == held_by_a)
    wait_for("the manager to recover B", lambda: recovered(cl.arena, pid_b))
    assert c.run(T.counts, workers=[A])[A]["withdrawn"] >= 1
    c.run(sd.configure, claim_timeout=sd.CLAIM_TIMEOUT, workers=[A])
    cl.arena.check()
    assert c.submit(T.crc, x, workers=[A], pure=False).result(WAIT) == \
        zlib.crc32(np.random.default_rng(seed).random(SIZE // 8).tobytes())
    c.cancel(y)
    del x, y
    (tmp_path / "release").write_text("")
    settle(cl)


@pytest.mark.slow
def test_a_sender_killed_mid_transfer_loses_nothing(cl, seed, tmp_path):
    A, B_ = workers(cl)
    c = cl.client
    pid_a = c.run(os.getpid, workers=[A])[A]
    x = c.submit(T.make, SIZE, seed, workers=[A], allow_other_workers=True, pure=False)
    distributed.wait(x, timeout=WAIT)
    c.run(T.pause_before_take, str(tmp_path), workers=[B_])
    y = c.submit(T.crc, x, workers=[B_], pure=False)
    wait_for("B to receive the frame", lambda: (tmp_path / "reached").exists())
    assert in_use(cl.arena)                            # the copy A handed off
    os.kill(pid_a, signal.SIGKILL)
    # the keg manager recovers A's CPUs, and with them the reference in flight
    wait_for("the manager to recover A", lambda: recovered(cl.arena, pid_a))
    wait_for("the storage A handed off to be freed", lambda: not in_use(cl.arena))
    (tmp_path / "release").write_text("")
    # B's take is refused (an OSError: a failed fetch); Dask computes x again
    expect = zlib.crc32(np.random.default_rng(seed).random(SIZE // 8).tobytes())
    assert y.result(WAIT) == expect
    counts = c.run(T.counts, workers=[B_])[B_]
    assert counts["refused"] >= 1
    del x, y
    settle(cl)


# ============================================================================ frames, here
@pytest.fixture
def here(arena_name):
    """This process set up as a worker would be, on an arena of its own."""
    arena = shmalloc.Arena.create(arena_name, 64 * MiB)
    shmalloc.default.register(arena)
    sd.register()
    saved = (sd._state.arena, sd._state.token)
    sd._state.arena, sd._state.token = arena, B.arena_token(arena)
    try:
        yield arena
    finally:
        sd.sweep(everything=True)
        sd._state.arena, sd._state.token = saved
        arena.destroy()


def recipient(**changes):
    adv = dict(sd.advertisement(), **changes)
    return {"recipient": {"address": "tcp://127.0.0.1:1", sd.KEY: adv}}


def test_the_sender_falls_back_to_bytes_unless_the_receiver_shares_the_arena(here):
    x = np.arange(100_000, dtype=np.int64)
    header, frames = serialize(x, context=recipient())
    assert sum(memoryview(f).nbytes for f in frames) == 0       # a reference
    y = deserialize(header, frames)
    assert type(y) is shmalloc.SharedArray and np.array_equal(x, y) and y.flags.writeable
    del y
    others = [None, {"recipient": {"address": "tcp://10.0.0.2:1"}},   # not set up
              recipient(boot="another-boot"), recipient(arena="other"),
              recipient(token=1)]
    for ctx in others:
        header, frames = serialize(x, context=ctx)
        assert sum(memoryview(f).nbytes for f in frames) == x.nbytes, ctx  # Dask's frames
        assert sd.KEY not in str(header)
        assert np.array_equal(deserialize(header, frames), x)
    small = np.arange(10)
    for y in (small, np.array([object()] * 20_000, dtype=object),
              np.broadcast_to(np.arange(8.0), (20_000, 8))):
        header, frames = serialize(y, context=recipient())
        assert sd.KEY not in str(header)
    sd.configure(enabled=False)
    try:
        assert sd.KEY not in str(serialize(x, context=recipient())[0])
    finally:
        sd.configure(enabled=True)
    buf = here.from_bytes(b"spam" * 1000)
    header, frames = serialize(buf, context=recipient(boot="x"))
    with deserialize(header, frames) as copy:         # bytes, into a Buffer here
        assert copy.tobytes() == buf.tobytes() and copy.offset != buf.offset
    del frames                                        # a view of buf
    buf.close()
    sd.sweep()
    assert not sd._state.ledger


def test_replayed_foreign_and_forged_frames_are_refused(here):
    x = here.ndarray((300, 100), np.float64)
    x[:] = 1.5
    header, frames = serialize(x, context=recipient())
    y = deserialize(header, frames)
    assert not y.flags.writeable and y.buffer.offset == x.buffer.offset
    with pytest.raises(shmalloc.HandoffRefusedError, match="taken already") as e:
        deserialize(header, frames)                   # a replay
    assert isinstance(e.value, OSError)
    del y
    sd.configure(claim_timeout=0.5)                   # this one is never loaded: withdrawn
    header, frames = serialize(x, context=recipient())
    sd.configure(claim_timeout=sd.CLAIM_TIMEOUT)
    sub = header["sub-header"]
    bad = [dict(sub, boot="another-boot"), dict(sub, ref=sub["ref"][:3]),
           dict(sub, ref=[sub["ref"][0] + "x", *sub["ref"][1:]])]
    ref = list(sub["ref"])
    ref[5] ^= 4                                       # a forged nonce
    bad.append(dict(sub, ref=ref))
    for forged in bad:
        with pytest.raises(shmalloc.HandoffRefusedError):
            deserialize(dict(header, **{"sub-header": forged}), frames)
    for meta in (dict(sub["array"], shape=[301, 100]),            # beyond the Buffer
                 dict(sub["array"], strides=[-800, 8]),
                 dict(sub["array"], offset=-8), dict(sub["array"], dtype="O")):
        h = x.buffer.handoff()
        sd._remember(h, {})
        with pytest.raises(shmalloc.HandoffRefusedError, match="malformed"):
            deserialize(dict(header, **{"sub-header": dict(sub, ref=list(h), array=meta)}),
                        frames)
    with pytest.raises(sd.ForeignHostError):
        deserialize(dict(header, **{"sub-header": bad[0]}), frames)
    assert x.buffer.refcnt == 2
    wait_for("the claim timeout", lambda: sd.sweep() == 1, timeout=10)
    assert x.buffer.refcnt == 1 and not sd._state.ledger
    del x
    assert not in_use(here)
    here.check()


@pytest.mark.slow
def test_the_worker_plugin_sets_up_a_running_cluster(arena_name, monkeypatch):
    """``client.register_plugin(ShmallocPlugin())`` on a cluster started without the
    preload: transfers go by reference from then on."""
    monkeypatch.setenv("SHMALLOC_ARENA", arena_name)
    monkeypatch.setenv("SHMALLOC_IDLE_EXIT", str(IDLE_EXIT))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        A, B_ = sorted(c.scheduler_info()["workers"])
        x = c.submit(T.make, 4 * MiB, 1, workers=[A], pure=False)
        c.submit(T.crc, x, workers=[B_], pure=False).result(WAIT)
        assert c.run(T.outgoing, workers=[A])[A][-1][1] > 4 * MiB   # bytes, as Dask does
        c.register_plugin(sd.ShmallocPlugin())
        y = c.submit(T.make, 4 * MiB, 2, workers=[A], pure=False)
        assert c.submit(T.describe, y, workers=[B_], pure=False).result(WAIT)["type"] == \
            "SharedArray"
        assert c.run(T.outgoing, workers=[A])[A][-1][1] < 4096       # a reference
        del x, y
    wait_for(f"arena {arena_name} to remove itself", lambda: not naming.list_objects(arena_name),
             WAIT + IDLE_EXIT)


@pytest.mark.slow
def test_a_process_that_exits_withdraws_what_nobody_took(here):
    """Handed off, never taken, and the sender exits normally: its exit withdraws the
    reference (before its arenas close), so nothing stays held by nobody."""
    code = f"""
import numpy as np, shmalloc
from shmalloc import buffer as B
from shmalloc.integrations import dask as sd
from distributed.protocol import serialize
arena = shmalloc.Arena.attach({here.name!r})
shmalloc.default.register(arena)
sd.register()
sd._state.arena, sd._state.token = arena, B.arena_token(arena)
x = arena.ndarray(100_000)
adv = dict(sd.advertisement(), pid={os.getpid()})       # a live receiver that never loads
header, frames = serialize(x, context={{"recipient": {{sd.KEY: adv}}}})
assert sd.KEY in header["sub-header"] and len(sd._state.ledger) == 1
print("handed off")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=WAIT)
    assert r.returncode == 0 and r.stdout.strip() == "handed off", r.stdout + r.stderr
    assert not in_use(here)
    here.check()
