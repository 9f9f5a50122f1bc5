"""vm: the arena's pages (search order step 4).

Runs of contiguous pages are handed to kegs (slabs, including the multi-page
slabs of jumbo clusters: the ``contigmalloc`` analogue) and to zones (depots).
The free map keeps one byte per page (1 = free) so a run of ``n`` free pages is
found by a C-speed ``find`` of ``n`` one-bytes; the page table maps every page of
a run to ``owner << KEG_ID_SHIFT | run base``.

Invariant: ``FREE_PAGES == count of 1-bytes in the free map`` and a page is free
iff its page-table entry is 0.  ``FREE_HINT <= first free page``.

The page table is the truth: a run is first reserved in the free map, then its
owner fills it (a slab header, zeroed tags), and only then is it mapped in the
page table (``map_run``).  A CPU that dies in between leaves reserved pages with
no owner, which a rebuild from the page table returns to the free map.

Before a run leaves the free map, the backend reserves backing store for it
(``posix_fallocate`` on the segment: a tmpfs page touched when ``/dev/shm`` is full
is a SIGBUS); when there is no room the run stays free and ArenaFullError is
raised, naming the arena, the bytes wanted and the room left.  One system call per
run, off the fast paths; pages backed once cost nothing more.

Lock: every function here needs the vm lock (``layout.VM_LOCK``) held on entry
and on return.
"""

from __future__ import annotations

from array import array

from . import layout as L
from .debug import KILLPOINTS, killpoint
from .errors import ArenaFullError, NoSpaceError

_H = L.HDR


class Vm:
    __slots__ = ("core", "buf", "mv", "w", "pt", "fm", "npages", "first_page")

    def __init__(self, core):
        self.core = core
        g = core.geometry
        self.buf = core.buf
        self.mv = core.mv
        self.w = core.w
        self.pt = core.pt
        self.fm = g.freemap_off
        self.npages = g.npages
        self.first_page = g.data_off >> L.PAGE_SHIFT

    def format(self) -> None:
        """Mark the data pages free.  Only at arena creation."""
        n = self.npages - self.first_page
        self.mv[self.fm:self.fm + self.first_page] = bytes(self.first_page)
        self.mv[self.fm + self.first_page:self.fm + self.npages] = b"\x01" * n
        self.w[_H["FREE_PAGES"]] = n
        self.w[_H["FREE_HINT"]] = self.first_page

    def alloc_run(self, npages: int, owner: int) -> int:
        """Take ``npages`` contiguous pages for ``owner`` and map them; -1 if none."""
        base = self.reserve_run(npages)
        if base >= 0:
            self.map_run(base, npages, owner)
        return base

    def reserve_run(self, npages: int) -> int:
        """Take ``npages`` contiguous pages out of the free map; -1 if none.
        The caller fills them, then calls ``map_run``."""
        self.core.assert_held(L.VM_LOCK)
        w = self.w
        if npages > w[_H["FREE_PAGES"]]:
            return -1
        hint = w[_H["FREE_HINT"]]
        pos = self.buf.find(b"\x01" * npages, self.fm + hint, self.fm + self.npages)
        if pos < 0:
            return -1
        page = pos - self.fm
        self._back(page, npages)
        self.mv[pos:pos + npages] = bytes(npages)
        if KILLPOINTS:
            killpoint("vm.reserve")
        w[_H["FREE_PAGES"]] -= npages
        if page == hint:
            w[_H["FREE_HINT"]] = page + npages
        return page << L.PAGE_SHIFT

    def _back(self, page: int, npages: int) -> None:
        """Reserve backing store for a run about to be handed out; ArenaFullError
        (nothing changed) when the filesystem behind the segment is full."""
        try:
            self.core.backend.reserve(page << L.PAGE_SHIFT, npages << L.PAGE_SHIFT)
        except NoSpaceError as e:
            raise ArenaFullError(
                f"arena {self.core.backend.name!r}: no room in /dev/shm for a run of "
                f"{npages} pages ({npages << L.PAGE_SHIFT} bytes); {e.free} bytes free "
                f"there") from e

    def map_run(self, base: int, npages: int, owner: int) -> None:
        """Point the page table at a reserved run's owner."""
        page = base >> L.PAGE_SHIFT
        self.pt[page:page + npages] = array("q", [owner << L.KEG_ID_SHIFT | base]) * npages

    def free_run(self, base: int, npages: int) -> None:
        """Give back the run at byte offset ``base``."""
        self.core.assert_held(L.VM_LOCK)
        page = base >> L.PAGE_SHIFT
        self.pt[page:page + npages] = array("q", [0]) * npages
        self.mv[self.fm + page:self.fm + page + npages] = b"\x01" * npages
        self.w[_H["FREE_PAGES"]] += npages
        if page < self.w[_H["FREE_HINT"]]:
            self.w[_H["FREE_HINT"]] = page

    def rebuild(self) -> None:
        """Recompute the free map, FREE_PAGES and the hint from the page table.
        Used when the vm lock's owner died."""
        pt, fm = self.pt, self.fm
        free = bytearray(self.npages)
        for page in range(self.first_page, self.npages):
            if pt[page] == 0:
                free[page] = 1
        self.mv[fm:fm + self.npages] = free
        self.w[_H["FREE_PAGES"]] = free.count(1)
        first = free.find(1)
        self.w[_H["FREE_HINT"]] = first if first >= 0 else self.npages

    def owner(self, base: int) -> int:
        return self.pt[base >> L.PAGE_SHIFT] >> L.KEG_ID_SHIFT

    def check(self, problems: list[str]) -> None:
        """Append to ``problems`` what contradicts the vm invariants."""
        fm = bytes(self.mv[self.fm:self.fm + self.npages])
        nfree = fm.count(1)
        if nfree != self.w[_H["FREE_PAGES"]]:
            problems.append(f"vm: free map has {nfree} free pages, header says "
                            f"{self.w[_H['FREE_PAGES']]}")
        first = fm.find(1)
        if first >= 0 and first < self.w[_H["FREE_HINT"]]:
            problems.append(f"vm: page {first} is free below the hint {self.w[_H['FREE_HINT']]}")
        for page in range(self.npages):
            if (fm[page] == 1) != (self.pt[page] == 0) and page >= self.first_page:
                problems.append(f"vm: page {page} free map {fm[page]} but page table "
                                f"{self.pt[page]:#x}")
                break
