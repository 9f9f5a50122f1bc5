"""Worker functions for tests/test_multiprocess.py.

'spawn' children import their target by name, so the workers live in a module of
their own.  Every worker runs under ``run``: it reports with
``q.put(("ok", tag, payload))`` and any exception comes back to the parent as
``("err", tag, traceback)``, so a failing child fails the test with its traceback
instead of a bare timeout.  Every worker is given the test's seed.
"""

from __future__ import annotations

import random
import struct
import time
import traceback

from shmalloc import M_NOWAIT, M_WAITOK, Arena

WAIT = 60.0          # seconds any blocking step of a worker may take
_MAGIC = b"SHMT"


def run(fn_name, q, tag, *args):
    """Process target: call worker ``fn_name``(q, tag, *args); report a crash."""
    try:
        globals()[fn_name](q, tag, *args)
    except BaseException:
        q.put(("err", tag, traceback.format_exc()))


# --------------------------------------------------------------------- item markers
def marker(owner: int, handle: int, serial: int, size: int) -> bytes:
    """The bytes worker ``owner`` writes into item ``handle`` (its ``serial``-th write)."""
    unit = struct.pack("<4sIQQ", _MAGIC, owner, handle, serial)
    return (unit * (size // len(unit) + 1))[:size]


def describe(data: bytes) -> str:
    """Who wrote these item bytes, for a failure message."""
    if len(data) >= 24 and data[:4] == _MAGIC:
        _, owner, handle, serial = struct.unpack_from("<4sIQQ", data)
        return f"worker {owner}'s marker for handle {handle} (serial {serial})"
    return f"foreign bytes {bytes(data[:24]).hex()}"


def verify(z, h, owner, serial, what, problems):
    """Compare item ``h`` with the marker ``owner`` wrote; note a difference."""
    want = marker(owner, h, serial, z.size)
    got = bytes(z.view(h))
    if got != want:
        problems.append(f"{what}: item {h} should hold worker {owner}'s marker "
                        f"(serial {serial}) but holds {describe(got)}")
        return False
    return True


# --------------------------------------------------------------------- test 1: exchange
def exchange_worker(q, tag, name, zone_name, idx, nworkers, seed, rounds, out_q, in_q,
                    barrier):
    """Allocate, mark, pass some items to the next worker, take items from the
    previous one (check, re-mark, free them: cross-CPU frees), free the rest."""
    rng = random.Random(seed * 1000 + idx)
    problems: list[str] = []
    held: dict[int, int] = {}       # handle -> serial of the marker we wrote
    origin: dict[int, int] = {}     # handle -> the worker that allocated it
    serial = allocs = frees = sent = received = xfrees = 0
    used: set[int] = set()          # every handle this worker allocated
    a = Arena.attach(name)
    try:
        z = a.zone(zone_name)
        barrier.wait(WAIT)          # all attached: the rounds run side by side

        def mark(h):
            nonlocal serial
            serial += 1
            z.view(h)[:] = marker(idx, h, serial, z.size)
            held[h] = serial

        def free_one(h):
            nonlocal frees, xfrees
            verify(z, h, idx, held.pop(h), f"worker {idx} before free", problems)
            z.free(h)
            frees += 1
            xfrees += origin.pop(h) != idx       # the item's holder CPU is its allocator's

        for rnd in range(rounds):
            for _ in range(rng.randint(20, 60)):
                h = z.alloc(M_NOWAIT)
                if h is None:
                    raise AssertionError(f"worker {idx}: alloc failed (seed {seed})")
                allocs += 1
                if h in held:
                    problems.append(f"worker {idx}: alloc returned item {h}, which it holds")
                origin[h] = idx
                used.add(h)
                mark(h)
                if held and rng.random() < 0.5:
                    free_one(rng.choice(list(held)))
            out = rng.sample(sorted(held), min(len(held), rng.randint(5, 15)))
            for h in out:
                verify(z, h, idx, held[h], f"worker {idx} before sending", problems)
            q_items = [(h, idx, held.pop(h), origin.pop(h)) for h in out]
            sent += len(q_items)
            out_q.put((rnd, q_items))
            got_rnd, incoming = in_q.get(timeout=WAIT)
            if got_rnd != rnd:
                problems.append(f"worker {idx}: got round {got_rnd}'s items in round {rnd}")
            for h, sender, s_serial, s_origin in incoming:
                received += 1
                verify(z, h, sender, s_serial, f"worker {idx} on receipt from {sender}",
                       problems)
                if h in held:
                    problems.append(f"worker {idx}: received item {h}, which it holds")
                origin[h] = s_origin
                mark(h)
            # some received items are freed at once, the rest with the others later
            for h, *_ in incoming:
                if rng.random() < 0.5:
                    free_one(h)
            for h in rng.sample(sorted(held), len(held) // 2):
                free_one(h)             # through the depot to whoever allocates next
            time.sleep(rng.random() * 0.01)
        for h in list(held):
            free_one(h)
        barrier.wait(WAIT)          # nobody closes while a neighbour may free its items
        cpu = a.cpu_id
    finally:
        a.close()
    q.put(("ok", tag, dict(idx=idx, cpu=cpu, allocs=allocs, frees=frees, sent=sent,
                            received=received, xfrees=xfrees, used=sorted(used),
                            problems=problems)))


# --------------------------------------------------------------------- test 2: conservation
def conserve_worker(q, tag, name, zone_names, idx, seed, nops, go):
    """Churn on several zones, keep some items, publish and report; on ``go``,
    free everything and close."""
    rng = random.Random(seed * 1000 + idx)
    a = Arena.attach(name)
    try:
        zones = [a.zone(n) for n in zone_names]
        live = {n: [] for n in zone_names}
        allocs = {n: 0 for n in zone_names}
        for _ in range(nops):
            n = rng.choice(zone_names)
            z = zones[zone_names.index(n)]
            if not live[n] or rng.random() < 0.6:
                h = z.alloc(M_NOWAIT)
                if h is None:
                    raise AssertionError(f"worker {idx}: zone {n!r} alloc failed (seed {seed})")
                allocs[n] += 1
                live[n].append(h)
            else:
                z.free(live[n].pop(rng.randrange(len(live[n]))))
            if rng.random() < 0.01:
                z.drain()
        a.stats()                   # publish this CPU's counters
        q.put(("ok", tag, dict(idx=idx, cpu=a.cpu_id,
                                live={n: len(v) for n, v in live.items()},
                                cached={n: len(z._cache.items) for n, z in
                                        zip(zone_names, zones)},
                                allocs=allocs)))
        if not go.wait(WAIT):
            raise AssertionError(f"worker {idx}: no go from the parent in {WAIT} s")
        for n, z in zip(zone_names, zones):
            if idx % 2:
                z.free_bulk(live[n])
            else:
                for h in live[n]:
                    z.free(h)
    finally:
        a.close()
    q.put(("ok", tag, "closed"))


# --------------------------------------------------------------------- test 3: sleepers
def sleeper_worker(q, tag, name, zone_name, timeout):
    """One M_WAITOK alloc; report what happened and when (time.monotonic is
    system-wide on Linux, so the parent can compare)."""
    a = Arena.attach(name)
    try:
        z = a.zone(zone_name)
        q.put(("ok", tag, ("sleeping", a.cpu_id, time.monotonic())))
        t0 = time.monotonic()
        try:
            h = z.alloc(M_WAITOK, timeout=timeout)
        except TimeoutError as e:
            t1 = time.monotonic()
            q.put(("ok", tag, ("timeout", t1 - t0, t1, str(e))))
            return
        t1 = time.monotonic()
        # the item is ours: write it, read it back, free it
        z.view(h)[:] = marker(99, h, 1, z.size)
        ok = bytes(z.view(h)) == marker(99, h, 1, z.size)
        z.free(h)
        q.put(("ok", tag, ("got", h, t1 - t0, t1, ok)))
    finally:
        a.close()


# --------------------------------------------------------------------- test 4: limit
def churn_worker(q, tag, name, zone_name, idx, seed, nops, limit, barrier):
    """Random alloc/free (some M_WAITOK with a short timeout) on a limited zone;
    watch the zone's item count."""
    rng = random.Random(seed * 1000 + idx)
    a = Arena.attach(name)
    live: list[int] = []
    st = dict(idx=idx, allocs=0, frees=0, fails=0, waits=0, timeouts=0, max_items=0,
              max_live=0, over=[])
    try:
        z = a.zone(zone_name)
        barrier.wait(WAIT)
        for i in range(nops):
            r = rng.random()
            if r < 0.55 and len(live) < limit:
                if r < 0.05:
                    st["waits"] += 1
                    try:
                        h = z.alloc(M_WAITOK, timeout=0.05)
                    except TimeoutError:
                        h = None
                        st["timeouts"] += 1
                else:
                    h = z.alloc(M_NOWAIT)
                if h is None:
                    st["fails"] += 1
                else:
                    if h in live:
                        raise AssertionError(f"worker {idx}: got item {h} twice (seed {seed})")
                    live.append(h)
                    st["allocs"] += 1
            elif live:
                z.free(live.pop(rng.randrange(len(live))))
                st["frees"] += 1
            elif r > 0.99:
                z.drain()
            st["max_live"] = max(st["max_live"], len(live))
            if i % 25 == 0:
                items = z.stats().items
                st["max_items"] = max(st["max_items"], items)
                if items > limit and len(st["over"]) < 5:
                    st["over"].append((i, items))
        while live:
            z.free(live.pop())
            st["frees"] += 1
    finally:
        a.close()
    q.put(("ok", tag, st))


# --------------------------------------------------------------------- test 5: exit
def attach_alloc_exit(q, tag, name, zone_name, nitems):
    """Attach, allocate and free ``nitems`` (they stay cached), close, exit."""
    a = Arena.attach(name)
    try:
        z = a.zone(zone_name)
        hs = [z.alloc(M_NOWAIT) for _ in range(nitems)]
        if None in hs:
            raise AssertionError(f"alloc failed: {hs}")
        for h in hs:
            z.free(h)
        a.stats()
        cached = len(z._cache.items)
        cpu = a.cpu_id
        depot_gets = z._cache.depot_gets
    finally:
        a.close()
    q.put(("ok", tag, dict(cpu=cpu, cached=cached, handles=hs, depot_gets=depot_gets)))


# --------------------------------------------------------------------- test 6: fork
def forked_child(q, tag, arena, zone, nitems, seed):
    """In a forked child: use the parent's Arena and Zone objects as inherited."""
    rng = random.Random(seed)
    before = list(zone._cache.items)
    hs = []
    for _ in range(nitems):
        h = zone.alloc(M_NOWAIT)
        if h is None:
            raise AssertionError("alloc in the forked child failed")
        zone.view(h)[:] = marker(7, h, 1, zone.size)
        hs.append(h)
    problems: list[str] = []
    for h in hs:
        verify(zone, h, 7, 1, "forked child", problems)
    rng.shuffle(hs)
    for h in hs:
        zone.free(h)
    own = [x.cpu_id for x in arena._thread_arenas.values()]
    parent_cache_touched = list(zone._cache.items) != before
    arena.close()
    q.put(("ok", tag, dict(handles=hs, cpus=own, parent_cpu=arena.cpu_id,
                            parent_cache_touched=parent_cache_touched, problems=problems)))


# --------------------------------------------------------------------- issue 11: limits
def limit_consumer(q, tag, name, zone_name, total, seed):
    """Receive ``total`` items one message at a time and free each at once,
    checking the producer's serial in its first bytes."""
    rng = random.Random(seed * 7 + 1)
    with Arena.attach(name) as a:
        z = a.zone(zone_name)
        q.put(("ok", tag, ("cpu", a.cpu_id)))
        got = bad = 0
        expect = 0
        while got < total:
            hs = a.recv(timeout=WAIT)
            if not hs:
                raise TimeoutError(f"consumer: nothing received for {WAIT} s after {got} items")
            for h in hs:
                serial, handle = struct.unpack_from("<QQ", z.view(h))
                if serial != expect or handle != h:
                    bad += 1
                expect += 1
                z.free(h)
                got += 1
                if rng.random() < 0.02:
                    time.sleep(rng.random() * 0.002)
        q.put(("ok", tag, ("done", got, bad)))


def limit_producer(q, tag, name, zone_name, dest, total, seed, timeout):
    """Allocate ``total`` items M_WAITOK one at a time, mark each and send it to
    CPU ``dest``."""
    rng = random.Random(seed * 7 + 2)
    with Arena.attach(name) as a:
        z = a.zone(zone_name)
        t0 = time.monotonic()
        for i in range(total):
            try:
                h = z.alloc(M_WAITOK, timeout=timeout)
            except TimeoutError:
                s = z.stats()
                raise TimeoutError(f"producer: item {i} of {total} not served within "
                                   f"{timeout} s (zone: used {s.used}, cached "
                                   f"{s.free_cache}, depot {s.free_depot})") from None
            struct.pack_into("<QQ", z.view(h), 0, i, h)
            a.send(dest, [h], timeout=WAIT)
            if rng.random() < 0.02:
                time.sleep(rng.random() * 0.002)
        q.put(("ok", tag, ("done", total, z.stats().sleeps, time.monotonic() - t0)))


def waitok_once(q, tag, name, zone_name, hand_to, n_first, timeout, go):
    """Allocate ``n_first`` items (M_WAITOK) and hand them to CPU ``hand_to``,
    then, once ``go`` is set, one more, M_WAITOK: report how it went."""
    with Arena.attach(name) as a:
        z = a.zone(zone_name)
        for _ in range(n_first):
            a.send(hand_to, [z.alloc(M_WAITOK, timeout=WAIT)], timeout=WAIT)
        q.put(("ok", tag, ("sent", n_first)))
        if not go.wait(WAIT):
            raise TimeoutError("no go")
        t0 = time.monotonic()
        try:
            h = z.alloc(M_WAITOK, timeout=timeout)
        except TimeoutError:
            q.put(("ok", tag, ("timeout", time.monotonic() - t0)))
            return
        q.put(("ok", tag, ("got", h, time.monotonic() - t0)))
        z.free(h)
