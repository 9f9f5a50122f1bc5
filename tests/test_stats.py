"""stats: ``vmstat -z`` in FreeBSD's format with the right numbers (one process, on
a local arena), and statistics that never wait for a lock a dead process holds."""

import os
import threading

import pytest

from core_helpers import arena
from shmalloc import M_NOWAIT, M_WAITOK, Arena

WAIT = 30.0


VMSTAT_HEADER = ("ITEM                   SIZE  LIMIT     USED     FREE      REQ"
                 "     FAILSLEEP XDOMAIN")


def vmstat_row(name, size, limit, used, free, req, fail, sleep, xdomain):
    return "%-20s %6d, %6d,%8d,%8d,%8d,%4d,%4d,%4d" % (
        name + ":", size, limit, used, free, req, fail, sleep, xdomain)


def test_vmstat_z_prints_freebsds_header_and_the_right_numbers(arena):
    b = arena.attach_local()
    try:
        small = arena.zcreate("vm256", 256, bucket_size=10)
        lim = arena.zcreate("lim", 2048, max_items=4, bucket_size=2)
        # vm256: 25 allocs = 3 imports of 10 from one slab; 5 frees stay cached
        hs = [small.alloc(M_NOWAIT) for _ in range(25)]
        small.free_bulk(hs[:5])
        # lim: 4 allocs (2 imports of 2), a 5th fails, a 6th sleeps and times out;
        # CPU b frees one of them
        ls = [lim.alloc(M_NOWAIT) for _ in range(4)]
        assert lim.alloc(M_NOWAIT) is None
        with pytest.raises(TimeoutError):      # a sleep that fails too
            lim.alloc(M_WAITOK, timeout=0)
        b.zone("lim").free(ls[0])
        out = arena.vmstat_z()
    finally:
        b.close()
    lines = out.splitlines()
    assert lines[0] == VMSTAT_HEADER
    rows = {line.split(":")[0]: line for line in lines[1:] if line}
    used, cached = 25 - 5, 5 + 5
    keg_free = small.keg.ipers - 30
    assert rows["vm256"] == vmstat_row("vm256", 256, 0, used, cached + keg_free, 25, 0, 0, 0)
    # b's cache holds the freed item; the keg's first slab gave 4
    assert rows["lim"] == vmstat_row("lim", 2048, 4, 3, 1 + lim.keg.ipers - 4, 4, 2, 1, 1)


@pytest.mark.slow
def test_stats_of_a_keg_whose_lock_a_dead_process_holds_do_not_hang(arena_name):
    """A process killed inside a keg (its lock taken) and no keg manager yet to
    repair the lock: ``stats()`` and ``zone_stats`` count that keg's tags without
    the lock (nobody changes them while it stays taken) instead of waiting forever
    -- ``shmalloc stat`` on such an arena, or a test that reads the recovery count
    before it starts a manager (test_kill's adopted manager), used to hang."""
    a = Arena.create(arena_name, 8 << 20)
    try:
        z = a.zcreate("held", 512)
        hs = [z.alloc(M_NOWAIT) for _ in range(3)]
        lk = a._core.lock(z.keg.lock_index)
        pid = os.fork()
        if pid == 0:                                  # the child dies holding the lock
            try:
                lk.acquire(owner_id=a.cpu_id)
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0 and lk.owner_pid() == pid
        out = []
        t = threading.Thread(target=lambda: out.append(a.zone_stats("held")), daemon=True)
        t.start()
        t.join(WAIT)
        alive = t.is_alive()
        assert lk.force_release(pid)                  # (a waiting thread gets it then)
        t.join(WAIT)
        assert not alive, "zone_stats waited for a lock a dead process holds"
        assert out[0].used == 3
        for h in hs:
            z.free(h)
    finally:
        a.destroy()
