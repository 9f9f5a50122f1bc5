"""refs: the references to an mbuf's external storage -- how they are counted,
shared, dropped and journaled.

This is the refcount half of FreeBSD's ``mb_dupcl`` (``uipc_mbuf.c``) and
``mb_free_ext`` (``kern_mbuf.c``): ``_dupcl`` gives an mbuf one more reference to
another's storage, ``drop_ref`` takes one away and, with the last, frees the storage
(a cluster to its zone, m_extadd storage to its free routine, called once -- at most
once across a crash -- a packet with its cluster to the packet zone).

A reference is counted in a u32 (the cluster's refcount trailer, or an item of
mbuf_ext_refcnt) whose read-modify-writes happen under the lock of the zone it
lives in (``Ctx.reflock``) -- except the seed's shortcut: a count of 1 belongs to
the caller alone.

A packet (mbuf_packet) freed while copies still share its cluster is set aside:
allocated, typed MT_NOTMBUF, holding its own reference, until the last copy frees
it (modern FreeBSD's ``mref``): items go back only to the zone they came from.

A CPU can die between the two words of a locked step (the count and an mbuf's
M_EXT claim), which a kernel never has to survive: the refcount journal (``J_BIT``,
``journal``, ``finish_refcount_step``) lets the repair of the lock finish or undo
the step.
"""

from __future__ import annotations

import os

from .. import hooks
from .. import layout as L
from .. import recovery as _recovery
from .constants import (EXT_EXTADD_TYPES, EXT_EXTREF, EXT_PACKET, M_EXT, M_PKTHDR, M_RDONLY,
                        MSIZE, MT_NOTMBUF)
from .errors import MbufError
from .header import _wrap
from .tags import delete_chain
from .zones import (BTYPE, E, EXT_ARG1, EXT_ARG2, EXT_BUF, EXT_END, EXT_FREE, EXT_OWNER,
                    EXT_REFCNT, EXT_TYPE, FLAGS, M_PKTDAT, NEXT, NEXTPKT, PACK_VERIFIED, PH_TAGS)

_ZERO_EXT = bytes(MSIZE - M_PKTDAT)
_MAIN = "__main__@"                      # a free routine of one process's __main__


# ============================================================================ drop
def drop_ref(c, h, i, flags, zidx):
    """The first half of ``mb_free_ext``: drop mbuf ``h``'s reference to its
    storage; the last reference frees it (a cluster to its zone, m_extadd storage
    to its free routine, a waiting packet to the packet zone).  Returns (purge,
    error): ``purge`` is True when ``h`` itself is still to be freed to the mbuf
    zone (False: a packet went back to its zone, or waits for its copies);
    ``error`` is what the free routine raised, for the caller to raise once ``h``
    is dealt with.

    A packet (the mbuf of the packet zone that owns its cluster) keeps its own
    reference while it waits for its copies: setting it aside is one byte (its
    type, MT_NOTMBUF) written under the refcount lock, so that a CPU killed at any
    moment leaves it either set aside or not, never half.  Its count is then its
    own reference plus its copies'; the copy that finds 2 under the lock with the
    packet set aside is the last: it takes the count to 1 (the packet's own) and
    frees the packet, keeping M_EXT until then so that recovery finds the packet
    through it (``mbuf/recovery.py``).

    The last reference to m_extadd storage frees its count and calls the free
    routine *at most once* across a crash: ``h`` forgets its count first (the
    mark, ``_forgotten``), and an mbuf so marked is freed without a drop -- by
    recovery when its CPU died, by this function when an m_free was cut short in
    this process (a BaseException out of the routine).  Neither can tell whether
    the routine ran: a CPU killed between the mark and the routine taking its
    storage (``shmalloc.buffer.free_storage`` takes it over first) leaks the
    storage, which is preferred to freeing it twice."""
    w, u32 = c.w, c.u32
    typ = w[i + EXT_TYPE]
    owner = w[i + EXT_OWNER]
    if zidx == c.zidx_pack and (typ != EXT_PACKET or owner != h):
        raise MbufError(f"m_free: packet {h} does not hold its own cluster (ext type {typ})")
    r = w[i + EXT_REFCNT] >> 2
    if not r:                            # _forgotten: its last reference went already
        return True, None                # (the drop cut short): only h is left to free
    if typ == EXT_PACKET:
        if owner == h:                   # the packet: alone, or set aside for its copies
            if u32[r] == 1 or not _limbo(c, h, i, flags):
                c.zpack.free(h, PACK_VERIFIED)   # mbuf and cluster go back together
            return False, None
        lk = c.reflock(typ)              # a copy: the packet holds a reference too
        lk.acquire(owner_id=c.cpu)
        try:
            rc = u32[r]
            # (count 1 with the packet set aside: this copy was the last already,
            # and its free of the packet failed -- a free retried)
            last = 0 < rc <= 2 and c.mv[owner + BTYPE] == MT_NOTMBUF
            if last:
                u32[r] = 1               # the set-aside packet's own is left
            elif rc < 2:
                raise MbufError(f"m_free: mbuf {h}: the cluster of packet {owner} has {rc} "
                                f"references, fewer than the packet and this copy")
            else:
                # the reference is gone: so is the mbuf's claim on the storage, in
                # the same locked step, journaled, so that a CPU killed in between
                # is not recovered into dropping it a second time
                w[c.journal(typ)] = journal(J_DROP, rc - 1, h)
                u32[r] = rc - 1
                w[i + FLAGS] &= ~M_EXT
        finally:
            lk.release()
        if last:
            _free_set_aside(c, owner)
        return True, None
    if u32[r] == 1:                      # the seed's shortcut: the only reference is ours
        last = True
    else:
        lk = c.reflock(typ)
        lk.acquire(owner_id=c.cpu)
        try:
            rc = u32[r]
            if rc == 0:
                raise MbufError(f"m_free: mbuf {h}: the refcount of its storage is 0")
            last = rc == 1
            if not last:
                w[c.journal(typ)] = journal(J_DROP, rc - 1, h)      # (as above)
                u32[r] = rc - 1
                w[i + FLAGS] &= ~M_EXT
        finally:
            lk.release()
    if last:
        z = c.zone_of_type.get(typ)
        if z is not None:
            cl = w[i + EXT_BUF]
            z.take_over(cl)              # ours before it is forgotten, so that a crash
            w[i + FLAGS] &= ~M_EXT       # from here on leaves a cluster of this CPU's
            z.free(cl)                   # that no mbuf names: recovery frees it (never twice)
        elif typ in EXT_EXTADD_TYPES or typ == EXT_EXTREF:
            # At most once (see ``_forgotten``): the count ours first (a crash
            # until the mark leaves it named, count 1, held by this CPU: recovery
            # drops it as any last reference), then the mark, then the count goes
            # (a crash leaves it held by this CPU, named by no mbuf: the core's
            # recovery frees it) and the routine runs.
            if typ != EXT_EXTREF:
                c.zextref.take_over(r << 2)
            w[i + EXT_REFCNT] = 0        # the mark: the mbuf forgets its count
            if typ != EXT_EXTREF:        # the caller's counter is left as it is (at 1)
                u32[r] = 0
                c.zextref.free(r << 2)
            try:
                _ext_free(c, h)
            except Exception as e:       # the mbuf still goes; the error is raised after
                return True, e
        else:
            raise MbufError(f"m_free: mbuf {h} has unknown ext type {typ}")
    return True, None


def _forgotten(w, i) -> bool:
    """The mark of a last drop under way or cut short: the mbuf at word ``i`` has
    M_EXT and no count (EXT_REFCNT 0).  No mbuf carries it otherwise -- a count's
    address is never 0: an item of mbuf_ext_refcnt, a cluster's refcount trailer,
    or the caller's counter, all inside the data pages -- but one whose m_ext
    ``m_free`` zeroed before it cleared M_EXT, which is done with its reference
    too.  Its reference is gone: the count freed, or about to be by the CPU
    dropping it, which holds it (never to be dropped again through this mbuf,
    whose old count may serve other storage meanwhile); the free routine called,
    or about to be."""
    return bool(w[i + FLAGS] & M_EXT) and not w[i + EXT_REFCNT]


def _free_set_aside(c, owner):
    """The last copy frees the packet that waited for it (still typed MT_NOTMBUF:
    the packet zone's ctor writes the type anew), with its cluster."""
    c.zpack.free(owner, PACK_VERIFIED)


def _ext_free(c, h):
    name = L.read_str(c.mv, h + EXT_FREE, L.EXT_FREE_BYTES)
    if name.startswith(_MAIN):
        pid, _, qual = name[len(_MAIN):].partition(":")
        if pid != str(os.getpid()):
            raise MbufError(f"m_free: mbuf {h}: the free routine {qual!r} of its storage is "
                            f"a function of the __main__ of process {pid}, which process "
                            f"{os.getpid()} cannot call: the storage was not freed (free "
                            f"its last reference in process {pid}, or give m_extadd a "
                            f"function of an importable module)")
        name = "__main__:" + qual
    fn = c.ext_free_fns.get(name)
    if fn is None:
        fn = c.ext_free_fns[name] = hooks.resolve(name)
    w, i = c.w, h >> 3
    fn(_wrap(c, h), w[i + EXT_ARG1], w[i + EXT_ARG2])


# ============================================================================ set aside
def _limbo(c, h, i, flags) -> bool:
    """A packet freed while copies share its cluster: set it aside (True), or
    False when the copies went meanwhile (it is freed whole then).  A packet set
    aside stays allocated, without tags or links, typed MT_NOTMBUF and holding its
    reference, until the last copy frees it.  The type is the one byte that says
    so, written under the refcount lock (see ``drop_ref``)."""
    _unlink(c, h, i, flags)
    lk = c.reflock(EXT_PACKET)
    lk.acquire(owner_id=c.cpu)
    try:
        if c.u32[c.w[i + EXT_REFCNT] >> 2] == 1:
            return False
        c.mv[h + BTYPE] = MT_NOTMBUF
        return True
    finally:
        lk.release()


def _unlink(c, h, i, flags):
    """What a free leaves of a packet, before it is set aside: no tags, no links,
    no packet header.  Repeatable (a CPU killed here is recovered by freeing the
    packet again)."""
    w = c.w
    if flags & M_PKTHDR and w[i + PH_TAGS]:
        delete_chain(c, h, 0)
    w[i + FLAGS] &= ~M_PKTHDR
    w[i + NEXT] = 0
    w[i + NEXTPKT] = 0


# ============================================================================ share
def _dupcl(c, n, m):
    """``mb_dupcl``: ``n`` shares ``m``'s external storage (one more reference).

    Crash safety: shared storage (count > 1) is counted under the refcount lock,
    journaled (``journal``): the new mbuf claims the storage, then the count
    grows.  The seed's shortcut (count 1: ours alone) takes no lock; for a packet's
    cluster the claim comes first there too -- a CPU killed in between leaves a
    copy claiming a reference that the count (1) says is the packet's, which
    recovery frees without a drop -- and for other storage the count first (a
    crash in between leaks a reference, never drops one twice)."""
    w, u32 = c.w, c.u32
    im = m >> 3
    r = w[im + EXT_REFCNT] >> 2
    typ = w[im + EXT_TYPE]
    if not r:
        raise MbufError(f"mbuf {m}: the last reference to its storage was dropped already "
                        f"(an m_free cut short): it cannot be shared, only freed")
    if u32[r] == 1:                      # ours alone: nobody else can touch it
        if typ == EXT_PACKET:
            _claim(c, n, m)
            u32[r] = 2
        else:
            disown_storage(c, m)         # shared from now on: the references' (first)
            u32[r] = 2
            _claim(c, n, m)
        return
    lk = c.reflock(typ)
    lk.acquire(owner_id=c.cpu)
    try:
        rc = u32[r]
        if rc >= RC_MAX:
            raise MbufError(f"mbuf {m}: its storage has {rc} references (the most)")
        w[c.journal(typ)] = journal(J_DUP, rc + 1, n)
        _claim(c, n, m)
        u32[r] = rc + 1
    finally:
        lk.release()


_ALLOC_NO_CPU = L.TAG_ALLOC | L.NO_CPU << 8


def disown_storage(c, m) -> None:
    """The m_extadd storage of mbuf ``m`` and its count, where a CPU holds them,
    become held by no CPU: owned through the references from now on, so that the
    recovery of that CPU, should it die, leaves them to the mbufs that point at
    them.  ``m_extadd`` does this at once; Buffers keep their storage while the one
    reference of the CPU that made it names it (its free is then a fast-path free)
    and call this before a second reference is made (``_dupcl``: from any thread of
    the process, such as a queue's feeder thread pickling it) or the one they have
    goes elsewhere (``Buffer.detach``).  Lock: none (the tags of items that only the
    one reference's holder frees, the caller or a thread of its process)."""
    w, i = c.w, m >> 3
    if not w[i + FLAGS] & M_EXT or w[i + EXT_TYPE] not in EXT_EXTADD_TYPES:
        return
    core, tags = c.core, c.u32
    pt = core.pt
    for x in (w[i + EXT_BUF], w[i + EXT_REFCNT]):
        try:                             # Keg.tag_index_of, inlined
            e = pt[x >> 12] if x > 0 else 0
            if not 1 <= e >> L.KEG_ID_SHIFT <= L.MAX_KEGS:
                continue
            keg = core.keg(e >> L.KEG_ID_SHIFT)
            b = e ^ keg.kid_bits
            t = (b >> 2) + keg.offmap[x - b]
        except (IndexError, KeyError, TypeError):
            continue                     # not an item: the caller's own storage
        tv = tags[t]
        if tv & 0xFF0F != _ALLOC_NO_CPU and tv & 0xF == L.TAG_ALLOC:
            tags[t] = tv | L.NO_CPU << 8


def _claim(c, n, m):
    """``n`` gets ``m``'s m_ext, then M_EXT (last: the claim)."""
    w, in_, im = c.w, n >> 3, m >> 3
    w[in_ + E:in_ + EXT_END] = w[im + E:im + EXT_END]
    if c.mv[m + EXT_FREE]:
        c.mv[n + EXT_FREE:n + MSIZE] = c.mv[m + EXT_FREE:m + MSIZE]
    else:
        c.mv[n + EXT_FREE] = 0
    w[in_ + FLAGS] |= M_EXT | (w[im + FLAGS] & M_RDONLY)


# ---------------------------------------------------------------- the refcount journal
# A locked refcount step changes two words: the count and the M_EXT claim of one
# mbuf.  Before either, it writes what it is about to do into the owner-id word of
# the lock it holds (released, the word is cleared): a CPU killed in between leaves
# the lock taken, and the repair of that lock (``recovery.rebuild_zone``, before
# the lock is given back, so the count cannot have moved) reads the journal and
# finishes or undoes the step (``finish_refcount_step``).
J_BIT = 1 << 62
J_DUP, J_DROP = 1, 2                     # n claims and the count grows; h's goes
_J_RC_BITS = 20
RC_MAX = min(0xFFFFFFFE, (1 << _J_RC_BITS) - 2)    # most references: a u32, and a journal word


def journal(kind: int, new_rc: int, h: int) -> int:
    """The journal word of a step: ``kind``, the count after it, the mbuf."""
    return J_BIT | kind << 60 | new_rc << L.KEG_ID_SHIFT | h


def finish_refcount_step(core, lock_index: int) -> str | None:
    """Lock ``lock_index`` (a zone lock) is held by a dead process: if its journal
    names a refcount step, finish or undo it.  Returns what was done (None: no
    step).  Lock: ``lock_index``, repaired (held on the dead owner's behalf)."""
    w, u32 = core.w, core.tags
    jw = L.lock_word(lock_index) + L.LOCK["OWNER_ID"]
    rec = w[jw]
    if not rec & J_BIT:
        return None
    kind = rec >> 60 & 3
    new_rc = rec >> L.KEG_ID_SHIFT & ((1 << _J_RC_BITS) - 1)
    h = rec & ((1 << L.KEG_ID_SHIFT) - 1)
    i = h >> 3
    w[jw] = 0
    claimed = w[i + FLAGS] & M_EXT
    counted = claimed and u32[w[i + EXT_REFCNT] >> 2] == new_rc
    if kind == J_DUP:
        if counted:
            return f"mbuf {h}: its reference was counted"
        core.mv[h + M_PKTDAT:h + MSIZE] = _ZERO_EXT        # undone: no claim
        w[i + FLAGS] &= ~M_EXT
        return f"mbuf {h}: its claim undone"
    if kind == J_DROP and counted:
        w[i + FLAGS] &= ~M_EXT                             # finished: no claim
        return f"mbuf {h}: its reference dropped"
    return f"mbuf {h}: nothing done"


_recovery.register_repair(finish_refcount_step)
