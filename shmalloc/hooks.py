"""Named hooks: ctor, dtor, init and fini are stored in shared memory by *name*
(``"package.module:function"``, as the mbuf layer's are, or a name registered with
:func:`register` in every process that uses the zone) and resolved in each
process, which imports the module the name gives.

Signatures (``zone`` is the process's :class:`~shmalloc.zone.Zone`)::

    ctor(zone, handle, arg, how) -> None | bool   # False fails the allocation
    dtor(zone, handle, arg) -> None
    init(zone, handle, how) -> None | bool        # False fails the import
    fini(zone, handle) -> None

Across a crash a hook may run again for the same item (the tag says the step
was under way): write dtor and fini so that a repeat is harmless.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .errors import HookError

# dtor argument flag: the item's holder CPU died and a supervisor frees what it held
# (``recovery``).  A dtor that would refuse an item still holding references (an mbuf
# with its cluster) gives them back instead; one that raises leaves the item allocated.
DTOR_RECOVER = 1 << 62

_registry: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> Callable:
    """Make ``fn`` resolvable as ``name`` in this process (each process that uses
    the zone must register it too: a module-qualified name needs no registration)."""
    _registry[name] = fn
    return fn


def name_of(hook) -> str:
    """The name to store for ``hook`` (a name, or a module-level function)."""
    if hook is None:
        return ""
    if isinstance(hook, str):
        resolve(hook)
        return hook
    if callable(hook):
        for name, fn in _registry.items():
            if fn is hook:
                return name
        mod, qual = getattr(hook, "__module__", None), getattr(hook, "__qualname__", "")
        if not mod or "<" in qual or mod == "__main__":
            raise HookError(f"hook {hook!r} has no importable name; pass 'package.module:function' "
                            "or register() it, so that other processes can resolve it")
        name = f"{mod}:{qual}"
        if resolve(name) is not hook:
            raise HookError(f"hook name {name} does not resolve to {hook!r}")
        return name
    raise TypeError(f"a hook is a name or a function, not {type(hook).__name__}")


def resolve(name: str) -> Callable | None:
    if not name:
        return None
    fn = _registry.get(name)
    if fn is not None:
        return fn
    mod, sep, attr = name.partition(":")
    if not sep or not mod or not attr:
        raise HookError(f"hook name {name!r} is neither registered nor 'package.module:function'")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise HookError(f"hook {name!r} cannot be resolved in this process: {e}") from e
    if not callable(obj):
        raise HookError(f"hook {name!r} is not callable")
    return obj
