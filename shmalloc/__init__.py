"""shmalloc: FreeBSD's UMA slab allocator and mbufs on POSIX shared memory,
where every attached process is a CPU.

An allocation is satisfied in this order, fast to slow (UMA's search order):

1. this CPU's bucket cache (``zone``: process-private, no lock, no IPC)
2. the zone's depot of full buckets (``zone``: shared memory, zone lock)
3. the keg's slabs (``keg``: partial, then free, then a new slab; keg lock)
4. the arena's pages (``vm``: runs of pages; vm lock)

Layers: ``scripts`` -> ``workers`` -> ``shmalloc`` (this package) -> ``ipc``.
The byte layout of an arena lives in ``layout`` alone.
"""

from .arena import Arena
from .errors import (ArenaClosedError, ArenaExistsError, ArenaNotFoundError,
                     ArenaPermissionError, BadHandleError, BadNameError, CorruptionError,
                     DoubleFreeError, ForeignHandleError, HookError, IpcLimitError, LayoutError,
                     LockTimeoutError, ShmallocError, TooManyCpusError, UseAfterFreeError,
                     ZoneError)
from .hooks import register as register_hook
from .mail import CpuGoneError, MailboxFullError
from .stats import LockStats, ZoneStats
from .zone import M_NOWAIT, M_WAITOK, M_ZERO, Zone
from .default import connect, default_arena

__version__ = "0.1.0"

__all__ = [
    "Arena", "Zone", "M_NOWAIT", "M_WAITOK", "M_ZERO", "ZoneStats", "LockStats",
    "register_hook", "ShmallocError", "ArenaClosedError", "ArenaExistsError",
    "ArenaNotFoundError", "ArenaPermissionError", "BadHandleError", "BadNameError",
    "CorruptionError", "DoubleFreeError", "ForeignHandleError", "HookError", "IpcLimitError",
    "LayoutError", "LockTimeoutError", "TooManyCpusError", "UseAfterFreeError", "ZoneError",
    "MailboxFullError", "CpuGoneError",
    "Buffer", "BufferClosedError", "ArenaFullError", "HandoffRefusedError", "SharedArray",
    "connect", "default_arena",
]


def __getattr__(name):
    """Buffers load the mbuf layer: imported on first use, so that ``import shmalloc``
    stays the core alone (SharedArray also needs numpy, which is optional)."""
    if name in ("Buffer", "BufferClosedError", "ArenaFullError", "HandoffRefusedError"):
        from . import buffer
        return getattr(buffer, name)
    if name == "SharedArray":
        from .buffer import shared_array_class
        return shared_array_class()
    raise AttributeError(f"module 'shmalloc' has no attribute {name!r}")
