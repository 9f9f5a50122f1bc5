"""Cross-process tests: several processes, each a CPU, on one POSIX arena.

Workers live in tests/mp_helpers.py ('spawn' children import them by name).
Every test is seeded; the seed is printed (pytest shows it on failure) and is in
every assertion message.  Rerun a failure with SHMALLOC_TEST_SEED=<seed>.
"""

import multiprocessing
import os
import queue
import random
import time

import pytest

import mp_helpers
from shmalloc import M_NOWAIT, Arena, layout
from shmalloc.ipc import naming

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
WAIT = 60.0                  # seconds for any join / queue get
SIZE = 16 << 20


@pytest.fixture
def seed():
    s = int(os.environ.get("SHMALLOC_TEST_SEED") or random.randrange(1 << 32))
    print(f"seed {s} (rerun with SHMALLOC_TEST_SEED={s})")
    return s


class Children:
    """Child processes of one test, their report queue, and their cleanup."""

    def __init__(self, ctx, seed):
        self.ctx = ctx
        self.seed = seed
        self.q = ctx.Queue()
        self.procs = []
        self.extra = []          # other queues to close

    def queue(self):
        q = self.ctx.Queue()
        self.extra.append(q)
        return q

    def start(self, fn_name, tag, *args):
        p = self.ctx.Process(target=mp_helpers.run, args=(fn_name, self.q, tag, *args),
                             name=f"{fn_name}[{tag}]", daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def _codes(self):
        return ", ".join(f"{p.name}: {'alive' if p.is_alive() else p.exitcode}"
                         for p in self.procs)

    def get(self, what, poll=None):
        """Next report; fail on a child's exception, a silent death or WAIT seconds.
        ``poll`` is called between waits (the parent's own observations)."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                status, tag, payload = self.q.get(timeout=0.02 if poll else 0.2)
                break
            except queue.Empty:
                pass
            if poll is not None:
                poll()
            if time.monotonic() > deadline:
                pytest.fail(f"seed {self.seed}: no report within {WAIT} s while waiting for "
                            f"{what}; children: {self._codes()}")
            if self.procs and not any(p.is_alive() for p in self.procs) and self.q.empty():
                time.sleep(0.5)          # a report may still be in the pipe
                if self.q.empty():
                    pytest.fail(f"seed {self.seed}: every child exited without reporting "
                                f"{what}; children: {self._codes()}")
        if status == "err":
            pytest.fail(f"seed {self.seed}: child {tag!r} failed while the parent waited for "
                        f"{what}:\n{payload}")
        return tag, payload

    def results(self, n, what, poll=None):
        out = {}
        for _ in range(n):
            tag, payload = self.get(what, poll)
            assert tag not in out, f"seed {self.seed}: child {tag!r} reported twice"
            out[tag] = payload
        return out

    def join(self):
        for p in self.procs:
            p.join(WAIT)
            if p.is_alive():
                pytest.fail(f"seed {self.seed}: {p.name} did not exit within {WAIT} s; "
                            f"children: {self._codes()}")
            assert p.exitcode == 0, (f"seed {self.seed}: {p.name} exited with {p.exitcode}; "
                                     f"children: {self._codes()}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:            # only on failure are any still running
            if p.is_alive():
                p.kill()
                p.join(5)
        for q in [self.q, *self.extra]:
            q.close()
            q.join_thread()


def assert_conserved(z, seed, when):
    """Per zone: items out of the slabs == cached + depot + allocated."""
    s = z.stats()
    assert s.items == s.free_cache + s.free_depot + s.used, (
        f"seed {seed}, {when}: zone {s.name!r}: items {s.items} != cache {s.free_cache} + "
        f"depot {s.free_depot} + used {s.used}")
    return s


def assert_keg_consistent(a, primary, seed, when):
    """The keg's pages hold exactly free-in-slab items + items of its zones."""
    keg = primary.keg
    s = primary.stats()
    on_keg = [zs for zs in a.stats().zones if a.zone(zs.name).keg.id == keg.id]
    total = s.pages // keg.ppera * keg.ipers
    assert s.pages % keg.ppera == 0, f"seed {seed}, {when}: {s.pages} pages, ppera {keg.ppera}"
    assert s.free_keg + sum(zs.items for zs in on_keg) == total, (
        f"seed {seed}, {when}: keg of {primary.name!r}: free {s.free_keg} + items "
        f"{[(zs.name, zs.items) for zs in on_keg]} != {s.pages} pages x {keg.ipers} / "
        f"{keg.ppera}")


# ============================================================================ 1. exchange
def test_four_processes_exchange_items_and_free_across_cpus(arena_name, seed):
    n, rounds = 4, 6
    with Arena.create(arena_name, size=SIZE) as a, Children(SPAWN, seed) as kids:
        z = a.zcreate("xchg", 256, bucket_size=8)   # small: items travel via the depot
        links = [kids.queue() for _ in range(n)]
        barrier = SPAWN.Barrier(n)
        for i in range(n):
            kids.start("exchange_worker", i, a.name, "xchg", i, n, seed, rounds,
                       links[(i + 1) % n], links[i], barrier)
        res = kids.results(n, "the exchange workers")
        kids.join()

        problems = [p for r in res.values() for p in r["problems"]]
        assert not problems, f"seed {seed}: items shared by two holders:\n" + "\n".join(problems)
        assert len({r["cpu"] for r in res.values()} | {a.cpu_id}) == n + 1, (
            f"seed {seed}: CPUs {[r['cpu'] for r in res.values()]} (parent {a.cpu_id})")
        sent = sum(r["sent"] for r in res.values())
        received = sum(r["received"] for r in res.values())
        allocs = sum(r["allocs"] for r in res.values())
        frees = sum(r["frees"] for r in res.values())
        assert sent == received > 0, f"seed {seed}: sent {sent}, received {received}"
        assert allocs == frees, f"seed {seed}: {allocs} allocs, {frees} frees"

        assert a.stats().cpus == 1, f"seed {seed}: {a.stats().cpus} CPUs after every child left"
        a.check(level=2)
        s = assert_conserved(z, seed, "after the exchange")
        assert s.used == 0, f"seed {seed}: {s}"
        assert s.requests == allocs and s.frees == frees, f"seed {seed}: {s}"
        xfrees = sum(r["xfrees"] for r in res.values())
        assert xfrees > 0, f"seed {seed}: no item was freed away from its allocator"
        assert s.xfree == xfrees, f"seed {seed}: {xfrees} cross-CPU frees, stats say {s}"
        assert s.free_cache == 0 and s.items == s.free_depot, f"seed {seed}: {s}"
        # the markers proved something only if items did move between processes
        assert s.depot_gets > 0, f"seed {seed}: no bucket came back from the depot: {s}"
        shared = set(res[0]["used"]).intersection(*(res[i]["used"] for i in range(1, n)))
        moved = sum(len(set(res[i]["used"]) & set(res[j]["used"]))
                    for i in range(n) for j in range(i + 1, n))
        assert moved > 0, f"seed {seed}: no item was allocated by two processes"
        print(f"{moved} items allocated by two workers, {len(shared)} by all four")


# ============================================================================ 2. conservation
def test_conservation_with_items_live_in_other_processes(arena_name, seed):
    names = ["c128", "c128s", "fixed", "nocache"]
    with Arena.create(arena_name, size=SIZE) as a, Children(SPAWN, seed) as kids:
        c128 = a.zcreate("c128", 128)
        a.zsecond_create("c128s", c128)
        fixed = a.zcreate("fixed", 512, bucket_size=4)
        nocache = a.zcreate("nocache", 64, bucket_size=0)
        zones = {n: a.zone(n) for n in names}
        pages_before = a.free_pages
        go = SPAWN.Event()
        for i in range(2):
            kids.start("conserve_worker", i, a.name, names, i, seed, 1500, go)
        # the parent is a CPU too: it keeps a few items of each zone
        rng = random.Random(seed)
        mine = {n: [zones[n].alloc(M_NOWAIT) for _ in range(rng.randint(1, 9))] for n in names}
        assert all(h is not None for hs in mine.values() for h in hs), f"seed {seed}: {mine}"
        for n in names:
            zones[n].free(mine[n].pop())
        res = kids.results(2, "the workers' churn")

        when = "while the workers hold items"
        for n in names:
            s = assert_conserved(zones[n], seed, when)
            live = sum(r["live"][n] for r in res.values()) + len(mine[n])
            cached = sum(r["cached"][n] for r in res.values()) + len(zones[n]._cache.items)
            assert s.used == live, f"seed {seed}, {when}: {n}: used {s.used}, live {live}"
            assert s.free_cache == cached, f"seed {seed}, {when}: {n}: {s}, cached {cached}"
        assert zones["nocache"].stats().free_cache == 0, f"seed {seed}"
        for primary in (c128, fixed, nocache):
            assert_keg_consistent(a, primary, seed, when)
        assert a.stats().cpus == 3, f"seed {seed}: {a.stats()}"
        a.check(level=2)

        go.set()
        kids.results(2, "the workers to free and close")
        kids.join()
        for n in names:
            zones[n].free_bulk(mine[n])

        when = "after the workers left"
        assert a.stats().cpus == 1, f"seed {seed}: {a.stats()}"
        for n in names:
            s = assert_conserved(zones[n], seed, when)
            assert s.used == 0, f"seed {seed}, {when}: {s}"
            assert s.free_cache == len(zones[n]._cache.items), f"seed {seed}, {when}: {s}"
        for primary in (c128, fixed, nocache):
            assert_keg_consistent(a, primary, seed, when)
        a.check(level=2)

        a.reclaim()
        when = "after reclaim"
        for n in names:
            s = assert_conserved(zones[n], seed, when)
            assert s.items == s.free_cache == s.free_depot == 0, f"seed {seed}, {when}: {s}"
        for primary in (c128, fixed, nocache):
            assert primary.stats().pages == 0, f"seed {seed}, {when}: {primary.stats()}"
        assert a.free_pages == pages_before, f"seed {seed}: {a.free_pages} != {pages_before}"
        a.check(level=2)


# ============================================================================ 3. sleepers
def _fill(z, n, seed):
    hs = [z.alloc(M_NOWAIT) for _ in range(n)]
    assert None not in hs, f"seed {seed}: could not fill the zone: {hs}"
    assert z.alloc(M_NOWAIT) is None, f"seed {seed}: the zone gave more than {n} items"
    return hs


def _wait_for_sleepers(z, kids, n, seed):
    deadline = time.monotonic() + WAIT
    while z.stats().sleepers != n:
        if time.monotonic() > deadline:
            pytest.fail(f"seed {seed}: the zone never showed {n} sleeper(s): {z.stats()}; "
                        f"children: {kids._codes()}")
        if not kids.q.empty():
            tag, payload = kids.get("a sleeper")
            pytest.fail(f"seed {seed}: child {tag} reported {payload} before anyone freed")
        time.sleep(0.01)


def test_waitok_sleeper_is_woken_by_a_free_in_another_process(arena_name, seed):
    n = 8
    with Arena.create(arena_name, size=SIZE) as a, Children(SPAWN, seed) as kids:
        z = a.zcreate("limited", 64, max_items=n)
        hs = _fill(z, n, seed)
        kids.start("sleeper_worker", "sleeper", a.name, "limited", 20.0)
        tag, msg = kids.get("the sleeper to attach")
        assert msg[0] == "sleeping", f"seed {seed}: {msg}"
        _wait_for_sleepers(z, kids, 1, seed)

        victim = hs.pop(random.Random(seed).randrange(len(hs)))
        t_free = time.monotonic()
        z.free(victim)
        tag, msg = kids.get("the sleeper to get an item")
        assert msg[0] == "got", f"seed {seed}: the sleeper reported {msg}"
        _, h, waited, t_got, intact = msg
        assert h == victim, f"seed {seed}: the sleeper got {h}, the freed item was {victim}"
        assert intact, f"seed {seed}: the sleeper could not write its item"
        assert t_got - t_free < 5.0, (f"seed {seed}: the sleeper woke {t_got - t_free:.2f} s "
                                      f"after the free (timeout 20 s)")
        assert waited < 15.0, f"seed {seed}: waited {waited:.2f} s"
        kids.join()

        s = z.stats()
        assert s.sleepers == 0 and s.sleeps >= 1, f"seed {seed}: {s}"
        assert s.items <= n, f"seed {seed}: {s}"
        z.free_bulk(hs)
        s = assert_conserved(z, seed, "after the sleeper")
        assert s.used == 0, f"seed {seed}: {s}"
        a.check(level=2)


def test_waitok_times_out_when_nobody_frees(arena_name, seed):
    n = 4
    with Arena.create(arena_name, size=SIZE) as a, Children(SPAWN, seed) as kids:
        z = a.zcreate("limited", 64, max_items=n)
        hs = _fill(z, n, seed)
        fails = z.stats().failures
        kids.start("sleeper_worker", "sleeper", a.name, "limited", 0.5)
        tag, msg = kids.get("the sleeper to attach")
        assert msg[0] == "sleeping", f"seed {seed}: {msg}"
        tag, msg = kids.get("the sleeper to time out")
        assert msg[0] == "timeout", f"seed {seed}: expected TimeoutError, got {msg}"
        assert 0.45 <= msg[1] < 5.0, f"seed {seed}: timed out after {msg[1]:.2f} s (0.5 asked)"
        kids.join()

        s = z.stats()
        assert s.sleepers == 0 and s.sleeps >= 1, f"seed {seed}: {s}"
        assert s.failures == fails + 1, f"seed {seed}: {s}"
        assert s.items == n, f"seed {seed}: {s}"
        a.check(level=2)
        z.free_bulk(hs)
        assert z.stats().used == 0, f"seed {seed}: {z.stats()}"
        a.check(level=2)


# ============================================================================ 4. limit
def test_limit_holds_under_concurrent_churn(arena_name, seed):
    limit, nproc = 50, 3
    with Arena.create(arena_name, size=SIZE) as a, Children(SPAWN, seed) as kids:
        z = a.zcreate("churn", 1024, max_items=limit)
        barrier = SPAWN.Barrier(nproc)
        for i in range(nproc):
            kids.start("churn_worker", i, a.name, "churn", i, seed, 3000, limit, barrier)
        seen = []

        def poll():
            seen.append(z.stats().items)

        res = kids.results(nproc, "the churn workers", poll=poll)
        kids.join()

        over = {i: r["over"] for i, r in res.items() if r["over"]}
        assert not over, f"seed {seed}: workers saw items over the limit {limit}: {over}"
        max_seen = max([r["max_items"] for r in res.values()] + seen)
        assert max_seen <= limit, f"seed {seed}: {max_seen} items seen, limit {limit}"
        for i, r in res.items():
            assert r["max_live"] <= limit, f"seed {seed}: worker {i} held {r['max_live']}"
            assert r["allocs"] == r["frees"], f"seed {seed}: worker {i}: {r}"
        allocs = sum(r["allocs"] for r in res.values())
        assert allocs > 0, f"seed {seed}: nobody allocated: {res}"
        s = assert_conserved(z, seed, "after the churn")
        assert s.used == 0 and s.items <= limit, f"seed {seed}: {s}"
        assert s.requests == allocs, f"seed {seed}: {s}, workers allocated {allocs}"
        assert s.sleepers == 0, f"seed {seed}: {s}"
        a.check(level=2)


# ============================================================================ 5. exit
def test_closed_process_frees_its_cpu_and_leaves_its_cache_in_the_depot(arena_name, seed):
    with Arena.create(arena_name, size=SIZE) as a, Children(SPAWN, seed) as kids:
        z = a.zcreate("c128", 128)
        objects = set(naming.list_objects(a.name))
        assert a.stats().cpus == 1
        kids.start("attach_alloc_exit", "first", a.name, "c128", 10)
        first = kids.results(1, "the first child")["first"]
        kids.join()

        assert first["cached"] >= 10, f"seed {seed}: {first}"
        assert first["cpu"] != a.cpu_id, f"seed {seed}: {first}"
        assert a.stats().cpus == 1, f"seed {seed}: the closed child still holds a CPU slot"
        # the slot's wake semaphore is gone; its mailbox lock stays with the slot
        # (senders may hold it open), and goes with the arena
        mbox_lock = ("sem", naming.object_name(a.name, f"l{layout.mbox_lock_index(first['cpu'])}"))
        assert set(naming.list_objects(a.name)) - {mbox_lock} == objects, (
            f"seed {seed}: OS objects changed: {set(naming.list_objects(a.name)) ^ objects}")
        s = assert_conserved(z, seed, "after the first child")
        assert s.used == 0 and s.free_cache == 0, f"seed {seed}: {s}"
        assert s.free_depot == first["cached"] == s.items, (
            f"seed {seed}: the child cached {first['cached']}, {s}")
        a.check(level=2)

        kids.start("attach_alloc_exit", "second", a.name, "c128", 10)
        second = kids.results(1, "the second child")["second"]
        kids.join()
        assert second["cpu"] == first["cpu"], f"seed {seed}: slot not reused: {first} {second}"
        assert second["depot_gets"] >= 1, f"seed {seed}: the depot was not used: {second}"
        s2 = assert_conserved(z, seed, "after the second child")
        assert s2.items == s.items and s2.free_depot == s.free_depot, (
            f"seed {seed}: items were imported or lost: {s} -> {s2}")
        assert a.stats().cpus == 1
        a.check(level=2)


# ============================================================================ 6. fork
def test_forked_child_gets_its_own_cpu_and_never_the_parents_cache(arena_name, seed):
    with Arena.create(arena_name, size=SIZE) as a, Children(FORK, seed) as kids:
        z = a.zcreate("forky", 128)
        rng = random.Random(seed)
        hs = [z.alloc(M_NOWAIT) for _ in range(20)]
        assert None not in hs
        for h in hs:
            z.view(h)[:] = mp_helpers.marker(1, h, 1, z.size)
        rng.shuffle(hs)
        for h in hs[10:]:
            z.free(h)
        live = hs[:10]
        snapshot = list(z._cache.items)
        assert snapshot, f"seed {seed}: the parent's cache is empty"

        kids.start("forked_child", "child", a, z, 40, seed)
        r = kids.results(1, "the forked child")["child"]
        kids.join()

        assert not r["problems"], f"seed {seed}: {r['problems']}"
        assert r["cpus"] and a.cpu_id not in r["cpus"], (
            f"seed {seed}: the child ran on CPUs {r['cpus']}, the parent is {a.cpu_id}")
        assert not r["parent_cache_touched"], f"seed {seed}: the child popped the parent's cache"
        reused = set(r["handles"]) & set(snapshot)
        assert not reused, f"seed {seed}: the child got the parent's cached items {reused}"
        stolen = set(r["handles"]) & set(live)
        assert not stolen, f"seed {seed}: the child got the parent's live items {stolen}"

        assert a.stats().cpus == 1, f"seed {seed}: {a.stats()}"
        assert z._cache.items == snapshot, f"seed {seed}: the parent's cache changed"
        a.check(level=2)
        problems = []
        for h in live:
            mp_helpers.verify(z, h, 1, 1, "parent after fork", problems)
        assert not problems, f"seed {seed}: {problems}"
        h = z.alloc(M_NOWAIT)
        assert h == snapshot[-1], f"seed {seed}: the parent's fast path gave {h}"
        z.free(h)
        z.free_bulk(live)
        s = assert_conserved(z, seed, "after the fork")
        assert s.used == 0, f"seed {seed}: {s}"
        assert s.requests == 20 + 40 + 1, f"seed {seed}: {s}"
        a.check(level=2)
