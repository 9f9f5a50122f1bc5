"""reclaim: the low-memory path (``vm_lowmem``) and the protocol drain routines
(the seed's ``mb_reclaim``).

When the arena's free pages fall under ``vm.v_free_min`` an mbuf allocation that
failed runs ``vm_lowmem`` (at most once a second per arena, from whichever process
notices) and tries once more; so does the keg manager, which watches the free pages
(``layers.register_lowmem_pages``).  ``vm_lowmem`` invokes the ``vm_lowmem`` event:
first ``mb_reclaim`` (registered with EVENTHANDLER_PRI_FIRST, as in the seed), which
calls every protocol drain routine registered in this process, then any other
handler; then UMA's reclaim: the packet zone gives its clusters back, and
``arena.reclaim()`` drains this CPU's caches and every zone's depot and gives empty
slabs back to the arena.

Low memory reaches every process, as FreeBSD's walks every domain: the keg manager's
reclaim runs its own vm_lowmem and posts a drain request (MSG_DRAIN) to every CPU,
which gives its caches back and, at its next poll or recv -- or at its next failed
mbuf allocation -- invokes its own ``vm_lowmem`` handlers (``lowmem_request``): the
protocol drains registered in that process run there.

Counted in the MBS words: LOWMEM (vm_lowmem events where they were detected), DRAINS
(``m_drain``: every call of a protocol drain routine that ran, in any process --
FreeBSD 5.3-9 never counted it, 4.x and 5.0-5.2 once per reclaim), and the arena's
RECLAIMS / SLABS_RELEASED.
"""

from __future__ import annotations

import time

from .. import layout as L
from .. import layers
from ..layers import views
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
    """The seed's ``mb_reclaim``: call every protocol drain routine registered in this
    process; each call counts in ``m_drain``.  No lock may be held (drain routines
    take their own)."""
    ran = 0
    try:
        for fn in list(_drains):
            ran += 1
            fn(arena)
    finally:
        if ran:
            ctx(arena).count("DRAINS", ran)


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


def lowmem_request(arena) -> None:
    """The keg manager asked this CPU for a drain (its low-memory reclaim): invoke
    this process's ``vm_lowmem`` handlers -- ``mb_reclaim`` and its protocol drains
    first -- and give the packet zone's clusters back (the caches went back when the
    request was taken).  The event was counted where it was detected."""
    c = ctx(arena)
    if c.in_lowmem:
        return
    c.in_lowmem = True
    try:
        eventhandler_invoke("vm_lowmem", arena)
        c.zpack.drain()
    finally:
        c.in_lowmem = False


def _v_free_min(arena) -> int:
    """The keg manager's low-memory threshold from this layer: vm.v_free_min."""
    return views(arena).w[L.MBS_WORD + _MBS["V_FREE_MIN"]]


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


layers.register_lowmem(vm_lowmem)        # the keg manager's low-memory reclaim, when
layers.register_lowmem_pages(_v_free_min)   # free pages fall under vm.v_free_min too;
layers.register_drain_request(lowmem_request)   # and every other CPU's, by message
