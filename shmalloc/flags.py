"""flags: what a caller asks of an allocation, and the checks of what it passes.

An allocation's ``how`` is malloc(9)'s: ``M_NOWAIT`` (fail at once, counted as a
failure: case A3) or ``M_WAITOK`` (sleep until an item is free: case A4), either
optionally ``| M_ZERO`` (the item zero-filled after the ctor).  ``check_how``
refuses anything else; ``as_handle`` refuses a handle that is not an integer.

The flags sit below ``cache`` (whose slow paths check them) and ``zone`` (the
public face, which re-exports them); they touch no shared state.
"""

from __future__ import annotations

import operator

M_NOWAIT = 0x0001
M_WAITOK = 0x0002
M_ZERO = 0x0100


def as_handle(h, zone_name: str) -> int:
    """``h`` as an int handle; TypeError for anything that is not an integer."""
    if isinstance(h, bool) or not hasattr(h, "__index__"):
        raise TypeError(f"zone {zone_name!r}: a handle is an int, not "
                        f"{type(h).__name__} ({h!r:.40})")
    return operator.index(h)


def check_how(how, zone_name: str) -> None:
    """``how`` must be M_NOWAIT or M_WAITOK, optionally with M_ZERO."""
    if isinstance(how, bool) or not isinstance(how, int):
        raise TypeError(f"zone {zone_name!r}: how is an int flag, not {type(how).__name__}")
    if how & ~(M_NOWAIT | M_WAITOK | M_ZERO) or (how & (M_NOWAIT | M_WAITOK)) in (0, 3):
        raise ValueError(f"zone {zone_name!r}: how must be M_NOWAIT or M_WAITOK (optionally "
                         f"| M_ZERO), not {how:#x}")
