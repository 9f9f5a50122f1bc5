"""Zone hooks for the tests: module-level functions, so that a zone can store
them by name ("tests.hooks_mod:ctor" style) and any process can resolve them.

Every hook appends ``(event, zone name, handle)`` to ``calls``.  Switches make a
hook fail (return False) or raise; ``reset()`` turns them all off and clears the
record.  The ``model_*`` hooks serve tests/test_model.py and keep their own
counters.
"""

calls = []              # (event, zone name, handle[, arg, how])

# switches of the recording hooks
ctor_fails = False      # ctor returns False
ctor_raises = False     # ctor raises HookBoom
dtor_raises = False     # dtor raises HookBoom
fini_raises = False     # fini raises HookBoom
init_fail_at = 0        # the init_fail_at-th init call (1-based) returns False; 0: never
init_raise_at = 0       # the init_raise_at-th init call raises HookBoom; 0: never
init_fails = False      # every init returns False
ctor_fail_at = 0        # the ctor_fail_at-th ctor call (1-based) returns False; 0: never
ctor_fill = None        # a byte the ctor writes over the whole item, or None
ctor_count = init_count = 0

# model hooks (tests/test_model.py)
model_ctor_fails = False
model_init_every = 5    # every model_init_every-th init call returns False
model_init_calls = 0
model_init_ok = 0
model_init_failures = 0
model_fini_calls = 0


class HookBoom(RuntimeError):
    """Raised by a hook whose raise switch is on."""


def reset():
    global ctor_fails, ctor_raises, dtor_raises, fini_raises, init_fail_at, init_raise_at
    global ctor_fail_at, ctor_fill, ctor_count, init_count, init_fails
    global model_ctor_fails, model_init_every, model_init_calls, model_init_ok
    global model_init_failures, model_fini_calls
    calls.clear()
    ctor_fails = ctor_raises = dtor_raises = fini_raises = init_fails = False
    init_fail_at = init_raise_at = init_count = ctor_fail_at = ctor_count = 0
    ctor_fill = None
    model_ctor_fails = False
    model_init_every = 5
    model_init_calls = model_init_ok = model_init_failures = model_fini_calls = 0


def events(kind=None, handle=None):
    """The recorded events, optionally only of one kind and/or one handle."""
    return [c for c in calls
            if (kind is None or c[0] == kind) and (handle is None or c[2] == handle)]


# ---------------------------------------------------------------- recording hooks
def ctor(zone, handle, arg, how):
    global ctor_count
    ctor_count += 1
    calls.append(("ctor", zone.name, handle, arg, how))
    if ctor_raises:
        raise HookBoom(f"ctor of {handle}")
    if ctor_fill is not None:
        zone.view(handle)[:] = bytes([ctor_fill]) * zone.size
    return not (ctor_fails or ctor_fail_at and ctor_count == ctor_fail_at)


def dtor(zone, handle, arg):
    calls.append(("dtor", zone.name, handle, arg))
    if dtor_raises:
        raise HookBoom(f"dtor of {handle}")


def init(zone, handle, how):
    global init_count
    init_count += 1
    calls.append(("init", zone.name, handle, how))
    if init_raise_at and init_count == init_raise_at:
        raise HookBoom(f"init of {handle}")
    return not (init_fails or init_fail_at and init_count == init_fail_at)


def fini(zone, handle):
    calls.append(("fini", zone.name, handle))
    if fini_raises:
        raise HookBoom(f"fini of {handle}")


# ---------------------------------------------------------------- a zone whose init
# takes an item of another zone (the packet pattern: a pair holds a part of zone
# "parts", taken by its init with the caller's how, given back by its fini)
def pair_init(zone, handle, how):
    part = zone.arena.zone("parts").alloc(how)
    calls.append(("pair_init", zone.name, handle, how, part))
    if part is None:
        return False
    zone.view(handle)[:8] = part.to_bytes(8, "little")
    return True


def pair_fini(zone, handle):
    part = int.from_bytes(zone.view(handle)[:8], "little")
    calls.append(("pair_fini", zone.name, handle, part))
    if part:
        zone.view(handle)[:8] = bytes(8)
        zone.arena.zone("parts").free(part)


def pair_part(zone, handle) -> int:
    return int.from_bytes(zone.view(handle)[:8], "little")


# ---------------------------------------------------------------- model hooks
def model_ctor(zone, handle, arg, how):
    return not model_ctor_fails


def model_init(zone, handle, how):
    global model_init_calls, model_init_ok, model_init_failures
    model_init_calls += 1
    if model_init_every and model_init_calls % model_init_every == 0:
        model_init_failures += 1
        return False
    model_init_ok += 1
    return True


def model_fini(zone, handle):
    global model_fini_calls
    model_fini_calls += 1
