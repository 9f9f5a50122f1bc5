"""The exceptions of the mbuf layer; both are ShmallocError subclasses."""

from __future__ import annotations

import errno as _errno

from ..errors import ShmallocError


class MbufError(ShmallocError, ValueError):
    """An mbuf call FreeBSD would panic on (a KASSERT): an offset or length outside
    the chain, an mbuf in the wrong state for the call, a refcount out of range.
    Nothing was changed when it is raised."""


class SysctlError(ShmallocError):
    """A sysctl refused, with the errno sysctl(3) would set: ``ENOENT`` for an
    unknown name, ``EINVAL`` for a value that lowers a limit, ``EPERM`` for a
    read-only one."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno

    @property
    def strerror(self) -> str:
        return {_errno.ENOENT: "unknown oid", _errno.EINVAL: "Invalid argument",
                _errno.EPERM: "Operation not permitted"}.get(self.errno, str(self))
