"""debug: aids for proving robustness.

Kill points: ``SHMALLOC_KILLPOINTS="name[:probability],..."`` (read at import)
makes a process SIGKILL itself when it passes a named point of a slow path with
the given probability (default 1), seeded by ``SHMALLOC_KILL_SEED``.  The points
sit inside locked sections and half-done state changes, where a crash is
hardest to recover from:

    zone.fill.locked      zone lock held, limit units taken, keg not yet asked
    keg.take              keg lock held, part of the items tagged
    vm.reserve            vm lock held, pages out of the free map, not yet mapped
    depot.put             zone lock held, part of a bucket tagged depot
    release.fini          items tagged FINI, fini under way
    mail.post             destination's mailbox lock held, record committed, items
                          not yet re-tagged
    mail.collect          own mailbox lock held, records taken, not yet re-tagged
"""

from __future__ import annotations

import os
import random
import signal

from . import layout as L
from .errors import ShmallocError, UseAfterFreeError

POINTS = ("zone.fill.locked", "keg.take", "vm.reserve", "depot.put", "release.fini",
          "mail.post", "mail.collect")


def _parse(spec: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, prob = part.partition(":")
        if name not in POINTS:
            raise ValueError(f"SHMALLOC_KILLPOINTS: unknown point {name!r}; known: {POINTS}")
        out[name] = float(prob) if prob else 1.0
    return out


KILLPOINTS = _parse(os.environ.get("SHMALLOC_KILLPOINTS", ""))
_rng = random.Random(os.environ.get("SHMALLOC_KILL_SEED"))


def killpoint(name: str) -> None:
    """SIGKILL this process at point ``name`` if the environment asks for it."""
    p = KILLPOINTS.get(name)
    if p is not None and _rng.random() < p:
        os.kill(os.getpid(), signal.SIGKILL)


# ================================================================== INVARIANTS (SHMALLOC_DEBUG)
# Level 1: freed items are filled with junk and checked when handed out again
#          (UMA's trash_ctor/trash_dtor/trash_init/trash_fini), installed as hooks
#          around the zone's own, on zones without an init/fini of their own (as UMA
#          injects them).
# Level 2: + every lock acquisition is checked against the lock order
#          zone -> keg -> vm (mailbox locks are leaves), WITNESS-style, and the
#          functions that need a lock assert it.
# Level 3: + ``check()`` after every slow-path operation.
JUNK = 0xDEADC0DE
_JUNK_WORD = JUNK.to_bytes(4, "little")


def junk(n: int) -> bytes:
    return (_JUNK_WORD * (n // 4 + 1))[:n]


def trash_hooks(zone, ctor, dtor, init, fini):
    """(ctor, dtor, init, fini) with junk fill and check wrapped around the
    zone's own.  Only for zones without their own init/fini."""
    core, size = zone._core, zone.size
    fill = junk(size)

    def check(h):
        if core.mv[h:h + size] != fill:
            view = bytes(core.mv[h:h + size])
            off = next(i for i in range(size) if view[i] != fill[i])
            raise UseAfterFreeError(f"zone {zone.name!r}: handle {h} was modified after it "
                                    f"was freed (first changed byte at offset {off})")

    def trash_ctor(z, h, arg, how):
        check(h)
        return None if ctor is None else ctor(z, h, arg, how)

    def trash_dtor(z, h, arg):
        if dtor is not None:
            dtor(z, h, arg)
        core.mv[h:h + size] = fill

    def trash_init(z, h, how):
        core.mv[h:h + size] = fill

    def trash_fini(z, h):
        check(h)

    return trash_ctor, trash_dtor, trash_init, trash_fini


def _lock_order_error():

    class LockOrderError(ShmallocError):
        """Debug level 2: a lock taken out of order, or a lock contract broken."""
    return LockOrderError


LockOrderError = _lock_order_error()


# lock ranks: a lock may only be taken while every held lock ranks lower
def lock_rank(idx: int) -> int:
    if idx == L.VM_LOCK:
        return 3
    if idx <= L.MAX_KEGS:
        return 2
    if idx < L.mbox_lock_index(0):
        return 1
    return 4                                    # mailbox: a leaf, nothing inside it


class WitnessLock:
    """A lock that checks the order of acquisition (debug level 2)."""

    __slots__ = ("lock", "idx", "rank", "held")

    def __init__(self, lock, idx: int, held: list):
        self.lock, self.idx, self.rank, self.held = lock, idx, lock_rank(idx), held

    def acquire(self, *args, **kw):
        for other in self.held:
            if (other.rank, other.idx) >= (self.rank, self.idx) or other.rank == 4:
                raise LockOrderError(f"lock {self.idx} (rank {self.rank}) taken while holding "
                                     f"lock {other.idx} (rank {other.rank}): the order is "
                                     f"zone -> keg -> vm (by index within a rank), mailbox "
                                     f"locks are leaves")
        ok = self.lock.acquire(*args, **kw)
        if ok:
            self.held.append(self)
        return ok

    def release(self):
        self.held.remove(self)
        self.lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __getattr__(self, name):
        return getattr(self.lock, name)
