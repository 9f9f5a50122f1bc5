"""shmalloc.Buffer: sizes, the buffer protocol, numpy, pickling between processes
(Pool, ProcessPoolExecutor, multiprocessing.Queue; spawn and fork), references per
holder, recovery of a killed holder's references, the default arena.

Children's functions live in tests/buffer_workers.py.  Randomised tests print their
seed (rerun with SHMALLOC_TEST_SEED=<seed>).  Every join and queue get is bounded.
"""

import gc
import itertools
import multiprocessing
import os
import pickle
import queue
import random
import re
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import buffer_workers as bw
import shmalloc
from shmalloc import (Arena, ArenaFullError, Buffer, BufferClosedError, ShmallocError,
                      admin, default)
from shmalloc import buffer as B
from shmalloc import layout as L
from shmalloc.ipc import naming
from shmalloc.workers.manager import Manager

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
CTXS = {"spawn": SPAWN, "fork": FORK}
WAIT = 60.0
SIZE = 64 << 20
SIZES = [0, 1, 7, 100, 2047, 2048, 2049, 4096, 4097, 9216, 9217, 16384, 16385, 32768,
         32769, 100_000, 1 << 20, (1 << 20) + 1, 3 << 20, 6_000_000]
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
    yield a
    a.destroy()


def in_use(a) -> dict:
    """Items allocated in the zones Buffers use (references and storage)."""
    gc.collect()
    return {z: a.zone_stats(z).used for z in a.zones()
            if z in REF_ZONES or z.startswith("buf_")}


def all_free(a) -> bool:
    return not any(in_use(a).values())


def nonzero(d: dict) -> dict:
    return {k: v for k, v in d.items() if v}


def wait_gone(name, timeout=20.0):
    """Wait for every OS object of arena ``name`` to disappear."""
    deadline = time.monotonic() + timeout
    while naming.list_objects(name):
        assert time.monotonic() < deadline, f"arena {name} still has {naming.list_objects(name)}"
        time.sleep(0.1)


class Kids:
    """Long-lived children reporting on one queue; every wait is bounded."""

    def __init__(self, ctx):
        self.ctx, self.q, self.procs = ctx, ctx.Queue(), []

    def start(self, fn, tag, *args):
        p = self.ctx.Process(target=bw.run, args=(fn, self.q, tag, *args), daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def get(self):
        deadline = time.monotonic() + WAIT
        while True:
            try:
                kind, tag, payload = self.q.get(timeout=0.2)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive() and p.exitcode != 0
                        and p.exitcode != -signal.SIGKILL]
                assert not dead, f"children died: {[(p.pid, p.exitcode) for p in dead]}"
                assert time.monotonic() < deadline, "no report from the children"
                continue
            assert kind == "ok", f"child {tag} failed:\n{payload}"
            return tag, payload

    def close(self):
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=WAIT)
        self.q.close()
        self.q.join_thread()


# ============================================================================ one process
def test_sizes_from_one_byte_to_several_mib(arena):
    bufs = []
    for i, n in enumerate(SIZES):
        b = arena.alloc(n)
        assert len(b) == n and b.nbytes == n
        v = memoryview(b)
        assert (v.nbytes, v.format, v.readonly, v.contiguous) == (n, "B", False, True)
        v[:] = bw.pattern(n, i)
        v.release()
        want = "mbuf_cluster" if n <= 2048 else shmalloc.buffer.class_name(
            shmalloc.buffer.class_size(n))
        assert b.zone == want
        assert b.refcnt == 1
        bufs.append(b)
    for i, b in enumerate(bufs):                       # nothing overlapped
        assert b.tobytes() == bw.pattern(len(b), i), len(b)
        assert bytes(b) == b.tobytes()
    zones = set(arena.zones())
    assert {"buf_32k", "buf_64k", "buf_128k", "buf_1m", "buf_2m", "buf_4m", "buf_8m"} <= zones
    assert not all_free(arena)
    for b in bufs:
        b.close()
    assert all_free(arena), in_use(arena)
    arena.check()


def test_storage_is_page_aligned_above_16k_and_views_are_zero_copy(arena):
    with arena.alloc(100_000) as b:
        assert b.offset % L.PAGE_SIZE == 0
        a = np.frombuffer(b, np.uint8)
        assert a.flags.writeable and a.size == 100_000
        a[:4] = (1, 2, 3, 4)
        assert b[:4] == bytes((1, 2, 3, 4))
        b[4:8] = b"\x05\x06\x07\x08"
        assert list(a[4:8]) == [5, 6, 7, 8]
        assert np.shares_memory(a, np.frombuffer(b, np.uint8))
        del a


def test_ndarray_and_from_bytes(arena):
    x = arena.ndarray((3, 5), np.int32)
    assert isinstance(x, shmalloc.SharedArray) and x.shape == (3, 5) and x.dtype == np.int32
    x[:] = np.arange(15).reshape(3, 5)
    f = arena.ndarray((4, 6), "f8", order="F")
    assert f.flags.f_contiguous and not f.flags.c_contiguous
    e = arena.ndarray((0, 7))
    assert e.size == 0
    b = arena.from_bytes(b"hello shmalloc")
    assert b.tobytes() == b"hello shmalloc" and len(b) == 14
    nb = arena.from_bytes(np.arange(10, dtype=np.int16)[::2])      # not contiguous: copied
    assert np.array_equal(np.frombuffer(nb, np.int16), np.arange(0, 10, 2))
    for bad in ("text", 3):
        with pytest.raises(TypeError):
            arena.from_bytes(bad)
    with pytest.raises(TypeError, match="Python objects"):
        arena.ndarray(3, object)
    assert not all_free(arena)
    b.close()
    nb.close()
    del x, f, e
    assert all_free(arena), in_use(arena)


def test_use_after_close_is_a_clear_error(arena):
    b = arena.alloc(64)
    b.close()
    b.close()                                          # idempotent
    assert b.closed and "closed" in repr(b)
    with pytest.raises(ValueError):
        memoryview(b)
    with pytest.raises(ValueError):
        np.frombuffer(b, np.uint8)
    for use in (len, lambda b: b.handle, lambda b: b[0], lambda b: b.tobytes(),
                lambda b: b.__setitem__(0, 1), lambda b: b.__enter__(), pickle.dumps):
        with pytest.raises(BufferClosedError, match="closed"):
            use(b)
    assert issubclass(BufferClosedError, ValueError)
    with pytest.raises(TypeError):
        Buffer()


def test_close_refuses_while_views_exist_and_a_collected_buffer_waits_for_them(arena):
    b = arena.alloc(5000)
    v = memoryview(b)
    a = np.frombuffer(b, np.uint8)
    with pytest.raises(BufferError, match="views"):
        b.close()
    assert not b.closed
    v.release()
    with pytest.raises(BufferError):
        b.close()
    del a
    b.close()
    assert all_free(arena)
    # dropped while a view lives: the reference stays until the view goes
    b = arena.alloc(5000)
    v = memoryview(b)
    del b
    gc.collect()
    assert not all_free(arena)
    v[:3] = b"abc"                                     # still ours, still valid
    v.release()
    arena.alloc(1).close()                             # any Buffer call reaps
    assert all_free(arena), in_use(arena)


def test_absurd_sizes_and_a_full_arena(arena_name):
    a = Arena.create_local(8 << 20)
    try:
        for bad, err in ((-1, ValueError), (1 << 40, ValueError), (1 << 80, ValueError),
                         (2.0, TypeError), (True, TypeError), ("1", TypeError)):
            with pytest.raises(err):
                a.alloc(bad)
        with pytest.raises(ValueError, match="largest Buffer it can hold is"):
            a.alloc(a.size)
        held = []
        with pytest.raises(ArenaFullError, match="no room") as e:
            for _ in range(100):
                held.append(a.alloc(1 << 20))
        assert isinstance(e.value, MemoryError) and 0 < len(held) < 8
        held.pop().close()
        held.append(a.alloc(1 << 20))                  # room again
        small = a.alloc(100_000)                       # a freed slab serves another class
        small.close()
        for b in held:
            b.close()
        a.check()
    finally:
        a.destroy()


def test_a_pickle_is_one_reference_and_loads_once(arena):
    b = arena.alloc(3000)
    b[:5] = b"12345"
    p = pickle.dumps(b)
    assert len(p) < 200 and b.refcnt == 2              # the pickle holds a reference
    c = pickle.loads(p)
    assert c[:5] == b"12345" and c.handle != b.handle and c.refcnt == 2
    with pytest.raises(ShmallocError, match="loads once"):
        pickle.loads(p)
    c.close()
    with pytest.raises(ShmallocError, match="loads once"):
        pickle.loads(p)
    assert b.refcnt == 1
    b.close()
    assert all_free(arena)
    local = Arena.create_local(4 << 20)
    try:
        with local.alloc(10) as lb, pytest.raises(TypeError, match="local arena"):
            pickle.dumps(lb)
    finally:
        local.destroy()


def test_shared_array_pickles_views_by_reference(arena):
    x = arena.ndarray((6, 8), np.float32)
    x[:] = 0
    for view in (x, x[1:5, ::3], x[::-2, 1:], x.T):
        y = pickle.loads(pickle.dumps(view))
        assert isinstance(y, shmalloc.SharedArray) and y.shape == view.shape
        y += 1
        assert np.array_equal(view, y) and np.shares_memory(x, y)
        del y
    plain = pickle.loads(pickle.dumps(x + 1))          # arithmetic results are not shared
    assert not np.shares_memory(plain, x) and type(plain) is np.ndarray
    assert x.buffer.refcnt == 1
    del x, view
    assert all_free(arena), in_use(arena)


def test_pickled_in_another_thread(arena):
    b = arena.alloc(40_000)
    b[:3] = b"xyz"
    out = []
    t = threading.Thread(target=lambda: out.append(pickle.dumps(b)))
    t.start()
    t.join(WAIT)
    c = pickle.loads(out[0])
    assert c[:3] == b"xyz"
    t = threading.Thread(target=c.close)               # closed from yet another thread
    t.start()
    t.join(WAIT)
    b.close()
    assert all_free(arena)
    arena.check()


def _holder_of(arena, zone_name, h):
    """(holder CPU, home CPU) of item ``h`` of zone ``zone_name``, from its tag."""
    keg = arena.zone(zone_name).keg
    t = arena._core.tags[keg.tag_index_of(h)]
    return L.tag_holder(t), L.tag_home(t)


@pytest.mark.parametrize("how", ["pickle", "handoff", "detach"])
def test_a_sole_references_storage_is_its_cpus_until_shared(arena, how):
    """Issue 13's fast paths: a size class's storage and its count are held by the
    CPU that made them while its one reference names them (so that close is a
    fast-path free, and a killed maker's recovery frees them); the first copy or a
    detach gives them to the references (held by no CPU), so that recovering the
    maker never frees storage another holder shares."""
    b = arena.alloc(100_000)
    s = shmalloc.mbuf.Mbuf.from_handle(arena, b.handle).m_ext.ext_buf
    zone = B.class_name(B.class_size(100_000))
    assert _holder_of(arena, zone, s) == (arena.cpu_id, arena.cpu_id)
    if how == "pickle":
        other = pickle.loads(pickle.dumps(b))
    elif how == "handoff":
        other = B.take(b.handoff())
    else:
        h = b.detach()
        other = Buffer.from_handle(arena, h)
    assert _holder_of(arena, zone, s)[0] == L.NO_CPU
    other.close()
    if how != "detach":
        b.close()
    assert all_free(arena), in_use(arena)
    arena.check()


@pytest.mark.parametrize("nbytes", [100, 5000, 100_000])
def test_two_threads_closing_one_buffer_free_it_once(arena, nbytes):
    """A Buffer's reference is freed by whoever takes its token (its entry in the
    open table): two threads that both get past ``close``'s first check free it
    once.  The interleaving is forced: the first thread waits inside close (in the
    view's release) until the second has closed the Buffer."""
    b = arena.alloc(nbytes)
    second_done = threading.Event()
    entered = []

    class View:                                  # stands in for the Buffer's memoryview
        def release(self):
            entered.append(threading.current_thread())
            if len(entered) == 1:                # the first thread waits for the second
                assert second_done.wait(WAIT)

    b._view_obj = View()
    errors = []

    def first():
        try:
            b.close()
        except Exception as e:                  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    deadline = time.monotonic() + WAIT
    while not entered:
        assert time.monotonic() < deadline, "the first close did not start"
        time.sleep(0.001)
    b.close()                                    # the second: it frees the reference
    second_done.set()
    t.join(WAIT)
    assert not t.is_alive() and not errors, errors
    assert b.closed and all_free(arena), in_use(arena)
    arena.check()


# ============================================================================ between processes
@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_numpy_in_place_through_pool_and_executor(arena, method):
    ctx = CTXS[method]
    bufs = [arena.alloc(8 * n) for n in (1, 300, 1000, 50_000, 400_000)]
    for b in bufs:
        np.frombuffer(b, np.float64)[:] = 1.5
    pool = ctx.Pool(2)
    try:
        sums = pool.map_async(bw.double_in_place, bufs).get(WAIT)
        made = pool.starmap_async(bw.new_buffer, [(arena.name, n, n) for n in (10, 70_000)]
                                  ).get(WAIT)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()        # workers exit and close their references (terminate kills them)
        pool.join()
    assert sums == [3.0 * len(b) / 8 for b in bufs]
    assert all((np.frombuffer(b, np.float64) == 3.0).all() for b in bufs)
    assert [b.tobytes() for b in made] == [bw.pattern(n, n) for n in (10, 70_000)]
    assert [b.refcnt for b in bufs + made] == [1] * 7
    arrays = [arena.ndarray((50, 40)) for _ in range(3)]
    for a in arrays:
        a[:] = 2.0
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        sums = list(ex.map(bw.triple_array, arrays, timeout=WAIT))
        sizes = list(ex.map(bw.checksum, bufs, timeout=WAIT))
    assert sums == [6.0 * 2000] * 3 and all((a == 6.0).all() for a in arrays)
    assert sizes == [sum(memoryview(b)[::97]) for b in bufs]
    for b in bufs + made:
        b.close()
    del arrays, a
    assert all_free(arena), in_use(arena)
    arena.check()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_buffers_through_multiprocessing_queue(arena, method):
    kids = Kids(CTXS[method])
    inbox, outbox = kids.ctx.Queue(), kids.ctx.Queue()
    try:
        kids.start("queue_doubler", "q", inbox, outbox)
        sent = []
        for n in (8, 2048, 9000, 40_000, 1 << 20):
            b = arena.alloc(n)
            np.frombuffer(b, np.float64)[:] = n
            sent.append(b.offset)
            inbox.put(b)                               # no close: the feeder pickles later
        del b
        inbox.put(None)
        got = []
        while (b := outbox.get(timeout=WAIT)) is not None:
            got.append(b)
        assert kids.get() == ("q", 5)
        assert [b.offset for b in got] == sent         # the same storage came back
        assert all((np.frombuffer(b, np.float64) == 2 * len(b)).all() for b in got)
        for b in got:
            b.close()
        del b, got
    finally:
        kids.close()
        for q in (inbox, outbox):
            q.close()
            q.join_thread()
    assert all_free(arena), in_use(arena)
    arena.check()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_three_holders_close_in_any_order(arena, method):
    kids = Kids(CTXS[method])
    inboxes = [kids.ctx.Queue(), kids.ctx.Queue()]
    try:
        for i in range(2):
            kids.start("holder", i, inboxes[i])
        before = nonzero(in_use(arena))
        for size, order in itertools.product((1000, 10_000, 100_000),
                                             itertools.permutations(("me", 0, 1))):
            key = f"{size}/{order}"
            b = arena.alloc(size)
            want = bw.pattern(size, size)
            b[:] = want
            for q in inboxes:
                q.put(("take", key, b, want))
            took = sorted(kids.get() for _ in range(2))
            assert took == [(0, ("took", key, True)), (1, ("took", key, True))], key
            assert b.refcnt == 3
            for step, who in enumerate(order):
                if who == "me":
                    b.close()
                else:
                    inboxes[who].put(("close", key))
                    assert kids.get() == (who, ("closed", key))
                if not b.closed:
                    assert b.refcnt == 2 - step, key
                    assert b.tobytes() == want
            assert nonzero(in_use(arena)) == before, key   # the last close freed it
        for q in inboxes:
            q.put(("stop",))
        assert sorted(kids.get() for _ in range(2)) == [(0, ("stopped", [])),
                                                        (1, ("stopped", []))]
    finally:
        kids.close()
        for q in inboxes:
            q.close()
            q.join_thread()
    assert all_free(arena), in_use(arena)
    arena.check()


@pytest.mark.slow
def test_a_forked_child_borrows_inherited_buffers(arena):
    b = arena.alloc(50_000)
    p = FORK.Process(target=bw.write_and_close, args=(b, b"from the child"))
    p.start()
    p.join(WAIT)
    assert p.exitcode == 0
    assert b[:14] == b"from the child" and b.refcnt == 1 and not b.closed
    b.close()
    assert all_free(arena)


def _recover(mgr, cpu):
    """Run the keg manager until CPU ``cpu`` is recovered."""
    deadline = time.monotonic() + WAIT
    while cpu in mgr.arena._core.live_cpus():
        assert time.monotonic() < deadline, f"CPU {cpu} not recovered"
        mgr.step()
        time.sleep(0.05)


@pytest.mark.slow
def test_a_cpu_killed_anywhere_in_a_buffer_churn_loses_nothing(arena_name, seed):
    """SIGKILL a child at random moments of a churn of Buffers of every kind (their
    fast paths: storage held by the making CPU until shared, the last reference's
    items freed through the zones' fast paths, copies claimed and closed); after
    each recovery no recovery failed, nothing of it is left allocated -- but the
    storage of a last drop the CPU died in before its free routine took it, at
    most one per mbuf recovery found so ("stale": the routine runs at most once,
    ``mbuf.refs.drop_ref``) -- and the arena checks."""
    rng = random.Random(seed)
    logs = []
    mgr = Manager(arena_name, size=SIZE, log=logs.append)
    # the manager's lock watchdog, as ``Manager.run`` runs it: a child killed between
    # taking a lock and writing its pid leaves the lock ownerless, which ``step``'s
    # recovery would wait for for ever; the watchdog releases it after 2 s
    stop = threading.Event()
    watchdog = threading.Thread(target=mgr._watch_locks, args=(stop, 0.2), daemon=True)
    watchdog.start()
    stale = 0
    try:
        arena = mgr.arena
        for i in range(8):
            ops = FORK.Value("q", 0, lock=False)
            p = FORK.Process(target=bw.churn_until_killed, args=(arena_name, seed + i, ops),
                             daemon=True)
            p.start()
            deadline = time.monotonic() + WAIT
            want = rng.randrange(20, 400)
            while ops.value < want:
                assert p.is_alive() and time.monotonic() < deadline, "the churn did not run"
                time.sleep(0.001)
            os.kill(p.pid, signal.SIGKILL)
            p.join(WAIT)
            deadline = time.monotonic() + WAIT
            while arena._core.live_cpus() != [arena.cpu_id]:
                assert time.monotonic() < deadline, "the killed CPU was not recovered"
                mgr.step()
                time.sleep(0.02)
            mgr.arena._drain_caches()
            assert not [line for line in logs if "error" in line], f"round {i}: {logs}"
            stale += sum(int(n) for n in re.findall(r"'stale': (\d+)", "\n".join(logs)))
            logs.clear()
            used = nonzero(in_use(arena))
            storage = sum(n for z, n in used.items() if z.startswith("buf_"))
            assert storage <= stale and all(z.startswith("buf_") for z in used), \
                f"round {i}: {used}, {stale} mbufs recovered in their last drop"
            arena.check()
    finally:
        stop.set()
        watchdog.join(WAIT)
        mgr.shutdown()


@pytest.mark.slow
def test_a_killed_holders_references_are_given_back(arena_name, seed):
    mgr = Manager(arena_name, size=SIZE)
    maker, taker = Kids(SPAWN), Kids(SPAWN)            # a queue each: see alloc_and_hand
    try:
        arena = mgr.arena
        sizes = [100, 3000, 10_000, 100_000, 2 << 20]
        # 1. a child made the Buffers and handed us references, then dies
        maker.start("alloc_and_hand", "maker", arena_name, sizes, seed)
        _, (what, maker_cpu, bufs) = maker.get()
        assert what == "cpu" and [b.refcnt for b in bufs] == [2] * len(sizes)
        maker.procs[0].kill()
        _recover(mgr, maker_cpu)
        assert [b.refcnt for b in bufs] == [1] * len(sizes)
        churn = [arena.alloc(n) for n in sizes * 2]    # reuse whatever was freed
        for i, b in enumerate(bufs):                   # ours is intact
            assert b.tobytes() == bw.pattern(sizes[i], seed + i), sizes[i]
        for c in churn:
            c.close()
        arena.check()
        # 2. we hand references to a child, which dies holding them
        p = taker.start("take_and_wait", "taker", bufs)
        _, (what, counts, taker_cpu) = taker.get()
        assert what == "holding" and counts == [2] * len(sizes)
        os.kill(p.pid, signal.SIGKILL)
        _recover(mgr, taker_cpu)
        assert [b.refcnt for b in bufs] == [1] * len(sizes)
        for b in bufs:
            b.close()
        assert all_free(arena), in_use(arena)
        arena.check()
    finally:
        for kids in (maker, taker):
            for p in kids.procs:
                p.kill()
            kids.close()
        mgr.shutdown()


# ============================================================================ default arena
@pytest.mark.slow
def test_connect_starts_a_default_arena_that_leaves_when_idle(arena_name, monkeypatch):
    monkeypatch.setenv(default.ENV_NAME, arena_name)
    monkeypatch.setenv(default.ENV_IDLE_EXIT, "1")
    assert default.default_name() == arena_name
    a = shmalloc.connect()
    try:
        assert a.name == arena_name and shmalloc.default_arena() is a
        deadline = time.monotonic() + WAIT             # usable at once; the manager's
        while default._peek(arena_name) != "running":  # pid is written once its
            assert time.monotonic() < deadline         # mbuf zones are made
            time.sleep(0.02)
        manager = a._core.w[L.HDR["MANAGER_PID"]]
        assert admin.process_alive(manager)
        b = a.alloc(80_000)
        np.frombuffer(b, np.float64)[:] = 1.0
        pool = SPAWN.Pool(1)                           # the child attaches by name alone
        try:
            assert pool.apply_async(bw.double_in_place, (b,)).get(WAIT) == 20_000.0
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.close()
            pool.join()
        assert float(np.frombuffer(b, np.float64).sum()) == 20_000.0
        b.close()
    finally:
        a.close()
    wait_gone(arena_name)
    deadline = time.monotonic() + WAIT
    while admin.process_alive(manager):
        assert time.monotonic() < deadline, "the manager did not exit"
        time.sleep(0.05)


@pytest.mark.slow
def test_connect_replaces_a_killed_manager(arena_name, monkeypatch):
    monkeypatch.setenv(default.ENV_IDLE_EXIT, "1")
    a = shmalloc.connect(arena_name)
    deadline = time.monotonic() + WAIT
    while not (first := a._core.w[L.HDR["MANAGER_PID"]]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    while default._peek(arena_name) != "orphaned":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b = a.alloc(1000)
    b[:4] = b"kept"
    p = pickle.dumps(b)                                # a reference held by nobody ...
    b.close()
    a.close()
    a = shmalloc.connect(arena_name)                   # ... still there after the adoption
    try:
        second = a._core.w[L.HDR["MANAGER_PID"]]
        assert second != first and admin.process_alive(second)
        with pickle.loads(p) as c:
            assert c[:4] == b"kept"
    finally:
        a.close()
    wait_gone(arena_name)


def test_public_surface():
    for name in shmalloc.__all__:
        assert getattr(shmalloc, name) is not None, name
    assert shmalloc.Buffer is Buffer and shmalloc.connect is default.connect
    assert shmalloc.SharedArray.__name__ == "SharedArray"
    assert shmalloc._export.INSTALLED, shmalloc._export.REASON
