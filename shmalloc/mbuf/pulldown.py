"""pulldown: ``m_pulldown``, the one chain function of FreeBSD's ``uipc_mbuf2.c``
besides the m_tag ones (``tags``): make a region of a chain contiguous without
touching what lies before it (the IPv6 stack's way of reading headers).

It follows FreeBSD 10+ (the 14 tree): a region already inside one mbuf is returned
in place -- shared storage included, which is safe here since mtod gives a
read-only view of it -- where 8.0 copied a region it could not write, and with no
offset asked for and the region at the start of a cluster packet, ended up with two
packet headers in the chain.
"""

from __future__ import annotations

from .alloc import _arg, _c, _freem, _getcl, _int, _mget, _typ
from .chains import _adj, _chain_len, _copydata, _dup_pkthdr, _leading, _trailing, _writable
from .constants import (EXT_CLUSTER, M_EXT, M_NOWAIT, M_PKTHDR, MCLBYTES, MINCLSIZE, MLEN)
from .errors import MbufError
from .header import _wrap
from .zones import DATA, EXT_TYPE, FLAGS, NEXT, ULEN


def m_pulldown(m, off: int, len: int, offp: bool = False):
    """Make bytes [off, off+len) of the chain contiguous in one mbuf and return it
    (FreeBSD ``m_pulldown``, 10+): with ``offp`` true, return ``(mbuf, offset in
    it)`` -- the region may then start anywhere in that mbuf -- else the region
    starts at the mbuf's m_data.  Nothing before ``off`` changes and the chain's
    head stays the head.  Copies are made only when needed: by splitting the mbuf
    holding the region (a region wholly inside one mbuf but not at its start, and
    no ``offp``), by pulling the rest into the first mbuf's room or pushing the
    start into the next one's (when that mbuf is writable: plain, or a 2k cluster
    of its own), or into a new mbuf or cluster inserted after it.  Every failure
    -- ``len`` over MCLBYTES, the chain too short, no mbuf -- frees the whole chain
    and returns None; M_NOWAIT throughout."""
    c = _c(m, "m_pulldown")
    off, len = _int("m_pulldown: off", off), _int("m_pulldown: len", len)
    if off < 0 or len < 0:
        raise MbufError(f"m_pulldown: negative {'off' if off < 0 else 'len'}")
    h = _pulldown(c, m.handle, off, len, bool(offp))
    if h is None:
        return None
    n, o = h
    return (_wrap(c, n), o) if offp else _wrap(c, n)


def _pulldown(c, h0, off, len, offp):
    w, u, mv = c.w, c.u32, c.mv
    if len > MCLBYTES:
        _freem(c, h0)
        return None
    n = h0
    while n and off > 0:
        if u[(n >> 2) + ULEN] > off:
            break
        off -= u[(n >> 2) + ULEN]
        n = w[(n >> 3) + NEXT]
    while n and u[(n >> 2) + ULEN] == 0:         # a non-empty mbuf
        n = w[(n >> 3) + NEXT]
    if not n:
        _freem(c, h0)
        return None
    i = n >> 3
    writable = (not w[i + FLAGS] & M_EXT
                or w[i + EXT_TYPE] == EXT_CLUSTER and _writable(c, i))
    nlen = u[(n >> 2) + ULEN]
    if (off == 0 or offp) and len <= nlen - off:
        return n, off                             # there already
    if len <= nlen - off:
        # inside n, but not where the caller wants it: n keeps what lies before
        o = _dup1(c, n, off, nlen - off)
        if o is None:
            _freem(c, h0)
            return None
        u[(n >> 2) + ULEN] = off
        w[(o >> 3) + NEXT] = w[i + NEXT]
        w[i + NEXT] = o
        return o, 0
    hlen = nlen - off                             # from n
    tlen = len - hlen                             # from the mbufs after n
    if hlen + _chain_len(c, w[i + NEXT]) < len:
        _freem(c, h0)
        return None
    nxt = w[i + NEXT]
    if (off == 0 or offp) and writable and _trailing(c, n) >= tlen:
        _copydata(c, nxt, 0, tlen, mv, w[i + DATA] + nlen)
        u[(n >> 2) + ULEN] += tlen
        _adj(c, nxt, tlen)
        return n, off
    if ((off == 0 or offp) and writable and _leading(c, nxt) >= hlen
            and u[(nxt >> 2) + ULEN] >= tlen):
        w[(nxt >> 3) + DATA] -= hlen
        u[(nxt >> 2) + ULEN] += hlen
        s, d = w[i + DATA] + off, w[(nxt >> 3) + DATA]
        mv[d:d + hlen] = mv[s:s + hlen]
        u[(n >> 2) + ULEN] -= hlen
        return nxt, 0
    # the hard way: a new mbuf (or cluster) after n holds the whole region
    typ = _typ(c, h0)
    o = _getcl(c, M_NOWAIT, _arg(typ, 0)) if len > MLEN else _mget(c, M_NOWAIT, _arg(typ, 0))
    if o is None:
        _freem(c, h0)
        return None
    d = w[(o >> 3) + DATA]
    s = w[i + DATA] + off
    mv[d:d + hlen] = mv[s:s + hlen]
    u[(n >> 2) + ULEN] -= hlen
    _copydata(c, nxt, 0, tlen, mv, d + hlen)
    u[(o >> 2) + ULEN] = len
    _adj(c, nxt, tlen)
    w[(o >> 3) + NEXT] = nxt
    w[i + NEXT] = o
    return o, 0


def _dup1(c, h, off, len):
    """``m_dup1``: a new mbuf (a cluster from MINCLSIZE bytes) with bytes [off,
    off+len) of mbuf ``h`` -- and a copy of its packet header when off is 0.  None
    when it cannot be had."""
    w, u = c.w, c.u32
    if len > MCLBYTES:
        return None
    pk = M_PKTHDR if off == 0 and w[(h >> 3) + FLAGS] & M_PKTHDR else 0
    arg = _arg(_typ(c, h), pk)
    n = _getcl(c, M_NOWAIT, arg) if len >= MINCLSIZE else _mget(c, M_NOWAIT, arg)
    if n is None:
        return None
    if pk and not _dup_pkthdr(c, n, h, M_NOWAIT):
        _freem(c, n)
        return None
    _copydata(c, h, off, len, c.mv, w[(n >> 3) + DATA])
    u[(n >> 2) + ULEN] = len
    return n
