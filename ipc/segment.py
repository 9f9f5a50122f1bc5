"""A POSIX shared-memory segment mapped into this process.

The segment is created mode 0600 and refused on attach unless it belongs to this user and
grants nothing to group or others: the arena's bytes are trusted by every process that
maps them. The mapping stays valid until ``close``; so does the file descriptor, kept to
reserve backing store (``reserve``): a page of a tmpfs file that is touched when the
filesystem is full kills the process with SIGBUS, a reservation that fails is an error.
"""

import errno
import mmap
import os

import posix_ipc

from .errors import ArenaPermissionError, IpcError, NoSpaceError, os_errors, translate
from .naming import SHM_DIR

MODE = 0o600


def _what(name):
    return f"shared memory segment {name}"


class Segment:
    """A mapped shared-memory segment: ``name``, ``size`` and ``buf`` (the mapping).

    ``buf`` is an ``mmap.mmap`` (or a ``bytearray`` for ``anonymous``): it supports the
    buffer protocol and ``find(sub, start, end)``.
    """

    __slots__ = ("name", "size", "buf", "fd", "_reserving")

    def __init__(self, name, size, buf, fd=None):
        self.name = name
        self.size = size
        self.buf = buf
        self.fd = fd
        self._reserving = fd is not None

    def __repr__(self):
        return f"<Segment {self.name or '(anonymous)'} size={self.size}>"

    @classmethod
    def create(cls, name, size):
        """Create and map a new segment of ``size`` bytes, mode 0600.

        Raises ArenaExistsError if ``name`` exists. The segment is removed again if it
        cannot be mapped.
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        with os_errors(_what(name)):
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=MODE, size=size)
            try:
                buf = mmap.mmap(shm.fd, size)
            except BaseException:
                shm.close_fd()
                posix_ipc.unlink_shared_memory(name)
                raise
        return cls(name, size, buf, shm.fd)

    @classmethod
    def attach(cls, name):
        """Map the existing segment ``name``, at its full size.

        Raises ArenaNotFoundError if it does not exist, ArenaPermissionError if it belongs
        to another user or its mode grants any access to group or others.
        """
        what = _what(name)
        with os_errors(what):
            shm = posix_ipc.SharedMemory(name)
            try:
                st = os.fstat(shm.fd)
                if st.st_uid != os.getuid():
                    raise ArenaPermissionError(
                        f"{what} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
                if st.st_mode & 0o077:
                    raise ArenaPermissionError(
                        f"{what} has mode {st.st_mode & 0o777:04o}; "
                        f"only the owner may have access ({MODE:04o})")
                if st.st_size == 0:
                    raise IpcError(f"{what} is empty: its creator died while creating it")
                buf = mmap.mmap(shm.fd, st.st_size)
            except BaseException:
                shm.close_fd()
                raise
        return cls(name, st.st_size, buf, shm.fd)

    @classmethod
    def anonymous(cls, size):
        """A process-private stand-in over a ``bytearray``: no name; ``close`` does nothing."""
        return cls(None, size, bytearray(size))

    def reserve(self, offset, length):
        """Allocate backing store for bytes ``offset .. offset + length`` of the
        segment (``posix_fallocate``), so that touching them later cannot raise
        SIGBUS. NoSpaceError (a MemoryError) when the filesystem behind the
        segment has no room for them; nothing is reserved then. Pages already
        backed cost nothing. A no-op for an anonymous segment, and where the
        filesystem cannot reserve (EOPNOTSUPP: then only touching tells)."""
        if not self._reserving or length <= 0:
            return
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._reserving = False
                return
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                free = shm_free_bytes()
                raise NoSpaceError(
                    errno.ENOSPC, f"{_what(self.name)}: {SHM_DIR} has no room for {length} "
                    f"bytes at offset {offset} ({free} bytes free there)",
                    wanted=length, free=free) from e
            raise translate(e, _what(self.name)) from e

    def close(self):
        """Unmap the segment from this process; the segment itself stays. Idempotent.

        If memoryviews of the mapping are still alive, the mapping cannot be closed
        (mmap raises BufferError); it is then dropped here and unmapped by the garbage
        collector when the last view goes.
        """
        if self.name is None or self.buf is None:
            return
        buf, self.buf = self.buf, None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            self._reserving = False
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            buf.close()
        except BufferError:
            pass

    @staticmethod
    def unlink(name):
        """Remove the segment ``name``; True if removed, False if it did not exist.

        Processes that have it mapped keep their mappings.
        """
        with os_errors(_what(name)):
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                return False
        return True


def shm_free_bytes(path=SHM_DIR):
    """Bytes an unprivileged process may still allocate in ``path`` (the
    filesystem of POSIX shared memory); -1 if it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize
