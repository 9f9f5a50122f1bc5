"""chains: the functions that read, copy and reshape mbuf chains, with FreeBSD's
names and argument order -- FreeBSD's ``uipc_mbuf.c`` (and the data-access macros
of ``sys/mbuf.h``).

    mtod, M_WRITABLE, M_LEADINGSPACE, M_TRAILINGSPACE, M_ALIGN, MH_ALIGN   one mbuf
    m_move_pkthdr, m_dup_pkthdr, m_demote                   packet headers and their tags
    m_length, m_last, m_fixhdr, m_copydata, m_copyback, m_append        a chain's data
    m_copym, m_copypacket, m_dup                            copies (shared or deep)
    m_pullup, m_prepend, M_PREPEND, m_adj, m_cat, m_split   reshaping
    m_unshare                                               writable storage for a chain

External storage is shared by reference (m_copym, m_split, m_copypacket: one more
reference, ``refs._dupcl``).  Shared storage is read-only (M_WRITABLE false): no
leading or trailing space, and ``mtod`` gives a read-only view.  New mbufs come from
``alloc``, freed ones go back through it.  Where FreeBSD would panic (a KASSERT: an
offset or length outside the chain ...) MbufError is raised before anything is
changed; an allocation that fails midway gives back what it made (MCFAIL, MPFAIL
are counted as in the seed's mbstat).

An mbuf's m_len is the u32 at ``ULEN`` of the 32-bit view (``u[(h >> 2) + ULEN]``), its
m_type the byte at ``BTYPE``; the other fields are words (``zones``).
"""

from __future__ import annotations

import sys

from .. import layout as L
from .alloc import _arg, _c, _free, _freem, _getcl, _how, _int, _mget, _typ, m_getm2
from .constants import (M_COPYALL, M_COPYFLAGS, M_EOR, M_EXT, M_FREELIST, M_NOWAIT, M_PKTHDR,
                        M_RDONLY, MCLBYTES, MHLEN, MINCLSIZE, MLEN, MSIZE, MT_DATA)
from .errors import MbufError
from .header import Mbuf, _wrap, refs, storage
from .refs import _dupcl
from .tags import copy_chain, delete_chain, move_chain
from .zones import (DATA, EXT_BUF, EXT_SIZE, FLAGS, FLAGS_MASK, M_DAT, M_PKTDAT, NEXT,
                    NEXTPKT, PH, PH_LEN, PH_RCVIF, PH_TAGS, PKTHDR_END, ULEN, ctx, set_flags)

_ZERO_PH = bytes(M_PKTDAT - M_DAT)
_MAX_PROTOHDR = L.MBS_WORD + L.MBS["MAX_PROTOHDR"]
_MAX_LINKHDR = L.MBS_WORD + L.MBS["MAX_LINKHDR"]


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
    return storage(w, h)[1] - (w[i + DATA] + c.u32[(h >> 2) + ULEN])


def _pkthdr_words(c, to, frm):
    """What m_dup_pkthdr and m_move_pkthdr share: ``to`` gets ``frm``'s copied flags and
    packet header words, with no tags (the ones it had are deleted)."""
    w = c.w
    it, ifr = to >> 3, frm >> 3
    if w[it + FLAGS] & M_PKTHDR and w[it + PH_TAGS]:
        delete_chain(c, to, 0)
    set_flags(w, it, (w[ifr + FLAGS] & M_COPYFLAGS) | (w[it + FLAGS] & M_EXT))
    if not w[it + FLAGS] & M_EXT:
        w[it + DATA] = to + M_PKTDAT
    w[it + PH:it + PKTHDR_END] = w[ifr + PH:ifr + PKTHDR_END]
    w[it + PH_TAGS] = 0


def _dup_pkthdr(c, to, frm, how) -> bool:
    """``m_dup_pkthdr``: ``to`` gets a copy of ``frm``'s packet header and tags."""
    _pkthdr_words(c, to, frm)
    return copy_chain(c, to, frm, how)


def _move_pkthdr(c, to, frm):
    """``m_move_pkthdr``: the packet header and its tags move to ``to``."""
    _pkthdr_words(c, to, frm)
    move_chain(c, to, frm)
    c.w[(frm >> 3) + FLAGS] &= ~M_PKTHDR


def _chain_len(c, h) -> int:
    w, u, n = c.w, c.u32, 0
    while h:
        n += u[(h >> 2) + ULEN]
        h = w[(h >> 3) + NEXT]
    return n


def _seek(c, h, off):
    """(mbuf, offset in it) of byte ``off`` of the chain at ``h``: the mbufs wholly
    before it are skipped (off 0 stays in ``h``; past the end: 0 and what is left)."""
    w, u = c.w, c.u32
    while off > 0 and h:
        n = u[(h >> 2) + ULEN]
        if off < n:
            break
        off -= n
        h = w[(h >> 3) + NEXT]
    return h, off


def _same(c, m, what):
    if m.__class__ is not Mbuf or m._c.core is not c.core:
        raise TypeError(f"{what}: expected an Mbuf of the same arena, not {m!r}")
    return m.handle


def _pkthdr(c, h, what):
    if not c.w[(h >> 3) + FLAGS] & M_PKTHDR:
        raise MbufError(f"{what}: mbuf {h} has no packet header (M_PKTHDR)")


def _max_protohdr(c) -> int:
    """``max_protohdr`` of the arena (``kern.ipc.max_protohdr``)."""
    return c.w[_MAX_PROTOHDR]


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


def _demote(c, h0, all):
    w = c.w
    h = h0 if all else w[(h0 >> 3) + NEXT]
    while h:
        i = h >> 3
        if w[i + FLAGS] & M_PKTHDR:
            if w[i + PH_TAGS]:
                delete_chain(c, h, 0)
            w[i + FLAGS] &= ~M_PKTHDR
            c.mv[h + M_DAT:h + M_PKTDAT] = _ZERO_PH
        if h != h0:
            w[i + NEXTPKT] = 0
        w[i + FLAGS] &= M_EXT | M_EOR | M_RDONLY | M_FREELIST | ~FLAGS_MASK
        h = w[i + NEXT]


def m_demote(m0, all: int) -> None:
    """Strip packet headers (and their tags) from the chain, the first mbuf only
    when ``all``; keep only M_EXT, M_EOR, M_RDONLY and M_FREELIST."""
    c = _c(m0, "m_demote")
    _demote(c, m0.handle, all)


# ============================================================================ data access
def mtod(m) -> memoryview:
    """The mbuf's storage from m_data to its end (the data is the first m_len
    bytes): writable exactly when the mbuf is M_WRITABLE -- read-only when its
    storage is shared with another mbuf (FreeBSD's mtod is a bare pointer and lets
    anyone write shared storage; here it is protected) or M_RDONLY.  A packet
    freed while copies share its cluster holds no reference of anybody's: the
    last copy sees a count of 1 and writes (``m_unshare`` gives any chain
    writable storage)."""
    c = m._c
    w, i = c.w, (m.handle >> 3)
    flags = w[i + FLAGS]
    if flags & M_EXT:
        end = w[i + EXT_BUF] + w[i + EXT_SIZE]
        v = c.mv[w[i + DATA]:end]
        if flags & M_RDONLY or refs(c, w, i) != 1:
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


def _copydata(c, h, off, len, dst, pos=0):
    """Bytes [off, off+len) of the chain at ``h`` into ``dst[pos:]`` (checked)."""
    w, u, mv = c.w, c.u32, c.mv
    h, off = _seek(c, h, off)
    while len > 0:
        n = min(u[(h >> 2) + ULEN] - off, len)
        d = w[(h >> 3) + DATA] + off
        dst[pos:pos + n] = mv[d:d + n]
        pos += n
        len -= n
        off = 0
        h = w[(h >> 3) + NEXT]


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
    _copydata(c, m.handle, off, len, dst)
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
    w, u, mv = c.w, c.u32, c.mv
    # dry run over the existing mbufs: would any byte land in read-only storage?
    h, o = _seek(c, m0.handle, off)
    n_left = len
    while h and n_left > 0:
        i = h >> 3
        mlen = u[(h >> 2) + ULEN]
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
    typ = _typ(c, m0.handle)
    while off > u[(m >> 2) + ULEN]:
        mlen = u[(m >> 2) + ULEN]
        off -= mlen
        totlen += mlen
        if not w[(m >> 3) + NEXT]:
            n = _mget(c, M_NOWAIT, _arg(typ, 0))
            if n is None:
                return _copyback_out(c, m0, totlen)
            mv[n + M_DAT:n + MSIZE] = bytes(MLEN)
            u[(n >> 2) + ULEN] = min(MLEN, len + off)
            w[(m >> 3) + NEXT] = n
        m = w[(m >> 3) + NEXT]
    while len > 0:
        i, j = m >> 3, m >> 2
        if not w[i + NEXT] and len > u[j + ULEN] - off:
            u[j + ULEN] += min(len - (u[j + ULEN] - off), _trailing(c, m))
        mlen = min(u[j + ULEN] - off, len)
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
            u[(n >> 2) + ULEN] = min(MLEN, len)
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
    return _append(c, m0.handle, len, src)


def _append(c, h0, len, src) -> int:
    w, u, mv = c.w, c.u32, c.mv
    m = h0
    while w[(m >> 3) + NEXT]:
        m = w[(m >> 3) + NEXT]
    remainder, pos = len, 0
    space = _trailing(c, m)
    if space > 0:
        space = min(space, remainder)
        d = w[(m >> 3) + DATA] + u[(m >> 2) + ULEN]
        mv[d:d + space] = src[:space]
        u[(m >> 2) + ULEN] += space
        pos += space
        remainder -= space
    typ = _typ(c, m)
    while remainder > 0:
        n = _mget(c, M_NOWAIT, _arg(typ, 0))
        if n is None:
            break
        k = min(MLEN, remainder)
        u[(n >> 2) + ULEN] = k
        d = w[(n >> 3) + DATA]
        mv[d:d + k] = src[pos:pos + k]
        pos += k
        remainder -= k
        w[(m >> 3) + NEXT] = n
        m = n
    if w[(h0 >> 3) + FLAGS] & M_PKTHDR:
        w[(h0 >> 3) + PH_LEN] += len - remainder
    return int(remainder == 0)


# ============================================================================ copies
def _copy_into(c, n, m, off, k):
    """Data [off, off+k) of ``m`` into ``n`` (at n's m_data): share or copy."""
    w = c.w
    im, in_ = m >> 3, n >> 3
    c.u32[(n >> 2) + ULEN] = k
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
    w, u = c.w, c.u32
    h = m.handle
    total = _chain_len(c, h)
    if off0 > total:
        raise MbufError(f"m_copym: offset {off0} > size of the mbuf chain ({total})")
    if len != M_COPYALL and off0 + len > total:
        raise MbufError(f"m_copym: length {off0}+{len} > size of the mbuf chain ({total})")
    copyhdr = off0 == 0 and w[(m.handle >> 3) + FLAGS] & M_PKTHDR
    h, off = _seek(c, h, off0)
    top = prev = 0
    try:
        while len > 0 and h:
            i = h >> 3
            n = _mget(c, how, _arg(_typ(c, h), M_PKTHDR if copyhdr else 0))
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
            k = min(len, u[(h >> 2) + ULEN] - off)
            _copy_into(c, n, h, off, k)
            if len != M_COPYALL:
                len -= k
            off = 0
            h = w[i + NEXT]
    except MbufError:                    # storage that cannot be shared (_dupcl refuses
        _freem(c, top)                   # before it changes anything): the copy goes
        raise
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
    w, u = c.w, c.u32
    i = h >> 3
    n = _mget(c, how, _arg(_typ(c, h), 0))
    if n is None:
        return _nospace(c, 0)
    top = n
    if not _dup_pkthdr(c, n, h, how):
        return _nospace(c, top)
    if w[i + FLAGS] & M_EXT:
        u[(n >> 2) + ULEN] = u[(h >> 2) + ULEN]
        w[(n >> 3) + DATA] = w[i + DATA]
        try:
            _dupcl(c, n, h)
        except MbufError:                # refused before anything changed (as m_copym)
            _freem(c, top)
            raise
    else:
        w[(n >> 3) + DATA] = n + M_PKTDAT + (w[i + DATA] - (h + M_PKTDAT))
        _copy_into(c, n, h, 0, u[(h >> 2) + ULEN])
    h = w[i + NEXT]
    while h:
        o = _mget(c, how, _arg(_typ(c, h), 0))
        if o is None:
            return _nospace(c, top)
        w[(n >> 3) + NEXT] = o
        n = o
        _copy_into(c, n, h, 0, u[(h >> 2) + ULEN])
        h = w[(h >> 3) + NEXT]
    return _wrap(c, top)


def m_dup(m, how: int):
    """A deep, writable copy of a packet into fresh mbufs and clusters (a cluster
    whenever at least MINCLSIZE bytes remain).  None on failure (nothing leaks)."""
    c = _c(m, "m_dup")
    h = m.handle
    _pkthdr(c, h, "m_dup")
    how = _how(c, how)
    w, u, mv = c.w, c.u32, c.mv
    remain = w[(m.handle >> 3) + PH_LEN]
    if remain != _chain_len(c, h):
        raise MbufError(f"m_dup: m_pkthdr.len {remain} != chain length {_chain_len(c, h)}")
    typ = _typ(c, m.handle)
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
        ni, nj = n >> 3, n >> 2
        u[nj + ULEN] = 0
        while u[nj + ULEN] < nsize and h:
            i = h >> 3
            chunk = min(nsize - u[nj + ULEN], u[(h >> 2) + ULEN] - moff)
            s, d = w[i + DATA] + moff, w[ni + DATA] + u[nj + ULEN]
            mv[d:d + chunk] = mv[s:s + chunk]
            moff += chunk
            u[nj + ULEN] += chunk
            remain -= chunk
            if moff == u[(h >> 2) + ULEN]:
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
    w, u = c.w, c.u32
    hn = n.handle
    i = hn >> 3
    if (not w[i + FLAGS] & M_EXT and w[i + DATA] + len < hn + MSIZE and w[i + NEXT]):
        if u[(hn >> 2) + ULEN] >= len:
            return n
        hm = hn
        hn = w[i + NEXT]
        len -= u[(hm >> 2) + ULEN]
    else:
        if len > MHLEN:
            return _pullup_bad(c, hn)
        hm = _mget(c, M_NOWAIT, _arg(_typ(c, hn), 0))
        if hm is None:
            return _pullup_bad(c, hn)
        u[(hm >> 2) + ULEN] = 0
        if w[i + FLAGS] & M_PKTHDR:
            _move_pkthdr(c, hm, hn)
    return _pull(c, hm, hn, len, hm + MSIZE - (w[(hm >> 3) + DATA] + u[(hm >> 2) + ULEN]),
                 _pullup_bad)


def _pull(c, hm, hn, len, space, bad):
    """The copy loop of m_pullup and m_copyup: at least ``len`` (and up to
    max_protohdr) bytes from the chain at ``hn`` into ``hm`` (``space`` bytes of room
    after its data); emptied mbufs are freed.  ``hm`` followed by what is left, or
    ``bad(c, hm)`` when the chain ran out first."""
    w, u, mv = c.w, c.u32, c.mv
    im, jm = hm >> 3, hm >> 2
    protohdr = _max_protohdr(c)
    while True:
        ino, jno = hn >> 3, hn >> 2
        count = min(min(max(len, protohdr), space), u[jno + ULEN])
        s, d = w[ino + DATA], w[im + DATA] + u[jm + ULEN]
        mv[d:d + count] = mv[s:s + count]
        len -= count
        u[jm + ULEN] += count
        u[jno + ULEN] -= count
        space -= count
        if u[jno + ULEN]:
            w[ino + DATA] += count
        else:
            hn = _free(c, hn)
        if not (len > 0 and hn):
            break
    w[im + NEXT] = hn
    if len > 0:
        return bad(c, hm)
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
    mn = _mget(c, how, _arg(_typ(c, m.handle), M_PKTHDR if pkthdr else 0))
    if mn is None:
        _freem(c, h)
        return None
    if pkthdr:
        _move_pkthdr(c, mn, h)
    i = mn >> 3
    w[i + NEXT] = h
    if len < room:
        w[i + DATA] += (room - len) & ~7
    c.u32[(mn >> 2) + ULEN] = len
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
        c.u32[(m.handle >> 2) + ULEN] += plen
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
    _adj(c, mp.handle, req_len)


def _adj(c, hp, req_len):
    w, u = c.w, c.u32
    length = req_len
    if length >= 0:
        h = hp
        while h and length > 0:
            j = h >> 2
            if u[j + ULEN] <= length:
                length -= u[j + ULEN]
                u[j + ULEN] = 0
                h = w[(h >> 3) + NEXT]
            else:
                u[j + ULEN] -= length
                w[(h >> 3) + DATA] += length
                length = 0
        if w[(hp >> 3) + FLAGS] & M_PKTHDR:
            w[(hp >> 3) + PH_LEN] -= req_len - length
        return
    length = -length
    count = 0
    h = hp
    while True:
        count += u[(h >> 2) + ULEN]
        if not w[(h >> 3) + NEXT]:
            break
        h = w[(h >> 3) + NEXT]
    if u[(h >> 2) + ULEN] >= length:
        u[(h >> 2) + ULEN] -= length
        if w[(hp >> 3) + FLAGS] & M_PKTHDR:
            w[(hp >> 3) + PH_LEN] -= length
        return
    count = max(count - length, 0)
    if w[(hp >> 3) + FLAGS] & M_PKTHDR:
        w[(hp >> 3) + PH_LEN] = count
    h = hp
    while h:
        i, j = h >> 3, h >> 2
        if u[j + ULEN] >= count:
            u[j + ULEN] = count
            if w[i + NEXT]:
                nxt = w[i + NEXT]
                w[i + NEXT] = 0
                _freem(c, nxt)
            break
        count -= u[j + ULEN]
        h = w[i + NEXT]


def m_cat(m, n) -> None:
    """Append chain ``n`` to ``m``: copy its data into ``m``'s last mbuf while that
    is writable and has room (freeing n's mbufs), else link the rest.  The packet
    header is not updated."""
    c = _c(m, "m_cat")
    hn = _same(c, n, "m_cat") if n is not None else 0
    _cat(c, m.handle, hn)


def _cat(c, hm, hn):
    w, u, mv = c.w, c.u32, c.mv
    while w[(hm >> 3) + NEXT]:
        hm = w[(hm >> 3) + NEXT]
    if hn == hm:
        raise MbufError(f"m_cat: mbuf {hn} is already in the chain")
    while hn:
        im = hm >> 3
        k = u[(hn >> 2) + ULEN]
        if _trailing(c, hm) < k or not _writable(c, im):
            w[im + NEXT] = hn
            return
        s, d = w[(hn >> 3) + DATA], w[im + DATA] + u[(hm >> 2) + ULEN]
        mv[d:d + k] = mv[s:s + k]
        u[(hm >> 2) + ULEN] += k
        hn = _free(c, hn)


def m_split(m0, len0: int, wait: int):
    """Cut the chain after ``len0`` bytes and return the tail (with its own packet
    header if ``m0`` has one); when the cut falls inside external storage both
    halves share it.  A packet cut at the end of an mbuf (``remain == 0``, FreeBSD
    10+) gets a new, empty packet-header mbuf of its own as the tail's head: no
    zero-length tail shares the cluster.  None (the chain unchanged) if ``len0`` is
    past the end or an allocation fails."""
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
    w, u = c.w, c.u32
    length = len0
    h = h0
    while h and length > u[(h >> 2) + ULEN]:
        length -= u[(h >> 2) + ULEN]
        h = w[(h >> 3) + NEXT]
    if not h:
        return None
    i = h >> 3
    remain = u[(h >> 2) + ULEN] - length
    i0 = h0 >> 3
    if remain == 0 and w[i0 + FLAGS] & M_PKTHDR:
        # FreeBSD 10+: the tail starts with an empty packet header of its own (even
        # after the last mbuf); the cut mbuf keeps its storage alone
        n = _mget(c, how, _arg(_typ(c, h0), M_PKTHDR))
        if n is None:
            return None
        ino = n >> 3
        w[ino + NEXT] = w[i + NEXT]
        w[i + NEXT] = 0
        w[ino + PH_RCVIF] = w[i0 + PH_RCVIF]
        w[ino + PH_LEN] = w[i0 + PH_LEN] - len0
        w[i0 + PH_LEN] = len0
        return n
    if w[i0 + FLAGS] & M_PKTHDR:
        n = _mget(c, how, _arg(_typ(c, h0), M_PKTHDR))
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
                u[(n >> 2) + ULEN] = 0
                return n
            w[ino + DATA] += (MHLEN - remain) & ~7
    elif remain == 0:
        n = w[i + NEXT]
        w[i + NEXT] = 0
        return n
    else:
        n = _mget(c, how, _arg(_typ(c, h), 0))
        if n is None:
            return None
        ino = n >> 3
        w[ino + DATA] += (MLEN - remain) & ~7
    if w[i + FLAGS] & M_EXT:
        w[ino + DATA] = w[i + DATA] + length
        _dupcl(c, n, h)
    else:
        s, d = w[i + DATA] + length, w[ino + DATA]
        c.mv[d:d + remain] = c.mv[s:s + remain]
    u[(n >> 2) + ULEN] = remain
    u[(h >> 2) + ULEN] = length
    w[ino + NEXT] = w[i + NEXT]
    w[i + NEXT] = 0
    return n


# ============================================================================ m_unshare
def m_unshare(m0, how: int):
    """A chain with the data of ``m0`` in storage that no other mbuf shares, which
    may be written (FreeBSD's ``m_unshare``, 8.0 and later): each mbuf whose
    external storage is not writable is replaced by copies in fresh clusters (in
    pieces of at most MCLBYTES), or copied into the previous mbuf's cluster when
    it fits there; a plain mbuf is copied into a previous cluster with room too,
    so the chain comes back compacted.  Returns the new head; on a failed
    allocation the whole chain ``m0`` is freed and None returned (FreeBSD: "the
    original mbuf chain is always reclaimed").

    Unlike FreeBSD's, the result is always writable: copies into fresh storage do
    not keep M_RDONLY (FreeBSD copies it with M_COPYFLAGS), and a plain M_RDONLY
    mbuf that cannot be coalesced is copied into a fresh mbuf (FreeBSD leaves it
    read-only)."""
    c = _c(m0, "m_unshare")
    how = _how(c, how)
    h = _unshare(c, m0.handle, how)
    return _wrap(c, h) if h else None


def _unshare(c, h0, how):
    w, u = c.w, c.u32
    top, prev, m = h0, 0, h0
    while m:
        i, j = m >> 3, m >> 2
        flags, nxt, k = w[i + FLAGS], w[i + NEXT], u[j + ULEN]
        if _writable(c, i):
            # writable: kept, but a plain mbuf goes into the cluster before it if
            # it fits (so later clusters coalesce too)
            if not flags & M_EXT and prev and w[(prev >> 3) + FLAGS] & M_EXT and \
                    k <= _trailing(c, prev):
                _coalesce(c, prev, m, nxt)
                m = nxt
                continue
            prev, m = m, nxt
            continue
        if prev and w[(prev >> 3) + FLAGS] & M_EXT and k <= _trailing(c, prev):
            _coalesce(c, prev, m, nxt)
            m = nxt
            continue
        first = _fresh_copy(c, m, flags, k, how)
        if first is None:
            _freem(c, top)
            return None
        last = first
        while w[(last >> 3) + NEXT]:
            last = w[(last >> 3) + NEXT]
        w[(last >> 3) + NEXT] = nxt
        if prev:
            w[(prev >> 3) + NEXT] = first
        else:
            top = first
        w[i + NEXT] = 0
        _free(c, m)                      # its reference goes: the sharers' count falls
        prev, m = last, nxt
    return top


def _coalesce(c, prev, m, nxt):
    """Copy plain or shared mbuf ``m``'s data after ``prev``'s (room checked) and
    free ``m`` (no packet header: it is not the head)."""
    w, u, mv = c.w, c.u32, c.mv
    k = u[(m >> 2) + ULEN]
    s, d = w[(m >> 3) + DATA], w[(prev >> 3) + DATA] + u[(prev >> 2) + ULEN]
    mv[d:d + k] = mv[s:s + k]
    u[(prev >> 2) + ULEN] += k
    w[(prev >> 3) + NEXT] = nxt
    w[(m >> 3) + NEXT] = 0
    _free(c, m)


def _fresh_copy(c, m, flags, k, how):
    """Copies of mbuf ``m``'s ``k`` bytes in fresh writable storage (its packet
    header moved to the first): a plain mbuf for a plain one, clusters of at most
    MCLBYTES for external storage.  The head of the copies, or None (those made
    are freed)."""
    w, u, mv = c.w, c.u32, c.mv
    typ = _typ(c, m)
    keep = flags & M_COPYFLAGS & ~(M_PKTHDR | M_RDONLY)
    top = last = 0
    off, left = 0, k
    while True:
        pk = M_PKTHDR if not top and flags & M_PKTHDR else 0
        if flags & M_EXT:
            n = c.zpack.alloc(how, None, _arg(typ, keep | pk))
            room = MCLBYTES
        else:
            n = _mget(c, how, _arg(typ, keep | pk))
            room = MHLEN if pk else MLEN
        if n is None:
            _freem(c, top)
            return None
        if pk:
            _move_pkthdr(c, n, m)
            w[(n >> 3) + FLAGS] &= ~M_RDONLY
        cc = min(left, room)
        s, d = w[(m >> 3) + DATA] + off, w[(n >> 3) + DATA]
        mv[d:d + cc] = mv[s:s + cc]
        u[(n >> 2) + ULEN] = cc
        if last:
            w[(last >> 3) + NEXT] = n
        else:
            top = n
        last = n
        left -= cc
        off += cc
        if left <= 0:
            return top


# ============================================================================ one mbuf's room
def M_START(m) -> int:
    """Handle of the first byte of ``m``'s storage: its external buffer, m_pktdat or
    m_dat (FreeBSD 10+ ``M_START``)."""
    c = _c(m, "M_START")
    return storage(c.w, m.handle)[0]


def M_SIZE(m) -> int:
    """Bytes of ``m``'s storage: ext_size, MHLEN or MLEN (FreeBSD 10+ ``M_SIZE``)."""
    c = _c(m, "M_SIZE")
    lo, hi = storage(c.w, m.handle)
    return hi - lo


def m_align(m, len: int) -> None:
    """Place an object of ``len`` bytes at the end of a fresh mbuf of any kind (plain,
    packet header, external storage), long-aligned: m_data moves by ``(M_SIZE - len)
    & ~7`` (FreeBSD 10+ ``m_align``, which M_ALIGN, MH_ALIGN and MEXT_ALIGN became).
    MbufError for an mbuf whose m_data has moved (FreeBSD's KASSERT: not a virgin
    mbuf) or a ``len`` outside 0..M_SIZE."""
    c = _c(m, "m_align")
    len = _int("m_align: len", len)
    w, i = c.w, m.handle >> 3
    lo, hi = storage(w, m.handle)
    if w[i + DATA] != lo:
        raise MbufError(f"m_align: mbuf {m.handle} is not a virgin mbuf (m_data moved)")
    if not 0 <= len <= hi - lo:
        raise MbufError(f"m_align: len {len} is outside 0..{hi - lo}")
    w[i + DATA] = lo + ((hi - lo - len) & ~7)


# ============================================================================ walking a chain
def m_getptr(m, loc: int):
    """``(mbuf, offset)`` of byte ``loc`` of the chain (FreeBSD ``m_getptr``): empty
    mbufs are skipped; ``loc`` equal to the chain's length gives the last mbuf and
    its m_len (the end of the data); None past that or for ``loc`` < 0."""
    c = _c(m, "m_getptr")
    loc = _int("m_getptr: loc", loc)
    w, u, h = c.w, c.u32, m.handle
    while loc >= 0:
        n = u[(h >> 2) + ULEN]
        if n > loc:
            return _wrap(c, h), loc
        loc -= n
        nxt = w[(h >> 3) + NEXT]
        if not nxt:
            return (_wrap(c, h), n) if loc == 0 else None
        h = nxt
    return None


def m_apply(m, off: int, len: int, f, arg=None) -> int:
    """Call ``f(arg, data, count)`` on each piece of bytes [off, off+len) of the chain,
    ``data`` a memoryview of ``count`` bytes (read-only unless the mbuf is writable),
    in order -- an empty mbuf inside the range gives a call with count 0, as in
    FreeBSD's ``m_apply``; the first non-zero return is returned at once, else 0.
    MbufError (FreeBSD's KASSERTs) for a negative ``off`` or ``len``, or a range
    past the end of the chain -- before any call."""
    c = _c(m, "m_apply")
    off, len = _int("m_apply: off", off), _int("m_apply: len", len)
    if off < 0 or len < 0:
        raise MbufError(f"m_apply: negative {'off' if off < 0 else 'len'}")
    total = _chain_len(c, m.handle)
    if off + len > total:
        raise MbufError(f"m_apply: {off}+{len} is past the end of the chain ({total} bytes)")
    w, u, h = c.w, c.u32, m.handle
    while off > 0:
        n = u[(h >> 2) + ULEN]
        if off < n:
            break
        off -= n
        h = w[(h >> 3) + NEXT]
    while len > 0:
        count = min(u[(h >> 2) + ULEN] - off, len)
        view = mtod(_wrap(c, h))[off:off + count]
        rval = f(arg, view, count)
        if rval:
            return rval
        len -= count
        off = 0
        h = w[(h >> 3) + NEXT]
    return 0


# ============================================================================ m_copyup
def m_copyup(n, len: int, dstoff: int):
    """A new first mbuf holding the chain's first ``len`` bytes (at least
    max_protohdr when there are that many) at offset ``dstoff`` of its packet
    data, the packet header moved to it (FreeBSD ``m_copyup``); the rest of the
    chain follows.  None, after freeing the whole chain, when ``len`` exceeds
    ``MHLEN - dstoff``, the chain is shorter, or no mbuf can be had (FreeBSD
    counts these in MSFail, not in mbstat)."""
    c = _c(n, "m_copyup")
    len, dstoff = _int("m_copyup: len", len), _int("m_copyup: dstoff", dstoff)
    if len < 0 or dstoff < 0:
        raise MbufError(f"m_copyup: negative {'len' if len < 0 else 'dstoff'}")
    hn = n.handle
    if len > MHLEN - dstoff:
        _freem(c, hn)
        return None
    w, u = c.w, c.u32
    hm = _mget(c, M_NOWAIT, _arg(_typ(c, hn), 0))
    if hm is None:
        _freem(c, hn)
        return None
    u[(hm >> 2) + ULEN] = 0
    if w[(hn >> 3) + FLAGS] & M_PKTHDR:
        _move_pkthdr(c, hm, hn)
    w[(hm >> 3) + DATA] += dstoff
    return _pull(c, hm, hn, len, hm + MSIZE - w[(hm >> 3) + DATA], _copyup_bad)


def _copyup_bad(c, h):
    _freem(c, h)
    return None


# ============================================================================ m_defrag, m_collapse
def m_defrag(m0, how: int):
    """The packet copied into as few mbufs as possible -- a cluster (or a plain
    packet-header mbuf up to MHLEN) first, then clusters for pieces over MLEN,
    plain mbufs for the rest, at most MCLBYTES each, joined with m_cat; the
    original is freed and the copy returned (FreeBSD 8+ ``m_defrag``).  A chain
    without packet header comes back as it is.  m_pkthdr.len is first set to the
    chain's length (``m_fixhdr``), which stays when the copy fails: then None, and
    ``m0`` is otherwise untouched.  The copies are MT_DATA."""
    c = _c(m0, "m_defrag")
    h0 = m0.handle
    w, u, mv = c.w, c.u32, c.mv
    if not w[(h0 >> 3) + FLAGS] & M_PKTHDR:
        return m0
    how = _how(c, how)
    total = _chain_len(c, h0)
    w[(h0 >> 3) + PH_LEN] = total
    arg_hdr = _arg(MT_DATA, M_PKTHDR)
    final = _getcl(c, how, arg_hdr) if total > MHLEN else _mget(c, how, arg_hdr)
    if final is None:
        return None
    if not _dup_pkthdr(c, final, h0, how):
        _freem(c, final)
        return None
    new, progress = final, 0
    while progress < total:
        length = min(total - progress, MCLBYTES)
        if not new:
            arg = _arg(MT_DATA, 0)
            new = _getcl(c, how, arg) if length > MLEN else _mget(c, how, arg)
            if new is None:
                _freem(c, final)
                return None
        _copydata(c, h0, progress, length, mv, w[(new >> 3) + DATA])
        progress += length
        u[(new >> 2) + ULEN] = length
        if new != final:
            _cat(c, final, new)
        new = 0
    _freem(c, h0)
    return _wrap(c, final)


def m_collapse(m0, how: int, maxfrags: int):
    """Bring the chain down to at most ``maxfrags`` mbufs (FreeBSD 8+ ``m_collapse``):
    first copy each mbuf into the one before it while it is writable and has room
    (strictly more than the data), then replace two neighbours after the head by one
    new cluster when they fit in it (strictly under MCLBYTES) and try the copying
    again from there.  ``m0`` once at most ``maxfrags`` -- checked only after a
    merge, so a chain already short enough gives None, as in FreeBSD -- or None when
    nothing more can be merged or a cluster cannot be had; the chain is never
    freed, but what was merged stays merged.  MbufError for ``maxfrags`` < 2
    (FreeBSD's KASSERT), before anything changes."""
    c = _c(m0, "m_collapse")
    maxfrags = _int("m_collapse: maxfrags", maxfrags)
    if maxfrags < 2:
        raise MbufError(f"m_collapse: maxfrags {maxfrags} < 2")
    how = _how(c, how)
    h0 = m0.handle
    w, u, mv = c.w, c.u32, c.mv
    curfrags = 0
    h = h0
    while h:
        curfrags += 1
        h = w[(h >> 3) + NEXT]
    m = h0
    while True:
        while True:                      # copy into the previous mbuf where it fits
            n = w[(m >> 3) + NEXT]
            if not n:
                break
            if u[(n >> 2) + ULEN] < _trailing(c, m):
                k = u[(n >> 2) + ULEN]
                s, d = w[(n >> 3) + DATA], w[(m >> 3) + DATA] + u[(m >> 2) + ULEN]
                mv[d:d + k] = mv[s:s + k]
                u[(m >> 2) + ULEN] += k
                w[(m >> 3) + NEXT] = w[(n >> 3) + NEXT]
                w[(n >> 3) + NEXT] = 0
                _free(c, n)
                curfrags -= 1
                if curfrags <= maxfrags:
                    return m0
            else:
                m = n
        prev, n = h0, w[(h0 >> 3) + NEXT]          # two neighbours into one cluster
        while n:
            n2 = w[(n >> 3) + NEXT]
            if n2 and u[(n >> 2) + ULEN] + u[(n2 >> 2) + ULEN] < MCLBYTES:
                break
            prev, n = n, n2
        else:
            return None
        new = _getcl(c, how, _arg(MT_DATA, 0))
        if new is None:
            return None
        d = w[(new >> 3) + DATA]
        for x in (n, n2):
            k = u[(x >> 2) + ULEN]
            s = w[(x >> 3) + DATA]
            mv[d:d + k] = mv[s:s + k]
            d += k
        u[(new >> 2) + ULEN] = u[(n >> 2) + ULEN] + u[(n2 >> 2) + ULEN]
        w[(new >> 3) + NEXT] = w[(n2 >> 3) + NEXT]
        w[(prev >> 3) + NEXT] = new
        w[(n >> 3) + NEXT] = w[(n2 >> 3) + NEXT] = 0
        _free(c, n)
        _free(c, n2)
        curfrags -= 1
        if curfrags <= maxfrags:
            return m0
        m = new                          # FreeBSD's "goto again", from the new cluster


# ============================================================================ data in
def m_devget(buf, totlen: int, off: int, ifp: int = 0, copy=None, *, arena):
    """A packet holding the first ``totlen`` bytes of ``buf`` (a bytes-like object: a
    device's receive buffer), ``off`` bytes into its first mbuf (FreeBSD 10+
    ``m_devget``): a cluster when ``totlen + off`` is at least MINCLSIZE, else a
    packet-header mbuf whose data is moved max_linkhdr bytes in when the packet and
    that fit in MHLEN (FreeBSD 8 tested MLEN); clusters or plain mbufs after it.
    m_pkthdr.rcvif is ``ifp``, m_pkthdr.len ``totlen``.  ``copy(src, dst, n)``, if
    given, copies each piece (memoryviews) instead of a plain copy.  M_NOWAIT:
    None when an allocation fails (what was made is freed), for ``off`` outside
    0..MHLEN and for ``totlen`` <= 0 (no mbuf is allocated)."""
    c = ctx(arena)
    totlen, off = _int("m_devget: totlen", totlen), _int("m_devget: off", off)
    ifp = _int("m_devget: ifp", ifp)
    if off < 0 or off > MHLEN or totlen <= 0:
        return None
    src = _src(buf, totlen, "m_devget")
    w, u, mv = c.w, c.u32, c.mv
    linkhdr = c.w[_MAX_LINKHDR]
    top = last = 0
    pos = 0
    while totlen > 0:
        if not top:
            if totlen + off >= MINCLSIZE:
                m = _getcl(c, M_NOWAIT, _arg(MT_DATA, M_PKTHDR))
                room = MCLBYTES
            else:
                m = _mget(c, M_NOWAIT, _arg(MT_DATA, M_PKTHDR))
                room = MHLEN
                if m is not None and totlen + off + linkhdr <= MHLEN:
                    w[(m >> 3) + DATA] += linkhdr
                    room -= linkhdr
            if m is None:
                return None
            w[(m >> 3) + PH_RCVIF] = ifp
            w[(m >> 3) + PH_LEN] = totlen
        else:
            if totlen + off >= MINCLSIZE:
                m = _getcl(c, M_NOWAIT, _arg(MT_DATA, 0))
                room = MCLBYTES
            else:
                m = _mget(c, M_NOWAIT, _arg(MT_DATA, 0))
                room = MLEN
            if m is None:
                _freem(c, top)
                return None
        if off:
            w[(m >> 3) + DATA] += off
            room -= off
            off = 0
        k = min(totlen, room)
        u[(m >> 2) + ULEN] = k
        d = w[(m >> 3) + DATA]
        if copy is not None:
            copy(src[pos:pos + k], mv[d:d + k], k)
        else:
            mv[d:d + k] = src[pos:pos + k]
        pos += k
        if last:
            w[(last >> 3) + NEXT] = m
        else:
            top = m
        last = m
        totlen -= k
    return _wrap(c, top)


def m_uiotombuf(uio, how: int, len: int = 0, align: int = 0, flags: int = 0, *, arena,
                timeout=None):
    """A chain holding the data of ``uio`` -- a bytes-like object or an iterable of
    them, Python's stand-in for a ``struct uio`` -- in as few mbufs as ``m_getm2``
    makes (FreeBSD ``m_uiotombuf``): ``len`` > 0 takes at most that many bytes (an
    iterable is read until it has them; a piece read past them is not put back),
    else all; the first mbuf's data starts ``align`` bytes in; ``flags`` may hold
    M_PKTHDR (m_pkthdr.len is then the length) and M_EOR.  No data gives one empty
    mbuf.  None when ``align`` >= MHLEN or the chain cannot be allocated (all or
    nothing)."""
    c = ctx(arena)
    len, align = _int("m_uiotombuf: len", len), _int("m_uiotombuf: align", align)
    flags = _int("m_uiotombuf: flags", flags)
    if align < 0:
        raise MbufError(f"m_uiotombuf: align {align} < 0")
    data = _uio_bytes(uio, len)
    total = min(data.nbytes, len) if len > 0 else data.nbytes
    if align >= MHLEN:
        return None
    m = m_getm2(None, max(total + align, 1), how, MT_DATA, flags, arena=arena,
                timeout=timeout)
    if m is None:
        return None
    w, u, mv = c.w, c.u32, c.mv
    h0 = m.handle
    w[(h0 >> 3) + DATA] += align
    progress = 0
    h = h0
    while h:
        k = min(_trailing(c, h), total - progress)
        d = w[(h >> 3) + DATA]
        mv[d:d + k] = data[progress:progress + k]
        u[(h >> 2) + ULEN] = k
        progress += k
        if flags & M_PKTHDR:
            w[(h0 >> 3) + PH_LEN] += k
        h = w[(h >> 3) + NEXT]
    return m


def _uio_bytes(uio, want) -> memoryview:
    """The bytes of ``uio`` (bytes-like, or an iterable of bytes-like pieces read
    until ``want`` bytes when ``want`` > 0), as a flat memoryview."""
    try:
        return memoryview(uio).cast("B")
    except TypeError:
        pass
    try:
        pieces = iter(uio)
    except TypeError:
        raise TypeError(f"m_uiotombuf: the data is a bytes-like object or an iterable of "
                        f"them, not {type(uio).__name__}") from None
    out = bytearray()
    for p in pieces:
        try:
            out += memoryview(p).cast("B")
        except TypeError:
            raise TypeError(f"m_uiotombuf: a piece of the data is not bytes-like: "
                            f"{type(p).__name__}") from None
        if 0 < want <= len(out):
            break
    return memoryview(out)


# ============================================================================ packets
def m_catpkt(m, n) -> None:
    """Append packet ``n`` to packet ``m`` (FreeBSD 10+ ``m_catpkt``): m_pkthdr.len
    grows by n's, n loses its packet header and tags (``m_demote``), then ``m_cat``
    copies what fits into m's last mbuf and links the rest.  MbufError unless both
    have a packet header and ``n`` is not queued (m_nextpkt), before any change."""
    c = _c(m, "m_catpkt")
    hn = _same(c, n, "m_catpkt")
    _pkthdr(c, m.handle, "m_catpkt")
    _pkthdr(c, hn, "m_catpkt")
    w = c.w
    if w[(hn >> 3) + NEXTPKT]:
        raise MbufError(f"m_catpkt: packet {hn} is queued (m_nextpkt set)")
    h = m.handle
    while h:
        if h == hn:
            raise MbufError(f"m_catpkt: mbuf {hn} is already in the chain")
        h = w[(h >> 3) + NEXT]
    w[(m.handle >> 3) + PH_LEN] += w[(hn >> 3) + PH_LEN]
    _demote(c, hn, 1)
    _cat(c, m.handle, hn)


def m_sanity(m0, sanitize: int = 0, *, file=None) -> int:
    """Check a chain's pointers and packet headers (FreeBSD 8 ``m_sanity``):
    m_data and m_len inside the storage, m_pkthdr.header too, no m_nextpkt, tags or
    packet header on an mbuf after the first, m_pkthdr.len equal to the length
    (checked only when that is not 0).  Each fault is printed as ``mbuf <handle>:
    <what>`` to ``file`` (default stderr) -- or raised as MbufError on a debug
    arena, FreeBSD's INVARIANTS panic -- unless ``sanitize``: then it is repaired
    (a stray m_nextpkt list freed and cleared, tags deleted, a stray packet header
    cleared, a wrong m_pkthdr.len set to 0).  Returns 1."""
    if m0 is None:
        return 1
    c = _c(m0, "m_sanity")
    w, u = c.w, c.u32
    out = sys.stderr if file is None else file
    h0 = m0.handle

    def fault(h, what):
        msg = f"mbuf {_ptr(h)}: {what}"
        if c.debug:
            raise MbufError(f"m_sanity: {msg}")
        print(msg, file=out)

    pktlen = 0
    h = h0
    while h:
        i = h >> 3
        flags = w[i + FLAGS]
        a, b = storage(w, h)
        data = w[i + DATA]
        if data < a:
            fault(h, "m_data outside mbuf data range left")
        if data > b:
            fault(h, "m_data outside mbuf data range right")
        if data + u[(h >> 2) + ULEN] > b:
            fault(h, "m_data + m_len exeeds mbuf space")
        if flags & M_PKTHDR and w[i + PH + L.PH["HEADER"]]:
            hdr = w[i + PH + L.PH["HEADER"]]
            if hdr < a or hdr > b:
                fault(h, "m_pkthdr.header outside mbuf data range")
        if h != h0 and w[i + NEXTPKT]:
            if sanitize:
                p = w[i + NEXTPKT]
                w[i + NEXTPKT] = 0
                while p:
                    q = w[(p >> 3) + NEXTPKT]
                    w[(p >> 3) + NEXTPKT] = 0
                    _freem(c, p)
                    p = q
            else:
                fault(h, "m->m_nextpkt on in-chain mbuf")
        if w[(h0 >> 3) + FLAGS] & M_PKTHDR:
            pktlen += u[(h >> 2) + ULEN]
        if h != h0 and flags & M_PKTHDR and w[i + PH_TAGS]:
            if sanitize:
                delete_chain(c, h, 0)
            else:
                fault(h, "m_tags on in-chain mbuf")
        if h != h0 and flags & M_PKTHDR:
            if sanitize:
                w[i + FLAGS] &= ~M_PKTHDR
                c.mv[h + M_DAT:h + M_PKTDAT] = _ZERO_PH
            else:
                fault(h, "M_PKTHDR on in-chain mbuf")
        h = w[i + NEXT]
    if pktlen and pktlen != w[(h0 >> 3) + PH_LEN]:
        if sanitize:
            w[(h0 >> 3) + PH_LEN] = 0
        else:
            fault(h0, "m_pkthdr.len != mbuf chain length")
    return 1


def _ptr(h) -> str:
    """A handle as the kernel's %p prints a pointer: 0x... (0 for NULL)."""
    return f"{h:#x}" if h else "0"


# m_print's %b: FreeBSD 7/8's bit names of m_flags, highest first
_FLAG_BITS = ((0x8000, "freelist"), (0x4000, "skipfw"), (0x100, "proto5"),
              (0x80, "proto4"), (0x40, "proto3"), (0x20, "proto2"), (0x10, "proto1"),
              (0x8, "rdonly"), (0x4, "eor"), (0x2, "pkthdr"), (0x1, "ext"))


def _bits(flags) -> str:
    names = [n for bit, n in _FLAG_BITS if flags & bit]
    return f"{flags:x}" + (f"<{','.join(names)}>" if names else "")


def m_print(m, maxlen: int = -1, *, file=None) -> None:
    """Print each mbuf of the chain as FreeBSD's ``m_print`` does (8.0; 10+ prints
    ``mbuf: 0`` for NULL), handles standing for pointers::

        mbuf: 0x1b4000 len: 3, next: 0, 3<pkthdr,ext>, 61-62-63

    the first ``maxlen`` bytes of each (-1: all) in hex; for a packet it stops after
    m_pkthdr.len bytes and says how many the chain lacks (``2 bytes unaccounted
    for.``) -- so a packet whose m_pkthdr.len is 0 prints nothing.  To ``file``
    (default stdout)."""
    out = sys.stdout if file is None else file
    if m is None:
        print("mbuf: 0", file=out)
        return
    c = _c(m, "m_print")
    maxlen = _int("m_print: maxlen", maxlen)
    w, u, mv = c.w, c.u32, c.mv
    h = m.handle
    left = w[(h >> 3) + PH_LEN] if w[(h >> 3) + FLAGS] & M_PKTHDR else -1
    while h and (left == -1 or left):
        i = h >> 3
        n = u[(h >> 2) + ULEN]
        pdata = n if maxlen == -1 or n <= maxlen else maxlen
        line = (f"mbuf: {_ptr(h)} len: {n}, next: {_ptr(w[i + NEXT])}, "
                f"{_bits(w[i + FLAGS] & FLAGS_MASK)}")
        if pdata:
            d = w[i + DATA]
            line += ", " + "-".join(f"{b:02x}" for b in mv[d:d + pdata])
        print(line, file=out)
        if left != -1:
            left -= n
        h = w[i + NEXT]
    if left > 0:
        print(f"{left} bytes unaccounted for.", file=out)
