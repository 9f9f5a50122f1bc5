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
