"""What happens where users run the allocator hard (issue 11), on real POSIX arenas:
an M_WAITOK sleeper and a closing arena, sleepers at a small limit while the free
items sit in another CPU's cache (drain requests, and the keg manager for a CPU that
never calls in again), a full /dev/shm, and stale names left by a crash.

Every test is bounded (timeouts on every join and wait) and seeded where it draws
anything; rerun a failure with SHMALLOC_TEST_SEED=<seed>.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import queue
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mp_helpers
from shmalloc import (M_NOWAIT, Arena, ArenaExistsError, ArenaFullError,
                      StaleArenaError)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX shm and semaphores")

WAIT = 60.0                  # seconds: the bound of every join, wait and subprocess
SERVED = 20.0                # seconds an M_WAITOK allocation may wait before it fails a test
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAWN = multiprocessing.get_context("spawn")
MiB = 1 << 20


@pytest.fixture
def seed():
    s = int(os.environ.get("SHMALLOC_TEST_SEED") or random.randrange(1 << 32))
    print(f"seed {s} (rerun with SHMALLOC_TEST_SEED={s})")
    return s


class Kids:
    """Spawned children running ``mp_helpers`` workers; each report comes back on
    one queue, a child's traceback fails the test, every wait is bounded."""

    def __init__(self, seed):
        self.seed = seed
        self.q = SPAWN.Queue()
        self.procs = []

    def start(self, fn_name, tag, *args):
        p = SPAWN.Process(target=mp_helpers.run, args=(fn_name, self.q, tag, *args),
                          name=tag, daemon=True)
        p.start()
        self.procs.append(p)

    def get(self, what, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, tag, payload = self.q.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    pytest.fail(f"seed {self.seed}: no report for {what} within {timeout} s "
                                f"({self._codes()})")
                continue
            if kind == "err":
                pytest.fail(f"seed {self.seed}: child {tag} failed ({what}):\n{payload}")
            return tag, payload

    def _codes(self):
        return ", ".join(f"{p.name}: {'alive' if p.is_alive() else p.exitcode}"
                         for p in self.procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.join(WAIT if exc[0] is None else 1)
            if p.is_alive():
                p.kill()
                p.join(WAIT)
        self.q.close()
        self.q.join_thread()


def run_python(code: str, timeout: float = WAIT, **kw) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a crash there cannot take pytest down)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kw)


# ============================================================================ close vs sleepers
@pytest.mark.slow
def test_destroy_with_a_thread_asleep_in_m_waitok_wakes_it_with_arena_closed_error(arena_name):
    """Before: destroy() unmapped the thread's CPU under it (SIGSEGV)."""
    r = run_python(f"""
        import threading
        from shmalloc import Arena, ArenaClosedError, M_NOWAIT, M_WAITOK
        a = Arena.create({arena_name!r}, size=8 << 20)
        z = a.zcreate("waitok", 256, max_items=1)
        h = z.alloc(M_NOWAIT)
        out = []
        def sleeper():
            try:
                out.append(z.alloc(M_WAITOK))
            except ArenaClosedError as e:
                out.append(e)
        th = threading.Thread(target=sleeper, daemon=True)
        th.start()
        for _ in range(2000):
            if z.stats().sleepers:
                break
            threading.Event().wait(0.005)
        assert z.stats().sleepers == 1
        a.destroy()
        th.join(10)
        assert not th.is_alive(), "the sleeper still sleeps"
        assert isinstance(out[0], ArenaClosedError), out
        print("ok", out[0])
    """)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stdout, r.stderr)
    assert "closed while this M_WAITOK allocation slept" in r.stdout


# ============================================================================ stranded sleepers
@pytest.mark.slow
@pytest.mark.parametrize("size,limit", [(1 * MiB, 32), (2048, 256)], ids=["1MiB-32", "2KiB-256"])
@pytest.mark.parametrize("bucket", ["adaptive", 1, "half"])
def test_a_producer_at_the_limit_is_served_from_the_consumers_cache(arena_name, seed, size,
                                                                    limit, bucket):
    """Producer: alloc(M_WAITOK) one item at a time and send it; consumer: recv and
    free item by item.  With a bucket of half the limit the consumer's cache can
    hold every item, freed there before the producer sleeps: without the drain
    request the producer waits for good."""
    total = 4 * limit
    bsize = limit // 2 if bucket == "half" else bucket
    with Arena.create(arena_name, size=limit * size + 24 * MiB) as a:
        z = a.zcreate("frames", size, max_items=limit, bucket_size=bsize)
        with Kids(seed) as kids:
            kids.start("limit_consumer", "consumer", a.name, "frames", total, seed)
            _, (what, dest) = kids.get("the consumer to attach")
            kids.start("limit_producer", "producer", a.name, "frames", dest, total, seed,
                       SERVED)
            reports = dict(kids.get("the end of a run", timeout=WAIT + SERVED)
                           for _ in range(2))
        assert reports["consumer"] == ("done", total, 0), f"seed {seed}: {reports}"
        assert reports["producer"][:2] == ("done", total), f"seed {seed}: {reports}"
        s = z.stats()
        assert s.used == 0 and s.sleepers == 0 and s.items <= limit, f"seed {seed}: {s}"
        a.check(level=2)


@pytest.mark.slow
def test_a_cache_that_never_answers_is_taken_by_the_manager_for_the_sleeper(arena_name, seed):
    """The consumer (a thread here) caches every item of the zone, then blocks in
    Event.wait and never calls into the arena again: the keg manager takes its
    cache (after GRACE) and the sleeping producer is served.  The consumer's own
    next allocations then never hand out an item it no longer has."""
    from shmalloc.workers.manager import Manager
    limit = 8
    mgr = Manager(arena_name, size=16 * MiB)
    a = mgr.arena
    try:
        z = a.zcreate("frames", 2048, max_items=limit, bucket_size=limit)
        ready, cached, release = threading.Event(), threading.Event(), threading.Event()
        out = {}

        def consumer():
            out["cpu"] = a._here().cpu_id
            ready.set()
            hs = []
            while len(hs) < limit:
                hs += a.recv(timeout=WAIT)
            for h in hs:
                z.free(h)                        # all of them into this CPU's cache
            out["freed"] = sorted(hs)
            cached.set()
            release.wait(WAIT)                   # never calls in meanwhile
            out["after"] = [z.alloc(M_NOWAIT) for _ in range(limit)]

        th = threading.Thread(target=consumer, daemon=True)
        th.start()
        assert ready.wait(WAIT)
        go = SPAWN.Event()
        with Kids(seed) as kids:
            kids.start("waitok_once", "producer", a.name, "frames", out["cpu"], limit, SERVED,
                       go)
            kids.get("the producer to send its items")
            assert cached.wait(WAIT), f"seed {seed}: the consumer did not cache the items"
            assert z.stats().free_cache == limit
            go.set()                             # now the producer sleeps
            deadline = time.monotonic() + WAIT
            report = None
            while report is None:
                mgr.step()
                try:
                    kind, tag, report = kids.q.get(timeout=0.1)
                except queue.Empty:
                    assert time.monotonic() < deadline, f"seed {seed}: no report"
                    continue
                assert kind == "ok", f"seed {seed}: {report}"
            assert report[0] == "got", f"seed {seed}: the sleeper was not served: {report}"
            got = report[1]
            assert got in out["freed"], f"seed {seed}: {got} was not in the consumer's cache"
            assert mgr.caches_taken >= 1
        release.set()
        th.join(WAIT)
        assert not th.is_alive()
        after = [h for h in out["after"] if h is not None]
        # the producer freed its item before exiting: the consumer gets all 8 back,
        # each once, from the depot (not from the handles its stack still named)
        assert len(after) == len(set(after)) == limit, f"seed {seed}: {out['after']}"
        a.check(level=1)
        for h in after:
            z.free(h)
        assert z.stats().used == 0
        a.check(level=1)
    finally:
        mgr.shutdown()


# ============================================================================ a full /dev/shm
def _enospc(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_no_room_in_dev_shm_for_a_new_slab_is_arena_full_error(arena_name, monkeypatch):
    """fallocate made to fail: the slab is refused with ArenaFullError naming the
    arena, the bytes and the room left; the arena stays consistent and works
    again once there is room."""
    from shmalloc.ipc import segment
    with Arena.create(arena_name, size=16 * MiB) as a:
        z = a.zcreate("big", 64 << 10)
        held = [z.alloc(M_NOWAIT) for _ in range(z.keg.ipers)]     # one full slab
        before = z.stats()
        monkeypatch.setattr(segment.os, "posix_fallocate", _enospc)
        for how in (M_NOWAIT, mp_helpers.M_WAITOK):
            with pytest.raises(ArenaFullError) as e:
                z.alloc(how, timeout=1)
            msg = str(e.value)
            assert a.name in msg and "/dev/shm" in msg and "bytes free there" in msg, msg
            assert f"({z.keg.ppera * 4096} bytes)" in msg, msg
            assert isinstance(e.value, MemoryError)
        s = z.stats()
        assert (s.items, s.pages, s.failures) == (len(held), before.pages,
                                                  before.failures + 2)
        a.check(level=2)
        monkeypatch.undo()
        held.append(z.alloc(M_NOWAIT))               # room again: it works
        assert held[-1] is not None
        z.free_bulk(held)
        a.check(level=2)


def test_a_bucket_import_keeps_what_it_took_before_dev_shm_ran_out(arena_name, monkeypatch):
    from shmalloc.ipc import segment
    with Arena.create(arena_name, size=16 * MiB) as a:
        z = a.zcreate("small", 2048, bucket_size=8)
        ipers = z.keg.ipers
        held = [z.alloc(M_NOWAIT) for _ in range(ipers - 3)]   # 3 left in the slab
        z._cache.drain_cache()
        monkeypatch.setattr(segment.os, "posix_fallocate", _enospc)
        more = [z.alloc(M_NOWAIT) for _ in range(3)]            # the import takes those 3
        assert None not in more
        with pytest.raises(ArenaFullError):
            z.alloc(M_NOWAIT)
        monkeypatch.undo()
        z.free_bulk(held + more)
        a.check(level=2)


def test_an_arena_whose_metadata_dev_shm_cannot_hold_is_not_created(arena_name, monkeypatch):
    from shmalloc.ipc import naming, segment
    monkeypatch.setattr(segment.os, "posix_fallocate", _enospc)
    with pytest.raises(ArenaFullError, match="metadata"):
        Arena.create(arena_name, size=16 * MiB)
    assert naming.list_objects(arena_name) == []


def test_an_arena_larger_than_dev_shm_warns_and_strict_refuses(arena_name, monkeypatch):
    from shmalloc import arena as arena_module
    from shmalloc.errors import ArenaSizeWarning
    from shmalloc.ipc import naming
    monkeypatch.setattr(arena_module, "shm_free_bytes", lambda: 8 * MiB)
    with pytest.raises(ArenaFullError, match="8388608 bytes free"):
        Arena.create(arena_name, size=16 * MiB, strict=True)
    assert naming.list_objects(arena_name) == []
    with pytest.warns(ArenaSizeWarning, match="/dev/shm has 8388608 bytes free"):
        a = Arena.create(arena_name, size=16 * MiB)
    a.destroy()


def _can_mount_tmpfs() -> str:
    """'' if this process may mount a tmpfs in a mount namespace of its own, else why not."""
    if not shutil.which("unshare"):
        return "no unshare(1)"
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, text=True, timeout=WAIT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    return "" if r.returncode == 0 else f"cannot mount a tmpfs here: {r.stderr.strip()}"


@pytest.mark.slow
def test_a_small_real_tmpfs_filling_up_is_arena_full_error_not_sigbus(arena_name):
    """A 6 MiB tmpfs on /dev/shm (a mount namespace of the test's own) under a
    64 MiB arena: allocating until the tmpfs is full raises ArenaFullError (the
    process used to die of SIGBUS), check() passes, and everything frees."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    code = textwrap.dedent(f"""
        import warnings
        from shmalloc import Arena, M_NOWAIT, ShmallocError
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            a = Arena.create({arena_name!r}, size=64 << 20)
        z = a.zcreate("big", 64 << 10)
        held = []
        try:
            while True:
                h = z.alloc(M_NOWAIT)
                assert h is not None, "the arena ran out before /dev/shm"
                z.view(h)[:] = b"x" * (64 << 10)          # touch every page
                held.append(h)
        except ShmallocError as e:
            print("full after", len(held), "items:", type(e).__name__, e)
        print("warned:", [w.category.__name__ for w in ws])
        a.check(level=2)
        z.free_bulk(held)
        a.check(level=2)
        a.destroy()
        print("ok")
    """)
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        "mount -t tmpfs -o size=6m tmpfs /dev/shm && exec \"$0\" -c \"$1\"",
                        sys.executable, code], cwd=REPO, capture_output=True, text=True,
                       timeout=WAIT)
    assert r.returncode == 0 and r.stdout.endswith("ok\n"), (r.returncode, r.stdout, r.stderr)
    assert "ArenaFullError" in r.stdout and "no room in /dev/shm" in r.stdout, r.stdout
    assert "warned: ['ArenaSizeWarning']" in r.stdout, r.stdout


# ============================================================================ stale names
def _crash_holding(arena_name, manager=False) -> int:
    """A process that creates arena ``arena_name`` (or runs its manager) and is
    SIGKILLed: its pid."""
    code = ("from shmalloc.workers.manager import Manager; m = Manager({n!r}, size=8 << 20)"
            if manager else "from shmalloc import Arena; a = Arena.create({n!r}, size=8 << 20)")
    p = subprocess.Popen([sys.executable, "-c", code.format(n=arena_name)
                          + "; import sys; print('up', flush=True); sys.stdin.read()"],
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "up\n"
    finally:
        p.kill()
        p.wait(WAIT)
    return p.pid


@pytest.mark.slow
@pytest.mark.parametrize("manager", [False, True], ids=["creator", "manager"])
def test_create_over_a_crashed_arena_says_it_is_stale_and_replace_makes_it_anew(arena_name,
                                                                                manager):
    from shmalloc.ipc import naming
    pid = _crash_holding(arena_name, manager)
    with pytest.raises(StaleArenaError) as e:
        Arena.create(arena_name, size=8 * MiB)
    msg = str(e.value)
    assert isinstance(e.value, FileExistsError)
    assert f"pid {pid}" in msg and f"shmalloc cleanup --name {arena_name}" in msg, msg
    assert "replace=True" in msg, msg
    with Arena.create(arena_name, size=8 * MiB, replace=True) as a:
        z = a.zcreate("z", 64)
        z.free(z.alloc(M_NOWAIT))
        a.check(level=2)
    assert naming.list_objects(arena_name) == []


def test_create_over_a_live_arena_names_its_holders_and_replace_refuses(arena_name):
    with Arena.create(arena_name, size=8 * MiB) as a:
        for replace in (False, True):
            with pytest.raises(ArenaExistsError) as e:
                Arena.create(arena_name, size=8 * MiB, replace=replace)
            assert not isinstance(e.value, StaleArenaError)
            assert f"in use by pid {os.getpid()} (CPU {a.cpu_id})" in str(e.value)
        a.zcreate("z", 64)                           # untouched
        a.check()


def test_a_half_created_segment_counts_as_stale(arena_name):
    import posix_ipc
    from shmalloc.ipc import naming
    seg = posix_ipc.SharedMemory(naming.object_name(arena_name, "arena"), posix_ipc.O_CREX,
                                 mode=0o600)         # size 0: its creator "died" there
    seg.close_fd()
    with pytest.raises(StaleArenaError, match="died while making it"):
        Arena.create(arena_name, size=8 * MiB)
    Arena.create(arena_name, size=8 * MiB, replace=True).destroy()
