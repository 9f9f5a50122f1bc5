"""shmalloc.ipc on real POSIX objects: names, errors, segments, locks, wake semaphores."""

import errno
import multiprocessing
import os
import stat
import threading
import time

import posix_ipc
import pytest

from shmalloc import ipc
from shmalloc.ipc import lock as lock_module
from shmalloc.ipc import naming
from shmalloc.ipc.lock import (
    HIST_BUCKETS,
    L_ACQUISITIONS,
    L_CONTENDED,
    L_HOLD_HIST,
    L_HOLD_NS,
    L_MAX_HOLD_NS,
    L_MAX_WAIT_NS,
    L_OWNER_ID,
    L_OWNER_PID,
    L_WAIT_HIST,
    L_WAIT_NS,
    LOCK_WORDS,
    hist_bounds_ns,
    hist_bucket,
    hist_percentile,
)

SPAWN = multiprocessing.get_context("spawn")
WORDS_BYTES = 8 * LOCK_WORDS


def lock_words():
    """A process-private lock record."""
    return memoryview(bytearray(WORDS_BYTES)).cast("q")


def shm_path(name):
    return naming.object_path("shm", name)


# --- child processes (spawned: module-level functions) -----------------------------------


def hold_lock(seg_name, sem_name, held, seconds):
    """Take the lock, say so, hold it ``seconds``, give it back."""
    seg = ipc.Segment.attach(seg_name)
    words = memoryview(seg.buf).cast("q")
    lock = ipc.SemLock.open(sem_name, words)
    lock.acquire(owner_id=7)
    held.set()
    time.sleep(seconds)
    lock.release()
    lock.close()
    words.release()
    seg.close()


def die_holding_lock(seg_name, sem_name):
    """Take the lock and exit without giving it back."""
    seg = ipc.Segment.attach(seg_name)
    lock = ipc.SemLock.open(sem_name, memoryview(seg.buf).cast("q"))
    lock.acquire(owner_id=3)
    os._exit(0)


def post_later(sem_name, seconds):
    """Post the wake semaphore after ``seconds``."""
    sem = ipc.WakeSemaphore.open(sem_name)
    time.sleep(seconds)
    sem.post()
    sem.close()


def run_child(target, *args):
    proc = SPAWN.Process(target=target, args=args)
    proc.start()
    return proc


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "a", "A.b-c_9", "x" * 64, "t123_abc.def"])
def test_valid_names(name):
    assert ipc.validate_name(name) == name


@pytest.mark.parametrize("name, says", [
    ("", "empty"),
    ("x" * 65, "65 characters"),
    (".hidden", "starts with '.'"),
    ("a/b", "'/'"),
    ("a\0b", "NUL"),
    ("a b", "' '"),
    ("caf\u00e9", "'\u00e9'"),
])
def test_bad_names_say_what_is_wrong(name, says):
    with pytest.raises(ipc.BadNameError, match=says) as info:
        ipc.validate_name(name)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ipc.ShmallocError)


@pytest.mark.parametrize("name", [None, 5, b"demo"])
def test_names_must_be_str(name):
    with pytest.raises(TypeError):
        ipc.validate_name(name)


def test_object_name_and_its_arena():
    assert ipc.object_name("demo", "arena") == "/shmalloc.demo.arena"
    assert ipc.object_name("a.b", "keg-3") == "/shmalloc.a.b.keg-3"
    assert ipc.arena_of("/shmalloc.a.b.keg-3") == "a.b"
    assert ipc.arena_of("/shmalloc.demo.arena") == "demo"
    assert ipc.arena_of("/shmalloc.noarena") is None
    assert ipc.arena_of("/other.demo.arena") is None
    with pytest.raises(ipc.BadNameError, match="object part name"):
        ipc.object_name("demo", "cpu.3")
    with pytest.raises(ipc.BadNameError, match="arena name"):
        ipc.object_name("de/mo", "arena")


# --- error translation ------------------------------------------------------------------


@pytest.mark.parametrize("exc, cls, builtin, code", [
    (posix_ipc.ExistentialError("Shared memory with the specified name already exists"),
     ipc.ArenaExistsError, FileExistsError, errno.EEXIST),
    (posix_ipc.ExistentialError("No semaphore exists with the specified name"),
     ipc.ArenaNotFoundError, FileNotFoundError, errno.ENOENT),
    (posix_ipc.PermissionsError("Permission denied"),
     ipc.ArenaPermissionError, PermissionError, errno.EACCES),
    (posix_ipc.BusyError("Semaphore is busy"),
     ipc.LockTimeoutError, TimeoutError, errno.ETIMEDOUT),
    (OSError("This process already has the maximum number of files open"),
     ipc.IpcLimitError, OSError, errno.EMFILE),
    (OSError(errno.ENOSPC, "No space left on device"),
     ipc.IpcLimitError, OSError, errno.ENOSPC),
    (OSError(errno.EACCES, "Permission denied"),
     ipc.ArenaPermissionError, PermissionError, errno.EACCES),
    (OSError(errno.EIO, "I/O error"), ipc.IpcError, OSError, errno.EIO),
    (ValueError("Invalid parameter(s)"), ipc.IpcError, OSError, errno.EINVAL),
])
def test_translate(exc, cls, builtin, code):
    what = "shared memory segment /shmalloc.demo.arena"
    translated = ipc.translate(exc, what)
    assert type(translated) is cls
    assert isinstance(translated, builtin)
    assert isinstance(translated, ipc.ShmallocError)
    assert translated.errno == code
    assert what in str(translated)


def test_translate_leaves_other_errors_alone():
    exc = ValueError("a programming error")
    assert ipc.translate(exc, "x") is exc
    already = ipc.IpcError("done")
    assert ipc.translate(already, "x") is already


def test_os_errors_chains_the_original():
    with pytest.raises(ipc.ArenaNotFoundError) as info:
        with ipc.os_errors("semaphore /nope"):
            raise posix_ipc.ExistentialError("No semaphore exists with the specified name")
    assert isinstance(info.value.__cause__, posix_ipc.ExistentialError)
    with pytest.raises(KeyError):
        with ipc.os_errors("anything"):
            raise KeyError("not an OS error")


# --- segments ---------------------------------------------------------------------------


def test_segment_create_attach_share_bytes(arena_name):
    name = ipc.object_name(arena_name, "arena")
    seg = ipc.Segment.create(name, 8192)
    try:
        assert (seg.name, seg.size, len(seg.buf)) == (name, 8192, 8192)
        assert stat.S_IMODE(os.stat(shm_path(name)).st_mode) == 0o600
        seg.buf[100:105] = b"hello"
        other = ipc.Segment.attach(name)
        assert other.size == 8192
        assert other.buf[100:105] == b"hello"
        assert other.buf.find(b"hello", 0, 8192) == 100
        other.close()
        other.close()
    finally:
        seg.close()
        assert ipc.Segment.unlink(name) is True
    assert ipc.Segment.unlink(name) is False


def test_segment_exists_and_not_found(arena_name):
    name = ipc.object_name(arena_name, "arena")
    with pytest.raises(ipc.ArenaNotFoundError, match=name):
        ipc.Segment.attach(name)
    seg = ipc.Segment.create(name, 4096)
    try:
        with pytest.raises(ipc.ArenaExistsError, match=name) as info:
            ipc.Segment.create(name, 4096)
        assert isinstance(info.value, FileExistsError)
    finally:
        seg.close()
        ipc.Segment.unlink(name)


def test_segment_refused_when_group_may_read(arena_name):
    name = ipc.object_name(arena_name, "arena")
    seg = ipc.Segment.create(name, 4096)
    try:
        os.chmod(shm_path(name), 0o640)
        with pytest.raises(ipc.ArenaPermissionError, match="0640") as info:
            ipc.Segment.attach(name)
        assert isinstance(info.value, PermissionError)
    finally:
        seg.close()
        ipc.Segment.unlink(name)


def test_segment_close_with_live_views(arena_name):
    name = ipc.object_name(arena_name, "arena")
    seg = ipc.Segment.create(name, 4096)
    try:
        view = memoryview(seg.buf)
        seg.close()  # cannot unmap yet: left to the GC
        view[0] = 42
        assert view[0] == 42
        view.release()
    finally:
        ipc.Segment.unlink(name)


def test_segment_size_must_be_positive(arena_name):
    with pytest.raises(ValueError):
        ipc.Segment.create(ipc.object_name(arena_name, "arena"), 0)


def test_anonymous_segment():
    seg = ipc.Segment.anonymous(1024)
    assert (seg.name, seg.size, len(seg.buf)) == (None, 1024, 1024)
    seg.buf[10:13] = b"abc"
    assert seg.buf.find(b"abc", 0, 1024) == 10
    words = memoryview(seg.buf).cast("q")
    seg.close()
    words[0] = 1
    assert seg.buf[0] == 1


# --- locks ------------------------------------------------------------------------------


@pytest.fixture(params=["sem", "local"])
def lock_and_words(request, arena_name):
    """A free SemLock or LocalLock, and its private record."""
    words = lock_words()
    if request.param == "local":
        yield ipc.LocalLock.create("local", words), words
        return
    name = ipc.object_name(arena_name, "lock")
    lock = ipc.SemLock.create(name, words)
    try:
        yield lock, words
    finally:
        lock.close()
        ipc.SemLock.unlink(name)


def test_lock_records_owner_and_counts(lock_and_words):
    lock, words = lock_and_words
    assert lock.acquire(owner_id=5) is True
    assert lock.contended_last is False
    assert (words[L_OWNER_PID], words[L_OWNER_ID], words[L_ACQUISITIONS]) == (os.getpid(), 5, 1)
    assert words[ipc.L_ACQUIRED_NS] > 0
    assert lock.held_by_me()
    lock.release()
    assert (words[L_OWNER_PID], words[L_OWNER_ID]) == (0, 0)
    assert not lock.held_by_me()
    with lock:
        assert lock.held_by_me()
    assert words[L_ACQUISITIONS] == 2
    assert words[L_CONTENDED] == 0


def test_lock_timeout_changes_no_counter(lock_and_words):
    lock, words = lock_and_words
    lock.acquire()
    try:
        before = words.tolist()
        started = time.monotonic()
        assert lock.acquire(timeout=0.1) is False
        assert 0.09 <= time.monotonic() - started < 2
        assert lock.contended_last is True
        assert lock.acquire(timeout=0) is False
        assert words.tolist() == before
    finally:
        lock.release()


def test_lock_contended_by_a_thread(lock_and_words):
    lock, words = lock_and_words
    held = threading.Event()

    def holder():
        lock.acquire(owner_id=9)
        held.set()
        time.sleep(0.2)
        lock.release()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(5)
        assert words[L_OWNER_ID] == 9
        assert lock.acquire(timeout=10, owner_id=1) is True
        lock.release()
    finally:
        thread.join()
    assert lock.contended_last is True
    assert (words[L_ACQUISITIONS], words[L_CONTENDED]) == (2, 1)
    assert words[L_WAIT_NS] == words[L_MAX_WAIT_NS] >= 50_000_000
    k = hist_bucket(words[L_WAIT_NS])
    assert k >= 16 and wait_hist(words) == [int(i == k) for i in range(HIST_BUCKETS)]


def test_lock_on_wait_can_abandon(lock_and_words, monkeypatch):
    lock, words = lock_and_words
    monkeypatch.setattr(lock_module, "WAIT_SLICE", 0.02)
    calls = []

    def on_wait():
        calls.append(1)
        return len(calls) == 3

    lock.acquire()
    try:
        assert lock.acquire(on_wait=on_wait) is False
        assert len(calls) == 3
        assert words[L_CONTENDED] == 0
    finally:
        lock.release()


def hold_hist(words):
    return words[L_HOLD_HIST:L_HOLD_HIST + HIST_BUCKETS].tolist()


def wait_hist(words):
    return words[L_WAIT_HIST:L_WAIT_HIST + HIST_BUCKETS].tolist()


def test_release_records_the_hold(lock_and_words):
    """A lock held across a 20 ms sleep: one hold of at least 20 ms, in the log2
    bucket of its length, which is also the max."""
    lock, words = lock_and_words
    lock.acquire()
    time.sleep(0.02)
    lock.release()
    held = words[L_MAX_HOLD_NS]
    assert words[L_HOLD_NS] == held >= 20_000_000
    k = hist_bucket(held)
    assert k >= 15                                   # [2**24, 2**25) ns holds 20 ms
    assert hold_hist(words) == [int(i == k) for i in range(HIST_BUCKETS)]
    assert wait_hist(words) == [0] * HIST_BUCKETS    # not contended
    with lock:
        pass
    assert sum(hold_hist(words)) == 2 and words[L_MAX_HOLD_NS] == held
    assert words[L_HOLD_NS] > held


def test_hold_accounting_on_an_injected_clock(monkeypatch):
    """LocalLock on a fake clock: hold totals, max and log2 buckets exactly."""
    words = lock_words()
    lock = ipc.LocalLock.create("x", words)
    now = [1_000_000]
    monkeypatch.setattr(lock_module, "_now", lambda: now[0])
    for held in (3_500, 1_023, 1_024, 5_000_000_000, 2_048, 4_095):
        lock.acquire()
        now[0] += held
        lock.release()
    assert words[L_HOLD_NS] == 3_500 + 1_023 + 1_024 + 5_000_000_000 + 2_048 + 4_095
    assert words[L_MAX_HOLD_NS] == 5_000_000_000
    h = hold_hist(words)
    # 1023 ns: [0, 1K); 1024: [1K, 2K); 2048, 3500 and 4095: [2K, 4K); 5 s: the last (>= 4G)
    assert (h[0], h[1], h[2], h[HIST_BUCKETS - 1], sum(h)) == (1, 1, 3, 1, 6)
    assert words[L_ACQUISITIONS] == 6


def test_failed_and_forced_releases_record_no_hold(lock_and_words):
    lock, words = lock_and_words
    lock.acquire()
    assert lock.acquire(timeout=0) is False          # a failed try: nothing counted
    words[L_OWNER_PID] = 12345                        # as if a dead process held it
    before = words.tolist()
    assert lock.force_release(12345) is True
    after = words.tolist()
    assert after[L_HOLD_NS] == before[L_HOLD_NS] == 0
    assert hold_hist(words) == [0] * HIST_BUCKETS


def test_histogram_buckets_are_powers_of_two_nanoseconds():
    assert [hist_bucket(ns) for ns in (0, 1, 1_023, 1_024, 2_047, 2_048, 4_095, 4_096)] == \
        [0, 0, 0, 1, 1, 2, 2, 3]
    assert hist_bucket((1 << 31) + 5) == HIST_BUCKETS - 2      # [2G, 4G) ns
    assert hist_bucket(1 << 32) == hist_bucket(1 << 62) == HIST_BUCKETS - 1
    assert hist_bounds_ns(0) == (0, 1024) and hist_bounds_ns(1) == (1024, 2048)
    assert hist_bounds_ns(10) == (1 << 19, 1 << 20)
    assert hist_bounds_ns(HIST_BUCKETS - 1) == (1 << 32, float("inf"))
    for ns in (0, 1_500, 77_777, 123_456_789, 9 << 33):
        lo, hi = hist_bounds_ns(hist_bucket(ns))
        assert lo <= ns < hi
    with pytest.raises(ValueError):
        hist_bounds_ns(HIST_BUCKETS)
    h = [0] * HIST_BUCKETS
    assert hist_percentile(h, 0.99) is None
    h[3], h[8] = 99, 1
    assert hist_percentile(h, 0.99) == 8.192 and hist_percentile(h, 1.0) == 262.144
    h[HIST_BUCKETS - 1] = 100
    assert hist_percentile(h, 0.99) == float("inf")


def test_lock_needs_a_q_record():
    with pytest.raises(ValueError, match="'q'"):
        ipc.LocalLock.create("x", memoryview(bytearray(WORDS_BYTES)))
    with pytest.raises(ValueError, match=f"{ipc.LOCK_WORDS} words"):
        ipc.LocalLock.create("x", memoryview(bytearray(8)).cast("q"))


def test_semlock_exists_and_not_found(arena_name):
    name = ipc.object_name(arena_name, "lock")
    with pytest.raises(ipc.ArenaNotFoundError, match=name):
        ipc.SemLock.open(name, lock_words())
    lock = ipc.SemLock.create(name, lock_words())
    try:
        with pytest.raises(ipc.ArenaExistsError, match=name):
            ipc.SemLock.create(name, lock_words())
    finally:
        lock.close()
        lock.close()
        assert ipc.SemLock.unlink(name) is True
    assert ipc.SemLock.unlink(name) is False


@pytest.mark.slow
def test_semlock_contended_by_another_process(arena_name):
    seg_name = ipc.object_name(arena_name, "arena")
    sem_name = ipc.object_name(arena_name, "lock")
    seg = ipc.Segment.create(seg_name, 4096)
    words = memoryview(seg.buf).cast("q")[:LOCK_WORDS]
    lock = ipc.SemLock.create(sem_name, words)
    child = None
    try:
        held = SPAWN.Event()
        child = run_child(hold_lock, seg_name, sem_name, held, 0.3)
        assert held.wait(30)
        assert (words[L_OWNER_PID], words[L_OWNER_ID]) == (child.pid, 7)
        assert not lock.held_by_me()
        assert lock.acquire(timeout=30, owner_id=1) is True
        assert lock.contended_last is True
        assert (words[L_OWNER_PID], words[L_OWNER_ID]) == (os.getpid(), 1)
        assert (words[L_ACQUISITIONS], words[L_CONTENDED]) == (2, 1)
        assert words[L_WAIT_NS] >= 100_000_000
        lock.release()
    finally:
        if child is not None:
            child.join(30)
        lock.close()
        ipc.SemLock.unlink(sem_name)
        words.release()
        seg.close()
        ipc.Segment.unlink(seg_name)
    assert child.exitcode == 0


@pytest.mark.slow
def test_force_release_after_the_owner_died(arena_name):
    seg_name = ipc.object_name(arena_name, "arena")
    sem_name = ipc.object_name(arena_name, "lock")
    seg = ipc.Segment.create(seg_name, 4096)
    words = memoryview(seg.buf).cast("q")[:LOCK_WORDS]
    lock = ipc.SemLock.create(sem_name, words)
    try:
        child = run_child(die_holding_lock, seg_name, sem_name)
        child.join(30)
        assert words[L_OWNER_PID] == child.pid
        assert lock.acquire(timeout=0.05) is False
        assert lock.force_release(child.pid + 1) is False
        assert lock.force_release(child.pid) is True
        assert words[L_OWNER_PID] == 0
        assert lock.force_release(child.pid) is False
        assert lock.acquire(timeout=1) is True
        lock.release()
        with pytest.raises(ValueError):
            lock.force_release(0)
    finally:
        lock.close()
        ipc.SemLock.unlink(sem_name)
        words.release()
        seg.close()
        ipc.Segment.unlink(seg_name)


# --- wake semaphores --------------------------------------------------------------------


@pytest.fixture(params=["sem", "local"])
def any_wake(request, arena_name):
    """A WakeSemaphore or LocalWakeSemaphore at 0."""
    if request.param == "local":
        yield ipc.LocalWakeSemaphore.create()
        return
    name = ipc.object_name(arena_name, "wake")
    sem = ipc.WakeSemaphore.create(name)
    try:
        yield sem
    finally:
        sem.close()
        ipc.WakeSemaphore.unlink(name)


def test_wake_semaphore_counts_posts(any_wake):
    assert any_wake.wait(0) is False
    assert any_wake.wait(0.05) is False
    any_wake.post()
    any_wake.post()
    any_wake.post()
    assert any_wake.wait(0.05) is True
    assert any_wake.drain() == 2
    assert any_wake.drain() == 0


def test_wake_semaphore_wakes_a_waiter(any_wake):
    timer = threading.Timer(0.1, any_wake.post)
    timer.start()
    try:
        assert any_wake.wait() is True
    finally:
        timer.join()


@pytest.mark.slow
def test_wake_semaphore_across_processes(arena_name):
    name = ipc.object_name(arena_name, "wake")
    sem = ipc.WakeSemaphore.create(name)
    try:
        child = run_child(post_later, name, 0.1)
        assert sem.wait(30) is True
        child.join(30)
        assert child.exitcode == 0
    finally:
        sem.close()
        assert ipc.WakeSemaphore.unlink(name) is True
    assert ipc.WakeSemaphore.unlink(name) is False
    with pytest.raises(ipc.ArenaNotFoundError):
        ipc.WakeSemaphore.open(name)


# --- finding and removing an arena's objects --------------------------------------------


def test_list_and_remove_objects(arena_name):
    sub_arena = arena_name + ".sub"
    seg_name = ipc.object_name(arena_name, "arena")
    lock_name = ipc.object_name(arena_name, "lock")
    wake_name = ipc.object_name(arena_name, "wake")
    sub_name = ipc.object_name(sub_arena, "arena")
    made = [("shm", seg_name), ("sem", lock_name), ("sem", wake_name), ("shm", sub_name)]
    mq_name = ipc.object_name(arena_name, "mbox")
    try:
        ipc.Segment.create(seg_name, 4096).close()
        ipc.SemLock.create(lock_name, lock_words()).close()
        ipc.WakeSemaphore.create(wake_name).close()
        ipc.Segment.create(sub_name, 4096).close()
        expected = [("sem", lock_name), ("sem", wake_name), ("shm", seg_name)]
        if ipc.mq_listable():
            posix_ipc.MessageQueue(mq_name, posix_ipc.O_CREX, max_messages=1,
                                   max_message_size=64).close()
            made.append(("mq", mq_name))
            expected.insert(0, ("mq", mq_name))
        assert ipc.list_objects(arena_name) == expected
        assert ipc.list_objects(sub_arena) == [("shm", sub_name)]
        everything = ipc.list_objects()
        assert set(made) <= set(everything)
        assert all(ipc.arena_of(name) for _, name in everything)
        for kind, name in made:
            assert ipc.owner_uid(kind, name) == os.getuid()
            assert ipc.remove_object(kind, name) is True
            assert ipc.remove_object(kind, name) is False
        assert ipc.list_objects(arena_name) == []
        with pytest.raises(ipc.ArenaNotFoundError):
            ipc.owner_uid("shm", seg_name)
    finally:
        for kind, name in made:
            ipc.remove_object(kind, name)


def test_object_kinds_are_checked():
    with pytest.raises(ValueError, match="unknown object kind"):
        ipc.remove_object("pipe", "/shmalloc.x.y")
    with pytest.raises(ipc.BadNameError):
        ipc.list_objects("../etc")


def test_semaphores_of_a_foreign_mode_are_refused(arena_name):
    name = ipc.object_name(arena_name, "lock")
    lk = ipc.SemLock.create(name, lock_words())
    try:
        os.chmod(ipc.naming.object_path("sem", name), 0o640)
        with pytest.raises(ipc.ArenaPermissionError, match="0640"):
            ipc.SemLock.open(name, lock_words())
        with pytest.raises(ipc.ArenaPermissionError, match="0640"):
            ipc.WakeSemaphore.open(name)
    finally:
        lk.close()
        ipc.SemLock.unlink(name)
