"""The mbuf API against FreeBSD's documented behaviour (mbuf(9), uipc_mbuf.c), on
in-process arenas.  Every test ends with ``arena.check()`` (fixture), also after the
errors it provokes."""

import errno

import pytest

import shmalloc
from shmalloc import Arena, BadHandleError, DoubleFreeError, ShmallocError
from shmalloc import layout as L
from shmalloc import mbuf as mb

NW = mb.M_NOWAIT
PATTERN = bytes(range(251)) * 40          # a prime period: misplaced bytes show


@pytest.fixture
def arena():
    a = Arena.create_local(16 << 20)
    mb.mbuf_init(a)
    yield a
    a.check()
    a.destroy()


def data(m):
    return mb.m_copydata(m, 0, mb.m_length(m)) if m is not None else b""


def used(a, name):
    return a.zone_stats(name).used


def chain(m):
    out = []
    while m is not None:
        out.append(m)
        m = m.m_next
    return out


def pkt(a, nbytes, cluster=False):
    """A packet of ``nbytes`` of PATTERN (chain of mbufs, or one packet-zone mbuf)."""
    m = (mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) if cluster
         else mb.m_gethdr(NW, mb.MT_DATA, arena=a))
    assert mb.m_append(m, nbytes, PATTERN[:nbytes]) == 1
    return m


# ============================================================================ sizes, layout
def test_sizes_derive_from_the_layout():
    assert mb.MSIZE == 256 and mb.MSIZE & (mb.MSIZE - 1) == 0
    assert mb.MLEN == mb.MSIZE - L.MH_BYTES == 224
    assert mb.MHLEN == mb.MLEN - L.PH_WORDS * 8 == 168
    assert mb.MINCLSIZE == mb.MHLEN + 1
    assert (mb.MCLBYTES, mb.MJUM9BYTES, mb.MJUM16BYTES) == (2048, 9216, 16384)
    assert mb.M_COPYALL == 1000000000


def test_public_surface_is_all_and_resolves():
    assert len(set(mb.__all__)) == len(mb.__all__)
    for name in mb.__all__:
        assert hasattr(mb, name), name
    for name in ("m_get", "m_gethdr", "m_getcl", "m_getjcl", "m_clget", "m_cljget", "m_free",
                 "m_freem", "m_copym", "m_copypacket", "m_dup", "m_copydata", "m_copyback",
                 "m_append", "m_pullup", "m_prepend", "M_PREPEND", "m_adj", "m_cat",
                 "m_split", "m_length", "mtod", "m_extadd", "m_tag_alloc", "m_tag_prepend",
                 "m_tag_locate", "m_tag_delete", "m_tag_delete_chain", "Mbuf"):
        assert name in mb.__all__, name


# ============================================================================ allocation
def test_m_get_is_an_empty_mbuf_aligned_to_msize(arena):
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    assert m.handle % mb.MSIZE == 0
    assert (m.m_len, m.m_flags, m.m_type, m.m_next, m.m_nextpkt) == (0, 0, mb.MT_DATA, None, None)
    assert m.m_data == m.handle + L.MH_BYTES
    assert mb.dtom(m.m_data + 100) == m.handle
    assert mb.M_TRAILINGSPACE(m) == mb.MLEN and mb.M_LEADINGSPACE(m) == 0
    assert m.refcnt == 1 and m.writable
    assert len(mb.mtod(m)) == mb.MLEN
    with pytest.raises(mb.MbufError):
        m.m_pkthdr.len
    with pytest.raises(mb.MbufError):
        m.m_ext.ext_buf
    mb.m_freem(m)


def test_m_gethdr_initialises_the_packet_header(arena):
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    assert m.m_flags == mb.M_PKTHDR and m.m_data == m.handle + L.PKTDAT
    ph = m.m_pkthdr
    assert (ph.len, ph.rcvif, ph.csum_flags, ph.csum_data, ph.tso_segsz, ph.ether_vtag,
            ph.tags) == (0, 0, 0, 0, 0, 0, None)
    assert mb.M_TRAILINGSPACE(m) == mb.MHLEN
    mb.m_freem(m)


def test_m_getcl_gives_an_mbuf_with_its_cluster_from_the_packet_zone(arena):
    before = arena.zone_stats("mbuf_packet").requests
    m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    assert arena.zone_stats("mbuf_packet").requests == before + 1
    assert m.m_flags == mb.M_PKTHDR | mb.M_EXT
    e = m.m_ext
    assert (e.ext_size, e.ext_type, e.ext_free, e.ext_arg1, e.ext_arg2) == (
        mb.MCLBYTES, mb.EXT_PACKET, "", 0, 0)
    assert m.m_data == e.ext_buf and m.refcnt == 1
    assert arena.zone("mbuf_cluster").keg.slab_of(e.ext_buf) >= 0
    assert mb.M_TRAILINGSPACE(m) == mb.MCLBYTES and len(mb.mtod(m)) == mb.MCLBYTES
    mb.m_freem(m)
    n = mb.m_getcl(NW, mb.MT_OOBDATA, 0, arena=arena)
    assert n.m_flags == mb.M_EXT and n.m_type == mb.MT_OOBDATA
    mb.m_freem(n)


@pytest.mark.parametrize("size,ext_type", [(mb.MCLBYTES, mb.EXT_PACKET),
                                           (mb.MJUMPAGESIZE, mb.EXT_JUMBOP),
                                           (mb.MJUM9BYTES, mb.EXT_JUMBO9),
                                           (mb.MJUM16BYTES, mb.EXT_JUMBO16)])
def test_m_getjcl_sizes(arena, size, ext_type):
    m = mb.m_getjcl(NW, mb.MT_DATA, mb.M_PKTHDR, size, arena=arena)
    assert (m.m_ext.ext_size, m.m_ext.ext_type, m.refcnt) == (size, ext_type, 1)
    assert mb.M_TRAILINGSPACE(m) == size
    mb.mtod(m)[size - 1] = 7                   # the whole cluster is the mbuf's
    mb.m_freem(m)


def test_m_getjcl_refuses_an_unknown_size(arena):
    with pytest.raises(mb.MbufError, match="no cluster zone of 3000"):
        mb.m_getjcl(NW, mb.MT_DATA, 0, 3000, arena=arena)


def test_m_clget_attaches_a_cluster(arena):
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    assert mb.m_clget(m, NW) == mb.M_EXT
    assert (m.m_ext.ext_type, m.m_ext.ext_size, m.m_data) == (mb.EXT_CLUSTER, mb.MCLBYTES,
                                                              m.m_ext.ext_buf)
    with pytest.raises(mb.MbufError, match="already has external storage"):
        mb.m_clget(m, NW)
    mb.m_freem(m)
    assert used(arena, "mbuf_cluster") == used(arena, "mbuf_packet")


def test_m_cljget_bare_cluster_and_m_cljset(arena):
    cl = mb.m_cljget(None, NW, mb.MJUMPAGESIZE, arena=arena)
    assert isinstance(cl, int)
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.m_cljset(m, cl, mb.EXT_JUMBOP)
    assert (m.m_ext.ext_buf, m.m_ext.ext_type, m.refcnt) == (cl, mb.EXT_JUMBOP, 1)
    with pytest.raises(mb.MbufError):
        mb.m_cljset(m, cl, mb.EXT_JUMBOP)
    mb.m_freem(m)
    assert used(arena, "mbuf_jumbo_page") == 0
    n = mb.m_get(NW, mb.MT_DATA, arena=arena)
    assert mb.m_cljget(n, NW, mb.MJUM9BYTES) == n.m_ext.ext_buf
    mb.m_freem(n)


def test_m_get2_picks_the_smallest_fit(arena):
    small = mb.m_get2(100, NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    assert not small.m_flags & mb.M_EXT
    mid = mb.m_get2(1000, NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    assert mid.m_ext.ext_type == mb.EXT_PACKET
    big = mb.m_get2(3000, NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    assert big.m_ext.ext_type == mb.EXT_JUMBOP
    assert mb.m_get2(5000, NW, mb.MT_DATA, 0, arena=arena) is None
    for m in (small, mid, big):
        mb.m_freem(m)


def test_bad_types_flags_and_how_are_refused(arena):
    with pytest.raises(mb.MbufError):
        mb.m_get(NW, 0, arena=arena)
    with pytest.raises(mb.MbufError, match="M_EXT"):
        mb.m_getcl(NW, mb.MT_DATA, mb.M_EXT, arena=arena)
    with pytest.raises(mb.MbufError, match="M_ZERO"):
        mb.m_get(NW | mb.M_ZERO, mb.MT_DATA, arena=arena)
    with pytest.raises(TypeError):
        mb.m_get(NW, "data", arena=arena)
    assert used(arena, "mbuf") == 0


def test_mt_noinit_skips_the_ctor_but_is_safe_to_free(arena):
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    h = m.handle
    assert mb.m_append(m, 50, PATTERN[:50])
    m.m_flags |= mb.M_EOR
    mb.m_freem(m)
    n = mb.m_get(NW, mb.MT_NOINIT, arena=arena)          # LIFO: the same mbuf
    assert n.handle == h
    assert n.m_len == 50 and n.m_flags == mb.M_EOR       # left as it was: not initialised
    assert n.m_next is None                             # the dtor cleared the links
    assert mb.m_init(n, NW, mb.MT_DATA, mb.M_PKTHDR) == 0
    assert (n.m_len, n.m_flags, n.m_pkthdr.len) == (0, mb.M_PKTHDR, 0)
    mb.m_freem(n)


# ============================================================================ free
def test_m_free_returns_the_next_mbuf(arena):
    m = pkt(arena, 400)
    second = m.m_next
    assert mb.m_free(m) == second
    mb.m_freem(second)
    assert used(arena, "mbuf") == 0


def test_double_free_is_refused_and_changes_nothing(arena):
    m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    mb.m_freem(m)
    with pytest.raises(DoubleFreeError):
        mb.m_freem(m)
    n = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.m_free(n)
    with pytest.raises(DoubleFreeError):
        mb.m_free(n)
    arena.check()


def test_freed_mbufs_come_back_with_no_next_no_tags_refcount_1(arena):
    """DPDK's test_nb_segs_and_next_reset, in spirit: a chain split and freed is
    handed out again with clean links, no tags and refcount 1."""
    m = pkt(arena, 450)                                    # 3 mbufs
    t = mb.m_tag_alloc(7, 1, 8, NW, arena=arena)
    mb.m_tag_prepend(m, t)
    handles = {x.handle for x in chain(m)}
    tail = mb.m_split(m, mb.MHLEN, NW)
    mb.m_freem(m)
    mb.m_freem(tail)
    assert used(arena, "mbuf_tag_64") == 0
    again = [mb.m_get(NW, mb.MT_DATA, arena=arena) for _ in range(4)]
    assert handles <= {x.handle for x in again}
    for x in again:
        assert x.m_next is None and x.m_nextpkt is None and x.refcnt == 1
    for x in again:
        mb.m_free(x)
    p = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    c = mb.m_copym(p, 0, mb.M_COPYALL, NW)
    mb.m_freem(p)
    mb.m_freem(c)
    q = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    assert q.refcnt == 1 and q.m_pkthdr.tags is None and q.m_next is None
    mb.m_freem(q)


def test_from_handle_accepts_only_allocated_mbufs(arena):
    m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    same = mb.Mbuf.from_handle(arena, m.handle)
    assert same == m and hash(same) == hash(m)
    with pytest.raises(BadHandleError):
        mb.Mbuf.from_handle(arena, m.m_ext.ext_buf)       # a cluster, not an mbuf
    with pytest.raises(BadHandleError):
        mb.Mbuf.from_handle(arena, m.handle + 8)
    mb.m_freem(m)
    with pytest.raises(BadHandleError):
        mb.Mbuf.from_handle(arena, m.handle)


# ============================================================================ fields
def test_field_writes_are_checked_against_the_storage(arena):
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    m.m_data = m.m_data + 16
    m.m_len = mb.MHLEN - 16
    with pytest.raises(mb.MbufError):
        m.m_len = mb.MHLEN
    with pytest.raises(mb.MbufError):
        m.m_data = m.handle
    with pytest.raises(mb.MbufError):
        m.m_flags = mb.M_EXT | mb.M_PKTHDR
    with pytest.raises(mb.MbufError):
        m.m_flags = 0                                   # M_PKTHDR moves, not cleared
    m.m_flags = mb.M_PKTHDR | mb.M_BCAST
    m.m_pkthdr.csum_flags = 3
    m.m_pkthdr.ether_vtag = 0xFFF
    with pytest.raises(mb.MbufError):
        m.m_pkthdr.tso_segsz = 1 << 16
    other = Arena.create_local(4 << 20)
    try:
        x = mb.m_get(NW, mb.MT_DATA, arena=other)
        with pytest.raises(TypeError):
            m.m_next = x
        mb.m_free(x)
    finally:
        other.destroy()
    with pytest.raises(mb.MbufError):
        m.m_next = m
    mb.m_freem(m)


# ============================================================================ data
def test_m_append_fills_trailing_space_then_new_mbufs(arena):
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    assert mb.m_append(m, 500, PATTERN[:500]) == 1
    assert [x.m_len for x in chain(m)] == [mb.MHLEN, mb.MLEN, 500 - mb.MHLEN - mb.MLEN]
    assert m.m_pkthdr.len == 500 == mb.m_length(m)
    assert data(m) == PATTERN[:500]
    assert mb.m_last(m) == chain(m)[-1]
    mb.m_freem(m)


def test_m_copydata_ranges(arena):
    m = pkt(arena, 600)
    assert mb.m_copydata(m, 150, 300) == PATTERN[150:450]
    buf = bytearray(10)
    assert mb.m_copydata(m, 590, 10, buf) is buf and buf == PATTERN[590:600]
    assert mb.m_copydata(m, 600, 0) == b""
    with pytest.raises(mb.MbufError, match="past the end"):
        mb.m_copydata(m, 590, 11)
    with pytest.raises(mb.MbufError, match="negative"):
        mb.m_copydata(m, -1, 5)
    mb.m_freem(m)


def test_m_copyback_writes_and_extends_with_zeros(arena):
    m = pkt(arena, 100)
    mb.m_copyback(m, 50, 10, b"X" * 10)
    mb.m_copyback(m, 300, 20, b"Y" * 20)                  # a gap of zeros, then data
    want = PATTERN[:50] + b"X" * 10 + PATTERN[60:100] + bytes(200) + b"Y" * 20
    assert data(m) == want and m.m_pkthdr.len == 320
    mb.m_freem(m)


def test_m_copyback_refuses_shared_storage_before_writing(arena):
    m = pkt(arena, 100, cluster=True)
    c = mb.m_copym(m, 0, mb.M_COPYALL, NW)
    with pytest.raises(mb.MbufError, match="shared or read-only"):
        mb.m_copyback(c, 10, 5, b"zzzzz")
    assert data(m) == PATTERN[:100] == data(c)
    mb.m_freem(c)
    mb.m_copyback(m, 10, 5, b"zzzzz")                      # sole owner again: writable
    assert data(m)[10:15] == b"zzzzz"
    mb.m_freem(m)


def test_mtod_views_the_data_and_is_read_only_when_shared(arena):
    m = pkt(arena, 10, cluster=True)
    v = mb.mtod(m)
    assert bytes(v[:10]) == PATTERN[:10] and not v.readonly
    v[0] = 0xEE
    c = mb.m_copym(m, 0, mb.M_COPYALL, NW)
    assert mb.mtod(m).readonly and mb.mtod(c).readonly
    assert mb.mtod(c)[0] == 0xEE
    mb.m_freem(c)
    assert not mb.mtod(m).readonly
    mb.m_freem(m)


# ============================================================================ copies
def test_m_copym_shares_clusters_and_copies_the_header(arena):
    m = pkt(arena, 1500, cluster=True)
    m.m_pkthdr.csum_flags = 5
    c = mb.m_copym(m, 0, mb.M_COPYALL, NW)
    assert c.m_ext.ext_buf == m.m_ext.ext_buf and m.refcnt == c.refcnt == 2
    assert c.m_pkthdr.len == 1500 and c.m_pkthdr.csum_flags == 5 and data(c) == data(m)
    assert not mb.M_WRITABLE(m) and not mb.M_WRITABLE(c)
    assert mb.M_LEADINGSPACE(c) == mb.M_TRAILINGSPACE(c) == mb.M_TRAILINGSPACE(m) == 0
    c2 = mb.m_copym(c, 100, 200, NW)                       # a copy of the copy
    assert m.refcnt == 3 and c2.m_ext.ext_buf == m.m_ext.ext_buf
    assert data(c2) == PATTERN[100:300] and not c2.m_flags & mb.M_PKTHDR
    for x in (m, c, c2):
        mb.m_freem(x)
    assert used(arena, "mbuf") == 0 and used(arena, "mbuf_packet") == 0


def test_m_copym_copies_internal_data(arena):
    m = pkt(arena, 400)
    c = mb.m_copym(m, 50, 300, NW)
    assert data(c) == PATTERN[50:350] and not c.m_flags & mb.M_PKTHDR   # off0 > 0: no header
    h = mb.m_copym(m, 0, 300, NW)
    assert data(h) == PATTERN[:300] and h.m_pkthdr.len == 300
    mb.m_freem(h)
    mb.mtod(c)[0] ^= 0xFF                                  # the copy is its own
    assert data(m) == PATTERN[:400]
    assert mb.m_copym(m, 400, mb.M_COPYALL, NW) is None    # nothing left to copy
    mb.m_freem(c)
    mb.m_freem(m)


def test_m_copym_out_of_range_raises_and_leaks_nothing(arena):
    m = pkt(arena, 300)
    before = used(arena, "mbuf")
    with pytest.raises(mb.MbufError, match="length"):
        mb.m_copym(m, 100, 201, NW)
    with pytest.raises(mb.MbufError, match="offset"):
        mb.m_copym(m, 301, mb.M_COPYALL, NW)
    with pytest.raises(mb.MbufError):
        mb.m_copym(m, -1, 10, NW)
    assert used(arena, "mbuf") == before
    mb.m_freem(m)


def test_m_copypacket_keeps_the_leading_space(arena):
    m = pkt(arena, 300)
    m = mb.M_PREPEND(m, 0, NW)
    mb.m_adj(m, 20)                                       # leading space 20 in the first mbuf
    c = mb.m_copypacket(m, NW)
    assert mb.M_LEADINGSPACE(c) == mb.M_LEADINGSPACE(m) == 20
    assert data(c) == data(m) == PATTERN[20:300] and c.m_pkthdr.len == 280
    mb.m_freem(c)
    mb.m_freem(m)
    with pytest.raises(mb.MbufError, match="packet header"):
        x = mb.m_get(NW, mb.MT_DATA, arena=arena)
        try:
            mb.m_copypacket(x, NW)
        finally:
            mb.m_free(x)


def test_m_dup_is_a_deep_writable_copy(arena):
    m = pkt(arena, 1200, cluster=True)
    c = mb.m_copym(m, 0, mb.M_COPYALL, NW)                 # m is shared now
    d = mb.m_dup(m, NW)
    assert data(d) == PATTERN[:1200] and d.m_pkthdr.len == 1200
    assert d.m_ext.ext_buf != m.m_ext.ext_buf and d.refcnt == 1 and mb.M_WRITABLE(d)
    empty = pkt(arena, 0)
    small = mb.m_dup(empty, NW)                            # an empty packet: one mbuf
    assert small.m_len == 0 and small.m_next is None
    for x in (c, m, d, small, empty):
        mb.m_freem(x)


# ============================================================================ reshaping
def test_m_pullup_makes_the_head_contiguous(arena):
    m = pkt(arena, 400)
    m = mb.m_pullup(m, 200)           # MHLEN < 200: more than a header mbuf holds
    assert m is None
    assert used(arena, "mbuf") == 0   # the whole chain was freed
    m = pkt(arena, 100, cluster=True)
    t = pkt(arena, 100)
    mb.m_cat(m, t)
    mb.m_fixhdr(m)
    p = mb.m_pullup(m, 120)
    assert p is not None and not p.m_flags & mb.M_EXT and p.m_len >= 120
    assert data(p) == PATTERN[:100] + PATTERN[:100] and p.m_pkthdr.len == 200
    assert mb.m_pullup(p, 120) == p                        # already contiguous: same mbuf
    assert mb.m_pullup(p, 201) is None and used(arena, "mbuf") == 0
    assert arena.mbstat().m_mpfail == 2


def test_m_prepend_and_M_PREPEND(arena):
    m = pkt(arena, 100)
    n = mb.M_PREPEND(m, 14, NW)                            # no leading space: a new mbuf
    assert n != m and n.m_len == 14 and n.m_next == m
    assert n.m_pkthdr.len == 114 and not m.m_flags & mb.M_PKTHDR
    assert mb.M_TRAILINGSPACE(n) < 8                       # at the end of its room (aligned)
    mb.mtod(n)[:14] = b"E" * 14
    mb.m_adj(n, 4)
    o = mb.M_PREPEND(n, 4, NW)                             # leading space now: same mbuf
    assert o == n and o.m_pkthdr.len == 114
    with pytest.raises(mb.MbufError):
        mb.m_prepend(o, mb.MHLEN + 1, NW)
    mb.m_freem(o)
    c = pkt(arena, 10, cluster=True)
    mb.m_adj(c, 5)
    share = mb.m_copym(c, 0, mb.M_COPYALL, NW)
    p = mb.M_PREPEND(c, 2, NW)                              # shared: no leading space to use
    assert p != c and data(p)[2:] == PATTERN[5:10]
    mb.m_freem(p)
    mb.m_freem(share)


def test_m_adj_head_and_tail(arena):
    m = pkt(arena, 500)
    head = mb.MHLEN + 6                                     # the first mbuf and 6 bytes
    mb.m_adj(m, head)                                       # head: first mbuf emptied, kept
    assert m.m_len == 0 and m.m_pkthdr.len == 500 - head and data(m) == PATTERN[head:500]
    n_before = used(arena, "mbuf")
    mb.m_adj(m, -200)                                       # tail: trailing mbufs freed
    assert m.m_pkthdr.len == 300 - head and data(m) == PATTERN[head:300]
    assert used(arena, "mbuf") == n_before - 1
    mb.m_adj(m, -1000)
    assert m.m_pkthdr.len == 0 and mb.m_length(m) == 0
    mb.m_freem(m)


def test_m_cat_copies_small_data_and_links_the_rest(arena):
    m = pkt(arena, 20)
    n = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.m_append(n, 30, PATTERN[20:50])
    mb.m_cat(m, n)                                          # fits: copied, n freed
    assert m.m_next is None and m.m_len == 50 and data(m) == PATTERN[:50]
    assert m.m_pkthdr.len == 20
    big = pkt(arena, 1000, cluster=True)
    mb.m_cat(m, big)                                        # no room: linked
    assert m.m_next == big and mb.m_length(m) == 1050
    assert m.m_pkthdr.len == 20                             # m_cat leaves the header alone
    mb.m_freem(m)


def test_m_split_in_data_and_in_a_shared_cluster(arena):
    m = pkt(arena, 500)
    t = mb.m_split(m, 200, NW)
    assert (mb.m_length(m), mb.m_length(t), m.m_pkthdr.len, t.m_pkthdr.len) == (
        200, 300, 200, 300)
    assert data(m) + data(t) == PATTERN[:500]
    assert mb.m_split(m, 201, NW) is None and mb.m_length(m) == 200
    mb.m_freem(t)
    mb.m_freem(m)
    c = pkt(arena, 1500, cluster=True)
    tail = mb.m_split(c, 1000, NW)
    assert tail.m_ext.ext_buf == c.m_ext.ext_buf and c.refcnt == 2
    assert data(tail) == PATTERN[1000:1500] and data(c) == PATTERN[:1000]
    mb.m_freem(c)
    assert tail.refcnt == 1
    mb.m_freem(tail)


def test_packet_headers_move_and_copy_with_their_tags(arena):
    a = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    a.m_pkthdr.len = 0
    t = mb.m_tag_alloc(9, 2, 4, NW, arena=arena)
    t.data[:] = b"tag!"
    mb.m_tag_prepend(a, t)
    b = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    assert mb.m_dup_pkthdr(b, a, NW) == 1
    tb = mb.m_tag_locate(b, 9, 2)
    assert tb is not None and tb != t and tb.data.tobytes() == b"tag!"
    c = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.m_move_pkthdr(c, a)
    assert c.m_flags & mb.M_PKTHDR and not a.m_flags & mb.M_PKTHDR
    assert mb.m_tag_locate(c, 9, 2) == t and t.owner == c.handle
    mb.m_demote(c, 1)
    assert not c.m_flags & mb.M_PKTHDR
    for x in (a, b, c):
        mb.m_freem(x)
    assert used(arena, "mbuf_tag_64") == 0


def test_alignment_macros(arena):
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.M_ALIGN(m, 20)
    assert mb.M_TRAILINGSPACE(m) - 20 < 8 and (m.m_data - m.handle) % 8 == 0
    h = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    mb.MH_ALIGN(h, 40)
    assert 40 <= mb.M_TRAILINGSPACE(h) < 48
    with pytest.raises(mb.MbufError):
        mb.MH_ALIGN(m, 10)
    mb.m_freem(m)
    mb.m_freem(h)


# ============================================================================ packets and limbo
def test_a_packet_freed_first_waits_for_its_copies(arena):
    p = pkt(arena, 100, cluster=True)
    c = mb.m_copym(p, 0, mb.M_COPYALL, NW)
    mb.m_freem(p)                                           # the cluster is still c's
    assert used(arena, "mbuf_packet") == 1 and c.refcnt == 1
    with pytest.raises(DoubleFreeError):
        mb.m_freem(p)
    with pytest.raises(BadHandleError):
        mb.Mbuf.from_handle(arena, p.handle)
    assert data(c) == PATTERN[:100]
    mb.m_freem(c)                                           # the packet goes back with it
    assert used(arena, "mbuf_packet") == 0 and used(arena, "mbuf") == 0
    assert used(arena, "mbuf_cluster") == arena.zone_stats("mbuf_packet").free


# ============================================================================ tags
def test_tags_alloc_prepend_locate_delete(arena):
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    tags = []
    for i, n in enumerate((4, 100, 900, 3000)):
        t = mb.m_tag_alloc(1000, i, n, NW, arena=arena)
        t.data[:] = bytes([i]) * n
        mb.m_tag_prepend(m, t)
        tags.append(t)
    assert mb.m_tag_first(m) == tags[-1]
    assert mb.m_tag_next(m, tags[-1]) == tags[-2]
    assert mb.m_tag_locate(m, 1000, 2).data.tobytes() == bytes([2]) * 900
    assert mb.m_tag_locate(m, 1000, 2, tags[2]) is None
    assert mb.m_tag_locate(m, 999, 2) is None
    mb.m_tag_delete(m, tags[2])
    assert mb.m_tag_locate(m, 1000, 2) is None
    mb.m_tag_delete_chain(m, tags[1])                      # tags[1] and after (tags[0])
    assert mb.m_tag_first(m) == tags[3] and mb.m_tag_next(m, tags[3]) is None
    mb.m_freem(m)                                           # the dtor deletes the rest
    for n in mb.MTAG_SIZES:
        assert used(arena, f"mbuf_tag_{n}") == 0


def test_tag_misuse_is_refused(arena):
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    o = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    t = mb.m_tag_get(5, 8, NW, arena=arena)
    assert mb.m_tag_alloc(0, 5, -1, NW, arena=arena) is None
    with pytest.raises(mb.MbufError, match="exceeds the largest tag"):
        mb.m_tag_alloc(0, 5, mb.MTAG_MAXLEN + 1, NW, arena=arena)
    mb.m_tag_prepend(m, t)
    with pytest.raises(mb.MbufError, match="already in the tag list"):
        mb.m_tag_prepend(o, t)
    with pytest.raises(mb.MbufError, match="not in the tag list"):
        mb.m_tag_delete(o, t)
    with pytest.raises(mb.MbufError, match="m_tag_delete"):
        mb.m_tag_free(t)
    assert mb.m_tag_find(m, 5) == t
    plain = mb.m_get(NW, mb.MT_DATA, arena=arena)
    with pytest.raises(mb.MbufError, match="packet header"):
        mb.m_tag_prepend(plain, mb.m_tag_get(6, 1, NW, arena=arena))
    loose = mb.m_tag_get(6, 1, NW, arena=arena)
    mb.m_tag_free(loose)
    for x in (m, o, plain):
        mb.m_freem(x)
    leftover = [n for n in mb.MTAG_SIZES if used(arena, f"mbuf_tag_{n}")]
    assert leftover == [64]                                 # the one refused by m_tag_prepend


def test_m_tag_delete_nonpersistent_and_copy_chain(arena):
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    keep = mb.m_tag_alloc(1, mb.MTAG_PERSISTENT | 1, 1, NW, arena=arena)
    drop = mb.m_tag_alloc(1, 2, 1, NW, arena=arena)
    mb.m_tag_prepend(m, keep)
    mb.m_tag_prepend(m, drop)
    n = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    assert mb.m_tag_copy_chain(n, m, NW) == 1
    assert mb.m_tag_locate(n, 1, 2) is not None
    mb.m_tag_delete_nonpersistent(m)
    assert mb.m_tag_first(m) == keep and mb.m_tag_next(m, keep) is None
    mb.m_freem(m)
    mb.m_freem(n)
    assert used(arena, "mbuf_tag_64") == 0


# ============================================================================ external storage
def ext_free_counter(m, arg1, arg2):
    """A module-level free routine (resolvable by name in any process)."""
    _ext_calls.append((m.m_ext.ext_buf, m.m_ext.ext_size, arg1, arg2))


_ext_calls = []


def test_m_extadd_free_routine_runs_once_when_the_last_reference_goes(arena):
    _ext_calls.clear()
    store = arena.zcreate("ext_store", 3000)
    buf = store.alloc(NW)
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    assert mb.m_extadd(m, buf, 3000, ext_free_counter, 11, 22, 0, mb.EXT_NET_DRV) == 0
    assert m.m_ext.ext_free == "tests.test_mbuf_api:ext_free_counter" or \
        m.m_ext.ext_free.endswith("test_mbuf_api:ext_free_counter")
    assert (m.m_data, m.refcnt, m.m_flags & mb.M_EXT) == (buf, 1, mb.M_EXT)
    assert used(arena, "mbuf_ext_refcnt") == 1
    mb.m_append(m, 100, PATTERN[:100])
    copies = [mb.m_copym(m, 0, mb.M_COPYALL, NW) for _ in range(5)]
    assert m.refcnt == 6 and all(data(c) == PATTERN[:100] for c in copies)
    mb.m_freem(m)
    for c in copies[:-1]:
        mb.m_freem(c)
    assert _ext_calls == []
    mb.m_freem(copies[-1])
    assert _ext_calls == [(buf, 3000, 11, 22)]
    assert used(arena, "mbuf_ext_refcnt") == 0 and used(arena, "mbuf") == 0
    store.free(buf)


def ext_free_interrupted(m, arg1, arg2):
    """A free routine interrupted after it started (a KeyboardInterrupt, which
    m_free does not catch: it is no error of the routine's)."""
    _ext_calls.append((m.m_ext.ext_buf, m.m_ext.ext_size, arg1, arg2))
    raise KeyboardInterrupt


def test_an_m_free_cut_short_in_the_free_routine_frees_the_mbuf_when_called_again(arena):
    """The last drop of m_extadd storage interrupted in its free routine leaves the
    mbuf marked (M_EXT, its count forgotten: refcnt 0) while its count serves other
    storage: copying it is refused, and m_free again frees the mbuf without calling
    the routine a second time (before, the copy counted itself into the other
    storage's count)."""
    _ext_calls.clear()
    store = arena.zcreate("ext_store", 3000)
    bufs = [store.alloc(NW) for _ in range(2)]
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    assert mb.m_extadd(m, bufs[0], 3000, ext_free_interrupted, 1, 2) == 0
    with pytest.raises(KeyboardInterrupt):
        mb.m_freem(m)
    assert _ext_calls == [(bufs[0], 3000, 1, 2)]
    assert m.m_flags & mb.M_EXT and m.refcnt == 0 and not m.writable
    n = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)      # its count, reused
    assert mb.m_extadd(n, bufs[1], 3000, ext_free_counter, 3, 4) == 0
    assert used(arena, "mbuf_ext_refcnt") == 1 and n.refcnt == 1
    with pytest.raises(mb.MbufError, match="last reference"):
        mb.m_copym(m, 0, mb.M_COPYALL, NW)
    with pytest.raises(mb.MbufError, match="last reference"):
        mb.m_copypacket(m, NW)
    assert n.refcnt == 1 and used(arena, "mbuf") == 2      # the copies went
    mb.m_freem(m)
    assert len(_ext_calls) == 1 and used(arena, "mbuf") == 1
    mb.m_freem(n)
    assert _ext_calls[1:] == [(bufs[1], 3000, 3, 4)]
    assert used(arena, "mbuf_ext_refcnt") == 0 and used(arena, "mbuf") == 0
    store.free_bulk(bufs)


def test_m_extadd_refuses_bad_storage_and_types(arena):
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    with pytest.raises(mb.MbufError, match="not one of"):
        mb.m_extadd(m, arena._core.geometry.data_off, 10, ext_free_counter, 0, 0, 0,
                    mb.EXT_CLUSTER)
    with pytest.raises(mb.MbufError, match="inside the arena"):
        mb.m_extadd(m, 8, 10, ext_free_counter)
    with pytest.raises(mb.MbufError, match="free pages"):
        mb.m_extadd(m, arena.size - 4096, 10, ext_free_counter)
    with pytest.raises(shmalloc.HookError):
        mb.m_extadd(m, m.handle, 10, lambda *a: None)
    assert not m.m_flags & mb.M_EXT and used(arena, "mbuf_ext_refcnt") == 0
    mb.m_freem(m)


# ============================================================================ label hook
def test_a_failing_label_hook_fails_packet_header_allocations_cleanly(arena):
    seen = []

    def refuse(m, how):
        seen.append(m.handle)
        return errno.ENOMEM

    warm = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    mb.m_freem(warm)
    before = {z: used(arena, z) for z in ("mbuf", "mbuf_packet", "mbuf_cluster")}
    fails = arena.zone_stats("mbuf_packet").failures
    old = mb.set_mbuf_label_hook(refuse)
    try:
        assert mb.m_gethdr(NW, mb.MT_DATA, arena=arena) is None
        assert mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena) is None
        m = mb.m_get(NW, mb.MT_DATA, arena=arena)            # no packet header: no label
        assert m is not None
        mb.m_free(m)
        c = mb.m_getcl(NW, mb.MT_DATA, 0, arena=arena)
        mb.m_freem(c)
    finally:
        mb.set_mbuf_label_hook(old)
    assert len(seen) == 2
    # the failed packet went back to the keg and its cluster to the cluster zone (UMA:
    # the zone fini runs when a ctor fails): nothing is held that is not cached
    assert used(arena, "mbuf") == before["mbuf"] and used(arena, "mbuf_packet") == 0
    assert used(arena, "mbuf_cluster") == arena.zone_stats("mbuf_packet").free
    assert arena.zone_stats("mbuf_packet").failures == fails + 1
    arena.check()

    def explode(m, how):
        raise RuntimeError("label backend down")

    mb.set_mbuf_label_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="label backend down"):
            mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    finally:
        mb.set_mbuf_label_hook(old)
    assert used(arena, "mbuf_packet") == 0
    assert used(arena, "mbuf_cluster") == arena.zone_stats("mbuf_packet").free
    m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    assert m is not None and m.refcnt == 1
    mb.m_freem(m)


def test_dtors_refuse_half_freed_mbufs(arena):
    m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    c = mb.m_copym(m, 0, mb.M_COPYALL, NW)
    with pytest.raises(mb.MbufError, match="clean cluster"):
        arena.zone("mbuf_packet").free(m.handle)              # shared: refused
    with pytest.raises(mb.MbufError, match="M_EXT"):
        arena.zone("mbuf").free(c.handle)                     # still holds a reference
    with pytest.raises(mb.MbufError, match="references"):
        arena.zone("mbuf_cluster").free(m.m_ext.ext_buf)
    arena.check()
    mb.m_freem(c)
    mb.m_freem(m)


def test_errors_are_shmalloc_errors():
    assert issubclass(mb.MbufError, ShmallocError) and issubclass(mb.SysctlError, ShmallocError)


def test_mb_notags_leaves_the_tags_to_the_caller(arena):
    from shmalloc.mbuf.tags import T_OWNER
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    t = mb.m_tag_alloc(3, 3, 3, NW, arena=arena)
    mb.m_tag_prepend(m, t)
    arena.zone("mbuf").free(m.handle, mb.MB_NOTAGS)
    assert used(arena, "mbuf_tag_64") == 1                   # not deleted: the caller's now
    arena._core.w[(t.handle >> 3) + T_OWNER] = 0             # ... who gives it a new home
    mb.m_tag_free(t)
    assert used(arena, "mbuf_tag_64") == 0
