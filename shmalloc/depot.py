"""depot: a zone's depot of full buckets in shared memory (search order step 2;
UMA's bucket cache, its fetch and put of a bucket).

The depot is one LIFO stack of items per zone, shared by every CPU: a CPU whose
cache runs dry takes a bucket's worth from its top (case A1), a CPU whose cache
overflows puts its oldest items there (case F3), and a bulk call moves a whole
batch at once.  Its words, in pages of the arena (``layout``, "depot"):

    zone record   DEPOT_OFF (byte offset of the stack)  DEPOT_CAP  DEPOT_N
                  IMIN  IMAX (the working set since the last trim)
    stack         handles int64[DEPOT_CAP], then their tag indexes int64[DEPOT_CAP];
                  entries [0, DEPOT_N) are in use, the top is DEPOT_N - 1

Invariants, whenever the zone lock is free (``check`` executes the first three):

    0 <= DEPOT_N <= DEPOT_CAP
    DEPOT_N == items of the zone tagged DEPOT
    the stack lists exactly those items, each once, with its own tag index
    IMIN <= DEPOT_N <= IMAX

Working set (UMA's ``uz_imin``/``uz_imax``): a take lowers IMIN to what is left, an
append raises IMAX to what is there, a trim (``Depot.trim``) starts a new period
at the current count; the supervisor's trim keeps ``IMAX - IMIN``, smoothed.

Lock: every method needs the zone lock held on entry and on return (``Lock:
zone``) and takes none; the callers (``cache``, ``recovery``, ``check``) take it.
"""

from __future__ import annotations

from array import array

from . import layout as L
from .debug import KILLPOINTS, killpoint

_Z = L.ZONE


class Depot:
    """The depot of zone ``zone_id``."""

    __slots__ = ("core", "zw", "lock_index", "w_depot")

    def __init__(self, core, zone_id: int):
        self.core = core
        self.zw = L.zone_word(zone_id)
        self.lock_index = L.zone_lock_index(zone_id)
        self.w_depot = L.tag(L.TAG_DEPOT, core.w[self.zw + _Z["ZIDX"]])   # every item's tag

    def count(self) -> int:
        """DEPOT_N: items in the depot.  Lock: zone (or a peek, as ``room``)."""
        return self.core.w[self.zw + _Z["DEPOT_N"]]

    def take(self, k: int, hs: list, ts: list, tag_word: int) -> None:
        """Pop the ``k`` items on top (``k <= count()``) onto ``hs``/``ts``, tagged
        ``tag_word`` (cached by the taker, or allocated for a bulk alloc); IMIN
        follows.  Lock: zone."""
        self.core.assert_held(self.lock_index)
        w, zw = self.core.w, self.zw
        n = w[zw + _Z["DEPOT_N"]]
        cap = w[zw + _Z["DEPOT_CAP"]]
        d0 = w[zw + _Z["DEPOT_OFF"]] >> 3
        hs.extend(w[d0 + n - k:d0 + n])
        ts.extend(w[d0 + cap + n - k:d0 + cap + n])
        tags = self.core.tags
        for t in ts:
            tags[t] = tag_word
        w[zw + _Z["DEPOT_N"]] = n - k
        if n - k < w[zw + _Z["IMIN"]]:
            w[zw + _Z["IMIN"]] = n - k

    def put(self, hs, ts) -> bool:
        """Push items (held by the caller, its cached ones) tagged DEPOT if they
        all fit; False, nothing changed, if not.  Lock: zone."""
        self.core.assert_held(self.lock_index)
        w, zw, tags = self.core.w, self.zw, self.core.tags
        n = w[zw + _Z["DEPOT_N"]]
        cap = w[zw + _Z["DEPOT_CAP"]]
        if n + len(hs) > cap:
            return False
        wd = self.w_depot
        for t in ts:
            tags[t] = wd
            if KILLPOINTS:
                killpoint("depot.put")
        self.append(n, cap, hs, ts)
        return True

    def put_batch(self, hs, old: int, keg) -> bool:
        """Push items ``hs`` (handles), each an item of ``keg`` tagged ``old``,
        re-tagged DEPOT, if they all fit and all are such items; False, nothing
        changed, if not (a bad handle, or one listed twice, stops the re-tag,
        which is undone).  Lock: zone."""
        w, zw = self.core.w, self.zw
        k = len(hs)
        n, cap = w[zw + _Z["DEPOT_N"]], w[zw + _Z["DEPOT_CAP"]]
        if n + k > cap:
            return False
        ts = keg.retag(hs, old, self.w_depot)
        if len(ts) < k:
            tags = self.core.tags
            for t in ts:
                tags[t] = old
            return False
        self.append(n, cap, hs, ts)
        return True

    def append(self, n: int, cap: int, hs, ts) -> None:
        """Write items already tagged DEPOT above the ``n`` items of a depot of
        ``cap`` entries (both as just read); IMAX follows.  Lock: zone."""
        w, zw, k = self.core.w, self.zw, len(hs)
        d0 = w[zw + _Z["DEPOT_OFF"]] >> 3
        w[d0 + n:d0 + n + k] = array("q", hs)
        w[d0 + cap + n:d0 + cap + n + k] = array("q", ts)
        w[zw + _Z["DEPOT_N"]] = n + k
        if n + k > w[zw + _Z["IMAX"]]:
            w[zw + _Z["IMAX"]] = n + k

    def working_set(self) -> int:
        """UMA's ``zone_trim`` estimate: the items the depot went between in the
        period now ending (IMAX - IMIN), smoothed 4:1 into WSS; returns WSS, what a
        trim keeps.  Lock: zone."""
        w, zw = self.core.w, self.zw
        wss = w[zw + _Z["IMAX"]] - w[zw + _Z["IMIN"]]
        w[zw + _Z["WSS"]] = (4 * wss + w[zw + _Z["WSS"]]) // 5
        return w[zw + _Z["WSS"]]

    def trim(self, keep: int, hs: list, ts: list, tag_word: int) -> None:
        """The depot's share of a drain: the items beyond ``keep`` onto ``hs``/``ts``
        tagged ``tag_word`` (the drainer's cached items, for it to give back to
        the keg), a new working-set period, and the bucket size one smaller (UMA
        shrinks it under memory pressure), not below BUCKET_MIN.  Lock: zone."""
        w, zw = self.core.w, self.zw
        n = w[zw + _Z["DEPOT_N"]]
        if n > keep:
            self.take(n - keep, hs, ts, tag_word)
        w[zw + _Z["IMAX"]] = w[zw + _Z["IMIN"]] = w[zw + _Z["DEPOT_N"]]
        if w[zw + _Z["BUCKET_SIZE"]] > w[zw + _Z["BUCKET_MIN"]]:
            w[zw + _Z["BUCKET_SIZE"]] -= 1

    def contents(self) -> tuple[list[int], list[int]] | None:
        """(handles, tag indexes) of the items the stack lists, bottom first, or
        None when DEPOT_N is outside ``0..DEPOT_CAP``.  Lock: zone."""
        w, zw = self.core.w, self.zw
        n, cap = w[zw + _Z["DEPOT_N"]], w[zw + _Z["DEPOT_CAP"]]
        if not 0 <= n <= cap:
            return None
        d0 = w[zw + _Z["DEPOT_OFF"]] >> 3
        return list(w[d0:d0 + n]), list(w[d0 + cap:d0 + cap + n])

    def rebuild(self, hs, ts) -> None:
        """Make the stack list exactly ``hs``/``ts`` (the items found tagged DEPOT,
        after a dead lock holder), at most DEPOT_CAP of them, and start a new
        working-set period.  Lock: zone (repaired)."""
        w, zw = self.core.w, self.zw
        cap = w[zw + _Z["DEPOT_CAP"]]
        d0 = w[zw + _Z["DEPOT_OFF"]] >> 3
        hs, ts = hs[:cap], ts[:cap]            # cannot exceed: the depot never held more
        w[d0:d0 + len(hs)] = array("q", hs)
        w[d0 + cap:d0 + cap + len(ts)] = array("q", ts)
        w[zw + _Z["DEPOT_N"]] = len(hs)
        w[zw + _Z["IMAX"]] = w[zw + _Z["IMIN"]] = len(hs)
