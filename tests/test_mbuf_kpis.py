"""Issue 14: the mbuf layer as the seed wrote it, and the mbuf KPIs FreeBSD code calls.

Each test names, in its docstring, the FreeBSD function and release whose behaviour it
reproduces (the vectors come from ``/work/notes/freebsd_mbuf_kpis.md``).  One-process
arenas (``Arena.create_local``); every test ends with ``arena.check()`` (fixture).
"""

import errno
import multiprocessing
import pathlib
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mbuf_mp_workers
from shmalloc import Arena, Supervisor
from shmalloc import layout as L
from shmalloc import mbuf as mb
from shmalloc.mail import MSG_DRAIN
from shmalloc.scripts import cli

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


# ============================================================================ 5. the KPIs
# ---------------------------------------------------------------- M_SIZE, M_START, m_align
def test_m_size_m_start_and_m_align(arena):
    """FreeBSD 10+ sys/mbuf.h M_SIZE, M_START and m_align (which M_ALIGN, MH_ALIGN and
    MEXT_ALIGN became): the data moves by (M_SIZE - len) & ~7 in a virgin mbuf of any
    kind; a moved m_data is refused (KASSERT), so is a len over M_SIZE."""
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    h = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
    p = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    q = mb.m_getcl(NW, mb.MT_DATA, 0, arena=arena)
    assert [mb.M_SIZE(x) for x in (m, h, p, q)] == [224, 168, 2048, 2048]
    assert (mb.M_START(m), mb.M_START(h)) == (m.handle + L.MH_BYTES, h.handle + L.PKTDAT)
    assert mb.M_START(p) == p.m_ext.ext_buf
    mb.m_align(m, 10)
    assert m.m_data == m.handle + L.MH_BYTES + 208
    mb.m_align(h, 0)
    assert h.m_data == h.handle + L.PKTDAT + 168
    assert (mb.M_LEADINGSPACE(h), mb.M_TRAILINGSPACE(h)) == (168, 0)
    mb.m_align(p, 100)
    assert p.m_data == p.m_ext.ext_buf + 1944
    with pytest.raises(mb.MbufError, match="virgin"):
        mb.m_align(m, 10)
    with pytest.raises(mb.MbufError):
        mb.m_align(q, 2049)
    for x in (m, h, p, q):
        mb.m_freem(x)


# ---------------------------------------------------------------- m_defrag
def test_m_defrag(arena):
    """FreeBSD 8+ uipc_mbuf.c m_defrag: a chain without packet header comes back as is;
    a packet is copied into a first cluster (a plain mbuf up to MHLEN) and pieces of at
    most MCLBYTES -- clusters over MLEN, plain mbufs below -- joined by m_cat; the
    original is freed; m_pkthdr.len is fixed first."""
    loose = link(plain(arena, 10), plain(arena, 10, 10))
    assert mb.m_defrag(loose, NW) == loose
    mb.m_freem(loose)
    for total, want in ((1000, [(2048, 1000)]), (3000, [(2048, 2048), (2048, 952)]),
                        (2100, [(2048, 2048), (None, 52)]), (150, [(None, 150)])):
        parts = [plain(arena, min(100, total), 0, pkthdr=True)]
        while sum(x.m_len for x in parts) < total:
            done = sum(x.m_len for x in parts)
            parts.append(plain(arena, min(100, total - done), done))
        m = link(*parts)
        m.m_pkthdr.len = total - 1                          # wrong: m_fixhdr fixes it
        d = mb.m_defrag(m, NW)
        got = [(x.m_ext.ext_size if x.m_flags & mb.M_EXT else None, x.m_len)
               for x in chain(d)]
        assert got == want, total
        assert d.m_pkthdr.len == total and data(d) == PATTERN[:total]
        assert d.m_flags & mb.M_PKTHDR and all(x.m_type == mb.MT_DATA for x in chain(d))
        mb.m_freem(d)
    assert used(arena, "mbuf") == 0


def test_m_defrag_failure_leaves_the_packet(make):
    """FreeBSD 8+ uipc_mbuf.c m_defrag: when a cluster cannot be had NULL is returned,
    the new mbufs are freed and the original stays -- with its m_pkthdr.len fixed."""
    a = make(kern__ipc__nmbclusters=1)
    held = mb.m_cljget(None, NW, mb.MCLBYTES, arena=a)
    m = link(plain(a, 100, 0, pkthdr=True), *(plain(a, 100, k) for k in range(100, 1000, 100)))
    m.m_pkthdr.len = 5
    assert mb.m_defrag(m, NW) is None
    assert m.m_pkthdr.len == 1000 and data(m) == PATTERN[:1000] and len(chain(m)) == 10
    mb.m_freem(m)
    a.zone("mbuf_cluster").free(held)


# ---------------------------------------------------------------- m_collapse
def test_m_collapse(arena):
    """FreeBSD 8+ uipc_mbuf.c m_collapse: copy an mbuf into the one before it when
    that has strictly more room; else merge two neighbours after the head into a new
    cluster (strictly under MCLBYTES) and go on from it; m0 once at most maxfrags,
    else NULL (nothing freed) -- with no early return for a short chain."""
    m = link(plain(arena, 100, 0, pkthdr=True), plain(arena, 100, 100), plain(arena, 100, 200))
    assert mb.m_collapse(m, NW, 2) == m
    assert lens(m) == [100, 200] and data(m) == PATTERN[:300]
    mb.m_freem(m)
    one = plain(arena, 10, 0, pkthdr=True)
    assert mb.m_collapse(one, NW, 5) is None and lens(one) == [10]
    with pytest.raises(mb.MbufError):
        mb.m_collapse(one, NW, 1)
    mb.m_freem(one)
    c1 = pkt(arena, 1500, cluster=True)
    c2 = mb.m_getcl(NW, mb.MT_DATA, 0, arena=arena)
    mb.mtod(c2)[:1500] = PATTERN[1500:3000]
    c2.m_len = 1500
    m = link(c1, c2, plain(arena, 100, 3000), plain(arena, 100, 3100))
    assert mb.m_collapse(m, NW, 3) == m
    assert lens(m) == [1500, 1600, 100] and data(m) == PATTERN[:3200]
    mb.m_freem(m)
    m = link(plain(arena, 10, 0, pkthdr=True), plain(arena, 200, 10), plain(arena, 200, 210),
             plain(arena, 200, 410))
    assert mb.m_collapse(m, NW, 2) == m
    assert lens(m) == [10, 600] and chain(m)[1].m_flags & mb.M_EXT
    assert data(m) == PATTERN[:610]
    mb.m_freem(m)
    assert used(arena, "mbuf") == 0


# ---------------------------------------------------------------- m_getm2, m_getm
def _kinds(m):
    return [(x.m_ext.ext_size if x.m_flags & mb.M_EXT else "mbuf",
             bool(x.m_flags & mb.M_PKTHDR), bool(x.m_flags & mb.M_EOR)) for x in chain(m)]


def test_m_getm2(arena):
    """FreeBSD 10+ kern_mbuf.c m_getm2: jumbo over MCLBYTES, cluster from MINCLSIZE,
    else a plain mbuf (MINCLSIZE even without M_PKTHDR); M_PKTHDR on the first and M_EOR
    on the last only; appended to a given chain, whose head is returned and whose last
    mbuf loses M_EOR; len 0 gives NULL, with M_EOR FreeBSD would crash."""
    def get(n, flags, m=None):
        return mb.m_getm2(m, n, NW, mb.MT_DATA, flags, arena=arena)
    for n, flags, want in ((168, mb.M_PKTHDR, [("mbuf", True, False)]),
                           (169, mb.M_PKTHDR, [(2048, True, False)]),
                           (100, 0, [("mbuf", False, False)]),
                           (200, 0, [(2048, False, False)]),
                           (5000, mb.M_PKTHDR | mb.M_EOR, [(4096, True, False),
                                                          (2048, False, True)])):
        m = get(n, flags)
        assert _kinds(m) == want, n
        mb.m_freem(m)
    head = plain(arena, 5, pkthdr=True)
    head.m_flags |= mb.M_EOR
    assert get(10, mb.M_PKTHDR, head) == head
    assert _kinds(head) == [("mbuf", True, False), ("mbuf", False, False)]
    mb.m_freem(head)
    assert get(0, 0) is None
    with pytest.raises(mb.MbufError):
        get(0, mb.M_EOR)
    with pytest.raises(mb.MbufError):
        get(-1, 0)
    m = mb.m_getm(None, 10, NW, mb.MT_DATA, arena=arena)    # m_getm: M_PKTHDR
    assert _kinds(m) == [("mbuf", True, False)]
    mb.m_freem(m)


def test_m_getm2_without_jumbos_and_its_failure(make):
    """FreeBSD 10+ kern_mbuf.c m_getm2: the jumbo is tried with M_NOWAIT, clusters are
    the fallback; one failure frees everything made and returns NULL."""
    a = make(kern__ipc__nmbjumbop=1)
    j = mb.m_cljget(None, NW, mb.MJUMPAGESIZE, arena=a)            # the only jumbo
    m = mb.m_getm2(None, 5000, NW, mb.MT_DATA, mb.M_PKTHDR | mb.M_EOR, arena=a)
    assert _kinds(m) == [(2048, True, False), (2048, False, False), (2048, False, True)]
    mb.m_freem(m)
    a.zone("mbuf_jumbo_page").free(j)
    b = make(kern__ipc__nmbclusters=1)
    cl = mb.m_cljget(None, NW, mb.MCLBYTES, arena=b)                # the only cluster
    before = used(b, "mbuf"), used(b, "mbuf_jumbo_page")
    assert mb.m_getm2(None, 5000, NW, mb.MT_DATA, 0, arena=b) is None   # jumbo, then none
    assert (used(b, "mbuf"), used(b, "mbuf_jumbo_page")) == before
    b.zone("mbuf_cluster").free(cl)


# ---------------------------------------------------------------- m_uiotombuf
def test_m_uiotombuf(arena):
    """FreeBSD 8+ uipc_mbuf.c m_uiotombuf, from Python bytes or iterables: all the data
    (or at most len > 0 bytes) in m_getm2's chain for total + align, the first mbuf's
    data align bytes in; one empty mbuf for no data; NULL when align >= MHLEN."""
    def get(src, **kw):
        return mb.m_uiotombuf(src, NW, arena=arena, **kw)
    m = get(b"", flags=mb.M_PKTHDR)
    assert _kinds(m) == [("mbuf", True, False)] and m.m_len == 0 and m.m_pkthdr.len == 0
    mb.m_freem(m)
    m = get(b"")
    assert _kinds(m) == [("mbuf", False, False)] and m.m_len == 0
    mb.m_freem(m)
    m = get(PATTERN[:100], align=8, flags=mb.M_PKTHDR)
    assert m.m_data == m.handle + L.PKTDAT + 8 and lens(m) == [100] and m.m_pkthdr.len == 100
    mb.m_freem(m)
    m = get(PATTERN[:100], align=100)
    assert _kinds(m) == [(2048, False, False)] and m.m_data == m.m_ext.ext_buf + 100
    assert data(m) == PATTERN[:100]
    mb.m_freem(m)
    assert get(PATTERN[:100], align=mb.MHLEN) is None
    m = get(PATTERN[:100], len=10)
    assert data(m) == PATTERN[:10]
    mb.m_freem(m)
    m = get(PATTERN[:100], len=-1)
    assert data(m) == PATTERN[:100]
    mb.m_freem(m)
    m = get(PATTERN[:3000], flags=mb.M_PKTHDR | mb.M_EOR)
    assert _kinds(m) == [(4096, True, True)] and m.m_len == 3000 and m.m_pkthdr.len == 3000
    mb.m_freem(m)
    pieces = iter([PATTERN[k:k + 7] for k in range(0, 700, 7)])
    m = get(pieces, len=300, flags=mb.M_PKTHDR)
    assert data(m) == PATTERN[:300] and m.m_pkthdr.len == 300
    mb.m_freem(m)
    with pytest.raises(TypeError):
        get([b"ok", 5])
    assert used(arena, "mbuf") == 0


# ---------------------------------------------------------------- m_pulldown
def test_m_pulldown_in_place_and_chopped(arena):
    """FreeBSD 10+ uipc_mbuf2.c m_pulldown: a region inside one mbuf is returned in
    place when it starts the mbuf or the caller takes an offset; otherwise the mbuf is
    split (m_dup1: a plain mbuf for under MINCLSIZE bytes)."""
    m = plain(arena, 100, pkthdr=True)
    n, off = mb.m_pulldown(m, 20, 40, offp=True)
    assert n == m and off == 20 and used(arena, "mbuf") == 1
    n = mb.m_pulldown(m, 20, 40)
    assert n == m.m_next and lens(m) == [20, 80] and not n.m_flags & (mb.M_EXT | mb.M_PKTHDR)
    assert data(m) == PATTERN[:100] and bytes(mb.mtod(n)[:40]) == PATTERN[20:60]
    mb.m_freem(m)


def test_m_pulldown_across_mbufs(arena):
    """FreeBSD 10+ uipc_mbuf2.c m_pulldown: a region over two mbufs is pulled into the
    first's room (6a), pushed into the next one's leading space (6b: it must hold the
    rest), or copied into a new mbuf after the first (the hard way); the bytes stay."""
    m = link(plain(arena, 50, pkthdr=True), plain(arena, 100, 50))
    n, off = mb.m_pulldown(m, 40, 30, offp=True)
    assert (n, off) == (m, 40) and lens(m) == [70, 80] and data(m) == PATTERN[:150]
    mb.m_freem(m)
    nxt = mb.m_get(NW, mb.MT_DATA, arena=arena)
    nxt.m_data += 50
    mb.mtod(nxt)[:150] = PATTERN[160:310]
    nxt.m_len = 150
    m = link(plain(arena, 160, pkthdr=True), nxt)
    n, off = mb.m_pulldown(m, 150, 30, offp=True)
    assert (n, off) == (nxt, 0) and lens(m) == [150, 160] and data(m) == PATTERN[:310]
    assert bytes(mb.mtod(n)[:30]) == PATTERN[150:180]
    mb.m_freem(m)
    m = link(plain(arena, 150, pkthdr=True), plain(arena, 200, 150))
    n, off = mb.m_pulldown(m, 100, 100, offp=True)
    assert off == 0 and chain(m)[1] == n and lens(m) == [100, 100, 150]
    assert bytes(mb.mtod(n)[:100]) == PATTERN[100:200] and data(m) == PATTERN[:350]
    mb.m_freem(m)


def test_m_pulldown_failures_free_the_chain(arena):
    """FreeBSD uipc_mbuf2.c m_pulldown: more than MCLBYTES, or a region past the end of
    the chain, frees the whole chain and returns NULL."""
    for off, n in ((0, 2049), (90, 20)):
        m = plain(arena, 100, pkthdr=True)
        assert mb.m_pulldown(m, off, n) is None
        assert used(arena, "mbuf") == 0


def test_m_pulldown_shared_storage_stays_in_place(arena):
    """FreeBSD 10+ uipc_mbuf2.c m_pulldown returns a region inside shared storage in
    place (8.0 copied it): nothing is allocated, and mtod keeps it read-only here."""
    p = pkt(arena, 1000, cluster=True)
    cp = mb.m_copym(p, 0, mb.M_COPYALL, NW)
    before = used(arena, "mbuf")
    n, off = mb.m_pulldown(cp, 100, 200, offp=True)
    assert (n, off) == (cp, 100) and used(arena, "mbuf") == before
    assert mb.mtod(n).readonly and bytes(mb.mtod(n)[100:300]) == PATTERN[100:300]
    mb.m_freem(cp)
    mb.m_freem(p)


# ---------------------------------------------------------------- m_copyup
def test_m_copyup(arena):
    """FreeBSD 8+ uipc_mbuf.c m_copyup: a new first mbuf with the first len bytes at
    dstoff of its packet data (the header moved there); more than MHLEN - dstoff bytes
    frees the chain and gives NULL."""
    m = plain(arena, 20, pkthdr=True)
    n = mb.m_copyup(m, 20, 16)
    assert n != m and n.m_data == n.handle + L.PKTDAT + 16 and lens(n) == [20]
    assert n.m_pkthdr.len == 20 and data(n) == PATTERN[:20] and used(arena, "mbuf") == 1
    mb.m_freem(n)
    m = plain(arena, 100, pkthdr=True)
    assert mb.m_copyup(m, 69, 100) is None and used(arena, "mbuf") == 0
    m = link(plain(arena, 10, pkthdr=True), plain(arena, 100, 10))
    n = mb.m_copyup(m, 50, 8)
    assert lens(n) == [50, 60] and data(n) == PATTERN[:110]
    mb.m_freem(n)
    m = plain(arena, 10, pkthdr=True)
    assert mb.m_copyup(m, 20, 0) is None and used(arena, "mbuf") == 0   # too short


# ---------------------------------------------------------------- m_apply, m_getptr
def _sparse(a):
    """[10][0][5]: PATTERN[:15] with an empty mbuf between."""
    return link(plain(a, 10, pkthdr=True), plain(a, 0), plain(a, 5, 10))


def test_m_apply(arena):
    """FreeBSD 8+ uipc_mbuf.c m_apply: f(arg, data, count) on each piece in order,
    empty mbufs in the range included; the first non-zero return is returned at once;
    len 0 calls nothing; a range past the end is a KASSERT (MbufError, no call)."""
    m = _sparse(arena)
    seen = []
    assert mb.m_apply(m, 0, 15, lambda arg, d, n: seen.append((arg, bytes(d), n)), "x") == 0
    assert seen == [("x", PATTERN[:10], 10), ("x", b"", 0), ("x", PATTERN[10:15], 5)]
    calls = []

    def stop(arg, d, n):
        calls.append(n)
        return 7 if len(calls) == 2 else 0
    assert mb.m_apply(m, 0, 15, stop) == 7 and calls == [10, 0]
    assert mb.m_apply(m, 3, 0, stop) == 0 and len(calls) == 2
    with pytest.raises(mb.MbufError):
        mb.m_apply(m, 10, 6, stop)
    assert len(calls) == 2
    mb.m_freem(m)


def test_m_getptr(arena):
    """FreeBSD 8+ uipc_mbuf.c m_getptr: the mbuf holding byte loc and its offset;
    empty mbufs are skipped; the chain's length gives the end of the last mbuf; past
    it, or below 0, NULL."""
    m = _sparse(arena)
    m1, _, m3 = chain(m)
    assert mb.m_getptr(m, 0) == (m1, 0) and mb.m_getptr(m, 10) == (m3, 0)
    assert mb.m_getptr(m, 15) == (m3, 5)
    assert mb.m_getptr(m, 16) is None and mb.m_getptr(m, -1) is None
    mb.m_freem(m)


# ---------------------------------------------------------------- m_devget
def test_m_devget(arena):
    """FreeBSD 10+ uipc_mbuf.c m_devget (max_linkhdr 16): a small packet lands
    max_linkhdr bytes into a packet-header mbuf when it and that fit in MHLEN (FreeBSD 8
    tested MLEN, splitting 160 bytes in two); a cluster from MINCLSIZE; off over MHLEN
    or nothing to copy gives NULL without allocating; rcvif and m_pkthdr.len set."""
    assert arena.sysctl("kern.ipc.max_linkhdr") == 16
    m = mb.m_devget(PATTERN, 150, 0, 7, arena=arena)
    assert m.m_data == m.handle + L.PKTDAT + 16 and lens(m) == [150]
    assert (m.m_pkthdr.rcvif, m.m_pkthdr.len, data(m)) == (7, 150, PATTERN[:150])
    mb.m_freem(m)
    m = mb.m_devget(PATTERN, 160, 0, 7, arena=arena)
    assert m.m_data == m.handle + L.PKTDAT and lens(m) == [160]
    mb.m_freem(m)
    m = mb.m_devget(PATTERN, 169, 0, 7, arena=arena)
    assert _kinds(m) == [(2048, True, False)]
    mb.m_freem(m)
    assert mb.m_devget(PATTERN, 10, 169, 7, arena=arena) is None
    assert mb.m_devget(PATTERN, 0, 0, 7, arena=arena) is None
    assert used(arena, "mbuf") == 0
    pieces = []
    m = mb.m_devget(PATTERN, 3000, 0, 9, lambda s, d, n: (pieces.append(n), d.__setitem__(
        slice(0, n), s)), arena=arena)
    assert _kinds(m) == [(2048, True, False), (2048, False, False)] and lens(m) == [2048, 952]
    assert pieces == [2048, 952] and data(m) == PATTERN[:3000]
    assert (m.m_pkthdr.len, m.m_pkthdr.rcvif) == (3000, 9)
    mb.m_freem(m)


# ---------------------------------------------------------------- m_catpkt
def test_m_catpkt(arena):
    """FreeBSD 10+ uipc_mbuf.c m_catpkt: m_pkthdr.len adds up, n loses its packet header
    and tags (m_demote), then m_cat copies it into m's last mbuf when that is writable
    with room, or links it."""
    m = plain(arena, 10, pkthdr=True)
    n = plain(arena, 20, 10, pkthdr=True)
    mb.m_tag_prepend(n, mb.m_tag_alloc(1, 1, 4, NW, arena=arena))
    mb.m_catpkt(m, n)
    assert lens(m) == [30] and m.m_pkthdr.len == 30 and data(m) == PATTERN[:30]
    assert used(arena, "mbuf") == 1 and used(arena, "mbuf_tag_64") == 0
    mb.m_freem(m)
    p = pkt(arena, 100, cluster=True)
    cp = mb.m_copym(p, 0, mb.M_COPYALL, NW)
    n = plain(arena, 20, 100, pkthdr=True)
    mb.m_catpkt(cp, n)
    assert cp.m_next == n and not n.m_flags & mb.M_PKTHDR and cp.m_pkthdr.len == 120
    loose = plain(arena, 1)
    with pytest.raises(mb.MbufError):
        mb.m_catpkt(cp, loose)                          # no packet header: KASSERT
    mb.m_freem(loose)
    mb.m_freem(cp)
    mb.m_freem(p)
    assert used(arena, "mbuf") == 0


# ---------------------------------------------------------------- m_sanity
def test_m_sanity(arena, capsys):
    """FreeBSD 8 uipc_mbuf.c m_sanity (INVARIANTS off: printf): 1 always; a fault is
    reported as "mbuf <ptr>: ..." or, with sanitize, repaired; the length check is
    skipped when the chain holds no data."""
    m = link(plain(arena, 100, pkthdr=True))
    assert mb.m_sanity(m, 0) == 1 and capsys.readouterr().err == ""
    m.m_pkthdr.len = 99
    assert mb.m_sanity(m, 0) == 1
    assert capsys.readouterr().err == f"mbuf {m.handle:#x}: m_pkthdr.len != mbuf chain length\n"
    mb.m_freem(m)
    second = plain(arena, 10, 100, pkthdr=True)
    m = link(plain(arena, 100, pkthdr=True), second)
    assert mb.m_sanity(m, 1) == 1 and capsys.readouterr().err == ""
    assert not second.m_flags & mb.M_PKTHDR
    mb.m_freem(m)
    e = plain(arena, 0, pkthdr=True)
    e.m_pkthdr.len = 5
    assert mb.m_sanity(e, 0) == 1 and capsys.readouterr().err == ""
    mb.m_freem(e)


def test_m_sanity_panics_under_invariants():
    """FreeBSD 8 uipc_mbuf.c m_sanity with INVARIANTS: the fault panics -- here a debug
    arena raises MbufError."""
    a = Arena.create_local(8 << 20, debug=1)
    try:
        m = plain(a, 10, pkthdr=True)
        m.m_pkthdr.len = 3
        with pytest.raises(mb.MbufError, match="m_pkthdr.len != mbuf chain length"):
            mb.m_sanity(m, 0)
        mb.m_freem(m)
        a.check()
    finally:
        a.destroy()


# ---------------------------------------------------------------- m_print
def test_m_print(arena, capsys):
    """FreeBSD 8/10 uipc_mbuf.c m_print: "mbuf: %p len: %d, next: %p, %b" and the first
    maxlen bytes as %*D; a packet stops after m_pkthdr.len bytes (0: nothing) and tells
    what the chain lacks; NULL prints "mbuf: 0" (10+)."""
    m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    mb.m_append(m, 3, b"abc")
    mb.m_print(m)
    assert capsys.readouterr().out == f"mbuf: {m.handle:#x} len: 3, next: 0, 3<pkthdr,ext>, 61-62-63\n"
    mb.m_print(m, 2)
    assert capsys.readouterr().out.endswith(", 3<pkthdr,ext>, 61-62\n")
    m.m_pkthdr.len = 5
    mb.m_print(m)
    assert capsys.readouterr().out.splitlines()[-1] == "2 bytes unaccounted for."
    m.m_pkthdr.len = 0
    mb.m_print(m)
    assert capsys.readouterr().out == ""
    mb.m_freem(m)
    e = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.m_print(e)
    assert capsys.readouterr().out == f"mbuf: {e.handle:#x} len: 0, next: 0, 0\n"
    mb.m_freem(e)
    mb.m_print(None)
    assert capsys.readouterr().out == "mbuf: 0\n"


# ---------------------------------------------------------------- m_extadd, m_extaddref
def ext_free_log(m, arg1, arg2):
    """A module-level free routine."""
    _freed.append((m.m_ext.ext_type, arg1, arg2))


_freed = []


def test_m_extadd_net_drv_storage_is_freed_once(arena):
    """FreeBSD 7/8 kern_mbuf.c m_extadd and mb_free_ext: flags are ORed in (M_RDONLY:
    not writable); copies share the count; the free routine runs once, when the last
    reference goes (7/8 called it with (arg1, arg2), 10+ with the mbuf: here (m, arg1,
    arg2))."""
    _freed.clear()
    store = arena.zcreate("ext_store", 1000)
    buf = store.alloc(NW)
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    assert mb.m_extadd(m, buf, 1000, ext_free_log, 1, 2, mb.M_RDONLY, mb.EXT_NET_DRV) == 0
    assert m.m_flags == mb.M_EXT | mb.M_RDONLY and m.m_data == buf and not mb.M_WRITABLE(m)
    n = mb.m_copym(m, 0, mb.M_COPYALL, NW)
    mb.m_freem(m)
    assert _freed == []
    mb.m_freem(n)
    assert _freed == [(mb.EXT_NET_DRV, 1, 2)]
    store.free(buf)


def test_m_extadd_takes_every_type_of_the_era(arena):
    """FreeBSD 7/8 sys/mbuf.h EXT_* and kern_mbuf.c m_extadd: SFBUF, NET_DRV, MOD_TYPE,
    DISPOSABLE, MBUF (counted in mbuf_ext_refcnt), EXTREF (the caller's counter, set to
    1), the jumbo types (a bare cluster of the zone, freed to it); EXT_CLUSTER is
    refused as FreeBSD KASSERTs, EXT_PACKET as the packet zone's own."""
    _freed.clear()
    store = arena.zcreate("ext_store", 1000)
    ctr = arena.zcreate("ext_ctr", 8).alloc(NW)
    for typ in (mb.EXT_SFBUF, mb.EXT_NET_DRV, mb.EXT_MOD_TYPE, mb.EXT_DISPOSABLE,
                mb.EXT_MBUF, mb.EXT_EXTREF):
        buf = store.alloc(NW)
        m = mb.m_get(NW, mb.MT_DATA, arena=arena)
        kw = {"ref_cnt": ctr} if typ == mb.EXT_EXTREF else {}
        assert mb.m_extadd(m, buf, 1000, ext_free_log, typ, 0, 0, typ, **kw) == 0
        assert m.m_ext.ext_type == typ and m.refcnt == 1
        mb.m_freem(m)
        assert _freed[-1] == (typ, typ, 0)
        store.free(buf)
    for size, typ in ((mb.MJUMPAGESIZE, mb.EXT_JUMBOP), (mb.MJUM9BYTES, mb.EXT_JUMBO9),
                      (mb.MJUM16BYTES, mb.EXT_JUMBO16)):
        cl = mb.m_cljget(None, NW, size, arena=arena)
        m = mb.m_gethdr(NW, mb.MT_DATA, arena=arena)
        assert mb.m_extadd(m, cl, size, None, 5, 6, 0, typ) == 0
        assert (m.m_ext.ext_buf, m.m_ext.ext_type, m.refcnt) == (cl, typ, 1)
        mb.m_freem(m)
        assert used(arena, mb.m_getzone(size, arena=arena).name) == 0
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    buf = store.alloc(NW)
    for typ in (mb.EXT_CLUSTER, mb.EXT_PACKET):
        with pytest.raises(mb.MbufError, match="not one of"):
            mb.m_extadd(m, buf, 1000, ext_free_log, 0, 0, 0, typ)
    with pytest.raises(mb.MbufError, match="ref_cnt"):
        mb.m_extadd(m, buf, 1000, ext_free_log, 0, 0, 0, mb.EXT_EXTREF)
    assert not m.m_flags & mb.M_EXT and len(_freed) == 6
    mb.m_freem(m)
    store.free(buf)
    arena.zone("ext_ctr").free(ctr)


def test_m_extadd_without_a_count_attaches_nothing(arena):
    """FreeBSD 7/8 kern_mbuf.c m_extadd: when no counter can be had from
    zone_ext_refcnt (M_NOWAIT) M_EXT stays clear and the free routine is never called
    (here: ENOMEM is returned)."""
    _freed.clear()
    zref = arena.zone("mbuf_ext_refcnt")
    zref.set_max(1)
    store = arena.zcreate("ext_store", 1000)
    bufs = [store.alloc(NW), store.alloc(NW)]
    first = mb.m_get(NW, mb.MT_DATA, arena=arena)
    assert mb.m_extadd(first, bufs[0], 1000, ext_free_log) == 0
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    assert mb.m_extadd(m, bufs[1], 1000, ext_free_log) == errno.ENOMEM
    assert m.m_flags == 0 and m.m_data == m.handle + L.MH_BYTES
    mb.m_freem(m)
    mb.m_freem(first)
    assert len(_freed) == 1
    store.free_bulk(bufs)


def test_m_extaddref_adds_to_the_callers_counter(arena):
    """FreeBSD 9.3+ sys/mbuf.h m_extaddref, and mb_free_ext's EXT_EXTREF case: the
    caller's counter gains one; at the last reference (count 1) the free routine is
    called and the counter left at 1; with a reference of the caller's in it, the free
    only drops it."""
    _freed.clear()
    store = arena.zcreate("ext_store", 1000)
    buf = store.alloc(NW)
    ctr = arena.zcreate("ext_ctr", 8).alloc(NW)
    u = arena.zone("ext_ctr").view(ctr).cast("I")
    u[0] = 0
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.m_extaddref(m, buf, 1000, ctr, ext_free_log, 8, 9)
    assert u[0] == 1 and m.m_ext.ext_type == mb.EXT_EXTREF and m.refcnt == 1
    n = mb.m_copym(m, 0, mb.M_COPYALL, NW)
    assert u[0] == 2
    mb.m_freem(n)
    mb.m_freem(m)
    assert _freed == [(mb.EXT_EXTREF, 8, 9)] and u[0] == 1
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    mb.m_extaddref(m, buf, 1000, ctr, ext_free_log, 8, 9)       # the caller holds one
    assert u[0] == 2
    mb.m_freem(m)
    assert u[0] == 1 and len(_freed) == 1
    m = mb.m_get(NW, mb.MT_DATA, arena=arena)
    with pytest.raises(mb.MbufError):
        mb.m_extaddref(m, buf, 1000, None, ext_free_log)        # KASSERT(ref_cnt != NULL)
    mb.m_freem(m)
    store.free(buf)
    del u
    arena.zone("ext_ctr").free(ctr)


@pytest.mark.slow
def test_a_free_routine_of_main_runs_in_its_own_process_only(arena_name):
    """FreeBSD calls ext_free through a kernel pointer; here a routine is found by name
    in the process that frees the last reference: one defined in __main__ works when
    that is its own process, and is refused with a clear MbufError in another."""
    script = pathlib.Path(__file__).with_name("mbuf_main_free.py")
    r = subprocess.run([sys.executable, str(script), arena_name], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["same", "ok", "other", "ok"], r.stdout
    assert "cannot call" in r.stderr


# ---------------------------------------------------------------- the bytes stay (property)
_KIND = st.sampled_from(["plain", "cluster", "shared"])
_CHAIN = st.lists(st.tuples(_KIND, st.integers(0, 2048)), min_size=1, max_size=6)
_OP = st.one_of(
    st.tuples(st.just("defrag")),
    st.tuples(st.just("collapse"), st.integers(2, 4)),
    st.tuples(st.just("unshare")),
    st.tuples(st.just("pulldown"), st.integers(0, 3000), st.integers(0, 2100), st.booleans()),
    st.tuples(st.just("copyup"), st.integers(0, 200), st.integers(0, 64)),
    st.tuples(st.just("pullup"), st.integers(0, 200)),
)


def _build(a, spec, keep):
    """A packet from ``spec`` [(kind, n)]: plain mbufs, clusters, and copies sharing a
    cluster with a packet kept in ``keep``; the bytes are PATTERN's, in order."""
    ms, pos = [], 0
    for k, (kind, n) in enumerate(spec):
        first = k == 0
        if kind == "plain":
            n = min(n, mb.MHLEN if first else mb.MLEN)
            m = plain(a, n, pos, pkthdr=first)
        else:
            m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR if first else 0, arena=a)
            mb.mtod(m)[:n] = PATTERN[pos:pos + n]
            m.m_len = n
            if first:
                m.m_pkthdr.len = n
            if kind == "shared" and n:              # (m_copym copies no empty tail)
                keep.append(m)
                m = mb.m_copym(m, 0, mb.M_COPYALL if first else n, NW)
        ms.append(m)
        pos += n
    return link(*ms), PATTERN[:pos]


def test_chain_functions_keep_the_bytes():
    """m_defrag, m_collapse, m_unshare, m_pulldown, m_copyup and m_pullup (FreeBSD 8+
    uipc_mbuf.c, 10+ uipc_mbuf2.c) reshape a chain but keep its bytes, on any mix of
    plain mbufs, clusters and shared clusters; what they return as the region is the
    region; a NULL from the freeing ones freed everything."""
    a = Arena.create_local(32 << 20)

    @settings(max_examples=150, deadline=None)
    @given(spec=_CHAIN, op=_OP)
    def run(spec, op):
        keep = []
        m, want = _build(a, spec, keep)
        name, *args = op
        if name == "defrag":
            m = mb.m_defrag(m, NW)
        elif name == "collapse":
            r = mb.m_collapse(m, NW, args[0])
            assert r is None or (r == m and len(chain(m)) <= args[0])
        elif name == "unshare":
            m = mb.m_unshare(m, NW)
            assert all(mb.M_WRITABLE(x) for x in chain(m))
        elif name == "pulldown":
            off, n, offp = args
            r = mb.m_pulldown(m, off, n, offp)
            if off + n > len(want) or n > mb.MCLBYTES:
                assert r is None
                m = None
            else:
                x, o = r if offp else (r, 0)
                assert bytes(mb.mtod(x)[o:o + n]) == want[off:off + n] and x.m_len >= o + n
        elif name == "copyup":
            n, dstoff = args
            r = mb.m_copyup(m, n, dstoff)
            if n > mb.MHLEN - dstoff or n > len(want):
                assert r is None
            else:
                assert r.m_len >= n and r.m_data == r.handle + L.PKTDAT + dstoff
            m = r
        else:
            r = mb.m_pullup(m, args[0])
            if args[0] > mb.MHLEN or args[0] > len(want):
                assert r is None
            else:
                assert r.m_len >= args[0] and not r.m_flags & mb.M_EXT or r == m
            m = r
        if m is not None:
            assert data(m) == want and m.m_pkthdr.len == len(want)
            mb.m_freem(m)
        for k in keep:
            mb.m_freem(k)
        assert used(a, "mbuf") == used(a, "mbuf_packet") == 0

    try:
        run()
        a.check()
    finally:
        a.destroy()


# ============================================================================ 6. netstat -m
def _slabs(a, zone, n):
    ipers = a.zone(zone).keg.ipers
    return -(-n // ipers) * ipers


def test_netstat_m_is_freebsd_7s(arena):
    """FreeBSD 8 usr.bin/netstat/mbuf.c 1.56 (the 7.2/amd64 output): fourteen lines --
    the sfbuf line (0/0/0 on amd64) and the sendfile and drain lines from mbstat, no
    "delayed" lines -- with uth_limit as max: the limit rounded up to whole slabs."""
    a = arena
    cl, jp, j9, j16 = (_slabs(a, z, a.sysctl(n)) for z, n in (
        ("mbuf_cluster", "kern.ipc.nmbclusters"), ("mbuf_jumbo_page", "kern.ipc.nmbjumbop"),
        ("mbuf_jumbo_9k", "kern.ipc.nmbjumbo9"), ("mbuf_jumbo_16k", "kern.ipc.nmbjumbo16")))
    assert a.netstat_m() == a.netstat_m("7") == (
        "0/0/0 mbufs in use (current/cache/total)\n"
        f"0/0/0/{cl} mbuf clusters in use (current/cache/total/max)\n"
        "0/0 mbuf+clusters out of packet secondary zone in use (current/cache)\n"
        f"0/0/0/{jp} 4k (page size) jumbo clusters in use (current/cache/total/max)\n"
        f"0/0/0/{j9} 9k jumbo clusters in use (current/cache/total/max)\n"
        f"0/0/0/{j16} 16k jumbo clusters in use (current/cache/total/max)\n"
        "0K/0K/0K bytes allocated to network (current/cache/total)\n"
        "0/0/0 requests for mbufs denied (mbufs/clusters/mbuf+clusters)\n"
        "0/0/0 requests for jumbo clusters denied (4k/9k/16k)\n"
        "0/0/0 sfbufs in use (current/peak/max)\n"
        "0 requests for sfbufs denied\n"
        "0 requests for sfbufs delayed\n"
        "0 requests for I/O initiated by sendfile\n"
        "0 calls to protocol drain routines\n")


def test_netstat_m_of_freebsd_13(arena):
    """FreeBSD 11-14 usr.bin/netstat/mbuf.c: the "delayed" lines (M_WAITOK requests that
    slept: counted since issue 11, also in mbstat) and the kern.ipc.sfstat lines, no
    drain line; an unknown format is refused."""
    lines = arena.netstat_m("13").splitlines()
    assert len(lines) == 22
    assert lines[8] == "0/0/0 requests for mbufs delayed (mbufs/clusters/mbuf+clusters)"
    assert lines[9] == "0/0/0 requests for jumbo clusters delayed (4k/9k/16k)"
    assert lines[10] == "0/0/0 requests for jumbo clusters denied (4k/9k/16k)"
    assert lines[11:] == ["0 sendfile syscalls",
                          "0 sendfile syscalls completed without I/O request",
                          "0 requests for I/O initiated by sendfile",
                          "0 pages read by sendfile as part of a request",
                          "0 pages were valid at time of a sendfile request",
                          "0 pages were valid and substituted to bogus page",
                          "0 pages were requested for read ahead by applications",
                          "0 pages were read ahead by sendfile",
                          "0 times sendfile encountered an already busy page",
                          "0 requests for sfbufs denied", "0 requests for sfbufs delayed"]
    assert not any("drain" in x for x in lines)
    st = arena.mbstat()
    assert (st.mbufs_delayed, st.jumbo_delayed) == ((0, 0, 0), (0, 0, 0))
    with pytest.raises(mb.MbufError, match="format"):
        arena.netstat_m("9")


def test_netstat_m_total_never_shows_above_max(make):
    """FreeBSD 7/8 uma_core.c uma_zone_set_max (the limit in whole slabs) and the
    memstat uth_limit netstat prints: nmbclusters 25601 reads back as 25601 but shows
    as a whole number of slabs; with every cluster of a limit allocated, current +
    cache is at most max."""
    a = make(kern__ipc__nmbclusters=25600)
    a.sysctl("kern.ipc.nmbclusters", 25601)
    assert a.sysctl("kern.ipc.nmbclusters") == 25601
    assert a.netstat_m().splitlines()[1].endswith(
        f"/{_slabs(a, 'mbuf_cluster', 25601)} mbuf clusters in use (current/cache/total/max)")
    b = make(kern__ipc__nmbclusters=100)
    cls = []
    while (cl := mb.m_cljget(None, NW, mb.MCLBYTES, arena=b)) is not None:
        cls.append(cl)
    assert len(cls) == 100
    cur, cache, total, mx = map(int, b.netstat_m().splitlines()[1].split()[0].split("/"))
    assert cur == 100 and total <= mx == _slabs(b, "mbuf_cluster", 100)
    b.zone("mbuf_cluster").free_bulk(cls)


def test_stat_m_takes_a_format(arena_name, capsys):
    """shmalloc stat -m --format 7|13: the era of netstat -m to print (7 by default)."""
    a = Arena.create(arena_name, 8 << 20)
    try:
        assert cli.main(["stat", "-m", "--name", arena_name]) == 0
        assert capsys.readouterr().out == a.netstat_m("7")
        assert cli.main(["stat", "-m", "--format", "13", "--name", arena_name]) == 0
        assert capsys.readouterr().out == a.netstat_m("13")
        assert cli.main(["sysctl", "--name", arena_name, "kern.ipc.mbstat"]) == 0
        raw = a.mbstat().pack()
        assert capsys.readouterr().out == (f"kern.ipc.mbstat: Format:S,mbstat Length:112 "
                                           f"Dump:0x{raw[:16].hex()}...\n")
    finally:
        a.destroy()


# ============================================================================ 7. low memory
def test_a_drain_request_runs_the_protocol_drains_at_the_next_poll(arena):
    """FreeBSD 7 kern_mbuf.c mb_reclaim (the vm_lowmem handler registered first, calling
    each domain's pr_drain): a CPU asked to drain by the keg manager (MSG_DRAIN) runs
    this process's vm_lowmem handlers at its next poll -- drains first -- and m_drain
    counts each drain routine called (issue 14; FreeBSD 7/8 left it at 0)."""
    b = arena.attach_local()
    calls, order = [], []
    held = [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=b) for _ in range(4)]

    def first(ar):
        calls.append(("first", ar))
        order.append("drain")
        while held:
            mb.m_freem(held.pop())

    def second(ar):
        calls.append(("second", ar))

    tag = mb.eventhandler_register("vm_lowmem", lambda arg, ar: order.append("other"))
    mb.pr_drain_register(first)
    mb.pr_drain_register(second)
    try:
        assert arena._mail.post(b.cpu_id, MSG_DRAIN, [], L.TAG_FREE)
        assert calls == []                              # not before b takes its mail
        b.poll()
        assert calls == [("first", b), ("second", b)] and order == ["drain", "other"]
        assert arena.mbstat().m_drain == 2 and held == []
        b.poll()
        assert len(calls) == 2                          # one request, one run
    finally:
        mb.pr_drain_deregister(first)
        mb.pr_drain_deregister(second)
        mb.eventhandler_deregister("vm_lowmem", tag)
        b.close()


@pytest.mark.slow
def test_low_memory_runs_the_drains_registered_in_a_worker(arena_name):
    """FreeBSD 7 kern_mbuf.c mb_reclaim walks every domain's drain routines on vm_lowmem;
    here a protocol's drains live in the process that registered them: when the keg
    manager finds free pages under vm.v_free_min, its reclaim runs its own drains and
    asks every CPU by message, and the drain registered in a worker process runs there;
    m_drain counts both calls."""
    ctx = multiprocessing.get_context("spawn")
    sup = Supervisor.create(arena_name, 8 << 20)
    a = sup.arena
    mine = []
    mb.pr_drain_register(mine.append)
    q = ctx.Queue()
    p = ctx.Process(target=mbuf_mp_workers.run, args=("drain_worker", q, "w", arena_name))
    p.start()
    try:
        kind, _, msg = q.get(timeout=60)
        assert (kind, msg[0]) == ("ok", "ready"), msg
        assert not sup.lowmem(0.0)
        a.sysctl("vm.v_free_min", a.free_pages + 1)   # free pages now under v_free_min
        assert sup.lowmem(0.0)
        sup.reclaim()
        assert mine == [a]
        kind, _, msg = q.get(timeout=60)
        assert (kind, msg) == ("ok", ("drained", 1, 0)), msg
        p.join(60)
        assert p.exitcode == 0
        st = a.mbstat()
        assert (st.m_drain, st.lowmem) == (2, 1)
        assert a.netstat_m().splitlines()[-1] == "2 calls to protocol drain routines"
        a.check()
    finally:
        mb.pr_drain_deregister(mine.append)
        if p.is_alive():
            p.kill()
            p.join()
        q.close()
        sup.destroy()
