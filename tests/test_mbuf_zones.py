"""The mbuf zones as the seed's mbuf_init makes them; tunables and sysctls; mbstat and
netstat -m against hand-computed numbers; vm_lowmem and the protocol drains; jumbo
clusters on contiguous pages; the packet zone giving its clusters back."""

import errno
import math
import threading
import time

import pytest

from shmalloc import Arena, ShmallocError
from shmalloc import layout as L
from shmalloc import mbuf as mb
from shmalloc.mbuf import limits as T
from shmalloc.mbuf import zones as Z
from shmalloc.ipc import naming

NW, WK = mb.M_NOWAIT, mb.M_WAITOK
UNLIMITED = {"kern.ipc.nmbclusters": 0, "kern.ipc.nmbjumbop": 0, "kern.ipc.nmbjumbo9": 0,
             "kern.ipc.nmbjumbo16": 0}


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


def tun(**kw):
    return {"kern.ipc." + k if k != "maxusers" else "kern.maxusers": v for k, v in kw.items()}


# ============================================================================ zones
def test_mbuf_init_makes_the_seed_zones(make):
    a = make()
    zones = mb.mbuf_init(a)
    assert tuple(zones) == mb.ZONE_NAMES == (
        "mbuf", "mbuf_cluster", "mbuf_packet", "mbuf_jumbo_page", "mbuf_jumbo_9k",
        "mbuf_jumbo_16k", "mbuf_ext_refcnt")
    sizes = {n: z.size for n, z in zones.items()}
    assert sizes == {"mbuf": 256, "mbuf_cluster": 2048, "mbuf_packet": 256,
                     "mbuf_jumbo_page": 4096, "mbuf_jumbo_9k": 9216, "mbuf_jumbo_16k": 16384,
                     "mbuf_ext_refcnt": 4}
    assert zones["mbuf_packet"].secondary and zones["mbuf_packet"].keg.id == zones["mbuf"].keg.id
    assert zones["mbuf"].bucket_size == 254                      # UMA_ZONE_MAXBUCKET
    assert zones["mbuf"].keg.rsize == mb.MSIZE                   # aligned to MSIZE: dtom
    for n in ("mbuf_cluster", "mbuf_jumbo_page", "mbuf_jumbo_9k", "mbuf_jumbo_16k"):
        assert zones[n].keg.refcnt, n                            # refcount trailers
    assert not zones["mbuf"].keg.refcnt
    q = "shmalloc.mbuf.ctors:"                                  # module-qualified hook names
    assert zones["mbuf_packet"].hook_names == dict(ctor=q + "mb_ctor_pack", dtor=q + "mb_dtor_pack",
                                                   init=q + "mb_zinit_pack", fini=q + "mb_zfini_pack")
    again = mb.mbuf_init(a)                                     # idempotent
    assert {n: z.id for n, z in again.items()} == {n: z.id for n, z in zones.items()}
    z = a.vmstat_z()
    for n in mb.ZONE_NAMES:
        assert f"\n{n}:" in z


def test_a_foreign_zone_with_an_mbuf_name_is_refused():
    a = Arena.create_local(16 << 20, bare=True)            # no mbuf zones made with it
    try:
        a.zcreate("mbuf", 128)
        with pytest.raises(mb.MbufError, match="not the mbuf layer's"):
            mb.mbuf_init(a)
    finally:
        a.destroy()


def test_every_mbuf_is_msize_aligned(make):
    a = make()
    ms = [mb.m_get(NW, mb.MT_DATA, arena=a) for _ in range(300)]
    ms += [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) for _ in range(70)]
    assert all(m.handle % mb.MSIZE == 0 and mb.dtom(m.handle + 255) == m.handle for m in ms)
    for m in ms:
        mb.m_freem(m)


def test_jumbo_9k_and_16k_clusters_lie_on_contiguous_pages(make):
    a = make(32 << 20)
    core = a._core
    for size, zname in ((mb.MJUM9BYTES, "mbuf_jumbo_9k"), (mb.MJUM16BYTES, "mbuf_jumbo_16k")):
        keg = mb.mbuf_init(a)[zname].keg
        assert keg.ppera > 1                                     # multi-page slabs
        cls = [mb.m_cljget(None, NW, size, arena=a) for _ in range(2 * keg.ipers + 1)]
        assert None not in cls
        for cl in cls:
            first, last = cl >> L.PAGE_SHIFT, (cl + size - 1) >> L.PAGE_SHIFT
            entries = {core.pt[p] for p in range(first, last + 1)}
            assert len(entries) == 1                             # one run of pages
            (e,) = entries
            base = e & ((1 << L.KEG_ID_SHIFT) - 1)
            assert e >> L.KEG_ID_SHIFT == keg.id
            assert base <= cl and cl + size <= base + keg.ppera * L.PAGE_SIZE
        z = a.zone(zname)
        for cl in cls:
            z.free(cl)


# ============================================================================ tunables
def test_default_tunables_follow_tunable_mbinit(make):
    a = make(16 << 20)
    v = {n: a.sysctl(n) for n in mb.SYSCTLS}
    assert v["kern.maxusers"] == 32                              # 8 "users" by size, min 32
    assert v["kern.ipc.nmbclusters"] == 1024 + 32 * 64 == 3072
    assert (v["kern.ipc.nmbjumbop"], v["kern.ipc.nmbjumbo9"], v["kern.ipc.nmbjumbo16"]) == (
        1536, 768, 384)
    assert v["kern.ipc.maxmbufmem"] == 8 << 20
    assert v["kern.ipc.nmbufs"] == max((8 << 20) // 256 // 5, 3072 + 1536 + 768 + 384) == 6553
    assert v["vm.v_free_min"] == 4 + (4096 - 1024) // 200
    mb.mbuf_init(a)
    assert a.zone("mbuf_cluster").limit == 3072 and a.zone("mbuf").limit == 6553
    assert a.zone("mbuf_packet").limit == 0 and a.zone("mbuf_ext_refcnt").limit == 0


def test_compute_matches_freebsd_for_bigger_machines():
    gib = T.compute(1 << 30, {})
    # 1 GiB: 512 "users", clamped to 384: the 25600/12800/6400/3200 of FreeBSD 7
    assert (gib["MAXUSERS"], gib["NMBCLUSTERS"], gib["NMBJUMBOP"], gib["NMBJUMBO9"],
            gib["NMBJUMBO16"]) == (384, 25600, 12800, 6400, 3200)
    assert gib["NMBUFS"] == (1 << 29) // 256 // 5
    assert T.compute(96 << 20, {})["NMBCLUSTERS"] == 1024 + 48 * 64
    assert T.compute(96 << 20, {"MAXUSERS": 10})["NMBCLUSTERS"] == 1024 + 640
    low = T.compute(64 << 20, {"NMBUFS": 10})                    # below the cluster sum:
    assert low["NMBUFS"] == max((32 << 20) // 256 // 5, sum(     # FreeBSD raises it
        low[k] for k in ("NMBCLUSTERS", "NMBJUMBOP", "NMBJUMBO9", "NMBJUMBO16")))
    assert T.compute(64 << 20, {"NMBUFS": 0})["NMBUFS"] == 0      # 0: unlimited


def test_tunables_at_create_override(make):
    a = make(**tun(nmbclusters=0, maxmbufmem=1 << 40))
    assert a.sysctl("kern.ipc.nmbclusters") == 0
    assert a.sysctl("kern.ipc.nmbjumbop") == 1536        # the seed: from the computed default
    assert a.sysctl("kern.ipc.maxmbufmem") == (16 << 20) // 4 * 3
    mb.mbuf_init(a)
    assert a.zone("mbuf_cluster").limit == 0
    b = make(**tun(maxusers=64, nmbjumbo16=7))
    assert b.sysctl("kern.ipc.nmbclusters") == 1024 + 64 * 64
    assert b.sysctl("kern.ipc.nmbjumbo16") == 7


def test_unknown_or_bad_tunables_fail_create_and_leave_nothing(arena_name):
    with pytest.raises(mb.SysctlError) as e:
        Arena.create(arena_name, 4 << 20, tunables={"kern.ipc.nmbclustres": 5})
    assert e.value.errno == errno.ENOENT
    with pytest.raises(mb.SysctlError) as e:
        Arena.create(arena_name, 4 << 20, tunables={"kern.ipc.nmbclusters": -1})
    assert e.value.errno == errno.EINVAL
    assert not [o for o in naming.list_objects() if naming.arena_of(o[1]) == arena_name]


# ============================================================================ sysctl
def test_sysctl_raises_applies_at_once_and_fires_the_event(make):
    a = make()
    calls = []
    tag = mb.eventhandler_register("nmbclusters_change", lambda arg, ar: calls.append((arg, ar)),
                                   "cookie")
    try:
        assert a.sysctl("kern.ipc.nmbclusters", 4000) == 4000
        assert a.zone("mbuf_cluster").limit == 4000 and calls == [("cookie", a)]
        with pytest.raises(mb.SysctlError) as e:
            a.sysctl("kern.ipc.nmbclusters", 3999)
        assert e.value.errno == errno.EINVAL and "Invalid argument" in str(e.value)
        assert a.sysctl("kern.ipc.nmbclusters") == 4000 == a.zone("mbuf_cluster").limit
        for same_or_zero in (4000, 0):           # the seed's handler: strictly greater only
            with pytest.raises(mb.SysctlError) as e:
                a.sysctl("kern.ipc.nmbclusters", same_or_zero)
            assert e.value.errno == errno.EINVAL
        assert a.zone("mbuf_cluster").limit == 4000 and len(calls) == 1
        assert a.sysctl("kern.ipc.nmbclusters", 10 ** 6) == 10 ** 6
        assert a.zone("mbuf_cluster").limit == 10 ** 6 and len(calls) == 2
    finally:
        mb.eventhandler_deregister("nmbclusters_change", tag)
    a.sysctl("kern.ipc.nmbjumbo9", 1000)
    assert a.zone("mbuf_jumbo_9k").limit == 1000
    seen = []
    tag = mb.eventhandler_register("nmbufs_change", lambda arg, ar: seen.append(ar))
    try:
        a.sysctl("kern.ipc.nmbufs", 7000)
    finally:
        mb.eventhandler_deregister("nmbufs_change", tag)
    assert seen == [a] and a.zone("mbuf").limit == 7000


def test_sysctl_refuses_unknown_read_only_and_bad_values(make):
    a = make()
    for name, value, code in (("kern.ipc.nosuch", None, errno.ENOENT),
                              ("kern.ipc.nosuch", 5, errno.ENOENT),
                              ("kern.ipc.maxmbufmem", 1 << 30, errno.EPERM),
                              ("kern.maxusers", 64, errno.EPERM),
                              ("kern.ipc.nmbclusters", -5, errno.EINVAL),
                              ("kern.ipc.nmbclusters", "lots", errno.EINVAL)):
        with pytest.raises(mb.SysctlError) as e:
            a.sysctl(name, value)
        assert e.value.errno == code, name
        assert isinstance(e.value, ShmallocError)
    a.sysctl("vm.v_free_min", 3)                                  # not a limit: any value
    assert a.sysctl("vm.v_free_min") == 3


def test_raising_the_limit_lets_denied_allocations_through(make):
    a = make(**tun(nmbjumbo9=2))
    got = [mb.m_cljget(None, NW, mb.MJUM9BYTES, arena=a) for _ in range(3)]
    assert got[2] is None
    a.sysctl("kern.ipc.nmbjumbo9", 3)
    got[2] = mb.m_cljget(None, NW, mb.MJUM9BYTES, arena=a)
    assert got[2] is not None
    for cl in got:
        a.zone("mbuf_jumbo_9k").free(cl)


# ============================================================================ statistics
def test_netstat_m_equals_hand_computed_numbers(make):
    """A known workload on unlimited clusters (bucket sizes then depend on the item
    size only: mbuf 254 fixed, packet 62, cluster 8, jumbo 9k 1, tags 254), in the
    format of FreeBSD 11-14 (the maxima rounded up to whole slabs)."""
    a = make(**tun(nmbclusters=0, nmbjumbo9=0))
    ms = [mb.m_get(NW, mb.MT_DATA, arena=a) for _ in range(3)]       # mbuf zone imports 254
    ps = [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) for _ in range(2)]  # packet: 62
    h = mb.m_gethdr(NW, mb.MT_DATA, arena=a)
    assert mb.m_clget(h, NW)
    cp = mb.m_copym(ps[0], 0, mb.M_COPYALL, NW)                     # one more mbuf
    t = mb.m_tag_alloc(1, 1, 10, NW, arena=a)                      # a 64-byte tag item
    mb.m_tag_prepend(ps[1], t)
    j = mb.m_getjcl(NW, mb.MT_DATA, 0, mb.MJUM9BYTES, arena=a)      # mbuf + 9k
    mkeg, ckeg, jkeg = (a.zone(n).keg for n in ("mbuf", "mbuf_cluster", "mbuf_jumbo_9k"))
    jp_max, j16_max = (-(-limit // a.zone(n).keg.ipers) * a.zone(n).keg.ipers
                       for n, limit in (("mbuf_jumbo_page", 1536), ("mbuf_jumbo_16k", 384)))

    taken = 254 + 62                                                # mbuf keg: two imports
    mbuf_keg_free = math.ceil(taken / mkeg.ipers) * mkeg.ipers - taken
    mbuf_count = 3 + 1 + 1 + 1                                      # m_get, hdr, copy, jcl
    mbuf_free = 254 - mbuf_count + mbuf_keg_free
    pk_count, pk_free = 2, 60
    cl_taken = 8 * 8                                                # 62 inits: 8 buckets of 8
    cl_count = 62 + 1                                               # in packets + m_clget
    cl_free = (cl_taken - cl_count) + (math.ceil(cl_taken / ckeg.ipers) * ckeg.ipers - cl_taken)
    j_count, j_free = 1, jkeg.ipers - 1
    inuse = (mbuf_count * 256 + pk_count * 256 + pk_count * 2048
             + (cl_count - pk_count - pk_free) * 2048 + 64 + j_count * 9216)
    incache = (mbuf_free * 256 + pk_free * 256 + pk_free * 2048 + cl_free * 2048
               + j_free * 9216)
    want = [
        f"{mbuf_count + pk_count}/{mbuf_free + pk_free}/"
        f"{mbuf_count + pk_count + mbuf_free + pk_free} mbufs in use (current/cache/total)",
        f"{cl_count - pk_free}/{cl_free + pk_free}/{cl_count + cl_free}/0 mbuf clusters in use "
        f"(current/cache/total/max)",
        f"{pk_count}/{pk_free} mbuf+clusters out of packet secondary zone in use "
        f"(current/cache)",
        f"0/0/0/{jp_max} 4k (page size) jumbo clusters in use (current/cache/total/max)",
        f"{j_count}/{j_free}/{j_count + j_free}/0 9k jumbo clusters in use "
        f"(current/cache/total/max)",
        f"0/0/0/{j16_max} 16k jumbo clusters in use (current/cache/total/max)",
        f"{inuse // 1024}K/{incache // 1024}K/{(inuse + incache) // 1024}K bytes allocated to "
        f"network (current/cache/total)",
        "0/0/0 requests for mbufs denied (mbufs/clusters/mbuf+clusters)",
        "0/0/0 requests for mbufs delayed (mbufs/clusters/mbuf+clusters)",
        "0/0/0 requests for jumbo clusters delayed (4k/9k/16k)",
        "0/0/0 requests for jumbo clusters denied (4k/9k/16k)",
    ]
    assert a.netstat_m("13").splitlines()[:len(want)] == want
    assert cl_count - pk_free == 3                                  # 2 packets + 1 m_clget
    st = a.mbstat()
    assert (st.m_mbufs, st.m_mclusts, st.m_msize, st.m_mclbytes, st.m_mlen, st.m_mhlen,
            st.m_minclsize, st.m_numtypes) == (8, 3, 256, 2048, 224, 168, 169, 16)
    for m in ms + ps + [h, cp, j]:
        mb.m_freem(m)
    first = a.netstat_m().splitlines()
    assert first[0].startswith("0/") and first[1].startswith("0/")


def test_denied_and_delayed_counts(make):
    a = make(**dict(tun(nmbufs=10), **UNLIMITED))
    ms = [mb.m_get(NW, mb.MT_DATA, arena=a) for _ in range(10)]
    assert None not in ms and mb.m_get(NW, mb.MT_DATA, arena=a) is None
    with pytest.raises(TimeoutError):
        mb.m_get(WK, mb.MT_DATA, arena=a, timeout=0.05)
    lines = a.netstat_m("13").splitlines()
    assert lines[7] == "2/0/0 requests for mbufs denied (mbufs/clusters/mbuf+clusters)"
    assert lines[8] == "1/0/0 requests for mbufs delayed (mbufs/clusters/mbuf+clusters)"
    for m in ms:
        mb.m_free(m)

    b = make(**tun(nmbclusters=4))
    assert mb.mbuf_init(b)["mbuf_cluster"].bucket_size == 1    # a small limit: small buckets
    ps = [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=b) for _ in range(4)]
    assert None not in ps                       # the first import kept 4 packets (1 fail)
    assert mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=b) is None   # 1 cluster, 1 packet
    m = mb.m_gethdr(NW, mb.MT_DATA, arena=b)
    assert mb.m_clget(m, NW) == 0               # fails, drains the packet zone, fails again
    assert b.netstat_m("13").splitlines()[7] == ("0/4/1 requests for mbufs denied "
                                             "(mbufs/clusters/mbuf+clusters)")
    mb.m_freem(ps.pop())                        # the cluster is parked in the packet cache...
    assert mb.m_clget(m, NW) == mb.M_EXT        # ...m_clget drains it and gets it
    for p in ps + [m]:
        mb.m_freem(p)

    c = make(**tun(nmbjumbo16=1))
    j = mb.m_getjcl(NW, mb.MT_DATA, 0, mb.MJUM16BYTES, arena=c)
    assert mb.m_getjcl(NW, mb.MT_DATA, 0, mb.MJUM16BYTES, arena=c) is None
    assert c.netstat_m("13").splitlines()[10] == ("0/0/1 requests for jumbo clusters denied "
                                              "(4k/9k/16k)")
    mb.m_freem(j)


def test_packet_zone_gives_clusters_back_when_the_cluster_zone_is_exhausted(make):
    a = make(**tun(nmbclusters=8))
    p = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a)       # caches 7 more with clusters
    assert a.zone_stats("mbuf_packet").free == 7
    assert a.zone_stats("mbuf_cluster").items == 8              # exhausted
    mb.m_freem(p)                                               # mb_dtor_pack drains the zone
    assert a.zone_stats("mbuf_packet").free == 1                # only the packet just freed
    assert a.zone_stats("mbuf_cluster").items <= 1


def test_a_sleeping_m_getcl_gets_a_packet_freed_by_another_cpu(make):
    a = make(**tun(nmbclusters=2))
    ps = [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) for _ in range(2)]
    fails = {z: a.zone_stats(z).failures for z in ("mbuf_cluster", "mbuf_packet")}
    got, errs = [], []

    def sleeper():
        try:
            got.append(mb.m_getcl(WK, mb.MT_DATA, mb.M_PKTHDR, arena=a, timeout=10))
        except BaseException as e:          # pragma: no cover - reported below
            errs.append(e)

    th = threading.Thread(target=sleeper)
    th.start()
    for _ in range(200):                    # the packet init waits for a cluster
        if a.zone_stats("mbuf_cluster").sleepers:
            break
        threading.Event().wait(0.01)
    for p in ps:
        mb.m_freem(p)
        threading.Event().wait(0.02)
    th.join(15)
    assert not th.is_alive() and not errs, errs
    (m,) = got
    assert m is not None and m.refcnt == 1 and m.m_flags & mb.M_EXT
    # one sleep, charged where FreeBSD charges it: the cluster zone; no failure
    assert a.zone_stats("mbuf_cluster").sleeps == 1
    assert a.zone_stats("mbuf_packet").sleeps == 0
    assert {z: a.zone_stats(z).failures for z in fails} == fails
    assert a.netstat_m("13").splitlines()[8] == ("0/1/0 requests for mbufs delayed "
                                             "(mbufs/clusters/mbuf+clusters)")
    mb.m_freem(m)
    for t in list(a._thread_arenas.values()):
        t.close()


@pytest.mark.slow
def test_m_getcl_waitok_at_nmbclusters_honours_its_timeout(make):
    a = make(**tun(nmbclusters=4))
    ps = [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) for _ in range(4)]
    assert None not in ps
    fails = {z: a.zone_stats(z).failures for z in ("mbuf_cluster", "mbuf_packet")}
    out = []

    def waiter():
        t0 = time.monotonic()
        try:
            mb.m_getcl(WK, mb.MT_DATA, mb.M_PKTHDR, arena=a, timeout=1.0)
        except TimeoutError as e:
            out.append((e, time.monotonic() - t0))

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    th.join(10)
    assert not th.is_alive(), "m_getcl(M_WAITOK, timeout=1.0) still blocked after 10 s"
    ((e, took),) = out
    assert 1.0 <= took < 3, took
    # one sleep (clusters column), and one failure per zone for the request that
    # finally timed out -- none for the polls while it slept
    lines = a.netstat_m("13").splitlines()
    assert lines[8] == "0/1/0 requests for mbufs delayed (mbufs/clusters/mbuf+clusters)"
    assert {z: a.zone_stats(z).failures - n for z, n in fails.items()} == {
        "mbuf_cluster": 1, "mbuf_packet": 1}
    assert a.zone_stats("mbuf_packet").items == 4         # nothing left behind
    for p in ps:
        mb.m_freem(p)
    for t in list(a._thread_arenas.values()):
        t.close()


def test_waitok_under_a_held_lock_is_downgraded(make):
    a = make()
    c = Z.ctx(a)
    lk = a._core.lock(L.VM_LOCK)
    lk.acquire(owner_id=a.cpu_id)
    try:
        assert c.how(WK) == NW
    finally:
        lk.release()
    assert c.how(WK) == WK and c.waitok_downgrades == 1
    d = Arena.create_local(8 << 20, debug=1)
    try:
        cd = Z.ctx(d)
        lk = d._core.lock(L.VM_LOCK)
        lk.acquire(owner_id=d.cpu_id)
        try:
            with pytest.warns(RuntimeWarning, match="downgraded to M_NOWAIT"):
                assert cd.how(WK) == NW
        finally:
            lk.release()
    finally:
        d.destroy()


# ============================================================================ reclaim
def test_vm_lowmem_calls_the_drains_and_gives_slabs_back(make):
    a = make()
    drained = []
    mb.pr_drain_register(drained.append)
    try:
        ms = [mb.m_get(NW, mb.MT_DATA, arena=a) for _ in range(1500)]
        cs = [mb.m_getcl(NW, mb.MT_DATA, 0, arena=a) for _ in range(300)]
        for m in ms + cs:
            mb.m_freem(m)
        free_before = a.free_pages
        released = mb.vm_lowmem(a)
    finally:
        mb.pr_drain_deregister(drained.append)
    assert drained == [a] and released > 0 and a.free_pages > free_before
    st = a.mbstat()
    assert (st.m_drain, st.lowmem) == (1, 1)
    assert a.netstat_m().splitlines()[-1] == "1 calls to protocol drain routines"
    assert a.zone_stats("mbuf_packet").free == 0                 # packets gave clusters back


def test_low_free_pages_run_vm_lowmem_and_the_allocation_is_retried(make):
    # v_free_min above the pages of one 16k slab (41): the pages run low before a slab
    # no longer fits, whatever the metadata leaves of the 8 MiB
    a = make(8 << 20, vm__v_free_min=64, **tun(nmbjumbo16=0))
    held = []
    calls = []

    def drain(arena):
        calls.append(arena.free_pages)
        for m in held[:8]:                                        # a protocol lets go
            mb.m_freem(m)
        del held[:8]

    mb.pr_drain_register(drain)
    try:
        while True:
            m = mb.m_getjcl(NW, mb.MT_DATA, 0, mb.MJUM16BYTES, arena=a)
            if m is None or calls:
                break
            held.append(m)
        assert calls, "vm_lowmem never ran"
        assert calls[0] < a.sysctl("vm.v_free_min")               # it ran because pages ran low
        assert m is not None                                      # and the retry succeeded
        held.append(m)
    finally:
        mb.pr_drain_deregister(drain)
        for m in held:
            mb.m_freem(m)
    assert a.mbstat().lowmem == 1 and a.mbstat().m_drain == 1


# ============================================================================ a dead CPU's mbufs
def test_recovery_frees_a_dead_cpus_mbufs_and_gives_their_references_back(make):
    """What the supervisor does for a dead CPU (shmalloc.recovery): every item the
    CPU held is freed through its zone with DTOR_RECOVER, mbufs before packets.
    References go back; a packet whose cluster other CPUs still share is refused
    (left allocated) and freed later by its last copy."""
    from shmalloc.hooks import DTOR_RECOVER
    a = make()
    b = a.attach_local()                          # the CPU that will "die"
    _ext_calls = []
    from shmalloc import register_hook
    register_hook("test_zones_ext_free", lambda m, x, y: _ext_calls.append(x))
    store = a.zcreate("store", 1024)
    buf = store.alloc(NW)
    p = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=b)             # shared with a
    mb.m_append(p, 100, b"p" * 100)
    kept = mb.m_copym(p, 0, mb.M_COPYALL, NW)
    kept = mb.Mbuf.from_handle(a, kept.handle)                        # a copy a holds
    lone = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=b)          # b's alone
    cl = mb.m_gethdr(NW, mb.MT_DATA, arena=b)
    mb.m_clget(cl, NW)
    clcopy = mb.m_copym(cl, 0, mb.M_COPYALL, NW)                      # b holds both refs
    ext = mb.m_gethdr(NW, mb.MT_DATA, arena=b)
    assert mb.m_extadd(ext, buf, 1024, "test_zones_ext_free", 5, 0, 0, mb.EXT_NET_DRV) == 0
    t = mb.m_tag_alloc(1, 1, 1, NW, arena=b)
    mb.m_tag_prepend(lone, t)
    dead = [x.handle for x in (clcopy, cl, ext)], [x.handle for x in (p, lone)]
    refused = []
    for zone_name, handles in zip(("mbuf", "mbuf_packet"), dead):
        z = a.zone(zone_name)
        for h in handles:
            try:
                z.free(h, DTOR_RECOVER)
            except mb.MbufError:
                refused.append(h)
    assert refused == [p.handle]                  # set aside: its cluster is still kept's
    assert _ext_calls == [5]                      # the m_extadd storage went back once
    assert kept.refcnt == 1 and mb.m_copydata(kept, 0, 100) == b"p" * 100
    assert a.zone_stats("mbuf_tag_64").used == 0
    assert a.zone_stats("mbuf_packet").used == 1
    with pytest.raises(mb.MbufError, match="waits"):
        a.zone("mbuf_packet").free(p.handle, DTOR_RECOVER)   # a second pass changes nothing
    mb.m_freem(kept)                              # the last copy frees the waiting packet
    assert a.zone_stats("mbuf_packet").used == 0 and a.zone_stats("mbuf").used == 0
    assert a.zone_stats("mbuf_cluster").used == a.zone_stats("mbuf_packet").free
    store.free(buf)
    b.close()
