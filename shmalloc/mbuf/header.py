"""header: the ``Mbuf`` object, a handle on an mbuf in shared memory, and ``MTag``,
one on an m_tag -- the structures of FreeBSD's ``sys/mbuf.h``.

An ``Mbuf`` holds nothing but the arena context and the handle: every field is read
from and written to the segment (``layout``'s mbuf section), so two ``Mbuf`` objects
of one handle, in one process or in two, see the same mbuf.  Fields are attributes,
writable where FreeBSD code writes them (m_next, m_nextpkt, m_data, m_len, m_flags
except M_EXT/M_PKTHDR, m_type, the packet header), checked so that a write cannot send
m_data/m_len outside the mbuf's storage; ``m_ext`` is read-only (the allocator owns it).
An ``MTag``'s fields are read-only but for its payload (``data``); ``tags`` has the
m_tag functions.
"""

from __future__ import annotations

import operator

from .. import layout as L
from ..errors import BadHandleError
from .constants import EXT_PACKET, M_EXT, M_PKTHDR, M_RDONLY, MSIZE, MT_NOINIT, MT_NOTMBUF
from .errors import MbufError
from .zones import (BTYPE, DATA, EXT_ARG1, EXT_ARG2, EXT_BUF, EXT_FREE, EXT_OWNER, EXT_REFCNT,
                    EXT_SIZE, EXT_TYPE, FLAGS, FLAGS_MASK, M_DAT, M_PKTDAT, NEXT, NEXTPKT,
                    PH_CSUM_DATA, PH_CSUM_FLAGS, PH_HEADER, PH_LEN, PH_RCVIF, PH_TAGS, PH_VTAG,
                    ULEN, VTAG_SHIFT, ctx, set_flags)

_new = object.__new__

# word offsets inside an m_tag (layout's MTAG section), and its header's size
T_NEXT, T_OWNER, T_COOKIE, T_ID, T_LEN = (L.MTAG[n] for n in
                                          ("NEXT", "OWNER", "COOKIE", "ID", "LEN"))
HDR = L.MTAG_HDR_BYTES


def _int(what, v, lo=-(1 << 63), hi=(1 << 63) - 1) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    v = operator.index(v)
    if not lo <= v <= hi:
        raise MbufError(f"{what} {v} is outside {lo}..{hi}")
    return v


def storage(w, h: int) -> tuple[int, int]:
    """(start, end) of the storage mbuf ``h`` holds its data in."""
    i = h >> 3
    flags = w[i + FLAGS]
    if flags & M_EXT:
        b = w[i + EXT_BUF]
        return b, b + w[i + EXT_SIZE]
    return (h + M_PKTDAT if flags & M_PKTHDR else h + M_DAT), h + MSIZE


class Mbuf:
    """One mbuf.  ``Mbuf.from_handle(arena, handle)`` gives the mbuf another process
    handed over; the allocation functions of ``shmalloc.mbuf`` return them."""

    __slots__ = ("_c", "handle")

    @staticmethod
    def _wrap(c, h: int) -> "Mbuf":
        return _wrap(c, h)

    @classmethod
    def from_handle(cls, arena, handle: int) -> "Mbuf":
        """The mbuf ``handle`` of ``arena`` (allocated, by any CPU); BadHandleError
        if it is not an allocated mbuf."""
        c = ctx(arena)
        h = _int("an mbuf handle", handle)
        zidx = c.is_mbuf(h)
        if zidx < 0 or c.mv[h + BTYPE] == MT_NOTMBUF:
            raise BadHandleError(f"arena {arena.name!r}: handle {h} is not an allocated mbuf")
        return _wrap(c, h)

    # ---------------------------------------------------------------- identity
    @property
    def arena(self):
        return self._c.arena

    def __eq__(self, other):
        return (isinstance(other, Mbuf) and other.handle == self.handle
                and other._c.core is self._c.core)

    def __hash__(self):
        return hash((id(self._c.core), self.handle))

    def __repr__(self):
        c, i = self._c, (self.handle >> 3)
        w = c.w
        flags = w[i + FLAGS] & FLAGS_MASK
        what = []
        if flags & M_PKTHDR:
            what.append(f"pkthdr.len={w[i + PH_LEN]}")
        if flags & M_EXT:
            what.append(f"ext={w[i + EXT_BUF]}/{w[i + EXT_SIZE]} refcnt={self.refcnt}")
        return (f"<Mbuf {self.handle} len={c.u32[(self.handle >> 2) + ULEN]} flags={flags:#x} "
                f"type={c.mv[self.handle + BTYPE]}"
                + "".join(" " + s for s in what) + ">")

    # ---------------------------------------------------------------- m_hdr
    def _link(self, v, what) -> int:
        if v is None:
            return 0
        if not isinstance(v, Mbuf) or v._c.core is not self._c.core:
            raise TypeError(f"{what} must be an Mbuf of the same arena or None, not {v!r}")
        if v.handle == self.handle:
            raise MbufError(f"mbuf {self.handle}: {what} cannot be the mbuf itself")
        return v.handle

    @property
    def m_next(self):
        h = self._c.w[(self.handle >> 3) + NEXT]
        return _wrap(self._c, h) if h else None

    @m_next.setter
    def m_next(self, v):
        self._c.w[(self.handle >> 3) + NEXT] = self._link(v, "m_next")

    @property
    def m_nextpkt(self):
        h = self._c.w[(self.handle >> 3) + NEXTPKT]
        return _wrap(self._c, h) if h else None

    @m_nextpkt.setter
    def m_nextpkt(self, v):
        self._c.w[(self.handle >> 3) + NEXTPKT] = self._link(v, "m_nextpkt")

    @property
    def m_data(self) -> int:
        """Handle of the first byte of data (``mtod`` gives a view)."""
        return self._c.w[(self.handle >> 3) + DATA]

    @m_data.setter
    def m_data(self, v):
        lo, hi = storage(self._c.w, self.handle)
        v = _int(f"mbuf {self.handle}: m_data", v)
        if not lo <= v <= hi:
            raise MbufError(f"mbuf {self.handle}: m_data {v} is outside its storage "
                            f"{lo}..{hi}")
        self._c.w[(self.handle >> 3) + DATA] = v

    @property
    def m_len(self) -> int:
        return self._c.u32[(self.handle >> 2) + ULEN]

    @m_len.setter
    def m_len(self, v):
        w, i = self._c.w, (self.handle >> 3)
        lo, hi = storage(w, self.handle)
        v = _int(f"mbuf {self.handle}: m_len", v, 0)
        if w[i + DATA] + v > hi:
            raise MbufError(f"mbuf {self.handle}: m_len {v} from m_data {w[i + DATA]} runs "
                            f"past the end of its storage ({hi})")
        self._c.u32[(self.handle >> 2) + ULEN] = v

    @property
    def m_flags(self) -> int:
        return self._c.w[(self.handle >> 3) + FLAGS] & FLAGS_MASK

    @m_flags.setter
    def m_flags(self, v):
        w, i = self._c.w, (self.handle >> 3)
        v = _int(f"mbuf {self.handle}: m_flags", v, 0, FLAGS_MASK)
        changed = v ^ (w[i + FLAGS] & FLAGS_MASK)
        if changed & M_EXT:
            raise MbufError(f"mbuf {self.handle}: M_EXT is set by attaching storage (m_clget, "
                            f"m_extadd) and cleared by m_free, not by writing m_flags")
        if changed & M_PKTHDR:
            raise MbufError(f"mbuf {self.handle}: M_PKTHDR moves with the packet header "
                            f"(m_move_pkthdr, m_dup_pkthdr, m_demote), not by writing m_flags")
        set_flags(w, i, v)

    @property
    def m_type(self) -> int:
        return self._c.mv[self.handle + BTYPE]

    @m_type.setter
    def m_type(self, v):
        v = _int(f"mbuf {self.handle}: m_type", v, 1, MT_NOINIT - 1)
        self._c.mv[self.handle + BTYPE] = v

    # ---------------------------------------------------------------- unions
    @property
    def m_pkthdr(self) -> "PktHdr":
        return PktHdr(self)

    @property
    def m_ext(self) -> "Ext":
        return Ext(self)

    @property
    def refcnt(self) -> int:
        """References to this mbuf's storage: its external storage's count with
        M_EXT, else 1 (the mbuf's own data)."""
        w, i = self._c.w, (self.handle >> 3)
        if w[i + FLAGS] & M_EXT:
            return refs(self._c, w, i)
        return 1

    @property
    def writable(self) -> bool:
        """M_WRITABLE: not M_RDONLY and the storage is not shared."""
        w, i = self._c.w, (self.handle >> 3)
        flags = w[i + FLAGS]
        return not flags & M_RDONLY and (not flags & M_EXT or refs(self._c, w, i) == 1)


def refs(c, w, i) -> int:
    """References to the external storage of the mbuf at word ``i`` (M_EXT): its
    count, less the one a packet set aside for its copies still holds (that
    packet is nobody's any more: see ``refs.drop_ref``); 0 for an mbuf whose last
    reference is being dropped, or whose drop was cut short (``refs._forgotten``)."""
    r = w[i + EXT_REFCNT]
    if not r:
        return 0
    n = c.u32[r >> 2]
    if n > 1 and w[i + EXT_TYPE] == EXT_PACKET:
        owner = w[i + EXT_OWNER]
        if owner != i << 3 and c.mv[owner + BTYPE] == MT_NOTMBUF:
            n -= 1
    return n


def _wrap(c, h: int) -> Mbuf:
    """An Mbuf for handle ``h`` (no checks: the allocator's own handles)."""
    m = _new(Mbuf)
    m._c = c
    m.handle = h
    return m


class PktHdr:
    """``m.m_pkthdr``: the packet header of an M_PKTHDR mbuf."""

    __slots__ = ("_m",)

    def __init__(self, m: Mbuf):
        self._m = m

    def _w(self, word: int) -> int:
        m = self._m
        if not m._c.w[(m.handle >> 3) + FLAGS] & M_PKTHDR:
            raise MbufError(f"mbuf {m.handle} has no packet header (M_PKTHDR is not set)")
        return (m.handle >> 3) + word

    def _get(word):
        def get(self):
            return self._m._c.w[self._w(word)]
        return get

    def _set(word, what, lo, hi):
        def set_(self, v):
            m = self._m
            m._c.w[self._w(word)] = _int(f"mbuf {m.handle}: m_pkthdr.{what}", v, lo, hi)
        return set_

    len = property(_get(PH_LEN), _set(PH_LEN, "len", 0, (1 << 31) - 1))
    rcvif = property(_get(PH_RCVIF), _set(PH_RCVIF, "rcvif", -(1 << 63), (1 << 63) - 1))
    header = property(_get(PH_HEADER), _set(PH_HEADER, "header", 0, (1 << 63) - 1))
    csum_flags = property(_get(PH_CSUM_FLAGS), _set(PH_CSUM_FLAGS, "csum_flags", 0,
                                                    0xFFFFFFFF))
    csum_data = property(_get(PH_CSUM_DATA), _set(PH_CSUM_DATA, "csum_data", 0, 0xFFFFFFFF))
    del _get, _set

    # tso_segsz and ether_vtag share a word (16 bits each), as in FreeBSD's pkthdr
    @property
    def tso_segsz(self) -> int:
        return self._m._c.w[self._w(PH_VTAG)] & 0xFFFF

    @tso_segsz.setter
    def tso_segsz(self, v):
        m = self._m
        i = self._w(PH_VTAG)
        v = _int(f"mbuf {m.handle}: m_pkthdr.tso_segsz", v, 0, 0xFFFF)
        m._c.w[i] = m._c.w[i] & ~0xFFFF | v

    @property
    def ether_vtag(self) -> int:
        return self._m._c.w[self._w(PH_VTAG)] >> VTAG_SHIFT & 0xFFFF

    @ether_vtag.setter
    def ether_vtag(self, v):
        m = self._m
        i = self._w(PH_VTAG)
        v = _int(f"mbuf {m.handle}: m_pkthdr.ether_vtag", v, 0, 0xFFFF)
        m._c.w[i] = m._c.w[i] & ~(0xFFFF << VTAG_SHIFT) | v << VTAG_SHIFT

    @property
    def tags(self):
        """The first m_tag of the packet, or None (``m_tag_next`` walks on)."""
        m = self._m
        t = m._c.w[self._w(PH_TAGS)]
        return MTag._wrap(m._c, t) if t else None


class Ext:
    """``m.m_ext``: the external storage of an M_EXT mbuf (read-only)."""

    __slots__ = ("_m",)

    def __init__(self, m: Mbuf):
        self._m = m

    def _w(self, word: int) -> int:
        m = self._m
        if not m._c.w[(m.handle >> 3) + FLAGS] & M_EXT:
            raise MbufError(f"mbuf {m.handle} has no external storage (M_EXT is not set)")
        return m._c.w[(m.handle >> 3) + word]

    ext_buf = property(lambda self: self._w(EXT_BUF))
    ext_size = property(lambda self: self._w(EXT_SIZE))
    ext_type = property(lambda self: self._w(EXT_TYPE))
    ext_arg1 = property(lambda self: self._w(EXT_ARG1))
    ext_arg2 = property(lambda self: self._w(EXT_ARG2))
    ref_cnt = property(lambda self: self._w(EXT_REFCNT))      # handle of the u32 count
    owner = property(lambda self: self._w(EXT_OWNER))         # mbuf that attached it first

    @property
    def ext_free(self) -> str:
        """Name of the free routine (m_extadd), "" for clusters."""
        self._w(EXT_BUF)
        m = self._m
        return L.read_str(m._c.mv, m.handle + EXT_FREE, L.EXT_FREE_BYTES)


class MTag:
    """One m_tag: ``m_tag_id``, ``m_tag_len``, ``m_tag_cookie`` and ``data`` (a
    writable memoryview of the payload)."""

    __slots__ = ("_c", "handle")

    @classmethod
    def _wrap(cls, c, h: int) -> "MTag":
        t = _new(cls)
        t._c = c
        t.handle = h
        return t

    @property
    def m_tag_id(self) -> int:
        return self._c.w[(self.handle >> 3) + T_ID]

    @property
    def m_tag_len(self) -> int:
        return self._c.w[(self.handle >> 3) + T_LEN]

    @property
    def m_tag_cookie(self) -> int:
        return self._c.w[(self.handle >> 3) + T_COOKIE]

    @property
    def data(self) -> memoryview:
        h = self.handle
        return self._c.mv[h + HDR:h + HDR + self._c.w[(h >> 3) + T_LEN]]

    @property
    def owner(self) -> int:
        """Handle of the mbuf whose packet header lists this tag, 0 if none."""
        return self._c.w[(self.handle >> 3) + T_OWNER]

    def __eq__(self, other):
        return (isinstance(other, MTag) and other.handle == self.handle
                and other._c.core is self._c.core)

    def __hash__(self):
        return hash((id(self._c.core), self.handle))

    def __repr__(self):
        return (f"<MTag {self.handle} cookie={self.m_tag_cookie} id={self.m_tag_id} "
                f"len={self.m_tag_len}>")
