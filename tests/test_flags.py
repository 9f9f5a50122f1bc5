"""flags: what an allocation may ask (``how``: exactly one of M_NOWAIT and
M_WAITOK, on the fast path and the slow), M_ZERO (zero-filled, after the ctor), and a
handle that is not an integer (TypeError).  One process, on a local arena."""

import pytest

from core_helpers import arena, hooked_zone, hooks, two_zones
from shmalloc import M_NOWAIT, M_WAITOK, M_ZERO


# ============================================================================ how
@pytest.mark.parametrize("how", [0, M_ZERO, M_NOWAIT | M_WAITOK])
def test_alloc_without_exactly_one_wait_flag_is_refused_on_a_cache_miss(arena, how):
    z = arena.zcreate("how", 256)
    with pytest.raises(ValueError):
        z.alloc(how)
    arena.check()


def test_alloc_without_exactly_one_wait_flag_is_refused_on_a_cache_hit(arena):
    z = arena.zcreate("how", 256)
    z.free(z.alloc(M_NOWAIT))                  # the cache holds items now
    with pytest.raises(ValueError):
        z.alloc(0)


# ============================================================================ M_ZERO
def test_m_zero_hands_out_a_zeroed_item(arena):
    z = arena.zcreate("zero", 256, bucket_size=4)
    hs = z.alloc_bulk(4, M_NOWAIT)
    for h in hs:
        z.view(h)[:] = b"\xff" * 256
    z.free_bulk(hs)
    h = z.alloc(M_NOWAIT | M_ZERO)
    assert h in hs                            # a dirty item from the cache
    assert bytes(z.view(h)) == bytes(256)


def test_m_zero_zeroes_after_the_ctor(arena, hooks):
    z = hooked_zone(arena)
    hooks.ctor_fill = 0xAB
    h = z.alloc(M_NOWAIT)
    assert bytes(z.view(h)) == b"\xab" * 256
    z.free(h)
    h = z.alloc(M_NOWAIT | M_ZERO)
    assert hooks.events("ctor", h)
    assert bytes(z.view(h)) == bytes(256)


# ============================================================================ handles
@pytest.mark.parametrize("bad", [1.5, "4096", None, True, b"\0"])
def test_free_of_a_non_int_raises_type_error(arena, two_zones, bad):
    z, _, h, _ = two_zones
    with pytest.raises(TypeError) as e:
        z.free(bad)
    assert repr(z.name) in str(e.value)
    assert type(bad).__name__ in str(e.value)
    arena.check()


def test_type_error_message_names_the_handle(arena, two_zones):
    z, _, _, _ = two_zones
    with pytest.raises(TypeError) as e:
        z.free(1.5)
    assert "1.5" in str(e.value)
