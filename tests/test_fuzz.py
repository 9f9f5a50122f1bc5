"""Fuzzing the two parsers that face other processes: the mailbox decoder and
the arena header validation.  Neither may crash or corrupt the arena."""

import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shmalloc import Arena, CorruptionError, LayoutError, M_NOWAIT, ShmallocError, layout
from shmalloc.ipc import codec
from shmalloc.ipc.segment import Segment
from shmalloc.mail import ring_of

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=30)


@pytest.fixture(scope="module")
def pair():
    a = Arena.create_local(8 << 20)
    b = a.attach_local()
    z = a.zcreate("z", 64)
    yield a, b, z
    b.close()
    a.destroy()


def _deliver(a, b, records):
    core = a._core
    lk = core.lock(layout.mbox_lock_index(b.cpu_id))
    ring = ring_of(core, b.cpu_id)
    with lk:
        for r in records:
            ring.put(r)


def _message_like(z, cpu):
    """Well-shaped messages with hostile contents."""
    handle = st.integers(-10, 1 << 40) | st.sampled_from([0, 4096, 577536])
    group = st.tuples(st.integers(-1, 70) | st.just(z.id), st.lists(handle, max_size=8) |
                      st.binary(max_size=8))
    return st.tuples(st.integers(-1, 5), st.integers(-1, 70) | st.just(cpu),
                     st.integers(-5, 5), st.lists(group.map(list), max_size=3)).map(list)


@FUZZ
@given(records=st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes_in_a_mailbox_are_dropped(pair, records):
    a, b, z = pair
    h = z.alloc(M_NOWAIT)
    _deliver(a, b, records)
    assert b.recv(timeout=0) == []
    z.free(h)                              # nothing moved: still a's
    a.check()


@pytest.mark.slow
@FUZZ
@given(values=st.lists(msgpack_values, max_size=4))
def test_random_msgpack_values_in_a_mailbox_are_dropped(pair, values):
    a, b, z = pair
    _deliver(a, b, [codec.encode(v) for v in values])
    assert b.recv(timeout=0) == []
    a.check()


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_well_shaped_messages_with_hostile_contents_move_nothing(pair, data):
    a, b, z = pair
    hs = [z.alloc(M_NOWAIT) for _ in range(3)]
    msgs = data.draw(st.lists(_message_like(z, a.cpu_id), max_size=4))
    # hostile: real handles of a's, but not in flight to b
    msgs.append([2, a.cpu_id, 0, [[z.id, hs]]])
    _deliver(a, b, [codec.encode(m) for m in msgs])
    assert b.recv(timeout=0) == []
    z.free_bulk(hs)
    a.check()


class _Corrupted:
    """A real arena whose header words are changed for the length of a ``with``,
    then restored (so that its creator can destroy it)."""

    def __init__(self, name, changes):
        self.arena = Arena.create(name, 2 << 20)
        self.changes = changes

    def __enter__(self):
        w = memoryview(self.arena._core.buf).cast("q")
        self.saved = [(i, w[i]) for i, _ in self.changes]
        for i, v in self.changes:
            w[i] = v
        w.release()
        return self.arena

    def __exit__(self, *exc):
        w = memoryview(self.arena._core.buf).cast("q")
        for i, v in reversed(self.saved):
            w[i] = v
        w.release()
        self.arena.destroy()


_serial = iter(range(1 << 30))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.integers(0, len(layout.HDR) - 1),
                                  st.integers(-2**63, 2**63 - 1) | st.integers(-5, 5000)),
                        min_size=1, max_size=4))
@example(changes=[(layout.HDR["CPU_GEN"], 2**63 - 1)])    # a generation at its maximum wraps
def test_a_corrupt_header_is_refused_with_layout_error(arena_name, changes):
    name = f"{arena_name}_{next(_serial)}"
    with _Corrupted(name, changes):
        try:
            other = Arena.attach(name)
        except LayoutError:
            return
        except ShmallocError:                 # sound header, but e.g. no free page left
            return                            # for this CPU's mailbox: a clear refusal
        # accepted: every word that matters was left (or set) sound; check may
        # still find counters that disagree with the tags, and must say so
        try:
            other.check()
        except CorruptionError:
            pass
        finally:
            other.close()


@pytest.mark.parametrize("size", [0, 8, 4096, 4095, 10000])
def test_truncated_or_tiny_segments_are_refused(arena_name, size):
    name = f"/shmalloc.{arena_name}.arena"
    seg = Segment.create(name, max(size, 1))
    try:
        with pytest.raises((LayoutError, Exception)) as e:
            Arena.attach(arena_name)
        assert isinstance(e.value, LayoutError), e.value
    finally:
        seg.close()
        Segment.unlink(name)


def test_a_segment_of_another_layout_version_is_refused(arena_name):
    with _Corrupted(arena_name, [(layout.HDR["VERSION"], layout.LAYOUT_VERSION + 1)]):
        with pytest.raises(LayoutError, match="layout version"):
            Arena.attach(arena_name)


def test_a_segment_that_is_not_an_arena_is_refused(arena_name):
    name = f"/shmalloc.{arena_name}.arena"
    seg = Segment.create(name, 1 << 20)
    try:
        seg.buf[:8] = os.urandom(8)
        with pytest.raises(LayoutError, match="not a shmalloc arena"):
            Arena.attach(arena_name)
    finally:
        seg.close()
        Segment.unlink(name)
