"""Worker processes for tests/test_mbuf_multiprocess.py ('spawn' children import
them by name).  Every worker runs under ``run``: it reports ``("ok", tag, payload)``
and any exception comes back as ``("err", tag, traceback)``.  Also the m_extadd free
routines of tests/test_kill.py (module-level: the keg manager resolves them by name
when it frees a dead CPU's last reference)."""

from __future__ import annotations

import os
import random
import signal
import time
import traceback

from shmalloc import Arena
from shmalloc import layout as L
from shmalloc import mbuf as mb

WAIT = 60.0


def run(fn_name, q, tag, *args):
    try:
        globals()[fn_name](q, tag, *args)
    except BaseException:
        q.put(("err", tag, traceback.format_exc()))


def count_ext_free(m, arg1, arg2):
    """m_extadd free routine: count the call in the u32 at handle ``arg1``."""
    core = m.arena._core
    with core.lock(L.VM_LOCK):
        core.tags[arg1 >> 2] += 1


EXT_STORE = "ext_store"         # the zone whose items count_and_free gives back


def count_and_free(m, arg1, arg2):
    """m_extadd free routine: count the call in the u32 at handle ``arg1``, then give
    the storage back to zone ``EXT_STORE``, taken over first as
    ``shmalloc.buffer.free_storage`` does (its zone's free does it first).  ``arg2``
    1: SIGKILL this process right after the take-over -- the storage is then held by
    the dying CPU, and the core's recovery frees it."""
    count_ext_free(m, arg1, arg2)
    z = m.arena.zone(EXT_STORE)
    z.take_over(m.m_ext.ext_buf)
    if arg2 == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    z.free(m.m_ext.ext_buf)


def refcount_worker(q, tag, name, idx, seed, rounds, in_q, barrier):
    """Each round: take the handles of copies the parent made, check their data,
    wait for everybody, free them in a random order (the parent frees the
    original at the same time)."""
    rng = random.Random(seed * 1000 + idx)
    a = Arena.attach(name)
    try:
        for _ in range(rounds):
            rnd, handles, want = in_q.get(timeout=WAIT)
            ms = [mb.Mbuf.from_handle(a, h) for h in handles]
            problems = [f"worker {idx} round {rnd}: copy {m.handle} holds wrong data"
                        for m in ms if mb.m_copydata(m, 0, mb.m_length(m)) != want]
            barrier.wait(WAIT)
            rng.shuffle(ms)
            extra = []
            for m in ms:
                if rng.random() < 0.3:            # a copy of the copy: +1 while others -1
                    extra.append(mb.m_copym(m, 0, mb.M_COPYALL, mb.M_NOWAIT))
                mb.m_freem(m)
                if extra and rng.random() < 0.5:
                    c = extra.pop(rng.randrange(len(extra)))
                    if mb.m_copydata(c, 0, mb.m_length(c)) != want:
                        problems.append(f"worker {idx} round {rnd}: a copy of a copy differs")
                    mb.m_freem(c)
                if rng.random() < 0.1:
                    time.sleep(0)
            for c in extra:
                mb.m_freem(c)
            q.put(("ok", tag, (rnd, idx, problems)))
    finally:
        a.close()
    q.put(("ok", tag, (None, idx, "closed")))


def drain_worker(q, tag, name):
    """A process with a protocol drain of its own holding packets: it waits in recv --
    a safe point, where a drain request from the keg manager runs its drains -- until
    the drain ran, and reports how often and what it still holds."""
    a = Arena.attach(name)
    held = [mb.m_getcl(mb.M_NOWAIT, mb.MT_DATA, mb.M_PKTHDR, arena=a) for _ in range(8)]
    calls = []

    def drain(arena):
        calls.append(arena.cpu_id)
        for m in held:
            mb.m_freem(m)
        held.clear()

    mb.pr_drain_register(drain)
    try:
        q.put(("ok", tag, ("ready", a.cpu_id)))
        deadline = time.monotonic() + WAIT
        while not calls and time.monotonic() < deadline:
            a.recv(timeout=0.05)
        q.put(("ok", tag, ("drained", len(calls), len(held))))
    finally:
        mb.pr_drain_deregister(drain)
        for m in held:
            mb.m_freem(m)
        a.close()
