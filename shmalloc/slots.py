"""slots: CPU slots — taking one on attach, giving one back on close or after
recovery.

A CPU slot records the process (pid and start time, so a reused pid is not
taken for the living), a generation bumped on every take, the CPU's mailbox
(pages from the arena plus a mailbox lock) and the counters it publishes.

States: FREE -> LIVE (take_slot) -> DEAD (closing, or found dead: senders stop
posting) -> FREE (release_slot).
"""

from __future__ import annotations

import time

from . import layout as L
from .errors import ShmallocError, TooManyCpusError
from .ipc.ring import RING_WORDS, Ring

_H, _Z, _C, _CS = L.HDR, L.ZONE, L.CPU, L.CS
assert RING_WORDS == L.MBOX_RING_WORDS

# per-CPU counters folded into the zone record when the CPU goes away
_FOLD = (("ALLOCS", "ALLOCS"), ("FREES", "FREES"), ("FAILS", "FAILS"),
         ("DEPOT_GETS", "DEPOT_GETS"), ("DEPOT_PUTS", "DEPOT_PUTS"), ("XFREES", "XFREES"))


def take_slot(core, pid: int, start: int, arena_name: str) -> int:
    """Take a free slot with a formatted mailbox for process ``pid``.
    Lock: takes vm."""
    w = core.w
    pages = L.mbox_pages(core.geometry.data_pages)
    with core.lock(L.VM_LOCK):
        for cpu in range(L.MAX_CPUS):
            if w[L.cpu_word(cpu) + _C["STATE"]] == L.CPU_FREE:
                break
        else:
            raise TooManyCpusError(f"arena {arena_name!r}: all {L.MAX_CPUS} CPU slots are taken")
        mbox = core.vm.alloc_run(pages, L.VM_INTERNAL_KEG)
        if mbox < 0:
            raise ShmallocError(f"arena {arena_name!r} has no {pages} free pages for a "
                                f"CPU's mailbox")
        cw = L.cpu_word(cpu)
        gen = L.next_gen(w[cw + _C["GEN"]])
        w[cw:cw + L.CPU_WORDS] = core.zero_words(L.CPU_WORDS)
        w[cw + _C["GEN"]] = gen
        w[cw + _C["PID"]] = pid
        w[cw + _C["START"]] = start
        w[cw + _C["ATTACHED_NS"]] = time.time_ns()
        Ring.format(w[mbox >> 3:(mbox + pages * L.PAGE_SIZE) >> 3])
        w[cw + _C["MBOX_OFF"]] = mbox
        w[cw + _C["MBOX_PAGES"]] = pages
        w[cw + _C["STATE"]] = L.CPU_LIVE
        w[_H["CPU_GEN"]] = L.next_gen(w[_H["CPU_GEN"]])
    core.ensure_lock(L.mbox_lock_index(cpu))
    return cpu


def close_mailbox(core, cpu: int, owner_id: int) -> None:
    """Mark the slot DEAD under its mailbox lock, so that no sender posts to it
    any more.  Lock: takes the CPU's mailbox lock."""
    lk = core.lock(L.mbox_lock_index(cpu))
    lk.acquire(owner_id=owner_id)
    try:
        core.w[L.cpu_word(cpu) + _C["STATE"]] = L.CPU_DEAD
    finally:
        lk.release()


def release_slot(core, cpu: int) -> None:
    """Fold the slot's counters into its zones, give its mailbox pages back and
    free it.  The slot must be DEAD (``close_mailbox``).  Lock: takes vm."""
    w = core.w
    cw = L.cpu_word(cpu)
    with core.lock(L.VM_LOCK):
        for z in core.live_zone_ids():
            sw = L.cpu_stat_word(cpu, z)
            zw = L.zone_word(z)
            for cs, zf in _FOLD:
                w[zw + _Z[zf]] += w[sw + _CS[cs]]
            w[sw:sw + L.CS_WORDS] = core.zero_words(L.CS_WORDS)
        mbox, pages = w[cw + _C["MBOX_OFF"]], w[cw + _C["MBOX_PAGES"]]
        if mbox:
            core.vm.free_run(mbox, pages)
        w[cw + _C["MBOX_OFF"]] = 0
        w[cw + _C["STATE"]] = L.CPU_FREE
        w[cw + _C["PID"]] = 0


def set_manager(core, cpu: int, pid: int) -> None:
    """Record the keg manager (pid, start time, CPU) in the header.  Lock: takes vm."""
    w = core.w
    with core.lock(L.VM_LOCK):
        w[_H["MANAGER_PID"]] = pid
        w[_H["MANAGER_START"]] = w[L.cpu_word(cpu) + _C["START"]]
        w[_H["MANAGER_CPU"]] = cpu
