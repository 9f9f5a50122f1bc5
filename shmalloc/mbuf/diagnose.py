"""Describing the mbuf layer's items for a failure message: which allocated mbufs
and packets nobody accounts for, which clusters no packet points at.

For harnesses and tests that count what the living hold (``shmalloc chaos``, the
kill tests) and must say, when the counts disagree, what the extra items are: their
holder (named through ``roles``: CPU slot -> who), tag state, and the words of the
mbuf header that tell how it got there.  Read-only: nothing here changes a tag or
a header, and no lock is taken -- the tags are read as a walk of the slabs the page
table maps passes them (``Keg.items`` over ``Keg.slab_bases``), which is exact on a
quiesced arena and a snapshot on a live one.
"""

from __future__ import annotations

from .. import layout as L
from ..layers import views
from .zones import BTYPE, EXT_BUF, EXT_OWNER, EXT_REFCNT, FLAGS, FLAGS_MASK

_USED = (L.TAG_ALLOC, L.TAG_INFLIGHT)
# a packet in one of these states accounts for its cluster
_PACKET_STATES = (L.TAG_ALLOC, L.TAG_INFLIGHT, L.TAG_CACHED, L.TAG_DEPOT, L.TAG_XFREE)


def describe_unaccounted(arena, known, roles) -> str:
    """The allocated mbuf-zone items whose handles are not in ``known``
    (``describe_unheld``), then the clusters no packet points at
    (``describe_clusters``), one line each; "" when there are none.  Lock: none."""
    return "\n".join(filter(None, (describe_unheld(arena, known, roles),
                                    describe_clusters(arena, roles))))


def describe_unheld(arena, known, roles, limit: int = 8) -> str:
    """Allocated (or in flight) items of the packet and mbuf zones whose handles
    are not in ``known``: holder (and its role), tag state, and the mbuf's type,
    flags, refcount and cluster owner; at most ``limit`` lines.  Lock: none."""
    core = views(arena)
    w, u32, mv = core.w, core.tags, core.mv
    out = []
    for zname in ("mbuf_packet", "mbuf"):
        if zname not in arena.zones():
            continue
        z = arena.zone(zname)
        for h, _, tv in z.keg.items(z.keg.slab_bases(), zidx=z.zidx, states=_USED):
            if h in known:
                continue
            cpu = L.tag_holder(tv)
            i = h >> 3
            typ = mv[h + BTYPE]
            aside = " (MT_NOTMBUF: set aside for its copies)" if typ == 0 else ""
            out.append(f"{zname} {h}: {L.TAG_STATE_NAMES[L.tag_state(tv)]} held by CPU "
                       f"{cpu} ({roles.get(cpu, 'no live process')}), type {typ}{aside}, "
                       f"flags {w[i + FLAGS] & FLAGS_MASK:#x}, refcount {u32[w[i + EXT_REFCNT] >> 2]}, "
                       f"owner {w[i + EXT_OWNER]}")
            if len(out) >= limit:
                return "\n".join(out)
    return "\n".join(out)


def describe_clusters(arena, roles, limit: int = 8) -> str:
    """Allocated clusters that no packet (allocated, in flight, cached, in the depot
    or on its way home) points at: the cluster's holder and every packet-zone item
    that points at it, with its state; at most ``limit`` lines.  Lock: none."""
    if not {"mbuf_packet", "mbuf_cluster"} <= set(arena.zones()):
        return ""
    core = views(arena)
    w, mv = core.w, core.mv

    def items(zone):
        keg = zone.keg
        for h, _, tv in keg.items(keg.slab_bases(), zidx=zone.zidx):
            yield h, tv

    by_cluster: dict[int, list] = {}
    for h, tv in items(arena.zone("mbuf_packet")):
        by_cluster.setdefault(w[(h >> 3) + EXT_BUF], []).append((h, tv))
    out = []
    for cl, tv in items(arena.zone("mbuf_cluster")):
        if L.tag_state(tv) != L.TAG_ALLOC:
            continue
        packets = by_cluster.get(cl, [])
        if any(L.tag_state(ptv) in _PACKET_STATES for _, ptv in packets):
            continue
        cpu = L.tag_holder(tv)
        seen = "; ".join(f"packet {h}: {L.TAG_STATE_NAMES[L.tag_state(ptv)]} held by CPU "
                         f"{L.tag_holder(ptv)} ({roles.get(L.tag_holder(ptv), 'no live process')})"
                         f", type {mv[h + BTYPE]}, flags {w[(h >> 3) + FLAGS] & FLAGS_MASK:#x}, owner "
                         f"{w[(h >> 3) + EXT_OWNER]}" for h, ptv in packets)
        out.append(f"mbuf_cluster {cl}: alloc held by CPU {cpu} "
                   f"({roles.get(cpu, 'no live process')}); "
                   + (seen or "no packet-zone item points at it"))
        if len(out) >= limit:
            break
    return "\n".join(out)
