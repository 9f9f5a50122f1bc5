"""Worker functions for tests/test_buffer.py ('spawn' children import them by name).

Pool and executor tasks are plain functions of their arguments.  Long-lived
children run under ``run``: they report ``("ok", tag, payload)`` on a queue, and
any exception comes back as ``("err", tag, traceback)``.
"""

from __future__ import annotations

import random
import time
import traceback

import numpy as np

import shmalloc

WAIT = 60.0


def pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ from buffer to buffer (seeded)."""
    unit = bytes((seed * 131 + i * 7) % 251 for i in range(251))
    return (unit * (n // 251 + 1))[:n]


def run(fn_name, q, tag, *args):
    try:
        globals()[fn_name](q, tag, *args)
    except BaseException:
        q.put(("err", tag, traceback.format_exc()))


# ------------------------------------------------------------------ pool / executor tasks
def double_in_place(buf):
    """numpy in place in the child; the child closes its own reference."""
    with buf:
        a = np.frombuffer(buf, np.float64)
        a *= 2
        s = float(a.sum())
        del a
    return s


def triple_array(arr):
    """A SharedArray argument: the parent's memory, written here."""
    arr *= 3
    return float(arr.sum())


def new_buffer(name: str, nbytes: int, seed: int):
    """A Buffer made in the child and returned (pickled back: the parent owns it)."""
    buf = shmalloc.connect(name).alloc(nbytes)
    buf[:] = pattern(nbytes, seed)
    return buf


def checksum(buf) -> int:
    with buf:
        return sum(memoryview(buf)[::97])


# ------------------------------------------------------------------ long-lived children
def queue_doubler(q, tag, inbox, outbox):
    """Take Buffers from ``inbox`` until None, double their float64s in place, put
    them on ``outbox`` (a new reference each) and drop them."""
    n = 0
    while (buf := inbox.get(timeout=WAIT)) is not None:
        a = np.frombuffer(buf, np.float64)
        a *= 2
        del a
        outbox.put(buf)
        n += 1
    outbox.put(None)
    q.put(("ok", tag, n))


def holder(q, tag, inbox):
    """A holder of references: ("take", key, buf, expected bytes) keeps a Buffer
    (checking its bytes), ("close", key) closes it, ("stop",) ends."""
    held = {}
    while True:
        cmd = inbox.get(timeout=WAIT)
        if cmd[0] == "take":
            _, key, buf, want = cmd
            ok = buf.tobytes() == want
            held[key] = buf
            q.put(("ok", tag, ("took", key, ok)))
        elif cmd[0] == "close":
            held.pop(cmd[1]).close()
            q.put(("ok", tag, ("closed", cmd[1])))
        else:
            q.put(("ok", tag, ("stopped", sorted(held))))
            return


def alloc_and_hand(q, tag, name, sizes, seed):
    """Allocate Buffers, hand references to the parent, keep ours, wait to be killed.
    (A child to be killed reports on a queue of its own: killed between sending and
    releasing the queue's write lock, it would block every other writer.)"""
    arena = shmalloc.connect(name)
    bufs = [arena.alloc(n) for n in sizes]
    for i, b in enumerate(bufs):
        b[:] = pattern(len(b), seed + i)
    q.put(("ok", tag, ("cpu", arena.cpu_id, bufs)))
    time.sleep(WAIT * 10)


def take_and_wait(q, tag, bufs):
    """Hold the references the parent sent (pickled as arguments), wait to be killed."""
    q.put(("ok", tag, ("holding", [b.refcnt for b in bufs], bufs[0].arena.cpu_id)))
    time.sleep(WAIT * 10)


def write_and_close(buf, data):
    """fork target: an inherited Buffer, written and closed in the child."""
    buf[:len(data)] = data
    buf.close()


def churn_until_killed(name, seed, ops):
    """Buffers of every kind made, shared and dropped in a loop until SIGKILLed
    (issue 13's fast paths: a size class's storage held by this CPU until its first
    copy, dropped through the zones' fast paths; a copy claimed and closed), with a
    few kept across iterations so that a kill also finds references shared with
    ones still held.  ``ops`` (a shared counter) says how far it got."""
    rng = random.Random(seed)
    arena = shmalloc.connect(name)
    sizes = [100, 2048, 3000, 10_000, 40_000, 100_000, 1 << 20, 3 << 20]
    kept = []
    while True:
        b = arena.alloc(rng.choice(sizes))
        b[:8] = b"churning"
        r = rng.random()
        if r < 0.3:                  # a second reference, claimed here: a hand-off, which
            c = shmalloc.buffer.take(b.handoff())   # this CPU holds until taken (a pickle
                                     # in flight is held by nobody: a kill would leak it)
            (c if rng.random() < 0.5 else b).close()
            b = c if b.closed else b
        if r < 0.5 or len(kept) > 6:
            if kept:
                kept.pop(rng.randrange(len(kept))).close()
        kept.append(b)
        ops.value += 1
