"""Issue 14: the mbuf layer as the seed wrote it, and the mbuf KPIs FreeBSD code calls.

Each test names, in its docstring, the FreeBSD function and release whose behaviour it
reproduces (the vectors come from ``/work/notes/freebsd_mbuf_kpis.md``).  One-process
arenas (``Arena.create_local``); every test ends with ``arena.check()`` (fixture).
"""

import errno
import struct

import pytest

from shmalloc import Arena
from shmalloc import layout as L
from shmalloc import mbuf as mb

NW = mb.M_NOWAIT
PATTERN = bytes(range(251)) * 80          # a prime period: misplaced bytes show


@pytest.fixture
def make():
    made = []

    def make(size=16 << 20, **tunables):
        a = Arena.create_local(size, tunables={k.replace("__", "."): v
                                               for k, v in tunables.items()} or None)
        made.append(a)
        return a
    yield make
    for a in made:
        a.check()
        a.destroy()


@pytest.fixture
def arena(make):
    return make()


def data(m):
    return mb.m_copydata(m, 0, mb.m_length(m)) if m is not None else b""


def chain(m):
    out = []
    while m is not None:
        out.append(m)
        m = m.m_next
    return out


def lens(m):
    return [x.m_len for x in chain(m)]


def used(a, name):
    return a.zone_stats(name).used


def pkt(a, nbytes, cluster=False):
    """A packet of ``nbytes`` of PATTERN: m_gethdr (+ m_append's plain mbufs), or one
    m_getcl packet."""
    m = (mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) if cluster
         else mb.m_gethdr(NW, mb.MT_DATA, arena=a))
    assert mb.m_append(m, nbytes, PATTERN[:nbytes]) == 1
    return m


def plain(a, nbytes, off=0, pkthdr=False):
    """One non-cluster mbuf holding PATTERN[off:off + nbytes]."""
    m = (mb.m_gethdr if pkthdr else mb.m_get)(NW, mb.MT_DATA, arena=a)
    mb.mtod(m)[:nbytes] = PATTERN[off:off + nbytes]
    m.m_len = nbytes
    if pkthdr:
        m.m_pkthdr.len = nbytes
    return m


def link(*ms):
    """Chain the mbufs ``ms`` (the first's pkthdr.len, if any, set to the total)."""
    for a, b in zip(ms, ms[1:]):
        a.m_next = b
    if ms[0].m_flags & mb.M_PKTHDR:
        ms[0].m_pkthdr.len = sum(x.m_len for x in ms)
    return ms[0]


# ============================================================================ 1. sysctl
def test_sysctl_takes_only_a_strictly_greater_limit(make):
    """FreeBSD 7/8 kern_mbuf.c sysctl_nmbclusters, sysctl_nmbjumbop: a write applies only
    when new > current (signed); the same value, a lower one, 0 and negative values are
    EINVAL and change nothing; nmbclusters_change fires on nmbclusters only."""
    a = make(kern__ipc__nmbclusters=25600)
    calls = []
    tag = mb.eventhandler_register("nmbclusters_change", lambda arg, ar: calls.append(ar))
    try:
        for value in (25600, 25599, 0, -1):
            with pytest.raises(mb.SysctlError) as e:
                a.sysctl("kern.ipc.nmbclusters", value)
            assert e.value.errno == errno.EINVAL
        assert a.sysctl("kern.ipc.nmbclusters") == 25600 and calls == []
        assert a.sysctl("kern.ipc.nmbclusters", 25601) == 25601
        assert calls == [a] and a.zone("mbuf_cluster").limit == 25601
        jp = a.sysctl("kern.ipc.nmbjumbop")
        with pytest.raises(mb.SysctlError):
            a.sysctl("kern.ipc.nmbjumbop", jp - 1)
        assert a.sysctl("kern.ipc.nmbjumbop", jp + 1) == jp + 1
        assert calls == [a]                               # no event for the jumbo limits
    finally:
        mb.eventhandler_deregister("nmbclusters_change", tag)


def test_an_unlimited_zone_takes_a_limit_below_its_use(make):
    """FreeBSD 7 kern_mbuf.c tunable_mbinit/mbuf_init and sysctl_nmbclusters, 7/8
    uma_core.c uma_zone_set_max: booted with kern.ipc.nmbclusters=0 the cluster zone is
    unlimited while the jumbo limits keep their computed defaults; 0 and -1 are still
    EINVAL; any positive value imposes a limit, even below the clusters in use, which
    then caps further allocation until frees bring the zone under it."""
    a = make(kern__ipc__nmbclusters=0)
    assert a.sysctl("kern.ipc.nmbclusters") == 0 and a.zone("mbuf_cluster").limit == 0
    assert a.sysctl("kern.ipc.nmbjumbop") == (1024 + a.sysctl("kern.maxusers") * 64) // 2
    for value in (0, -1):
        with pytest.raises(mb.SysctlError):
            a.sysctl("kern.ipc.nmbclusters", value)
    z = a.zone("mbuf_cluster")
    cls = [mb.m_cljget(None, NW, mb.MCLBYTES, arena=a) for _ in range(300)]
    assert None not in cls
    assert a.sysctl("kern.ipc.nmbclusters", 100) == 100 == z.limit
    a.check()                                            # 300 out, limit 100: sound
    z.drain()                                            # no cached cluster to hand out
    assert mb.m_cljget(None, NW, mb.MCLBYTES, arena=a) is None
    for cl in cls[100:]:
        z.free(cl)
    del cls[100:]
    z.drain()
    a.check()
    z.free(cls.pop())                                    # 99 out: under the limit
    z.drain()
    got = mb.m_cljget(None, NW, mb.MCLBYTES, arena=a)     # served again
    assert got is not None
    for cl in cls + [got]:
        z.free(cl)


def test_kern_ipc_mbstat_is_the_seed_struct(arena):
    """FreeBSD 7 kern_mbuf.c SYSCTL_STRUCT(_kern_ipc, mbstat, CTLFLAG_RD) and mbuf_init's
    field values, FreeBSD 8 sys/mbuf.h struct mbstat (112 bytes on amd64): readable
    through sysctl, read-only."""
    st = arena.sysctl("kern.ipc.mbstat")
    assert isinstance(st, mb.MbStat) and st == arena.mbstat()
    raw = st.pack()
    assert len(raw) == 112
    assert struct.unpack("<10Qh6x3Q", raw) == (0, 0, 0, 0, 0, 256, 2048, mb.MINCLSIZE,
                                               mb.MLEN, mb.MHLEN, 16, 0, 0, 0)
    with pytest.raises(mb.SysctlError) as e:
        arena.sysctl("kern.ipc.mbstat", 1)
    assert e.value.errno == errno.EPERM


# ============================================================================ 3. sizes
def test_sizes_are_freebsd_10_amd64():
    """FreeBSD 10.0+ sys/mbuf.h on amd64 (m_hdr 32 bytes, pkthdr 56; uipc_mbuf.c
    CTASSERTs): MLEN 224, MHLEN 168, MINCLSIZE 169 -- and mbstat reports them."""
    assert (mb.MSIZE, mb.MLEN, mb.MHLEN, mb.MINCLSIZE) == (256, 224, 168, 169)
    assert (L.MH_BYTES, L.PKTDAT - L.MH_BYTES) == (32, 56)
    a = Arena.create_local(8 << 20)
    try:
        st = a.mbstat()
        assert (st.m_mlen, st.m_mhlen, st.m_minclsize) == (224, 168, 169)
        m = mb.m_get(NW, mb.MT_DATA, arena=a)
        assert m.m_data == m.handle + 32 and mb.M_TRAILINGSPACE(m) == 224
        h = mb.m_gethdr(NW, mb.MT_DATA, arena=a)
        assert h.m_data == h.handle + 88 and mb.M_TRAILINGSPACE(h) == 168
        m.m_type, m.m_flags, m.m_len = mb.MT_OOBDATA, mb.M_PROTO8, 224   # packed word
        assert (m.m_type, m.m_flags, m.m_len) == (mb.MT_OOBDATA, mb.M_PROTO8, 224)
        with pytest.raises(mb.MbufError):
            m.m_flags = 1 << 24                          # m_flags is 24 bits (FreeBSD 10+)
        h.m_pkthdr.tso_segsz, h.m_pkthdr.ether_vtag = 0xFFFF, 0x123
        assert (h.m_pkthdr.tso_segsz, h.m_pkthdr.ether_vtag) == (0xFFFF, 0x123)
        mb.m_freem(m)
        mb.m_freem(h)
    finally:
        a.destroy()


def test_m_get2_switches_at_the_10_sizes(arena):
    """FreeBSD 10+ kern_mbuf.c m_get2: a plain mbuf up to MHLEN (MLEN without
    M_PKTHDR), a packet up to MCLBYTES, mbuf + page-size jumbo up to MJUMPAGESIZE, None
    above."""
    def kind(size, flags):
        m = mb.m_get2(size, NW, mb.MT_DATA, flags, arena=arena)
        if m is None:
            return None
        k = m.m_ext.ext_size if m.m_flags & mb.M_EXT else "mbuf"
        mb.m_freem(m)
        return k
    assert kind(168, mb.M_PKTHDR) == "mbuf" and kind(169, mb.M_PKTHDR) == 2048
    assert kind(224, 0) == "mbuf" and kind(225, 0) == 2048
    assert kind(2049, 0) == 4096 and kind(4097, 0) is None


def test_m_dup_switches_to_a_cluster_at_minclsize(arena):
    """FreeBSD 8/10 uipc_mbuf.c m_dup: a cluster while at least MINCLSIZE bytes remain,
    else a plain mbuf; an empty packet gives one empty packet-header mbuf."""
    for n, want in ((168, [False]), (169, [True]), (0, [False])):
        m = pkt(arena, n)
        d = mb.m_dup(m, NW)
        assert [bool(x.m_flags & mb.M_EXT) for x in chain(d)] == want, n
        assert d.m_flags & mb.M_PKTHDR and data(d) == PATTERN[:n]
        mb.m_freem(d)
        mb.m_freem(m)


def test_m_pullup_switches_at_mhlen(arena):
    """FreeBSD uipc_mbuf.c m_pullup (all releases): in place only when m_data + len lies
    strictly before the end of the mbuf's own data; a new mbuf otherwise, refused
    (chain freed, m_mpfail counted) above MHLEN."""
    before = arena.mbstat().m_mpfail
    m = link(plain(arena, 100, pkthdr=True), plain(arena, 100, 100))
    n = mb.m_pullup(m, 168)                  # 88 + 168 is not < 256: a new head
    assert n != m and lens(n) == [168, 32] and data(n) == PATTERN[:200]
    mb.m_freem(n)
    m = link(plain(arena, 100, pkthdr=True), plain(arena, 100, 100))
    assert mb.m_pullup(m, 169) is None
    assert arena.mbstat().m_mpfail == before + 1 and used(arena, "mbuf") == 0


def test_max_protohdr_is_settable_and_m_pullup_takes_it(arena):
    """FreeBSD uipc_mbuf.c m_pullup with max_protohdr (tcp_init sets 60 with INET6): a
    single mbuf always goes through a new mbuf, which takes max(len, max_protohdr)."""
    m = plain(arena, 100, pkthdr=True)
    n = mb.m_pullup(m, 50)
    assert lens(n) == [50, 50] and data(n) == PATTERN[:100]
    mb.m_freem(n)
    assert arena.sysctl("kern.ipc.max_protohdr", 60) == 60
    assert arena.sysctl("kern.ipc.max_hdr") == 76
    assert arena.sysctl("kern.ipc.max_datalen") == mb.MHLEN - 76
    m = plain(arena, 100, pkthdr=True)
    n = mb.m_pullup(m, 50)
    assert lens(n) == [60, 40] and data(n) == PATTERN[:100]
    mb.m_freem(n)
    with pytest.raises(mb.SysctlError):
        arena.sysctl("kern.ipc.max_protohdr", mb.MHLEN - 16)   # max_datalen would be 0
    with pytest.raises(mb.SysctlError):
        arena.sysctl("kern.ipc.max_hdr", 10)


def test_m_prepend_places_the_header_at_the_end(arena):
    """FreeBSD uipc_mbuf.c m_prepend / mbuf.h M_PREPEND: no leading space -> a new mbuf
    whose data sits at the end of its room, long-aligned ((MHLEN - 14) & ~7 = 152)."""
    m = plain(arena, 10, pkthdr=True)
    n = mb.M_PREPEND(m, 14, NW)
    assert n != m and n.m_data == n.handle + L.PKTDAT + 152 and n.m_len == 14
    assert n.m_pkthdr.len == 24 and not m.m_flags & mb.M_PKTHDR
    mb.m_freem(n)


# ============================================================================ 2. mbuf_init
SEED_ZONES = ("mbuf", "mbuf_cluster", "mbuf_packet", "mbuf_jumbo_page", "mbuf_jumbo_9k",
              "mbuf_jumbo_16k", "mbuf_ext_refcnt")


def _vmstat_rows(a):
    rows = {}
    for line in a.vmstat_z().splitlines()[2:]:
        name, _, rest = line.partition(":")
        rows[name] = [int(x) for x in rest.split(",")]
    return rows


def test_a_new_arena_has_the_seven_mbuf_zones(arena_name):
    """FreeBSD 7 kern_mbuf.c mbuf_init (SYSINIT at SI_SUB_MBUF): the zones exist right
    after boot -- vmstat -z lists all seven, untouched, before any mbuf is used; the
    limits are the tunables' (0: none, for the packet and refcount zones)."""
    for a in (Arena.create_local(8 << 20), Arena.create(arena_name, 8 << 20)):
        try:
            assert a.zones() == list(SEED_ZONES)
            rows = _vmstat_rows(a)
            assert list(rows) == list(SEED_ZONES)
            for name, (size, limit, used_, free, req, fail, sleep, xdom) in rows.items():
                assert (used_, free, req, fail) == (0, 0, 0, 0), name
            assert rows["mbuf_cluster"][1] == a.sysctl("kern.ipc.nmbclusters")
            assert rows["mbuf_packet"][1] == rows["mbuf_ext_refcnt"][1] == 0
            lines = a.netstat_m().splitlines()
            assert lines[0] == "0/0/0 mbufs in use (current/cache/total)"
            a.check()
        finally:
            a.destroy()


def test_a_bare_arena_has_no_mbuf_zones_until_used():
    """The opt-out for an arena of custom zones only (no FreeBSD counterpart: a kernel
    always boots with its mbuf zones); the mbuf layer sets itself up on first use."""
    a = Arena.create_local(8 << 20, bare=True)
    try:
        assert a.zones() == []
        a.zcreate("frames", 1000)
        m = mb.m_get(NW, mb.MT_DATA, arena=a)
        assert a.zones() == ["frames", *SEED_ZONES]
        mb.m_free(m)
        a.check()
    finally:
        a.destroy()


def test_the_smallest_arena_still_gets_the_mbuf_zones():
    """FreeBSD 7 mbuf_init on any machine: the smallest arena has the seven zones too
    (their depots take a page each there) and hands out packets."""
    a = Arena.create_local(L.min_arena_size())
    try:
        assert a.zones() == list(SEED_ZONES)
        m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a)
        assert m is not None and m.m_ext.ext_size == mb.MCLBYTES
        mb.m_freem(m)
        a.check()
    finally:
        a.destroy()


# ============================================================================ 4. M_WRITABLE, m_unshare
def test_mtod_agrees_with_m_writable(arena):
    """FreeBSD 8 sys/mbuf.h M_WRITABLE (not M_RDONLY, and the storage's count is 1):
    once the original packet is freed its copy holds the only reference (MOD's lingering
    mref: the count falls to 1), so it is writable -- and mtod's view is writable too.
    While the storage is shared both mbufs are read-only through mtod, which FreeBSD
    does not enforce."""
    p = pkt(arena, 100, cluster=True)
    n = mb.m_copym(p, 0, mb.M_COPYALL, NW)
    for x in (p, n):
        assert not mb.M_WRITABLE(x) and mb.mtod(x).readonly and mb.M_TRAILINGSPACE(x) == 0
        with pytest.raises(TypeError):
            mb.mtod(x)[0] = 1
    mb.m_freem(p)
    assert n.refcnt == 1 and mb.M_WRITABLE(n)
    v = mb.mtod(n)
    assert not v.readonly
    v[:3] = b"abc"
    assert data(n)[:3] == b"abc" and mb.M_TRAILINGSPACE(n) == mb.MCLBYTES - 100
    mb.m_freem(n)
    r = plain(arena, 10)
    r.m_flags |= mb.M_RDONLY
    assert not mb.M_WRITABLE(r) and mb.mtod(r).readonly
    mb.m_freem(r)


def test_m_unshare_copies_shared_storage(arena):
    """FreeBSD 8/14 uipc_mbuf.c m_unshare: a copy sharing a packet's cluster is
    replaced by a fresh packet-header cluster with the same bytes and header; the
    shared mbuf is freed, so the original's count falls back to 1."""
    m = pkt(arena, 100, cluster=True)
    n = mb.m_copym(m, 0, mb.M_COPYALL, NW)
    assert m.refcnt == 2 and not mb.M_WRITABLE(n)
    u = mb.m_unshare(n, NW)
    assert u != n and u.m_flags & mb.M_PKTHDR and u.m_flags & mb.M_EXT
    assert u.m_pkthdr.len == 100 and data(u) == PATTERN[:100]
    assert mb.M_WRITABLE(u) and not mb.mtod(u).readonly
    assert m.refcnt == 1 and mb.M_WRITABLE(m)
    mb.m_freem(u)
    mb.m_freem(m)


def test_m_unshare_coalesces_a_writable_chain(arena):
    """FreeBSD 8 uipc_mbuf.c m_unshare, its first step: a plain mbuf after a cluster
    with room is copied into it and freed, even when everything is writable -- the same
    head comes back holding all the bytes."""
    m = link(pkt(arena, 100, cluster=True), plain(arena, 50, 100))
    u = mb.m_unshare(m, NW)
    assert u == m and lens(u) == [150] and data(u) == PATTERN[:150]
    assert used(arena, "mbuf") == 0
    mb.m_freem(u)


def test_m_unshare_cuts_a_shared_jumbo_into_clusters(arena):
    """FreeBSD 8 uipc_mbuf.c m_unshare: storage larger than a cluster is copied into
    pieces of at most MCLBYTES (5000 bytes of a shared 9k jumbo: 2048 + 2048 + 904);
    the jumbo's count falls back to 1."""
    j = mb.m_getjcl(NW, mb.MT_DATA, mb.M_PKTHDR, mb.MJUM9BYTES, arena=arena)
    mb.m_append(j, 5000, PATTERN[:5000])
    n = mb.m_copym(j, 0, mb.M_COPYALL, NW)
    assert j.refcnt == 2
    u = mb.m_unshare(n, NW)
    assert lens(u) == [2048, 2048, 904] and data(u) == PATTERN[:5000]
    assert all(x.m_ext.ext_size == mb.MCLBYTES and mb.M_WRITABLE(x) for x in chain(u))
    assert u.m_pkthdr.len == 5000 and j.refcnt == 1
    mb.m_freem(u)
    mb.m_freem(j)


def test_m_unshare_frees_the_whole_chain_when_it_fails(make):
    """FreeBSD 8 uipc_mbuf.c m_unshare (and mbuf(9)): when a copy cannot be allocated
    the original chain is always reclaimed and NULL returned."""
    a = make(kern__ipc__nmbclusters=4)
    held = [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) for _ in range(4)]
    assert None not in held
    before = used(a, "mbuf")
    n = link(mb.m_copym(held[0], 0, mb.M_COPYALL, NW), plain(a, 20))
    assert mb.m_unshare(n, NW) is None
    assert used(a, "mbuf") == before and held[0].refcnt == 1
    for p in held:
        mb.m_freem(p)


def test_m_unshare_makes_read_only_storage_writable(arena):
    """A divergence, documented: FreeBSD's m_unshare leaves a plain M_RDONLY mbuf read
    only and copies M_RDONLY onto the copy of read-only external storage (M_COPYFLAGS);
    here its result is always writable, as the issue asks of it."""
    r = plain(arena, 30, pkthdr=True)
    r.m_flags |= mb.M_RDONLY
    u = mb.m_unshare(r, NW)
    assert u != r and mb.M_WRITABLE(u) and data(u) == PATTERN[:30]
    assert u.m_pkthdr.len == 30 and not u.m_flags & mb.M_RDONLY
    mb.m_freem(u)
    p = pkt(arena, 40, cluster=True)
    p.m_flags |= mb.M_RDONLY
    u = mb.m_unshare(p, NW)
    assert mb.M_WRITABLE(u) and data(u) == PATTERN[:40] and u.m_ext.ext_size == 2048
    mb.m_freem(u)


# ============================================================================ 8. m_split
def test_m_split_at_the_end_of_a_cluster_gives_an_empty_header(arena):
    """FreeBSD 10.1+ uipc_mbuf.c m_split, its remain == 0 branch for a packet: the tail
    is a new empty packet-header mbuf (trailing space MHLEN), even after the last mbuf;
    no reference is taken on the cut cluster, which stays writable (9.3 shared it with
    a zero-length tail)."""
    m0 = pkt(arena, 100, cluster=True)
    n = mb.m_split(m0, 100, NW)
    assert n.m_flags == mb.M_PKTHDR and n.m_len == 0 and n.m_pkthdr.len == 0
    assert n.m_next is None and mb.M_TRAILINGSPACE(n) == mb.MHLEN
    assert m0.refcnt == 1 and mb.M_WRITABLE(m0) and m0.m_pkthdr.len == 100
    mb.m_freem(n)
    t = plain(arena, 50, 100)
    m0.m_next = t
    m0.m_pkthdr.len = 150
    n = mb.m_split(m0, 100, NW)                       # [cluster 100][plain 50] at 100
    assert chain(n)[1] == t and lens(n) == [0, 50] and n.m_pkthdr.len == 50
    assert m0.m_next is None and m0.m_pkthdr.len == 100 and m0.refcnt == 1
    assert data(n) == PATTERN[100:150]
    mb.m_freem(n)
    mb.m_freem(m0)


def test_m_split_remain_zero_in_plain_mbufs(arena):
    """FreeBSD 10.1+ uipc_mbuf.c m_split: a plain packet-header mbuf cut at its end gives
    a tail whose data starts at m_pktdat (9.3 end-aligned it); a chain without packet
    header cut at the end of its last mbuf gives None and is unchanged (all releases);
    the tags stay with the head."""
    m0 = plain(arena, 30, pkthdr=True)
    t = mb.m_tag_alloc(1, 1, 4, NW, arena=arena)
    mb.m_tag_prepend(m0, t)
    n = mb.m_split(m0, 30, NW)
    assert n.m_data == n.handle + L.PKTDAT and mb.M_TRAILINGSPACE(n) == mb.MHLEN
    assert n.m_pkthdr.tags is None and m0.m_pkthdr.tags == t
    mb.m_freem(n)
    mb.m_freem(m0)
    m = plain(arena, 10)
    assert mb.m_split(m, 10, NW) is None and lens(m) == [10] and m.m_next is None
    mb.m_freem(m)
