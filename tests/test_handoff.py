"""Buffer hand-offs (``Buffer.handoff``, ``take``, ``withdraw``, ``pending``): the
reference mechanism of engines that carry frames themselves (integrations.dask).

A hand-off is a new reference that its sender's CPU holds until the receiver takes
it, once; a sender that dies first has it recovered; a hand-off nobody takes is
withdrawn by its sender; forged, replayed and foreign ones are refused with
HandoffRefusedError (an OSError) and never read.  Children's functions are in
tests/handoff_workers.py; every join and queue get is bounded.
"""

import gc
import multiprocessing
import os
import random
import threading
import time

import pytest

import handoff_workers as hw
import shmalloc
from shmalloc import Arena, HandoffRefusedError, default
from shmalloc import buffer as B
from shmalloc.workers.manager import Manager

SPAWN = multiprocessing.get_context("spawn")
WAIT = 60.0
SIZE = 32 << 20
REF_ZONES = ("mbuf", "mbuf_packet", "mbuf_jumbo_page", "mbuf_jumbo_9k", "mbuf_jumbo_16k",
             "mbuf_ext_refcnt")


@pytest.fixture
def seed():
    s = int(os.environ.get("SHMALLOC_TEST_SEED") or random.randrange(1 << 32))
    print(f"seed {s} (rerun with SHMALLOC_TEST_SEED={s})")
    return s


@pytest.fixture
def arena(arena_name):
    a = Arena.create(arena_name, SIZE)
    default.register(a)
    yield a
    a.destroy()


def in_use(a) -> dict:
    gc.collect()
    return {z: a.zone_stats(z).used for z in a.zones()
            if (z in REF_ZONES or z.startswith("buf_")) and a.zone_stats(z).used}


@pytest.mark.slow
@pytest.mark.parametrize("nbytes", [100, 5000, 100_000])
def test_a_handoff_is_taken_once_in_another_process(arena, nbytes):
    b = arena.alloc(nbytes)
    b[:16] = b"0123456789abcdef"
    h = b.handoff()
    assert isinstance(h, B.Handoff) and h.cpu == arena.cpu_id and h.nbytes == nbytes
    assert b.refcnt == 2 and B.pending(h)
    pool = SPAWN.Pool(1)               # closed and joined: leaving `with` would terminate
    try:                               # the child, maybe holding a lock (no manager here)
        assert pool.apply_async(hw.take_and_read, (tuple(h),)).get(WAIT) == b[:16]
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()
    assert not B.pending(h) and b.refcnt == 1          # taken there, closed there
    assert not B.withdraw(h)
    with pytest.raises(HandoffRefusedError, match="taken already") as e:
        B.take(h)                                      # a replay
    assert isinstance(e.value, OSError) and isinstance(e.value, shmalloc.ShmallocError)
    b.close()
    assert in_use(arena) == {}
    arena.check()


def test_withdraw_gives_back_what_nobody_took(arena):
    b = arena.alloc(70_000)
    hs = [b.handoff() for _ in range(3)]
    assert b.refcnt == 4
    assert B.withdraw(hs[0]) and not B.withdraw(hs[0])
    assert b.refcnt == 3 and not B.pending(hs[0]) and B.pending(hs[1])
    with pytest.raises(HandoffRefusedError):
        B.take(hs[0])
    c = B.take(hs[1])                                  # taken here: ours now
    assert c.offset == b.offset and c.handle != b.handle and not B.withdraw(hs[1])
    c.close()
    b.close()                                          # hs[2] still holds the storage
    assert in_use(arena) and B.pending(hs[2])
    assert B.withdraw(hs[2])
    assert in_use(arena) == {}
    arena.check()


def test_forged_and_foreign_handoffs_are_refused(arena, arena_name):
    b = arena.alloc(3000)
    h = b.handoff()
    forged = [
        h._replace(nonce=h.nonce ^ 2),                 # a guessed nonce
        h._replace(nonce=0),                           # every reference not handed off has 0
        h._replace(handle=b.handle, nonce=0),          # our own reference, unmarked
        h._replace(handle=b.handle),                   # another reference, our nonce
        h._replace(nbytes=h.nbytes + 1),
        h._replace(data=h.data + 64),
        h._replace(handle=h.handle + 8),               # inside the mbuf: not an mbuf
        h._replace(handle=1 << 40),                    # outside the arena
        h._replace(handle=-256),
        h._replace(cpu=(h.cpu + 1) % 64),              # held by another CPU than it says
        h._replace(token=h.token + 1),                 # another incarnation of the arena
        h._replace(arena=arena_name + "x"),            # an arena that does not exist here
        (h.arena, h.token, h.handle),                  # malformed
        (h.arena, float(h.token), *h[2:]),
        "not a hand-off",
    ]
    for f in forged:
        with pytest.raises(HandoffRefusedError):
            B.take(f)
        assert not B.pending(f) or f is forged[9]
    assert B.pending(h) and b.refcnt == 2              # none of them touched it
    with B.take(h) as c:
        assert c.offset == b.offset
    b.close()
    assert in_use(arena) == {}
    arena.check()


@pytest.mark.slow
def test_a_dead_senders_handoff_is_recovered(arena_name):
    mgr = Manager(arena_name, size=SIZE)
    q, stop = SPAWN.Queue(), SPAWN.Event()
    p = SPAWN.Process(target=hw.hand_off_and_wait, args=(q, arena_name, 200_000, stop),
                      daemon=True)
    try:
        arena = mgr.arena
        default.register(arena)
        p.start()
        kind, cpu, h = q.get(timeout=WAIT)
        assert kind == "ok", h
        assert B.pending(h)
        p.kill()
        p.join(WAIT)
        deadline = time.monotonic() + WAIT
        while cpu in arena._core.live_cpus():          # the manager recovers the CPU ...
            assert time.monotonic() < deadline, f"CPU {cpu} not recovered"
            mgr.step()
            time.sleep(0.05)
        assert not B.pending(h)
        with pytest.raises(HandoffRefusedError, match="died"):
            B.take(h)                                  # ... with the reference it held
        assert in_use(arena) == {}
        arena.check()
    finally:
        if p.is_alive():
            p.kill()
            p.join(WAIT)
        q.close()
        q.join_thread()
        mgr.shutdown()


def test_take_and_withdraw_race_one_winner(arena, seed):
    """A receiver thread takes while the sender thread withdraws (each thread is a
    CPU of its own): exactly one wins, every time; nothing is lost or freed twice."""
    rng = random.Random(seed)
    b = arena.alloc(50_000)
    rounds, won = 200, {"take": 0, "withdraw": 0}
    for _ in range(rounds):
        h = b.handoff()
        barrier = threading.Barrier(2, timeout=WAIT)
        spins = [rng.randrange(200), rng.randrange(200)]
        out = {}

        def taker():
            barrier.wait()
            for _ in range(spins[0]):
                pass
            try:
                B.take(h).close()
                out["take"] = True
            except HandoffRefusedError:
                out["take"] = False

        def withdrawer():
            barrier.wait()
            for _ in range(spins[1]):
                pass
            out["withdraw"] = B.withdraw(h)

        ts = [threading.Thread(target=taker), threading.Thread(target=withdrawer)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(WAIT)
            assert not t.is_alive()
        assert out["take"] != out["withdraw"], out
        won["take" if out["take"] else "withdraw"] += 1
        assert b.refcnt == 1
    print("winners:", won)
    b.close()
    assert in_use(arena) == {}
    arena.check()
