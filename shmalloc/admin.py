"""admin: looking at arenas from outside, without attaching.

``holders`` reads an arena's header and CPU table without taking a CPU slot or
any lock, so it works on an arena whose locks a dead process holds; ``cleanup``
removes the OS objects of arenas nobody alive holds; ``existing_arena_error`` says
who holds a name that ``Arena.create`` found taken, and ``remove_stale`` clears one
that only the dead held (``Arena.create(..., replace=True)``).
"""

from __future__ import annotations

import errno
import os

import psutil

from . import layout as L
from .errors import ArenaExistsError, ArenaNotFoundError, IpcError, StaleArenaError
from .ipc import naming
from .ipc.lock import SemLock
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
    return sorted({pid for _, pid, alive in holder_table(name) or () if alive})


def holder_table(name: str, seg=None) -> list[tuple[str, int, bool]] | None:
    """``(role, pid, alive)`` for everything recorded as holding arena ``name``:
    "manager" and each "CPU n", or "creator" while the arena is not formatted.
    None when its segment does not exist, [] when it is empty (its creator died
    between making and sizing it).  ``seg``: the segment, already mapped."""
    own = seg is None
    if own:
        try:
            seg = Segment.attach(naming.object_name(name, "arena"))
        except ArenaNotFoundError:
            return None
        except IpcError:
            return []
    try:
        if seg.size < L.HDR_WORDS * L.WORD:
            return []
        w = memoryview(seg.buf).cast("q")
        try:
            if w[L.HDR["MAGIC"]] != L.MAGIC:
                procs = [("creator", w[L.HDR["CREATOR_PID"]], 0)]
            elif w[L.HDR["VERSION"]] != L.LAYOUT_VERSION:
                # another shmalloc's layout: its CPU table may lie elsewhere, so the
                # holders are the header's pids and every process mapping the segment
                procs = [("creator", w[L.HDR["CREATOR_PID"]], 0),
                         ("manager", w[L.HDR["MANAGER_PID"]], w[L.HDR["MANAGER_START"]])]
                procs += [("mapping", pid, 0) for pid in
                          _mapping_pids(naming.object_path("shm", seg.name))
                          if pid != os.getpid()]          # (this look maps it too)
            else:
                procs = [("manager", w[L.HDR["MANAGER_PID"]], w[L.HDR["MANAGER_START"]])]
                procs += [(f"CPU {c}", w[L.cpu_word(c) + L.CPU["PID"]],
                           w[L.cpu_word(c) + L.CPU["START"]])
                          for c in range(L.MAX_CPUS)
                          if w[L.cpu_word(c) + L.CPU["STATE"]] == L.CPU_LIVE]
        finally:
            w.release()
    finally:
        if own:
            seg.close()
    return [(role, pid, process_alive(pid, start)) for role, pid, start in procs if pid > 0]


def _mapping_pids(path: str) -> list[int]:
    """Pids of the processes that map the file ``path`` (Linux: /proc/PID/maps);
    a process that ends or hides its maps meanwhile is left out."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as f:
                if any(line.rstrip("\n").endswith(" " + path) for line in f):
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _describe(table) -> str:
    by_pid: dict[int, list[str]] = {}
    for role, pid, _ in table:
        by_pid.setdefault(pid, []).append(role)
    return ", ".join(f"pid {pid} ({', '.join(roles)})" for pid, roles in sorted(by_pid.items()))


def existing_arena_error(name: str) -> ArenaExistsError:
    """The error for an ``Arena.create`` that found arena ``name``'s segment
    taken: ArenaExistsError naming the live processes that hold it, or
    StaleArenaError (an ArenaExistsError) when every holder recorded is dead,
    saying how to remove what they left."""
    seg = naming.object_name(name, "arena")
    table = holder_table(name)
    if table is None:
        return ArenaExistsError(errno.EEXIST, f"arena {name!r}: shared memory segment {seg} "
                                f"existed a moment ago and is gone: try again")
    live = [t for t in table if t[2]]
    if live:
        return ArenaExistsError(errno.EEXIST, f"arena {name!r} exists and is in use by "
                                f"{_describe(live)}")
    dead = f"every process that held it is dead: {_describe(table)}" if table else \
        "its creator died while making it (the segment is empty)"
    return StaleArenaError(errno.EEXIST, f"arena {name!r} exists but {dead}; remove what "
                           f"they left with `shmalloc cleanup --name {name}`, or create it "
                           f"with Arena.create(..., replace=True)")


def remove_stale(name: str) -> list[tuple[str, str]]:
    """Remove the OS objects of arena ``name`` if no live process holds it;
    StaleArenaError's remedy (``Arena.create(..., replace=True)``).  The holders
    are checked again under the arena's vm lock -- the lock a CPU takes its slot
    under -- so a process attaching at that moment is seen (its slot) or finds no
    arena; a vm lock its dead holder left taken is not waited for.  Raises the
    ``existing_arena_error`` when someone alive holds it.  Returns the objects
    removed."""
    naming.validate_name(name)
    try:
        seg = Segment.attach(naming.object_name(name, "arena"))
    except ArenaNotFoundError:
        seg = None
    except IpcError:                       # empty: no lock to take, nobody to see
        seg = None
    lock = taken = None
    try:
        if seg is not None and seg.size >= L.HDR_WORDS * L.WORD:
            w = memoryview(seg.buf).cast("q")
            if w[L.HDR["MAGIC"]] == L.MAGIC and seg.size > L.lock_word(L.VM_LOCK) + L.LOCK_WORDS:
                try:
                    lw = L.lock_word(L.VM_LOCK)
                    lock = SemLock.open(naming.object_name(name, f"l{L.VM_LOCK}"),
                                        w[lw:lw + L.LOCK_WORDS])
                except (ArenaNotFoundError, IpcError):
                    lock = None
            if lock is not None:
                taken = lock.acquire(timeout=1.0, owner_id=L.NO_CPU)
                if not taken and process_alive(lock.owner_pid()):
                    raise existing_arena_error(name)
            w.release()
        table = holder_table(name, seg) if seg is not None else []
        if any(alive for _, _, alive in table):
            raise existing_arena_error(name)
        removed = []
        for kind, obj in naming.list_objects(name):
            if naming.remove_object(kind, obj):
                removed.append((kind, obj))
        if Segment.unlink(naming.object_name(name, "arena")):
            removed.append(("shm", naming.object_name(name, "arena")))
        return removed
    finally:
        if lock is not None:
            if taken:
                lock.release()
            lock.close()
        if seg is not None:
            seg.close()


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
