"""The mbuf layer's share of recovering a dead CPU: a pass registered with the core's
recovery (``shmalloc.recovery.register_pass``), run before ``recover_cpu``.

What ``recover_cpu`` leaves wrong for mbufs, and what this pass does about it:

1. It leaves the clusters a dead CPU held (those attached to the packets it
   imported, wherever the packets are now) tagged with its slot, which ``check``
   reports as "held by CPU n, which is not live" once the slot is free -- and
   which a later CPU taking the same slot would appear to hold.  Here: a
   cluster allocated and held by the dead CPU becomes held by no CPU (it is
   owned through the mbufs that point at it), as ``Arena.close`` does.

2. It re-tags every allocated item of the dead CPU under the zone lock held for
   the whole walk of the keg, and frees packets that are not its to free.  Here
   every re-tag takes the zone lock for that one item only (a free-anywhere on a
   live CPU that read the tag before may still take an item given to nobody:
   ``zone._take_over``), and a packet is judged by the one word that says whether
   it was set aside (its type, written under the refcount lock: a set-aside packet
   keeps its own reference until its last copy frees it, ``refs.drop_ref``):

       packet set aside (MT_NOTMBUF), copies left (count > 1), or its last copy
           on a CPU that is not dead still points at it (freeing it)
                                           -> held by no CPU: the copies free it
       packet set aside, count 1, no copy of a living CPU points at it (its last
           copy died freeing it)           -> freed here, with its cluster
       a copy whose reference is already gone (count 1: the packet's own, or the
           packet is free: its CPU died inside m_free after the drop)
                                           -> taken over, freed without dropping
                                              the reference a second time (and
                                              the packet it was freeing with it)
       an mbuf whose last reference to m_extadd storage was being dropped
           (M_EXT with its count forgotten: the mark ``refs.drop_ref`` writes
           first; or its m_ext zeroed by m_free before M_EXT was cleared)
                                           -> taken over, its m_ext cleared, freed
                                              without a drop and without calling
                                              the free routine (it may have run:
                                              at most once, see below)
       any other packet, any mbuf          -> taken over by the manager, m_free
       packet importing (IMPORT) with a cluster attached (the CPU died inside
           mb_zinit_pack after the cluster came: m_ext names the packet as owner
           and a cluster the dead CPU holds) -> FINI, so that recovery runs
           mb_zfini_pack, which gives the cluster back instead of losing it
       a cluster the dead CPU holds that no mbuf names (it died between taking
           it and an mbuf naming it, as in mb_zinit_pack before the cluster's
           ctor attached it; or between an mbuf forgetting it and its free, which
           take the cluster over first: mb_zfini_pack, the last drop_ref; or it
           held it bare)                   -> freed (``_claim_unnamed``, under the
                                              cluster zone's lock)

What this pass cannot tell: a copy whose CPU died inside m_free between the
decrement that was not the last and the clearing of its M_EXT (two words of one
locked step: the count still looks right), or a copy whose packet was freed and
already made and copied anew before the pass.  Its reference is dropped a second
time.  An mbuf whose CPU died between the mark of a last m_extadd drop and the free
routine taking its storage (``shmalloc.buffer.free_storage`` takes it over first: a
death after that leaves the storage to ``recover_cpu``): the storage is leaked, as
the routine may have run -- the free routine runs at most once, never twice.  An
mbuf whose m_free fails here stays allocated and held by the manager;
the failure is in the counts (``errors``) and the manager's log.

What is left to ``recover_cpu``: items cached, in the depot, importing without a
cluster, being finalised, items handed to the CPU after this pass, and every
zone that is not an mbuf zone.
"""

from __future__ import annotations

from .. import layout as L
from .. import recovery, slots
from ..layers import views
from .alloc import m_free
from .constants import EXT_CLUSTER, EXT_PACKET, M_EXT, MSIZE, MT_NOTMBUF
from .header import Mbuf
from .refs import _forgotten
from .zones import (BTYPE, EXT_BUF, EXT_OWNER, EXT_REFCNT, EXT_TYPE, FLAGS, M_PKTDAT,
                    PACK_VERIFIED, ctx)

MBUF_ZONES = ("mbuf", "mbuf_packet")
CLUSTER_ZONES = ("mbuf_cluster", "mbuf_jumbo_page", "mbuf_jumbo_9k", "mbuf_jumbo_16k")


def recover_mbufs(arena, cpu: int, dead=()) -> dict:
    """Run the pass for dead CPU ``cpu`` on the manager's ``arena``; ``dead``: every
    CPU found dead in this round (their copies may be half made or half freed and
    say nothing about a packet's other references).  Returns
    counts: freed (mbufs m_free'd), waiting (packets left to their copies), stale
    (copies whose reference was gone, and mbufs whose last m_extadd drop was under
    way, freed without a drop), abandoned (set-aside
    packets whose last copy died freeing them, freed here), unfinished (importing
    packets sent through fini), clusters (left to their mbufs), unnamed (clusters
    no mbuf names, freed here)."""
    counts = dict.fromkeys(("freed", "waiting", "stale", "abandoned", "unfinished",
                            "clusters", "unnamed"), 0)
    names = set(arena.zones())
    if not {*MBUF_ZONES, "mbuf_cluster"} <= names:
        return counts

    core = views(arena)
    w, u32, mv = core.w, core.tags, core.mv
    slots.close_mailbox(core, cpu, arena.cpu_id)   # nothing more is handed to it
    c = ctx(arena)
    for lk in {id(lk): lk for lk in (*c.reflocks.values(), c.extref_lock)}.values():
        lk.acquire(owner_id=arena.cpu_id)          # a refcount step a dead CPU left
        lk.release()                               # is finished when its lock is repaired
    owners = _referenced_packets(arena, arena.zone("mbuf"), {cpu, *dead}, EXT_OWNER,
                                 EXT_TYPE, FLAGS, EXT_PACKET, M_EXT)
    mine = L.tag(L.TAG_ALLOC, 0, arena.cpu_id, arena.cpu_id)
    to_free = []

    def attached(h) -> bool:
        """Packet ``h`` (importing) has a cluster of its own attached: its m_ext
        names it as owner and a cluster the dead CPU holds allocated."""
        i = h >> 3
        cl = w[i + EXT_BUF]
        if not cl or w[i + EXT_OWNER] != h or w[i + EXT_TYPE] not in (EXT_CLUSTER,
                                                                      EXT_PACKET):
            return False
        zclust = arena.zone("mbuf_cluster")
        ti = zclust.keg.tag_index_of(cl)
        if ti < 0:
            return False
        t = u32[ti]
        return (L.tag_state(t) == L.TAG_ALLOC and L.tag_zidx(t) == zclust.zidx
                and L.tag_holder(t) == cpu)

    zpack = arena.zone("mbuf_packet")
    to_free_packets = {}                   # set-aside packets whose copies are all gone

    def packet_of(h):
        """(packet, its tag) that copy ``h`` points at, or (packet, None) when that
        is not an allocated packet any more."""
        owner = w[(h >> 3) + EXT_OWNER]
        ti = zpack.keg.tag_index_of(owner)
        if ti < 0:
            return owner, None
        t = u32[ti]
        if L.tag_state(t) not in (L.TAG_ALLOC, L.TAG_INFLIGHT) or L.tag_zidx(t) != zpack.zidx:
            return owner, None               # (a packet in flight is allocated too)
        return owner, t

    def abandoned(p) -> bool:
        """Packet ``p``, set aside, has no copy left (its count is its own) and no
        copy held by a CPU that is not dead points at it (a live last copy frees
        it): it is recovery's to free."""
        return (mv[p + BTYPE] == MT_NOTMBUF and u32[w[(p >> 3) + EXT_REFCNT] >> 2] == 1
                and p not in owners)

    def stale(h) -> bool:
        """Copy ``h`` points at a packet's cluster whose reference it no longer
        holds: its CPU died inside m_free after its reference went -- the packet is
        free (the copy was the last and freed it), or holds the only reference
        (count 1), set aside (the copy was the last, about to free it: so is
        recovery now) or not.  Such a copy is freed without dropping a reference
        again."""
        i = h >> 3
        if not w[i + FLAGS] & M_EXT or w[i + EXT_TYPE] != EXT_PACKET:
            return False
        p, t = packet_of(h)
        if t is None:
            return True
        if u32[w[i + EXT_REFCNT] >> 2] > 1:
            return False
        if abandoned(p):
            to_free_packets[p] = t
        return True

    def mbuf(zone, h, tv):
        i = h >> 3
        if L.tag_state(tv) == L.TAG_IMPORT:
            if zone.name == "mbuf_packet" and attached(h):
                counts["unfinished"] += 1
                return (tv & ~L.TAG_STATE_MASK) | L.TAG_FINI
            return None
        if zone.name == "mbuf_packet" and mv[h + BTYPE] == MT_NOTMBUF:
            if abandoned(h):                 # its copies are gone: freed here
                to_free_packets[h] = mine | zone.zidx << 4
                return mine | zone.zidx << 4
            counts["waiting"] += 1           # its copies free it
            return _nobody(zone, tv)
        if zone.name == "mbuf" and (stale(h) or _forgotten(w, i)):
            counts["stale"] += 1
            mv[h + M_PKTDAT:h + MSIZE] = bytes(MSIZE - M_PKTDAT)
            w[i + FLAGS] &= ~M_EXT
        to_free.append(h)
        return mine | zone.zidx << 4

    def cluster(zone, h, tv):
        counts["clusters"] += 1
        return _nobody(zone, tv)

    for name in MBUF_ZONES:
        _retag(arena, arena.zone(name), cpu, (L.TAG_ALLOC, L.TAG_INFLIGHT, L.TAG_IMPORT), mbuf)
    unnamed = []                           # clusters of the dead CPU no mbuf names
    for name in CLUSTER_ZONES:
        if name in names:
            z = arena.zone(name)
            unnamed += [(z, h) for h in _claim_unnamed(arena, z, cpu, zpack, EXT_BUF, FLAGS,
                                                       M_EXT)]
    for name in CLUSTER_ZONES:
        if name in names:
            _retag(arena, arena.zone(name), cpu, (L.TAG_ALLOC,), cluster)
    errors = []
    for z, h in unnamed:                   # the manager's now, count 1: freed
        try:
            z.free(h)
            counts["unnamed"] += 1
        except Exception as e:  # noqa: BLE001 - the others are freed all the same
            errors.append(f"cluster {h}: {e!r}")
    for p in to_free_packets:              # set aside, copies gone: packet and cluster
        try:
            if mv[p + BTYPE] == MT_NOTMBUF and u32[w[(p >> 3) + EXT_REFCNT] >> 2] == 1:
                c.zpack.free(p, PACK_VERIFIED)
                counts["abandoned"] += 1
        except Exception as e:  # noqa: BLE001 - the others are freed all the same
            errors.append(f"packet {p}: {e!r}")
    for h in to_free:                      # no lock held: m_free takes what it needs
        try:
            m_free(Mbuf._wrap(c, h))
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
    w = views(arena).w
    keg = zmbuf.keg
    out = set()
    for h, _, tv in keg.items(keg.slab_bases_locked(arena.cpu_id), zidx=zmbuf.zidx,
                              states=(L.TAG_ALLOC,)):
        if L.tag_holder(tv) not in dead:
            i = h >> 3
            if w[i + FLAGS] & M_EXT and w[i + EXT_TYPE] == EXT_PACKET:
                out.add(w[i + EXT_OWNER])
    return out


def _claim_unnamed(arena, zone, cpu, zpack, EXT_BUF, FLAGS, M_EXT) -> list[int]:
    """Clusters of ``zone`` that dead CPU ``cpu`` holds (allocated, or in flight to
    it) and that no mbuf names: re-tagged as the manager's allocated items, count
    1, for it to free.  Returns their handles.

    Such a cluster is one the CPU died with between taking it and an mbuf naming
    it (``mb_zinit_pack``, ``m_clget``, ``m_getjcl`` ...), between an mbuf
    forgetting it and its free (``mb_zfini_pack``, the last reference's
    ``drop_ref``: both take the cluster over first, so the dead CPU holds it), or
    held bare (``m_cljget(None, ...)``).  Every other cluster a dead CPU holds is
    named by an mbuf and left to it.

    Why the verdict holds against the living: the last name of a cluster goes
    only when the CPU removing it holds the cluster (it takes it over first, under
    this zone's lock, from the CPU that held it), any other name only in a locked
    refcount step under this same lock, and a new name is only ever copied from a
    name that stays meanwhile (or made by the cluster's holder, dead here).  So
    while the lock is held no name of a cluster of the dead CPU goes, and the
    walk of every mbuf-keg item out of its slab (the slabs read from the page
    table, which a walk cannot miss as it can miss a slab moving between lists)
    finds a name of every such cluster that has one.  A first walk without the
    lock rules out the named ones (most: the clusters of the packets the CPU
    imported), so that the lock is taken only when there is something to free.
    Lock: takes the zone's."""
    core = views(arena)
    tags, w = core.tags, core.w
    keg, zidx = zone.keg, zone.zidx

    def candidates() -> dict:
        return {h: ti for h, ti, _ in keg.items(keg.slab_bases(), zidx=zidx, holder=cpu,
                                                 states=(L.TAG_ALLOC, L.TAG_INFLIGHT))}

    def named(wanted) -> set:
        """The clusters of ``wanted`` that an item of the mbuf keg names: an mbuf
        with M_EXT (allocated, in flight: a copy, or a cluster's mbuf), a packet in
        any state but importing on the dead CPU (which goes back without its fini:
        importing with its cluster attached it was made finishing already)."""
        mkeg = zpack.keg
        zp = zpack.zidx
        out = set()
        for h, _, tv in mkeg.items(mkeg.slab_bases()):
            i = h >> 3
            cl = w[i + EXT_BUF]
            if cl in wanted and (w[i + FLAGS] & M_EXT if L.tag_zidx(tv) != zp
                                 else not (L.tag_state(tv) == L.TAG_IMPORT
                                           and L.tag_holder(tv) == cpu)):
                out.add(cl)
        return out

    found = candidates()
    unnamed = set(found) - named(found)
    if not unnamed:
        return []
    me = L.tag(L.TAG_ALLOC, zidx, arena.cpu_id, arena.cpu_id)
    lk = core.lock(zone._lock_index)
    lk.acquire(owner_id=arena.cpu_id)
    try:
        found = {h: t for h, t in candidates().items() if h in unnamed}
        out = sorted(set(found) - named(found))
        for h in out:
            tags[found[h]] = me
            tags[keg.ref_index(h)] = 1
    finally:
        lk.release()
    return out


def _nobody(zone, tv) -> int:
    """``tv`` as an allocated item of ``zone`` held by no CPU."""
    return L.tag(L.TAG_ALLOC, zone.zidx, L.NO_CPU, L.tag_home(tv))


def _retag(arena, zone, cpu, states, new_tag) -> None:
    """For each item of ``zone`` held by ``cpu`` in one of ``states``, write
    ``new_tag(zone, handle, tag)`` (None: leave it).  The walk takes no lock (the
    tags of a dead CPU's items change only by take-overs, which the re-check
    sees); each re-tag holds the zone lock for that item alone."""
    core = views(arena)
    keg = zone.keg
    found = list(keg.items(keg.slab_bases_locked(arena.cpu_id), zidx=zone.zidx, holder=cpu,
                           states=states))
    lk = core.lock(zone._lock_index)
    for h, ti, tv in found:
        lk.acquire(owner_id=arena.cpu_id)
        try:
            if core.tags[ti] != tv:              # taken over since the walk
                continue
            new = new_tag(zone, h, tv)
            if new is not None:
                core.tags[ti] = new
        finally:
            lk.release()


recovery.register_pass(recover_mbufs)     # before the core's recover_cpu
