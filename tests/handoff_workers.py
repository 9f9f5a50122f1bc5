"""Children's functions for tests/test_handoff.py ('spawn' children import them by name)."""

from __future__ import annotations

import traceback

import shmalloc
from shmalloc import buffer as B

WAIT = 60.0


def take_and_read(h) -> bytes:
    """Take hand-off ``h`` here, read its first bytes, close it."""
    with B.take(h) as buf:
        return buf[:16]


def hand_off_and_wait(q, name: str, nbytes: int, stop) -> None:
    """Make a Buffer and hand a reference off to whoever reads the queue, then wait
    (holding both) until killed or told to stop."""
    try:
        arena = shmalloc.Arena.attach(name)
        buf = arena.alloc(nbytes)
        buf[:5] = b"dying"
        q.put(("ok", arena.cpu_id, tuple(buf.handoff())))
        stop.wait(WAIT)
        buf.close()
        arena.close()
    except BaseException:
        q.put(("err", -1, traceback.format_exc()))
