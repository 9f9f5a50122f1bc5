"""limits: the limits the mbuf zones start with -- the seed's ``tunable_mbinit``
(``kern_mbuf.c``), which runs before ``mbuf_init`` makes the zones.

The values in force are computed once per arena, by the first process that uses mbufs
on it (``ensure_tuned``), from the arena's size and the tunables it was created with
(the header's TUN words, written by ``tunables.store``), and written to the MBS words,
where ``tunables.sysctl`` reads and raises them and ``zones.mbuf_init`` takes the
zone limits from.

Defaults (the seed's ``tunable_mbinit``, FreeBSD 7/8; ``reference/uma_mbuf.md`` §3.3)::

    maxusers    = clamp(physpages / (2 MiB / PAGE_SIZE), 32, 384)   subr_param.c
    nmbclusters = 1024 + maxusers * 64
    nmbjumbop   = nmbclusters / 2,  nmbjumbo9 = nmbjumbop / 2,  nmbjumbo16 = nmbjumbo9 / 2
    maxmbufmem  = realmem / 2  (a tunable is capped at realmem / 4 * 3)
    nmbufs      = max(maxmbufmem / MSIZE / 5, sum of the four cluster limits)
    v_free_min  = 4 + (physpages - 1024) / 200  (4 below 1024 pages)   vm_pageout.c

where the arena plays the machine: ``physpages`` is its size in pages and ``realmem``
its size in bytes.  As in the seed, the jumbo limits derive from the *computed*
nmbclusters, before a ``kern.ipc.nmbclusters`` tunable overrides it.  A tunable of 0
makes the limit unlimited (``kern.maxusers = 0``: derive it).
"""

from __future__ import annotations

from .. import layout as L
from .constants import MSIZE

_TUN, _MBS = L.TUN, L.MBS

MAXUSERS_MIN, MAXUSERS_MAX = 32, 384
# max_linkhdr and max_protohdr (uipc_mbuf.c globals, kern.ipc.max_*): FreeBSD's
# domaininit raises max_linkhdr to 16 and tcp_init max_protohdr to 40 or 60 once a
# protocol is attached; here no protocol is, so max_protohdr starts at 0 (the sysctl
# sets it, as the protocol's init would)
MAX_LINKHDR, MAX_PROTOHDR = 16, 0


# ============================================================================ defaults
def maxusers_for(size: int) -> int:
    """FreeBSD 7's ``init_param2`` (``kern/subr_param.c``): one "user" per 2 MiB of
    physical memory, at least 32 and at most 384; the arena's size is the memory."""
    physpages = size // L.PAGE_SIZE
    return min(max(physpages // (2 * 1024 * 1024 // L.PAGE_SIZE), MAXUSERS_MIN), MAXUSERS_MAX)


def v_free_min_for(size: int) -> int:
    """FreeBSD's ``vm_pageout_init``: pages kept free before vm_lowmem fires."""
    npages = size // L.PAGE_SIZE
    return 4 + (npages - 1024) // 200 if npages > 1024 else 4


def compute(size: int, given: dict[str, int]) -> dict[str, int]:
    """The values in force for an arena of ``size`` bytes with tunables ``given``
    (MBS field -> value).  Pure: see the module docstring for the formulas."""
    maxusers = given.get("MAXUSERS") or maxusers_for(size)
    nmbclusters = 1024 + maxusers * 64
    nmbjumbop = nmbclusters // 2
    nmbjumbo9 = nmbjumbop // 2
    nmbjumbo16 = nmbjumbo9 // 2
    nmbclusters = given.get("NMBCLUSTERS", nmbclusters)
    nmbjumbop = given.get("NMBJUMBOP", nmbjumbop)
    nmbjumbo9 = given.get("NMBJUMBO9", nmbjumbo9)
    nmbjumbo16 = given.get("NMBJUMBO16", nmbjumbo16)
    realmem = size
    maxmbufmem = min(given.get("MAXMBUFMEM", realmem // 2), realmem // 4 * 3)
    clusters = (nmbclusters, nmbjumbop, nmbjumbo9, nmbjumbo16)
    need = sum(clusters) if all(clusters) else 0
    nmbufs = given.get("NMBUFS", -1)
    if nmbufs != 0 and nmbufs < need or nmbufs < 0:
        nmbufs = max(maxmbufmem // MSIZE // 5, need)
    return {"MAXUSERS": maxusers, "NMBCLUSTERS": nmbclusters, "NMBJUMBOP": nmbjumbop,
            "NMBJUMBO9": nmbjumbo9, "NMBJUMBO16": nmbjumbo16, "NMBUFS": nmbufs,
            "MAXMBUFMEM": maxmbufmem,
            "V_FREE_MIN": given.get("V_FREE_MIN", v_free_min_for(size)),
            "MAX_LINKHDR": MAX_LINKHDR, "MAX_PROTOHDR": MAX_PROTOHDR}


# ============================================================================ once per arena
def given(w) -> dict[str, int]:
    """The tunables the arena was created with (TUN field -> value)."""
    base = L.TUN_WORD
    setbits = w[base + _TUN["SET"]]
    return {f: w[base + i] for f, i in _TUN.items() if f != "SET" and setbits >> i & 1}


def ensure_tuned(core) -> None:
    """``tunable_mbinit``: compute the values in force once per arena.
    Lock: takes vm (nothing else held)."""
    w = core.w
    if w[L.MBS_WORD + _MBS["STATE"]] >= L.MBS_TUNED:
        return
    with core.lock(L.VM_LOCK):
        if w[L.MBS_WORD + _MBS["STATE"]] >= L.MBS_TUNED:
            return
        for field, v in compute(core.geometry.size, given(w)).items():
            w[L.MBS_WORD + _MBS[field]] = v
        w[L.MBS_WORD + _MBS["STATE"]] = L.MBS_TUNED
