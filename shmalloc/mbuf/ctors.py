"""ctors: the hooks of the mbuf zones -- the seed's ``mb_ctor_*``, ``mb_dtor_*``,
``mb_zinit_*`` and ``mb_zfini_*`` of ``kern_mbuf.c`` -- and the packet-header label
hook that stands in for ``mac_mbuf_init``.

    mbuf             ctor: the header (and packet header) for mb_args; dtor: tags and
                     links go, an mbuf still marked M_EXT/M_NOFREE is refused;
                     init: zeroed
    mbuf_cluster ... ctor: refcount 1, attached to the mbuf given; dtor: refused while
                     referenced
    mbuf_packet      init: a cluster attached; fini: the cluster given back; ctor: the
                     header, m_data at the cluster; dtor: checks, tags, and the packet
                     zone drained when the cluster zone is exhausted
    mbuf_ext_refcnt  init: a count of 0

The zone records store the hooks by module-qualified name
(``"shmalloc.mbuf.ctors:mb_ctor_mbuf"``, ``zones``), which every process resolves by
importing this module.  Their ``arg``: the mbuf and packet ctors
take ``type << 32 | flags`` (the seed's ``struct mb_args``), the cluster ctor the
handle of the mbuf to attach the cluster to (or None); the dtors take None,
``MB_NOTAGS`` (leave the tags), ``PACK_VERIFIED`` (m_free checked the packet
already) or ``hooks.DTOR_RECOVER`` (a supervisor frees a dead CPU's item: an mbuf
gives back the reference it held instead of being refused; a packet whose cluster
copies still share is set aside for the last copy to free, and the free refused).
"""

from __future__ import annotations

from array import array

from ..hooks import DTOR_RECOVER
from .constants import (EXT_PACKET, M_EXT, M_NOFREE, M_PKTHDR, MB_NOTAGS, MCLBYTES, MSIZE,
                        MT_DATA, MT_NOINIT)
from .errors import MbufError
from .header import Mbuf
from .refs import _limbo, drop_ref
from .tags import delete_chain
from .zones import (BTYPE, DATA, E, EXT_ARG1, EXT_ARG2, EXT_BUF, EXT_END, EXT_FREE, EXT_OWNER,
                    EXT_REFCNT, EXT_SIZE, EXT_TYPE, EXT_TYPE_OF_SIZE, FLAGS, FLAGS_MASK, HDR_END,
                    M_DAT, M_PKTDAT, NEXT, NEXTPKT, PACK_VERIFIED, PH_TAGS, PKTHDR_END,
                    TYPE_SHIFT, Ctx, ctx)

_ZERO_MBUF = bytes(MSIZE)
_ZERO_EXT = bytes(MSIZE - M_PKTDAT)


# ============================================================================ context
def _zctx(zone) -> Ctx:
    """The context a hook of ``zone`` works in (the hooks on the alloc and free paths
    inline these four lines, to save a call)."""
    try:
        return zone._mbctx
    except AttributeError:
        return _hook_ctx(zone)


def _hook_ctx(zone) -> Ctx:
    """The context a hook of ``zone`` works in (cached on the zone object)."""
    c = zone.__dict__.get("_mbctx")
    if c is None:
        c = ctx(zone.arena)
        zone._mbctx = c
    return c


# ============================================================================ label hook
_label_hook = None


def set_mbuf_label_hook(fn):
    """Install ``fn(m, how)`` (or None) as the packet-header label hook, the stand-in
    for ``mac_mbuf_init``: it runs in every packet-header allocation of this
    process and returns 0 (or None) to accept, or an errno (or False) to fail the
    allocation, which then fails cleanly (None is returned, nothing is leaked).
    Returns the previous hook."""
    global _label_hook
    if fn is not None and not callable(fn):
        raise TypeError(f"a label hook is a callable or None, not {type(fn).__name__}")
    old, _label_hook = _label_hook, fn
    return old


def _label(c, h, how) -> bool:
    err = _label_hook(Mbuf._wrap(c, h), how)
    return err is None or err is True or (err is not False and err == 0)


# ============================================================================ hooks
_tmpl: dict[int, tuple] = {}


def _template(arg: int) -> tuple:
    """(words, count): the m_hdr (+ zeroed m_pkthdr) words an mbuf ctor writes for
    ``arg``; m_data is patched in afterwards."""
    t = _tmpl.get(arg)
    if t is None:
        flags, typ = arg & 0xFFFFFFFF, arg >> 32
        n = PKTHDR_END if flags & M_PKTHDR else HDR_END
        a = array("q", [0]) * n
        a[FLAGS] = flags | typ << TYPE_SHIFT       # m_len 0
        t = (a, n)
        if len(_tmpl) < 4096:
            _tmpl[arg] = t
    return t


_ARG_DEFAULT = MT_DATA << 32


def mb_ctor_mbuf(zone, h, arg, how):
    """The mbuf zone's ctor: initialise the header (and the packet header with
    M_PKTHDR); MT_NOINIT leaves the mbuf as it is.  False (the label hook said
    no) fails the allocation."""
    if arg is None:
        arg = _ARG_DEFAULT
    if arg >> 32 == MT_NOINIT:
        return None
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    w, i = c.w, h >> 3
    a, n = _tmpl.get(arg) or _template(arg)
    w[i:i + n] = a
    if arg & M_PKTHDR:
        w[i + DATA] = h + M_PKTDAT
        if _label_hook is not None and not _label(c, h, how):
            return False
    else:
        w[i + DATA] = h + M_DAT
    return None


def mb_dtor_mbuf(zone, h, arg):
    """The mbuf zone's dtor: refuse an mbuf still marked M_EXT or M_NOFREE (nothing
    is changed then), delete the tags unless ``arg`` has MB_NOTAGS, clear the
    links: a free mbuf has no next and no tags."""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    w, i = c.w, h >> 3
    flags = w[i + FLAGS]
    error = None
    if flags & (M_EXT | M_NOFREE):
        if arg is None or not arg & DTOR_RECOVER:
            what = "M_EXT (free its storage with m_free)" if flags & M_EXT else "M_NOFREE"
            raise MbufError(f"zone {zone.name!r}: mbuf {h} is still marked {what}")
        if flags & M_EXT:            # a dead CPU's mbuf: give its reference back
            _, error = drop_ref(c, h, i, flags, c.zidx_mbuf)
            c.mv[h + M_PKTDAT:h + MSIZE] = _ZERO_EXT
        w[i + FLAGS] &= ~(M_EXT | M_NOFREE)
        flags = w[i + FLAGS]
    if w[i + PH_TAGS] and flags & M_PKTHDR:
        if arg is not None and arg & MB_NOTAGS:
            w[i + PH_TAGS] = 0
        else:
            delete_chain(c, h, 0)
    w[i + NEXT] = 0
    w[i + NEXTPKT] = 0
    if error is not None:
        raise error


def mb_zinit_mbuf(zone, h, how):
    """keg -> mbuf zone: an mbuf starts zeroed (no flags, no next, no tags), so even
    an MT_NOINIT mbuf is safe to free."""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    c.mv[h:h + MSIZE] = _ZERO_MBUF


def mb_ctor_clust(zone, h, arg, how):
    """The cluster ctor (2k and jumbo zones): refcount 1, and attached to mbuf
    ``arg`` when one is given."""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    typ = EXT_TYPE_OF_SIZE.get(zone.size)
    if typ is None:
        raise MbufError(f"zone {zone.name!r}: unknown cluster size {zone.size}")
    r = zone.keg.ref_index(h)
    c.u32[r] = 1
    if arg:
        i = arg >> 3
        c.w[i + E:i + EXT_END] = array("q", (h, zone.size, typ, r << 2, 0, 0, arg))
        c.mv[arg + EXT_FREE] = 0
        c.w[i + DATA] = h
        c.w[i + FLAGS] |= M_EXT
    return None


def mb_dtor_clust(zone, h, arg):
    """The cluster dtor: a cluster is freed only when no mbuf refers to it."""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    rc = c.u32[zone.keg.ref_index(h)]
    if rc > 1:
        raise MbufError(f"zone {zone.name!r}: cluster {h} still has {rc} references")


def mb_zinit_pack(zone, h, how):
    """keg -> packet zone: attach a cluster (the item stays in the packet zone's
    caches with it).  False when no cluster can be had."""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    c.mv[h:h + MSIZE] = _ZERO_MBUF
    if c.zclust.alloc(how, None, h) is None:
        return False
    c.w[(h >> 3) + EXT_TYPE] = EXT_PACKET
    return None


def mb_zfini_pack(zone, h):
    """packet zone -> keg: give the cluster back.  A repeat (crash recovery) finds
    no cluster and does nothing.

    The cluster is held by the CPU that imported the packet (or by none, that CPU
    gone), not always this one: it is taken over first, then the packet forgets
    it, then it is freed.  A CPU killed before the packet forgot it leaves the
    cluster to the fini that recovery runs again; killed after, a cluster it holds
    that no mbuf names, which recovery frees (``workers/mbuf_recovery.py``).
    (Forgotten before it was taken over, it stayed meanwhile with its former
    holder, where nothing told it from a cluster in use: a kill there lost it.)"""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    w, i = c.w, h >> 3
    cl = w[i + EXT_BUF]
    if cl:
        c.zclust.take_over(cl)
    w[i + EXT_BUF] = 0
    w[i + FLAGS] &= ~M_EXT
    if cl:
        c.u32[w[i + EXT_REFCNT] >> 2] = 1
        c.zclust.free(cl)


_tmpl_pack: dict[int, tuple] = {}


def mb_ctor_pack(zone, h, arg, how):
    """The packet zone's ctor: the header as mb_ctor_mbuf, with M_EXT and m_data at
    the cluster (m_ext is already set up by the init)."""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    w, i = c.w, h >> 3
    t = _tmpl_pack.get(arg)
    if t is None:
        t = _template((_ARG_DEFAULT if arg is None else arg) | M_EXT)
        if len(_tmpl_pack) < 4096:
            _tmpl_pack[arg] = t
    w[i:i + t[1]] = t[0]
    w[i + DATA] = w[i + EXT_BUF]
    if _label_hook is not None and t[0][FLAGS] & M_PKTHDR and not _label(c, h, how):
        return False
    return None



def mb_dtor_pack(zone, h, arg):
    """The packet zone's dtor: make sure the cluster comes back clean (refused
    otherwise, nothing changed; m_free, which checked it already, says so with
    PACK_VERIFIED), delete the tags, and when the cluster zone is exhausted drain
    the packet zone, so that clusters parked in cached packets reach whoever waits
    for one (the seed's deliberately unlocked check)."""
    try:
        c = zone._mbctx
    except AttributeError:
        c = _hook_ctx(zone)
    w, i = c.w, h >> 3
    if arg != PACK_VERIFIED:
        _pack_check(c, zone, h, i, arg)
    if w[i + PH_TAGS] and w[i + FLAGS] & M_PKTHDR:
        delete_chain(c, h, 0)
    # m_next/m_nextpkt are left for the ctor to clear: a cached packet is not followed
    if w[c.clust_sleepers_w] or w[c.clust_limit_w] and w[c.clust_items_w] >= w[c.clust_limit_w]:
        c.zpack.drain()
        c.zclust.drain()


def _pack_check(c, zone, h, i, arg) -> None:
    """The seed's KASSERTs on a packet coming back (all of them on debug arenas);
    a dead CPU's packet whose cluster is still shared is set aside instead."""
    w = c.w
    if arg is not None and arg & DTOR_RECOVER and c.u32[w[i + EXT_REFCNT] >> 2] > 1:
        _set_aside(c, zone, h, i, w[i + FLAGS])     # returns when it turned out sole
    flags = w[i + FLAGS] & FLAGS_MASK
    if not c.mv[h + BTYPE]:
        raise MbufError(f"zone {zone.name!r}: packet {h} waits for the copies sharing its "
                        f"cluster; the last of them frees it")
    if (not flags & M_EXT or w[i + EXT_TYPE] != EXT_PACKET
            or c.u32[w[i + EXT_REFCNT] >> 2] != 1 or c.debug and _pack_unclean(c, h)):
        raise MbufError(f"zone {zone.name!r}: packet {h} does not hold a clean cluster of its "
                        f"own (flags {flags:#x}, type {c.mv[h + BTYPE]}, ext type "
                        f"{w[i + EXT_TYPE]}, size {w[i + EXT_SIZE]}, refcount "
                        f"{c.u32[w[i + EXT_REFCNT] >> 2]})")


def _set_aside(c, zone, h, i, flags) -> None:
    """A dead CPU's packet whose cluster copies still share: set it aside (it keeps
    its reference; ``refs._limbo``) and refuse the free (MbufError): the last copy
    frees it.  If the copies went meanwhile, return: the free goes on as for a
    sole packet."""
    if c.mv[h + BTYPE] == 0:
        raise MbufError(f"zone {zone.name!r}: packet {h} already waits for its copies")
    if _limbo(c, h, i, flags):
        raise MbufError(f"zone {zone.name!r}: packet {h} is set aside until the "
                        f"{c.u32[c.w[i + EXT_REFCNT] >> 2] - 1} copies sharing its cluster "
                        f"are freed")


def _pack_unclean(c, h) -> bool:
    """INVARIANTS (debug arenas): the rest of the seed's KASSERTs on a packet."""
    w, i = c.w, h >> 3
    return bool(not w[i + EXT_BUF] or w[i + EXT_SIZE] != MCLBYTES or w[i + EXT_ARG1]
                or w[i + EXT_ARG2] or c.mv[h + EXT_FREE] or w[i + EXT_OWNER] != h)


def mb_zinit_extref(zone, h, how):
    """keg -> mbuf_ext_refcnt: a refcount starts at 0 (UMA_ZONE_ZINIT)."""
    _zctx(zone).u32[h >> 2] = 0

