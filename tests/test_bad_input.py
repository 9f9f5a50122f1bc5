"""The bad-input matrix: every public entry point with invalid values gives a
clear error of the right type, and the arena stays consistent afterwards."""

import pytest

from shmalloc import (M_NOWAIT, M_WAITOK, Arena, ArenaNotFoundError, BadHandleError,
                      BadNameError, DoubleFreeError, HookError, ShmallocError, ZoneError)
from shmalloc import mbuf as mb
from shmalloc.scripts import cli


@pytest.fixture(scope="module")
def arena():
    a = Arena.create_local(16 << 20)
    a.zcreate("z", 64, max_items=100)
    a.zcreate("other", 64)
    yield a
    a.destroy()


@pytest.fixture(autouse=True)
def consistent_after(arena):
    yield
    arena.check()


BAD_NAMES = ["", "a/b", "a\0b", "." + "x", "x" * 200, "sp ace"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_arena_names(name):
    with pytest.raises(BadNameError):
        Arena.create(name, 1 << 20)


@pytest.mark.parametrize("name, exc", [(123, TypeError), (None, TypeError)])
def test_arena_name_types(name, exc):
    with pytest.raises(exc):
        Arena.create(name, 1 << 20)


@pytest.mark.parametrize("size, exc", [(-1, ValueError), (0, ValueError), (4096, ValueError),
                                       (1 << 50, ValueError), ("1M", TypeError),
                                       (1.5, TypeError), (True, TypeError)])
def test_arena_sizes(arena_name, size, exc):
    with pytest.raises(exc):
        Arena.create(arena_name, size)


def test_attach_to_nothing(arena_name):
    with pytest.raises(ArenaNotFoundError, match=arena_name):
        Arena.attach(arena_name)


@pytest.mark.parametrize("kw, exc", [
    (dict(name="", size=8), ZoneError), (dict(name="n" * 40, size=8), ZoneError),
    (dict(name="z", size=8), ZoneError),                      # exists
    (dict(name=5, size=8), TypeError),
    (dict(name="a", size=0), ValueError), (dict(name="a", size=-3), ValueError),
    (dict(name="a", size="8"), TypeError), (dict(name="a", size=1 << 40), ZoneError),
    (dict(name="a", size=8, align=3), ZoneError), (dict(name="a", size=8, align=0), ValueError),
    (dict(name="a", size=8, bucket_size=999), ZoneError),
    (dict(name="a", size=8, bucket_size=-1), ValueError),
    (dict(name="a", size=8, xfree="sometimes"), ZoneError),
    (dict(name="a", size=8, max_items=-1), ValueError),
    (dict(name="a", size=8, ctor="no.such.module:fn"), HookError),
    (dict(name="a", size=8, ctor="nocolon"), HookError),
    (dict(name="a", size=8, ctor=lambda *a: None), HookError),
    (dict(name="a", size=8, ctor=42), TypeError),
])
def test_zcreate(arena, kw, exc):
    with pytest.raises(exc):
        arena.zcreate(**kw)


@pytest.mark.parametrize("how, exc", [(0, ValueError), (3, ValueError), (0x8000, ValueError),
                                      ("M_NOWAIT", TypeError), (None, TypeError)])
def test_alloc_flags(arena, how, exc):
    z = arena.zone("z")
    z.drain()                                  # miss: the slow path validates too
    with pytest.raises(exc):
        z.alloc(how)
    h = z.alloc(M_NOWAIT)                      # hit: the fast path refuses as well
    z.free(h)
    with pytest.raises(exc):
        z.alloc(how)


def test_negative_timeout(arena):
    z = arena.zone("z")
    hs = z.alloc_bulk(100)                     # at the limit: M_WAITOK must sleep
    try:
        with pytest.raises(ValueError):
            z.alloc(M_WAITOK, timeout=-1)
    finally:
        z.free_bulk(hs)


def _handles(arena):
    z = arena.zone("z")
    h = z.alloc(M_NOWAIT)
    o = arena.zone("other").alloc(M_NOWAIT)
    return z, h, o


@pytest.mark.parametrize("case", ["negative", "huge", "metadata", "misaligned", "free page",
                                  "foreign", "double", "float", "str", "none", "bool"])
def test_free_of_bad_handles(arena, case):
    z, h, o = _handles(arena)
    bad = {"negative": -64, "huge": 1 << 45, "metadata": 8, "misaligned": h + 3,
           "free page": arena.size - 4096, "foreign": o, "double": None, "float": 1.5,
           "str": "12", "none": None, "bool": True}[case]
    try:
        if case == "double":
            z.free(h)
            with pytest.raises(DoubleFreeError, match=f"handle {h}"):
                z.free(h)
            return
        exc = TypeError if case in ("float", "str", "none", "bool") else BadHandleError
        with pytest.raises(exc, match="'z'"):
            z.free(bad)
        with pytest.raises(exc):
            z.view(bad)
        z.free(h)
    finally:
        arena.zone("other").free(o)


def test_bulk(arena):
    z = arena.zone("z")
    with pytest.raises(ValueError):
        z.alloc_bulk(-1)
    assert z.alloc_bulk(10 ** 6) is None               # past the limit: none, not some
    hs = z.alloc_bulk(3)
    with pytest.raises(BadHandleError):
        z.free_bulk(hs + [5])                          # nothing freed
    with pytest.raises(DoubleFreeError):
        z.free_bulk(hs + hs[:1])
    z.free_bulk(hs)


def test_limits(arena):
    z = arena.zone("z")
    with pytest.raises(ValueError):
        z.set_max(-5)
    hs = z.alloc_bulk(10)
    with pytest.raises(ValueError, match="below"):
        z.set_max(5)
    z.free_bulk(hs)


def test_sysctl(arena):
    with pytest.raises(ShmallocError, match="unknown"):
        arena.sysctl("kern.ipc.nosuch")
    n = arena.sysctl("kern.ipc.nmbclusters")
    with pytest.raises(ShmallocError, match="raised"):
        arena.sysctl("kern.ipc.nmbclusters", n - 1)
    with pytest.raises((TypeError, ShmallocError)):
        arena.sysctl("kern.ipc.nmbclusters", "lots")
    assert arena.sysctl("kern.ipc.nmbclusters") == n


def test_send_recv(arena):
    z, h, o = _handles(arena)
    try:
        with pytest.raises(ValueError):
            arena.send(-1, [h])
        with pytest.raises(ValueError):
            arena.send(10 ** 6, [h])
        with pytest.raises(ShmallocError):
            arena.send(arena.cpu_id, [h + 3])
        with pytest.raises(ShmallocError, match="twice"):
            arena.send(arena.cpu_id, [h, h])
    finally:
        z.free(h)
        arena.zone("other").free(o)
    with pytest.raises(ShmallocError):
        arena.send(arena.cpu_id, [h])                  # freed: not held


def test_mbuf_offsets(arena):
    m = mb.m_getcl(mb.M_NOWAIT, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    try:
        mb.m_append(m, 100, bytes(100))
        for args in ((-1, 10), (0, 101), (200, 1), (0, -5)):
            with pytest.raises(ShmallocError):
                mb.m_copydata(m, *args)
        with pytest.raises(ShmallocError):
            mb.m_copym(m, 500, 10, mb.M_NOWAIT)
    finally:
        mb.m_freem(m)
    with pytest.raises((ShmallocError, TypeError, ValueError)):
        mb.m_getcl(12345, mb.MT_DATA, mb.M_PKTHDR, arena=arena)


@pytest.mark.parametrize("argv", [["nosuch"], ["stat", "--name", "x"], ["launch", "-n", "0"],
                                  ["launch", "--seconds", "100"], ["stress", "--workers", "0"],
                                  ["cleanup"], ["serve"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
