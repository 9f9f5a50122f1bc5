"""Names of an arena's OS objects, and finding and removing them.

Every object of arena ``A`` is named ``/shmalloc.A.PART``. Arena names may contain dots,
parts may not, so the arena of any object is everything between the prefix and the last
dot. On Linux the objects show up as files:

    shared memory    /dev/shm/shmalloc.A.PART
    semaphore        /dev/shm/sem.shmalloc.A.PART
    message queue    /dev/mqueue/shmalloc.A.PART    (only where mqueue is mounted)
"""

import os
import re

import posix_ipc

from .errors import ArenaPermissionError, BadNameError, os_errors

PREFIX = "shmalloc."
NAME_MAX = 64

SHM_DIR = "/dev/shm"
SEM_FILE_PREFIX = "sem."
MQUEUE_DIR = "/dev/mqueue"

KINDS = {"shm": "shared memory segment", "sem": "semaphore", "mq": "message queue"}

_ARENA_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_PART_CHARS = re.compile(r"[A-Za-z0-9_-]+")

_UNLINK = {
    "shm": posix_ipc.unlink_shared_memory,
    "sem": posix_ipc.unlink_semaphore,
    "mq": posix_ipc.unlink_message_queue,
}


def _check(name, what, chars, allowed):
    """Return ``name`` if it is 1..NAME_MAX characters of ``chars``; else raise."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise BadNameError(f"{what} is empty")
    if len(name) > NAME_MAX:
        raise BadNameError(f"{what} {name!r} is {len(name)} characters, more than {NAME_MAX}")
    if "\0" in name:
        raise BadNameError(f"{what} {name!r} contains a NUL character")
    if "/" in name:
        raise BadNameError(f"{what} {name!r} contains '/'")
    if name.startswith("."):
        raise BadNameError(f"{what} {name!r} starts with '.'")
    if not chars.fullmatch(name):
        bad = sorted({c for c in name if not chars.fullmatch(c)})
        raise BadNameError(f"{what} {name!r} contains {''.join(bad)!r}; allowed: {allowed}")
    return name


def validate_name(name):
    """Return ``name`` if it is a valid arena name: 1..64 of ``[A-Za-z0-9_.-]``, no leading dot.

    Raises TypeError if it is not a str, BadNameError saying what is wrong otherwise.
    """
    return _check(name, "arena name", _ARENA_CHARS, "A-Z a-z 0-9 _ . -")


def validate_part(part):
    """Return ``part`` if it is a valid object part name: 1..64 of ``[A-Za-z0-9_-]``."""
    return _check(part, "object part name", _PART_CHARS, "A-Z a-z 0-9 _ -")


def object_name(arena, part):
    """The POSIX name of ``part`` of ``arena``: ``/shmalloc.<arena>.<part>``."""
    return f"/{PREFIX}{validate_name(arena)}.{validate_part(part)}"


def arena_of(name):
    """The arena of a POSIX object name ``/shmalloc.<arena>.<part>``, or None if not one."""
    if not name.startswith("/" + PREFIX):
        return None
    arena, dot, part = name[len(PREFIX) + 1:].rpartition(".")
    return arena if dot and arena and part else None


def mq_listable():
    """True if message queues can be listed here (/dev/mqueue is mounted)."""
    return os.path.ismount(MQUEUE_DIR)


def _listdir(path):
    """Entries of ``path``, or none if it does not exist."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def list_objects(arena=None):
    """Sorted ``(kind, name)`` of the existing OS objects of ``arena``, or of every arena.

    ``kind`` is "shm", "sem" or "mq"; ``name`` is the POSIX name (``/shmalloc.A.PART``)
    that ``remove_object`` takes. Message queues are listed only if ``mq_listable()``.
    """
    if arena is not None:
        validate_name(arena)
    found = []
    for entry in _listdir(SHM_DIR):
        if entry.startswith(SEM_FILE_PREFIX):
            found.append(("sem", "/" + entry[len(SEM_FILE_PREFIX):]))
        else:
            found.append(("shm", "/" + entry))
    if mq_listable():
        found.extend(("mq", "/" + entry) for entry in _listdir(MQUEUE_DIR))
    mine = []
    for kind, name in found:
        owner = arena_of(name)
        if owner is not None and (arena is None or owner == arena):
            mine.append((kind, name))
    return sorted(mine)


def _describe(kind, name):
    """The object in words, e.g. "semaphore /shmalloc.demo.keg"; ValueError if no such kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown object kind {kind!r}; expected one of {sorted(KINDS)}")
    return f"{KINDS[kind]} {name}"


def object_path(kind, name):
    """The file through which Linux shows the object ``name`` of ``kind``."""
    _describe(kind, name)
    if kind == "sem":
        return f"{SHM_DIR}/{SEM_FILE_PREFIX}{name[1:]}"
    return (MQUEUE_DIR if kind == "mq" else SHM_DIR) + name


def require_private(kind, name):
    """Refuse (ArenaPermissionError) an object of another user, or one whose mode
    lets group or others in: attaching to it would trust memory or locks that
    someone else controls."""
    what = _describe(kind, name)
    with os_errors(what):
        st = os.stat(object_path(kind, name))
    if st.st_uid != os.getuid():
        raise ArenaPermissionError(f"{what} belongs to uid {st.st_uid}, not to this user "
                                   f"({os.getuid()})")
    if st.st_mode & 0o077:
        raise ArenaPermissionError(f"{what} has mode {st.st_mode & 0o777:04o}; only the owner "
                                   f"may have access (0600)")


def owner_uid(kind, name):
    """The uid that owns the object ``name`` of ``kind``."""
    what = _describe(kind, name)
    with os_errors(what):
        return os.stat(object_path(kind, name)).st_uid


def remove_object(kind, name):
    """Unlink the object ``name`` of ``kind``; True if removed, False if it did not exist."""
    what = _describe(kind, name)
    with os_errors(what):
        try:
            _UNLINK[kind](name)
        except posix_ipc.ExistentialError:
            return False
    return True
