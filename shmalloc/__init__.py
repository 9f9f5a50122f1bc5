"""shmalloc: FreeBSD's UMA slab allocator and mbufs on POSIX shared memory,
where every attached process is a CPU.

An allocation is satisfied in this order, fast to slow (UMA's search order):

1. this CPU's bucket cache (``cache``: process-private, no lock, no IPC)
2. the zone's depot of full buckets (``depot``: shared memory, zone lock)
3. the keg's slabs (``keg``: partial, then free, then a new slab; keg lock)
4. the arena's pages (``vm``: runs of pages; vm lock)

Layers: ``scripts`` -> ``workers`` -> ``shmalloc`` (this package) -> ``ipc``.
Inside this package the core (``layout``, ``vm``, ``keg``, ``zone`` with its
``cache``, ``depot``, ``sleepq``, ``xfree`` and ``bulk``, ``arena``, ``recovery``,
``supervisor`` ...) names nothing above it; the layers on it, the mbuf
layer (``shmalloc.mbuf``) and Buffers (``shmalloc.buffer``), register what they add
(``layers``) and are imported here, so every process that imports shmalloc has them.
The byte layout of an arena lives in ``layout`` alone.
"""

from .arena import Arena
from .errors import (ArenaClosedError, ArenaExistsError, ArenaFullError, ArenaNotFoundError,
                     ArenaPermissionError, BadHandleError, BadNameError, CorruptionError,
                     DoubleFreeError, ForeignHandleError, HookError, IpcLimitError, LayoutError,
                     LockTimeoutError, ShmallocError, StaleArenaError, SysctlError,
                     TooManyCpusError, UseAfterFreeError, ZoneError)
from .hooks import register as register_hook
from .mail import CpuGoneError, MailboxFullError
from .stats import LockStats, ZoneStats
from .supervisor import Supervisor
from .zone import M_NOWAIT, M_WAITOK, M_ZERO, Zone
# the layers on the core: imported here, they register with it
from . import mbuf  # noqa: E402,F401
from .buffer import Buffer, BufferClosedError, HandoffRefusedError, shared_array_class  # noqa: E402
from .default import connect, default_arena  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Arena", "Zone", "M_NOWAIT", "M_WAITOK", "M_ZERO", "ZoneStats", "LockStats",
    "register_hook", "ShmallocError", "ArenaClosedError", "ArenaExistsError",
    "ArenaNotFoundError", "ArenaPermissionError", "BadHandleError", "BadNameError",
    "CorruptionError", "DoubleFreeError", "ForeignHandleError", "HookError", "IpcLimitError",
    "LayoutError", "LockTimeoutError", "TooManyCpusError", "UseAfterFreeError", "ZoneError",
    "MailboxFullError", "CpuGoneError", "ArenaFullError", "StaleArenaError", "SysctlError",
    "Buffer", "BufferClosedError", "HandoffRefusedError", "SharedArray", "connect",
    "default_arena", "Supervisor",
]


def __getattr__(name):
    """``SharedArray`` needs numpy, which is optional: made on first use."""
    if name == "SharedArray":
        return shared_array_class()
    raise AttributeError(f"module 'shmalloc' has no attribute {name!r}")
