"""_export: the buffer protocol for ``shmalloc.Buffer`` on every supported CPython.

A Buffer must be taken wherever a bytes-like object is (``memoryview(buf)``,
``numpy.frombuffer(buf)``, ``f.write(buf)``, ``sock.recv_into(buf)``), with no copy,
and must refuse once closed.  Python 3.12 lets a class do that in Python (PEP 688:
``__buffer__``).  On 3.11 a type exports a buffer only through its C slot
``bf_getbuffer``, and a class statement fills that slot only by inheriting it from
a C type -- none of which can both point into shared memory and be invalidated
(ctypes arrays cannot be invalidated; ``mmap`` maps whole pages of its own;
``memoryview`` and ``PickleBuffer`` cannot be subclassed).

So on 3.11, ``Exporter`` -- the base of Buffer -- borrows the ``bf_getbuffer`` of
``pickle.PickleBuffer``.  That C function (``picklebuf_getbuf``) exports nothing of
its own: it forwards the request to the object in its ``view.obj`` field::

    picklebuf_getbuf(self, view, flags):
        if self->view.obj == NULL: ValueError("operation forbidden on released ...")
        return PyObject_GetBuffer(self->view.obj, view, flags)

Exporter has exactly two slots, laid out where a PickleBuffer keeps ``view.buf``
and ``view.obj``::

    PickleBuffer:  | PyObject_HEAD | view.buf  | view.obj  | ...
    Exporter:      | PyObject_HEAD | _view_buf | _view_obj |       (slots sorted by name)

so ``memoryview(buf)`` forwards to the memoryview a Buffer keeps in ``_view_obj``:
the consumer's view counts as an export of *that* memoryview (``release()`` of it
raises BufferError while views exist), and once it is released every new request
fails with ValueError.  The consumer's ``view.obj`` is that memoryview, so releasing
goes through memoryview's own release.  Exporter also borrows PickleBuffer's
``bf_releasebuffer``, a no-op that is never called (for the same reason) but tells
consumers such as ``numpy.frombuffer`` that a buffer must be held and released, not
dropped at once: numpy then keeps a view (an export) instead of a bare reference,
so a Buffer cannot be closed under a numpy array.  On 3.12 and later ``__buffer__``
and ``__release_buffer__`` do the same through the supported protocol.

Every offset the trick relies on is checked once, at import, against live objects
(object header size, slot offsets, PickleBuffer's ``view.obj``, ``tp_basicsize`` and
``tp_as_buffer`` in the type object), then the installed slot is tried on a
bytearray.  If anything differs ``INSTALLED`` is False, ``REASON`` says why, and
Buffers refuse the buffer protocol (TypeError) but keep the rest of their API.
On 3.12 and later nothing is patched: ``__buffer__`` is the supported way.
"""

from __future__ import annotations

import ctypes
import pickle
import sys

__all__ = ["Exporter", "INSTALLED", "REASON"]


class Exporter:
    """Base of Buffer: exports the memoryview in ``_view_obj`` (see the module)."""

    __slots__ = ("_view_buf", "_view_obj")   # names sort in this order: layout matters

    def __buffer__(self, flags: int) -> memoryview:          # PEP 688 (3.12+)
        return self._view_obj

    def __release_buffer__(self, view: memoryview) -> None:  # PEP 688: views are held
        pass


_P = ctypes.sizeof(ctypes.c_void_p)
_HEAD = object.__basicsize__                 # PyObject_HEAD (32 with Py_TRACE_REFS)
_VIEW_OBJ = _HEAD + _P                       # PickleBuffer.view.obj / Exporter._view_obj
_TP_BASICSIZE = _HEAD + 2 * _P               # after ob_size, tp_name
_TP_AS_BUFFER = _HEAD + 18 * _P              # after ob_size and 17 more type slots


def _word(addr: int) -> int:
    return ctypes.c_void_p.from_address(addr).value or 0


def _install() -> str:
    """Give Exporter PickleBuffer's bf_getbuffer; '' on success, else the reason."""
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if Exporter.__basicsize__ != _HEAD + 2 * _P:
        return f"Exporter is {Exporter.__basicsize__} bytes, not {_HEAD + 2 * _P}"
    probe, inner = Exporter(), b"shmalloc"
    probe._view_buf, probe._view_obj = inner, probe
    if _word(id(probe) + _HEAD) != id(inner) or _word(id(probe) + _VIEW_OBJ) != id(probe):
        return "Exporter's slots are not at view.buf / view.obj"
    probe._view_buf = probe._view_obj = None
    pb = pickle.PickleBuffer(inner)
    if _word(id(pb) + _VIEW_OBJ) != id(inner):
        return "PickleBuffer keeps view.obj elsewhere"
    if ctypes.c_ssize_t.from_address(id(Exporter) + _TP_BASICSIZE).value != Exporter.__basicsize__:
        return "tp_basicsize is not where expected: unknown type object layout"
    procs = _word(id(Exporter) + _TP_AS_BUFFER)      # a heap type's embedded PyBufferProcs
    if not id(Exporter) < procs < id(Exporter) + type.__basicsize__:
        return "tp_as_buffer is not where expected: unknown type object layout"
    if _word(id(int) + _TP_AS_BUFFER) != 0 or _word(procs) != 0:
        return "tp_as_buffer does not look like tp_as_buffer"
    pb_procs = _word(id(pickle.PickleBuffer) + _TP_AS_BUFFER)
    getbuf = _word(pb_procs) if pb_procs else 0
    releasebuf = _word(pb_procs + _P) if pb_procs else 0
    if not getbuf or not releasebuf:
        return "PickleBuffer has no bf_getbuffer / bf_releasebuffer"
    ctypes.c_void_p.from_address(procs + _P).value = releasebuf
    ctypes.c_void_p.from_address(procs).value = getbuf
    try:                                             # the installed slot, on a bytearray
        data = bytearray(b"probe")
        probe._view_obj = memoryview(data)
        with memoryview(probe) as v:
            v[0:1] = b"P"
            ok = v.obj is probe._view_obj and bytes(v) == b"Probe" and data == b"Probe"
        probe._view_obj.release()
        try:
            memoryview(probe)
            ok = False
        except ValueError:
            pass
    except Exception as e:                           # pragma: no cover - defensive
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "the forwarded buffer does not behave"
    if not ok:
        ctypes.c_void_p.from_address(procs).value = None
        ctypes.c_void_p.from_address(procs + _P).value = None
        return why
    return ""


if sys.version_info >= (3, 12):
    INSTALLED, REASON = True, ""
else:
    REASON = _install()
    INSTALLED = not REASON
