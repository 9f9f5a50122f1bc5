"""default: this process's attachments by arena name, and the default arena.

Two jobs, both per process:

1. **Attachments by name** (``attachment``): a pickled Buffer names its arena; the
   process that unpickles it needs a CPU on that arena.  The first Buffer of an
   arena seen in a process attaches it (``Arena.attach``) and later ones reuse the
   attachment; an arena the program made itself (``Arena.create``) is registered
   when it allocates its first Buffer and used as is.  After ``fork`` the registry
   starts empty: the child attaches CPUs of its own and never touches the parent's
   caches.  At exit this process's Buffers are closed first (their references go
   back), then the arenas attached here (``_exit``), and only then may arena.py's
   own exit handler close the rest.  Where ``multiprocessing`` is in use, ``_exit``
   is a ``multiprocessing.util.Finalize`` that runs after the queues' feeder threads
   have flushed (a Buffer put on a Queue is pickled by that thread): in a child at
   the end of its run, in the main process from our atexit handler, which runs
   multiprocessing's exit sequence at that point.

2. **The default arena** (``connect``): a program gets an arena with no setup.  The
   name comes from ``$SHMALLOC_ARENA``, else ``user<uid>``.  If the arena runs, this
   process attaches to it; if not, a keg manager is started for it, detached (its own
   session, double-forked: no zombie, not killed with this process's process group)::

       python -m shmalloc.workers.manager --name NAME --size SIZE --idle-exit SECONDS -q

   and the arena lives while any process is attached and ``SECONDS`` after the last
   one left (``$SHMALLOC_IDLE_EXIT``, default 10 s); then the manager removes it.  A
   manager found dead (killed) is replaced by one that adopts the arena.  Size:
   ``$SHMALLOC_SIZE`` or ``size=``, else half the free space of /dev/shm, at most
   1 GiB and at least 16 MiB.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import threading
import time

from . import layout as L
from .admin import process_alive
from .arena import Arena
from .errors import ArenaNotFoundError, LayoutError, ShmallocError
from .ipc import naming
from .ipc.segment import Segment

__all__ = ["connect", "default_arena", "default_name", "attachment"]

ENV_NAME = "SHMALLOC_ARENA"
ENV_SIZE = "SHMALLOC_SIZE"
ENV_IDLE_EXIT = "SHMALLOC_IDLE_EXIT"
IDLE_EXIT = 10.0             # seconds a default arena outlives its last process
START_TIMEOUT = 30.0         # seconds connect() waits for a manager to have the arena up
MIN_SIZE, MAX_SIZE = 16 << 20, 1 << 30

# ============================================================================ attachments
_arenas: dict[str, Arena] = {}         # name -> this process's attachment
_attached: set[str] = set()            # names attached here (closed here at exit)
_before_exit: list = []                # called first at exit (buffer: close Buffers)
_finalizer_pid = 0                     # pid that registered the multiprocessing finalizer
_connect_lock = threading.Lock()


def _after_fork_in_child():
    global _finalizer_pid, _connect_lock
    _connect_lock = threading.Lock()
    _arenas.clear()
    _attached.clear()
    _finalizer_pid = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


def attachment(name: str) -> Arena:
    """This process's attachment to arena ``name``: the registered one, or a new
    CPU (``Arena.attach``) made now and closed at exit."""
    a = _arenas.get(name)
    if a is not None and not a._closed:
        return a
    a = Arena.attach(name)
    _arenas[name] = a
    _attached.add(name)
    _watch_exit()
    return a


def register(arena: Arena) -> None:
    """Make ``arena`` (made or attached by the program) the attachment for its
    name in this process, unless an open one is registered already."""
    cur = _arenas.get(arena.name)
    if cur is arena:
        return
    if cur is None or cur._closed:
        _arenas[arena.name] = arena
        _attached.discard(arena.name)
    _watch_exit()


def _watch_exit() -> None:
    """In a multiprocessing child (or a parent that imported multiprocessing),
    run ``_exit`` from multiprocessing's exit function too: forked children leave
    with ``os._exit`` (no atexit), and the queues' feeder threads must flush first
    (priority -5 joins them; ours runs after)."""
    global _finalizer_pid
    if _finalizer_pid == os.getpid() or "multiprocessing" not in sys.modules:
        return
    from multiprocessing import util
    util.Finalize(None, _exit, exitpriority=-10)
    _finalizer_pid = os.getpid()


def _exit() -> None:
    """Close this process's Buffers, then the arenas attached here."""
    for fn in list(_before_exit):
        try:
            fn()
        except Exception:
            pass
    for name in list(_attached):
        a = _arenas.pop(name, None)
        _attached.discard(name)
        if a is not None:
            try:
                a.close()
            except Exception:
                pass


def _exit_at_interpreter_exit() -> None:
    """atexit, registered after arena.py's (so it runs before arena.py closes every
    arena, which would leave still-held references to no CPU).  With the
    multiprocessing finalizer registered, run multiprocessing's exit sequence now
    (it would run later: its atexit handler was registered before ours): queues
    flush, children are joined, then ``_exit``.  It runs once per process."""
    if _finalizer_pid == os.getpid():
        from multiprocessing import util
        util._exit_function()
    _exit()


atexit.register(_exit_at_interpreter_exit)


# ============================================================================ default arena
def default_name() -> str:
    """``$SHMALLOC_ARENA``, else ``user<uid>``."""
    return naming.validate_name(os.environ.get(ENV_NAME) or f"user{os.getuid()}")


def default_size() -> int:
    """``$SHMALLOC_SIZE``, else half of /dev/shm's free space within [16 MiB, 1 GiB]."""
    env = os.environ.get(ENV_SIZE)
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(f"${ENV_SIZE} must be a number of bytes, not {env!r}") from None
    try:
        st = os.statvfs(naming.SHM_DIR)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 2 * MIN_SIZE
    return max(MIN_SIZE, min(MAX_SIZE, free // 2)) & ~(L.PAGE_SIZE - 1)


def default_idle_exit() -> float:
    env = os.environ.get(ENV_IDLE_EXIT)
    if not env:
        return IDLE_EXIT
    try:
        v = float(env)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise ValueError(f"${ENV_IDLE_EXIT} must be a positive number of seconds, not {env!r}")
    return v


def default_arena() -> Arena:
    """``connect()``: the default arena of this user, started if need be."""
    return connect()


def connect(name: str | None = None, size: int | None = None, *,
            idle_exit: float | None = None) -> Arena:
    """This process's attachment to arena ``name`` (default ``default_name()``),
    starting a keg manager for it when it does not run: the arena then lives while
    any process is attached, and ``idle_exit`` seconds (default
    ``$SHMALLOC_IDLE_EXIT`` or 10) after the last one left.  ``size`` (bytes) only
    matters when the arena is made here.  Calls after the first return the same
    Arena (until it is closed)."""
    name = default_name() if name is None else naming.validate_name(name)
    a = _arenas.get(name)
    if a is not None and not a._closed:
        return a
    with _connect_lock:                # one attachment per process, whatever the threads
        a = _arenas.get(name)
        if a is not None and not a._closed:
            return a
        return _connect(name, size, idle_exit)


def _connect(name: str, size: int | None, idle_exit: float | None) -> Arena:
    size = default_size() if size is None else size
    idle_exit = default_idle_exit() if idle_exit is None else float(idle_exit)
    deadline = time.monotonic() + START_TIMEOUT
    log = None                         # stderr of the manager this call started
    try:
        while True:
            state = _peek(name)
            if state in ("running", "unmanaged"):
                a = _attach_checked(name)
                if a is not None:
                    return a
            elif state in ("missing", "orphaned") and log is None:
                log = _start_manager(name, size, idle_exit, adopt=(state == "orphaned"))
            elif state == "missing" and log is not None and os.fstat(log.fileno()).st_size:
                raise ShmallocError(_why_not_started(name, state, log))
            if time.monotonic() > deadline:
                raise ShmallocError(_why_not_started(name, state, log))
            time.sleep(0.02)
    finally:
        if log is not None:
            log.close()


def _attach_checked(name: str) -> Arena | None:
    """Attach, then make sure the arena is still the named one (a manager that
    retires unlinks the name first); None to look again."""
    try:
        a = Arena.attach(name)
    except (ArenaNotFoundError, LayoutError):
        return None
    if not os.path.exists(naming.object_path("shm", naming.object_name(name, "arena"))):
        a.close()
        return None
    register(a)
    _attached.add(name)
    return a


def _peek(name: str) -> str:
    """The state of arena ``name``, read from its header without attaching:
    missing, starting (being formatted), running (a live manager), orphaned (its
    manager died) or unmanaged (no manager: made by a program, or its manager is
    still making the mbuf zones -- either way usable now)."""
    try:
        seg = Segment.attach(naming.object_name(name, "arena"))
    except ArenaNotFoundError:
        return "missing"
    try:
        if seg.size < L.HDR_WORDS * L.WORD:
            return "starting"
        w = memoryview(seg.buf).cast("q")
        try:
            magic = w[L.HDR["MAGIC"]]
            pid, start = w[L.HDR["MANAGER_PID"]], w[L.HDR["MANAGER_START"]]
        finally:
            w.release()
    finally:
        seg.close()
    if magic != L.MAGIC:
        return "starting"
    if pid:
        return "running" if process_alive(pid, start) else "orphaned"
    return "unmanaged"


_TRAMPOLINE = ("import os, sys\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               "    os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")


def _start_manager(name: str, size: int, idle_exit: float, adopt: bool):
    """Start ``shmalloc serve`` for ``name`` in a session of its own, double-forked
    so that it is nobody's child here.  Returns the file its stderr goes to."""
    cmd = [sys.executable, "-m", "shmalloc.workers.manager", "--name", name,
           "--idle-exit", repr(idle_exit), "-q"]
    cmd += ["--adopt"] if adopt else ["--size", str(size)]
    log = tempfile.TemporaryFile(prefix="shmalloc-serve-")
    subprocess.run([sys.executable, "-c", _TRAMPOLINE] + cmd[1:], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=log, check=True, timeout=30)
    return log


def _why_not_started(name: str, state: str, log) -> str:
    msg = f"arena {name!r}: no running arena after {START_TIMEOUT:g} s (state: {state})"
    if log is not None:
        log.seek(0)
        err = log.read().decode(errors="replace").strip()
        if err:
            msg += f"; the keg manager said: {err[-2000:]}"
    return msg
