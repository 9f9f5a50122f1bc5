"""zones: the seed's ``mbuf_init`` -- the mbuf zones -- and the context the mbuf layer
works in on one arena object.

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
``mbuf_jumbo_alloc``: every jumbo cluster lies on contiguous pages.  The zone records
name their hooks (``ZONE_SPECS``); the hooks themselves are in ``ctors``.

Every arena object (a CPU) gets a context, ``ctx(arena)``, made on first use: it runs
``mbuf_init`` (which makes the zones when the arena has none: racing processes end up
with one set) and keeps the zones, the views of the segment and the refcount locks the
mbuf layer works with.  The word offsets of an mbuf's fields (``layout``'s mbuf
section) are named here for the whole layer.
"""

from __future__ import annotations

import os
import warnings

from .. import layout as L
from .. import layers
from ..layers import views
from ..errors import ZoneError
from ..zone import BUCKET_MAX, M_NOWAIT, M_WAITOK, register_drain_companion
from .constants import (EXT_CLUSTER, EXT_JUMBO9, EXT_JUMBO16, EXT_JUMBOP, EXT_PACKET,
                        MBUF_CLUSTER_MEM_NAME, MBUF_EXTREFCNT_MEM_NAME, MBUF_JUMBO9_MEM_NAME,
                        MBUF_JUMBO16_MEM_NAME, MBUF_JUMBOP_MEM_NAME, MBUF_MEM_NAME,
                        MBUF_PACKET_MEM_NAME, MBUF_TAG_MEM_NAME, MCLBYTES, MJUM9BYTES,
                        MJUM16BYTES, MJUMPAGESIZE, MSIZE, MTAG_SIZES)
from .errors import MbufError
from .limits import ensure_tuned

# word offsets inside an mbuf (layout's mbuf section).  The FLAGS word packs m_flags
# (its low 24 bits: test them with a mask, change them with |= and &= ~, write them
# whole with ``set_flags``), m_type (the byte at BTYPE: ``mv[h + BTYPE]``) and m_len
# (the u32 at ULEN of the 32-bit view: ``u32[(h >> 2) + ULEN]``).
NEXT, NEXTPKT, DATA, FLAGS = (L.MH[n] for n in ("NEXT", "NEXTPKT", "DATA", "FLAGS"))
FLAGS_MASK = L.MH_FLAGS_MASK
TYPE_SHIFT = 24                         # m_type in the FLAGS word
ULEN = L.MH_LEN_U32                     # m_len: u32 index from the mbuf's ``h >> 2``
BTYPE = L.MH_TYPE_BYTE                  # m_type: byte offset from the mbuf's handle
PH = L.PH_WORD
PH_RCVIF, PH_HEADER, PH_LEN, PH_CSUM_FLAGS, PH_CSUM_DATA, PH_VTAG, PH_TAGS = (
    PH + L.PH[n] for n in ("RCVIF", "HEADER", "LEN", "CSUM_FLAGS", "CSUM_DATA", "VTAG", "TAGS"))
VTAG_SHIFT = L.PH_VTAG_SHIFT            # the VTAG word: tso_segsz | ether_vtag << 16
E = L.EXT_WORD
EXT_BUF, EXT_SIZE, EXT_TYPE, EXT_REFCNT, EXT_ARG1, EXT_ARG2, EXT_OWNER = (
    E + L.EXT[n] for n in ("BUF", "SIZE", "TYPE", "REFCNT", "ARG1", "ARG2", "OWNER"))
HDR_END = L.MH_WORDS                    # words of m_hdr
PKTHDR_END = L.MH_WORDS + L.PH_WORDS    # words of m_hdr + m_pkthdr
EXT_END = E + L.EXT_WORDS
M_DAT, M_PKTDAT, EXT_FREE = L.MH_BYTES, L.PKTDAT, L.EXT_FREE
PACK_VERIFIED = 1 << 61      # a packet dtor's arg from m_free: it checked the packet
_MBS_STATE = L.MBS_WORD + L.MBS["STATE"]


def set_flags(w, i: int, flags: int) -> None:
    """Write the m_flags of the mbuf at word ``i`` whole (its m_type and m_len stay)."""
    w[i + FLAGS] = w[i + FLAGS] & ~FLAGS_MASK | flags

# the seed's zones: name -> (size, zcreate keywords, MBS limit field, hook names)
# hooks by module-qualified name (``shmalloc.hooks``): a process that meets these zones
# imports their module, whatever it imported itself
_Q = "shmalloc.mbuf.ctors:"
_HOOKS_MBUF = (_Q + "mb_ctor_mbuf", _Q + "mb_dtor_mbuf", _Q + "mb_zinit_mbuf", "")
_HOOKS_CLUST = (_Q + "mb_ctor_clust", _Q + "mb_dtor_clust", "", "")
_HOOKS_PACK = (_Q + "mb_ctor_pack", _Q + "mb_dtor_pack", _Q + "mb_zinit_pack",
               _Q + "mb_zfini_pack")
_HOOKS_EXTREF = ("", "", _Q + "mb_zinit_extref", "")
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
    core = views(arena)
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
    core = views(arena)
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
        core = views(arena)
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
        # the refcount journal of each lock: its owner-id word (``refs.journal``)
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
            b = self.core.pt[h >> L.PAGE_SHIFT] ^ self.mkid_bits   # Keg.tag_index_of,
            x = self.moffmap.get(h - b)                             # inlined (hot)
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


# a cached packet holds a cluster: a request asleep on the cluster zone also needs the
# packet zone drained (its fini gives the cluster back), here and by the CPUs it asks
register_drain_companion(MBUF_CLUSTER_MEM_NAME, MBUF_PACKET_MEM_NAME)


layers.register_on_create(mbuf_init)      # every new arena has the mbuf zones (not bare ones),
layers.register_setup(mbuf_init)          # a keg manager's too
