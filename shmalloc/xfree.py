"""xfree: cross-CPU frees sent home by mail (case F6; snmalloc's remote frees).

An item freed by a CPU that is not its home (the CPU that took it from the keg or
the depot), in a zone made with ``xfree="message"``, is not cached by the freeing
CPU: it joins a batch for its home (``add``), tagged CACHED by the freeing CPU with
the home as home, and the batch goes home in one message (``send``) when it fills
(``XFREE_BATCH`` items), when it is older than ``XFREE_DELAY`` at the next free, and
on ``flush`` (poll, close, sleep, drain).  The home takes its mail before it takes
the zone lock, and the items come into its cache (``take_home``).  When the home is
gone or its mailbox full, the sender keeps the items itself (UMA's free-anywhere:
a fallback, counted).

Tag states (``layout``): CACHED (batched here, home named) -> XFREE (in the home's
mailbox, under its mailbox lock) -> CACHED by the home (taken from the mail).

Invariant (per CPU, whenever its zone lock is free): the items tagged CACHED by it
with another home are exactly those its batches (``CpuCache.xbatches``) list; the
keg manager may take them (``CpuCache.take_cache_of``), which the batches learn
from the tags (``CpuCache._resync_locked``).

Lock: ``send`` takes the zone lock and the home's mailbox lock inside it; the rest
take none but what the cache's overflow path takes (``take_home``).  The functions
act for ``cache``, a ``cache.CpuCache``, in its owner thread.
"""

from __future__ import annotations

import time

from . import layout as L
from .mail import MSG_XFREE

XFREE_DELAY = 0.005            # a remote-free batch waits at most this long (at the next free)
XFREE_BATCH = 64               # items per remote-free message, whatever the bucket size


def add(cache, h: int, t: int, home: int) -> None:
    """F6: batch item ``h`` (tag index ``t``), freed here, for its ``home``; sent
    when the batch fills, or when it is older than XFREE_DELAY.  Lock: none
    (``send`` takes the zone's)."""
    cache.core.tags[t] = L.tag(L.TAG_CACHED, cache.zone.zidx, cache.cpu, home)
    now = time.monotonic()
    batch = cache.xbatches.get(home)
    if batch is None:
        batch = cache.xbatches[home] = ([], [], now)
    batch[0].append(h)
    batch[1].append(t)
    cache.counts(0, 1)
    if len(batch[0]) >= XFREE_BATCH or now - batch[2] > XFREE_DELAY:
        send(cache, home)                       # publishes


def send(cache, home: int) -> None:
    """Send the batch for ``home``.  Under the zone lock (the mailbox lock, a
    leaf, inside it): the batch is never out of ``xbatches`` yet still cached
    here while the keg manager could take it.  Lock: takes zone."""
    zone = cache.zone
    lk = cache._zlock()
    try:
        if cache.core.w[cache.rev_w] != cache.rev:
            cache._resync_locked()
        batch = cache.xbatches.pop(home, None)
        if batch is None:                       # taken by the keg manager meanwhile
            return
        hs, ts, _ = batch
        sent = cache.arena._mail.post(home, MSG_XFREE, [(zone.id, zone.zidx, hs, ts)],
                                      L.TAG_XFREE)
    finally:
        lk.release()
    if sent:
        cache.msgs_sent += 1
        cache.items_sent += len(hs)
    else:                       # home gone or its mailbox full: free here (UMA's way)
        cache.fallbacks += 1
        cache._mark_cached(ts)
        take_home(cache, hs, ts)
    cache.publish()


def flush(cache, max_age: float = 0.0) -> None:
    """Send every batch older than ``max_age`` seconds.  Lock: none (``send``
    takes the zone's)."""
    cache._check_revoked()
    now = time.monotonic()
    for home in [h for h, b in cache.xbatches.items() if now - b[2] >= max_age]:
        send(cache, home)


def take_home(cache, hs, ts) -> None:
    """Items tagged CACHED by ``cache``'s CPU (its own, back from a remote free,
    or a batch that could not be sent; or items taken for it: recovery,
    ``take_cache_of``) go into its cache; a full cache spills to the depot (F3).
    Lock: none (the spill takes the zone's)."""
    cache.items.extend(hs)
    cache.tix.extend(ts)
    cache.refresh()
    if len(cache.items) > 2 * cache.bsize:
        cache._flush(len(cache.items) - cache.bsize if cache.bsize else len(cache.items))
    cache.publish()
