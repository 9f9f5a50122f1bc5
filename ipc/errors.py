"""The project's exceptions, and the one place where OS errors become them.

Every call into ``posix_ipc`` or the OS that can fail runs inside ``os_errors(what)``,
which turns the error into a ``ShmallocError`` subclass whose message names the object
(``what``, e.g. "shared memory segment /shmalloc.demo.arena"). Each subclass also derives
from the builtin a caller would catch without knowing shmalloc (``FileExistsError``...).

posix_ipc raises its own classes with fixed English texts and, for some errors, a bare
``OSError`` or ``ValueError`` without an errno; ``translate`` recognises those texts.
"""

import contextlib
import errno

import posix_ipc


class ShmallocError(Exception):
    """Root of every exception shmalloc raises on purpose."""


class ArenaExistsError(ShmallocError, FileExistsError):
    """An OS object that was to be created already exists."""


class ArenaNotFoundError(ShmallocError, FileNotFoundError):
    """An OS object that was to be opened does not exist."""


class ArenaPermissionError(ShmallocError, PermissionError):
    """An OS object belongs to another user, or grants access beyond its owner."""


class IpcLimitError(ShmallocError, OSError):
    """A per-user or per-process OS budget is exhausted.

    RLIMIT_MSGQUEUE bytes, open files, or space and memory in /dev/shm.
    """


class NoSpaceError(IpcLimitError, MemoryError):
    """The filesystem behind POSIX shared memory (/dev/shm, a tmpfs) has no room
    left for pages a segment needs.  ``wanted`` and ``free`` are in bytes."""

    def __init__(self, *args, wanted: int = 0, free: int = 0):
        super().__init__(*args)
        self.wanted = wanted
        self.free = free


class BadNameError(ShmallocError, ValueError):
    """An arena or object name that shmalloc does not accept."""


class LockTimeoutError(ShmallocError, TimeoutError):
    """A lock or semaphore was not obtained within the time allowed."""


class IpcError(ShmallocError, OSError):
    """Any other failure of an OS IPC call."""


_LIMIT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM})

# posix_ipc reports these conditions without an errno.
_EMFILE_TEXT = "maximum number of files open"
_EINVAL_TEXT = "Invalid parameter(s)"


def _oserror(cls, code, what, detail, cause):
    """An OSError-derived ``cls`` carrying ``code`` (if known) and a message naming ``what``."""
    message = f"{what}: {detail} ({cause})"
    return cls(message) if code is None else cls(code, message)


def translate(exc, what):
    """Return the ``ShmallocError`` for ``exc`` raised while acting on ``what``.

    ``exc`` is returned unchanged when it is already a ``ShmallocError`` or is not an
    OS error (a programming error must surface as itself).
    """
    if isinstance(exc, ShmallocError):
        return exc
    if isinstance(exc, posix_ipc.ExistentialError):
        text = str(exc)
        if "already exists" in text:
            return _oserror(ArenaExistsError, errno.EEXIST, what, "already exists", text)
        if "exist" in text:
            return _oserror(ArenaNotFoundError, errno.ENOENT, what, "does not exist", text)
        return _oserror(IpcError, errno.EBADF, what, "not usable", text)
    if isinstance(exc, posix_ipc.PermissionsError):
        return _oserror(ArenaPermissionError, errno.EACCES, what, "permission denied", exc)
    if isinstance(exc, posix_ipc.BusyError):
        return _oserror(LockTimeoutError, errno.ETIMEDOUT, what, "timed out", exc)
    if isinstance(exc, posix_ipc.SignalError):
        return _oserror(IpcError, errno.EINTR, what, "interrupted by a signal", exc)
    if isinstance(exc, ValueError) and str(exc) == _EINVAL_TEXT:
        return _oserror(IpcError, errno.EINVAL, what, "invalid parameters", exc)
    if isinstance(exc, OSError):
        code = exc.errno
        if code is None and _EMFILE_TEXT in str(exc):
            code = errno.EMFILE
        if code == errno.EEXIST:
            return _oserror(ArenaExistsError, code, what, "already exists", exc)
        if code == errno.ENOENT:
            return _oserror(ArenaNotFoundError, code, what, "does not exist", exc)
        if code in (errno.EACCES, errno.EPERM):
            return _oserror(ArenaPermissionError, code, what, "permission denied", exc)
        if code in _LIMIT_ERRNOS:
            detail = ("per-user or per-process limit reached (open files, "
                      "RLIMIT_MSGQUEUE bytes, or /dev/shm space)")
            return _oserror(IpcLimitError, code, what, detail, exc)
        return _oserror(IpcError, code, what, "OS error", exc)
    return exc


@contextlib.contextmanager
def os_errors(what):
    """Run the body, raising OS errors as ``ShmallocError`` subclasses naming ``what``."""
    try:
        yield
    except Exception as exc:
        translated = translate(exc, what)
        if translated is exc:
            raise
        raise translated from exc
