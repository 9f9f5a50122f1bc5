"""Messages between CPUs: hand-offs, remote frees sent home, full and garbage mailboxes."""

import pytest

from shmalloc import M_NOWAIT, Arena, ShmallocError, layout
from shmalloc.ipc import codec
from shmalloc.mail import CpuGoneError, MailboxFullError, ring_of
from shmalloc.zone import XFREE_BATCH


@pytest.fixture
def pair():
    a = Arena.create_local(16 << 20)
    b = a.attach_local()
    yield a, b
    b.close()
    a.destroy()


def test_send_moves_ownership_and_recv_returns_the_handles(pair):
    a, b = pair
    za = a.zcreate("z", 256)
    hs = [za.alloc(M_NOWAIT) for _ in range(10)]
    for h in hs:
        za.view(h)[:4] = h.to_bytes(4, "little")
    a.send(b.cpu_id, hs)
    with pytest.raises(ShmallocError, match="not allocated and held by CPU"):
        a.send(b.cpu_id, hs[:1])                      # a holds them no more
    got = b.recv(timeout=1.0)
    assert sorted(got) == sorted(hs)
    zb = b.zone("z")
    assert all(bytes(zb.view(h)[:4]) == h.to_bytes(4, "little") for h in got)
    a.check()
    for h in got:
        zb.free(h)
    a.check()
    # xfree="local": a received item became the receiver's own (re-homed), so its
    # free is a fast-path free into the receiver's cache, not a cross-CPU free
    assert za.stats().used == 0 and za.stats().xfree == 0
    assert set(got) <= set(zb._cache.items)


def test_a_received_item_keeps_its_home_with_xfree_message(pair):
    a, b = pair
    za = a.zcreate("m", 256, xfree="message")
    hs = [za.alloc(M_NOWAIT) for _ in range(3)]
    a.send(b.cpu_id, hs)
    got = b.recv(timeout=1.0)
    tags = a._core.tags
    for h in got:
        tv = tags[za._cache._tag_index(h)]
        assert (layout.tag_state(tv), layout.tag_holder(tv), layout.tag_home(tv)) == (
            layout.TAG_ALLOC, b.cpu_id, a.cpu_id)
    b.zone("m").free_bulk(got)
    b.poll()
    a.poll()
    a.check()
    assert za.stats().used == 0 and za.stats().xfree == 3


def test_recv_times_out_with_an_empty_list(pair):
    a, b = pair
    assert b.recv(timeout=0.05) == []


def test_remote_frees_go_home_in_one_message_with_xfree_message(pair):
    a, b = pair
    za = a.zcreate("m", 256, xfree="message", bucket_size=16)
    hs = [za.alloc(M_NOWAIT) for _ in range(XFREE_BATCH)]
    a.send(b.cpu_id, hs)
    zb = b.zone("m")
    for h in b.recv(timeout=1.0):
        zb.free(h)                  # a full batch, whatever the bucket size: sent at once
    cs = {c.cpu: c for c in b.cpu_stats()}
    a.check()
    st = b._zone_by_id(zb.id)._cache
    assert st.msgs_sent == 1 and st.items_sent == XFREE_BATCH and st.fallbacks == 0
    a.poll()                                          # home takes its mail
    assert set(hs) <= set(za._cache.items) | set(za.stats() and _depot(za))
    a.check()
    assert cs[b.cpu_id].xfrees == XFREE_BATCH and za.stats().used == 0


def _depot(z):
    w, zw = z._core.w, z._zw
    from shmalloc import layout
    n, off = w[zw + layout.ZONE["DEPOT_N"]], w[zw + layout.ZONE["DEPOT_OFF"]] >> 3
    return list(w[off:off + n])


def test_a_partial_batch_is_sent_on_poll_and_on_close(pair):
    a, b = pair
    za = a.zcreate("m", 256, xfree="message", bucket_size=64)
    hs = [za.alloc(M_NOWAIT) for _ in range(3)]
    a.send(b.cpu_id, hs)
    zb = b.zone("m")
    for h in b.recv(timeout=1.0):
        zb.free(h)
    assert len(zb._cache.xbatches[a.cpu_id][0]) == 3
    b.poll()
    assert not zb._cache.xbatches
    a.poll()
    a.check()
    assert za.stats().used == 0


def test_remote_free_to_a_closed_home_falls_back_to_a_local_free(pair):
    a, b = pair
    c = a.attach_local()
    zc = c.zcreate("m", 256, xfree="message", bucket_size=4)
    hs = [zc.alloc(M_NOWAIT) for _ in range(XFREE_BATCH)]
    c.send(b.cpu_id, hs)
    c.close()
    zb = b.zone("m")
    for h in b.recv(timeout=1.0):
        zb.free(h)
    assert zb._cache.fallbacks == 1
    a.check()
    assert zb.stats().used == 0


def test_send_to_a_cpu_that_is_not_live_keeps_the_items(pair):
    a, b = pair
    z = a.zcreate("z", 64)
    h = z.alloc(M_NOWAIT)
    with pytest.raises(CpuGoneError):
        a.send(40, [h])
    z.free(h)
    a.check()


def test_a_full_mailbox_refuses_and_keeps_the_items(pair):
    a, b = pair
    z = a.zcreate("z", 64)
    per = 200
    sent = 0
    with pytest.raises(MailboxFullError):
        for _ in range(1000):
            hs = [z.alloc(M_NOWAIT) for _ in range(per)]
            try:
                a.send(b.cpu_id, hs)
            except MailboxFullError:
                z.free_bulk(hs)                        # still ours
                raise
            sent += per
    a.check()
    got = b.recv(timeout=1.0)
    assert len(got) == sent
    b.zone("z").free_bulk(got)
    a.check()


def test_garbage_in_a_mailbox_is_counted_and_dropped(pair):
    a, b = pair
    z = a.zcreate("z", 64)
    h = z.alloc(M_NOWAIT)
    core = a._core
    lk = core.lock(layout.mbox_lock_index(b.cpu_id))
    ring = ring_of(core, b.cpu_id)
    with lk:
        for junk in (b"\xc1\xff\x00", codec.encode({"x": 1}), codec.encode([2, 0, 0, [[99, [1]]]]),
                     codec.encode([2, a.cpu_id, 0, [[z.id, [h, h + 1, -5, "x"]]]])):
            assert ring.put(junk)
    assert b.recv(timeout=0.05) == []
    assert b._mail.bad == 3 + 4                       # 3 bad records, then 4 bad handles
    z.free(h)                                         # never moved: still a's
    a.check()


def test_a_record_that_lists_a_handle_twice_hands_it_over_once(pair):
    a, b = pair
    z = a.zcreate("z", 64)
    hs = [z.alloc(M_NOWAIT) for _ in range(4)]
    a.send(b.cpu_id, hs)
    b_ring, lk = ring_of(a._core, b.cpu_id), a._core.lock(layout.mbox_lock_index(b.cpu_id))
    with lk:                                          # the same record again, plus a float
        rec = b_ring.take_all()[0]
        msg = codec.decode(rec)
        msg[3][0][1] = hs[:2] + [hs[1], float(hs[2])] + hs[2:]
        assert b_ring.put(codec.encode(msg))
    got = b.recv(timeout=0.05)
    assert got == hs and b._mail.bad == 2
    b.zone("z").free_bulk(got)
    a.check()


def test_close_frees_what_was_handed_over_but_never_received(pair):
    a, b = pair
    z = a.zcreate("z", 64)
    hs = [z.alloc(M_NOWAIT) for _ in range(5)]
    c = a.attach_local()
    a.send(c.cpu_id, hs)
    c.close()
    a.check()
    assert z.stats().used == 0
