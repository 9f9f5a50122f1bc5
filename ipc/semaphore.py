"""Counting semaphores that wake sleepers: a named POSIX one and an in-process twin.

A post is a wake-up call, not a resource: a sleeper that wakes rechecks its condition.
"""

import threading
import time

import posix_ipc

from .errors import os_errors
from .naming import require_private

MODE = 0o600


def sem_wait(sem, seconds):
    """Decrement the posix_ipc semaphore ``sem``, waiting at most ``seconds``; True if done.

    ``seconds <= 0`` only tries. A signal whose handler returns (posix_ipc's SignalError)
    resumes the wait for the time left; one whose handler raises ends it by raising.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            sem.acquire(max(seconds, 0))
            return True
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:
            seconds = deadline - time.monotonic()


def open_private(name):
    """Open the existing semaphore ``name``, refusing one of another user or with
    group/other access; ArenaNotFoundError if missing."""
    with os_errors(f"semaphore {name}"):
        sem = posix_ipc.Semaphore(name)
    try:
        require_private("sem", name)
    except BaseException:
        sem.close()
        raise
    return sem


def unlink_semaphore(name):
    """Remove the semaphore ``name``; True if removed, False if it did not exist.
    (posix_ipc's ``Semaphore.unlink`` after ``close`` raises in 1.3.2.)"""
    with os_errors(f"semaphore {name}"):
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            return False
    return True


class WakeSemaphore:
    """A named POSIX counting semaphore, created at 0, mode 0600."""

    __slots__ = ("name", "_sem")

    def __init__(self, name, sem):
        self.name = name
        self._sem = sem

    @classmethod
    def create(cls, name):
        """Create the semaphore ``name`` at 0; ArenaExistsError if it exists."""
        with os_errors(f"semaphore {name}"):
            return cls(name, posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=MODE,
                                                 initial_value=0))

    @classmethod
    def open(cls, name):
        """Open the existing semaphore ``name``; ArenaNotFoundError if missing."""
        return cls(name, open_private(name))

    def post(self):
        """Wake one waiter, or the next one to wait."""
        self._sem.release()

    def wait(self, timeout=None):
        """Wait for a post, at most ``timeout`` seconds (None: forever); True if woken."""
        if timeout is None:
            while not sem_wait(self._sem, 1.0):
                pass
            return True
        return sem_wait(self._sem, timeout)

    def drain(self):
        """Consume every pending post without waiting; return how many there were."""
        count = 0
        while sem_wait(self._sem, 0):
            count += 1
        return count

    def close(self):
        """Close this process's handle (the semaphore stays). Idempotent."""
        if self._sem is not None:
            self._sem.close()
            self._sem = None

    unlink = staticmethod(unlink_semaphore)


class LocalWakeSemaphore:
    """``WakeSemaphore``'s in-process twin over ``threading.Semaphore``.

    ``create`` and ``open`` both construct a new, independent semaphore: share the
    instance, not the name. ``close`` and ``unlink`` do nothing.
    """

    __slots__ = ("name", "_sem")

    def __init__(self, name=None):
        self.name = name
        self._sem = threading.Semaphore(0)

    @classmethod
    def create(cls, name=None):
        """A new semaphore at 0."""
        return cls(name)

    open = create

    def post(self):
        """Wake one waiter, or the next one to wait."""
        self._sem.release()

    def wait(self, timeout=None):
        """Wait for a post, at most ``timeout`` seconds (None: forever); True if woken."""
        if timeout is not None and timeout <= 0:
            return self._sem.acquire(blocking=False)
        return self._sem.acquire(timeout=timeout)

    def drain(self):
        """Consume every pending post without waiting; return how many there were."""
        count = 0
        while self._sem.acquire(blocking=False):
            count += 1
        return count

    def close(self):
        """Nothing to close."""

    @staticmethod
    def unlink(name):
        """Nothing to remove; returns False."""
        return False
