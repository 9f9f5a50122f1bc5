"""buffer: ``shmalloc.Buffer`` -- bytes in an arena, handed between processes by
reference, with the buffer protocol.

A Buffer is **one reference** to storage in an arena, and the reference is an mbuf
held by this process's CPU (DESIGN: "a reference is always held through an owned
object (an mbuf), never as an anonymous count")::

    Buffer ──> mbuf (held by a CPU) ──M_EXT──> storage ............ nbytes (m_len)
               mbuf (another holder) ──M_EXT─┘  refcount: one per mbuf

Storage, by size (``alloc``), the smallest zone that fits:

    ≤ 2 KiB     a packet: mbuf and 2 KiB cluster in one allocation (``m_getcl``)
    ≤ 16 KiB    an mbuf and a 4, 9 or 16 KiB jumbo cluster (``m_getjcl``)
    larger      an mbuf and an item of a size-class zone ``buf_32k``, ``buf_64k`` ...
                (powers of two, made on first use by whichever process needs one),
                attached with ``m_extadd``; its free routine ``free_storage`` gives
                the item back when the last reference goes

``m_data`` is the first byte and ``m_len`` (= ``m_pkthdr.len``) the length.

Lifetime, reference by reference:

- ``close()`` (also ``with``, and garbage collection) frees this reference's mbuf:
  ``m_freem`` drops the storage's refcount; the last reference frees the storage.
  ``close()`` raises BufferError while memoryviews or numpy arrays of the Buffer
  exist, as ``memoryview.release()`` and ``mmap.close()`` do; a Buffer collected
  while such views live keeps its reference until they are gone (``_reap``).
- Pickling makes a new reference (``m_copym``: refcount + 1) and ``disown``\\ s it;
  the pickle carries (arena name, mbuf handle, length, first byte, a nonce kept in
  ``m_pkthdr.header``).  Unpickling attaches to the arena by name
  (``default.attachment``), ``claim``\\ s the mbuf and clears the nonce: a pickle is
  one reference and loads once.
- A hand-off (``handoff``/``take``/``withdraw``, for engines that move frames
  between processes themselves, such as Dask's comms) is the same new reference
  and nonce, but the sender's CPU keeps holding it until the receiver takes
  it: a sender that dies first has it freed by recovery (the receiver's ``take``
  then refuses), and a receiver that never takes it leaves it to the sender to
  ``withdraw``.  ``take`` and ``withdraw`` check and clear the nonce under the
  mbuf's zone lock (``Arena.claim(check=...)``): exactly one of them succeeds.
- A process that dies holding references: the keg manager frees its mbufs
  (recovery), which drops their references.  Storage items and ``m_extadd``
  refcounts are disowned at allocation -- owned through the mbufs, not by a CPU --
  so recovering a dead CPU never frees storage that others share.
- A process that exits closes its Buffers (``default._exit``).
- A Buffer inherited through ``fork`` is the parent's reference: the child may read
  and write the memory; ``close()`` there forgets the object and frees nothing.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import NamedTuple

from . import default
from .arena import Arena
from .layers import views
from . import layout as L
from ._export import Exporter
from .errors import ArenaClosedError, ArenaFullError, ArenaNotFoundError, ShmallocError, ZoneError
from . import mbuf as mb
from .mbuf.constants import M_EXT, M_PKTHDR, MCLBYTES, MJUM9BYTES, MJUM16BYTES, MJUMPAGESIZE
from .mbuf.header import Mbuf
from .mbuf.zones import ctx as _mbctx
from .zone import M_NOWAIT

__all__ = ["Buffer", "BufferClosedError", "ArenaFullError", "HandoffRefusedError", "Handoff",
           "alloc", "from_bytes", "ndarray", "take", "withdraw", "pending", "arena_token",
           "array_buffer", "array_from_buffer",
           "class_size", "class_name", "free_storage"]

CLASS_MIN = 32 << 10                  # the smallest size class (above the 16 KiB clusters)
BUCKETLESS = 1 << 20                  # size classes this big are not cached per CPU
FREE_STORAGE = "shmalloc.buffer:free_storage"      # m_extadd free routine, by name
_CLUSTERS = (MCLBYTES, MJUMPAGESIZE, MJUM9BYTES, MJUM16BYTES)
_CLUSTER_ZONES = {MCLBYTES: "mbuf_cluster", MJUMPAGESIZE: "mbuf_jumbo_page",
                  MJUM9BYTES: "mbuf_jumbo_9k", MJUM16BYTES: "mbuf_jumbo_16k"}


class BufferClosedError(ArenaClosedError, ValueError):
    """The Buffer was closed (or detached) in this process."""


class HandoffRefusedError(ShmallocError, OSError):
    """A handed-off reference cannot be taken: it was taken already (a frame loaded
    twice), withdrawn by its sender, freed with its sender when that process died,
    made in another arena (or another incarnation of this one), or never made (a
    forged frame).  An ``OSError``, as a connection lost mid-transfer is: an engine
    that fetches data from a peer treats it as that peer failing to deliver, and
    fetches again (elsewhere, or after recomputing)."""


class Handoff(NamedTuple):
    """A reference handed to another process (``Buffer.handoff``): plain data (an
    engine sends it as msgpack), taken once with ``take``."""
    arena: str          # the arena's name
    token: int          # which incarnation of that name (``arena_token``)
    handle: int         # the reference: an mbuf handle
    nbytes: int
    data: int           # the first byte: the storage's offset in the arena
    nonce: int          # one-shot mark, kept in the mbuf's m_pkthdr.header until taken
    cpu: int            # the sender's CPU, which holds the reference until it is taken


# ============================================================================ size classes
def class_size(nbytes: int) -> int:
    """Bytes of the storage a Buffer of ``nbytes`` gets: a cluster size up to
    16 KiB, then a power of two from 32 KiB."""
    for size in _CLUSTERS:
        if nbytes <= size:
            return size
    return max(CLASS_MIN, 1 << (nbytes - 1).bit_length())


def class_name(size: int) -> str:
    """Zone name of a storage size: the mbuf cluster zones, then ``buf_32k`` ...
    ``buf_1m`` ... ``buf_1g``."""
    if size in _CLUSTER_ZONES:
        return _CLUSTER_ZONES[size]
    for unit, suffix in ((1 << 30, "g"), (1 << 20, "m"), (1 << 10, "k")):
        if size >= unit:
            return f"buf_{size // unit}{suffix}"
    return f"buf_{size}"


class _Ctx:
    """What Buffers need of one Arena object: views, storage zones, the largest
    size class the arena can hold, the address of its byte 0 (numpy)."""

    __slots__ = ("mv", "zones", "largest", "base")

    def __init__(self, arena):
        core = views(arena)
        self.mv = core.mv
        self.zones: dict = {}
        room = (core.geometry.data_pages - 1) * L.PAGE_SIZE    # one slab: items + a header page
        self.largest = max(MJUM16BYTES, 1 << (room.bit_length() - 1)) if room > 0 else 0
        self.base = 0


def _ctx(arena) -> _Ctx:
    c = arena.__dict__.get("_bufctx")
    if c is None:
        arena._check_open()
        c = arena._bufctx = _Ctx(arena)
    return c


def _storage_zone(arena, size: int):
    """The size-class zone of ``size`` bytes, made here if no process made it yet."""
    zones = _ctx(arena).zones
    z = zones.get(size)
    if z is not None:
        return z
    name = class_name(size)
    try:
        z = arena.zone(name)
    except ZoneError:
        try:
            z = arena.zcreate(name, size, align=L.PAGE_SIZE,
                              bucket_size=0 if size >= BUCKETLESS else None)
        except ZoneError as e:
            try:
                z = arena.zone(name)           # another process made it meanwhile
            except ZoneError:
                raise ArenaFullError(f"arena {arena.name!r}: cannot make zone {name!r} for "
                                     f"Buffers of {size} bytes: {e}") from None
    zones[size] = z
    return z


def free_storage(m, size: int, _arg2: int) -> None:
    """The ``m_extadd`` free routine of Buffers: the last reference went, the
    storage goes back to its size-class zone (in whichever process drops it, the
    keg manager included).

    The storage is held by no CPU (``m_extadd`` disowned it) and the mbuf dropping
    it has forgotten its count already (``mbuf.refs.drop_ref``: recovery will not
    call this routine again): taken over first, a crash from there on leaves an
    item held by the dying CPU that the core's recovery frees; a crash before
    leaks it (the routine runs at most once)."""
    z = _storage_zone(m.arena, size)
    h = m.m_ext.ext_buf
    z.take_over(h)
    z.free(h)


# ============================================================================ bookkeeping
_lock = threading.RLock()        # re-entrant: a collection inside may run __del__
_live: "weakref.WeakSet[Buffer]" = weakref.WeakSet()   # this process's open Buffers
_zombies: list = []        # (view, arena, handle): collected while views of them lived


def _after_fork_in_child():
    global _lock
    _lock = threading.RLock()
    _live.clear()                      # the parent's references, not ours
    _zombies.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _free_ref(arena, h: int) -> None:
    """Free reference ``h`` (an mbuf this process holds).  An arena closed in this
    process meanwhile left it held by no CPU: nothing to do here."""
    if arena._closed:
        return
    a = arena._here()
    mb.m_freem(Mbuf._wrap(_mbctx(a), h))


def _reap() -> None:
    """Free the references of collected Buffers whose views are gone."""
    if not _zombies:
        return
    with _lock:
        items = _zombies[:]
        _zombies.clear()
    keep = []
    for v, arena, h in items:
        try:
            v.release()
        except BufferError:
            keep.append((v, arena, h))
            continue
        _free_ref(arena, h)
    if keep:
        with _lock:
            _zombies.extend(keep)


def _close_all() -> None:
    """At exit: every reference this process holds goes back, views or not."""
    pid = os.getpid()
    for b in list(_live):
        if b._pid == pid and b._h:
            try:
                b.close()
            except BufferError:            # views outlive the reference: the process ends
                h, b._h = b._h, 0
                _free_ref(b._arena, h)
            except Exception:
                pass
    with _lock:
        items = _zombies[:]
        _zombies.clear()
    for v, arena, h in items:
        try:
            _free_ref(arena, h)
        except Exception:
            pass


default._before_exit.append(_close_all)


def _nonce() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1 | 1


# ============================================================================ Buffer
class Buffer(Exporter):
    """A reference to ``len(buf)`` bytes in an arena.

    Made by ``arena.alloc(n)``, ``arena.from_bytes(data)``, by unpickling, or by
    ``Buffer.from_handle(arena, handle)`` for a reference handed over with
    ``arena.send``.  Supports the buffer protocol (``memoryview(buf)``,
    ``numpy.frombuffer(buf, dtype)``: writable, zero copy), ``len``, indexing and
    slice assignment, ``with``.  Pickling takes a new reference owned by whoever
    unpickles it.  Every holder closes its own; the storage is freed when the last
    reference closes.  The memory is shared and writable by every holder: order
    writers and readers yourself (a queue, a lock, ``send``/``recv``).
    """

    __slots__ = ("_arena", "_h", "_nbytes", "_data", "_pid", "__weakref__")

    def __init__(self, *args, **kwargs):
        raise TypeError("Buffers are made by arena.alloc(n), arena.from_bytes(data), "
                        "Buffer.from_handle(arena, handle) or unpickling")

    @classmethod
    def _make(cls, arena, h: int, nbytes: int, data: int) -> "Buffer":
        b = Exporter.__new__(cls)
        b._arena = arena
        b._h = h
        b._nbytes = nbytes
        b._data = data
        b._pid = os.getpid()
        b._view_buf = None
        b._view_obj = _ctx(arena).mv[data:data + nbytes]
        _live.add(b)
        return b

    @classmethod
    def from_handle(cls, arena, handle: int) -> "Buffer":
        """The Buffer of reference ``handle`` (an mbuf this CPU holds: handed over
        with ``arena.send`` and taken with ``arena.recv``)."""
        a = arena._here()
        m = Mbuf.from_handle(a, handle)
        if not m.m_flags & M_EXT or not m.m_flags & M_PKTHDR:
            raise ShmallocError(f"arena {arena.name!r}: mbuf {handle} is not a Buffer's "
                                f"reference (no packet header or no storage)")
        a._held_item(handle)               # ShmallocError unless this CPU holds it
        default.register(arena)
        return cls._make(arena, m.handle, m.m_len, m.m_data)

    # ---------------------------------------------------------------- state
    def _open(self) -> int:
        h = self._h
        if not h:
            raise BufferClosedError("the Buffer is closed")
        return h

    @property
    def closed(self) -> bool:
        return not self._h

    @property
    def handle(self) -> int:
        """This reference's handle (the mbuf's), valid in every process of the arena."""
        return self._open()

    @property
    def nbytes(self) -> int:
        self._open()
        return self._nbytes

    def __len__(self) -> int:
        self._open()
        return self._nbytes

    @property
    def arena(self):
        return self._arena

    @property
    def offset(self) -> int:
        """Byte offset of the first byte in the arena (the storage's handle)."""
        self._open()
        return self._data

    @property
    def zone(self) -> str:
        """Name of the zone the storage comes from (``mbuf_cluster`` ... ``buf_1m``)."""
        m = Mbuf._wrap(_mbctx(self._arena._here()), self._open())
        return class_name(m.m_ext.ext_size)

    @property
    def refcnt(self) -> int:
        """References to the storage, in every process (pickles not yet loaded count)."""
        return Mbuf._wrap(_mbctx(self._arena._here()), self._open()).refcnt

    def __repr__(self):
        if not self._h:
            return "<shmalloc.Buffer closed>"
        try:
            extra = f" zone={self.zone} refcnt={self.refcnt}"
        except Exception:
            extra = ""
        return (f"<shmalloc.Buffer {self._nbytes} bytes in {self._arena.name!r} "
                f"handle={self._h}{extra}>")

    # ---------------------------------------------------------------- data
    def __buffer__(self, flags: int) -> memoryview:          # PEP 688 (3.12+)
        self._open()
        return self._view_obj

    def __getitem__(self, key):
        """An int for an index, bytes (a copy) for a slice, as ``mmap`` does."""
        self._open()
        r = self._view_obj[key]
        return bytes(r) if isinstance(r, memoryview) else r

    def __setitem__(self, key, value) -> None:
        self._open()
        self._view_obj[key] = value

    def tobytes(self) -> bytes:
        self._open()
        return self._view_obj.tobytes()

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Drop this reference (the storage goes when the last one does).  Idempotent.
        BufferError while memoryviews or numpy arrays of it exist."""
        with _lock:
            h = self._h
            if not h:
                return
            try:
                self._view_obj.release()
            except BufferError:
                if self._pid == os.getpid():
                    raise BufferError(
                        f"Buffer {h} cannot be closed while memoryviews or numpy arrays "
                        f"of it exist: release them first (or drop the Buffer: it then "
                        f"closes when the last view goes)") from None
            self._h = 0
        _live.discard(self)
        if self._pid == os.getpid():       # else: inherited through fork, the parent's
            _free_ref(self._arena, h)
        _reap()

    def detach(self) -> int:
        """Stop managing this reference without dropping it and return its handle
        (after ``arena.send(cpu, [buf.handle])`` the reference is the receiver's).
        The Buffer is closed afterwards."""
        with _lock:
            h = self._open()
            try:
                self._view_obj.release()
            except BufferError:
                raise BufferError(f"Buffer {h} cannot be detached while memoryviews or "
                                  f"numpy arrays of it exist") from None
            self._h = 0
        _live.discard(self)
        return h

    def __enter__(self) -> "Buffer":
        self._open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            h = self._h
            if not h or self._pid != os.getpid():
                return
            try:
                self._view_obj.release()
            except BufferError:              # views live on: free when they are gone
                with _lock:
                    _zombies.append((self._view_obj, self._arena, h))
                self._h = 0
                return
            self._h = 0
            _free_ref(self._arena, h)
        except Exception:
            pass

    # ---------------------------------------------------------------- pickling, hand-off
    def _new_reference(self, what: str):
        """A new reference to the storage (``m_copym``: refcount + 1), held by the
        calling thread's CPU and marked with a fresh nonce: (that CPU's arena, the
        new mbuf, the nonce)."""
        h = self._h
        if not h:
            raise BufferClosedError(
                f"a closed Buffer cannot be {what} (multiprocessing.Queue.put pickles "
                "later, in a feeder thread: do not close a Buffer right after put(); drop "
                "it instead -- `del buf` -- and it closes once the queue has sent it)")
        arena = self._arena
        if views(arena).backend.local:
            raise TypeError(f"a Buffer of a local arena (Arena.create_local) cannot be "
                            f"{what}: no other process can attach that arena")
        a = arena._here()
        m = Mbuf._wrap(_mbctx(a), h)
        n = mb.m_copym(m, 0, mb.M_COPYALL, M_NOWAIT)
        if n is None:
            raise ArenaFullError(f"arena {arena.name!r}: no mbuf for the new reference a "
                                 f"{what} Buffer carries (kern.ipc.nmbufs reached?)")
        nonce = _nonce()
        n.m_pkthdr.header = nonce
        return a, n, nonce

    def __reduce__(self):
        a, n, nonce = self._new_reference("pickled")
        a.disown(n.handle)
        return _rebuild, (self._arena.name, n.handle, self._nbytes, n.m_data, nonce)

    def handoff(self) -> Handoff:
        """A new reference for another process, which takes it once with ``take``.
        Until then the calling thread's CPU holds it: if this process dies first,
        the keg manager frees it with the rest of this process's references (and
        ``take`` refuses); if the receiver never takes it, ``withdraw`` gives it
        back.  Whoever takes it owns it, like the receiver of a pickle."""
        a, n, nonce = self._new_reference("handed off")
        return Handoff(self._arena.name, arena_token(self._arena), n.handle, self._nbytes,
                       n.m_data, nonce, a.cpu_id)


def _claim_reference(arena, handle: int, nbytes: int, data: int, nonce: int,
                     holder: int | None) -> bool:
    """Make reference ``handle`` (marked with ``nonce``, describing ``nbytes`` at
    ``data``) the calling thread's, clearing the mark; False if it is not (any
    more) such a reference.  ``holder``: the CPU that may still hold it (a
    hand-off), None for a reference held by none (a pickle).  The mark is checked
    and cleared under the mbuf's zone lock, inside ``Arena.claim``."""
    if nonce <= 0:                         # 0 marks every reference nobody handed off
        return False
    a = arena._here()
    try:
        m = Mbuf.from_handle(a, handle)
    except ShmallocError:
        return False

    def marked() -> bool:                  # Lock: the mbuf's zone lock, held
        if (m.m_flags & M_EXT and m.m_flags & M_PKTHDR and m.m_pkthdr.header == nonce
                and m.m_data == data and m.m_len == nbytes):
            m.m_pkthdr.header = 0
            return True
        return False

    try:
        a.claim(handle, holder=holder, check=marked)
    except ShmallocError:
        return False
    return True


def _rebuild(name: str, handle: int, nbytes: int, data: int, nonce: int) -> Buffer:
    """Unpickle: claim the reference the pickle carries, in this process's CPU."""
    try:
        arena = default.attachment(name)
    except ArenaNotFoundError:
        raise ArenaNotFoundError(f"cannot load a pickled Buffer of arena {name!r}: the arena "
                                 f"does not exist (any more)") from None
    _reap()
    if not _claim_reference(arena, handle, nbytes, data, nonce, None):
        raise ShmallocError(f"pickled Buffer (arena {name!r}, reference {handle}) was loaded "
                            f"already: a pickle carries one reference and loads once")
    return Buffer._make(arena, handle, nbytes, data)


# ============================================================================ hand-off
def arena_token(arena) -> int:
    """A number that tells this arena from any other of the same name, made before
    or after it on this machine (its creation time in ns)."""
    return views(arena).w[L.HDR["CREATED_NS"]]


def _as_handoff(h) -> Handoff:
    """``h`` as a Handoff, or HandoffRefusedError if it is not one (a forged frame)."""
    try:
        out = Handoff(*h)
    except TypeError:
        out = None
    if out is None or type(out.arena) is not str or not all(type(v) is int for v in out[1:]):
        raise HandoffRefusedError(f"not a hand-off: {h!r:.200}")
    return out


def _handoff_arena(h: Handoff):
    """This process's attachment to the arena of hand-off ``h``, or
    HandoffRefusedError when that arena is not here (any more)."""
    try:
        arena = default.attachment(h.arena)
    except (ArenaNotFoundError, ArenaClosedError):
        raise HandoffRefusedError(f"reference {h.handle} of arena {h.arena!r}: no such arena "
                                  f"here (another host, or it was removed)") from None
    if arena_token(arena) != h.token:
        raise HandoffRefusedError(f"reference {h.handle} of arena {h.arena!r}: made in another "
                                  f"incarnation of that arena (it was removed and made anew)")
    return arena


def take(h) -> Buffer:
    """The Buffer of hand-off ``h`` (a ``Handoff`` or the same fields as a sequence),
    owned from now on by the calling process; HandoffRefusedError if it was taken
    already, withdrawn, freed with its dead sender, or never made."""
    h = _as_handoff(h)
    arena = _handoff_arena(h)
    _reap()
    if not _claim_reference(arena, h.handle, h.nbytes, h.data, h.nonce, h.cpu):
        raise HandoffRefusedError(
            f"reference {h.handle} of arena {h.arena!r} cannot be taken: taken already (a "
            f"hand-off loads once), withdrawn by its sender, freed with its sender when that "
            f"process died, or never made")
    return Buffer._make(arena, h.handle, h.nbytes, h.data)


def withdraw(h) -> bool:
    """Give back hand-off ``h`` if nobody took it yet (its sender calls this when the
    receiver died or gave up): True if it was still pending, and is freed now;
    False if it was taken (or is gone)."""
    h = _as_handoff(h)
    try:
        arena = _handoff_arena(h)
    except HandoffRefusedError:
        return False
    if not _claim_reference(arena, h.handle, h.nbytes, h.data, h.nonce, h.cpu):
        return False
    _free_ref(arena, h.handle)
    return True


def pending(h) -> bool:
    """True while hand-off ``h`` is neither taken nor withdrawn (a read without a
    lock: it may turn False at any moment, never back to True)."""
    try:
        h = _as_handoff(h)
    except HandoffRefusedError:
        return False
    arena = default._arenas.get(h.arena)
    if h.nonce <= 0 or arena is None or arena._closed or arena_token(arena) != h.token:
        return False
    try:
        m = Mbuf.from_handle(arena._here(), h.handle)
        return m.m_pkthdr.header == h.nonce and m.m_data == h.data and m.m_len == h.nbytes
    except ShmallocError:
        return False


# ============================================================================ allocation
def _check_nbytes(arena, nbytes) -> int:
    if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__"):
        raise TypeError(f"a Buffer's size is an int, not {type(nbytes).__name__}")
    n = nbytes.__index__()
    if n < 0:
        raise ValueError(f"a Buffer's size must be >= 0, not {n}")
    largest = _ctx(arena).largest
    if n > largest:
        raise ValueError(f"a Buffer of {n} bytes cannot fit in arena {arena.name!r} "
                         f"({arena.size} bytes): the largest Buffer it can hold is "
                         f"{largest} bytes; make a larger arena (Arena.create(name, size=...) "
                         f"or $SHMALLOC_SIZE for the default arena)")
    return n


def _alloc_mbuf(a, size: int):
    """An mbuf with storage of ``size`` bytes (``class_size``), or None."""
    if size == MCLBYTES:
        return mb.m_getcl(M_NOWAIT, mb.MT_DATA, M_PKTHDR, arena=a)
    if size <= MJUM16BYTES:
        return mb.m_getjcl(M_NOWAIT, mb.MT_DATA, M_PKTHDR, size, arena=a)
    z = _storage_zone(a, size)
    s = z.alloc(M_NOWAIT)
    if s is None:
        return None
    m = None
    try:
        m = mb.m_gethdr(M_NOWAIT, mb.MT_DATA, arena=a)
        if m is None or mb.m_extadd(m, s, size, FREE_STORAGE, size, 0) != 0:
            if m is not None:
                mb.m_free(m)
            z.free(s)
            return None
    except BaseException:
        if m is not None and not m.m_flags & M_EXT:
            mb.m_free(m)
            z.free(s)
        raise
    return m                           # m_extadd disowned the storage and its count:
                                       # owned through the references, not by this CPU


def alloc(arena, nbytes: int) -> Buffer:
    """A Buffer of ``nbytes`` bytes (``arena.alloc``); ArenaFullError when there is
    no room now, ValueError for a size the arena can never hold."""
    arena._check_open()
    n = _check_nbytes(arena, nbytes)
    _reap()
    a = arena._here()
    size = class_size(n)
    try:
        m = _alloc_mbuf(a, size)
    except ArenaFullError:             # /dev/shm could not back new pages: pages given
        m = None                       # back below are backed already
    if m is None:
        a.reclaim()                    # cached and depot items, empty slabs: back to pages
        m = _alloc_mbuf(a, size)
        if m is None:
            raise ArenaFullError(_full_message(a, n, size))
    m.m_len = n
    m.m_pkthdr.len = n
    default.register(arena)
    return Buffer._make(arena, m.handle, n, m.m_data)


def _full_message(a, n: int, size: int) -> str:
    name = class_name(size)
    msg = f"arena {a.name!r} has no room for a Buffer of {n} bytes (zone {name!r}"
    try:
        s = a.zone_stats(name)
        if s.limit:
            msg += f": {s.used} of its limit {s.limit} in use"
        total = views(a).geometry.data_pages
        msg += f"; {a.free_pages} of {total} pages free)"
    except Exception:
        msg += ")"
    return msg + ("; close Buffers no longer needed, or use a larger arena (size=, "
                  "$SHMALLOC_SIZE)")


def from_bytes(arena, data) -> Buffer:
    """A Buffer holding a copy of ``data`` (any bytes-like object)."""
    with memoryview(data) as src:
        flat = src.cast("B") if src.c_contiguous else memoryview(src.tobytes())
        buf = alloc(arena, flat.nbytes)
        buf._view_obj[:] = flat
    return buf


# ============================================================================ numpy
class _ArrayOwner:
    """The base object of the numpy arrays of ``arena.ndarray``: numpy takes the
    address from ``__array_interface__``.  It holds the Buffer and a view of it
    (so that the Buffer cannot be closed under the arrays); when the last array
    goes, the view is released first and the Buffer, collected, closes."""

    __slots__ = ("__array_interface__", "_pin", "buffer")

    def __init__(self, buf: Buffer):
        c = _ctx(buf._arena)
        if not c.base:
            import ctypes
            probe = ctypes.c_char.from_buffer(c.mv)
            c.base = ctypes.addressof(probe)
            del probe
        self.buffer = buf
        self._pin = memoryview(buf)
        self.__array_interface__ = {"shape": (buf._nbytes,), "typestr": "|u1", "version": 3,
                                    "data": (c.base + buf._data, False)}

    def __del__(self):
        try:
            self._pin.release()
        except Exception:
            pass


_shared_array = None


def shared_array_class():
    """``shmalloc.SharedArray`` (made on first use: numpy is optional)."""
    global _shared_array
    if _shared_array is not None:
        return _shared_array
    import numpy as np

    class SharedArray(np.ndarray):
        """A numpy array in an arena (``arena.ndarray``).  Pickled as a new
        reference to the same memory, not as bytes: a worker that receives it
        reads and writes the caller's array.  Its Buffer closes when the last
        array viewing it goes.  Arrays that do not view an arena (results of
        arithmetic) pickle as ordinary arrays."""

        def __reduce_ex__(self, protocol):
            owner = _owner_of(self)
            if owner is None:
                return np.asarray(self).__reduce_ex__(protocol)
            off = self.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
            return _rebuild_array, (owner.buffer, off, self.shape, self.strides, self.dtype)

        def __reduce__(self):
            return self.__reduce_ex__(2)

        @property
        def buffer(self):
            """The Buffer this array views (None when it views none)."""
            owner = _owner_of(self)
            return None if owner is None else owner.buffer

    SharedArray.__module__, SharedArray.__qualname__ = "shmalloc", "SharedArray"
    _shared_array = SharedArray
    return SharedArray


def _owner_of(arr):
    """The _ArrayOwner at the end of ``arr``'s chain of bases, or None."""
    b = arr
    for _ in range(100):
        try:
            b = b.obj if isinstance(b, memoryview) else getattr(b, "base", None)
        except ValueError:                 # a released memoryview
            return None
        if b is None or isinstance(b, _ArrayOwner):
            return b
    return None


def _rebuild_array(buf: Buffer, offset: int, shape, strides, dtype):
    import numpy as np
    flat = np.asarray(_ArrayOwner(buf))
    arr = np.ndarray(shape, dtype, buffer=flat, offset=offset, strides=strides)
    return arr.view(shared_array_class())


def array_buffer(arr):
    """(Buffer, byte offset of the first element in it) of a numpy array that views a
    Buffer (``arena.ndarray`` and any view of one), else None."""
    owner = _owner_of(arr)
    if owner is None or owner.buffer.closed:
        return None
    return owner.buffer, (arr.__array_interface__["data"][0]
                          - owner.__array_interface__["data"][0])


def array_from_buffer(buf: Buffer, offset: int, shape, strides, dtype):
    """A ``SharedArray`` over ``buf`` (what unpickling one makes): numpy checks
    that ``shape``, ``strides`` and ``offset`` stay within the Buffer.  The array
    holds the Buffer; it closes when the last array viewing it goes."""
    return _rebuild_array(buf, offset, tuple(shape), tuple(strides), dtype)


def ndarray(arena, shape, dtype=float, order: str = "C"):
    """A ``SharedArray`` of ``shape`` and ``dtype`` in a new Buffer (uninitialised,
    like ``numpy.empty``)."""
    try:
        import numpy as np
    except ImportError:
        raise ImportError("arena.ndarray needs numpy (pip install numpy)") from None
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects: it cannot live in shared memory")
    shape = (shape,) if hasattr(shape, "__index__") else tuple(shape)
    count = math.prod(int(d) for d in shape)
    if count < 0 or any(int(d) < 0 for d in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    buf = alloc(arena, count * dt.itemsize)
    flat = np.asarray(_ArrayOwner(buf))
    return flat.view(dt).reshape(shape, order=order).view(shared_array_class())


# the arena's facade: arena.alloc(n), arena.from_bytes(data), arena.ndarray(shape)
Arena.extend(alloc)
Arena.extend(from_bytes)
Arena.extend(ndarray)
