"""recovery: giving back what a dead CPU held — its locks, its items, its slot.

Run by one supervisor (the keg manager, ``workers/manager.py``) on its own
attachment.  The item tags are the ground truth: every structure a dead lock
holder may have left half-changed is rebuilt from them, and every item the dead
CPU held is found by its tag's holder field.

Repairs, inner locks first (a dead CPU may hold zone -> keg -> vm at once):

    vm lock      free map, FREE_PAGES and hint rebuilt from the page table
    keg lock     slab lists, free counts, keg counters rebuilt from the tags
    zone lock    depot contents (``Depot.rebuild``), ITEMS and the sleep queue
                 (``SleepQueue.rebuild``) rebuilt from the tags
    mailbox lock nothing: a sender re-tags only after its record is committed

Items (``recover_cpu``), by the state their tag gives:

    CACHED, XFREE       still inited: into the supervisor's cache
    FINI                fini was running: fini (again), back to the slab
    IMPORT              init was running: back to the slab without fini
    ALLOC, INFLIGHT     freed through the zone (dtor, then cached): the references
                        a dead CPU held through its mbufs are given back this way;
                        items of REFCNT kegs (clusters) are owned through those
                        references and left to them (the mbuf layer's pass, run
                        first, frees those that no mbuf names)

so hooks may run twice for an item across a crash: dtor and fini must tolerate it.
"""

from __future__ import annotations

import os

from . import admin, slots
from . import layout as L
from .depot import Depot
from .errors import ShmallocError
from .hooks import DTOR_RECOVER
from .stats import lock_indexes
from .sleepq import SleepQueue

_C, _Z, _K = L.CPU, L.ZONE, L.KEG


def mailbox_lock(core, cpu: int):
    """The mailbox lock of slot ``cpu``, or None if the slot never had one."""
    try:
        return core.lock(L.mbox_lock_index(cpu))
    except Exception:              # never created: the slot was never taken
        return None


# Run on a zone lock repaired for a dead holder before anything else, as
# fn(core, lock_index) -> what it did or None: the layers that keep more under a
# zone lock than the zone (the mbuf layer's refcount journal) finish their step.
repair_hooks: list = []

# Run for a dead CPU before ``recover_cpu``, as fn(arena, cpu, dead) -> counts, by
# ``Supervisor.recover``: a layer that owns items through others (the mbuf layer:
# clusters through mbufs) gives back what the dead CPU held its way first.
passes: list = []


def register_repair(fn) -> None:
    """Add ``fn(core, lock_index)`` to the zone-lock repair steps."""
    if fn not in repair_hooks:
        repair_hooks.append(fn)


def register_pass(fn) -> None:
    """Add ``fn(arena, cpu, dead)`` to the dead-CPU recovery passes."""
    if fn not in passes:
        passes.append(fn)


def rebuild_zone(core, zone_id: int, owner_id: int) -> list:
    """Depot, ITEMS and sleep queue of a zone from the tags, after the
    ``repair_hooks``.  Lock: the zone's (repaired: held on the dead owner's
    behalf); takes its keg's.  Returns what the hooks did."""
    done = [r for r in (fn(core, L.zone_lock_index(zone_id)) for fn in repair_hooks) if r]
    w = core.w
    zw = L.zone_word(zone_id)
    keg = core.keg(w[zw + _Z["KEG"]])
    zidx = w[zw + _Z["ZIDX"]]
    depot_word = L.tag(L.TAG_DEPOT, zidx)
    hs, ts, items = [], [], 0
    klk = core.lock(keg.lock_index)
    klk.acquire(owner_id=owner_id)
    try:
        for h, ti, tv in keg.items(zidx=zidx):
            items += 1
            if tv == depot_word:
                hs.append(h)
                ts.append(ti)
    finally:
        klk.release()
    Depot(core, zone_id).rebuild(hs, ts)
    w[zw + _Z["ITEMS"]] = items
    SleepQueue(core, zone_id).rebuild()
    return done


def all_lock_indexes(core) -> list[int]:
    """``lock_indexes``, then the mailbox lock of every slot that ever had one."""
    return lock_indexes(core, mailboxes=False) + [L.mbox_lock_index(c) for c in range(L.MAX_CPUS)
                                 if mailbox_lock(core, c) is not None]


def dead_lock_owners(core) -> set[int]:
    """Pids of the dead processes that hold a lock of the arena (this process
    is never one of them)."""
    me = os.getpid()
    pids = {core.lock(idx).owner_pid() for idx in all_lock_indexes(core)}
    return {pid for pid in pids if pid and pid != me and not admin.process_alive(pid)}


def repair_dead_locks(core, owner_id: int = L.NO_CPU) -> int:
    """Rebuild and release every lock whose holder died (``dead_lock_owners``),
    for a supervisor -- the keg manager, or one about to adopt the arena, which
    has no CPU slot yet (``owner_id`` names who holds the locks it takes meanwhile:
    no CPU).  Returns how many were repaired."""
    dead = dead_lock_owners(core)
    return repair_core_locks(core, dead, owner_id) if dead else 0


def repair_locks(arena, dead_pids: set[int]) -> int:
    """Rebuild and release every lock held by a process in ``dead_pids``, from
    ``arena``'s attachment.  Returns how many were repaired."""
    return repair_core_locks(arena._core, dead_pids, arena.cpu_id)


def repair_core_locks(core, dead_pids: set[int], me: int) -> int:
    """``repair_locks`` on the views of an arena (``me``: the CPU slot, or
    NO_CPU, on whose behalf locks are taken).  Lock: takes each lock's inner
    locks as its rebuild needs them (a zone's: its keg's), then vm."""
    repaired = 0
    mailboxes = [lk for lk in (mailbox_lock(core, c) for c in range(L.MAX_CPUS)) if lk]
    for idx in lock_indexes(core, mailboxes=False):      # vm, kegs, then zones
        lk = core.lock(idx)
        pid = lk.owner_pid()
        if pid not in dead_pids:
            continue
        if idx == L.VM_LOCK:
            core.vm.rebuild()
        elif idx <= L.MAX_KEGS:
            core.keg(idx).rebuild()
        else:
            rebuild_zone(core, idx - 1 - L.MAX_KEGS, me)
        repaired += lk.force_release(pid)
    for lk in mailboxes:
        if lk.owner_pid() in dead_pids:
            repaired += lk.force_release(lk.owner_pid())
    if repaired:
        with core.lock(L.VM_LOCK):
            core.w[L.HDR["LOCK_REPAIRS"]] += repaired
    return repaired


def recover_cpu(arena, cpu: int) -> dict:
    """Give back everything CPU ``cpu`` (found dead) held, and its slot.
    Its locks must have been repaired first.  Returns counts by state."""
    core, w = arena._core, arena._core.w
    cw = L.cpu_word(cpu)
    counts: dict[str, int] = {}
    slots.close_mailbox(core, cpu, arena.cpu_id)
    for z in core.live_zone_ids():                       # out of every sleep queue
        lk = core.lock(L.zone_lock_index(z))
        lk.acquire(owner_id=arena.cpu_id)
        try:
            w[cw + _C["WAIT_ZONE"]] = 0
            SleepQueue(core, z).rebuild()
        finally:
            lk.release()
    w[cw + _C["GRANT_ZONE"]] = 0
    kegs = [k for k in range(1, w[L.HDR["NKEGS"]] + 1) if w[L.keg_word(k) + _K["FLAGS"]] & L.KF_LIVE]
    kegs.sort(key=lambda k: core.keg(k).refcnt)          # mbufs before the clusters they hold
    for k in kegs:
        for zone_id in core.zones_of_keg(k):
            _recover_zone_items(arena, zone_id, cpu, counts)
    slots.release_slot(core, cpu)
    try:
        core.backend.unlink_wake(cpu)
    except Exception:
        pass
    with core.lock(L.VM_LOCK):
        w[L.HDR["RECOVERIES"]] += 1
    return counts


def _recover_zone_items(arena, zone_id: int, cpu: int, counts: dict) -> None:
    core = arena._core
    zone = arena._zone_by_id(zone_id)
    cache = zone._cache
    keg, zidx, me = zone.keg, zone.zidx, arena.cpu_id
    tags = core.tags
    lk = core.lock(zone._lock_index)          # take-overs (F4) re-tag under it too
    lk.acquire(owner_id=me)
    try:
        found = list(keg.items(keg.slab_bases_locked(me), zidx=zidx, holder=cpu))
        cached, fini, imported, freeing = ([], []), ([], []), ([], []), []
        for h, ti, tv in found:
            st = L.tag_state(tv)
            counts[L.TAG_STATE_NAMES[st]] = counts.get(L.TAG_STATE_NAMES[st], 0) + 1
            if st in (L.TAG_CACHED, L.TAG_XFREE):
                tags[ti] = cache.w_cached
                cached[0].append(h)
                cached[1].append(ti)
            elif st == L.TAG_FINI:
                tags[ti] = cache.w_fini
                fini[0].append(h)
                fini[1].append(ti)
            elif st == L.TAG_IMPORT:
                tags[ti] = cache.w_import
                imported[0].append(h)
                imported[1].append(ti)
            elif st in (L.TAG_ALLOC, L.TAG_INFLIGHT):
                if keg.refcnt:          # owned through references (mbufs): theirs now
                    tags[ti] = L.tag(L.TAG_ALLOC, zidx, L.NO_CPU, L.tag_home(tv))
                else:
                    tags[ti] = cache.w_alloc
                    freeing.append(h)
    finally:
        lk.release()
    if cached[0]:
        cache.take_home(*cached)
    if fini[0]:
        cache._release_to_keg(*fini, run_fini=True)
    if imported[0]:
        cache._release_to_keg(*imported, run_fini=False)
    for h in freeing:
        try:
            zone.free(h, DTOR_RECOVER)
        except ShmallocError:
            # the dtor kept it (an mbuf whose cluster is still shared waits for
            # its last reference); it is held by the supervisor now
            counts["kept"] = counts.get("kept", 0) + 1
