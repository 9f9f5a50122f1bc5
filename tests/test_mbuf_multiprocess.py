"""mbufs across processes (DPDK's test_refcnt_mbuf, in spirit): many copies of one
cluster, packet or external buffer, freed concurrently by other processes, end with
refcount 1 and the storage freed exactly once.

Workers live in tests/mbuf_mp_workers.py.  The seed is printed; rerun a failure with
SHMALLOC_TEST_SEED=<seed>."""

import multiprocessing
import os
import queue
import random

import pytest

import mbuf_mp_workers
from shmalloc import Arena
from shmalloc import layout as L
from shmalloc import mbuf as mb

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
WAIT = 60.0
NW = mb.M_NOWAIT
KINDS = ("packet", "cluster", "ext", "jumbo9")


@pytest.fixture
def seed():
    s = int(os.environ.get("SHMALLOC_TEST_SEED") or random.randrange(1 << 32))
    print(f"seed {s} (rerun with SHMALLOC_TEST_SEED={s})")
    return s


def _get(q, procs, seed):
    try:
        status, tag, payload = q.get(timeout=WAIT)
    except queue.Empty:
        codes = ", ".join(f"{p.name}: {p.exitcode}" for p in procs)
        pytest.fail(f"no report from the workers in {WAIT} s ({codes}; seed {seed})")
    if status != "ok":
        pytest.fail(f"worker {tag} failed (seed {seed}):\n{payload}")
    return payload


def _state(zone, h):
    """Tag state name of item ``h`` of ``zone``'s keg."""
    keg = zone.keg
    base = keg.slab_of(h)
    if base < 0:
        return "free"
    t = zone.arena._core.tags[(base >> 2) + keg.offmap[h - base]]
    return L.TAG_STATE_NAMES[L.tag_state(t)]


def test_copies_freed_concurrently_by_other_processes(arena_name, seed):
    nworkers, per_worker, rounds = 3, 100, 12
    rng = random.Random(seed)
    a = Arena.create(arena_name, 32 << 20)
    procs = []
    q = SPAWN.Queue()
    in_qs = [SPAWN.Queue() for _ in range(nworkers)]
    barrier = SPAWN.Barrier(nworkers + 1)
    try:
        counter_zone = a.zcreate("ext_counter", 8)
        store = a.zcreate("ext_store", 4096)
        for i in range(nworkers):
            p = SPAWN.Process(target=mbuf_mp_workers.run, name=f"refcount[{i}]", daemon=True,
                              args=("refcount_worker", q, i, arena_name, i, seed, rounds,
                                    in_qs[i], barrier))
            p.start()
            procs.append(p)
        closed = []
        for rnd in range(rounds):
            kind = KINDS[rnd % len(KINDS)]
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 1500)))
            counter = counter_zone.alloc(NW)
            a._core.tags[counter >> 2] = 0
            buf = None
            if kind == "packet":
                m = mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a)
            elif kind == "cluster":
                m = mb.m_gethdr(NW, mb.MT_DATA, arena=a)
                assert mb.m_clget(m, NW)
            elif kind == "jumbo9":
                m = mb.m_getjcl(NW, mb.MT_DATA, mb.M_PKTHDR, mb.MJUM9BYTES, arena=a)
            else:
                m = mb.m_gethdr(NW, mb.MT_DATA, arena=a)
                buf = store.alloc(NW)
                assert mb.m_extadd(m, buf, 4096, "mbuf_mp_workers:count_ext_free",
                                   counter, 0, 0, mb.EXT_DISPOSABLE) == 0
            assert mb.m_append(m, len(payload), payload) == 1
            ref, storage = m.m_ext.ref_cnt, m.m_ext.ext_buf
            copies = [mb.m_copym(m, 0, mb.M_COPYALL, NW) for _ in range(nworkers * per_worker)]
            assert m.refcnt == 1 + len(copies), f"{kind} (seed {seed})"
            for i in range(nworkers):
                in_qs[i].put((rnd, [c.handle for c in copies[i::nworkers]], payload))
            free_first = rng.random() < 0.5
            if free_first:
                mb.m_freem(m)                       # the original goes while copies live
            barrier.wait(WAIT)
            if not free_first:
                mb.m_freem(m)                       # ... or races the workers
            reports = []
            while len(reports) < nworkers:
                r = _get(q, procs, seed)
                (closed if r[0] is None else reports).append(r)
            assert all(r[0] == rnd for r in reports), f"{reports} (seed {seed})"
            problems = [p for r in reports for p in r[2]]
            assert not problems, f"{problems} (seed {seed})"
            assert sorted(r[1] for r in reports) == list(range(nworkers))
            what = f"round {rnd} ({kind}, original freed {'first' if free_first else 'racing'}; " \
                   f"seed {seed})"
            if kind == "ext":
                assert a._core.tags[counter >> 2] == 1, f"free routine calls: {what}"
                assert _state(a.zone("mbuf_ext_refcnt"), ref) != "alloc", what
                store.free(buf)
            else:
                assert a._core.tags[ref >> 2] == 1, what        # ends at 1
            # the storage went back exactly once: no longer allocated (a second free
            # would have raised DoubleFreeError in whichever process did it)
            if kind == "packet":
                assert _state(a.zone("mbuf_packet"), m.handle) != "alloc", what
            elif kind in ("cluster", "jumbo9"):
                z = a.zone("mbuf_cluster" if kind == "cluster" else "mbuf_jumbo_9k")
                assert _state(z, storage) != "alloc", what
            counter_zone.free(counter)
        while len(closed) < nworkers:
            closed.append(_get(q, procs, seed))
        assert all(r[2] == "closed" for r in closed), closed
        for p in procs:
            p.join(WAIT)
            assert p.exitcode == 0, f"{p.name} exit {p.exitcode} (seed {seed})"
        # every worker closed: their counters are folded in, their caches given back
        st = {n: a.zone_stats(n) for n in ("mbuf", "mbuf_packet", "mbuf_cluster",
                                           "mbuf_jumbo_9k", "mbuf_ext_refcnt")}
        assert st["mbuf"].used == 0 and st["mbuf_packet"].used == 0, f"seed {seed}"
        assert st["mbuf_jumbo_9k"].used == 0 and st["mbuf_ext_refcnt"].used == 0
        assert st["mbuf_cluster"].used == st["mbuf_packet"].free        # parked in packets
        a.check()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(WAIT)
        for x in [q, *in_qs]:
            x.close()
        a.destroy()


def test_a_process_that_never_imported_mbuf_resolves_the_mbuf_hooks(arena_name):
    """Zones store hook *names*, module-qualified: arena.reclaim() in another process
    finds mb_zfini_pack & co. by importing the module the name gives."""
    import subprocess
    import sys
    a = Arena.create(arena_name, 16 << 20)
    try:
        ps = [mb.m_getcl(NW, mb.MT_DATA, mb.M_PKTHDR, arena=a) for _ in range(3)]
        for p in ps:
            mb.m_freem(p)
        a.zone("mbuf_packet")._cache.drain_cache()     # this CPU's packets -> the depot
        assert a.zone_stats("mbuf_packet").free_depot > 0
        code = ("import sys; from shmalloc import Arena\n"
                f"a = Arena.attach({arena_name!r})\n"
                "a.reclaim(); a.check(); print(a.zone('mbuf_packet').hook_names['fini'])\n"
                "a.close()\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=WAIT)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "shmalloc.mbuf.ctors:mb_zfini_pack"
        # the child's reclaim ran mb_zfini_pack on the depot's packets: clusters went back
        assert a.zone_stats("mbuf_packet").free == 0
        assert a.zone_stats("mbuf_cluster").used == 0
        a.check()
    finally:
        a.destroy()
