"""cache: this CPU's bucket cache of one zone (search order step 1; UMA's per-CPU
cache), its fast paths and the slow paths they fall into (cases numbered in ``zone``).

Each process (each *CPU*) keeps, per zone, one private stack of free items: the
alloc bucket at the bottom and the free bucket above it, ``2 * bucket_size`` items
at most (a swap of UMA's two buckets is a no-op here).  The fast paths ``alloc``
and ``free`` (closures, ``_build_fast_paths``) touch only that stack, the item's
tag and two local counters: no lock, no IPC, no shared counter.  Their way out is a
named slow path: ``_alloc_slow`` (A1-A3 through ``_fill``, A4 through ``sleepq``),
``_free_slow``/``_free_item`` (F2 through ``sleepq``, F3 ``_flush``, F4
``_take_over``, F5 ``Zone._raise_bad``, F6 through ``xfree``); ``bulk`` takes the
same steps a batch at a time; ``take_cache_of`` is the keg manager's revocation.

State, private to the owner thread: ``items``/``tix`` (handles and their tag
indexes, oldest first), ``xbatches`` (remote frees per home), the counters that
``publish`` writes, and ``rev`` (the CPU's REVOKES word when the stack last matched
the tags).  Invariants, between two calls of the owner thread:

    len(items) == len(tix);  tags[tix[i]] == tag(CACHED, zidx, cpu, cpu) for each i
        whenever REVOKES == rev (else ``_resync`` makes it so first)
    published CACHED == len(items) + items in xbatches, after ``publish``
    the fast free pushes only while len(items) < 2 * bucket size (as ``refresh``
        last read it); a slow free past it flushes down to one bucket (F3)

Lock: the fast paths take none and serve only the owner thread (another thread is
routed to its own CPU: ``_check_thread``); the slow paths take the zone lock
(``_zlock``: grows the bucket when contended), and the keg lock inside it.
"""

from __future__ import annotations

import time
from threading import get_ident

from . import layout as L
from . import bulk, xfree
from .debug import KILLPOINTS, killpoint
from .depot import Depot
from .errors import ArenaClosedError, ArenaFullError, BadHandleError
from .flags import M_NOWAIT, M_WAITOK, M_ZERO, as_handle, check_how
from .sleepq import SleepQueue

_Z = L.ZONE
_C = L.CPU
_CS = L.CS


def _keep(hs: list, ts: list, tags, tag_word: int) -> None:
    """Filter the parallel lists ``hs``/``ts`` in place to the items tagged
    ``tag_word``, each once (``CpuCache._resync_locked``)."""
    seen = set()
    kh, kt = [], []
    for h, t in zip(hs, ts):
        if tags[t] == tag_word and h not in seen:
            seen.add(h)
            kh.append(h)
            kt.append(t)
    hs[:] = kh
    ts[:] = kt


class CpuCache:
    """This CPU's cache of one zone, and the zone's slow paths (cases A1-A3, F1,
    F3-F5; A4 and F2 through ``sleepq``, F6 through ``xfree``).  Over 400 lines:
    the fast paths' closures and the slow paths they fall into share this CPU's
    private stack and counters, which no other module may touch."""

    def __init__(self, zone, arena):
        self.zone = zone
        self.arena = arena
        core = arena._core
        self.core = core
        self.cpu = arena.cpu_id
        self.items: list[int] = []       # handles, oldest first; top = hottest
        self.tix: list[int] = []         # their tag indexes
        zw = zone._zw
        self.zw = zw
        self.sw = L.cpu_stat_word(self.cpu, zone.id)
        self.w_cached = L.tag(L.TAG_CACHED, zone.zidx, self.cpu, self.cpu)
        self.w_alloc = L.tag(L.TAG_ALLOC, zone.zidx, self.cpu, self.cpu)
        self.w_import = L.tag(L.TAG_IMPORT, zone.zidx, self.cpu, self.cpu)
        self.w_fini = L.tag(L.TAG_FINI, zone.zidx, self.cpu, self.cpu)
        self.rev_w = L.cpu_word(self.cpu) + _C["REVOKES"]
        self.rev = core.w[self.rev_w]    # REVOKES when this cache last matched the tags
        self.fails = self.sleeps = self.depot_gets = self.depot_puts = self.imports = 0
        self.xfrees = self.msgs_sent = self.items_sent = self.fallbacks = 0
        self.xfree_message = bool(core.w[self.zw + _Z["XFREE"]])
        self.xbatches: dict[int, tuple[list, list, float]] = {}   # home -> (hs, ts, since)
        self.depot = Depot(core, zone.id)
        self.sleepq = SleepQueue(core, zone.id, arena._post_wake)
        self._build_fast_paths()
        self.refresh()

    # ================================================================== fast paths
    def _build_fast_paths(self):
        zone, core = self.zone, self.core
        items, tix = self.items, self.tix
        tags, pt, w = core.tags, core.pt, core.w
        kid_bits, offmap = zone.keg.kid_bits, zone.keg.offmap
        dtor = zone.dtor
        mv, size, view_slow = core.mv, zone.size, zone._view_slow
        ctor, ctor_path = zone.ctor, self._ctor_path
        W_ALLOC, W_CACHED = self.w_alloc, self.w_cached
        sleepers_w = self.zw + _Z["SLEEPERS"]
        rev_w = self.rev_w
        alloc_slow, free_slow, free_item = self._alloc_slow, self._free_slow, self._free_item
        tid = -1
        cap = 0
        rev = self.rev
        nallocs = nfrees = 0

        # how values the alloc fast path serves are M_NOWAIT and M_WAITOK (anything
        # else, M_ZERO included, takes _alloc_slow); a ctor runs through _ctor_path.
        # REVOKES unchanged: the keg manager has taken none of the stack's items
        # since the stack last matched the tags (else _alloc_slow resyncs first).
        def alloc(how=M_NOWAIT, timeout=None, arg=None, get_ident=get_ident):
            nonlocal nallocs
            if items and tid == get_ident() and w[rev_w] == rev and (
                    how == M_NOWAIT or how == M_WAITOK):
                tags[tix.pop()] = W_ALLOC
                nallocs += 1
                if ctor is None:
                    return items.pop()
                return ctor_path(items.pop(), arg, how)
            return alloc_slow(how, timeout, arg)

        def free(h, arg=None, get_ident=get_ident):
            nonlocal nfrees
            if tid != get_ident():
                return free_slow(h, arg)
            try:
                b = pt[h >> 12] ^ kid_bits
                t = (b >> 2) + offmap[h - b]
            except (IndexError, TypeError, KeyError):
                return free_slow(h, arg)        # not an item of this keg: the error path
            if tags[t] == W_ALLOC and len(items) < cap and not w[sleepers_w]:
                if dtor is not None:
                    dtor(zone, h, arg)
                tags[t] = W_CACHED
                items.append(h)
                tix.append(t)
                nfrees += 1
                return None
            return free_item(h, t, arg)

        def view(h):
            try:
                b = pt[h >> 12] ^ kid_bits
                if h - b in offmap:
                    return mv[h:h + size]
            except (IndexError, TypeError):
                pass
            return view_slow(h)

        def counts(d_allocs=0, d_frees=0):
            nonlocal nallocs, nfrees
            nallocs += d_allocs
            nfrees += d_frees
            return nallocs, nfrees

        def set_params(new_cap, new_tid):
            nonlocal cap, tid
            cap, tid = new_cap, new_tid
            self.tid = new_tid                  # for the bulk paths

        def set_rev(new_rev):
            nonlocal rev
            rev = self.rev = new_rev

        self.alloc, self.free, self.view = alloc, free, view
        self.counts, self.set_params, self.set_rev = counts, set_params, set_rev
        assert L.PAGE_SHIFT == 12

    def refresh(self):
        """Re-read the zone's bucket size into the fast paths, which serve only
        the thread that owns this CPU.  Lock: none (one word read)."""
        w = self.core.w
        bsize = w[self.zw + _Z["BUCKET_SIZE"]]
        self.bsize = bsize
        usable = not (self.arena._closed or self.arena._forked())
        self.set_params(2 * bsize, self.arena._owner_tid if usable else -1)

    def disable(self):
        """Route every call to the slow path (closed arena, forked child).  Lock: none."""
        self.set_params(0, -1)

    # ================================================================== helpers
    def _check_thread(self, what="alloc", h=None):
        """None in the thread that owns this CPU, else the cache of the calling
        thread's (or forked child's) own CPU; ArenaClosedError after close.
        Lock: none."""
        if self.arena._closed:
            of = "" if h is None else f" of handle {h!r}"
            raise ArenaClosedError(f"zone {self.zone.name!r}: {what}{of} after arena "
                                   f"{self.arena.name!r} was closed in this process")
        if self.arena._owner_tid != get_ident() or self.arena._forked():
            return self.arena._other_thread_zone(self.zone.id)._cache
        return None

    def _zlock(self):
        """Take the zone lock for this CPU, growing the bucket if it was contended;
        returns the lock, for the caller to release.  Lock: takes zone."""
        lk = self.core.lock(self.zone._lock_index)
        lk.acquire(owner_id=self.cpu)
        if lk.contended_last:
            self._grow_bucket()
        return lk

    def _grow_bucket(self):
        """UMA grows the bucket when the zone lock was contended.  Lock: zone."""
        w, zw = self.core.w, self.zw
        if w[zw + _Z["BUCKET_SIZE"]] < w[zw + _Z["BUCKET_MAX"]]:
            w[zw + _Z["BUCKET_SIZE"]] += 1

    def publish(self):
        """Write this CPU's counters for the zone where every process can sum them;
        at debug level 3, check the whole arena (publish ends every slow path).
        Lock: none (this CPU's own stats words; the check takes every lock)."""
        w, sw = self.core.w, self.sw
        if w[self.rev_w] != self.rev and self.tid == get_ident():
            self._resync()
        a, f = self.counts()
        w[sw + _CS["ALLOCS"]] = a
        w[sw + _CS["FREES"]] = f
        w[sw + _CS["FAILS"]] = self.fails
        w[sw + _CS["SLEEPS"]] = self.sleeps
        if w[self.rev_w] == self.rev:
            w[sw + _CS["CACHED"]] = len(self.items) + sum(len(b[0])
                                                          for b in self.xbatches.values())
        else:                   # another thread publishes (check): count, change nothing
            tags, wc = self.core.tags, self.w_cached
            w[sw + _CS["CACHED"]] = len({h for h, t in zip(self.items, self.tix)
                                         if tags[t] == wc}) + sum(
                1 for b in self.xbatches.values() for t in b[1]
                if L.tag_state(tags[t]) == L.TAG_CACHED and L.tag_holder(tags[t]) == self.cpu)
        w[sw + _CS["DEPOT_GETS"]] = self.depot_gets
        w[sw + _CS["DEPOT_PUTS"]] = self.depot_puts
        w[sw + _CS["KEG_IMPORTS"]] = self.imports
        w[sw + _CS["XFREES"]] = self.xfrees
        w[sw + _CS["MSGS_SENT"]] = self.msgs_sent
        w[sw + _CS["ITEMS_SENT"]] = self.items_sent
        w[sw + _CS["FALLBACKS"]] = self.fallbacks
        core = self.core
        if core.debug >= 3 and not core.held and not core.checking and not self.arena._closing:
            core.checking = True
            try:
                self.arena.check()
            finally:
                core.checking = False

    # ================================================================== alloc slow path (A1-A3)
    def _ctor_path(self, h, arg, how):
        """Run the ctor (and M_ZERO) on a freshly popped item; unwind on failure
        as UMA does: zone fini, back to the slab, limit unit returned, a failure
        counted and the allocation not.  Lock: none (the unwind takes zone, keg)."""
        zone = self.zone
        ok = True
        if zone.ctor is not None:
            try:
                ok = zone.ctor(zone, h, arg, how) is not False
            except BaseException:
                self._unwind_ctor(h)
                raise
        if not ok:
            self._unwind_ctor(h)
            return None
        if how & M_ZERO:
            self.core.mv[h:h + zone.size] = bytes(zone.size)
        return h

    def _unwind_ctor(self, h):
        """Undo the allocation of ``h`` after its ctor failed.  Lock: takes zone, keg."""
        self.counts(-1, 0)
        self.fails += 1
        t = self._tag_index(h)
        self._release_to_keg([h], [t], run_fini=True)
        self.publish()

    def _tag_index(self, h):
        """Tag index of item ``h`` of this zone's keg (``Keg.tag_index_of``)."""
        return self.zone.keg.tag_index_of(h)

    def _alloc_slow(self, how, timeout, arg):
        """The alloc fast path's way out (empty stack, another thread, a ctor or
        M_ZERO, a revoked stack): A1-A3 here, M_WAITOK to ``_alloc_waitok``.
        Lock: none on entry; as ``_fill``."""
        other = self._check_thread()
        if other is not None:
            return other.alloc(how, timeout, arg)
        check_how(how, self.zone.name)
        self._check_revoked()
        if how & M_WAITOK:
            return self._alloc_waitok(how, timeout, arg)
        try:
            got = self.items or self._fill()    # a hit with a ctor or M_ZERO, or a refill
        except ArenaFullError:                  # /dev/shm cannot back a new slab
            self.fails += 1
            self.publish()
            raise
        if got:
            return self._pop(how, arg)
        if not self.arena._probing:             # A3 (a probe for a waiting request is not
            self.fails += 1                     # a denied request: see _run_init)
        self.publish()
        return None

    def _pop(self, how, arg):
        """Hand out the item on top of the stack (ctor and M_ZERO as asked).
        Lock: none (the item's tag is this CPU's to write)."""
        h = self.items.pop()
        self.core.tags[self.tix.pop()] = self.w_alloc
        self.counts(1, 0)
        if self.zone.ctor is None and not how & M_ZERO:
            return h
        return self._ctor_path(h, arg, how)

    def _alloc_waitok(self, how, timeout, arg):
        """M_WAITOK: A1/A2 with the zone init allowed to wait (``_run_init``), then
        A4 (``SleepQueue.sleep``).  Waits at most ``timeout`` seconds, and never past the
        deadline of a waiting allocation whose hook called this one (the packet
        init taking a cluster); TimeoutError past it, counted as one failure of
        this zone.  ArenaClosedError when the arena closes meanwhile.  Lock: none
        on entry; as ``_fill`` and ``SleepQueue.sleep``."""
        if timeout is not None and timeout < 0:
            raise ValueError(f"zone {self.zone.name!r}: timeout must be >= 0, not {timeout}")
        arena = self.arena
        deadline = None if timeout is None else time.monotonic() + timeout
        outer = arena._wait_deadline
        if outer is not None and (deadline is None or outer < deadline):
            deadline = outer
        arena._blocked += 1
        try:
            if not (self.items or self._fill(None, how, deadline)):
                self.sleepq.sleep(self, how, deadline)                 # A4
        except (TimeoutError, ArenaFullError):
            self.fails += 1
            self.publish()
            raise
        finally:
            arena._blocked -= 1
        return self._pop(how, arg)

    def _fill(self, want: int | None = None, how: int = M_NOWAIT, deadline=None) -> bool:
        """A1/A2: put a bucket into the empty stack (``want`` items if given).
        True if it holds items now.  ``how`` and ``deadline`` go to the zone init
        (``_run_init``).  Lock: none on entry; takes zone, then keg for A2 (the
        init runs after both are released)."""
        mail = self.arena._mail
        if mail.pending():                  # the home CPU takes its mail first
            mail.collect()
            if self.items and want is None:
                return True
        core, w, zw = self.core, self.core.w, self.zw
        zone = self.zone
        hs, ts = [], []
        lk = self._zlock()
        try:
            self.refresh()
            bsize = max(self.bsize, 1) if want is None else want
            n = self.depot.count()
            if n:                                                   # A1
                k = min(bsize, n)
                self.depot.take(k, hs, ts, self.w_cached)
                self.depot_gets += 1
                self.items[:0] = hs
                self.tix[:0] = ts
                return True
            limit = w[zw + _Z["LIMIT"]]
            k = bsize
            if limit:
                k = min(k, limit - w[zw + _Z["ITEMS"]])
                if k <= 0:
                    return False
            w[zw + _Z["ITEMS"]] += k                                # A2
            if KILLPOINTS:
                killpoint("zone.fill.locked")
            keg = zone.keg
            got = 0
            klk = core.lock(keg.lock_index)
            klk.acquire(owner_id=self.cpu)
            try:
                got = keg.take(k, self.w_import if zone.init else self.w_cached, hs, ts)
            finally:
                klk.release()
                if got < k:
                    w[zw + _Z["ITEMS"]] -= k - got
            if got:
                self.imports += 1
        finally:
            lk.release()
        if zone.init is not None and hs:
            hs, ts = self._run_init(hs, ts, how, deadline)
        self.items[:0] = hs
        self.tix[:0] = ts
        self.publish()
        return bool(hs)

    def _run_init(self, hs, ts, how=M_NOWAIT, deadline=None):
        """Zone init on imported items, outside the locks.  The good ones before
        the first failure are kept; the rest go back to the slab without fini
        (UMA's ``zone_alloc_bucket``).

        Only the first item's init may wait, and only for an M_WAITOK request
        (UMA's import stops blocking once it has an item).  It is first tried
        without waiting, as a probe whose failures in other zones are not counted
        (``arena._probing``): the request has not been denied, it will wait.  If
        the probe fails, the other items go back to the slab at once, so that
        nothing but that item is held while the init waits -- with ``how``, until
        ``deadline`` (``arena._wait_deadline``), in whichever zone it allocates
        from (the packet init sleeps in the cluster zone, and is counted there).
        Lock: none (what goes back takes zone, then keg)."""
        zone = self.zone
        if how & M_WAITOK:
            try:
                ok = self._init_first_waitok(hs, ts, how, deadline)
            except BaseException:
                self._release_to_keg(hs, ts, run_fini=False)
                raise
            if not ok:
                self._release_to_keg(hs, ts, run_fini=False)
                return [], []
            if len(hs) == 1:
                self._mark_cached(ts)
                return hs, ts
        for i, (h, t) in enumerate(zip(hs, ts)):
            if i == 0 and how & M_WAITOK:
                continue                                # inited above
            try:
                ok = zone.init(zone, h, M_NOWAIT) is not False
            except BaseException:
                self._release_to_keg(hs[i:], ts[i:], run_fini=False)
                self._mark_cached(ts[:i])
                self.items[:0] = hs[:i]
                self.tix[:0] = ts[:i]
                self.publish()
                raise
            if not ok:
                self._release_to_keg(hs[i:], ts[i:], run_fini=False)
                hs, ts = hs[:i], ts[:i]
                break
        self._mark_cached(ts)
        return hs, ts

    def _init_first_waitok(self, hs, ts, how, deadline) -> bool:
        """The first item's init for an M_WAITOK request (``_run_init``): a probe
        without waiting, then, if it failed, the other items back to the slab
        (``hs`` and ``ts`` cut to the first) and the init again, allowed to wait.
        A failure or an exception leaves the first item to the caller.  Lock: none
        (what goes back takes zone, then keg)."""
        zone, arena, h = self.zone, self.arena, hs[0]
        arena._probing += 1
        try:
            if zone.init(zone, h, M_NOWAIT) is not False:
                return True
        finally:
            arena._probing -= 1
        self._release_to_keg(hs[1:], ts[1:], run_fini=False)
        del hs[1:], ts[1:]
        outer, arena._wait_deadline = arena._wait_deadline, deadline
        try:
            return zone.init(zone, h, how & ~M_ZERO) is not False
        finally:
            arena._wait_deadline = outer

    def _mark_cached(self, ts):
        """Tag the items ``ts`` cached here.  Lock: none (items this CPU holds)."""
        self._mark(ts, self.w_cached)

    def _mark(self, ts, tag_word):
        """Tag the items ``ts`` (tag indexes) ``tag_word``.  Lock: none (items this
        CPU holds, or the caller holds the lock their state needs)."""
        tags = self.core.tags
        for t in ts:
            tags[t] = tag_word

    def _release_to_keg(self, hs, ts, run_fini: bool):
        """Items this CPU holds go back to their slabs; the limit units are
        returned.  With ``run_fini`` they are tagged FINI (on their way to the
        slab: no longer in a cache) and zone fini runs first, outside the locks;
        without, they are IMPORT items whose init failed.  Lock: none on entry;
        takes zone, then keg (fini runs before, outside them)."""
        if not hs:
            return
        zone, core, tags = self.zone, self.core, self.core.tags
        error = None
        if run_fini:
            wf = self.w_fini
            for t in ts:
                tags[t] = wf
        if run_fini and zone.fini is not None:
            for h in hs:
                if KILLPOINTS:
                    killpoint("release.fini")
                try:
                    zone.fini(zone, h)
                except BaseException as e:      # a broken fini must not strand the batch
                    error = error or e
        lk = self._zlock()
        try:
            klk = core.lock(zone.keg.lock_index)
            klk.acquire(owner_id=self.cpu)
            try:
                zone.keg.give_back(hs, ts)
            finally:
                klk.release()
            core.w[self.zw + _Z["ITEMS"]] -= len(hs)
        finally:
            lk.release()
        if error is not None:
            raise error

    # ================================================================== free slow path (F2-F6)
    def _free_slow(self, h, arg):
        """The free fast path's way out for a call from another thread, or a handle
        that is not an item of this keg: routed, or validated (F5 raises) and
        freed.  Lock: none on entry; as ``_free_validated``."""
        other = self._check_thread("free", h)
        if other is not None:
            return other.free(h, arg)
        h, t, tg = self._validate_free(h)
        return self._free_validated(h, t, tg, arg)

    def _free_item(self, h, t, arg):
        """The free fast path's way out for an item of this keg (tag index ``t``)
        that it cannot take: not ours or not allocated, a full stack, sleepers.
        Lock: none; the calling thread owns this CPU."""
        tg = self.core.tags[t]
        if tg & 0xFF != L.TAG_ALLOC | self.zone.zidx << 4:
            self.zone._raise_bad(h, "free")
        return self._free_validated(h, t, tg, arg)

    def _free_validated(self, h, t, tg, arg):
        """The free slow path (F2-F6) of a validated item with tag ``tg``.  While
        the zone has sleepers this CPU first takes its mail: a drain request
        waiting there gives its cache of the zone back (to them).  Lock: none on
        entry; F4 and F2 take zone, F3 as ``_flush``, F6 as ``xfree.add``."""
        zone, core = self.zone, self.core
        if core.w[self.zw + _Z["SLEEPERS"]] and self.arena._mail.pending():
            self.arena._mail.collect()
        if L.tag_holder(tg) != self.cpu:                            # F4
            tg = self._take_over(h, t, tg)
        home = L.tag_home(tg)
        if home != self.cpu:
            self.xfrees += 1
        if zone.dtor is not None:
            zone.dtor(zone, h, arg)
        w = core.w
        if w[self.zw + _Z["SLEEPERS"]]:                             # F2
            lk = self._zlock()
            try:
                granted = self.sleepq.grant(h, t)
            finally:
                lk.release()
            if granted:
                self.counts(0, 1)
                self.publish()
                return None
        if home != self.cpu and self.xfree_message and home < L.MAX_CPUS:   # F6
            xfree.add(self, h, t, home)
            return None
        core.tags[t] = self.w_cached                                # F3
        self.items.append(h)
        self.tix.append(t)
        self.counts(0, 1)
        self.refresh()
        if len(self.items) > 2 * self.bsize:
            self._flush(max(len(self.items) - self.bsize, 1) if self.bsize else len(self.items))
        self.publish()
        return None

    def _validate_free(self, h):
        """(handle, tag index, tag) of an allocated item of this zone, or raise
        (F5).  Lock: none (a tag read; F4 re-checks it under the zone lock)."""
        zone = self.zone
        h = as_handle(h, zone.name)
        t = zone.keg.tag_index_of(h)
        if t < 0:
            zone._raise_bad(h, "free")
        tg = self.core.tags[t]
        if L.tag_state(tg) != L.TAG_ALLOC or L.tag_zidx(tg) != zone.zidx:
            zone._raise_bad(h, "free")
        return h, t, tg

    def take_over(self, h) -> None:
        """F4's first half alone: allocated item ``h`` becomes this CPU's (from
        whichever CPU holds it, or none), still allocated; its free is then this
        CPU's own.  For storage that its last user is about to forget, then free:
        taken over first, it is never at once forgotten and held by another CPU,
        whose recovery could not tell it from storage still in use.  Raises as
        ``free`` would for an item that is not allocated.  Lock: takes zone when
        another CPU (or none) holds it."""
        core, keg = self.core, self.zone.keg
        try:                            # already allocated here and held here: nothing to do
            b = core.pt[h >> L.PAGE_SHIFT] ^ keg.kid_bits      # Keg.tag_index_of, inlined
            if core.tags[(b >> 2) + keg.offmap[h - b]] == self.w_alloc and \
                    self.tid == get_ident():
                return None
        except (IndexError, TypeError, KeyError):
            pass                        # not an item of this zone's keg: the checks below say why
        if self.tid != get_ident():
            other = self._check_thread("take-over", h)
            if other is not None:
                return other.take_over(h)
        h, t, tg = self._validate_free(h)
        if L.tag_holder(tg) != self.cpu:
            self._take_over(h, t, tg)
        return None

    def _take_over(self, h, t, tg):
        """F4: an item held by another CPU (or by none: its CPU closed) is freed
        here; it becomes this CPU's, keeping its home.  Returns the new tag.
        Lock: takes zone.

        What makes the free legitimate is the state and the zone (still an
        allocated item of this zone) and that no other CPU has claimed it since
        ``tg`` was read: its holder is the same, or nobody -- recovery gives a dead
        CPU's set-aside items to nobody, and a CPU that closes its own, while a
        free of them may be on its way.  Another live holder (a take-over, a
        hand-off received, recovery claiming the item to free it) refuses it."""
        lk = self._zlock()
        try:
            cur = self.core.tags[t]
            holder = L.tag_holder(cur)
            if (cur ^ tg) & 0xFF:
                self.zone._raise_bad(h, "free")
            if holder != L.tag_holder(tg) and holder != L.NO_CPU:
                raise BadHandleError(f"zone {self.zone.name!r}: free of handle {h}: CPU "
                                     f"{holder} claimed the item while this free was under way")
            home = L.tag_home(cur)
            new = L.tag(L.TAG_ALLOC, self.zone.zidx, self.cpu,
                        home if home < L.MAX_CPUS else self.cpu)
            self.core.tags[t] = new
        finally:
            lk.release()
        return new

    def _flush(self, k: int):
        """F3: move the ``k`` oldest cached items to the sleepers, then the depot,
        or to the keg when the depot is full (or caching is off).  The items
        leave the stack under the zone lock, or (no caching) re-tagged FINI
        before any lock is waited for: never cached here yet out of the stack
        while the keg manager might take this CPU's cache (``take_cache_of``).
        Lock: none on entry; takes zone, then keg for what goes to the slabs."""
        if not self.bsize:
            self._check_revoked()
            k = min(k, len(self.items))
            hs, ts = self.items[:k], self.tix[:k]
            del self.items[:k]
            del self.tix[:k]
            self._release_to_keg(hs, ts, run_fini=True)
            return
        lk = self._zlock()
        try:
            if self.core.w[self.rev_w] != self.rev:
                self._resync_locked()
                k = min(k, len(self.items))
            hs, ts = self.items[:k], self.tix[:k]
            del self.items[:k]
            del self.tix[:k]
            while hs and self.core.w[self.zw + _Z["SLEEPERS"]]:
                if not self.sleepq.grant(hs[-1], ts[-1]):
                    break
                hs.pop()
                ts.pop()
            if not hs or self.depot.put(hs, ts):
                self.depot_puts += 1
                return
            self._mark(ts, self.w_fini)             # on their way to the slab
        finally:
            lk.release()
        self._release_to_keg(hs, ts, run_fini=True)

    # ================================================================== remote frees (F6)
    def flush_xfree(self, max_age: float = 0.0):
        """F6: send every remote-free batch older than ``max_age`` seconds
        (``xfree.flush``).  Lock: none on entry; takes zone."""
        xfree.flush(self, max_age)

    def take_home(self, hs, ts):
        """Items tagged CACHED by this CPU go into the cache, a full cache spilling
        to the depot (``xfree.take_home``).  Lock: none on entry."""
        xfree.take_home(self, hs, ts)

    # ================================================================== bulk
    def alloc_bulk(self, n, how=M_NOWAIT, timeout=None):
        """``n`` items, all or none (``bulk.alloc_bulk``)."""
        return bulk.alloc_bulk(self, n, how, timeout)

    def free_bulk(self, handles):
        """Free many items, all or none (``bulk.free_bulk``)."""
        return bulk.free_bulk(self, handles)

    # ================================================================== drain
    def drain_cache(self):
        """Give every cached item back (depot first, else keg).  Lock: none on
        entry; as ``_flush``."""
        self._check_revoked()
        if self.items:
            self._flush(len(self.items))
        self.publish()

    def drain_depot(self, keep: int = 0):
        """Depot buckets beyond ``keep`` items go back to the keg (zone fini);
        then the keg's free slabs go back to the arena.  Returns slabs released.
        Lock: none on entry; takes zone, then keg (and vm, inside it)."""
        core = self.core
        hs, ts = [], []
        lk = self._zlock()
        try:
            # tagged CACHED by this CPU until they reach the slab
            self.depot.trim(keep, hs, ts, self.w_cached)
        finally:
            lk.release()
        self._release_to_keg(hs, ts, run_fini=True)
        keg = self.zone.keg
        klk = core.lock(keg.lock_index)
        klk.acquire(owner_id=self.cpu)
        try:
            released = keg.drain()
        finally:
            klk.release()
        self.refresh()
        return released

    # ================================================================== revocation
    def _check_revoked(self) -> None:
        """Resync the stack if the keg manager took items of this CPU's caches
        since it last matched the tags.  The owner thread.  Lock: none on entry;
        takes zone to resync."""
        if self.core.w[self.rev_w] != self.rev:
            self._resync()

    def _resync(self) -> None:
        """``_resync_locked`` under the zone lock.  Lock: takes zone."""
        lk = self._zlock()
        try:
            self._resync_locked()
        finally:
            lk.release()

    def _resync_locked(self) -> None:
        """Keep in the stack, and in the remote-free batches, only the items whose
        tags still say this CPU caches them, each once (an item taken by the keg
        manager may have come back since, received and freed here: its old entry
        and the new one name the same item).  Lock: zone; the owner thread.

        Every path of this CPU that holds cached items outside these lists while
        it waits for a lock does so under the zone lock (``_flush``,
        ``xfree.send``) or has re-tagged them first (FINI: ``_release_to_keg``),
        so the keg manager, which takes items under the zone lock, finds in the
        tags only what these lists name."""
        core, tags = self.core, self.core.tags
        rev = core.w[self.rev_w]
        _keep(self.items, self.tix, tags, self.w_cached)
        for home, (hs, ts, _) in list(self.xbatches.items()):
            _keep(hs, ts, tags, L.tag(L.TAG_CACHED, self.zone.zidx, self.cpu, home))
            if not hs:
                del self.xbatches[home]
        self.set_rev(rev)

    def take_cache_of(self, cpu: int) -> int:
        """Take CPU ``cpu``'s cached items of this zone (its stack and its
        remote-free batches, as the tags name them) into this CPU's cache: the
        keg manager, on behalf of a sleeper, from a CPU that left a drain request
        unanswered.  The victim's REVOKES word moves with them, so that its next
        alloc (the fast path reads it) or slow path first resyncs its stack from
        the tags (``_resync``).  Returns how many were taken.

        The one race left: an alloc fast path of the victim already past its
        REVOKES read when the tags change; the manager leaves a CPU ``GRACE``
        seconds (and never takes from a stopped process), and any call of the
        victim into this zone's slow paths, or its recv or poll, answers the
        request first.  Lock: takes zone (and keg, to list the slabs)."""
        core, keg, zidx = self.core, self.zone.keg, self.zone.zidx
        tags, w = core.tags, core.w
        hs, ts = [], []
        lk = self._zlock()
        try:
            cw = L.cpu_word(cpu)        # an item granted to it, not yet picked up: its
            granted = w[cw + _C["GRANT_T"]] if w[cw + _C["GRANT_ZONE"]] == self.zone.id + 1 \
                else -1                 # sleep loop takes it under this lock, leave it
            found = [(h, ti, tv) for h, ti, tv in keg.items(
                keg.slab_bases_locked(self.cpu), zidx=zidx, holder=cpu, states=(L.TAG_CACHED,))
                if ti != granted]
            if found:       # first: killed half-way, the victim still resyncs
                w[L.cpu_word(cpu) + _C["REVOKES"]] += 1
            for h, ti, tv in found:
                if tags[ti] == tv:
                    tags[ti] = self.w_cached
                    hs.append(h)
                    ts.append(ti)
            if found:
                w[L.cpu_stat_word(cpu, self.zone.id) + _CS["CACHED"]] = 0
        finally:
            lk.release()
        if hs:
            self.take_home(hs, ts)
        return len(hs)
