"""stats: ``vmstat -z`` in FreeBSD's format with the right numbers.  One process, on
a local arena."""

import pytest

from core_helpers import arena
from shmalloc import M_NOWAIT, M_WAITOK


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
