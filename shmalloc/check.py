"""check: prove an arena's invariants from the item tags (the ground truth).

Per keg, from its slabs:
    every slab is on the list its free count names (keg R1-R4), its free count
    equals its FREE tags, its pages map to it in the page table;
    FREE_ITEMS == sum of free counts, PAGES == slabs x ppera.
Per zone (conservation):
    free in slabs + cached + depot + in flight + allocated + (import, fini under
    way) == total items of the keg, summed over the keg's zones;
    ITEMS == tags of the zone that are not FREE;  ITEMS <= LIMIT (or, after a limit
    set below use, ITEMS <= OVER: the items out when it was set);
    DEPOT_N == DEPOT tags, and the depot lists exactly those items once each;
    SLEEPERS == live entries of the sleep queue;
    each live CPU's published CACHED == CACHED tags it holds (level >= 2, or for
    this process's own CPUs, which publish before the check).
Per item: a known state, a zone index of the keg, a holder that is a live CPU
(or none, for an allocated item whose CPU closed without freeing it).

All locks are taken (zones, then kegs, then vm) so slow paths stand still;
fast paths only move items between CACHED and ALLOC of one CPU, which no
equation above separates.
"""

from __future__ import annotations

from collections import Counter

from . import layout as L
from .admin import process_alive
from .depot import Depot
from .errors import CorruptionError
from .sleepq import SleepQueue
from .stats import lock_indexes

_Z, _K, _C = L.ZONE, L.KEG, L.CPU


def check(arena, level: int = 1) -> None:
    core = arena._core
    w = core.w
    zone_ids = core.live_zone_ids()
    keg_ids = [k for k in range(1, w[L.HDR["NKEGS"]] + 1)
               if w[L.keg_word(k) + _K["FLAGS"]] & L.KF_LIVE]
    order = ([L.zone_lock_index(z) for z in zone_ids] + [L.keg_lock_index(k) for k in keg_ids]
             + [L.VM_LOCK])
    taken = []
    problems: list[str] = []
    try:
        for idx in order:
            lk = core.lock(idx)
            lk.acquire(owner_id=arena.cpu_id)
            taken.append(lk)
        core.vm.check(problems)
        own_cpus = {arena.cpu_id} | {a.cpu_id for a in list(arena._thread_arenas.values())
                                     if not a._closed}
        live = set(core.live_cpus())
        for kid in keg_ids:
            _check_keg(core, kid, zone_ids, live, own_cpus, level, problems)
    finally:
        for lk in reversed(taken):
            lk.release()
    if problems:
        raise CorruptionError(f"arena {arena.name!r} is inconsistent:\n  " + "\n  ".join(problems))


def _check_keg(core, kid, zone_ids, live, own_cpus, level, problems):
    w = core.w
    keg = core.keg(kid)
    kname = core.zone_names_of_keg(kid)
    p = f"keg {kname}"
    tags_by_value: Counter = Counter()
    nslabs = free_items = 0
    seen = set()
    try:
        slabs = list(keg.slabs())
    except RuntimeError as e:
        problems.append(str(e))
        return
    prev_of: dict[int, int] = {}
    for lst, base in slabs:
        if base in seen:
            problems.append(f"{p}: slab {base} is on two lists")
            continue
        seen.add(base)
        nslabs += 1
        t = keg.tags_of(base)
        c = Counter(t)
        tags_by_value.update(c)
        nfree = c.get(L.TAG_FREE, 0)
        if keg.slab_free(base) != nfree:
            problems.append(f"{p}: slab {base} says {keg.slab_free(base)} free items, "
                            f"its tags say {nfree}")
        want = keg._list_for(nfree)
        if lst != want or keg.slab_list(base) != lst:
            problems.append(f"{p}: slab {base} with {nfree}/{keg.ipers} free is on list {lst}, "
                            f"belongs on {want}")
        free_items += keg.slab_free(base)
        e = kid << L.KEG_ID_SHIFT | base
        first = base >> L.PAGE_SHIFT
        if any(core.pt[pg] != e for pg in range(first, first + keg.ppera)):
            problems.append(f"{p}: page table does not map slab {base} to its keg")
        prev_of[base] = keg.slab_prev(base)
    # slabs in the page table but on no list
    pt = core.pt
    for page in range(core.geometry.data_off >> L.PAGE_SHIFT, core.geometry.npages):
        e = pt[page]
        if e >> L.KEG_ID_SHIFT == kid and (e & ((1 << L.KEG_ID_SHIFT) - 1)) == page << L.PAGE_SHIFT:
            if page << L.PAGE_SHIFT not in seen:
                problems.append(f"{p}: slab {page << L.PAGE_SHIFT} is on no list (lost)")
    kw = L.keg_word(kid)
    if w[kw + _K["NSLABS"]] != nslabs:
        problems.append(f"{p}: NSLABS {w[kw + _K['NSLABS']]}, lists hold {nslabs}")
    if w[kw + _K["PAGES"]] != nslabs * keg.ppera:
        problems.append(f"{p}: PAGES {w[kw + _K['PAGES']]} != {nslabs} slabs x {keg.ppera}")
    if w[kw + _K["FREE_ITEMS"]] != free_items:
        problems.append(f"{p}: FREE_ITEMS {w[kw + _K['FREE_ITEMS']]}, slabs hold {free_items}")

    # decode tags: (zidx, state) counts, (zidx, cpu) cached counts
    zones = {w[L.zone_word(z) + _Z["ZIDX"]]: z for z in zone_ids
             if w[L.zone_word(z) + _Z["KEG"]] == kid}
    by_zone: Counter = Counter()
    cached_by_cpu: Counter = Counter()
    for tv, n in tags_by_value.items():
        st, zidx, holder = L.tag_state(tv), L.tag_zidx(tv), L.tag_holder(tv)
        if tv == L.TAG_FREE:
            continue
        if st >= len(L.TAG_STATE_NAMES) or st == L.TAG_FREE:
            problems.append(f"{p}: {n} items carry an unknown tag {tv:#x}")
            continue
        if zidx not in zones:
            problems.append(f"{p}: {n} items are tagged for zone index {zidx}, which the keg "
                            f"does not have")
            continue
        by_zone[zidx, st] += n
        if st in (L.TAG_CACHED, L.TAG_ALLOC, L.TAG_IMPORT, L.TAG_FINI, L.TAG_INFLIGHT):
            if holder not in live and not (st == L.TAG_ALLOC and holder == L.NO_CPU):
                problems.append(f"{p}: {n} {L.TAG_STATE_NAMES[st]} items of zone "
                                f"{core.zone_name(zones[zidx])!r} are held by CPU {holder}, "
                                f"which is not live")
        if st == L.TAG_CACHED:
            cached_by_cpu[zidx, holder] += n
    total = nslabs * keg.ipers
    counted = tags_by_value.get(L.TAG_FREE, 0) + sum(by_zone.values())
    if counted != total:
        problems.append(f"{p}: conservation: free {tags_by_value.get(L.TAG_FREE, 0)} + held "
                        f"{sum(by_zone.values())} != total {total}")
    for zidx, z in zones.items():
        _check_zone(core, z, zidx, keg, by_zone, cached_by_cpu, live, own_cpus, level, problems)


def _check_zone(core, z, zidx, keg, by_zone, cached_by_cpu, live, own_cpus, level, problems):
    w = core.w
    zw = L.zone_word(z)
    p = f"zone {core.zone_name(z)!r}"
    held = sum(n for (zi, st), n in by_zone.items() if zi == zidx)
    items = w[zw + _Z["ITEMS"]]
    if items != held:
        states = {L.TAG_STATE_NAMES[st]: n for (zi, st), n in by_zone.items() if zi == zidx}
        problems.append(f"{p}: ITEMS {items} but {held} items are out of the slabs {states}")
    limit = w[zw + _Z["LIMIT"]]
    if limit and items > max(limit, w[zw + _Z["OVER"]]):
        over = f" (and the {w[zw + _Z['OVER']]} out when it was set)" if w[zw + _Z["OVER"]] else ""
        problems.append(f"{p}: {items} items exceed the limit {limit}{over}")
    n = w[zw + _Z["DEPOT_N"]]
    cap = w[zw + _Z["DEPOT_CAP"]]
    if not 0 <= n <= cap:
        problems.append(f"{p}: depot count {n} outside 0..{cap}")
        return
    if by_zone.get((zidx, L.TAG_DEPOT), 0) != n:
        problems.append(f"{p}: depot holds {n} items, {by_zone.get((zidx, L.TAG_DEPOT), 0)} "
                        f"are tagged depot")
    hs, ts = Depot(core, z).contents()
    if len(set(hs)) != n:
        problems.append(f"{p}: the depot lists an item twice")
    wd = L.tag(L.TAG_DEPOT, zidx)
    for h, t in zip(hs, ts):
        ti = keg.tag_index_of(h)
        if ti < 0 or t != ti or core.tags[t] != wd:
            problems.append(f"{p}: depot entry {h} (tag index {t}) is not a depot item of "
                            f"this zone")
            break
    waiting = SleepQueue(core, z).waiting()
    if waiting is None:
        problems.append(f"{p}: sleep queue head {w[zw + _Z['SQ_HEAD']]} tail "
                        f"{w[zw + _Z['SQ_TAIL']]}")
    elif len(waiting) != w[zw + _Z["SLEEPERS"]]:
        problems.append(f"{p}: SLEEPERS {w[zw + _Z['SLEEPERS']]}, queue holds {waiting}")
    for cpu in live:
        if level < 2 and cpu not in own_cpus:
            continue
        published = w[L.cpu_stat_word(cpu, z) + L.CS["CACHED"]]
        tagged = cached_by_cpu.get((zidx, cpu), 0)
        granted = (w[L.cpu_word(cpu) + _C["GRANT_ZONE"]] == z + 1)
        if published != tagged and not granted:
            problems.append(f"{p}: CPU {cpu} publishes {published} cached items, "
                            f"{tagged} are tagged cached by it")


def stuck_locks(arena, timeout: float = 3.0) -> list[str]:
    """Locks held by a process that is dead, or not takeable within ``timeout``
    seconds: what a supervised arena must never show for long.  Empty when none.
    Lock: takes each lock (the vm, keg and zone locks, the live CPUs' mailbox locks)
    and gives it back at once."""
    core = arena._core
    idxs = lock_indexes(core, mailboxes=False)
    idxs += [L.mbox_lock_index(c) for c in core.live_cpus()]
    out = []
    for idx in idxs:
        lk = core.lock(idx)
        pid = lk.owner_pid()
        if pid and not process_alive(pid):
            out.append(f"lock {idx} held by dead pid {pid}")
        if not lk.acquire(timeout=timeout, owner_id=arena.cpu_id):
            out.append(f"lock {idx} not taken within {timeout:g} s (owner pid "
                       f"{lk.owner_pid()})")
        else:
            lk.release()
    return out
