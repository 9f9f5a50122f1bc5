"""reclaim: the low-memory path (``vm_lowmem``) and the protocol drain routines
(the seed's ``mb_reclaim``).

When the arena's free pages fall under ``vm.v_free_min`` an mbuf allocation that
failed runs ``vm_lowmem`` (at most once a second per arena, from whichever process
notices) and tries once more.  ``vm_lowmem`` invokes the ``vm_lowmem`` event: first
``mb_reclaim`` (registered with EVENTHANDLER_PRI_FIRST, as in the seed), which calls
every protocol drain routine registered in this process, then any other handler;
then UMA's reclaim: the packet zone gives its clusters back, and ``arena.reclaim()``
drains this CPU's caches and every zone's depot and gives empty slabs back to the
arena.  Counted in the MBS words (LOWMEM events, DRAINS = mb_reclaim calls, the
seed's ``m_drain``) and the arena's RECLAIMS / SLABS_RELEASED.

Other processes' bucket caches are theirs (no IPC here): they give back what they
cache when they next drain, close, or run vm_lowmem themselves.
"""

from __future__ import annotations

import time

from .. import layout as L
from .. import layers
from .tunables import EVENTHANDLER_PRI_FIRST, eventhandler_invoke, eventhandler_register
from .zones import ctx

_drains: list = []
_MBS = L.MBS


def pr_drain_register(fn) -> None:
    """Register a protocol drain routine ``fn(arena)``, called by mb_reclaim (the
    seed's walk over every domain's ``pr_drain``).  Process-local."""
    if not callable(fn):
        raise TypeError(f"a drain routine is a callable, not {type(fn).__name__}")
    if fn not in _drains:
        _drains.append(fn)


def pr_drain_deregister(fn) -> None:
    try:
        _drains.remove(fn)
    except ValueError:
        raise ValueError(f"drain routine {fn!r} is not registered") from None


def mb_reclaim(arg, arena) -> None:
    """The seed's ``mb_reclaim``: call every protocol drain routine.  No lock may be
    held (drain routines take their own)."""
    ctx(arena).count("DRAINS")
    for fn in list(_drains):
        fn(arena)


def vm_lowmem(arena) -> int:
    """Run the low-memory path now; returns the slabs given back to the arena."""
    c = ctx(arena)
    w = c.w
    with c.core.lock(L.VM_LOCK):
        w[L.MBS_WORD + _MBS["LOWMEM"]] += 1
        w[L.MBS_WORD + _MBS["LOWMEM_NS"]] = time.monotonic_ns()
    c.in_lowmem = True
    try:
        eventhandler_invoke("vm_lowmem", arena)
        c.zpack.drain()                  # cached packets give their clusters back first
        return arena.reclaim()
    finally:
        c.in_lowmem = False


def lowmem_check(c) -> bool:
    """An mbuf allocation failed: if free pages are under vm.v_free_min and no
    vm_lowmem ran in the last second, run it.  True if it ran."""
    w = c.w
    if c.in_lowmem or w[L.HDR["FREE_PAGES"]] >= w[L.MBS_WORD + _MBS["V_FREE_MIN"]]:
        return False
    if time.monotonic_ns() - w[L.MBS_WORD + _MBS["LOWMEM_NS"]] < 1_000_000_000:
        return False
    vm_lowmem(c.arena)
    return True


eventhandler_register("vm_lowmem", mb_reclaim, None, EVENTHANDLER_PRI_FIRST)


layers.register_lowmem(vm_lowmem)        # the keg manager's low-memory reclaim
