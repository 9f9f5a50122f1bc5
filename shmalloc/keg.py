"""keg: slabs of items (search order step 3), and the one module that moves
slabs between lists.

A keg describes items of one size and layout; one or more zones sit on it (the
primary zone, then secondary zones such as ``mbuf_packet``).  Its slabs are runs
of ``ppera`` pages holding ``ipers`` items followed by a header, the item tags
and, for REFCNT kegs, one 32-bit refcount trailer per item (``layout``).

Slab lists and their transitions (rule numbers are referred to in the code):

    list      invariant                       enters when
    partial   0 < free < ipers                R1 new slab, first item taken (from free)
                                              R2 an item comes back to a full slab
    full      free == 0                       R3 the last free item is taken
    free      free == ipers                   R4 the last taken item comes back
    (pages)   -                               R5 drain: free slabs go back to the vm

Allocation takes from the head of the partial list, then the free list, then a
new slab (UMA's ``keg_fetch_slab``), lowest free index first within a slab.

Items and their tags: this module alone turns a handle into its tag's index and
back (``tag_index_of``, ``handle_of``), and every walk over item tags goes through
``items`` (filtered by zone index, holder, state), ``held_by``, ``tags_of`` or
``tag_counts``; only the fast paths inline the arithmetic (``offmap``).

Lock: every method that touches slabs needs this keg's lock held on entry and on
return (``Lock: keg``); ``new_slab`` and ``drain`` take the vm lock inside it
(lock order zone -> keg -> vm).
"""

from __future__ import annotations

from collections import Counter

from . import layout as L
from .debug import KILLPOINTS, killpoint
from .errors import ArenaFullError, CorruptionError

_K = L.KEG
_S = L.SLAB
_ZERO_TAG = b"\0\0\0\0"
TAG_LINE = 64                   # bytes in a CPU cache line
_ZERO_LINE = bytes(TAG_LINE)
_TAG_ZIDX = L.tag(0, 0xF, 0, 0)      # the zone-index bits of a tag
_TAG_HOLDER = L.tag(0, 0, 0xFF, 0)  # its holder bits


class Keg:
    """This process's view of one keg record."""

    __slots__ = ("core", "id", "kw", "size", "rsize", "ipers", "ppera", "hdroff",
                 "tagoff", "rcoff", "refcnt", "nofree", "slab_bytes", "offmap", "lock_index",
                 "kid_bits")

    def __init__(self, core, keg_id: int):
        self.core = core
        self.id = keg_id
        self.kw = L.keg_word(keg_id)
        w = core.w
        kw = self.kw
        self.size = w[kw + _K["SIZE"]]
        self.rsize = w[kw + _K["RSIZE"]]
        self.ipers = w[kw + _K["IPERS"]]
        self.ppera = w[kw + _K["PPERA"]]
        self.hdroff = w[kw + _K["HDROFF"]]
        self.tagoff = w[kw + _K["TAGOFF"]]
        self.rcoff = w[kw + _K["RCOFF"]]
        flags = w[kw + _K["FLAGS"]]
        self.refcnt = bool(flags & L.KF_REFCNT)
        self.nofree = bool(flags & L.KF_NOFREE)
        self.slab_bytes = self.ppera * L.PAGE_SIZE
        self.lock_index = L.keg_lock_index(keg_id)
        self.kid_bits = keg_id << L.KEG_ID_SHIFT
        # offset of an item in its slab -> index of its tag relative to (slab base >> 2)
        t0 = self.tagoff >> 2
        self.offmap = {i * self.rsize: t0 + i for i in range(self.ipers)}

    # ---------------------------------------------------------------- creation
    @staticmethod
    def format(core, keg_id: int, size: int, align: int, refcnt: bool, nofree: bool) -> None:
        """Fill a free keg record.  Lock: vm (the arena's tables)."""
        rsize = L.round_up(max(size, 1), align)
        max_pages = max(1, core.geometry.data_pages // 8)
        ppera, ipers, hdroff = L.keg_layout(rsize, refcnt, max_pages)
        w = core.w
        kw = L.keg_word(keg_id)
        w[kw:kw + L.KEG_WORDS] = core.zero_words(L.KEG_WORDS)
        tagoff = hdroff + L.SLAB_HDR_BYTES
        w[kw + _K["SIZE"]] = size
        w[kw + _K["RSIZE"]] = rsize
        w[kw + _K["ALIGN"]] = align
        w[kw + _K["IPERS"]] = ipers
        w[kw + _K["PPERA"]] = ppera
        w[kw + _K["HDROFF"]] = hdroff
        w[kw + _K["TAGOFF"]] = tagoff
        w[kw + _K["RCOFF"]] = tagoff + 4 * ipers if refcnt else -1
        for head in L.LIST_HEAD.values():
            w[kw + head] = L.NIL
        w[kw + _K["FLAGS"]] = L.KF_LIVE | (L.KF_REFCNT if refcnt else 0) | (
            L.KF_NOFREE if nofree else 0)

    # ---------------------------------------------------------------- addressing
    def slab_of(self, h: int) -> int:
        """Slab base of handle ``h`` if it is an item of this keg, else -1."""
        if h < 0 or h >= self.core.geometry.size:
            return -1
        b = self.core.pt[h >> L.PAGE_SHIFT] ^ self.kid_bits
        return b if (h - b) in self.offmap else -1

    # The check of a batch of handles: handles of one slab (as a bucket's mostly
    # are) share one page-table read, for a slab's pages are contiguous and all map
    # to its base.  ``h >> PAGE_SHIFT`` also refuses a handle that is not an int
    # (a float equal to an item's offset would pass the offset map).
    def tag_indexes(self, hs) -> list[int]:
        """The tag index of every handle in ``hs``, each an int handle of an item
        of this keg, else KeyError (not an item of this keg), IndexError (past
        the arena) or TypeError (not an int)."""
        pt, kid_bits, offmap, ppera = self.core.pt, self.kid_bits, self.offmap, self.ppera
        ts = []
        append = ts.append
        p_lo = p_hi = base = t0 = 0             # the last slab read: pages [p_lo, p_hi)
        for h in hs:
            p = h >> L.PAGE_SHIFT
            if not p_lo <= p < p_hi:
                base = pt[p] ^ kid_bits         # huge unless a slab of this keg
                p_lo = base >> L.PAGE_SHIFT
                p_hi = p_lo + ppera
                t0 = base >> 2
            append(t0 + offmap[h - base])
        return ts

    def retag(self, hs, old: int, new: int) -> list[int]:
        """Tag ``new`` the items ``hs`` (handles) that are items of this keg tagged
        ``old``, in order, up to the first that is not (or whose tag was already
        changed: a handle listed twice); the tag indexes of those re-tagged.
        Lock: the tags are the caller's to write (it holds the items, or they are
        in flight to it and it holds its mailbox lock)."""
        pt, kid_bits, offmap, ppera = self.core.pt, self.kid_bits, self.offmap, self.ppera
        tags = self.core.tags
        ts = []
        append = ts.append
        p_lo = p_hi = base = t0 = 0
        try:
            for h in hs:
                p = h >> L.PAGE_SHIFT
                if not p_lo <= p < p_hi:
                    base = pt[p] ^ kid_bits
                    p_lo = base >> L.PAGE_SHIFT
                    p_hi = p_lo + ppera
                    t0 = base >> 2
                t = t0 + offmap[h - base]
                if tags[t] != old:
                    break
                tags[t] = new
                append(t)
        except (IndexError, TypeError, KeyError):
            pass
        return ts

    def tag_index(self, base: int, i: int) -> int:
        """Tag index of item ``i`` of the slab at ``base``.  Lock: none."""
        return ((base + self.tagoff) >> 2) + i

    def ref_index(self, h: int) -> int:
        """Index (in the u32 view) of the refcount trailer of item ``h``."""
        b = self.core.pt[h >> L.PAGE_SHIFT] ^ self.kid_bits
        return ((b + self.rcoff) >> 2) + (h - b) // self.rsize

    def item(self, base: int, i: int) -> int:
        return base + i * self.rsize

    # ---------------------------------------------------------------- lists (rules R1-R5)
    def _sw(self, base: int) -> int:
        return (base + self.hdroff) >> 3

    def _unlink(self, base: int) -> None:
        w = self.core.w
        sw = self._sw(base)
        prev, nxt = w[sw + _S["PREV"]], w[sw + _S["NEXT"]]
        if prev == L.NIL:
            w[self.kw + L.LIST_HEAD[w[sw + _S["LIST"]]]] = nxt
        else:
            w[self._sw(prev) + _S["NEXT"]] = nxt
        if nxt != L.NIL:
            w[self._sw(nxt) + _S["PREV"]] = prev

    def _push(self, base: int, lst: int) -> None:
        w = self.core.w
        sw = self._sw(base)
        head = self.kw + L.LIST_HEAD[lst]
        old = w[head]
        w[sw + _S["LIST"]] = lst
        w[sw + _S["PREV"]] = L.NIL
        w[sw + _S["NEXT"]] = old
        if old != L.NIL:
            w[self._sw(old) + _S["PREV"]] = base
        w[head] = base

    def _move(self, base: int, lst: int) -> None:
        self._unlink(base)
        self._push(base, lst)

    def _list_for(self, free: int) -> int:
        if free == 0:
            return L.LIST_FULL
        if free == self.ipers:
            return L.LIST_FREE
        return L.LIST_PARTIAL

    def new_slab(self) -> int:
        """Take pages for a slab and put it on the free list; -1 if the arena is full.
        Lock: keg (takes vm)."""
        core = self.core
        with core.lock(L.VM_LOCK):
            base = core.vm.reserve_run(self.ppera)
        if base < 0:
            return -1
        w = core.w
        sw = self._sw(base)
        w[sw:sw + L.SLAB_HDR_WORDS] = core.zero_words(L.SLAB_HDR_WORDS)
        w[sw + _S["KEG"]] = self.id
        w[sw + _S["FREE"]] = self.ipers
        t0 = (base + self.tagoff)
        core.mv[t0:t0 + 4 * self.ipers] = bytes(4 * self.ipers)
        if self.refcnt:
            r0 = base + self.rcoff
            core.mv[r0:r0 + 4 * self.ipers] = bytes(4 * self.ipers)
        with core.lock(L.VM_LOCK):
            core.vm.map_run(base, self.ppera, self.id)
        self._push(base, L.LIST_FREE)
        w[self.kw + _K["PAGES"]] += self.ppera
        w[self.kw + _K["NSLABS"]] += 1
        w[self.kw + _K["FREE_ITEMS"]] += self.ipers
        return base

    def take(self, n: int, tag_word: int, hs: list, ts: list) -> int:
        """Take up to ``n`` free items, tag them ``tag_word`` and append their
        handles and tag indexes to ``hs``/``ts``.  Returns how many were taken
        (fewer when the arena has no pages left).  ArenaFullError when it took
        none because ``/dev/shm`` has no room for a new slab.  Lock: keg."""
        self.core.assert_held(self.lock_index)
        core = self.core
        w, tags, buf = core.w, core.tags, core.buf
        kw = self.kw
        got = 0
        while got < n:
            base = w[kw + _K["HEAD_PARTIAL"]]
            if base == L.NIL:
                base = w[kw + _K["HEAD_FREE"]]
                if base == L.NIL:
                    try:
                        base = self.new_slab()
                    except ArenaFullError:      # /dev/shm is full: what was taken stands
                        if got:
                            break
                        raise
                    if base < 0:
                        break
            sw = self._sw(base)
            free = w[sw + _S["FREE"]]
            t_lo = base + self.tagoff
            t_end = t_lo + 4 * self.ipers
            first = self._free_tag(buf, t_lo + 4 * w[sw + _S["HINT"]], t_end)
            if first < 0:
                raise CorruptionError(f"keg {self.id}: slab {base} counts {free} free "
                                      f"items but its tags have no more")
            start = self._fresh_line(buf, first, t_lo, t_end)
            k = min(n - got, free)
            ti0 = t_lo >> 2
            taken = 0
            after = start                   # just past the last item taken
            # from a fresh tag line on, then (only if that ran out) the free items
            # skipped before it
            for pos, end in ((start, t_end), (first, start)):
                while taken < k:
                    pos = buf.find(_ZERO_TAG, pos, end)      # as in _free_tag
                    if pos < 0:
                        break
                    pos = (pos + 3) & -4                     # tags are 4-aligned
                    after = pos + 4
                    ti = pos >> 2
                    tags[ti] = tag_word
                    if KILLPOINTS:
                        killpoint("keg.take")
                    hs.append(base + (ti - ti0) * self.rsize)
                    ts.append(ti)
                    pos += 4
                    taken += 1
            if taken < k:
                raise CorruptionError(f"keg {self.id}: slab {base} counts {free} free "
                                      f"items but its tags have no more")
            got += k
            free -= k
            w[sw + _S["FREE"]] = free
            # the lowest free item is at or after the hint
            w[sw + _S["HINT"]] = ((after if start == first else first) - t_lo) >> 2
            w[kw + _K["FREE_ITEMS"]] -= k
            self._move(base, self._list_for(free))      # R1, R3
        return got

    @staticmethod
    def _free_tag(buf, pos: int, end: int) -> int:
        """Byte offset of the first free (zero) tag in ``[pos, end)``, else -1.  A
        taken tag's low byte is never zero (its state is not 0), so four zero bytes
        found at any offset reach into the low byte of a free tag; tags are 4-byte
        aligned in the segment."""
        pos = buf.find(_ZERO_TAG, pos, end)
        return pos if pos < 0 else (pos + 3) & -4

    @staticmethod
    def _fresh_line(buf, first: int, t_lo: int, t_end: int) -> int:
        """Where a bucket fill starts: at the free tag ``first`` if no taken tag
        shares its cache line, else at the first tag line of the slab that is all
        free, if any.  So two CPUs' fills do not put their items' tags, written on
        every alloc and free, in one cache line (false sharing between cores)."""
        line = first & -TAG_LINE
        lo, hi = max(line, t_lo), min(line + TAG_LINE, t_end)
        if buf[lo:hi] == _ZERO_LINE[:hi - lo]:
            return first
        q = line + TAG_LINE
        while q + TAG_LINE <= t_end:
            q = buf.find(_ZERO_LINE, q, t_end)
            if q < 0:
                break
            a = -(-q // TAG_LINE) * TAG_LINE
            if a + TAG_LINE <= t_end and buf[a:a + TAG_LINE] == _ZERO_LINE:
                return a
            q = a
        return first

    def give_back(self, hs, ts) -> None:
        """Return items (handles and their tag indexes) to their slabs.
        Lock: keg."""
        self.core.assert_held(self.lock_index)
        core = self.core
        w, tags, pt = core.w, core.tags, core.pt
        kid_bits = self.kid_bits
        for h, ti in zip(hs, ts):
            base = pt[h >> L.PAGE_SHIFT] ^ kid_bits
            sw = self._sw(base)
            tags[ti] = L.TAG_FREE
            i = (h - base) // self.rsize
            if i < w[sw + _S["HINT"]]:
                w[sw + _S["HINT"]] = i
            free = w[sw + _S["FREE"]] + 1
            w[sw + _S["FREE"]] = free
            if free == 1 or free == self.ipers:
                self._move(base, self._list_for(free))  # R2, R4
        w[self.kw + _K["FREE_ITEMS"]] += len(hs)

    def drain(self, keep_slabs: int = 0) -> int:
        """Give free slabs back to the vm, keeping ``keep_slabs``.  Returns slabs
        released.  Lock: keg (takes vm)."""
        self.core.assert_held(self.lock_index)
        if self.nofree:
            return 0
        core = self.core
        w, kw = core.w, self.kw
        victims = []
        base = w[kw + _K["HEAD_FREE"]]
        while base != L.NIL:
            victims.append(base)
            base = w[self._sw(base) + _S["NEXT"]]
        victims = victims[keep_slabs:]
        for base in victims:                            # R5
            self._unlink(base)
        if victims:
            with core.lock(L.VM_LOCK):
                for base in victims:
                    core.vm.free_run(base, self.ppera)
        n = len(victims)
        w[kw + _K["PAGES"]] -= n * self.ppera
        w[kw + _K["NSLABS"]] -= n
        w[kw + _K["FREE_ITEMS"]] -= n * self.ipers
        w[kw + _K["SLABS_FREED"]] += n
        return n

    # ---------------------------------------------------------------- walking
    def slabs(self):
        """Yield (list, base) for every slab.  Lock: keg."""
        w = self.core.w
        for lst, head in L.LIST_HEAD.items():
            base = w[self.kw + head]
            seen = 0
            while base != L.NIL:
                yield lst, base
                base = w[self._sw(base) + _S["NEXT"]]
                seen += 1
                if seen > self.core.geometry.npages:
                    raise RuntimeError(f"keg {self.id}: slab list {lst} has a cycle")

    def slab_bases_locked(self, owner_id: int) -> list[int]:
        """The base of every slab, read from the slab lists under the keg lock
        (taken here): a slab mapped later holds no item out of it yet, and one
        unmapped later held none.  Lock: takes keg (after zone, if held)."""
        lk = self.core.lock(self.lock_index)
        lk.acquire(owner_id=owner_id)
        try:
            return [base for _, base in self.slabs()]
        finally:
            lk.release()

    def slab_bases(self) -> list[int]:
        """The base of every slab, read from the page table, not the slab lists.
        Lock: none -- a slab is mapped before any of its items leaves it and
        unmapped only when all are back, so a walk that must not miss an item
        that is out of the slabs (its lists may move under it) reads this."""
        pt = self.core.pt
        kid, mask = self.id, (1 << L.KEG_ID_SHIFT) - 1
        bases = []
        page, last = self.core.geometry.data_off >> L.PAGE_SHIFT, self.core.geometry.npages
        while page < last:
            e = pt[page]
            if e >> L.KEG_ID_SHIFT == kid and (e & mask) == page << L.PAGE_SHIFT:
                bases.append(page << L.PAGE_SHIFT)
                page += self.ppera
            else:
                page += 1
        return bases

    # ---------------------------------------------------------------- items and their tags
    # Item i of the slab at ``base`` is at ``base + i * rsize``; its tag is u32
    # ``((base + tagoff) >> 2) + i`` of the segment (``offmap`` maps the item's
    # offset in its slab to that index less ``base >> 2``).  This arithmetic lives
    # here; only the fast paths inline it (the zone cache's closures, the mbuf
    # layer's allocation).  Walks read the tags through ``items``/``tags_of``.

    def tag_index_of(self, h: int) -> int:
        """Tag index of item ``h``, or -1 when ``h`` is not an item of this keg.
        Lock: none (addresses only: a slab's pages map to it while items are out)."""
        b = self.slab_of(h)
        return -1 if b < 0 else (b >> 2) + self.offmap[h - b]

    def handle_of(self, ti: int) -> int:
        """Handle of the item whose tag is at u32 index ``ti``.  Lock: none."""
        core = self.core
        base = core.pt[(ti << 2) >> L.PAGE_SHIFT] ^ self.kid_bits
        return base + ((ti << 2) - (base + self.tagoff)) // 4 * self.rsize

    def tags_of(self, base: int) -> memoryview:
        """The tags of the slab at ``base``, item 0 first (a live view: it reads
        what the tags say when it is read).  Lock: keg, for the slab to stay one
        of this keg's (or a base read from the page table, ``slab_bases``)."""
        t0 = (base + self.tagoff) >> 2
        return self.core.tags[t0:t0 + self.ipers]

    def items(self, bases=None, *, zidx: int | None = None, holder: int | None = None,
              states=None):
        """Yield ``(handle, tag index, tag)`` of every item out of its slab (tag
        not FREE) in the slabs at ``bases`` (default: every slab on the lists),
        slab by slab, lowest item first; only those of zone index ``zidx``, held
        by CPU ``holder``, in one of the tag ``states``, when given.  Each tag is
        read as the walk passes it: the caller re-checks under the lock that
        guards its change.  Lock: keg, unless ``bases`` is given (read under it,
        ``slab_bases_locked``, or from the page table, ``slab_bases``)."""
        if bases is None:
            bases = [base for _, base in self.slabs()]
        mask = want = 0
        if zidx is not None:
            mask |= _TAG_ZIDX
            want |= L.tag(0, zidx, 0, 0)
        if holder is not None:
            mask |= _TAG_HOLDER
            want |= L.tag(0, 0, holder, 0)
        states = None if states is None else frozenset(states)
        tags, rsize, ipers = self.core.tags, self.rsize, self.ipers
        for base in bases:
            t0 = (base + self.tagoff) >> 2
            for i, tv in enumerate(tags[t0:t0 + ipers]):
                if tv and tv & mask == want and (states is None
                                                 or tv & L.TAG_STATE_MASK in states):
                    yield base + i * rsize, t0 + i, tv

    def held_by(self, cpu: int, bases=None):
        """Yield (tag index, tag) of every item whose tag names ``cpu`` as holder.
        Tags of a live CPU's items change under its feet: use for a CPU that is
        closing (itself) or dead.  Lock: keg, unless ``bases`` (the slabs' bases,
        e.g. ``slab_bases_locked``) is given."""
        for _, ti, tv in self.items(bases, holder=cpu):
            yield ti, tv

    def tag_counts(self, bases=None) -> Counter:
        """How many items carry each tag value (FREE included), over the slabs at
        ``bases`` (default: every slab on the lists).  Lock: keg, unless ``bases``
        is given."""
        if bases is None:
            bases = [base for _, base in self.slabs()]
        counts: Counter = Counter()
        for base in bases:
            counts.update(self.tags_of(base))
        return counts

    def slab_free(self, base: int) -> int:
        return self.core.w[self._sw(base) + _S["FREE"]]

    def slab_list(self, base: int) -> int:
        return self.core.w[self._sw(base) + _S["LIST"]]

    def slab_prev(self, base: int) -> int:
        return self.core.w[self._sw(base) + _S["PREV"]]

    def rebuild(self) -> None:
        """Recompute every slab's free count, hint and list, and the keg's
        counters, from the tags (the ground truth).  Used by crash recovery when
        a keg lock's owner died.  Lock: keg (repaired)."""
        core = self.core
        w, kw = core.w, self.kw
        bases = self.slab_bases()
        for head in L.LIST_HEAD.values():
            w[kw + head] = L.NIL
        free_items = 0
        for base in bases:
            tags = self.tags_of(base)
            free = sum(1 for t in tags if t == L.TAG_FREE)
            sw = self._sw(base)
            w[sw + _S["FREE"]] = free
            w[sw + _S["HINT"]] = 0
            self._push(base, self._list_for(free))
            free_items += free
        w[kw + _K["NSLABS"]] = len(bases)
        w[kw + _K["PAGES"]] = len(bases) * self.ppera
        w[kw + _K["FREE_ITEMS"]] = free_items
