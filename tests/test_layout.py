"""layout: the slab a keg gets (``layout.keg_layout``: the smallest that wastes
little), and items of every size, from one byte to more than a MiB, laid out in their
slabs without overlapping.  One process, on a local arena."""

import pytest

from core_helpers import MiB, arena, assert_consistent, assert_disjoint
from shmalloc import M_NOWAIT, Arena
from shmalloc import layout


def test_refcnt_cluster_keg_wastes_little_with_the_smallest_slab(arena):
    z = arena.zcreate("clust", 2048, refcnt=True)
    keg = z.keg
    room = keg.ppera * layout.PAGE_SIZE
    good = 1 - layout.MAX_WASTE
    assert keg.rsize == 2048
    # items, slab header, one u32 tag and one u32 refcount per item fit in the slab
    assert keg.ipers * 2048 + layout.SLAB_HDR_BYTES + 8 * keg.ipers <= room
    assert keg.ipers * 2048 / room >= good
    # and no smaller slab is as good
    for ppera in range(1, keg.ppera):
        r = ppera * layout.PAGE_SIZE
        n = (r - layout.SLAB_HDR_BYTES) // (2048 + 8)
        assert n * 2048 / r < good, f"{ppera} pages would hold {n} items"
    # all the bookkeeping per item (slab waste, tag, refcount) stays under 3 %
    assert (room - keg.ipers * 2048) / (keg.ipers * 2048) < 0.03


SIZES = [1, 16, 100, 256, 2048, 9216, 16384, 65536, MiB + 1]


@pytest.mark.parametrize("size", SIZES)
def test_items_of_every_size_hold_their_bytes_and_do_not_overlap(size):
    with Arena.create_local(size=16 * MiB, bare=True) as a:
        z = a.zcreate(f"s{size}", size)
        n = 2 * z.keg.ipers + 1                 # three slabs (3 items of 1 MiB)
        hs = [z.alloc(M_NOWAIT) for _ in range(n)]
        assert None not in hs
        assert_disjoint(z, hs)
        for i, h in enumerate(hs):
            v = z.view(h)
            assert len(v) == size
            v[:] = bytes([i % 251 + 1]) * size
        for i, h in enumerate(hs):
            assert bytes(z.view(h)) == bytes([i % 251 + 1]) * size, f"item {i} ({h}) changed"
        assert_consistent(a, z)
        z.free_bulk(hs)
        assert_consistent(a, z)
