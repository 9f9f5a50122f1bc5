"""mbuf constants: sizes (derived from the layout), flags, types and external
storage types, with FreeBSD's names and, where the seed's era fixes them, its values
(``sys/sys/param.h``, ``sys/sys/mbuf.h`` of FreeBSD 7/8).
"""

from __future__ import annotations

from .. import layout as L
from ..zone import M_NOWAIT, M_WAITOK, M_ZERO

# --- sizes --------------------------------------------------------------------------------
MSIZE = L.MSIZE                  # size of an mbuf; a power of two (dtom)
MLEN = L.MLEN                    # data in an mbuf without packet header
MHLEN = L.MHLEN                  # data in an mbuf with a packet header
MINCLSIZE = MHLEN + 1            # smallest amount worth a cluster
# (FreeBSD 10+ amd64: MLEN 224, MHLEN 168, MINCLSIZE 169; the seed's 7.x had 216/176/177,
# 8.x and 9.x 216/168/169 -- docs/mbuf-kpis.md)
MCLSHIFT = 11
MCLBYTES = 1 << MCLSHIFT         # 2048: a cluster
MJUMPAGESIZE = L.PAGE_SIZE       # page-sized jumbo cluster
MJUM9BYTES = 9 * 1024
MJUM16BYTES = 16 * 1024
M_COPYALL = 1000000000           # m_copym: copy to the end of the chain
PAGE_SIZE = L.PAGE_SIZE

# --- allocation flags (malloc(9)/uma(9)) ----------------------------------------------------
M_DONTWAIT = M_NOWAIT            # the mbuf spelling of FreeBSD 7
M_TRYWAIT = M_WAITOK

# --- m_flags --------------------------------------------------------------------------------
M_EXT = 0x00000001               # has associated external storage
M_PKTHDR = 0x00000002            # start of record: m_pkthdr is valid
M_EOR = 0x00000004               # end of record
M_RDONLY = 0x00000008            # associated data is read-only
M_PROTO1 = 0x00000010
M_PROTO2 = 0x00000020
M_PROTO3 = 0x00000040
M_PROTO4 = 0x00000080
M_PROTO5 = 0x00000100
M_BCAST = 0x00000200
M_MCAST = 0x00000400
M_FRAG = 0x00000800
M_FIRSTFRAG = 0x00001000
M_LASTFRAG = 0x00002000
M_SKIP_FIREWALL = 0x00004000
M_FREELIST = 0x00008000
M_VLANTAG = 0x00010000           # ether_vtag is valid
M_PROMISC = 0x00020000
M_NOFREE = 0x00040000            # do not free the mbuf (embedded in its cluster)
M_PROTO6 = 0x00080000
M_PROTO7 = 0x00100000
M_PROTO8 = 0x00200000
M_PROTOFLAGS = (M_PROTO1 | M_PROTO2 | M_PROTO3 | M_PROTO4 | M_PROTO5 | M_PROTO6 | M_PROTO7
                | M_PROTO8)
M_COPYFLAGS = (M_PKTHDR | M_EOR | M_RDONLY | M_PROTOFLAGS | M_SKIP_FIREWALL | M_BCAST
               | M_MCAST | M_FRAG | M_FIRSTFRAG | M_LASTFRAG | M_VLANTAG | M_PROMISC)
M_FLAGS_MAX = 0xFFFFFF          # m_flags is 24 bits (FreeBSD 10+: m_type:8, m_flags:24)

# --- m_type -----------------------------------------------------------------------------------
MT_NOTMBUF = 0                   # internal: not an mbuf (a packet waiting for its sharers)
MT_DATA = 1
MT_HEADER = MT_DATA
MT_SONAME = 8
MT_CONTROL = 14
MT_OOBDATA = 15
MT_NTYPES = 16
MT_NOINIT = 255                  # not a type: allocate an uninitialised mbuf

# --- m_ext.ext_type ---------------------------------------------------------------------------
EXT_CLUSTER = 1
EXT_SFBUF = 2
EXT_JUMBOP = 3
EXT_JUMBO9 = 4
EXT_JUMBO16 = 5
EXT_PACKET = 6
EXT_MBUF = 7
EXT_NET_DRV = 100
EXT_MOD_TYPE = 200
EXT_DISPOSABLE = 300
EXT_EXTREF = 400
EXT_CLUSTER_TYPES = (EXT_CLUSTER, EXT_JUMBOP, EXT_JUMBO9, EXT_JUMBO16, EXT_PACKET)
# m_extadd storage counted in an item of mbuf_ext_refcnt, freed by its free routine
# (EXT_MBUF: FreeBSD 7/8's mb_free_ext has no case for it; here it is freed as these are)
EXT_EXTADD_TYPES = (EXT_SFBUF, EXT_NET_DRV, EXT_MOD_TYPE, EXT_DISPOSABLE, EXT_MBUF)

# --- dtor argument -------------------------------------------------------------------------------
MB_NOTAGS = 0x1                  # mb_dtor_mbuf: leave the tags alone

# --- m_tag ------------------------------------------------------------------------------------
MTAG_ABI_COMPAT = 0              # cookie of the OpenBSD-compatible m_tag_get/m_tag_find
MTAG_PERSISTENT = 0x800          # survives m_tag_delete_nonpersistent
MTAG_SIZES = (64, 256, 1024, 4096)   # item sizes of the tag zones ("mbuf_tag_<size>")
MTAG_MAXLEN = MTAG_SIZES[-1] - L.MTAG_HDR_BYTES

# --- zone names (kern_mbuf.c, FreeBSD 7) ------------------------------------------------------
MBUF_MEM_NAME = "mbuf"
MBUF_CLUSTER_MEM_NAME = "mbuf_cluster"
MBUF_PACKET_MEM_NAME = "mbuf_packet"
MBUF_JUMBOP_MEM_NAME = "mbuf_jumbo_page"
MBUF_JUMBO9_MEM_NAME = "mbuf_jumbo_9k"
MBUF_JUMBO16_MEM_NAME = "mbuf_jumbo_16k"
MBUF_EXTREFCNT_MEM_NAME = "mbuf_ext_refcnt"
MBUF_TAG_MEM_NAME = "mbuf_tag"

__all__ = sorted({n for n in dir() if n.isupper() and not n.startswith("_")} - {"L"}
                 | {"M_NOWAIT", "M_WAITOK", "M_ZERO"})
assert M_ZERO and "M_ZERO" in __all__       # re-exported from the zone layer
