"""alloc: getting and freeing mbufs and their storage, with FreeBSD's names and
argument order -- modern FreeBSD's ``kern_mbuf.c`` (in the seed's day ``m_get`` and
friends were inlines in ``sys/mbuf.h`` and ``m_free`` lived in ``uipc_mbuf.c``).

    m_get, m_gethdr, m_getcl, m_getjcl, m_get2   an mbuf (with a cluster), or None
    m_getzone, m_clget, m_cljget, m_cljset       clusters: the zone, attach, a bare one
    m_extadd                                     attach external storage of the caller's
    m_init                                       what the ctor does, for MT_NOINIT mbufs
    m_free, m_freem                              one mbuf, a chain

Functions that take no mbuf take the keyword ``arena=``.  Allocations return None
when they cannot be satisfied (M_NOWAIT, a limit, the arena full, a refusing label
hook); M_WAITOK sleeps, optionally bounded by ``timeout=`` (TimeoutError); a failed
allocation on an arena low on pages runs vm_lowmem (at most once a second) and tries once more
(``reclaim``).  Where FreeBSD would panic (a KASSERT: a cluster attached twice, a
type out of range ...) MbufError is raised before anything is changed.

A free drops the mbuf's reference to its storage (``refs.drop_ref``: the last one
frees it), then gives the mbuf back to its zone.  The zones' ctors and dtors do the
rest (``ctors``).
"""

from __future__ import annotations

import errno as _errno
import operator
import os

from .. import hooks
from .. import layers
from .. import layout as L
from ..errors import BadHandleError, DoubleFreeError, HookError, ShmallocError
from ..zone import M_NOWAIT, M_WAITOK, M_ZERO
from .constants import (EXT_EXTADD_TYPES, EXT_EXTREF, EXT_JUMBO9, EXT_JUMBO16, EXT_JUMBOP,
                        EXT_NET_DRV, EXT_PACKET, M_EOR, M_EXT, M_FLAGS_MAX, M_NOFREE,
                        M_PKTHDR, MCLBYTES, MHLEN, MINCLSIZE, MJUMPAGESIZE, MLEN, MSIZE,
                        MT_NOINIT, MT_NOTMBUF)
from .ctors import mb_ctor_clust, mb_ctor_mbuf
from .errors import MbufError
from .header import Mbuf, _wrap
from .reclaim import lowmem_check
from .refs import J_DUP, RC_MAX, drop_ref, journal
from .tags import delete_chain
from .zones import (BTYPE, DATA, EXT_ARG1, EXT_ARG2, EXT_BUF, EXT_FREE, EXT_OWNER, EXT_REFCNT,
                    EXT_SIZE, EXT_TYPE, FLAGS, M_PKTDAT, NEXT, PACK_VERIFIED, PH_TAGS, ctx)

_ZERO_EXT = bytes(MSIZE - M_PKTDAT)
_FLAGS_OK = M_FLAGS_MAX & ~(M_EXT | M_NOFREE)    # flags an allocation may ask for
_TAG_ALLOC, _TAG_SHIFT = L.TAG_ALLOC, L.PAGE_SHIFT
_new = object.__new__


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


def _typ(c, h) -> int:
    """The type to give an mbuf made after mbuf ``h`` (MT_DATA for none)."""
    t = c.mv[h + BTYPE]
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
    """An allocation failed: if the keg manager asked this CPU for a drain, run its
    protocol drains now (``layers.run_drain_requests``); if the arena is low on
    pages, run vm_lowmem (once a second at most); after either, try once more."""
    drained = layers.run_drain_requests(c.arena)
    if lowmem_check(c) or drained:
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


def _getcl(c, how, arg, timeout=None):
    """A packet-zone handle (mbuf + cluster) for ``arg``, or None (with the retry)."""
    h = c.zpack.alloc(how, timeout, arg)
    if h is None:
        h = _retry(c, c.zpack, how, timeout, arg)
    return h


def m_getm2(m, len: int, how: int, type: int, flags: int, *, arena=None, timeout=None):
    """A chain of mbufs and clusters with room for ``len`` bytes, appended to chain
    ``m`` (then ``m`` is returned) or alone (``m`` None: give ``arena=``); FreeBSD 10+
    ``m_getm2`` (``kern_mbuf.c``; 8.0's ``uipc_mbuf.c`` did not try the jumbo with
    M_NOWAIT first).  Each step takes a page-size jumbo while more than MCLBYTES
    remain (tried M_NOWAIT, else a cluster with ``how``), a cluster from MINCLSIZE,
    else a plain mbuf; ``flags`` keep only M_PKTHDR (first mbuf, and only with no
    ``m``) and M_EOR (last mbuf; ``m``'s last mbuf loses it).  All or nothing: a
    failure frees what was made and returns None, ``m`` untouched.  ``len`` 0 with
    no ``m`` gives None."""
    if m is None:
        if arena is None:
            raise TypeError("m_getm2(None, ...) needs arena=")
        c = ctx(arena)
    else:
        c = _c(m, "m_getm2")
    len = _int("m_getm2: len", len)
    flags = _int("m_getm2: flags", flags) & (M_PKTHDR | M_EOR)
    if len < 0:
        raise MbufError(f"m_getm2: len {len} < 0")
    if m is not None:
        flags &= ~M_PKTHDR
    if len == 0 and flags & M_EOR:
        raise MbufError("m_getm2: M_EOR with len 0 marks no mbuf (FreeBSD dereferences a "
                        "NULL tail)")
    how = _how(c, how)
    w = c.w
    top = tail = 0
    while len > 0:
        h = None
        pk = flags & M_PKTHDR
        if len > MCLBYTES:
            j = m_getjcl(M_NOWAIT, type, pk, MJUMPAGESIZE, arena=c.arena)
            h = j.handle if j is not None else None
        if h is None:
            if len >= MINCLSIZE:
                h = _getcl(c, how, _arg(type, pk), timeout)
            else:
                h = _mget(c, how, _arg(type, pk), timeout)
            if h is None:
                _freem(c, top)
                return None
        i = h >> 3
        len -= (w[i + EXT_SIZE] if w[i + FLAGS] & M_EXT else MHLEN if pk else MLEN)
        if tail:
            w[(tail >> 3) + NEXT] = h
        else:
            top = h
        tail = h
        flags &= ~M_PKTHDR
    if flags & M_EOR:
        w[(tail >> 3) + FLAGS] |= M_EOR
    if m is None:
        return _wrap(c, top) if top else None
    last = m.handle
    while w[(last >> 3) + NEXT]:
        last = w[(last >> 3) + NEXT]
    w[(last >> 3) + NEXT] = top
    w[(last >> 3) + FLAGS] &= ~M_EOR
    return m


def m_getm(m, len: int, how: int, type: int, *, arena=None, timeout=None):
    """``m_getm2(m, len, how, type, M_PKTHDR)`` (FreeBSD's macro)."""
    return m_getm2(m, len, how, type, M_PKTHDR, arena=arena, timeout=timeout)


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
    _cljset(c, m, _int("m_cljset: cluster", cl), type, "m_cljset")


def _cljset(c, m, cl, type, what):
    z = c.zone_of_type.get(type)
    if z is None:
        raise MbufError(f"{what}: ext type {type} is not a cluster type")
    ti = z.keg.tag_index_of(cl)
    if ti < 0 or L.tag_state(c.u32[ti]) != L.TAG_ALLOC:
        raise BadHandleError(f"{what}: {cl} is not an allocated cluster of zone {z.name!r}")
    if c.w[(m.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"{what}: mbuf {m.handle} already has external storage")
    r = z.keg.ref_index(cl)
    if c.u32[r] != 1:
        raise MbufError(f"{what}: cluster {cl} already has {c.u32[r]} references")
    mb_ctor_clust(z, cl, m.handle, M_NOWAIT)


# ============================================================================ m_extadd
# the ext types m_extadd takes (FreeBSD 7/8 sys/mbuf.h): counted in mbuf_ext_refcnt and
# freed by the free routine; the jumbo clusters (a bare cluster of the zone, attached
# as m_cljset attaches it: its own count, freed to its zone, as FreeBSD's mb_free_ext
# frees them); EXT_EXTREF (the caller's counter).  EXT_CLUSTER is refused as FreeBSD
# KASSERTs it, EXT_PACKET because it is the packet zone's own (an mbuf given to it at
# the last reference would corrupt that zone).
_JUMBO_TYPES = (EXT_JUMBOP, EXT_JUMBO9, EXT_JUMBO16)
_MAIN = "__main__@"                     # a free routine of this process's __main__


def _ext_free_name(freef, what) -> str:
    """The name stored for free routine ``freef``: module-qualified, or, for a function
    of ``__main__`` (which another process cannot import), ``__main__@<pid>:<name>``:
    only this process may call it (``refs._ext_free`` refuses it elsewhere)."""
    if isinstance(freef, str) and freef.startswith("__main__:"):
        hooks.resolve(freef)
        name = f"{_MAIN}{os.getpid()}:{freef.partition(':')[2]}"
    elif (callable(freef) and getattr(freef, "__module__", None) == "__main__"
          and "<" not in getattr(freef, "__qualname__", "<")):
        name = f"{_MAIN}{os.getpid()}:{freef.__qualname__}"
        if hooks.resolve(f"__main__:{freef.__qualname__}") is not freef:
            raise HookError(f"{what}: free routine {freef!r} is not __main__."
                            f"{freef.__qualname__}")
    else:
        name = hooks.name_of(freef)
    if not name or len(name.encode()) >= L.EXT_FREE_BYTES:
        raise MbufError(f"{what}: the free routine's name {name!r} must be 1.."
                        f"{L.EXT_FREE_BYTES - 1} bytes")
    return name


def _check_storage(c, what, buf, size) -> None:
    g = c.core.geometry
    if size <= 0 or buf < g.data_off or buf + size > g.size:
        raise MbufError(f"{what}: storage {buf}+{size} is not inside the arena's data "
                        f"pages ({g.data_off}..{g.size})")
    fm = g.freemap_off
    if c.core.buf.find(b"\x01", fm + (buf >> L.PAGE_SHIFT),
                       fm + (buf + size - 1 >> L.PAGE_SHIFT) + 1) >= 0:
        raise MbufError(f"{what}: storage {buf}+{size} lies on free pages")


def _counter(c, what, ref_cnt) -> int:
    """The u32 index of the caller's counter at handle ``ref_cnt`` (EXT_EXTREF)."""
    if ref_cnt is None:
        raise MbufError(f"{what}: EXT_EXTREF storage needs the caller's counter (ref_cnt=)")
    ref_cnt = _int(f"{what}: ref_cnt", ref_cnt)
    if ref_cnt & 3:
        raise MbufError(f"{what}: ref_cnt {ref_cnt} is not a u32 (4-aligned)")
    _check_storage(c, what, ref_cnt, 4)
    return ref_cnt >> 2


def _attach(c, h, buf, size, type, r, arg1, arg2, name, flags) -> None:
    """m_ext of mbuf ``h`` names the storage, then M_EXT (last: the claim)."""
    w, i = c.w, h >> 3
    w[i + EXT_BUF] = buf
    w[i + EXT_SIZE] = size
    w[i + EXT_TYPE] = type
    w[i + EXT_REFCNT] = r << 2
    w[i + EXT_ARG1] = arg1
    w[i + EXT_ARG2] = arg2
    w[i + EXT_OWNER] = h
    L.write_str(c.mv, h + EXT_FREE, L.EXT_FREE_BYTES, name)
    w[i + DATA] = buf
    w[i + FLAGS] |= M_EXT | flags


def m_extadd(mb, buf: int, size: int, freef, arg1: int = 0, arg2: int = 0, flags: int = 0,
             type: int = None, *, ref_cnt: int | None = None) -> int:
    """Attach external storage ``[buf, buf + size)`` (handles of this arena) to
    ``mb`` (FreeBSD 7/8 ``m_extadd``), of any ext type of that era:

    - EXT_SFBUF, EXT_NET_DRV (the default), EXT_MOD_TYPE, EXT_DISPOSABLE, EXT_MBUF:
      the count comes from mbuf_ext_refcnt; the free routine ``freef`` (a name, or
      a function resolvable in every process -- one of ``__main__`` works when
      this process frees the last reference, and is refused in any other) is
      called as ``freef(m, arg1, arg2)`` once, when the last reference goes -- at
      most once if the CPU dropping it dies (``refs.drop_ref``: then the storage
      may be leaked, never freed twice);
    - EXT_EXTREF: the count is the caller's u32 at handle ``ref_cnt`` (FreeBSD: the
      pointer stored in ``m_ext.ref_cnt`` beforehand), set to 1 as FreeBSD 7/8 does
      (``m_extaddref`` adds a reference to a counter in use instead); at the last
      reference ``freef`` is called and the counter left as it is;
    - EXT_JUMBOP, EXT_JUMBO9, EXT_JUMBO16: ``buf`` is a bare cluster of that zone
      (``m_cljget(None, ...)``), attached as ``m_cljset`` does and freed to its zone
      at the last reference (``freef`` is not called, as in FreeBSD).

    EXT_CLUSTER is refused (FreeBSD KASSERTs: ``m_clget``/``m_cljset`` attach
    clusters), and EXT_PACKET (the packet zone's own).  ``flags`` are ORed into
    m_flags (not M_EXT, M_NOFREE, nor M_PKTHDR on an mbuf without one).  Returns 0,
    or ENOMEM when no count could be had from mbuf_ext_refcnt (nothing attached:
    FreeBSD leaves M_EXT clear then)."""
    c = _c(mb, "m_extadd")
    if type is None:
        type = EXT_NET_DRV
    if type not in EXT_EXTADD_TYPES and type not in _JUMBO_TYPES and type != EXT_EXTREF:
        raise MbufError(f"m_extadd: ext type {type} is not one of EXT_SFBUF, EXT_NET_DRV, "
                        f"EXT_MOD_TYPE, EXT_DISPOSABLE, EXT_MBUF, EXT_EXTREF, EXT_JUMBOP, "
                        f"EXT_JUMBO9, EXT_JUMBO16 (2k clusters: m_clget, m_cljset)")
    buf, size = _int("m_extadd: buf", buf), _int("m_extadd: size", size)
    arg1, arg2 = _int("m_extadd: arg1", arg1), _int("m_extadd: arg2", arg2)
    flags = _int("m_extadd: flags", flags)
    if flags & ~_FLAGS_OK or flags & M_PKTHDR and not c.w[(mb.handle >> 3) + FLAGS] & M_PKTHDR:
        raise MbufError(f"m_extadd: flags {flags:#x} may not add M_EXT, M_NOFREE or M_PKTHDR")
    if type in _JUMBO_TYPES:
        z = c.zone_of_type[type]
        if size != z.size:
            raise MbufError(f"m_extadd: a cluster of zone {z.name!r} is {z.size} bytes, "
                            f"not {size}")
        _cljset(c, mb, buf, type, "m_extadd")
        w, i = c.w, mb.handle >> 3
        w[i + EXT_ARG1] = arg1
        w[i + EXT_ARG2] = arg2
        w[i + FLAGS] |= flags
        return 0
    _check_storage(c, "m_extadd", buf, size)
    name = _ext_free_name(freef, "m_extadd")
    r = _counter(c, "m_extadd", ref_cnt) if type == EXT_EXTREF else None
    if c.w[(mb.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"m_extadd: mbuf {mb.handle} already has external storage")
    if r is not None:
        # the caller's counter, set to 1 (FreeBSD 7/8) in a journaled step, as a
        # reference is counted (``refs``): the mbuf claims, then the count
        lk = c.extref_lock
        lk.acquire(owner_id=c.cpu)
        try:
            c.w[c.extref_journal] = journal(J_DUP, 1, mb.handle)
            _attach(c, mb.handle, buf, size, type, r, arg1, arg2, name, flags)
            c.u32[r] = 1
        finally:
            lk.release()
        _disown_storage(c, buf)
        return 0
    h = c.zextref.alloc(M_NOWAIT)
    if h is None:
        return _errno.ENOMEM
    c.u32[h >> 2] = 1
    # the count, and storage that is an item this CPU holds, belong to the
    # references from now on: held by no CPU, so that the recovery of this CPU
    # (should it die) leaves them to the mbufs that still point at them.  Named
    # by the mbuf first: a crash before M_EXT leaves them held by this CPU, which
    # recovery frees; after, the mbuf's recovery drops its reference, taking them
    # over from wherever they are held (disowned first, a crash in between left
    # the count held by nobody and named by no mbuf: leaked)
    _attach(c, mb.handle, buf, size, type, h >> 2, arg1, arg2, name, flags)
    c.arena.disown(h)
    _disown_storage(c, buf)
    return 0


def _disown_storage(c, buf):
    try:
        c.arena.disown(buf)
    except ShmallocError:
        pass                                # not an item of ours: the caller's business


def m_extaddref(m, buf: int, size: int, ref_cnt: int, freef, arg1: int = 0,
                arg2: int = 0) -> None:
    """Attach ``[buf, buf + size)`` to ``m`` as EXT_EXTREF storage whose count is the
    caller's u32 at handle ``ref_cnt``, adding one reference to it (FreeBSD 9.3+
    ``m_extaddref``: the caller may hold references already).  When the last
    reference goes ``freef(m, arg1, arg2)`` is called and the counter, at 1, left
    alone.  The storage stays the caller's (not disowned, unlike m_extadd's)."""
    c = _c(m, "m_extaddref")
    buf, size = _int("m_extaddref: buf", buf), _int("m_extaddref: size", size)
    arg1, arg2 = _int("m_extaddref: arg1", arg1), _int("m_extaddref: arg2", arg2)
    _check_storage(c, "m_extaddref", buf, size)
    r = _counter(c, "m_extaddref", ref_cnt)
    name = _ext_free_name(freef, "m_extaddref")
    if c.w[(m.handle >> 3) + FLAGS] & M_EXT:
        raise MbufError(f"m_extaddref: mbuf {m.handle} already has external storage")
    lk = c.extref_lock
    lk.acquire(owner_id=c.cpu)
    try:
        rc = c.u32[r]
        if rc >= RC_MAX:
            raise MbufError(f"m_extaddref: the counter at {ref_cnt} is {rc} (the most)")
        c.w[c.extref_journal] = journal(J_DUP, rc + 1, m.handle)
        _attach(c, m.handle, buf, size, EXT_EXTREF, r, arg1, arg2, name, 0)
        c.u32[r] = rc + 1
    finally:
        lk.release()


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
    r = mb_ctor_mbuf(c.zmbuf, m.handle, arg, how)
    return 0 if r is not False else _errno.ENOMEM


# ============================================================================ free
def _bad(c, h, what):
    """Raise the most precise error for ``h``, which is not a live mbuf."""
    if not isinstance(h, int):
        raise TypeError(f"{what}: expected an mbuf, not {type(h).__name__}")
    if c.is_mbuf(h) >= 0 and c.mv[h + BTYPE] == MT_NOTMBUF:
        raise DoubleFreeError(f"{what}: mbuf {h} was freed already (it waits for the other "
                              f"references to its cluster to go)")
    ti = c.mkeg.tag_index_of(h)
    if ti >= 0 and L.tag_zidx(c.u32[ti]) == c.zidx_pack:
        c.zpack._raise_bad(h, what)
    c.zmbuf._raise_bad(h, what)
    raise BadHandleError(f"{what}: {h} is not an allocated mbuf")


def _free(c, h: int) -> int:
    """m_free on handle ``h``; returns m_next's handle."""
    w, i = c.w, h >> 3
    try:
        flags, typ, nxt = w[i + FLAGS], c.mv[h + BTYPE], w[i + NEXT]
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
        b = c.core.pt[h >> 12] ^ c.mkid_bits        # Keg.tag_index_of, inlined (hot)
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


def _purge_and_free(c, h, i, flags):
    # m_ext zeroed before M_EXT goes: a crash in between leaves an mbuf with M_EXT
    # and no count, which recovery frees without a drop (``refs._forgotten``)
    c.mv[h + M_PKTDAT:h + MSIZE] = _ZERO_EXT
    c.w[i + FLAGS] &= ~M_EXT
    c.zmbuf.free(h)


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
            and w[i + EXT_OWNER] == h and c.mv[h + BTYPE] and c.u32[w[i + EXT_REFCNT] >> 2] == 1):
        c.zpack.free(h, PACK_VERIFIED)
        return
    while h:
        h = _free(c, h)


def _freem(c, h):
    while h:
        h = _free(c, h)
