"""tags: mbuf tags (``uipc_mbuf2.c``): typed, variable-length records listed in a
packet header.

A tag is an item of the smallest "mbuf_tag_<size>" zone that holds its header and
payload (``layout.MTAG``); the packet header's ``tags`` word heads a singly linked list
(SLIST) through the tags' ``next`` words.  Each tag names the mbuf whose list holds it
(``owner``, 0 while unlinked), so a tag cannot be linked twice, deleted from another
packet, or freed while linked.  The dtors of the mbuf zones delete a packet's tags.
The ``MTag`` object and the tag's word offsets are declared in ``header``, with
``Mbuf`` (FreeBSD's ``sys/mbuf.h``); this module holds the functions.
"""

from __future__ import annotations

import operator

from .constants import M_PKTHDR, MTAG_ABI_COMPAT, MTAG_MAXLEN, MTAG_PERSISTENT, MTAG_SIZES
from .errors import MbufError
from .header import HDR, T_COOKIE, T_ID, T_LEN, T_NEXT, T_OWNER, Mbuf, MTag
from .zones import FLAGS, PH_TAGS, ctx


# ============================================================================ internals
def _zone_for(c, length: int):
    for size, z in zip(MTAG_SIZES, c.tag_zones()):
        if HDR + length <= size:
            return z
    raise MbufError(f"m_tag_alloc: a tag of {length} bytes exceeds the largest tag "
                    f"({MTAG_MAXLEN} bytes)")


def _free_tag(c, t: int) -> None:
    w = c.w
    _zone_for(c, w[(t >> 3) + T_LEN]).free(t)


def delete_chain(c, h: int, start: int) -> None:
    """Unlink and free tag ``start`` (0: the first) and every tag after it from the
    packet header of mbuf ``h``."""
    w = c.w
    head = (h >> 3) + PH_TAGS
    if start == 0:
        t = w[head]
        w[head] = 0
    else:
        prev = _prev_of(c, h, start)
        t = start
        if prev == 0:
            w[head] = 0
        else:
            w[(prev >> 3) + T_NEXT] = 0
    while t:
        nxt = w[(t >> 3) + T_NEXT]
        w[(t >> 3) + T_NEXT] = 0
        w[(t >> 3) + T_OWNER] = 0
        _free_tag(c, t)
        t = nxt


def _prev_of(c, h: int, t: int) -> int:
    """The tag before ``t`` in ``h``'s list (0 if ``t`` is first)."""
    w = c.w
    cur, prev = w[(h >> 3) + PH_TAGS], 0
    while cur and cur != t:
        prev, cur = cur, w[(cur >> 3) + T_NEXT]
    if cur != t:
        raise MbufError(f"tag {t} is not in the tag list of mbuf {h}")
    return prev


def move_chain(c, to: int, frm: int) -> None:
    """Give ``frm``'s tag list to ``to`` (m_move_pkthdr)."""
    w = c.w
    t = w[(frm >> 3) + PH_TAGS]
    w[(to >> 3) + PH_TAGS] = t
    w[(frm >> 3) + PH_TAGS] = 0
    while t:
        w[(t >> 3) + T_OWNER] = to
        t = w[(t >> 3) + T_NEXT]


def copy_chain(c, to: int, frm: int, how: int) -> bool:
    """Deep-copy ``frm``'s tags after ``to``'s, in order; all or nothing."""
    w = c.w
    made = []
    t = w[(frm >> 3) + PH_TAGS]
    while t:
        n = _tag_copy(c, t, how)
        if n is None:
            for x in made:
                _free_tag(c, x)
            return False
        made.append(n)
        t = w[(t >> 3) + T_NEXT]
    if not made:
        return True
    last = w[(to >> 3) + PH_TAGS]
    if last:
        while w[(last >> 3) + T_NEXT]:
            last = w[(last >> 3) + T_NEXT]
    prev = last
    for n in made:
        w[(n >> 3) + T_OWNER] = to
        if prev:
            w[(prev >> 3) + T_NEXT] = n
        else:
            w[(to >> 3) + PH_TAGS] = n
        prev = n
    return True


def _tag_alloc(c, cookie: int, typ: int, length: int, how: int):
    z = _zone_for(c, length)
    t = z.alloc(c.how(how))
    if t is None:
        return None
    w, ti = c.w, t >> 3
    w[ti + T_NEXT] = 0
    w[ti + T_OWNER] = 0
    w[ti + T_COOKIE] = cookie
    w[ti + T_ID] = typ
    w[ti + T_LEN] = length
    return t


def _tag_copy(c, t: int, how: int):
    w, ti = c.w, t >> 3
    n = _tag_alloc(c, w[ti + T_COOKIE], w[ti + T_ID], w[ti + T_LEN], how)
    if n is not None:
        length = w[ti + T_LEN]
        c.mv[n + HDR:n + HDR + length] = c.mv[t + HDR:t + HDR + length]
    return n


# ============================================================================ API
def _pkthdr_of(m, what: str) -> int:
    if not isinstance(m, Mbuf):
        raise TypeError(f"{what}: expected an Mbuf, not {type(m).__name__}")
    if not m._c.w[(m.handle >> 3) + FLAGS] & M_PKTHDR:
        raise MbufError(f"{what}: mbuf {m.handle} has no packet header")
    return m.handle


def _tag_of(c, t, what: str, owner=None) -> int:
    if not isinstance(t, MTag) or t._c.core is not c.core:
        raise TypeError(f"{what}: expected an MTag of the same arena, not {t!r}")
    if owner is not None and c.w[(t.handle >> 3) + T_OWNER] != owner:
        raise MbufError(f"{what}: tag {t.handle} is not in the tag list of mbuf {owner}")
    return t.handle


def m_tag_alloc(cookie: int, type: int, len: int, wait: int, *, arena):
    """A new, unlinked tag with a ``len``-byte payload (not zeroed), or None.
    ``len`` < 0 gives None, as in FreeBSD; more than MTAG_MAXLEN raises MbufError."""
    cookie = operator.index(cookie)
    type = operator.index(type)
    len = operator.index(len)
    if len < 0:
        return None
    if not 0 <= type <= 0xFFFF or not 0 <= cookie <= 0xFFFFFFFF:
        raise MbufError(f"m_tag_alloc: type {type} must fit 16 bits and cookie {cookie} "
                        f"32 bits")
    c = ctx(arena)
    t = _tag_alloc(c, cookie, type, len, wait)
    return MTag._wrap(c, t) if t is not None else None


def m_tag_get(type: int, len: int, wait: int, *, arena):
    """OpenBSD-compatible m_tag_alloc (cookie MTAG_ABI_COMPAT)."""
    return m_tag_alloc(MTAG_ABI_COMPAT, type, len, wait, arena=arena)


def m_tag_free(t: MTag) -> None:
    """Free an unlinked tag (a linked one is freed by m_tag_delete)."""
    c = t._c
    h = _tag_of(c, t, "m_tag_free")
    owner = c.w[(h >> 3) + T_OWNER]
    if owner:
        raise MbufError(f"m_tag_free: tag {h} is in the tag list of mbuf {owner}; "
                        f"use m_tag_delete")
    _free_tag(c, h)


def m_tag_prepend(m, t: MTag) -> None:
    """Put tag ``t`` at the head of ``m``'s tag list."""
    h = _pkthdr_of(m, "m_tag_prepend")
    c = m._c
    th = _tag_of(c, t, "m_tag_prepend")
    w = c.w
    if w[(th >> 3) + T_OWNER]:
        raise MbufError(f"m_tag_prepend: tag {th} is already in the tag list of mbuf "
                        f"{w[(th >> 3) + T_OWNER]}")
    w[(th >> 3) + T_NEXT] = w[(h >> 3) + PH_TAGS]
    w[(th >> 3) + T_OWNER] = h
    w[(h >> 3) + PH_TAGS] = th


def m_tag_unlink(m, t: MTag) -> None:
    """Take ``t`` out of ``m``'s tag list (it is not freed)."""
    h = _pkthdr_of(m, "m_tag_unlink")
    c = m._c
    th = _tag_of(c, t, "m_tag_unlink", owner=h)
    w = c.w
    prev = _prev_of(c, h, th)
    nxt = w[(th >> 3) + T_NEXT]
    if prev:
        w[(prev >> 3) + T_NEXT] = nxt
    else:
        w[(h >> 3) + PH_TAGS] = nxt
    w[(th >> 3) + T_NEXT] = 0
    w[(th >> 3) + T_OWNER] = 0


def m_tag_delete(m, t: MTag) -> None:
    """Unlink ``t`` from ``m`` and free it."""
    m_tag_unlink(m, t)
    _free_tag(m._c, t.handle)


def m_tag_delete_chain(m, t: MTag | None = None) -> None:
    """Delete ``t`` (the first tag when None) and every tag after it."""
    h = _pkthdr_of(m, "m_tag_delete_chain")
    start = 0 if t is None else _tag_of(m._c, t, "m_tag_delete_chain", owner=h)
    delete_chain(m._c, h, start)


def m_tag_delete_nonpersistent(m) -> None:
    """Delete every tag whose id lacks MTAG_PERSISTENT."""
    h = _pkthdr_of(m, "m_tag_delete_nonpersistent")
    c = m._c
    w = c.w
    t = w[(h >> 3) + PH_TAGS]
    while t:
        nxt = w[(t >> 3) + T_NEXT]
        if not w[(t >> 3) + T_ID] & MTAG_PERSISTENT:
            m_tag_delete(m, MTag._wrap(c, t))
        t = nxt


def m_tag_first(m):
    h = _pkthdr_of(m, "m_tag_first")
    t = m._c.w[(h >> 3) + PH_TAGS]
    return MTag._wrap(m._c, t) if t else None


def m_tag_next(m, t: MTag):
    h = _pkthdr_of(m, "m_tag_next")
    th = _tag_of(m._c, t, "m_tag_next", owner=h)
    n = m._c.w[(th >> 3) + T_NEXT]
    return MTag._wrap(m._c, n) if n else None


def m_tag_locate(m, cookie: int, type: int, t: MTag | None = None):
    """The first tag of ``m`` with ``cookie`` and ``type`` after ``t`` (from the
    head when None), or None."""
    h = _pkthdr_of(m, "m_tag_locate")
    c = m._c
    w = c.w
    if t is None:
        cur = w[(h >> 3) + PH_TAGS]
    else:
        cur = w[(_tag_of(c, t, "m_tag_locate", owner=h) >> 3) + T_NEXT]
    while cur:
        if w[(cur >> 3) + T_COOKIE] == cookie and w[(cur >> 3) + T_ID] == type:
            return MTag._wrap(c, cur)
        cur = w[(cur >> 3) + T_NEXT]
    return None


def m_tag_find(m, type: int, start: MTag | None = None):
    """OpenBSD-compatible m_tag_locate (cookie MTAG_ABI_COMPAT)."""
    return m_tag_locate(m, MTAG_ABI_COMPAT, type, start)


def m_tag_copy(t: MTag, how: int):
    """An unlinked copy of ``t``, or None."""
    c = t._c
    n = _tag_copy(c, _tag_of(c, t, "m_tag_copy"), how)
    return MTag._wrap(c, n) if n is not None else None


def m_tag_copy_chain(to, frm, how: int) -> int:
    """Append copies of ``frm``'s tags to ``to``'s; 1, or 0 (nothing copied)."""
    th = _pkthdr_of(to, "m_tag_copy_chain")
    fh = _pkthdr_of(frm, "m_tag_copy_chain")
    return int(copy_chain(to._c, th, fh, how))
