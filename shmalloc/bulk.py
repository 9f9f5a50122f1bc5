"""bulk: many items of a zone in one call (``alloc_bulk``, ``free_bulk``), for a
CPU's cache: the cache's cases a batch at a time (DPDK's mempool bulk calls).

    alloc_bulk  into an empty stack, a whole batch straight from the depot (A1,
                tagged allocated at once: ``_depot_take_all``); else fills (A1,
                A2) until the stack holds ``n``, then hands them out at once;
                with a ctor, M_ZERO or too few items, item by item through the
                alloc path (A3, A4), all or none
    free_bulk   a batch that would overflow the stack straight into the depot
                (F3, as UMA's full free bucket: ``_depot_put_all``); else onto the
                stack in one re-tag (F1), spilling as F3; with a dtor, sleepers or
                a bad handle, item by item through the free path (F2-F6), after
                every handle was checked (all or none)

Lock: none on entry; the depot shortcuts take the zone lock, the rest as the
cache's slow paths.  The functions act for ``cache``, a ``cache.CpuCache``
(reached through its ``alloc_bulk``/``free_bulk``), in its owner thread.
"""

from __future__ import annotations

import operator
import time
from threading import get_ident

from . import layout as L
from .errors import DoubleFreeError
from .flags import M_NOWAIT, M_WAITOK, M_ZERO, check_how

_Z = L.ZONE


def alloc_bulk(cache, n, how=M_NOWAIT, timeout=None):
    """``n`` items for ``cache``'s CPU, all or none: a list, or None when they
    cannot all be had (M_NOWAIT).  With M_WAITOK, waits for each missing item
    (at most ``timeout`` seconds in all).  Lock: none on entry; as ``_fill``."""
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"zone {cache.zone.name!r}: alloc_bulk of {n} items")
    if cache.tid != get_ident() and (other := cache._check_thread()) is not None:
        return other.alloc_bulk(n, how, timeout)
    cache._check_revoked()
    zone = cache.zone
    items = cache.items
    plain = type(how) is int and (how == M_NOWAIT or how == M_WAITOK)
    if not items and n and plain and zone.ctor is None:
        hs = _depot_take_all(cache, n)
        if hs is not None:
            return hs
    while len(items) < n and cache._fill(n - len(items)):
        pass
    if not plain:
        check_how(how, zone.name)
    if zone.ctor is None and not how & M_ZERO and len(items) >= n:
        cut = len(items) - n
        hs, ts = items[cut:], cache.tix[cut:]
        del items[cut:]
        del cache.tix[cut:]
        tags, wa = cache.core.tags, cache.w_alloc
        for t in ts:
            tags[t] = wa
        cache.counts(n, 0)
        hs.reverse()
        return hs
    if len(items) < n and not how & M_WAITOK:
        cache.fails += 1
        cache.publish()
        return None
    out = []
    deadline = None if timeout is None else time.monotonic() + timeout
    for _ in range(n):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            h = cache.alloc(how, left)
        except BaseException:
            free_bulk(cache, out)
            raise
        if h is None:
            free_bulk(cache, out)
            return None
        out.append(h)
    return out


def _depot_take_all(cache, n):
    """A1 for a whole bulk allocation into an empty stack: ``n`` items straight
    from the depot, tagged allocated (the stack would hand them out at once);
    None when the depot has fewer, or mail is waiting (``_fill`` takes it first).
    Lock: takes zone."""
    if cache.arena._mail.pending():
        return None
    lk = cache._zlock()
    try:
        cache.refresh()
        if cache.depot.count() < n:
            return None
        hs, ts = [], []
        cache.depot.take(n, hs, ts, cache.w_alloc)
        cache.depot_gets += 1
    finally:
        lk.release()
    cache.counts(n, 0)
    hs.reverse()
    return hs


def _depot_put_all(cache, hs) -> bool:
    """F3 for a whole batch: items allocated and held here go straight into the
    depot if it has room and the zone no sleepers; False (nothing changed) if
    not, or if one of them is not such an item.  Lock: takes zone."""
    k = len(hs)
    lk = cache._zlock()
    try:
        if cache.core.w[cache.zw + _Z["SLEEPERS"]] or \
                not cache.depot.put_batch(hs, cache.w_alloc, cache.zone.keg):
            return False
        cache.depot_puts += 1
    finally:
        lk.release()
    cache.counts(0, k)
    return True


def free_bulk(cache, handles):
    """Free many items of ``cache``'s zone, each checked as ``free`` checks one, all
    or none.  Lock: none on entry; the depot path takes zone."""
    hs = list(handles)
    if cache.tid != get_ident() and (other := cache._check_thread()) is not None:
        return other.free_bulk(hs)
    zone, core = cache.zone, cache.core
    if zone.dtor is None and not core.w[cache.zw + _Z["SLEEPERS"]]:
        # F1 for the whole batch: every item allocated here and held here, and
        # room in the stack (else F3 spills below), or F3 at once: a batch that
        # would overflow the stack goes to the depot whole, as UMA's full free
        # bucket does.  All or nothing: the tags re-written before a bad handle
        # (or the second listing of one) are put back, and the handle-by-handle
        # path below names the error.
        if cache.bsize and len(cache.items) + len(hs) > 2 * cache.bsize and \
                _depot_put_all(cache, hs):
            return None
        ts = zone.keg.retag(hs, cache.w_alloc, cache.w_cached)
        if len(ts) == len(hs):
            cache.items.extend(hs)
            cache.tix.extend(ts)
            cache.counts(0, len(ts))
            if len(cache.items) > 2 * cache.bsize:
                cache._flush(len(cache.items) - cache.bsize if cache.bsize else len(cache.items))
            return None
        cache._mark(ts, cache.w_alloc)
    if len(set(hs)) != len(hs):
        dup = next(h for h in hs if hs.count(h) > 1)
        raise DoubleFreeError(f"zone {zone.name!r}: free_bulk lists handle {dup} twice")
    checked = [cache._validate_free(h) for h in hs]   # all or nothing: none freed if one is bad
    for h, t, tg in checked:
        cache._free_validated(h, t, tg, None)
    return None
