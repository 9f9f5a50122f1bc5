"""layers: what the layers above the core register with it.

The core (layout, vm, keg, zone, arena, recovery, supervisor) names no layer
above it.  A layer (the mbuf layer, Buffers) registers what it adds when it is
imported, and the package (``shmalloc/__init__``) imports the layers it ships, so
that every process using ``shmalloc`` has them::

    what                         registered with                    used by
    sysctl names                 register_sysctl(names, handler)    Arena.sysctl
    boot-time tunables           register_tunables(validate, store) Arena.create(tunables=)
    a new arena's setup          register_on_create(fn)             Arena.create, create_local
                                                                    (unless bare=True)
    Arena methods                Arena.extend(fn)                   arena.netstat_m(), arena.alloc()
    a supervised arena's setup   register_setup(fn)                 Supervisor.create
    low-memory handlers          register_lowmem(fn)                Supervisor.reclaim
    dead-CPU recovery passes     recovery.register_pass(fn)         Supervisor.recover
    zone-lock repair steps       recovery.register_repair(fn)       recovery.rebuild_zone
    zone hooks                   stored by module-qualified name    Zone (``hooks.resolve``)

A layer works on the arena's shared memory through ``views(arena)`` (the words,
tags, locks and kegs of this process's mapping), for the sections of the layout that
are its own (the mbuf header, refcount trailers); ``workers`` and ``scripts`` never
do (a test checks it): they go through the public API.

Hook names stored in the segment are module-qualified (``"package.module:function"``),
so a process that meets an arena imports what its data names, whatever it imported
itself.
"""

from __future__ import annotations

import errno

from .errors import SysctlError

def views(arena):
    """The views of ``arena``'s mapping in this process (``backend.Core``): for the
    layers on the core, which keep sections of the layout of their own."""
    return arena._core


_sysctls: dict[str, object] = {}          # name -> handler(arena, name, value) -> value
_tunables = None                          # (validate(dict) -> dict, store(words, dict))
on_create: list = []                      # fn(arena): every new arena (not bare)
setups: list = []                         # fn(arena): a new arena made by a supervisor
lowmem_handlers: list = []                # fn(arena): free pages ran low


def register_sysctl(names, handler) -> None:
    """Serve the sysctl ``names`` with ``handler(arena, name, value)``, which reads
    (``value`` None) or sets the value and returns it: an int, or any value an
    opaque sysctl gives (a struct such as ``kern.ipc.mbstat``)."""
    for name in names:
        _sysctls[name] = handler


def sysctl_names() -> list[str]:
    return list(_sysctls)


def sysctl(arena, name: str, value=None):
    """``arena.sysctl``: the handler registered for ``name``, else ENOENT."""
    if not isinstance(name, str):
        raise TypeError(f"a sysctl name is a str, not {type(name).__name__}")
    handler = _sysctls.get(name)
    if handler is None:
        known = ", ".join(sorted(_sysctls)) or "none"
        raise SysctlError(errno.ENOENT, f"unknown sysctl {name!r} (known: {known})")
    return handler(arena, name, value)


def register_tunables(validate, store) -> None:
    """``validate(tunables) -> dict`` checks ``Arena.create(tunables=...)`` before any
    OS object is made; ``store(words, fields)`` writes them into a new arena."""
    global _tunables
    _tunables = (validate, store)


def validate_tunables(tunables) -> dict:
    if tunables is None:
        return {}
    if _tunables is None:
        raise SysctlError(errno.ENOENT, "no layer takes boot-time tunables "
                          "(import shmalloc.mbuf)")
    return _tunables[0](tunables)


def store_tunables(w, fields: dict) -> None:
    if fields:
        _tunables[1](w, fields)


def register_on_create(fn) -> None:
    """Run ``fn(arena)`` at the end of every ``Arena.create`` / ``create_local``, once
    the arena is formatted and its creator holds CPU 0 (the mbuf layer's
    ``mbuf_init``, as FreeBSD's SYSINIT runs it at boot).  ``bare=True`` skips them:
    an arena for custom zones only."""
    if fn not in on_create:
        on_create.append(fn)


def run_on_create(arena) -> None:
    for fn in on_create:
        fn(arena)


def register_setup(fn) -> None:
    """Run ``fn(arena)`` on every arena a supervisor creates (the mbuf zones)."""
    if fn not in setups:
        setups.append(fn)


def run_setups(arena) -> None:
    for fn in setups:
        fn(arena)


def register_lowmem(fn) -> None:
    """Run ``fn(arena)`` when the supervisor finds free pages low."""
    if fn not in lowmem_handlers:
        lowmem_handlers.append(fn)
