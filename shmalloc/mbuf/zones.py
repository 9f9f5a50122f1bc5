"""zones: the seed's ``mbuf_init`` and the hooks of the mbuf zones.

The zones, as ``kern_mbuf.c:mbuf_init`` makes them::

    mbuf             MSIZE, aligned to MSIZE (dtom), max bucket   limit nmbufs
    mbuf_cluster     MCLBYTES, refcount trailers                  limit nmbclusters
    mbuf_packet      secondary on the mbuf keg: init attaches a cluster, fini gives it back
    mbuf_jumbo_page  MJUMPAGESIZE, refcount trailers              limit nmbjumbop
    mbuf_jumbo_9k    MJUM9BYTES, refcount trailers                limit nmbjumbo9
    mbuf_jumbo_16k   MJUM16BYTES, refcount trailers               limit nmbjumbo16
    mbuf_ext_refcnt  u32 refcounts of m_extadd storage, zeroed by its init

Slabs are runs of contiguous pages of the arena (``vm.alloc_run``), so the multi-page
slabs of the 9k and 16k zones are the ``contigmalloc`` page source of the seed's
``mbuf_jumbo_alloc``: every jumbo cluster lies on contiguous pages.

Hooks are registered here under built-in names (``mb_ctor_mbuf`` ...) and stored by
name in the zone records; ``shmalloc.hooks`` imports this package to resolve them in a
process that has not.  Their ``arg``: the mbuf and packet ctors take
``type << 32 | flags`` (the seed's ``struct mb_args``), the cluster ctor the handle of
the mbuf to attach the cluster to (or None); the dtors take None, ``MB_NOTAGS`` (leave
the tags), ``PACK_VERIFIED`` (m_free checked the packet already) or
``hooks.DTOR_RECOVER`` (a supervisor frees a dead CPU's item: an mbuf gives back the
reference it held instead of being refused; a packet whose cluster copies still share
is set aside for the last copy to free, and the free refused).

Every arena object (a CPU) gets a context, ``ctx(arena)``, made on first use: it runs
``mbuf_init`` (which makes the zones when the arena has none: racing processes end up
with one set) and keeps the zones and the views the mbuf layer works with.
"""

from __future__ import annotations

import os
import warnings
from array import array

from .. import hooks
from .. import layout as L
from ..errors import ZoneError
from ..hooks import DTOR_RECOVER
from ..zone import BUCKET_MAX, M_NOWAIT, M_WAITOK, register_drain_companion
from .constants import (EXT_CLUSTER, EXT_JUMBO9, EXT_JUMBO16, EXT_JUMBOP, EXT_PACKET, M_EXT,
                        M_NOFREE, M_PKTHDR, MB_NOTAGS, MBUF_CLUSTER_MEM_NAME,
                        MBUF_EXTREFCNT_MEM_NAME, MBUF_JUMBO9_MEM_NAME, MBUF_JUMBO16_MEM_NAME,
                        MBUF_JUMBOP_MEM_NAME, MBUF_MEM_NAME, MBUF_PACKET_MEM_NAME,
                        MBUF_TAG_MEM_NAME, MCLBYTES, MJUM9BYTES, MJUM16BYTES, MJUMPAGESIZE,
                        MSIZE, MT_DATA, MT_NOINIT, MTAG_SIZES)
from .errors import MbufError
from .tunables import ensure_tuned

# word offsets inside an mbuf (layout's mbuf section)
NEXT, NEXTPKT, DATA, LEN, FLAGS, TYPE = (L.MH[n] for n in
                                         ("NEXT", "NEXTPKT", "DATA", "LEN", "FLAGS", "TYPE"))
PH = L.PH_WORD
PH_RCVIF, PH_HEADER, PH_LEN, PH_CSUM_FLAGS, PH_CSUM_DATA, PH_TSO_SEGSZ, PH_ETHER_VTAG, \
    PH_TAGS = (PH + L.PH[n] for n in ("RCVIF", "HEADER", "LEN", "CSUM_FLAGS", "CSUM_DATA",
                                      "TSO_SEGSZ", "ETHER_VTAG", "TAGS"))
E = L.EXT_WORD
EXT_BUF, EXT_SIZE, EXT_TYPE, EXT_REFCNT, EXT_ARG1, EXT_ARG2, EXT_OWNER = (
    E + L.EXT[n] for n in ("BUF", "SIZE", "TYPE", "REFCNT", "ARG1", "ARG2", "OWNER"))
HDR_END = L.MH_WORDS                    # words of m_hdr
PKTHDR_END = L.MH_WORDS + L.PH_WORDS    # words of m_hdr + m_pkthdr
EXT_END = E + L.EXT_WORDS
M_DAT, M_PKTDAT, EXT_FREE = L.MH_BYTES, L.PKTDAT, L.EXT_FREE
_ZERO_MBUF = bytes(MSIZE)
_ZERO_EXT = bytes(MSIZE - L.PKTDAT)
_MBS_STATE = L.MBS_WORD + L.MBS["STATE"]

# the seed's zones: name -> (size, zcreate keywords, MBS limit field, hook names)
_HOOKS_MBUF = ("mb_ctor_mbuf", "mb_dtor_mbuf", "mb_zinit_mbuf", "")
_HOOKS_CLUST = ("mb_ctor_clust", "mb_dtor_clust", "", "")
_HOOKS_PACK = ("mb_ctor_pack", "mb_dtor_pack", "mb_zinit_pack", "mb_zfini_pack")
_HOOKS_EXTREF = ("", "", "mb_zinit_extref", "")
ZONE_SPECS = (
    (MBUF_MEM_NAME, MSIZE, dict(align=MSIZE, bucket_size=BUCKET_MAX), "NMBUFS", _HOOKS_MBUF),
    (MBUF_CLUSTER_MEM_NAME, MCLBYTES, dict(refcnt=True), "NMBCLUSTERS", _HOOKS_CLUST),
    (MBUF_PACKET_MEM_NAME, MSIZE, None, None, _HOOKS_PACK),
    (MBUF_JUMBOP_MEM_NAME, MJUMPAGESIZE, dict(refcnt=True), "NMBJUMBOP", _HOOKS_CLUST),
    (MBUF_JUMBO9_MEM_NAME, MJUM9BYTES, dict(refcnt=True), "NMBJUMBO9", _HOOKS_CLUST),
    (MBUF_JUMBO16_MEM_NAME, MJUM16BYTES, dict(refcnt=True), "NMBJUMBO16", _HOOKS_CLUST),
    (MBUF_EXTREFCNT_MEM_NAME, 4, {}, None, _HOOKS_EXTREF),
)
ZONE_NAMES = tuple(s[0] for s in ZONE_SPECS)
TAG_ZONE_NAMES = tuple(f"{MBUF_TAG_MEM_NAME}_{n}" for n in MTAG_SIZES)
EXT_TYPE_OF_SIZE = {MCLBYTES: EXT_CLUSTER, MJUMPAGESIZE: EXT_JUMBOP, MJUM9BYTES: EXT_JUMBO9,
                    MJUM16BYTES: EXT_JUMBO16}


# ============================================================================ mbuf_init
def _get_or_create(arena, name, size, hook_names, refcnt, secondary, make):
    """The zone ``name``: made by ``make()`` unless some process made it first, then
    checked to be the mbuf layer's zone (not a user's zone of the same name)."""
    core = arena._core
    if core.zone_id(name) < 0:
        try:
            return _checked(make(), name, size, hook_names, refcnt, secondary)
        except ZoneError:
            if core.zone_id(name) < 0:
                raise
    return _checked(arena.zone(name), name, size, hook_names, refcnt, secondary)


def _checked(zone, name, size, hook_names, refcnt, secondary):
    want = dict(zip(L.HOOK_NAMES, hook_names))
    if (zone.size != size or zone.hook_names != want or zone.keg.refcnt != refcnt
            or zone.secondary != secondary):
        raise MbufError(f"arena {zone.arena.name!r} has a zone {name!r} that is not the mbuf "
                        f"layer's ({zone.size} bytes, hooks {zone.hook_names}); the mbuf "
                        f"layer needs {size} bytes and hooks {want}")
    return zone


def mbuf_init(arena) -> dict:
    """The seed's ``mbuf_init``: compute the tunables (once per arena), make the
    mbuf zones that do not exist yet, and return them by name.  Safe to race:
    each zone is made once, by whichever process gets there first, with the
    limit in force at that moment."""
    core = arena._core
    ensure_tuned(core)
    w = core.w

    def limit(field):
        return w[L.MBS_WORD + L.MBS[field]] if field else 0

    zones = {}
    for name, size, kw, field, hook_names in ZONE_SPECS:
        h = dict(zip(("ctor", "dtor", "init", "fini"), (n or None for n in hook_names)))
        if kw is None:                                  # the packet zone
            master = zones[MBUF_MEM_NAME]

            def make(name=name, h=h, master=master):
                return arena.zsecond_create(name, master, **h)
            z = _get_or_create(arena, name, size, hook_names, False, True, make)
            if z.keg.id != master.keg.id:
                raise MbufError(f"zone {name!r} is not on the keg of zone {master.name!r}")
        else:
            def make(name=name, size=size, kw=kw, field=field, h=h):
                return arena.zcreate(name, size, max_items=limit(field), **kw, **h)
            z = _get_or_create(arena, name, size, hook_names, bool(kw.get("refcnt")), False,
                               make)
        zones[name] = z
    if w[_MBS_STATE] < L.MBS_READY:
        with core.lock(L.VM_LOCK):
            w[_MBS_STATE] = max(w[_MBS_STATE], L.MBS_READY)
    return zones


def tag_zones(arena) -> list:
    """The zones m_tags come from ("mbuf_tag_<size>"), made on first use."""
    out = []
    for size, name in zip(MTAG_SIZES, TAG_ZONE_NAMES):
        out.append(_get_or_create(arena, name, size, ("", "", "", ""), False, False,
                                  lambda name=name, size=size: arena.zcreate(name, size)))
    return out


# ============================================================================ context
class Ctx:
    """The mbuf layer on one arena object (one CPU): its zones, the views of the
    segment, the refcount locks.  ``ctx(arena)`` makes it on first use."""

    def __init__(self, arena):
        core = arena._core
        self.arena = arena
        self.core = core
        self.w = core.w
        self.u32 = core.tags
        self.mv = core.mv
        self.cpu = arena.cpu_id
        zones = mbuf_init(arena)
        self.zones = zones
        self.zmbuf = zones[MBUF_MEM_NAME]
        self.zclust = zones[MBUF_CLUSTER_MEM_NAME]
        self.zpack = zones[MBUF_PACKET_MEM_NAME]
        self.zjumbop = zones[MBUF_JUMBOP_MEM_NAME]
        self.zjumbo9 = zones[MBUF_JUMBO9_MEM_NAME]
        self.zjumbo16 = zones[MBUF_JUMBO16_MEM_NAME]
        self.zextref = zones[MBUF_EXTREFCNT_MEM_NAME]
        keg = self.zmbuf.keg
        self.mkeg = keg
        self.mkid_bits = keg.kid_bits
        self.moffmap = keg.offmap
        self.zidx_mbuf = self.zmbuf.zidx
        self.zidx_pack = self.zpack.zidx
        self.zone_of_size = {MCLBYTES: self.zclust, MJUMPAGESIZE: self.zjumbop,
                             MJUM9BYTES: self.zjumbo9, MJUM16BYTES: self.zjumbo16}
        self.zone_of_type = {EXT_CLUSTER: self.zclust, EXT_JUMBOP: self.zjumbop,
                             EXT_JUMBO9: self.zjumbo9, EXT_JUMBO16: self.zjumbo16}
        # refcount read-modify-writes happen under the lock of the zone the count
        # lives in: cluster trailers under the cluster zone's, m_extadd counts under
        # mbuf_ext_refcnt's (there are no atomics across processes in Python)
        lk = {t: core.lock(z._lock_index) for t, z in self.zone_of_type.items()}
        lk[EXT_PACKET] = lk[EXT_CLUSTER]
        self.reflocks = lk
        self.extref_lock = core.lock(self.zextref._lock_index)
        # the refcount journal of each lock: its owner-id word (``api.journal``)
        jw = {t: L.lock_word(z._lock_index) + L.LOCK["OWNER_ID"]
              for t, z in self.zone_of_type.items()}
        jw[EXT_PACKET] = jw[EXT_CLUSTER]
        self.journals = jw
        self.extref_journal = L.lock_word(self.zextref._lock_index) + L.LOCK["OWNER_ID"]
        czw = L.zone_word(self.zclust.id)
        self.clust_limit_w = czw + L.ZONE["LIMIT"]
        self.clust_items_w = czw + L.ZONE["ITEMS"]
        self.clust_sleepers_w = czw + L.ZONE["SLEEPERS"]
        self._tag_zones = None
        self.in_lowmem = False
        self.waitok_downgrades = 0
        self.ext_free_fns: dict[str, object] = {}
        self.debug = core.w[L.HDR["DEBUG"]]
        for z in zones.values():
            z._mbctx = self             # the hooks of these zone objects work in this context

    # ---------------------------------------------------------------- helpers
    def tag_zones(self) -> list:
        if self._tag_zones is None:
            self._tag_zones = tag_zones(self.arena)
        return self._tag_zones

    def reflock(self, ext_type: int):
        return self.reflocks.get(ext_type, self.extref_lock)

    def journal(self, ext_type: int) -> int:
        """Word index of the refcount journal of ``reflock(ext_type)``."""
        return self.journals.get(ext_type, self.extref_journal)

    def is_mbuf(self, h) -> int:
        """The zone index (mbuf or packet) of ``h`` if it is an allocated mbuf of
        this arena, else -1.  No lock: the tag of an allocated item changes only
        when its holder frees it."""
        try:
            b = self.core.pt[h >> L.PAGE_SHIFT] ^ self.mkid_bits
            x = self.moffmap.get(h - b)
        except (IndexError, TypeError):
            return -1
        if x is None:
            return -1
        t = self.u32[(b >> 2) + x]
        return L.tag_zidx(t) if L.tag_state(t) == L.TAG_ALLOC else -1

    def how(self, how: int) -> int:
        """M_WAITOK while this CPU holds a shmalloc lock would sleep with the lock
        held (the seed's WITNESS warning): downgrade it to M_NOWAIT."""
        if how & M_WAITOK:
            w, pid, cpu = self.w, os.getpid(), self.cpu
            for idx in list(self.core._locks):
                lw = L.lock_word(idx)
                if w[lw + L.LOCK["OWNER_PID"]] == pid and w[lw + L.LOCK["OWNER_ID"]] == cpu:
                    self.waitok_downgrades += 1
                    if self.debug:
                        warnings.warn(f"arena {self.arena.name!r}: M_WAITOK while CPU {cpu} "
                                      f"holds lock {idx}: downgraded to M_NOWAIT",
                                      RuntimeWarning, stacklevel=3)
                    return how & ~M_WAITOK | M_NOWAIT
        return how

    def count(self, field: str, n: int = 1) -> None:
        """Add to a shared mbuf counter (MBS).  Rare events only.  Lock: takes vm."""
        with self.core.lock(L.VM_LOCK):
            self.w[L.MBS_WORD + L.MBS[field]] += n


def ctx(arena) -> Ctx:
    """The mbuf context of ``arena`` (made, and the zones with it, on first use)."""
    c = arena.__dict__.get("_mb")
    if c is None:
        arena._check_open()
        c = Ctx(arena)
        arena._mb = c
    return c


def _zctx(zone) -> Ctx:
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
    from .header import Mbuf
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
        a[FLAGS] = flags
        a[TYPE] = typ
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
            from .api import drop_ref
            _, error = drop_ref(c, h, i, flags, c.zidx_mbuf)
            c.mv[h + M_PKTDAT:h + MSIZE] = _ZERO_EXT
        w[i + FLAGS] = flags = flags & ~(M_EXT | M_NOFREE)
    if w[i + PH_TAGS] and flags & M_PKTHDR:
        if arg is not None and arg & MB_NOTAGS:
            w[i + PH_TAGS] = 0
        else:
            from .tags import delete_chain
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


PACK_VERIFIED = 1 << 61      # dtor arg from m_free: it checked the packet as below


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
        from .tags import delete_chain
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
    flags = w[i + FLAGS]
    if not w[i + TYPE]:
        raise MbufError(f"zone {zone.name!r}: packet {h} waits for the copies sharing its "
                        f"cluster; the last of them frees it")
    if (not flags & M_EXT or w[i + EXT_TYPE] != EXT_PACKET
            or c.u32[w[i + EXT_REFCNT] >> 2] != 1 or c.debug and _pack_unclean(c, h)):
        raise MbufError(f"zone {zone.name!r}: packet {h} does not hold a clean cluster of its "
                        f"own (flags {flags:#x}, type {w[i + TYPE]}, ext type "
                        f"{w[i + EXT_TYPE]}, size {w[i + EXT_SIZE]}, refcount "
                        f"{c.u32[w[i + EXT_REFCNT] >> 2]})")


def _set_aside(c, zone, h, i, flags) -> None:
    """A dead CPU's packet whose cluster copies still share: set it aside (it keeps
    its reference; ``api._limbo``) and refuse the free (MbufError): the last copy
    frees it.  If the copies went meanwhile, return: the free goes on as for a
    sole packet."""
    from .api import _limbo
    if c.w[i + TYPE] == 0:
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


# a cached packet holds a cluster: a request asleep on the cluster zone also needs the
# packet zone drained (its fini gives the cluster back), here and by the CPUs it asks
register_drain_companion(MBUF_CLUSTER_MEM_NAME, MBUF_PACKET_MEM_NAME)

for _fn in (mb_ctor_mbuf, mb_dtor_mbuf, mb_zinit_mbuf, mb_ctor_clust, mb_dtor_clust,
            mb_zinit_pack, mb_zfini_pack, mb_ctor_pack, mb_dtor_pack, mb_zinit_extref):
    hooks.register(_fn.__name__, _fn)
del _fn

