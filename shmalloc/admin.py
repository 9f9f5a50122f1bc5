"""admin: looking at arenas from outside, without attaching.

``holders`` reads an arena's header and CPU table without taking a CPU slot or
any lock, so it works on an arena whose locks a dead process holds; ``cleanup``
removes the OS objects of arenas nobody alive holds.
"""

from __future__ import annotations

import os

import psutil

from . import layout as L
from .errors import ArenaNotFoundError, IpcError
from .ipc import naming
from .ipc.segment import Segment


def process_alive(pid: int, start_us: int = 0) -> bool:
    """True if ``pid`` runs (not a zombie) and, when ``start_us`` is known,
    started then, so that a reused pid is not taken for the process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not start_us or int(proc.create_time() * 1e6) == start_us
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:                # exists, but we may not look at it
        return True


def holders(name: str) -> list[int]:
    """Pids of the live processes holding arena ``name``: its CPUs and its
    manager, or its creator while the arena is not yet formatted.  Empty when
    the segment is gone (or empty: its creator died creating it)."""
    try:
        seg = Segment.attach(naming.object_name(name, "arena"))
    except (ArenaNotFoundError, IpcError):
        return []
    try:
        if seg.size < L.HDR_WORDS * L.WORD:
            return []
        w = memoryview(seg.buf).cast("q")
        try:
            if w[L.HDR["MAGIC"]] != L.MAGIC:
                procs = [(w[L.HDR["CREATOR_PID"]], 0)]
            else:
                procs = [(w[L.HDR["MANAGER_PID"]], w[L.HDR["MANAGER_START"]])]
                procs += [(w[L.cpu_word(c) + L.CPU["PID"]], w[L.cpu_word(c) + L.CPU["START"]])
                          for c in range(L.MAX_CPUS)
                          if w[L.cpu_word(c) + L.CPU["STATE"]] == L.CPU_LIVE]
        finally:
            w.release()
    finally:
        seg.close()
    return sorted({pid for pid, start in procs if process_alive(pid, start)})


def arenas() -> dict[str, list[tuple[str, str]]]:
    """Arena name -> its OS objects, for every shmalloc arena of this machine."""
    found: dict[str, list[tuple[str, str]]] = {}
    for kind, obj in naming.list_objects():
        found.setdefault(naming.arena_of(obj), []).append((kind, obj))
    return found


def cleanup(names=None, *, only_owned: bool = True):
    """Remove the OS objects of the named arenas (all arenas when None) that no
    live process holds.  Returns (removed objects, arenas left because in use).
    Objects of another user are never touched."""
    found = arenas()
    removed, busy = [], []
    uid = os.getuid()
    for name in (names if names is not None else sorted(found)):
        naming.validate_name(name)
        live = holders(name)
        if live:
            busy.append((name, live))
            continue
        for kind, obj in found.get(name, []):
            try:
                if only_owned and naming.owner_uid(kind, obj) != uid:
                    continue
            except OSError:
                continue
            if naming.remove_object(kind, obj):
                removed.append((kind, obj))
    return removed, busy
