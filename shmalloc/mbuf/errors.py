"""The exceptions of the mbuf layer (ShmallocError subclasses); SysctlError is the
core's sysctl error, re-exported."""

from __future__ import annotations

from ..errors import ShmallocError, SysctlError  # noqa: F401 (SysctlError: the core's, kept here)


class MbufError(ShmallocError, ValueError):
    """An mbuf call FreeBSD would panic on (a KASSERT): an offset or length outside
    the chain, an mbuf in the wrong state for the call, a refcount out of range.
    Nothing was changed when it is raised."""

