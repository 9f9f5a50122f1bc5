"""Locks whose owner and contention counters live in shared words.

A lock is a binary semaphore plus a record of ``LOCK_WORDS`` signed 64-bit words that the
caller places in shared memory and passes in as a memoryview cast to 'q':

    word    name              meaning
    0       L_OWNER_PID       pid of the holder, 0 when free
    1       L_OWNER_ID        caller-chosen id of the holder (a CPU slot), 0 when free
    2       L_ACQUISITIONS    times taken
    3       L_CONTENDED       times taken after the first try failed
    4       L_WAIT_NS         total nanoseconds waited by contended acquisitions
    5       L_MAX_WAIT_NS     longest such wait
    6       L_ACQUIRED_NS     time.monotonic_ns() when last taken
    7       L_HOLD_NS         total nanoseconds held (acquired to released), over releases
    8       L_MAX_HOLD_NS     longest hold
    9..15   (spare)
    16..39  L_WAIT_HIST       contended waits by length, HIST_BUCKETS log2 buckets
    40..63  L_HOLD_HIST       holds by length, the same buckets; their sum is the number
                              of holds recorded (releases; a forced release records none)

Histogram buckets (``hist_bucket``) are powers of two of nanoseconds, as FreeBSD's
``lockstat -h`` and bpftrace's ``hist()`` print them: bucket 0 counts [0, 1024) ns (under
a microsecond), bucket k (1 <= k < HIST_BUCKETS - 1) counts [2**(k+9), 2**(k+10)) ns, the
last one everything from 2**(HIST_BUCKETS + 8) ns (4.29 s) up.  The bucket is a table
look-up of the time's ``bit_length()``.  Percentiles are read from them
(``hist_percentile``).

Counters are written only by the holder, so the lock itself protects them: the wait and
acquisition counts after the semaphore is taken, the hold counts before it is given back
(``release``: one clock read and five word operations, about 0.25 us on the machine
docs/lockstat.md measures; only slow paths take locks). A reader in another process reads
them without the lock and may see one acquisition half counted.

POSIX semaphores have no owner: one held by a process that dies stays taken. The owner
words let a supervisor see that and give the lock back (``force_release``). Left
uncovered are the instants between taking the semaphore and writing the owner pid, and
between clearing it and posting: a holder that dies there leaves a taken lock with no
owner.
"""

import os
import threading
import time

import posix_ipc

from .errors import os_errors
from .semaphore import open_private, sem_wait, unlink_semaphore

LOCK_WORDS = 64
L_OWNER_PID = 0
L_OWNER_ID = 1
L_ACQUISITIONS = 2
L_CONTENDED = 3
L_WAIT_NS = 4
L_MAX_WAIT_NS = 5
L_ACQUIRED_NS = 6
L_HOLD_NS = 7
L_MAX_HOLD_NS = 8
L_WAIT_HIST = 16
HIST_BUCKETS = 24                 # [0, 1K) ns, [1K, 2K) .. [2G, 4G) ns, >= 4G ns
L_HOLD_HIST = L_WAIT_HIST + HIST_BUCKETS
WAIT_HIST_BUCKETS = HOLD_HIST_BUCKETS = HIST_BUCKETS
HIST_SHIFT = 10                   # bucket 1 starts at 2**HIST_SHIFT ns
_LAST = HIST_BUCKETS - 1
# bucket of a time whose bit_length() is b: min(max(b - HIST_SHIFT, 0), _LAST)
_BUCKET_OF_BITS = tuple(min(max(b - HIST_SHIFT, 0), _LAST) for b in range(65))
_WAIT_SLOT = tuple(L_WAIT_HIST + k for k in _BUCKET_OF_BITS)   # word to count it in
_HOLD_SLOT = tuple(L_HOLD_HIST + k for k in _BUCKET_OF_BITS)

MODE = 0o600
WAIT_SLICE = 1.0  # seconds per timed wait: on_wait runs, and signals land, between slices

# os.getpid() is a system call; acquire and held_by_me read this copy instead.
_pid = os.getpid()
_now = time.monotonic_ns          # the clock of every time word (tests may replace it)


def _refresh_pid():
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def hist_bucket(ns):
    """Histogram bucket of a wait or hold of ``ns`` nanoseconds (>= 0): 0 under
    1024 ns, k for [2**(k+9), 2**(k+10)) ns, the last one from 2**(HIST_BUCKETS + 8)
    ns up."""
    return _BUCKET_OF_BITS[min(ns.bit_length(), 64)]


wait_bucket = hist_bucket


def hist_bounds_ns(k):
    """(low, high) in nanoseconds of histogram bucket ``k``; high is inf for the last."""
    if not 0 <= k < HIST_BUCKETS:
        raise ValueError(f"histogram bucket {k} is outside 0..{_LAST}")
    return ((0 if k == 0 else 1 << (k + HIST_SHIFT - 1)),
            (float("inf") if k == _LAST else 1 << (k + HIST_SHIFT)))


def hist_percentile(hist, q):
    """Upper bound in microseconds of the ``q`` quantile (0..1) of the times counted
    in ``hist`` (HIST_BUCKETS counts); None if there were none, inf if it falls in
    the last bucket."""
    total = sum(hist)
    if not total:
        return None
    need = q * total
    seen = 0
    for k, n in enumerate(hist):
        seen += n
        if seen >= need:
            return hist_bounds_ns(k)[1] / 1000
    return float("inf")


wait_percentile = hist_percentile


def _check_words(words):
    """Return ``words`` if it is a memoryview of at least LOCK_WORDS 'q' items."""
    if not isinstance(words, memoryview) or words.format != "q" or len(words) < LOCK_WORDS:
        raise ValueError(f"a lock needs a memoryview cast to 'q' of at least {LOCK_WORDS} words")
    return words


class _CountedLock:
    """Acquire/release bookkeeping shared by SemLock and LocalLock.

    Subclasses supply ``_try_acquire()`` (no wait), ``_wait_acquire(seconds)`` (bounded
    wait) and ``_post()``.
    """

    __slots__ = ("name", "contended_last", "_words")

    def __init__(self, name, words):
        self.name = name
        self.contended_last = False
        self._words = _check_words(words)

    def acquire(self, timeout=None, owner_id=0, on_wait=None):
        """Take the lock; True if taken, False on timeout or when ``on_wait()`` says stop.

        ``timeout`` is in seconds, None for no limit. While waiting, ``on_wait()`` (if
        given) is called after each WAIT_SLICE; a true result abandons the wait.
        ``contended_last`` tells whether the first try failed.
        """
        if self._try_acquire():
            self.contended_last = False
        else:
            self.contended_last = True
            if not self._acquire_slow(timeout, on_wait):
                return False
        w = self._words
        w[L_OWNER_PID] = _pid
        w[L_OWNER_ID] = owner_id
        w[L_ACQUIRED_NS] = _now()
        w[L_ACQUISITIONS] += 1
        return True

    def _acquire_slow(self, timeout, on_wait):
        """Wait for the lock after a failed try; on success count the contended take."""
        started = _now()
        deadline = None if timeout is None else started + int(timeout * 1e9)
        while True:
            if deadline is None:
                step = WAIT_SLICE
            else:
                left = deadline - _now()
                if left <= 0:
                    return False
                step = min(left / 1e9, WAIT_SLICE)
            if self._wait_acquire(step):
                break
            if on_wait is not None and on_wait():
                return False
        waited = _now() - started
        w = self._words
        w[L_CONTENDED] += 1
        w[_WAIT_SLOT[waited.bit_length()]] += 1
        w[L_WAIT_NS] += waited
        if waited > w[L_MAX_WAIT_NS]:
            w[L_MAX_WAIT_NS] = waited
        return True

    def release(self):
        """Count the hold (since L_ACQUIRED_NS), clear the owner words and give the
        lock back.  Lock: held on entry (the counters are the holder's to write)."""
        w = self._words
        held = _now() - w[L_ACQUIRED_NS]
        w[L_HOLD_NS] += held
        if held > w[L_MAX_HOLD_NS]:
            w[L_MAX_HOLD_NS] = held
        w[_HOLD_SLOT[held.bit_length()]] += 1        # hist_bucket(held)
        w[L_OWNER_PID] = 0
        w[L_OWNER_ID] = 0
        self._post()

    def held_by_me(self):
        """True if this process (any of its threads) holds the lock."""
        return self._words[L_OWNER_PID] == _pid

    def force_release(self, expected_pid):
        """Give back a lock held by the dead process ``expected_pid``; True if done.

        For a supervisor that has established ``expected_pid`` is dead. Nothing happens
        (False) if the lock's owner is any other pid, so a repair cannot free a lock taken
        since.
        """
        if expected_pid <= 0:
            raise ValueError(f"expected_pid must be a pid, not {expected_pid}")
        w = self._words
        if w[L_OWNER_PID] != expected_pid:
            return False
        w[L_OWNER_PID] = 0
        w[L_OWNER_ID] = 0
        self._post()
        return True

    def owner_pid(self):
        """Pid written by the holder (0: free, or taken by a process that died
        before writing it or after clearing it)."""
        return self._words[L_OWNER_PID]

    def acquisitions(self):
        return self._words[L_ACQUISITIONS]

    def is_taken(self):
        """True if somebody holds the semaphore (a probe: take and give back)."""
        if self._try_acquire():
            self._post()
            return False
        return True

    def force_release_ownerless(self):
        """Post a lock found taken with no owner pid (its holder died between
        taking the semaphore and writing its pid, or between clearing it and
        posting).  For a single supervisor that has seen it so for long enough."""
        if self._words[L_OWNER_PID] != 0:
            return False
        self._post()
        return True

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()


class SemLock(_CountedLock):
    """A lock on a named POSIX semaphore (initial value 1, mode 0600)."""

    __slots__ = ("_sem",)

    def __init__(self, name, sem, words):
        super().__init__(name, words)
        self._sem = sem

    @classmethod
    def create(cls, name, words):
        """Create the semaphore ``name`` free; ArenaExistsError if it exists."""
        _check_words(words)
        with os_errors(f"semaphore {name}"):
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=MODE, initial_value=1)
        return cls(name, sem, words)

    @classmethod
    def open(cls, name, words):
        """Open the existing semaphore ``name``; ArenaNotFoundError if missing."""
        _check_words(words)
        return cls(name, open_private(name), words)

    def _try_acquire(self):
        try:
            self._sem.acquire(0)
        except posix_ipc.BusyError:
            return False
        return True

    def _wait_acquire(self, seconds):
        return sem_wait(self._sem, seconds)

    def _post(self):
        self._sem.release()

    def close(self):
        """Close this process's handle (the semaphore stays). Idempotent."""
        if self._sem is not None:
            self._sem.close()
            self._sem = None

    unlink = staticmethod(unlink_semaphore)


class LocalLock(_CountedLock):
    """``SemLock``'s in-process twin over ``threading.Lock``, with the same words.

    ``create`` and ``open`` both construct a new, independent lock (``name`` is only a
    label): share the instance, not the name. ``close`` and ``unlink`` do nothing.
    """

    __slots__ = ("_lock",)

    def __init__(self, name, words):
        super().__init__(name, words)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, name, words):
        """A new, free lock over ``words``."""
        return cls(name, words)

    open = create

    def _try_acquire(self):
        return self._lock.acquire(False)

    def _wait_acquire(self, seconds):
        return self._lock.acquire(timeout=seconds)

    def _post(self):
        self._lock.release()

    def close(self):
        """Nothing to close."""

    @staticmethod
    def unlink(name):
        """Nothing to remove; returns False."""
        return False
