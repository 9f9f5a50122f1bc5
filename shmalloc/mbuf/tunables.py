"""tunables: the tunables, sysctls and event handlers of the mbuf layer (the seed's
``TUNABLE_INT``s, ``sysctl_nmbclusters`` ... in ``kern_mbuf.c``, and ``EVENTHANDLER_*``).

Tunables are given once, at ``Arena.create(..., tunables={...})``, checked by
``validate`` and stored in the header's TUN words (``store``).  The first process that
uses mbufs on the arena computes the values in force from them (``limits``, where the
defaults and their formulas are) and writes them to the MBS words, where ``sysctl``
reads and raises them.

Sysctls (``sysctl(arena, name[, value])``), as the seed's handlers
(``sysctl_nmbclusters`` ... of FreeBSD 7/8): a limit takes a value strictly greater
than the one in force; anything else -- the same value, a lower one, 0, a negative
one -- is refused with EINVAL and changes nothing.  So a limit never falls and is
never cleared to 0 (unlimited) at run time, while a zone booted unlimited (a tunable
of 0) takes any positive value, which imposes a limit even below the items already
in use (``Zone.set_max(below_use=True)``: FreeBSD's ``uma_zone_set_max`` only caps
further allocation).  A new limit is applied to its zone at once and
``nmbclusters_change`` (``nmbufs_change``) is invoked.  ``kern.ipc.maxmbufmem`` and
``kern.maxusers`` are read-only at run time (EPERM); ``vm.v_free_min`` (the
low-memory threshold in pages) takes any value.  Unknown names fail with ENOENT.
(The jumbo limits, ``kern.ipc.nmbufs`` and their tunables are FreeBSD 9's; they
follow the seed's rule too.)

Event handlers are process-local, like FreeBSD's are kernel-local: a handler registered
in this process runs when this process invokes the event (``fn(arg, arena)``).
"""

from __future__ import annotations

import errno
import itertools

from .. import layout as L
from .. import layers
from ..layers import views
from .constants import (MBUF_CLUSTER_MEM_NAME, MBUF_JUMBO9_MEM_NAME, MBUF_JUMBO16_MEM_NAME,
                        MBUF_JUMBOP_MEM_NAME, MBUF_MEM_NAME, MHLEN)
from .errors import SysctlError
from .limits import ensure_tuned
from .zones import ctx

_TUN, _MBS = L.TUN, L.MBS

# sysctl name -> (field in TUN and MBS, mode, zone it limits, event fired on a raise)
SYSCTLS = {
    "kern.ipc.nmbclusters": ("NMBCLUSTERS", "raise", MBUF_CLUSTER_MEM_NAME, "nmbclusters_change"),
    "kern.ipc.nmbjumbop": ("NMBJUMBOP", "raise", MBUF_JUMBOP_MEM_NAME, None),
    "kern.ipc.nmbjumbo9": ("NMBJUMBO9", "raise", MBUF_JUMBO9_MEM_NAME, None),
    "kern.ipc.nmbjumbo16": ("NMBJUMBO16", "raise", MBUF_JUMBO16_MEM_NAME, None),
    "kern.ipc.nmbufs": ("NMBUFS", "raise", MBUF_MEM_NAME, "nmbufs_change"),
    "kern.ipc.maxmbufmem": ("MAXMBUFMEM", "rdtun", None, None),
    "kern.maxusers": ("MAXUSERS", "rdtun", None, None),
    "vm.v_free_min": ("V_FREE_MIN", "rw", None, None),
}
TUNABLE_NAMES = tuple(SYSCTLS)

# the protocol header sizes (uipc_mbuf.c's globals, ``kern.ipc.max_*``): max_linkhdr and
# max_protohdr are set here as a protocol's init sets them in FreeBSD (whose sysctls are
# read-only); max_hdr and max_datalen follow from them (``domain_init``)
HDR_SYSCTLS = {
    "kern.ipc.max_linkhdr": "MAX_LINKHDR",
    "kern.ipc.max_protohdr": "MAX_PROTOHDR",
    "kern.ipc.max_hdr": None,
    "kern.ipc.max_datalen": None,
}
_VALUE_MAX = 1 << 62


# ============================================================================ at create
def _check_value(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SysctlError(errno.EINVAL, f"sysctl {name}: the value must be an int, "
                                        f"not {type(value).__name__}")
    if not 0 <= value < _VALUE_MAX:
        raise SysctlError(errno.EINVAL, f"sysctl {name}: value {value} is outside "
                                        f"0..{_VALUE_MAX - 1}")
    return value


def _spec(name: str):
    spec = SYSCTLS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise SysctlError(errno.ENOENT, f"sysctl: unknown oid {name!r}; known: "
                                        + ", ".join(TUNABLE_NAMES))
    return spec


def validate(tunables) -> dict[str, int]:
    """``{"kern.ipc.nmbclusters": 0, ...}`` -> ``{TUN field: value}``; raises
    SysctlError for an unknown name or a value that is not an int >= 0."""
    if tunables is None:
        return {}
    if not isinstance(tunables, dict):
        raise TypeError(f"tunables must be a dict of sysctl name -> int, not "
                        f"{type(tunables).__name__}")
    return {_spec(name)[0]: _check_value(name, v) for name, v in tunables.items()}


def store(w, fields: dict[str, int]) -> None:
    """Write validated tunables into the header's TUN words.  Called while the arena
    is formatted, before its magic is set (nobody else can see it yet)."""
    base = L.TUN_WORD
    setbits = 0
    for field, v in fields.items():
        w[base + _TUN[field]] = v
        setbits |= 1 << _TUN[field]
    w[base + _TUN["SET"]] = setbits


# ============================================================================ sysctl
def current(core) -> dict[str, int]:
    """Every sysctl's value in force (without making any zone)."""
    ensure_tuned(core)
    return {name: core.w[L.MBS_WORD + _MBS[spec[0]]] for name, spec in SYSCTLS.items()}


def sysctl(arena, name: str, value=None) -> int:
    """Read sysctl ``name``, or set it to ``value`` and return the value in force.

    A limit takes only a value strictly greater than the one in force (FreeBSD 7/8
    ``kern_mbuf.c:sysctl_nmbclusters``): anything else raises SysctlError (EINVAL)
    and changes nothing.  A new limit is applied to the zone at once -- below the
    items in use too, when the zone was unlimited -- waking sleepers that now fit,
    and fires the sysctl's event.
    """
    field, mode, zone_name, event = _spec(name)
    core = views(arena)
    arena._check_open()
    ensure_tuned(core)
    word = L.MBS_WORD + _MBS[field]
    w = core.w
    if value is None:
        return w[word]
    value = _check_value(name, value)
    if mode == "rdtun":
        raise SysctlError(errno.EPERM, f"sysctl: oid {name!r} is a read only tunable "
                                       f"(set it with Arena.create(tunables=...))")
    if zone_name is not None:
        ctx(arena)                       # the zones exist before the limit moves
    with core.lock(L.VM_LOCK):
        old = w[word]
        if mode == "raise" and not value > old:
            why = ("a limit is never cleared to 0 (unlimited) at run time" if value == 0
                   else f"the limit is {old}: it may only be raised, to a greater value")
            raise SysctlError(errno.EINVAL, f"sysctl {name}={value}: Invalid argument "
                                            f"({why})")
        changed = value != old
        if changed:
            w[word] = value
            w[L.MBS_WORD + _MBS["SYSCTL_GEN"]] = L.next_gen(w[L.MBS_WORD + _MBS["SYSCTL_GEN"]])
    if not changed:
        return value
    if zone_name is not None:
        zone = arena.zone(zone_name)
        while True:                      # a racing raise may land between: converge
            v = w[word]
            zone.set_max(v, below_use=True)
            if w[word] == v:
                break
    if event is not None:
        eventhandler_invoke(event, arena)
    return w[word]


def hdr_sysctl(arena, name: str, value=None) -> int:
    """``kern.ipc.max_linkhdr`` and ``kern.ipc.max_protohdr`` (read, or set to any value
    that leaves ``max_datalen = MHLEN - max_linkhdr - max_protohdr`` at least 1: FreeBSD
    panics at boot otherwise, here EINVAL); ``kern.ipc.max_hdr`` (their sum) and
    ``kern.ipc.max_datalen`` are read-only (EPERM)."""
    core = views(arena)
    arena._check_open()
    ensure_tuned(core)
    w = core.w
    lw, pw = L.MBS_WORD + _MBS["MAX_LINKHDR"], L.MBS_WORD + _MBS["MAX_PROTOHDR"]
    field = HDR_SYSCTLS[name]
    if value is None:
        if field is not None:
            return w[L.MBS_WORD + _MBS[field]]
        hdr = w[lw] + w[pw]
        return hdr if name == "kern.ipc.max_hdr" else MHLEN - hdr
    if field is None:
        raise SysctlError(errno.EPERM, f"sysctl: oid {name!r} is read only (it follows "
                                       f"from kern.ipc.max_linkhdr and max_protohdr)")
    value = _check_value(name, value)
    with core.lock(L.VM_LOCK):
        other = w[pw] if field == "MAX_LINKHDR" else w[lw]
        if MHLEN - (value + other) < 1:
            raise SysctlError(errno.EINVAL, f"sysctl {name}={value}: Invalid argument "
                                            f"(max_linkhdr + max_protohdr must stay below "
                                            f"MHLEN, {MHLEN})")
        w[L.MBS_WORD + _MBS[field]] = value
    return value


# ============================================================================ event handlers
EVENTHANDLER_PRI_FIRST = 0
EVENTHANDLER_PRI_ANY = 10000
EVENTHANDLER_PRI_LAST = 20000
EVENTS = ("nmbclusters_change", "nmbufs_change", "vm_lowmem")

_handlers: dict[str, list] = {e: [] for e in EVENTS}
_seq = itertools.count()


def eventhandler_register(name: str, fn, arg=None, priority: int = EVENTHANDLER_PRI_ANY):
    """Call ``fn(arg, arena)`` whenever this process invokes event ``name``
    (lowest priority first, then registration order).  Returns a tag for
    ``eventhandler_deregister``."""
    if name not in _handlers:
        raise ValueError(f"unknown event {name!r}; events are {', '.join(EVENTS)}")
    if not callable(fn):
        raise TypeError(f"an event handler is a callable, not {type(fn).__name__}")
    tag = (priority, next(_seq), fn, arg)
    _handlers[name].append(tag)
    _handlers[name].sort(key=lambda t: t[:2])
    return tag


def eventhandler_deregister(name: str, tag) -> None:
    try:
        _handlers[name].remove(tag)
    except (KeyError, ValueError):
        raise ValueError(f"no handler {tag!r} is registered for event {name!r}") from None


def eventhandler_invoke(name: str, arena) -> int:
    """Run the handlers of ``name``; returns how many ran."""
    hs = list(_handlers[name])
    for _, _, fn, arg in hs:
        fn(arg, arena)
    return len(hs)


# the sysctl names and boot-time tunables of this layer, served through the core's
# Arena.sysctl and Arena.create(tunables=...)
layers.register_sysctl(SYSCTLS, sysctl)
layers.register_sysctl(HDR_SYSCTLS, hdr_sysctl)
layers.register_tunables(validate, store)
