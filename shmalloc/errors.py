"""The exceptions shmalloc raises.

``ShmallocError`` and the OS-facing subclasses are defined in ``ipc`` (the one
boundary where OS errors are translated); the allocator's own are here.  Each
message names the zone and the handle it is about.
"""

__all__ = [
    "ArenaExistsError", "ArenaNotFoundError", "ArenaPermissionError", "BadNameError", "IpcError",
    "IpcLimitError", "LockTimeoutError", "ShmallocError", "BadHandleError", "ForeignHandleError",
    "DoubleFreeError", "ArenaClosedError", "LayoutError", "CorruptionError", "UseAfterFreeError",
    "ZoneError", "HookError", "TooManyCpusError", "ArenaFullError", "StaleArenaError",
    "NoSpaceError", "ArenaSizeWarning", "SysctlError",
]

import errno as _errno  # noqa: E402

from .ipc.errors import (  # noqa: E402  (re-exported)
    ArenaExistsError,
    ArenaNotFoundError,
    ArenaPermissionError,
    BadNameError,
    IpcError,
    IpcLimitError,
    LockTimeoutError,
    NoSpaceError,
    ShmallocError,
)


class BadHandleError(ShmallocError, ValueError):
    """A handle that is not an item of this zone: out of range, negative,
    misaligned, in a free page, or of another zone."""


class ForeignHandleError(BadHandleError):
    """The handle is an item, but of another zone."""


class DoubleFreeError(BadHandleError):
    """The item is already free (in a cache, the depot or its slab)."""


class ArenaFullError(ShmallocError, MemoryError):
    """No storage now: the arena's pages, a zone's limit, or the room left in
    ``/dev/shm`` to back the arena's pages, are used up."""


class ArenaSizeWarning(UserWarning):
    """An arena is created larger than ``/dev/shm`` has room for: it works until
    its pages outgrow the room, then allocations raise ArenaFullError
    (``Arena.create(..., strict=True)`` refuses instead)."""


class StaleArenaError(ArenaExistsError):
    """The arena's name exists, but every process that held it (its manager and
    its CPUs) is dead: ``shmalloc cleanup --name NAME`` or
    ``Arena.create(..., replace=True)`` removes what they left."""


class ArenaClosedError(ShmallocError):
    """The arena (or the Buffer) was closed in this process."""


class LayoutError(ShmallocError):
    """The segment is not an arena of this layout: wrong magic, version or size."""


class CorruptionError(ShmallocError):
    """``check`` found an inconsistency; the message names it."""


class UseAfterFreeError(CorruptionError):
    """Debug mode: a freed item was modified before it was handed out again."""


class ZoneError(ShmallocError, ValueError):
    """A zone cannot be created or configured as asked."""


class HookError(ShmallocError):
    """A named hook cannot be resolved in this process."""


class TooManyCpusError(ShmallocError):
    """Every CPU slot of the arena is taken."""


class SysctlError(ShmallocError):
    """A sysctl refused, with the errno sysctl(3) would set: ``ENOENT`` for an
    unknown name, ``EINVAL`` for a value that lowers a limit, ``EPERM`` for a
    read-only one."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno

    @property
    def strerror(self) -> str:
        return {_errno.ENOENT: "unknown oid", _errno.EINVAL: "Invalid argument",
                _errno.EPERM: "Operation not permitted"}.get(self.errno, str(self))
