"""api: the mbuf allocation, free and chain functions, with FreeBSD's names and
argument order (``sys/mbuf.h``, ``kern/kern_mbuf.c``, ``kern/uipc_mbuf.c``).

Functions that take no mbuf take the keyword ``arena=``.  Allocations return None
when they cannot be satisfied (M_NOWAIT, a limit, the arena full, a refusing label
hook); M_WAITOK sleeps, optionally bounded by ``timeout=`` (TimeoutError).  Where
FreeBSD would panic (a KASSERT: an offset or length outside the chain, a cluster
attached twice ...) MbufError is raised before anything is changed.

External storage is shared by reference (m_copym, m_split, m_copypacket): its
references are counted in a u32 (the cluster's refcount trailer, or an item of
mbuf_ext_refcnt) whose read-modify-writes happen under the lock of the zone it lives
in -- except the seed's shortcut: a count of 1 belongs to the caller alone.  Shared
storage is read-only (M_WRITABLE false): no leading or trailing space, and ``mtod``
gives a read-only view.

The last reference frees the storage (``mb_free_ext``): a cluster goes back to its
zone, m_extadd storage to its free routine (called exactly once), and a packet
(mbuf_packet) goes back to the packet zone with its cluster.  A packet freed while
copies still share its cluster waits, allocated but typed MT_NOTMBUF, for the last copy
to free it (modern FreeBSD's ``mref``): items go back only to the zone they came from.
"""

from __future__ import annotations

import errno as _errno
import operator

from .. import hooks
from .. import recovery as _recovery
from .. import layout as L
from ..errors import BadHandleError, DoubleFreeError, ShmallocError
from ..zone import M_NOWAIT, M_WAITOK, M_ZERO
from .constants import (EXT_EXTADD_TYPES, EXT_NET_DRV, EXT_PACKET, M_COPYALL, M_COPYFLAGS,
                        M_EOR, M_EXT, M_FREELIST, M_NOFREE, M_PKTHDR, M_RDONLY, MCLBYTES, MHLEN,
                        MINCLSIZE, MJUMPAGESIZE, MLEN, MSIZE, MT_DATA, MT_NOINIT, MT_NOTMBUF)
from .errors import MbufError
from .header import Mbuf, _wrap, refs, storage
from .reclaim import lowmem_check
from .tags import copy_chain, delete_chain, move_chain
from .zones import (DATA, E, EXT_ARG1, EXT_ARG2, EXT_BUF, EXT_END, EXT_FREE, EXT_OWNER,
                    EXT_REFCNT, EXT_SIZE, EXT_TYPE, FLAGS, LEN, M_DAT, M_PKTDAT, NEXT, NEXTPKT,
                    PACK_VERIFIED, PH, PH_LEN, PH_RCVIF, PH_TAGS, PKTHDR_END, TYPE, ctx)
from . import zones as _zones

_ZERO_EXT = bytes(MSIZE - M_PKTDAT)
_ZERO_PH = bytes(M_PKTDAT - M_DAT)
_FLAGS_OK = 0xFFFFFFFF & ~(M_EXT | M_NOFREE)    # flags an allocation may ask for
_TAG_ALLOC, _TAG_SHIFT = L.TAG_ALLOC, L.PAGE_SHIFT
_new = object.__new__
_RC_MAX = 0xFFFFFFFE
max_protohdr = 0          # m_pullup pulls up at least this much (FreeBSD: from the domains)


# ============================================================================ arguments
_ARGS: dict = {}


def _arg(type, flags) -> int:
    """The mbuf ctor's argument (the seed's mb_args) for ``type`` and ``flags``."""
    a = _ARGS.get((type, flags))
    if a is not None:
        return a
    if (type.__class__ is not int or flags.__class__ is not int):
        raise TypeError(f"mbuf type and flags are ints, not {type!r} and {flags!r}")
    if not 0 < type <= MT_NOINIT:
        raise MbufError(f"mbuf type {type} is outside 1..{MT_NOINIT}")
    if flags & ~_FLAGS_OK:
        what = "M_EXT" if flags & M_EXT else "M_NOFREE" if flags & M_NOFREE else "these bits"
        raise MbufError(f"mbuf flags {flags:#x}: an allocation may not ask for {what}")
    a = type << 32 | flags
    if len(_ARGS) < 4096:
        _ARGS[type, flags] = a
    return a


def _typ(w, i) -> int:
    """The type to give an mbuf made after mbuf word ``i`` (MT_DATA for none)."""
    t = w[i + TYPE]
    return t if 0 < t < MT_NOINIT else 1


def _how(c, how: int) -> int:
    if how == M_NOWAIT:
        return how
    if how.__class__ is not int:
        raise TypeError(f"how must be an int (M_NOWAIT or M_WAITOK), not {how!r}")
    if how & M_ZERO:
        raise MbufError("M_ZERO would wipe the mbuf header the ctor just wrote")
    return c.how(how) if how & M_WAITOK else how


def _c(m, what: str):
    if m.__class__ is not Mbuf:
        raise TypeError(f"{what}: expected an Mbuf, not {type(m).__name__}")
    return m._c


def _int(what, v) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    return operator.index(v)


def _retry(c, zone, how, timeout, arg):
    """An allocation failed: if the arena is low on pages, run vm_lowmem (once a
    second at most) and try once more."""
    if lowmem_check(c):
        return zone.alloc(how, timeout, arg)
    return None


def _mget(c, how, arg, timeout=None):
    """A handle from the mbuf zone, or None."""
    h = c.zmbuf.alloc(how, timeout, arg)
    if h is None:
        h = _retry(c, c.zmbuf, how, timeout, arg)
    return h


# ============================================================================ allocation
def m_get(how: int, type: int, *, arena, timeout=None):
    """An mbuf without packet header (MLEN bytes of data room), or None."""
    c = ctx(arena)
    h = _mget(c, _how(c, how), _arg(type, 0), timeout)
    return _wrap(c, h) if h else None


def m_gethdr(how: int, type: int, *, arena, timeout=None):
    """An mbuf with a packet header (MHLEN bytes of data room), or None."""
    c = ctx(arena)
    h = _mget(c, _how(c, how), _arg(type, M_PKTHDR), timeout)
    return _wrap(c, h) if h else None


def m_getcl(how: int, type: int, flags: int = 0, *, arena, timeout=None):
    """An mbuf with a 2 KiB cluster attached, in one allocation from the packet
    zone, or None."""
    try:
        c = arena._mb
    except AttributeError:
        c = ctx(arena)
    if how != M_NOWAIT:
        how = _how(c, how)
    arg = _ARGS.get((type, flags)) or _arg(type, flags)
    h = c.zpack.alloc(how, timeout, arg)
    if h is None:
        h = _retry(c, c.zpack, how, timeout, arg)
        if h is None:
            return None
    m = _new(Mbuf)
    m._c = c
    m.handle = h
    return m


def m_getjcl(how: int, type: int, flags: int, size: int, *, arena, timeout=None):
    """An mbuf with a cluster of ``size`` (MCLBYTES, MJUMPAGESIZE, MJUM9BYTES or
    MJUM16BYTES) attached, or None (the mbuf is given back if the cluster fails)."""
    if size == MCLBYTES:
        return m_getcl(how, type, flags, arena=arena, timeout=timeout)
    c = ctx(arena)
    z = _cluster_zone(c, size)
    how = _how(c, how)
    h = _mget(c, how, _arg(type, flags), timeout)
    if h is None:
        return None
    try:
        cl = z.alloc(how, timeout, h)
        if cl is None:
            cl = _retry(c, z, how, timeout, h)
    except BaseException:
        c.zmbuf.free(h)
        raise
    if cl is None:
        c.zmbuf.free(h)
        return None
    return _wrap(c, h)


def m_get2(size: int, how: int, type: int, flags: int, *, arena, timeout=None):
    """The smallest of mbuf, packet and mbuf + page-size cluster holding ``size``
    bytes; None for more than a page."""
    size = _int("m_get2: size", size)
    if size <= MHLEN or (size <= MLEN and not flags & M_PKTHDR):
        c = ctx(arena)
        h = _mget(c, _how(c, how), _arg(type, flags), timeout)
        return _wrap(c, h) if h else None
    if size <= MCLBYTES:
        return m_getcl(how, type, flags, arena=arena, timeout=timeout)
    if size > MJUMPAGESIZE:
        return None
    return m_getjcl(how, type, flags, MJUMPAGESIZE, arena=arena, timeout=timeout)


def _cluster_zone(c, size):
    z = c.zone_of_size.get(size)
    if z is None:
        raise MbufError(f"no cluster zone of {size} bytes (sizes: "
                        f"{', '.join(map(str, sorted(c.zone_of_size)))})")
    return z


def m_getzone(size: int, *, arena):
    """The cluster zone of ``size`` bytes."""
    return _cluster_zone(ctx(arena), size)


def m_clget(m, how: int, *, timeout=None) -> int:
    """Attach a 2 KiB cluster to ``m``; on an M_NOWAIT failure drain the packet
    zone (its cached packets hold clusters) and try once more.  Returns
    ``m.m_flags & M_EXT`` (0: no cluster)."""
    c = _c(m, "m_clget")
    h = m.handle
    if c.w[(m.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"m_clget: mbuf {h} already has external storage")
    how = _how(c, how)
    cl = c.zclust.alloc(how, timeout, h)
    if cl is None and how & M_NOWAIT:
        c.zpack.drain()
        cl = c.zclust.alloc(how, timeout, h)
        if cl is None:
            _retry(c, c.zclust, how, timeout, h)
    return c.w[(m.handle >> 3) + FLAGS] & M_EXT


def m_cljget(m, how: int, size: int, *, arena=None, timeout=None):
    """A cluster of ``size``: attached to ``m`` (returns its handle), or, with
    ``m`` None, a bare cluster handle (attach it with m_cljset, or give it back
    with ``m_getzone(size).free``).  None on failure."""
    if m is None:
        if arena is None:
            raise TypeError("m_cljget(None, ...) needs arena=")
        c = ctx(arena)
        return _cluster_zone(c, size).alloc(_how(c, how), timeout, None)
    c = _c(m, "m_cljget")
    z = _cluster_zone(c, size)
    if c.w[(m.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"m_cljget: mbuf {m.handle} already has external storage")
    return z.alloc(_how(c, how), timeout, m.handle)


def m_cljset(m, cl: int, type: int) -> None:
    """Attach the bare cluster ``cl`` (from m_cljget(None, ...)) of ext type
    ``type`` (EXT_CLUSTER, EXT_JUMBOP, EXT_JUMBO9, EXT_JUMBO16) to ``m``."""
    c = _c(m, "m_cljset")
    z = c.zone_of_type.get(type)
    if z is None:
        raise MbufError(f"m_cljset: ext type {type} is not a cluster type")
    cl = _int("m_cljset: cluster", cl)
    base = z.keg.slab_of(cl)
    if base < 0 or L.tag_state(c.u32[(base >> 2) + z.keg.offmap[cl - base]]) != L.TAG_ALLOC:
        raise BadHandleError(f"m_cljset: {cl} is not an allocated cluster of zone {z.name!r}")
    if c.w[(m.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"m_cljset: mbuf {m.handle} already has external storage")
    r = z.keg.ref_index(cl)
    if c.u32[r] != 1:
        raise MbufError(f"m_cljset: cluster {cl} already has {c.u32[r]} references")
    _zones.mb_ctor_clust(z, cl, m.handle, M_NOWAIT)


def m_extadd(mb, buf: int, size: int, freef, arg1: int = 0, arg2: int = 0, flags: int = 0,
             type: int = None) -> int:
    """Attach external storage ``[buf, buf + size)`` (handles of this arena) to
    ``mb``, with free routine ``freef`` (a name, or a module-level function, resolvable
    in every process) called as ``freef(m, arg1, arg2)`` exactly once, when the
    last reference goes.  The refcount comes from mbuf_ext_refcnt.  Returns 0, or
    ENOMEM (no refcount could be had: nothing attached)."""
    c = _c(mb, "m_extadd")
    if type is None:
        type = EXT_NET_DRV
    if type not in EXT_EXTADD_TYPES:
        raise MbufError(f"m_extadd: ext type {type} is not one of EXT_SFBUF, EXT_NET_DRV, "
                        f"EXT_MOD_TYPE, EXT_DISPOSABLE (clusters: m_clget, m_cljset)")
    buf, size = _int("m_extadd: buf", buf), _int("m_extadd: size", size)
    arg1, arg2 = _int("m_extadd: arg1", arg1), _int("m_extadd: arg2", arg2)
    flags = _int("m_extadd: flags", flags)
    if flags & ~_FLAGS_OK or flags & M_PKTHDR and not c.w[(mb.handle >> 3) + FLAGS] & M_PKTHDR:
        raise MbufError(f"m_extadd: flags {flags:#x} may not add M_EXT, M_NOFREE or M_PKTHDR")
    g = c.core.geometry
    if size <= 0 or buf < g.data_off or buf + size > g.size:
        raise MbufError(f"m_extadd: storage {buf}+{size} is not inside the arena's data "
                        f"pages ({g.data_off}..{g.size})")
    fm = g.freemap_off
    if c.core.buf.find(b"\x01", fm + (buf >> L.PAGE_SHIFT),
                       fm + (buf + size - 1 >> L.PAGE_SHIFT) + 1) >= 0:
        raise MbufError(f"m_extadd: storage {buf}+{size} lies on free pages")
    name = hooks.name_of(freef)
    if not name or len(name.encode()) >= L.EXT_FREE_BYTES:
        raise MbufError(f"m_extadd: the free routine's name {name!r} must be 1.."
                        f"{L.EXT_FREE_BYTES - 1} bytes")
    if c.w[(mb.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"m_extadd: mbuf {mb.handle} already has external storage")
    r = c.zextref.alloc(M_NOWAIT)
    if r is None:
        return _errno.ENOMEM
    c.u32[r >> 2] = 1
    # the count, and storage that is an item this CPU holds, belong to the
    # references from now on: held by no CPU, so that the recovery of this CPU
    # (should it die) leaves them to the mbufs that still point at them
    c.arena.disown(r)
    try:
        c.arena.disown(buf)
    except ShmallocError:
        pass                                # not an item of ours: the caller's business
    w, i, h = c.w, (mb.handle >> 3), mb.handle
    w[i + EXT_BUF] = buf
    w[i + EXT_SIZE] = size
    w[i + EXT_TYPE] = type
    w[i + EXT_REFCNT] = r
    w[i + EXT_ARG1] = arg1
    w[i + EXT_ARG2] = arg2
    w[i + EXT_OWNER] = h
    L.write_str(c.mv, h + EXT_FREE, L.EXT_FREE_BYTES, name)
    w[i + DATA] = buf
    w[i + FLAGS] |= M_EXT | flags
    return 0


def m_init(m, how: int, type: int, flags: int) -> int:
    """Initialise an mbuf allocated with MT_NOINIT (what the ctor would have done).
    Returns 0, or an errno when the label hook refuses (the mbuf is left as is)."""
    c = _c(m, "m_init")
    arg = _arg(type, flags)
    if type == MT_NOINIT:
        raise MbufError("m_init: MT_NOINIT is not a type")
    if c.w[(m.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"m_init: mbuf {m.handle} has external storage")
    if c.w[(m.handle >> 3) + FLAGS] & M_PKTHDR and c.w[(m.handle >> 3) + PH_TAGS]:
        delete_chain(c, m.handle, 0)
    r = _zones.mb_ctor_mbuf(c.zmbuf, m.handle, arg, how)
    return 0 if r is not False else _errno.ENOMEM


# ============================================================================ free
def _bad(c, h, what):
    """Raise the most precise error for ``h``, which is not a live mbuf."""
    if not isinstance(h, int):
        raise TypeError(f"{what}: expected an mbuf, not {type(h).__name__}")
    if c.is_mbuf(h) >= 0 and c.w[(h >> 3) + TYPE] == MT_NOTMBUF:
        raise DoubleFreeError(f"{what}: mbuf {h} was freed already (it waits for the other "
                              f"references to its cluster to go)")
    try:
        b = c.core.pt[h >> _TAG_SHIFT] ^ c.mkid_bits
        x = c.moffmap.get(h - b)
    except (IndexError, TypeError):
        x = None
    if x is not None and L.tag_zidx(c.u32[(b >> 2) + x]) == c.zidx_pack:
        c.zpack._raise_bad(h, what)
    c.zmbuf._raise_bad(h, what)
    raise BadHandleError(f"{what}: {h} is not an allocated mbuf")


def _free(c, h: int) -> int:
    """m_free on handle ``h``; returns m_next's handle."""
    w, i = c.w, h >> 3
    try:
        flags, typ, nxt = w[i + FLAGS], w[i + TYPE], w[i + NEXT]
        sole_packet = (flags & M_EXT and w[i + EXT_TYPE] == EXT_PACKET
                       and w[i + EXT_OWNER] == h and c.u32[w[i + EXT_REFCNT] >> 2] == 1)
    except (IndexError, TypeError):
        _bad(c, h, "m_free")
    if typ == MT_NOTMBUF:
        _bad(c, h, "m_free")
    if sole_packet:
        # a packet holding the only reference to its cluster: both go back to the
        # packet zone together; the zone checks the handle before anything changes
        c.zpack.free(h, PACK_VERIFIED)
        return nxt
    try:
        b = c.core.pt[h >> 12] ^ c.mkid_bits
        t = c.u32[(b >> 2) + c.moffmap[h - b]]
    except (IndexError, KeyError, TypeError):
        _bad(c, h, "m_free")
    if t & 0xF != _TAG_ALLOC:
        _bad(c, h, "m_free")
    if flags & M_EXT:
        _free_ext(c, h, i, flags, (t >> 4) & 0xF)
    elif (t >> 4) & 0xF != c.zidx_mbuf:
        raise MbufError(f"m_free: packet {h} has lost its cluster (M_EXT clear)")
    elif not flags & M_NOFREE:
        c.zmbuf.free(h)
    return nxt


def _free_ext(c, h, i, flags, zidx):
    """``mb_free_ext``: drop ``h``'s reference to its storage, then free ``h``."""
    purge, error = drop_ref(c, h, i, flags, zidx)
    if purge and not flags & M_NOFREE:
        _purge_and_free(c, h, i, flags)
    if error is not None:
        raise error


def drop_ref(c, h, i, flags, zidx):
    """The first half of ``mb_free_ext``: drop mbuf ``h``'s reference to its
    storage; the last reference frees it (a cluster to its zone, m_extadd storage
    to its free routine, a waiting packet to the packet zone).  Returns (purge,
    error): ``purge`` is True when ``h`` itself is still to be freed to the mbuf
    zone (False: a packet went back to its zone, or waits for its copies);
    ``error`` is what the free routine raised, for the caller to raise once ``h``
    is dealt with.

    A packet (the mbuf of the packet zone that owns its cluster) keeps its own
    reference while it waits for its copies: setting it aside is one word (its
    type, MT_NOTMBUF) written under the refcount lock, so that a CPU killed at any
    moment leaves it either set aside or not, never half.  Its count is then its
    own reference plus its copies'; the copy that finds 2 under the lock with the
    packet set aside is the last: it takes the count to 1 (the packet's own) and
    frees the packet, keeping M_EXT until then so that recovery finds the packet
    through it (``workers/mbuf_recovery.py``)."""
    w, u32 = c.w, c.u32
    typ = w[i + EXT_TYPE]
    owner = w[i + EXT_OWNER]
    if zidx == c.zidx_pack and (typ != EXT_PACKET or owner != h):
        raise MbufError(f"m_free: packet {h} does not hold its own cluster (ext type {typ})")
    r = w[i + EXT_REFCNT] >> 2
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
            last = 0 < rc <= 2 and w[(owner >> 3) + TYPE] == MT_NOTMBUF
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
        elif typ in EXT_EXTADD_TYPES:
            u32[r] = 0
            c.zextref.free(r << 2)
            try:
                _ext_free(c, h)
            except Exception as e:       # the mbuf still goes; the error is raised after
                return True, e
        else:
            raise MbufError(f"m_free: mbuf {h} has unknown ext type {typ}")
    return True, None


def _free_set_aside(c, owner):
    """The last copy frees the packet that waited for it (still typed MT_NOTMBUF:
    the packet zone's ctor writes the type anew), with its cluster."""
    c.zpack.free(owner, PACK_VERIFIED)


def _ext_free(c, h):
    name = L.read_str(c.mv, h + EXT_FREE, L.EXT_FREE_BYTES)
    fn = c.ext_free_fns.get(name)
    if fn is None:
        fn = c.ext_free_fns[name] = hooks.resolve(name)
    w, i = c.w, h >> 3
    fn(_wrap(c, h), w[i + EXT_ARG1], w[i + EXT_ARG2])


def _purge_and_free(c, h, i, flags):
    c.mv[h + M_PKTDAT:h + MSIZE] = _ZERO_EXT
    c.w[i + FLAGS] = flags & ~M_EXT
    c.zmbuf.free(h)


def _limbo(c, h, i, flags) -> bool:
    """A packet freed while copies share its cluster: set it aside (True), or
    False when the copies went meanwhile (it is freed whole then).  A packet set
    aside stays allocated, without tags or links, typed MT_NOTMBUF and holding its
    reference, until the last copy frees it.  The type is the one word that says
    so, written under the refcount lock (see ``drop_ref``)."""
    _unlink(c, h, i, flags)
    lk = c.reflock(EXT_PACKET)
    lk.acquire(owner_id=c.cpu)
    try:
        if c.u32[c.w[i + EXT_REFCNT] >> 2] == 1:
            return False
        c.w[i + TYPE] = MT_NOTMBUF
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
    w[i + FLAGS] = flags & ~M_PKTHDR
    w[i + NEXT] = 0
    w[i + NEXTPKT] = 0


def m_free(m):
    """Free one mbuf (and its reference to its storage); returns m_next."""
    c = _c(m, "m_free")
    nxt = _free(c, m.handle)
    return _wrap(c, nxt) if nxt else None


def m_freem(m) -> None:
    """Free a whole chain (``m`` may be None)."""
    if m is None:
        return
    try:
        c, h = m._c, m.handle
    except AttributeError:
        raise TypeError(f"m_freem: expected an Mbuf, not {type(m).__name__}") from None
    w, i = c.w, h >> 3
    # the common case inline: one packet holding the only reference to its cluster
    if (not w[i + NEXT] and w[i + FLAGS] & M_EXT and w[i + EXT_TYPE] == EXT_PACKET
            and w[i + EXT_OWNER] == h and w[i + TYPE] and c.u32[w[i + EXT_REFCNT] >> 2] == 1):
        c.zpack.free(h, PACK_VERIFIED)
        return
    while h:
        h = _free(c, h)


def _freem(c, h):
    while h:
        h = _free(c, h)


# ============================================================================ storage helpers
def _writable(c, i) -> bool:
    w = c.w
    flags = w[i + FLAGS]
    return not flags & M_RDONLY and (not flags & M_EXT or refs(c, w, i) == 1)


def _leading(c, h) -> int:
    w, i = c.w, h >> 3
    if not _writable(c, i):
        return 0
    return w[i + DATA] - storage(w, h)[0]


def _trailing(c, h) -> int:
    w, i = c.w, h >> 3
    if not _writable(c, i):
        return 0
    return storage(w, h)[1] - (w[i + DATA] + w[i + LEN])


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
    if u32[r] == 1:                      # ours alone: nobody else can touch it
        if typ == EXT_PACKET:
            _claim(c, n, m)
            u32[r] = 2
        else:
            u32[r] = 2
            _claim(c, n, m)
        return
    lk = c.reflock(typ)
    lk.acquire(owner_id=c.cpu)
    try:
        rc = u32[r]
        if rc >= _RC_MAX:
            raise MbufError(f"mbuf {m}: its storage has {rc} references (the most)")
        w[c.journal(typ)] = journal(J_DUP, rc + 1, n)
        _claim(c, n, m)
        u32[r] = rc + 1
    finally:
        lk.release()


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
_RC_MAX = min(_RC_MAX, (1 << _J_RC_BITS) - 2)


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


if finish_refcount_step not in _recovery.repair_hooks:
    _recovery.repair_hooks.append(finish_refcount_step)


def _dup_pkthdr(c, to, frm, how) -> bool:
    """``m_dup_pkthdr``: ``to`` gets a copy of ``frm``'s packet header and tags."""
    w = c.w
    it, ifr = to >> 3, frm >> 3
    if w[it + FLAGS] & M_PKTHDR and w[it + PH_TAGS]:
        delete_chain(c, to, 0)
    w[it + FLAGS] = (w[ifr + FLAGS] & M_COPYFLAGS) | (w[it + FLAGS] & M_EXT)
    if not w[it + FLAGS] & M_EXT:
        w[it + DATA] = to + M_PKTDAT
    w[it + PH:it + PKTHDR_END] = w[ifr + PH:ifr + PKTHDR_END]
    w[it + PH_TAGS] = 0
    return copy_chain(c, to, frm, how)


def _move_pkthdr(c, to, frm):
    """``m_move_pkthdr``: the packet header and its tags move to ``to``."""
    w = c.w
    it, ifr = to >> 3, frm >> 3
    if w[it + FLAGS] & M_PKTHDR and w[it + PH_TAGS]:
        delete_chain(c, to, 0)
    w[it + FLAGS] = (w[ifr + FLAGS] & M_COPYFLAGS) | (w[it + FLAGS] & M_EXT)
    if not w[it + FLAGS] & M_EXT:
        w[it + DATA] = to + M_PKTDAT
    w[it + PH:it + PKTHDR_END] = w[ifr + PH:ifr + PKTHDR_END]
    w[it + PH_TAGS] = 0
    move_chain(c, to, frm)
    w[ifr + FLAGS] &= ~M_PKTHDR


def _chain_len(c, h) -> int:
    w, n = c.w, 0
    while h:
        n += w[(h >> 3) + LEN]
        h = w[(h >> 3) + NEXT]
    return n


def _same(c, m, what):
    if m.__class__ is not Mbuf or m._c.core is not c.core:
        raise TypeError(f"{what}: expected an Mbuf of the same arena, not {m!r}")
    return m.handle


def _pkthdr(c, h, what):
    if not c.w[(h >> 3) + FLAGS] & M_PKTHDR:
        raise MbufError(f"{what}: mbuf {h} has no packet header (M_PKTHDR)")


# ============================================================================ packet headers
def m_move_pkthdr(to, frm) -> None:
    """Move ``frm``'s packet header (and tags) to ``to``; ``frm`` loses M_PKTHDR."""
    c = _c(to, "m_move_pkthdr")
    fh = _same(c, frm, "m_move_pkthdr")
    _pkthdr(c, fh, "m_move_pkthdr")
    _move_pkthdr(c, to.handle, fh)


M_MOVE_PKTHDR = m_move_pkthdr


def m_dup_pkthdr(to, frm, how: int) -> int:
    """Copy ``frm``'s packet header and tags to ``to``; 1, or 0 if the tags could
    not be copied (``to`` then has the header without tags)."""
    c = _c(to, "m_dup_pkthdr")
    fh = _same(c, frm, "m_dup_pkthdr")
    _pkthdr(c, fh, "m_dup_pkthdr")
    return int(_dup_pkthdr(c, to.handle, fh, _how(c, how)))


def m_demote(m0, all: int) -> None:
    """Strip packet headers (and their tags) from the chain, the first mbuf only
    when ``all``; keep only M_EXT, M_EOR, M_RDONLY and M_FREELIST."""
    c = _c(m0, "m_demote")
    w = c.w
    h = m0.handle if all else w[(m0.handle >> 3) + NEXT]
    while h:
        i = h >> 3
        if w[i + FLAGS] & M_PKTHDR:
            if w[i + PH_TAGS]:
                delete_chain(c, h, 0)
            w[i + FLAGS] &= ~M_PKTHDR
            c.mv[h + M_DAT:h + M_PKTDAT] = _ZERO_PH
        if h != m0.handle:
            w[i + NEXTPKT] = 0
        w[i + FLAGS] &= M_EXT | M_EOR | M_RDONLY | M_FREELIST
        h = w[i + NEXT]


# ============================================================================ data access
def mtod(m) -> memoryview:
    """The mbuf's storage from m_data to its end (the data is the first m_len
    bytes): writable, or read-only when the storage is shared or M_RDONLY."""
    c = m._c
    w, i = c.w, (m.handle >> 3)
    flags = w[i + FLAGS]
    if flags & M_EXT:
        end = w[i + EXT_BUF] + w[i + EXT_SIZE]
        v = c.mv[w[i + DATA]:end]
        if flags & M_RDONLY or c.u32[w[i + EXT_REFCNT] >> 2] != 1:
            return v.toreadonly()
        return v
    v = c.mv[w[i + DATA]:m.handle + MSIZE]
    return v.toreadonly() if flags & M_RDONLY else v


def M_WRITABLE(m) -> bool:
    return _writable(_c(m, "M_WRITABLE"), (m.handle >> 3))


def M_LEADINGSPACE(m) -> int:
    """Room before the data (0 when not writable)."""
    return _leading(_c(m, "M_LEADINGSPACE"), m.handle)


def M_TRAILINGSPACE(m) -> int:
    """Room after the data (0 when not writable)."""
    return _trailing(_c(m, "M_TRAILINGSPACE"), m.handle)


def _align(m, len, room, what, pkthdr):
    c = _c(m, what)
    w, i, h = c.w, (m.handle >> 3), m.handle
    len = _int(f"{what}: len", len)
    flags = w[i + FLAGS]
    start = h + (M_PKTDAT if pkthdr else M_DAT)
    if flags & M_EXT or bool(flags & M_PKTHDR) != pkthdr or w[i + DATA] != start:
        raise MbufError(f"{what}: mbuf {h} is not a fresh mbuf of that kind")
    if not 0 <= len <= room:
        raise MbufError(f"{what}: len {len} is outside 0..{room}")
    w[i + DATA] = start + ((room - len) & ~7)


def M_ALIGN(m, len: int) -> None:
    """Place an object of ``len`` bytes at the end of a fresh mbuf's data room."""
    _align(m, len, MLEN, "M_ALIGN", False)


def MH_ALIGN(m, len: int) -> None:
    """M_ALIGN for a fresh packet-header mbuf."""
    _align(m, len, MHLEN, "MH_ALIGN", True)


def m_length(m0) -> int:
    """Bytes in the chain (sum of m_len)."""
    c = _c(m0, "m_length")
    return _chain_len(c, m0.handle)


def m_last(m):
    """The last mbuf of the chain."""
    c = _c(m, "m_last")
    w, h = c.w, m.handle
    while w[(h >> 3) + NEXT]:
        h = w[(h >> 3) + NEXT]
    return _wrap(c, h)


def m_fixhdr(m0) -> int:
    """Set m_pkthdr.len to the chain's length; return it."""
    c = _c(m0, "m_fixhdr")
    _pkthdr(c, m0.handle, "m_fixhdr")
    n = _chain_len(c, m0.handle)
    c.w[(m0.handle >> 3) + PH_LEN] = n
    return n


def m_copydata(m, off: int, len: int, cp=None):
    """Copy ``len`` bytes from offset ``off`` of the chain: into ``cp`` (a writable
    buffer of at least ``len`` bytes; returned) or, when None, into new bytes."""
    c = _c(m, "m_copydata")
    off, len = _int("m_copydata: off", off), _int("m_copydata: len", len)
    if off < 0 or len < 0:
        raise MbufError(f"m_copydata: negative {'off' if off < 0 else 'len'}")
    total = _chain_len(c, m.handle)
    if off + len > total:
        raise MbufError(f"m_copydata: {off}+{len} is past the end of the chain ({total} "
                        f"bytes)")
    out = bytearray(len) if cp is None else cp
    dst = memoryview(out).cast("B")
    if dst.readonly or dst.nbytes < len:
        raise MbufError(f"m_copydata: the buffer must be writable and hold {len} bytes")
    w, mv, h, pos = c.w, c.mv, m.handle, 0
    while off > 0 and h:
        if off < w[(h >> 3) + LEN]:
            break
        off -= w[(h >> 3) + LEN]
        h = w[(h >> 3) + NEXT]
    while len > 0:
        i = h >> 3
        n = min(w[i + LEN] - off, len)
        d = w[i + DATA] + off
        dst[pos:pos + n] = mv[d:d + n]
        pos += n
        len -= n
        off = 0
        h = w[i + NEXT]
    return bytes(out) if cp is None else cp


def _src(cp, len, what) -> memoryview:
    src = memoryview(cp).cast("B")
    if src.nbytes < len:
        raise MbufError(f"{what}: the data holds {src.nbytes} bytes, fewer than {len}")
    return src


def m_copyback(m0, off: int, len: int, cp) -> None:
    """Write ``len`` bytes of ``cp`` into the chain at ``off``, extending it (with
    zeroed mbufs, M_NOWAIT) as needed; grows m_pkthdr.len.  Storage that is not
    writable (shared, M_RDONLY) is refused (MbufError) before anything is
    written."""
    c = _c(m0, "m_copyback")
    off, len = _int("m_copyback: off", off), _int("m_copyback: len", len)
    if off < 0 or len < 0:
        raise MbufError(f"m_copyback: negative {'off' if off < 0 else 'len'}")
    src = _src(cp, len, "m_copyback")
    w, mv = c.w, c.mv
    # dry run over the existing mbufs: would any byte land in read-only storage?
    h, o, n_left = m0.handle, off, len
    while h and o > w[(h >> 3) + LEN]:
        o -= w[(h >> 3) + LEN]
        h = w[(h >> 3) + NEXT]
    while h and n_left > 0:
        i = h >> 3
        mlen = w[i + LEN]
        if not w[i + NEXT] and n_left > mlen - o:
            mlen += min(n_left - (mlen - o), _trailing(c, h))
        k = min(mlen - o, n_left)
        if k > 0 and not _writable(c, i):
            raise MbufError(f"m_copyback: mbuf {h} holds shared or read-only storage")
        n_left -= max(k, 0)
        o = 0
        h = w[i + NEXT]
    # the copy (FreeBSD's m_copyback)
    m, totlen, pos = m0.handle, 0, 0
    typ = _typ(w, (m0.handle >> 3))
    while off > w[(m >> 3) + LEN]:
        mlen = w[(m >> 3) + LEN]
        off -= mlen
        totlen += mlen
        if not w[(m >> 3) + NEXT]:
            n = _mget(c, M_NOWAIT, _arg(typ, 0))
            if n is None:
                return _copyback_out(c, m0, totlen)
            mv[n + M_DAT:n + MSIZE] = bytes(MLEN)
            w[(n >> 3) + LEN] = min(MLEN, len + off)
            w[(m >> 3) + NEXT] = n
        m = w[(m >> 3) + NEXT]
    while len > 0:
        i = m >> 3
        if not w[i + NEXT] and len > w[i + LEN] - off:
            w[i + LEN] += min(len - (w[i + LEN] - off), _trailing(c, m))
        mlen = min(w[i + LEN] - off, len)
        d = w[i + DATA] + off
        mv[d:d + mlen] = src[pos:pos + mlen]
        pos += mlen
        len -= mlen
        mlen += off
        off = 0
        totlen += mlen
        if len == 0:
            break
        if not w[i + NEXT]:
            n = _mget(c, M_NOWAIT, _arg(typ, 0))
            if n is None:
                break
            w[(n >> 3) + LEN] = min(MLEN, len)
            w[i + NEXT] = n
        m = w[i + NEXT]
    _copyback_out(c, m0, totlen)


def _copyback_out(c, m0, totlen):
    w = c.w
    if w[(m0.handle >> 3) + FLAGS] & M_PKTHDR and w[(m0.handle >> 3) + PH_LEN] < totlen:
        w[(m0.handle >> 3) + PH_LEN] = totlen


def m_append(m0, len: int, cp) -> int:
    """Append ``len`` bytes of ``cp`` to the chain: into the last mbuf's trailing
    space, then new mbufs (M_NOWAIT).  Returns 1 if all fit, 0 if not (what fit
    stays); m_pkthdr.len grows by what was appended."""
    c = _c(m0, "m_append")
    len = _int("m_append: len", len)
    if len < 0:
        raise MbufError("m_append: negative len")
    src = _src(cp, len, "m_append")
    w, mv = c.w, c.mv
    m = m0.handle
    while w[(m >> 3) + NEXT]:
        m = w[(m >> 3) + NEXT]
    remainder, pos = len, 0
    space = _trailing(c, m)
    if space > 0:
        space = min(space, remainder)
        d = w[(m >> 3) + DATA] + w[(m >> 3) + LEN]
        mv[d:d + space] = src[:space]
        w[(m >> 3) + LEN] += space
        pos += space
        remainder -= space
    typ = _typ(w, m >> 3)
    while remainder > 0:
        n = _mget(c, M_NOWAIT, _arg(typ, 0))
        if n is None:
            break
        k = min(MLEN, remainder)
        w[(n >> 3) + LEN] = k
        d = w[(n >> 3) + DATA]
        mv[d:d + k] = src[pos:pos + k]
        pos += k
        remainder -= k
        w[(m >> 3) + NEXT] = n
        m = n
    if w[(m0.handle >> 3) + FLAGS] & M_PKTHDR:
        w[(m0.handle >> 3) + PH_LEN] += len - remainder
    return int(remainder == 0)


# ============================================================================ copies
def _copy_into(c, n, m, off, k):
    """Data [off, off+k) of ``m`` into ``n`` (at n's m_data): share or copy."""
    w = c.w
    im, in_ = m >> 3, n >> 3
    w[in_ + LEN] = k
    if w[im + FLAGS] & M_EXT:
        w[in_ + DATA] = w[im + DATA] + off
        _dupcl(c, n, m)
    else:
        s, d = w[im + DATA] + off, w[in_ + DATA]
        c.mv[d:d + k] = c.mv[s:s + k]


def m_copym(m, off0: int, len: int, wait: int):
    """A new chain with bytes [off0, off0+len) of ``m`` (``len`` M_COPYALL: to the
    end); the packet header is copied when off0 is 0, external storage is shared
    (one more reference, read-only for both), the rest copied.  None when an
    allocation fails (the partial copy is freed) or nothing is copied."""
    c = _c(m, "m_copym")
    off0, len = _int("m_copym: off", off0), _int("m_copym: len", len)
    if off0 < 0 or len < 0:
        raise MbufError(f"m_copym: negative {'off' if off0 < 0 else 'len'}")
    how = _how(c, wait)
    w = c.w
    h = m.handle
    total = _chain_len(c, h)
    if off0 > total:
        raise MbufError(f"m_copym: offset {off0} > size of the mbuf chain ({total})")
    if len != M_COPYALL and off0 + len > total:
        raise MbufError(f"m_copym: length {off0}+{len} > size of the mbuf chain ({total})")
    copyhdr = off0 == 0 and w[(m.handle >> 3) + FLAGS] & M_PKTHDR
    off = off0
    while off > 0 and h:
        if off < w[(h >> 3) + LEN]:
            break
        off -= w[(h >> 3) + LEN]
        h = w[(h >> 3) + NEXT]
    top = prev = 0
    while len > 0 and h:
        i = h >> 3
        n = _mget(c, how, _arg(_typ(w, i), M_PKTHDR if copyhdr else 0))
        if n is None:
            return _nospace(c, top)
        if prev:
            w[(prev >> 3) + NEXT] = n
        else:
            top = n
        prev = n
        if copyhdr:
            if not _dup_pkthdr(c, n, h, how):
                return _nospace(c, top)
            if len == M_COPYALL:
                w[(n >> 3) + PH_LEN] = w[i + PH_LEN] - off0
            else:
                w[(n >> 3) + PH_LEN] = len
            copyhdr = 0
        k = min(len, w[i + LEN] - off)
        _copy_into(c, n, h, off, k)
        if len != M_COPYALL:
            len -= k
        off = 0
        h = w[i + NEXT]
    if not top:
        c.count("MCFAIL")
        return None
    return _wrap(c, top)


def _nospace(c, top):
    _freem(c, top)
    c.count("MCFAIL")
    return None


def m_copypacket(m, how: int):
    """m_copym(m, 0, M_COPYALL, how) for a packet, keeping the first mbuf's
    leading space."""
    c = _c(m, "m_copypacket")
    h = m.handle
    _pkthdr(c, h, "m_copypacket")
    how = _how(c, how)
    w = c.w
    i = h >> 3
    n = _mget(c, how, _arg(_typ(w, i), 0))
    if n is None:
        return _nospace(c, 0)
    top = n
    if not _dup_pkthdr(c, n, h, how):
        return _nospace(c, top)
    if w[i + FLAGS] & M_EXT:
        w[(n >> 3) + LEN] = w[i + LEN]
        w[(n >> 3) + DATA] = w[i + DATA]
        _dupcl(c, n, h)
    else:
        w[(n >> 3) + DATA] = n + M_PKTDAT + (w[i + DATA] - (h + M_PKTDAT))
        _copy_into(c, n, h, 0, w[i + LEN])
    h = w[i + NEXT]
    while h:
        i = h >> 3
        o = _mget(c, how, _arg(_typ(w, i), 0))
        if o is None:
            return _nospace(c, top)
        w[(n >> 3) + NEXT] = o
        n = o
        _copy_into(c, n, h, 0, w[i + LEN])
        h = w[i + NEXT]
    return _wrap(c, top)


def m_dup(m, how: int):
    """A deep, writable copy of a packet into fresh mbufs and clusters (a cluster
    whenever at least MINCLSIZE bytes remain).  None on failure (nothing leaks)."""
    c = _c(m, "m_dup")
    h = m.handle
    _pkthdr(c, h, "m_dup")
    how = _how(c, how)
    w, mv = c.w, c.mv
    remain = w[(m.handle >> 3) + PH_LEN]
    if remain != _chain_len(c, h):
        raise MbufError(f"m_dup: m_pkthdr.len {remain} != chain length {_chain_len(c, h)}")
    typ = _typ(w, (m.handle >> 3))
    top = prev = 0
    moff = 0
    while remain > 0 or not top:
        if remain >= MINCLSIZE:
            n = c.zpack.alloc(how, None, _arg(typ, 0))
            nsize = MCLBYTES
        else:
            n = _mget(c, how, _arg(typ, 0))
            nsize = MLEN
        if n is None:
            return _nospace(c, top)
        if prev:
            w[(prev >> 3) + NEXT] = n
        else:
            top = n
            if not _dup_pkthdr(c, n, h, how):
                return _nospace(c, top)
            if not w[(n >> 3) + FLAGS] & M_EXT:
                nsize = MHLEN
        prev = n
        ni = n >> 3
        w[ni + LEN] = 0
        while w[ni + LEN] < nsize and h:
            i = h >> 3
            chunk = min(nsize - w[ni + LEN], w[i + LEN] - moff)
            s, d = w[i + DATA] + moff, w[ni + DATA] + w[ni + LEN]
            mv[d:d + chunk] = mv[s:s + chunk]
            moff += chunk
            w[ni + LEN] += chunk
            remain -= chunk
            if moff == w[i + LEN]:
                h = w[i + NEXT]
                moff = 0
    w[(top >> 3) + FLAGS] &= ~M_RDONLY
    return _wrap(c, top)


# ============================================================================ reshaping
def m_pullup(n, len: int):
    """Make the first ``len`` bytes contiguous in the first mbuf (not a cluster);
    returns the new head, or None after freeing the whole chain (``len`` >
    MHLEN, or no mbuf, or the chain is shorter than ``len``)."""
    c = _c(n, "m_pullup")
    len = _int("m_pullup: len", len)
    if len < 0:
        raise MbufError("m_pullup: negative len")
    w, mv = c.w, c.mv
    hn = n.handle
    i = hn >> 3
    if (not w[i + FLAGS] & M_EXT and w[i + DATA] + len < hn + MSIZE and w[i + NEXT]):
        if w[i + LEN] >= len:
            return n
        hm = hn
        hn = w[i + NEXT]
        len -= w[i + LEN]
    else:
        if len > MHLEN:
            return _pullup_bad(c, hn)
        hm = _mget(c, M_NOWAIT, _arg(_typ(w, i), 0))
        if hm is None:
            return _pullup_bad(c, hn)
        w[(hm >> 3) + LEN] = 0
        if w[i + FLAGS] & M_PKTHDR:
            _move_pkthdr(c, hm, hn)
    im = hm >> 3
    space = hm + MSIZE - (w[im + DATA] + w[im + LEN])
    while True:
        ino = hn >> 3
        count = min(min(max(len, max_protohdr), space), w[ino + LEN])
        s, d = w[ino + DATA], w[im + DATA] + w[im + LEN]
        mv[d:d + count] = mv[s:s + count]
        len -= count
        w[im + LEN] += count
        w[ino + LEN] -= count
        space -= count
        if w[ino + LEN]:
            w[ino + DATA] += count
        else:
            hn = _free(c, hn)
        if not (len > 0 and hn):
            break
    if len > 0:
        w[im + NEXT] = hn
        return _pullup_bad(c, hm)
    w[im + NEXT] = hn
    return _wrap(c, hm)


def _pullup_bad(c, h):
    _freem(c, h)
    c.count("MPFAIL")
    return None


def m_prepend(m, len: int, how: int):
    """A new first mbuf with ``len`` bytes of room for a header, at the end of its
    data room (the packet header moves to it).  On failure the chain is freed and
    None returned."""
    c = _c(m, "m_prepend")
    len = _int("m_prepend: len", len)
    w, h = c.w, m.handle
    pkthdr = w[(m.handle >> 3) + FLAGS] & M_PKTHDR
    room = MHLEN if pkthdr else MLEN
    if not 0 <= len <= room:
        raise MbufError(f"m_prepend: len {len} is outside 0..{room}")
    how = _how(c, how)
    mn = _mget(c, how, _arg(_typ(w, (m.handle >> 3)), M_PKTHDR if pkthdr else 0))
    if mn is None:
        _freem(c, h)
        return None
    if pkthdr:
        _move_pkthdr(c, mn, h)
    i = mn >> 3
    w[i + NEXT] = h
    if len < room:
        w[i + DATA] += (room - len) & ~7
    w[i + LEN] = len
    return _wrap(c, mn)


def M_PREPEND(m, plen: int, how: int):
    """Make room for ``plen`` bytes before the data: in the leading space when
    there is enough (and it is writable), else with m_prepend.  Returns the new
    head (None after freeing the chain on failure); m_pkthdr.len grows."""
    c = _c(m, "M_PREPEND")
    plen = _int("M_PREPEND: plen", plen)
    if plen < 0:
        raise MbufError("M_PREPEND: negative plen")
    w, h = c.w, m.handle
    if _leading(c, h) >= plen:
        w[(m.handle >> 3) + DATA] -= plen
        w[(m.handle >> 3) + LEN] += plen
    else:
        m = m_prepend(m, plen, how)
        if m is None:
            return None
    if w[(m.handle >> 3) + FLAGS] & M_PKTHDR:
        w[(m.handle >> 3) + PH_LEN] += plen
    return m


def m_adj(mp, req_len: int) -> None:
    """Trim ``req_len`` bytes from the head (>= 0; emptied mbufs stay) or
    ``-req_len`` from the tail (< 0; emptied trailing mbufs are freed)."""
    c = _c(mp, "m_adj")
    req_len = _int("m_adj: req_len", req_len)
    w, hp = c.w, mp.handle
    length = req_len
    if length >= 0:
        h = hp
        while h and length > 0:
            i = h >> 3
            if w[i + LEN] <= length:
                length -= w[i + LEN]
                w[i + LEN] = 0
                h = w[i + NEXT]
            else:
                w[i + LEN] -= length
                w[i + DATA] += length
                length = 0
        if w[(mp.handle >> 3) + FLAGS] & M_PKTHDR:
            w[(mp.handle >> 3) + PH_LEN] -= req_len - length
        return
    length = -length
    count = 0
    h = hp
    while True:
        count += w[(h >> 3) + LEN]
        if not w[(h >> 3) + NEXT]:
            break
        h = w[(h >> 3) + NEXT]
    if w[(h >> 3) + LEN] >= length:
        w[(h >> 3) + LEN] -= length
        if w[(mp.handle >> 3) + FLAGS] & M_PKTHDR:
            w[(mp.handle >> 3) + PH_LEN] -= length
        return
    count = max(count - length, 0)
    if w[(mp.handle >> 3) + FLAGS] & M_PKTHDR:
        w[(mp.handle >> 3) + PH_LEN] = count
    h = hp
    while h:
        i = h >> 3
        if w[i + LEN] >= count:
            w[i + LEN] = count
            if w[i + NEXT]:
                nxt = w[i + NEXT]
                w[i + NEXT] = 0
                _freem(c, nxt)
            break
        count -= w[i + LEN]
        h = w[i + NEXT]


def m_cat(m, n) -> None:
    """Append chain ``n`` to ``m``: copy its data into ``m``'s last mbuf while that
    is writable and has room (freeing n's mbufs), else link the rest.  The packet
    header is not updated."""
    c = _c(m, "m_cat")
    hn = _same(c, n, "m_cat") if n is not None else 0
    w, mv = c.w, c.mv
    hm = m.handle
    while w[(hm >> 3) + NEXT]:
        hm = w[(hm >> 3) + NEXT]
    if hn == hm:
        raise MbufError(f"m_cat: mbuf {hn} is already in the chain")
    while hn:
        im, ino = hm >> 3, hn >> 3
        if _trailing(c, hm) < w[ino + LEN] or not _writable(c, im):
            w[im + NEXT] = hn
            return
        k = w[ino + LEN]
        s, d = w[ino + DATA], w[im + DATA] + w[im + LEN]
        mv[d:d + k] = mv[s:s + k]
        w[im + LEN] += k
        hn = _free(c, hn)


def m_split(m0, len0: int, wait: int):
    """Cut the chain after ``len0`` bytes and return the tail (with its own packet
    header if ``m0`` has one); when the cut falls inside external storage both
    halves share it.  None (the chain unchanged) if ``len0`` is past the end or an
    allocation fails."""
    c = _c(m0, "m_split")
    len0 = _int("m_split: len0", len0)
    if len0 < 0:
        raise MbufError("m_split: negative len0")
    how = _how(c, wait)
    n = _split(c, m0.handle, len0, how)
    return _wrap(c, n) if n else None


def _split(c, h0, len0, how):
    """m_split on handles: the tail's handle (0: nothing after the cut), or None
    when ``len0`` is past the end or an allocation fails (nothing changed)."""
    w, mv = c.w, c.mv
    length = len0
    h = h0
    while h and length > w[(h >> 3) + LEN]:
        length -= w[(h >> 3) + LEN]
        h = w[(h >> 3) + NEXT]
    if not h:
        return None
    i = h >> 3
    remain = w[i + LEN] - length
    i0 = h0 >> 3
    if w[i0 + FLAGS] & M_PKTHDR:
        n = _mget(c, how, _arg(_typ(w, i0), M_PKTHDR))
        if n is None:
            return None
        ino = n >> 3
        w[ino + PH_RCVIF] = w[i0 + PH_RCVIF]
        w[ino + PH_LEN] = w[i0 + PH_LEN] - len0
        old_len = w[i0 + PH_LEN]
        w[i0 + PH_LEN] = len0
        if not w[i + FLAGS] & M_EXT:
            if remain > MHLEN:
                # the tail cannot lead: an empty header mbuf, then split the data mbuf
                nxt = _split(c, h, length, how)
                if nxt is None:
                    w[i0 + PH_LEN] = old_len
                    _free(c, n)
                    return None
                w[ino + NEXT] = nxt
                w[ino + LEN] = 0
                return n
            w[ino + DATA] += (MHLEN - remain) & ~7
    elif remain == 0:
        n = w[i + NEXT]
        w[i + NEXT] = 0
        return n
    else:
        n = _mget(c, how, _arg(_typ(w, i), 0))
        if n is None:
            return None
        ino = n >> 3
        w[ino + DATA] += (MLEN - remain) & ~7
    if w[i + FLAGS] & M_EXT:
        w[ino + DATA] = w[i + DATA] + length
        _dupcl(c, n, h)
    else:
        s, d = w[i + DATA] + length, w[ino + DATA]
        mv[d:d + remain] = mv[s:s + remain]
    w[ino + LEN] = remain
    w[i + LEN] = length
    w[ino + NEXT] = w[i + NEXT]
    w[i + NEXT] = 0
    return n
