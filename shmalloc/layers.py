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
    low-memory thresholds        register_lowmem_pages(fn)          Supervisor.lowmem
    a drain request's work       register_drain_request(fn)         every CPU the keg manager
                                                                    asks (MSG_DRAIN): poll,
                                                                    recv, run_drain_requests
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
lowmem_pages: list = []                   # fn(arena) -> pages: low under that many free
drain_requests: list = []                 # fn(arena): the keg manager asked for a drain


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


def register_lowmem_pages(fn) -> None:
    """``fn(arena) -> pages``: the supervisor finds memory low when the free pages fall
    under that many too (the mbuf layer's ``vm.v_free_min``)."""
    if fn not in lowmem_pages:
        lowmem_pages.append(fn)


def register_drain_request(fn) -> None:
    """Run ``fn(arena)`` in every CPU the keg manager asks to drain (its low-memory
    reclaim posts MSG_DRAIN to each): the CPU gives its cached items back at once,
    wherever it takes the message, and runs these -- the layers' work, such as the
    mbuf layer's protocol drain routines -- at its next safe point, where it holds
    no lock: ``poll``, ``recv``, or a layer's own ``run_drain_requests`` (the mbuf
    layer's, when an allocation fails)."""
    if fn not in drain_requests:
        drain_requests.append(fn)


def run_drain_requests(arena) -> bool:
    """Run the drain-request handlers if the keg manager asked this CPU for a drain
    since they last ran (and they are not running already).  True if they ran."""
    mail = arena._mail
    if not mail.drain_requested or mail.draining:
        return False
    mail.drain_requested = False
    mail.draining = True
    try:
        for fn in drain_requests:
            fn(arena)
    finally:
        mail.draining = False
    return True
