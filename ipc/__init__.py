"""POSIX IPC objects for shmalloc: shared-memory segments, semaphore locks, wake-up
semaphores, and the names that tie an arena's objects together.

This package knows nothing of allocators. It is the one boundary where OS errors become
shmalloc's exceptions (``errors``). Each POSIX class has an in-process twin with the same
interface (``Segment.anonymous``, ``LocalLock``, ``LocalWakeSemaphore``) so the allocator
core can run on a bytearray in one process. Linux only: macOS lacks ``sem_timedwait``.

Installed as ``shmalloc.ipc``; the folder is ``ipc/`` at the top of the repository.
"""

from .errors import (
    ArenaExistsError,
    ArenaNotFoundError,
    ArenaPermissionError,
    BadNameError,
    IpcError,
    IpcLimitError,
    LockTimeoutError,
    NoSpaceError,
    ShmallocError,
    os_errors,
    translate,
)
from .lock import (
    HIST_BUCKETS,
    L_ACQUIRED_NS,
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
    LocalLock,
    SemLock,
)
from .naming import (
    PREFIX,
    arena_of,
    list_objects,
    mq_listable,
    object_name,
    owner_uid,
    remove_object,
    validate_name,
    validate_part,
)
from .segment import Segment, shm_free_bytes
from .semaphore import LocalWakeSemaphore, WakeSemaphore

__all__ = [
    "ArenaExistsError",
    "ArenaNotFoundError",
    "ArenaPermissionError",
    "BadNameError",
    "IpcError",
    "IpcLimitError",
    "LockTimeoutError",
    "NoSpaceError",
    "ShmallocError",
    "os_errors",
    "translate",
    "HIST_BUCKETS",
    "L_ACQUIRED_NS",
    "L_ACQUISITIONS",
    "L_CONTENDED",
    "L_HOLD_HIST",
    "L_HOLD_NS",
    "L_MAX_HOLD_NS",
    "L_MAX_WAIT_NS",
    "L_OWNER_ID",
    "L_OWNER_PID",
    "L_WAIT_HIST",
    "L_WAIT_NS",
    "LOCK_WORDS",
    "LocalLock",
    "SemLock",
    "PREFIX",
    "arena_of",
    "list_objects",
    "mq_listable",
    "object_name",
    "owner_uid",
    "remove_object",
    "validate_name",
    "validate_part",
    "Segment",
    "shm_free_bytes",
    "LocalWakeSemaphore",
    "WakeSemaphore",
]
