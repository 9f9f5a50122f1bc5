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
                attached as ``m_extadd`` attaches storage (``_alloc_class``), with a
                count from mbuf_ext_refcnt; its free routine ``free_storage`` gives
                the item back when the last reference goes

``m_data`` is the first byte and ``m_len`` (= ``m_pkthdr.len``) the length.

The fast paths (``alloc``, ``close`` through ``_drop``, ``__reduce__`` through
``_copy_ref``) call the zones' own fast paths and write the mbuf's words directly,
in the thread that owns the arena's CPU; anything else (another thread, a forked
child, a full zone, an mbuf that is not a Buffer's plain one) takes the mbuf API
(``m_getcl``, ``m_freem``, ``m_copym``).  A Buffer's bookkeeping is one entry in
``_open`` (a weak reference by ``id``): whoever pops it frees the reference, so
two threads closing one Buffer free it once.

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
  (recovery), which drops their references.  A size class's storage and its count
  are held by the CPU that made them while its one reference names them (their
  free is a fast-path free; killed, that CPU's recovery frees them, through the
  mbuf or, unnamed yet, as items of its own); the first copy of the reference
  (pickle, hand-off, ``m_copym``) or ``detach`` disowns them first
  (``refs.disown_storage``) -- owned through the mbufs from then on, not by a CPU
  -- so recovering a dead CPU never frees storage that others share.
- A process that exits closes its Buffers (``default._exit``).
- A Buffer inherited through ``fork`` is the parent's reference: the child may read
  and write the memory; ``close()`` there forgets the object and frees nothing.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from array import array
from threading import get_ident
from typing import NamedTuple

from . import default
from .arena import Arena
from .layers import views
from . import layout as L
from ._export import Exporter
from .errors import ArenaClosedError, ArenaFullError, ArenaNotFoundError, ShmallocError, ZoneError
from . import mbuf as mb
from .mbuf import ctors as _ctors
from .mbuf.constants import (EXT_NET_DRV, EXT_PACKET, M_COPYFLAGS, M_EXT, M_PKTHDR, MCLBYTES,
                             MJUM9BYTES, MJUM16BYTES, MJUMPAGESIZE, MSIZE, MT_DATA,
                             MT_NOINIT, MT_NOTMBUF)
from .mbuf.alloc import _free as _mfree
from .mbuf.header import Mbuf
from .mbuf.refs import _dupcl, disown_storage
from .mbuf.zones import (BTYPE, DATA, E, EXT_ARG2, EXT_BUF, EXT_END, EXT_FREE, EXT_OWNER,
                         EXT_REFCNT, EXT_SIZE, EXT_TYPE, FLAGS, FLAGS_MASK, M_PKTDAT, NEXT,
                         PACK_VERIFIED, PH, PH_HEADER, PH_LEN, PH_TAGS, PKTHDR_END, TYPE_SHIFT,
                         ULEN)
from .mbuf.zones import ctx as _mbctx
from .zone import M_NOWAIT

__all__ = ["Buffer", "BufferClosedError", "ArenaFullError", "HandoffRefusedError", "Handoff",
           "alloc", "from_bytes", "ndarray", "take", "withdraw", "pending", "arena_token",
           "array_buffer", "array_from_buffer",
           "class_size", "class_name", "free_storage"]

CLASS_MIN = 32 << 10                  # the smallest size class (above the 16 KiB clusters)
BUCKETLESS = 1 << 20                  # size classes from here on: a fixed bucket of one item,
CACHE_SHARE = 8                       # if two items take at most 1/CACHE_SHARE of the arena;
                                      # larger ones are not cached per CPU
FREE_STORAGE = "shmalloc.buffer:free_storage"      # m_extadd free routine, by name
STORAGE_MARK = 0x5348_4D42_5546_0001  # ext_arg2 of a Buffer's size-class storage ("SHMBUF")
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
    """What Buffers need of one Arena object (one CPU): views, storage zones, the
    largest size class the arena can hold, the address of its byte 0 (numpy), and
    what the fast paths of ``alloc``, ``close`` and pickling use -- the fast paths
    of the mbuf zones (the packet zone for Buffers up to 2 KiB, the mbuf and
    ``mbuf_ext_refcnt`` zones for the size classes), this CPU's tag words and the
    page table (``Keg.tag_index_of``, inlined)."""

    __slots__ = ("mv", "zones", "largest", "base", "c", "w", "u32", "pt", "classes",
                 "reg_pid", "pack_alloc", "pack_free", "mbuf_alloc", "mbuf_free", "mkid",
                 "moff", "mzidx", "ext_alloc", "ext_free", "ext_take", "xkid", "xoff", "w_ext")

    def __init__(self, arena):
        core = views(arena)
        self.mv = core.mv
        self.zones: dict = {}
        room = (core.geometry.data_pages - 1) * L.PAGE_SIZE    # one slab: items + a header page
        self.largest = max(MJUM16BYTES, 1 << (room.bit_length() - 1)) if room > 0 else 0
        self.base = 0
        self.w, self.u32, self.pt = core.w, core.tags, core.pt
        self.classes: dict = {}        # size -> _Class, the size classes this CPU used
        self.reg_pid = 0               # the pid that registered the arena (default.register)
        self.c = c = _mbctx(arena)
        self.pack_alloc, self.pack_free = c.zpack.alloc, c.zpack.free
        self.mbuf_alloc, self.mbuf_free = c.zmbuf.alloc, c.zmbuf.free
        self.mkid, self.moff, self.mzidx = c.mkid_bits, c.moffmap, c.zidx_mbuf
        x = c.zextref
        self.ext_alloc, self.ext_free, self.ext_take = x.alloc, x.free, x.take_over
        self.xkid, self.xoff, self.w_ext = x.keg.kid_bits, x.keg.offmap, x._cache.w_alloc


class _Class:
    """A size class as one CPU's fast paths use it: the zone's fast paths, its
    keg's page-table bits and offset map, this CPU's tag of an allocated item, and
    the m_ext words of a Buffer's storage (patched per allocation)."""

    __slots__ = ("zone", "alloc", "free", "take_over", "kid", "off", "w_alloc", "mbuf")

    def __init__(self, zone, size: int):
        self.zone = zone
        self.alloc, self.free, self.take_over = zone.alloc, zone.free, zone.take_over
        self.kid, self.off = zone.keg.kid_bits, zone.keg.offmap
        self.w_alloc = zone._cache.w_alloc
        # the whole mbuf of a Buffer of this class, as mb_ctor_mbuf (M_PKTHDR, MT_DATA)
        # and m_extadd write it, but M_EXT (set last, on its own): m_ext is buf, size,
        # type, refcnt, arg1 (the size, for free_storage), arg2 (STORAGE_MARK), owner,
        # then the free routine's name; m_data, m_len, m_pkthdr.len, buf, refcnt and
        # owner are patched in per Buffer
        m = array("q", bytes(MSIZE))
        m[FLAGS] = _F_CLASS                                     # m_len patched in
        m[E:EXT_END] = array("q", (0, size, EXT_NET_DRV, 0, size, STORAGE_MARK, 0))
        m[EXT_FREE // 8:] = array("q", _FREE_NAME)
        self.mbuf = m


def _ctx(arena) -> _Ctx:
    c = arena.__dict__.get("_bufctx")
    if c is None:
        arena._check_open()
        c = arena._bufctx = _Ctx(arena)
    return c


def _class(arena, size: int) -> _Class:
    """This CPU's view of the size class of ``size`` bytes (its zone made if need be)."""
    bc = _ctx(arena)
    k = bc.classes.get(size)
    if k is None:
        k = bc.classes[size] = _Class(_storage_zone(arena, size), size)
    return k


def _bucket_of_class(arena, size: int):
    """The bucket size a new size-class zone gets: UMA's adaptive choice below
    BUCKETLESS; above, a fixed bucket of one item while two items take at most
    1/CACHE_SHARE of the arena (a CPU caches at most two), else none (every
    allocation and free takes the zone and keg locks)."""
    if size < BUCKETLESS:
        return None
    return 1 if 2 * size * CACHE_SHARE <= views(arena).geometry.size else 0


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
                              bucket_size=_bucket_of_class(arena, size))
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
_open: dict = {}           # id(buf) -> weakref: this process's open Buffers.  The entry is
                           # the reference's token: whoever pops it frees the reference
_zombies: list = []        # (view, arena, handle): collected while views of them lived
_PID = os.getpid()
_ref = weakref.ref


def _after_fork_in_child():
    global _lock, _PID, _nonces, _nonce_at
    _lock = threading.RLock()
    _PID = os.getpid()
    _open.clear()                      # the parent's references, not ours
    _zombies.clear()
    _nonces, _nonce_at = b"", 0        # never the parent's


os.register_at_fork(after_in_child=_after_fork_in_child)


def _free_ref(arena, h: int) -> None:
    """Free reference ``h`` (an mbuf this process holds).  An arena closed in this
    process meanwhile left it held by no CPU: nothing to do here."""
    if arena._closed:
        return
    a = arena._here()
    mb.m_freem(Mbuf._wrap(_mbctx(a), h))


def _drop(arena, h: int) -> None:
    """Free reference ``h``: ``m_freem``, with the cases of a Buffer's own mbuf
    inline when the calling thread owns the arena's CPU -- a packet holding the
    only reference to its cluster goes back to the packet zone (as ``m_freem``
    does), and the only reference to a size class's storage gives the storage and
    its count back through the zones' fast paths (``_drop_class``)."""
    bc = arena.__dict__.get("_bufctx")
    if bc is not None and arena._owner_tid == get_ident() and arena._pid == _PID \
            and not arena._closed:
        w, i = bc.w, h >> 3
        if not w[i + NEXT]:
            flags = w[i + FLAGS]
            if (flags & M_EXT and w[i + EXT_TYPE] == EXT_PACKET and w[i + EXT_OWNER] == h
                    and flags >> TYPE_SHIFT & 0xFF != MT_NOTMBUF
                    and bc.u32[w[i + EXT_REFCNT] >> 2] == 1):
                bc.pack_free(h, PACK_VERIFIED)
                return
            if (flags & FLAGS_MASK == _F_STORAGE and w[i + EXT_ARG2] == STORAGE_MARK and not w[i + PH_TAGS]
                    and _drop_class(bc, h, i)):
                return
            _mfree(bc.c, h)                # m_freem of this one mbuf
            return
    _free_ref(arena, h)


def _drop_class(bc, h: int, i: int) -> bool:
    """The last reference to a size class's storage goes (mbuf ``h``, word ``i``):
    the storage and its count are taken over if this CPU does not hold them (they
    were shared: ``refs.disown_storage``), forgotten by the mbuf, then freed, and the
    mbuf with them.  A CPU killed after the mbuf forgot them leaves two items it
    holds that no mbuf names (recovery frees them), before, an mbuf that names
    them (recovery frees it, and them through it).  False, with nothing changed,
    when this is not the last reference or not a size class of this CPU."""
    w, u32 = bc.w, bc.u32
    r = w[i + EXT_REFCNT]
    if u32[r >> 2] != 1:
        return False
    k = bc.classes.get(w[i + EXT_SIZE])
    if k is None:
        return False
    s = w[i + EXT_BUF]
    pt, tags = bc.pt, bc.u32
    try:
        b = pt[s >> 12] ^ k.kid
        ts = (b >> 2) + k.off[s - b]
        b = pt[r >> 12] ^ bc.xkid
        tr = (b >> 2) + bc.xoff[r - b]
    except (IndexError, KeyError, TypeError):
        return False
    if tags[ts] != k.w_alloc:
        k.take_over(s)
    if tags[tr] != bc.w_ext:
        bc.ext_take(r)
    w[i + FLAGS] &= ~M_EXT             # forgotten (M_EXT went last on, goes first off)
    u32[r >> 2] = 0
    bc.ext_free(r)
    k.free(s)
    bc.mv[h + M_PKTDAT:h + MSIZE] = _ZERO_EXT
    bc.mbuf_free(h)
    return True


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
    for key, r in list(_open.items()):
        b = r()
        if b is None or not b._h or b._pid != _PID:
            continue
        try:
            b.close()
        except BufferError:                # views outlive the reference: the process ends
            if _open.pop(key, None) is not None:
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


_nonces, _nonce_at = b"", 0
_ZERO_EXT = bytes(MSIZE - M_PKTDAT)
_F_STORAGE = M_PKTHDR | M_EXT          # the flags of a Buffer's mbuf
_F_CLASS = M_PKTHDR | MT_DATA << TYPE_SHIFT    # its FLAGS word but M_EXT and m_len
_ARG_PKT = MT_DATA << 32 | M_PKTHDR     # the mbuf ctors' argument for it (mb_args)
_ARG_NOINIT = MT_NOINIT << 32           # ... for one whose header is written here
_MWORDS = MSIZE // 8
_FREE_NAME = FREE_STORAGE.encode().ljust(MSIZE - EXT_FREE, b"\0")   # m_ext's ext_free
_exp_new = Exporter.__new__


def _nonce() -> int:
    """A fresh odd 63-bit number from the OS's random source (read 4 KiB at a time;
    a forked child reads its own)."""
    global _nonces, _nonce_at
    at = _nonce_at
    if at >= len(_nonces):
        _nonces, at = os.urandom(4096), 0
    _nonce_at = at + 8
    return int.from_bytes(_nonces[at:at + 8], "little") >> 1 | 1


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
        return _new(arena, _ctx(arena).mv, h, nbytes, data)

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
        h = self._h
        if not h:
            return
        try:
            self._view_obj.release()           # refused while views exist; then no new ones
        except BufferError:
            if self._pid == _PID:
                raise BufferError(
                    f"Buffer {h} cannot be closed while memoryviews or numpy arrays "
                    f"of it exist: release them first (or drop the Buffer: it then "
                    f"closes when the last view goes)") from None
        if _open.pop(id(self), None) is None:  # closed meanwhile by another thread, or
            if self._pid != _PID:              # inherited through fork: the parent's
                self._h = 0
            return
        self._h = 0
        _drop(self._arena, h)
        if _zombies:
            _reap()

    def detach(self) -> int:
        """Stop managing this reference without dropping it and return its handle
        (after ``arena.send(cpu, [buf.handle])`` the reference is the receiver's).
        The Buffer is closed afterwards."""
        h = self._open()
        try:
            self._view_obj.release()
        except BufferError:
            raise BufferError(f"Buffer {h} cannot be detached while memoryviews or "
                              f"numpy arrays of it exist") from None
        if _open.pop(id(self), None) is None:
            self._h = 0
            raise BufferClosedError("the Buffer is closed")
        self._h = 0
        arena = self._arena
        if not arena._closed:          # it may go anywhere now: its storage is the references'
            disown_storage(_mbctx(arena._here()), h)
        return h

    def __enter__(self) -> "Buffer":
        self._open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            h = self._h
            if not h or self._pid != _PID:
                return
            try:
                self._view_obj.release()
            except BufferError:              # views live on: free when they are gone
                if _open.pop(id(self), None) is not None:
                    with _lock:
                        _zombies.append((self._view_obj, self._arena, h))
                self._h = 0
                return
            if _open.pop(id(self), None) is None:
                return
            self._h = 0
            _drop(self._arena, h)
        except Exception:
            pass

    # ---------------------------------------------------------------- pickling, hand-off
    def _new_reference(self, what: str):
        """A new reference to the storage (``m_copym``: refcount + 1), held by the
        calling thread's CPU and marked with a fresh nonce: (that CPU's arena, its
        mbuf context, the new mbuf's handle, the nonce)."""
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
        c = a.__dict__.get("_mb") or _mbctx(a)
        n = _copy_ref(c, h)
        if not n:
            m = mb.m_copym(Mbuf._wrap(c, h), 0, mb.M_COPYALL, M_NOWAIT)
            if m is None:
                raise ArenaFullError(f"arena {arena.name!r}: no mbuf for the new reference a "
                                     f"{what} Buffer carries (kern.ipc.nmbufs reached?)")
            n = m.handle
        nonce = _nonce()
        c.w[(n >> 3) + PH_HEADER] = nonce
        return a, c, n, nonce

    def __reduce__(self):
        a, c, n, nonce = self._new_reference("pickled")
        _disown_mbuf(a, c, n)
        return _rebuild, (self._arena.name, n, self._nbytes, c.w[(n >> 3) + DATA], nonce)

    def handoff(self) -> Handoff:
        """A new reference for another process, which takes it once with ``take``.
        Until then the calling thread's CPU holds it: if this process dies first,
        the keg manager frees it with the rest of this process's references (and
        ``take`` refuses); if the receiver never takes it, ``withdraw`` gives it
        back.  Whoever takes it owns it, like the receiver of a pickle."""
        a, c, n, nonce = self._new_reference("handed off")
        return Handoff(self._arena.name, arena_token(self._arena), n, self._nbytes,
                       c.w[(n >> 3) + DATA], nonce, a.cpu_id)


def _new(arena, mv, h: int, nbytes: int, data: int) -> Buffer:
    """The Buffer of reference ``h`` (``nbytes`` at ``data``), open in this process."""
    b = _exp_new(Buffer)
    b._arena = arena
    b._h = h
    b._nbytes = nbytes
    b._data = data
    b._pid = _PID
    b._view_obj = mv[data:data + nbytes]
    _open[id(b)] = _ref(b)
    return b


def _copy_ref(c, h: int) -> int:
    """``m_copym(h, 0, M_COPYALL)`` of a Buffer's mbuf (one mbuf, a packet header
    without tags, external storage), done here: a new mbuf with ``h``'s packet
    header and data, sharing its storage (``refs._dupcl``).  0 when ``h`` is not
    such an mbuf or no mbuf is at hand (``m_copym`` then)."""
    w, i = c.w, h >> 3
    fi = w[i + FLAGS]
    if w[i + NEXT] or w[i + PH_TAGS] or fi >> TYPE_SHIFT & 0xFF != MT_DATA or not fi & M_EXT:
        return 0
    n = c.zmbuf.alloc(M_NOWAIT, None, _ARG_PKT)
    if n is None:
        return 0
    j = n >> 3
    try:
        w[j + PH:j + PKTHDR_END] = w[i + PH:i + PKTHDR_END]
        w[j + PH_TAGS] = 0
        w[j + FLAGS] = fi & (M_COPYFLAGS | ~FLAGS_MASK)     # m_type and m_len too, M_EXT
        w[j + DATA] = w[i + DATA]
        _dupcl(c, n, h)
    except BaseException:
        if not w[j + FLAGS] & M_EXT:
            c.zmbuf.free(n)
        raise
    return n


def _disown_mbuf(a, c, n: int) -> None:
    """``a.disown(n)`` for mbuf ``n`` this CPU just made (its tag: allocated, held
    here): held by no CPU from now on, until a process claims it."""
    try:
        b = c.core.pt[n >> 12] ^ c.mkid_bits           # Keg.tag_index_of, inlined
        t = (b >> 2) + c.moffmap[n - b]
    except (IndexError, KeyError, TypeError):
        a.disown(n)
        return
    tv = c.u32[t]
    if tv & 0xFF0F == L.TAG_ALLOC | c.cpu << 8:
        c.u32[t] = tv | L.NO_CPU << 8
    else:
        a.disown(n)                        # raises, naming what it is


def _claim_reference(arena, handle: int, nbytes: int, data: int, nonce: int,
                     holder: int | None) -> bool:
    """Make reference ``handle`` (marked with ``nonce``, describing ``nbytes`` at
    ``data``) the calling thread's, clearing the mark; False if it is not (any
    more) such a reference.  ``holder``: the CPU that may still hold it (a
    hand-off), None for a reference held by none (a pickle).  The mark is checked
    and cleared under the mbuf's zone lock, inside ``Arena.claim``."""
    if nonce <= 0 or handle.__class__ is not int:    # 0: every reference nobody handed off
        return False
    a = arena._here()
    c = _mbctx(a)
    w, i = c.w, handle >> 3
    try:
        if c.is_mbuf(handle) < 0 or c.mv[handle + BTYPE] == MT_NOTMBUF:
            return False
    except (IndexError, TypeError):
        return False

    def marked() -> bool:                  # Lock: the mbuf's zone lock, held
        if (w[i + FLAGS] & _F_STORAGE == _F_STORAGE and w[i + PH_HEADER] == nonce
                and w[i + DATA] == data and w[i + FLAGS] >> 32 == nbytes):
            w[i + PH_HEADER] = 0
            return True
        return False

    try:
        a.claim(handle, holder=holder, check=marked)
    except ShmallocError:
        return False
    return True


def _rebuild(name: str, handle: int, nbytes: int, data: int, nonce: int) -> Buffer:
    """Unpickle: claim the reference the pickle carries, in this process's CPU."""
    arena = default._arenas.get(name)
    if arena is None or arena._closed:
        try:
            arena = default.attachment(name)
        except ArenaNotFoundError:
            raise ArenaNotFoundError(f"cannot load a pickled Buffer of arena {name!r}: the "
                                     f"arena does not exist (any more)") from None
    if _zombies:
        _reap()
    if not _claim_reference(arena, handle, nbytes, data, nonce, None):
        raise ShmallocError(f"pickled Buffer (arena {name!r}, reference {handle}) was loaded "
                            f"already: a pickle carries one reference and loads once")
    return _new(arena, _ctx(arena).mv, handle, nbytes, data)


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
    h = _alloc_class(_ctx(a), _class(a, size), 0)
    return Mbuf._wrap(_mbctx(a), h) if h else None


def _alloc_class(bc, k, n: int) -> int:
    """An mbuf with a new item of size class ``k`` attached as its storage (what
    ``m_extadd(m, item, size, FREE_STORAGE, size, STORAGE_MARK)`` attaches, with a
    count from mbuf_ext_refcnt), ``m_len`` ``n``; 0 when an item is missing (what
    was taken goes back).  The storage and its count stay this CPU's while this
    one reference names them: its free is a fast-path free.  The first copy
    (``refs._dupcl``), or ``detach``, gives them to the references
    (``refs.disown_storage``), as ``m_extadd`` does at once.  M_EXT is set last: a
    CPU killed before leaves two items it holds that no mbuf names, which recovery
    frees."""
    s = r = h = None
    try:
        s = k.alloc(M_NOWAIT)
        if s is not None:
            r = bc.ext_alloc(M_NOWAIT)
            if r is not None:           # MT_NOINIT: the header is written below, whole
                h = bc.mbuf_alloc(M_NOWAIT, None, _ARG_NOINIT if _ctors._label_hook is None
                                  else _ARG_PKT)
    except ArenaFullError:             # /dev/shm cannot back a new slab: as if none
        pass
    finally:
        if h is None:
            if r is not None:
                bc.ext_free(r)
            if s is not None:
                k.free(s)
    if h is None:
        return 0
    bc.u32[r >> 2] = 1
    m = k.mbuf
    m[DATA] = m[EXT_BUF] = s
    m[FLAGS] = _F_CLASS | n << 32       # m_len
    m[PH_LEN] = n
    m[EXT_REFCNT] = r
    m[EXT_OWNER] = h
    w, i = bc.w, h >> 3
    w[i:i + _MWORDS] = m
    w[i + FLAGS] = _F_CLASS | n << 32 | M_EXT
    return h


def alloc(arena, nbytes: int) -> Buffer:
    """A Buffer of ``nbytes`` bytes (``arena.alloc``); ArenaFullError when there is
    no room now, ValueError for a size the arena can never hold."""
    bc = arena.__dict__.get("_bufctx")
    if (bc is not None and nbytes.__class__ is int and bc.reg_pid == _PID and not _zombies
            and not arena._closed):
        # the fast path: a packet (up to 2 KiB), or a size class this CPU has used
        if 0 <= nbytes <= MCLBYTES:
            h = bc.pack_alloc(M_NOWAIT, None, _ARG_PKT)
            if h:
                w, i = bc.w, h >> 3
                bc.u32[(h >> 2) + ULEN] = nbytes
                w[i + PH_LEN] = nbytes
                return _new(arena, bc.mv, h, nbytes, w[i + DATA])
        elif MJUM16BYTES < nbytes <= bc.largest:
            k = bc.classes.get(1 << (nbytes - 1).bit_length())
            if k is not None:
                h = _alloc_class(bc, k, nbytes)
                if h:
                    return _new(arena, bc.mv, h, nbytes, bc.w[(h >> 3) + DATA])
    return _alloc_slow(arena, nbytes)


def _alloc_slow(arena, nbytes) -> Buffer:
    """``alloc`` the long way: checks, registration, a zone made on first use,
    reclaim when the arena is full, the jumbo clusters."""
    arena._check_open()
    n = _check_nbytes(arena, nbytes)
    _reap()
    a = arena._here()
    size = class_size(n)
    if size > MJUM16BYTES:
        _class(a, size)
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
    bc = _ctx(arena)
    if a is arena:
        bc.reg_pid = _PID
    return _new(arena, bc.mv, m.handle, n, m.m_data)


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
