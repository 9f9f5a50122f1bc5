"""The mbuf layer's share of recovering a dead CPU: a pass the keg manager runs
before ``shmalloc.recovery.recover_cpu`` (a stopgap until recovery does it).

What ``recover_cpu`` leaves wrong for mbufs, and what this pass does about it:

1. It leaves the clusters a dead CPU held (those attached to the packets it
   imported, wherever the packets are now) tagged with its slot, which ``check``
   reports as "held by CPU n, which is not live" once the slot is free -- and
   which a later CPU taking the same slot would appear to hold.  Here: a
   cluster allocated and held by the dead CPU becomes held by no CPU (it is
   owned through the mbufs that point at it), as ``Arena.close`` does.

2. It re-tags every allocated item of the dead CPU under the zone lock held for
   the whole walk of the keg.  A live CPU freeing one of those items meanwhile
   (free-anywhere: the last copy of a cluster frees the packet the dead CPU set
   aside) read the tag before the walk and compares it under that lock, finds it
   changed, and is refused (BadHandleError) -- after the mbuf layer already
   marked the packet as no longer waiting, so recovery then frees it as a sole
   packet and the copy's retry is a double free.  Here every re-tag takes the
   zone lock for that one item only, and a packet that copies are still
   releasing is left to them, never freed here:

       packet waiting for its copies (MT_NOTMBUF), or with refcount 1 while
           another allocated mbuf still points at its cluster (the last copy is
           freeing it right now)           -> held by no CPU: the copies free it
       a copy whose reference is already gone (its CPU died inside m_free after
           dropping it: the packet is free, or holds its own reference and the
           count is 1)                     -> taken over, freed without dropping
                                              the reference a second time
       any other packet, any mbuf          -> taken over by the manager, m_free
       packet importing (IMPORT) with a cluster attached (the CPU died inside
           mb_zinit_pack after the cluster came: m_ext names the packet as owner
           and a cluster the dead CPU holds) -> FINI, so that recovery runs
           mb_zfini_pack, which gives the cluster back instead of losing it

What this pass cannot tell: a copy whose CPU died inside m_free after a
decrement that was not the last (the count still looks right).  Its reference is
dropped a second time -- the mbuf layer has to make that step recoverable.  An
mbuf whose m_free fails here stays allocated and held by the manager; the failure
is in the counts (``errors``) and the manager's log.

A free-anywhere on a live CPU can still lose the (now microseconds wide) race
against one of these re-tags; nothing has changed then, and the workers' free
retries once (``workloads._MbufWork.free``).

What is left to ``recover_cpu``: items cached, in the depot, importing without a
cluster, being finalised, items handed to the CPU after this pass, and every
zone that is not an mbuf zone.
"""

from __future__ import annotations

from shmalloc import layout as L
from shmalloc import recovery, slots

MBUF_ZONES = ("mbuf", "mbuf_packet")
CLUSTER_ZONES = ("mbuf_cluster", "mbuf_jumbo_page", "mbuf_jumbo_9k", "mbuf_jumbo_16k")


def recover_mbufs(arena, cpu: int, dead=()) -> dict:
    """Run the pass for dead CPU ``cpu`` on the manager's ``arena``; ``dead``: every
    CPU found dead in this round (their copies may be half made or half freed and
    say nothing about a packet's other references).  Returns
    counts: freed (mbufs m_free'd), waiting (packets left to their copies),
    unfinished (importing packets sent through fini), clusters (left to their
    mbufs)."""
    counts = dict.fromkeys(("freed", "waiting", "stale", "unfinished", "clusters"), 0)
    names = set(arena.zones())
    if not {*MBUF_ZONES, "mbuf_cluster"} <= names:
        return counts
    from shmalloc import mbuf as mb
    from shmalloc.mbuf.zones import (EXT_BUF, EXT_OWNER, EXT_REFCNT, EXT_TYPE, FLAGS,
                                     M_PKTDAT, TYPE, ctx)

    core = arena._core
    w, u32, mv = core.w, core.tags, core.mv
    slots.close_mailbox(core, cpu, arena.cpu_id)   # nothing more is handed to it
    owners = _referenced_packets(arena, arena.zone("mbuf"), {cpu, *dead}, EXT_OWNER,
                                 EXT_TYPE, FLAGS, mb.EXT_PACKET, mb.M_EXT)
    mine = L.tag(L.TAG_ALLOC, 0, arena.cpu_id, arena.cpu_id)
    to_free = []

    def attached(h) -> bool:
        """Packet ``h`` (importing) has a cluster of its own attached: its m_ext
        names it as owner and a cluster the dead CPU holds allocated."""
        i = h >> 3
        cl = w[i + EXT_BUF]
        if not cl or w[i + EXT_OWNER] != h or w[i + EXT_TYPE] not in (mb.EXT_CLUSTER,
                                                                      mb.EXT_PACKET):
            return False
        zclust = arena.zone("mbuf_cluster")
        base = zclust.keg.slab_of(cl)
        if base < 0 or (cl - base) % zclust.keg.rsize:
            return False
        t = u32[zclust.keg.tag_index(base, (cl - base) // zclust.keg.rsize)]
        return (L.tag_state(t) == L.TAG_ALLOC and L.tag_zidx(t) == zclust.zidx
                and L.tag_holder(t) == cpu)

    zpack = arena.zone("mbuf_packet")

    def stale(h) -> bool:
        """Copy ``h`` points at a packet's cluster whose reference it no longer
        holds: its CPU died inside m_free after the last reference went (the
        packet is free already), or the packet holds its own reference and the
        count is 1 (so it is the packet's) -- unless the packet was set aside for
        its copies (held by no CPU: its own reference is gone; the copy was
        releasing it when its CPU died).  Such a copy is freed without dropping a
        reference again."""
        i = h >> 3
        if not w[i + FLAGS] & mb.M_EXT or w[i + EXT_TYPE] != mb.EXT_PACKET:
            return False
        owner = w[i + EXT_OWNER]
        base = zpack.keg.slab_of(owner)
        if base < 0 or (owner - base) % zpack.keg.rsize:
            return True
        t = u32[zpack.keg.tag_index(base, (owner - base) // zpack.keg.rsize)]
        if L.tag_state(t) not in (L.TAG_ALLOC, L.TAG_INFLIGHT) or L.tag_zidx(t) != zpack.zidx:
            return True                      # (a packet in flight is allocated too)
        if L.tag_holder(t) == L.NO_CPU:     # set aside for its copies (by a pass before
            return False                     # this one): this copy's reference counts
        return w[(owner >> 3) + TYPE] != mb.MT_NOTMBUF and u32[w[i + EXT_REFCNT] >> 2] <= 1

    def releasing(h) -> bool:
        """Packet ``h`` is being freed by the last copy of its cluster, on another
        CPU: set aside (``_limbo`` cleared its M_PKTHDR), then marked MT_DATA again
        by that copy, which frees it next; its count is 1 and a copy points at it."""
        i = h >> 3
        return (u32[w[i + EXT_REFCNT] >> 2] == 1 and h in owners
                and not w[i + FLAGS] & mb.M_PKTHDR)

    def mbuf(zone, h, tv):
        i = h >> 3
        if L.tag_state(tv) == L.TAG_IMPORT:
            if zone.name == "mbuf_packet" and attached(h):
                counts["unfinished"] += 1
                return (tv & ~L.TAG_STATE_MASK) | L.TAG_FINI
            return None
        if zone.name == "mbuf_packet" and (
                w[i + TYPE] == mb.MT_NOTMBUF or releasing(h)):
            counts["waiting"] += 1
            return _nobody(zone, tv)
        if zone.name == "mbuf" and stale(h):
            counts["stale"] += 1
            mv[h + M_PKTDAT:h + mb.MSIZE] = bytes(mb.MSIZE - M_PKTDAT)
            w[i + FLAGS] &= ~mb.M_EXT
        to_free.append(h)
        return mine | zone.zidx << 4

    def cluster(zone, h, tv):
        counts["clusters"] += 1
        return _nobody(zone, tv)

    for name in MBUF_ZONES:
        _retag(arena, arena.zone(name), cpu, (L.TAG_ALLOC, L.TAG_INFLIGHT, L.TAG_IMPORT), mbuf)
    for name in CLUSTER_ZONES:
        if name in names:
            _retag(arena, arena.zone(name), cpu, (L.TAG_ALLOC,), cluster)
    c = ctx(arena)
    errors = []
    for h in to_free:                      # no lock held: m_free takes what it needs
        try:
            mb.m_free(mb.Mbuf._wrap(c, h))
            counts["freed"] += 1
        except Exception as e:  # noqa: BLE001 - the others are freed all the same
            errors.append(f"mbuf {h}: {e!r}")
    if errors:
        counts["errors"] = errors
    return counts


def _referenced_packets(arena, zmbuf, dead, EXT_OWNER, EXT_TYPE, FLAGS, EXT_PACKET,
                        M_EXT) -> set:
    """Packets that an allocated copy (an mbuf of the mbuf zone) held by a CPU not
    in ``dead`` points at (a dead CPU's copies may be half made or half freed:
    they are judged one by one)."""
    core = arena._core
    w, tags = core.w, core.tags
    keg = zmbuf.keg
    out = set()
    for _, base in keg.slabs():
        t0 = (base + keg.tagoff) >> 2
        for k, tv in enumerate(tags[t0:t0 + keg.ipers]):
            if (L.tag_state(tv) == L.TAG_ALLOC and L.tag_zidx(tv) == zmbuf.zidx
                    and L.tag_holder(tv) not in dead):
                i = (base + k * keg.rsize) >> 3
                if w[i + FLAGS] & M_EXT and w[i + EXT_TYPE] == EXT_PACKET:
                    out.add(w[i + EXT_OWNER])
    return out


def _nobody(zone, tv) -> int:
    """``tv`` as an allocated item of ``zone`` held by no CPU."""
    return L.tag(L.TAG_ALLOC, zone.zidx, L.NO_CPU, L.tag_home(tv))


def _retag(arena, zone, cpu, states, new_tag) -> None:
    """For each item of ``zone`` held by ``cpu`` in one of ``states``, write
    ``new_tag(zone, handle, tag)`` (None: leave it).  The walk takes no lock (the
    tags of a dead CPU's items change only by take-overs, which the re-check
    sees); each re-tag holds the zone lock for that item alone."""
    core = arena._core
    keg = zone.keg
    found = [(ti, tv) for ti, tv in keg.held_by(cpu)
             if L.tag_zidx(tv) == zone.zidx and L.tag_state(tv) in states]
    lk = core.lock(zone._lock_index)
    for ti, tv in found:
        lk.acquire(owner_id=arena.cpu_id)
        try:
            if core.tags[ti] != tv:              # taken over since the walk
                continue
            new = new_tag(zone, recovery._handle_of(keg, ti), tv)
            if new is not None:
                core.tags[ti] = new
        finally:
            lk.release()
