"""integrations.dask: shmalloc as the same-host layer of Dask distributed.

Two workers on one machine hand each other numpy arrays and Buffers by reference:
the bytes stay in the host's arena, and the comm carries a frame of plain data.
Across hosts, or to a process that did not set shmalloc up, the bytes go as Dask
always sends them.  Set up each worker with ``--preload shmalloc.integrations.dask``
(or ``client.register_plugin(ShmallocPlugin())``; ``setup_client(client)`` for a
client that gathers results directly); see docs/scaling-out.md.

A transfer (worker B fetches a key from worker A: B connects, A answers B's
``get_data`` on that comm, B loads the answer)::

    B's handshake (set up by us, in           A serializes for B: distributed's "dask"
    connection_args["handshake_overrides"])   family, context["recipient"] = B's
    {"shmalloc": {boot, arena, token,   --->  handshake.  Same boot id, same arena
                  pid, start}}                (name and token)?
                                                yes: a new reference (Buffer.handoff),
                                                     frame = plain data, no bytes
                                                no:  Dask's own frames (the bytes)
    B loads: checks the boot id, takes the  <---
    reference (one-shot nonce, Buffer take),
    maps the array in place

The decision is the sender's, made from what the receiver said about itself in
the handshake: once only a reference was sent, the receiver has nothing to fall
back on, so a frame it cannot honour raises (``ForeignHostError``,
``HandoffRefusedError``: OSErrors, which distributed treats as a failed fetch from
that peer, fetching again) and never reads wrong memory.

The frame (the sub-header of Dask's "dask" serializer; no frames follow)::

    {"shmalloc": 1,                                  frame version
     "boot": "<sender's /proc/sys/kernel/random/boot_id>",
     "ref": [arena, token, handle, nbytes, data, nonce, cpu],   a shmalloc.buffer.Handoff
     "array": {"dtype": "<f8", "shape": [...], "strides": [...],
               "offset": byte offset in the Buffer, "writeable": bool}}   arrays only

References: the sender's CPU holds each reference it handed off until the receiver
takes it (``take`` clears the nonce under the mbuf zone lock: a frame loads once; a
replayed or forged frame is refused).  A sender that dies first has it freed by the
keg manager with its other references (the receiver's take then refuses).  A
receiver that dies first, or does not take it within ``shmalloc.claim-timeout``,
leaves it pending in the sender's ledger, which a periodic sweep withdraws.  A
taken reference is the receiver's: freed when its array or Buffer goes (spilled to
disk, released by the scheduler), or by the manager if the receiver dies.

Arrays already in the arena (``arena.ndarray``, ``SharedArray``, their views) go
with no copy, and arrive read-only (the sender's array is the same memory: Dask
tasks must not change their inputs, and here a change would show on the sender).
Other arrays are copied once into a new Buffer, which the receiver alone holds
(writable).  Arrays below ``shmalloc.min-bytes``, with object or structured dtypes,
or broadcast (a zero stride) go as bytes.  Spilling serializes with no recipient,
hence as bytes: a spilled array's reference is released.

Configuration (dask config, read at set-up): ``shmalloc.min-bytes`` (65536),
``shmalloc.claim-timeout`` ("60s"), ``shmalloc.arena`` (arena name, default that
of ``shmalloc.connect()``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import NamedTuple

import dask
import numpy as np
import psutil
from dask.sizeof import sizeof
from dask.utils import parse_bytes, parse_timedelta
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import dask_deserialize, dask_serialize

import shmalloc
from shmalloc import buffer as _buf
from shmalloc import default
from shmalloc.admin import process_alive
from shmalloc.layout import PAGE_SIZE

__all__ = ["register", "configure", "attach", "advertise", "advertisement", "setup",
           "teardown", "setup_client", "ShmallocPlugin", "dask_setup", "dask_teardown",
           "sweep", "metrics", "boot_id", "ForeignHostError"]

logger = logging.getLogger(__name__)

KEY = "shmalloc"                 # the handshake entry and the frame marker
FRAME_VERSION = 1
MIN_BYTES = 64 << 10             # smaller arrays go as bytes
CLAIM_TIMEOUT = 60.0             # seconds a reference waits for its receiver
SWEEP_INTERVAL = 0.2             # seconds between sweeps of the pending references
BOOT_ID = "/proc/sys/kernel/random/boot_id"
SHM_DIR = "/dev/shm"
COUNTERS = ("sent_by_reference", "bytes_by_reference", "bytes_copied_in", "sent_as_bytes",
            "arena_full", "taken", "refused", "withdrawn")


class ForeignHostError(shmalloc.HandoffRefusedError):
    """A reference frame from another host (another boot id) or for an arena this
    process cannot reach: only the sender can choose bytes, and it did not."""


def boot_id() -> str:
    """This boot of this machine: two processes with the same boot id share
    /dev/shm unless containers separate them (then the arena check tells)."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


class _Pending(NamedTuple):
    """A reference handed off and not yet known to be taken."""
    handoff: _buf.Handoff
    pid: int            # the receiver, as its handshake says
    start: int          # its start time (µs), so that a reused pid is not taken for it
    deadline: float     # time.monotonic() after which it is withdrawn


class _State:
    """This process's side of the integration (one per process: Dask's serializer
    registry is global too)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.registered = False
        self.np_dumps = self.np_loads = None     # distributed's own numpy serializers
        self.arena = None                         # the arena references are made in
        self.token = 0
        self.boot = boot_id()
        self.enabled = True
        self.min_bytes = MIN_BYTES
        self.claim_timeout = CLAIM_TIMEOUT
        self.ledger: dict = {}                    # (handle, nonce) -> _Pending
        self.counts = dict.fromkeys(COUNTERS, 0)


_state = _State()
_before_take: list = []          # tests: called with the frame before a reference is taken


def _after_fork_in_child():
    global _state
    old, _state = _state, _State()
    _state.registered, _state.np_dumps, _state.np_loads = (old.registered, old.np_dumps,
                                                           old.np_loads)


os.register_at_fork(after_in_child=_after_fork_in_child)


# ============================================================================ set-up
def register() -> None:
    """Register shmalloc's serializers for numpy arrays, ``SharedArray`` and
    ``Buffer`` with Dask (``dask_serialize``/``dask_deserialize``), and
    ``dask.sizeof`` for Buffers; read the ``shmalloc.*`` dask config.  Idempotent.
    Without ``attach`` and ``advertise`` (what ``setup`` adds) this process sends
    bytes as before and loads reference frames sent to it."""
    s = _state
    configure(min_bytes=parse_bytes(dask.config.get("shmalloc.min-bytes", MIN_BYTES)),
              claim_timeout=parse_timedelta(dask.config.get("shmalloc.claim-timeout",
                                                            CLAIM_TIMEOUT)))
    if s.registered:
        return
    import distributed.protocol.numpy  # noqa: F401  (distributed's numpy registrations first)
    s.np_dumps = dask_serialize.dispatch(np.ndarray)
    s.np_loads = dask_deserialize.dispatch(np.ndarray)
    shared = shmalloc.SharedArray
    for cls in (np.ndarray, shared):
        dask_serialize.register(cls)(_dumps_array)
        dask_deserialize.register(cls)(_loads_array)
    dask_serialize.register(shmalloc.Buffer)(_dumps_buffer)
    dask_deserialize.register(shmalloc.Buffer)(_loads_buffer)
    sizeof.register(shmalloc.Buffer)(_sizeof_buffer)
    default._before_exit.insert(0, _withdraw_all)   # at exit, before Buffers and arenas close
    s.registered = True


def configure(*, enabled: bool | None = None, min_bytes: int | None = None,
              claim_timeout: float | None = None) -> None:
    """Change this process's settings: ``enabled`` (False: send bytes, as Dask does
    without shmalloc; frames already sent still load), ``min_bytes``,
    ``claim_timeout`` (seconds)."""
    s = _state
    if enabled is not None:
        s.enabled = bool(enabled)
    if min_bytes is not None:
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, not {min_bytes}")
        s.min_bytes = int(min_bytes)
    if claim_timeout is not None:
        if not claim_timeout > 0:
            raise ValueError(f"claim_timeout must be a positive number of seconds, "
                             f"not {claim_timeout}")
        s.claim_timeout = float(claim_timeout)


def attach(name: str | None = None, size: int | None = None):
    """Attach this process to the host's arena (``shmalloc.connect``: started if it
    does not run) and make references in it.  ``name``: default the dask config
    ``shmalloc.arena``, else ``shmalloc.connect()``'s default."""
    name = name or dask.config.get("shmalloc.arena", None)
    arena = shmalloc.connect(name, size)
    _state.arena, _state.token = arena, _buf.arena_token(arena)
    return arena


def _start_us(pid: int) -> int:
    return int(psutil.Process(pid).create_time() * 1e6)


def advertisement() -> dict:
    """What this process says about itself in its handshakes."""
    s = _state
    if s.arena is None:
        raise shmalloc.ShmallocError("shmalloc.integrations.dask: attach() first")
    pid = os.getpid()
    return {"v": FRAME_VERSION, "boot": s.boot, "arena": s.arena.name, "token": s.token,
            "pid": pid, "start": _start_us(pid)}


def advertise(server, collect: bool = True) -> None:
    """Put this process's advertisement into the handshake of every connection
    ``server`` (a Worker or a Client) opens from now on: peers that it fetches data
    from then send references.  ``collect`` (call it in the server's event loop):
    idle pooled connections are closed, so that the next fetch opens one with the
    advertisement."""
    adv = advertisement()
    rpc = getattr(server, "rpc", None)
    dicts = [getattr(server, "connection_args", None), getattr(rpc, "connection_args", None)]
    for args in {id(d): d for d in dicts if isinstance(d, dict)}.values():
        overrides = dict(args.get("handshake_overrides") or {})
        overrides[KEY] = adv
        args["handshake_overrides"] = overrides
    if collect and hasattr(rpc, "collect"):
        rpc.collect()


def setup(server, arena: str | None = None, size: int | None = None) -> None:
    """Set up a Worker: ``register``, ``attach``, ``advertise``, the arena's
    figures in the worker's metrics (``worker.metrics["shmalloc"]``, sent with
    its heartbeats) and a periodic sweep of the references it handed off.  A
    Client gets ``setup_client``.  On a Scheduler or a Nanny it does nothing (a
    scheduler forwards frames without loading them: it must never be sent
    references)."""
    from distributed import Client, Nanny, Scheduler
    from tornado.ioloop import PeriodicCallback
    register()
    if isinstance(server, Client):
        setup_client(server, arena, size)
        return
    if isinstance(server, Scheduler):
        logger.warning("shmalloc.integrations.dask is for workers (and clients), not the "
                       "scheduler: nothing done")
        return
    if isinstance(server, Nanny):
        return
    attach(arena, size)
    advertise(server)
    custom = getattr(server, "metrics", None)
    if isinstance(custom, dict):
        custom[KEY] = metrics
    callbacks = getattr(server, "periodic_callbacks", None)
    if isinstance(callbacks, dict):
        pc = callbacks.get("shmalloc-sweep")
        if pc is None:
            pc = callbacks["shmalloc-sweep"] = PeriodicCallback(sweep, SWEEP_INTERVAL * 1000)
        if not pc.is_running():
            pc.start()


def teardown(server) -> None:
    """Undo ``setup`` on a closing Worker: withdraw what nobody took."""
    callbacks = getattr(server, "periodic_callbacks", None)
    if isinstance(callbacks, dict):
        pc = callbacks.pop("shmalloc-sweep", None)
        if pc is not None:
            pc.stop()
    custom = getattr(server, "metrics", None)
    if isinstance(custom, dict):
        custom.pop(KEY, None)
    _withdraw_all()


def setup_client(client, arena: str | None = None, size: int | None = None) -> None:
    """Set up a Client on the workers' host, so that the results it gathers
    directly from the workers (``Client(direct_to_workers=True)``,
    ``gather(direct=True)``) come by reference."""
    register()
    attach(arena, size)
    advertise(client, collect=False)


def dask_setup(server) -> None:
    """``--preload shmalloc.integrations.dask`` (``dask worker``, ``LocalCluster(preload=
    [...])``, or the ``distributed.worker.preload`` config)."""
    setup(server)


def dask_teardown(server) -> None:
    teardown(server)


class ShmallocPlugin(WorkerPlugin):
    """``client.register_plugin(ShmallocPlugin())``: ``setup`` on every worker, those
    that join later included."""

    name = "shmalloc"

    def __init__(self, arena: str | None = None, size: int | None = None):
        self.arena, self.size = arena, size

    def setup(self, worker):
        setup(worker, self.arena, self.size)

    def teardown(self, worker):
        teardown(worker)


# ============================================================================ references
def _peer(context):
    """The receiver's advertisement if it shares this process's arena, else None."""
    s = _state
    if not s.enabled or s.arena is None or not context:
        return None
    recipient = context.get("recipient")
    info = recipient.get(KEY) if isinstance(recipient, dict) else None
    if not isinstance(info, dict):
        return None
    if info.get("boot") != s.boot or not s.boot or info.get("arena") != s.arena.name \
            or info.get("token") != s.token:
        return None
    return info


def _remember(h: _buf.Handoff, peer: dict) -> None:
    s = _state
    pid, start = peer.get("pid"), peer.get("start")
    p = _Pending(h, pid if type(pid) is int else 0, start if type(start) is int else 0,
                 time.monotonic() + s.claim_timeout)
    with s.lock:
        s.ledger[h.handle, h.nonce] = p
    s.counts["sent_by_reference"] += 1
    s.counts["bytes_by_reference"] += h.nbytes


def _frame(h: _buf.Handoff, **extra) -> dict:
    return {KEY: FRAME_VERSION, "boot": _state.boot, "ref": list(h), **extra}


def _in_our_arena(buf) -> bool:
    s = _state
    return buf.arena.name == s.arena.name and _buf.arena_token(buf.arena) == s.token


def _plain_dtype(dt) -> bool:
    return (not dt.hasobject and dt.fields is None and dt.subdtype is None
            and np.dtype(dt.str) == dt)


def _array_frame(x, context):
    """The reference frame of array ``x`` for the receiver of ``context``, or None
    (then Dask's own frames go)."""
    s = _state
    peer = _peer(context)
    if peer is None or x.nbytes < s.min_bytes or 0 in x.strides or not _plain_dtype(x.dtype):
        return None
    ref = _buf.array_buffer(x)
    try:
        if ref is not None and _in_our_arena(ref[0]):
            buf, offset = ref
            h = buf.handoff()                    # zero copy: the same memory, shared
            strides, writeable = x.strides, False
        else:
            order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
            dst = s.arena.ndarray(x.shape, x.dtype, order=order)
            np.copyto(dst, x, casting="no")      # one copy, into a Buffer of its own
            h = dst.buffer.handoff()
            offset, strides, writeable = 0, dst.strides, True
            del dst                              # ours goes; the hand-off keeps the storage
            s.counts["bytes_copied_in"] += x.nbytes
    except shmalloc.ArenaFullError as e:
        s.counts["arena_full"] += 1
        logger.info("shmalloc: arena full, %d bytes sent as bytes: %s", x.nbytes, e)
        return None
    _remember(h, peer)
    return _frame(h, array={"dtype": x.dtype.str, "shape": list(x.shape),
                            "strides": list(strides), "offset": offset,
                            "writeable": writeable})


def _dumps_array(x, context=None):
    header = _array_frame(x, context)
    if header is not None:
        return header, []
    _state.counts["sent_as_bytes"] += 1
    return _state.np_dumps(x, context=context)


def _take(header) -> shmalloc.Buffer:
    """The Buffer of a reference frame, taken by this process (once)."""
    s = _state
    boot = header.get("boot")
    if boot != s.boot or not s.boot:
        s.counts["refused"] += 1
        raise ForeignHostError(f"a shmalloc reference frame from boot {boot!r}, and this "
                               f"process runs on boot {s.boot!r}: the sender should have "
                               f"sent bytes (is its handshake information wrong?)")
    ref = header.get("ref")
    if not (isinstance(ref, (list, tuple)) and len(ref) == len(_buf.Handoff._fields)
            and isinstance(ref[0], str) and all(type(v) is int for v in ref[1:])):
        s.counts["refused"] += 1
        raise shmalloc.HandoffRefusedError(f"malformed shmalloc reference frame: {ref!r}")
    for hook in list(_before_take):
        hook(header)
    try:
        buf = _buf.take(ref)
    except shmalloc.HandoffRefusedError as e:
        s.counts["refused"] += 1
        if "no such arena here" in str(e):
            raise ForeignHostError(f"{e} (same boot id: containers with separate /dev/shm?)"
                                   ) from None
        raise
    s.counts["taken"] += 1
    return buf


def _extent_ok(nbytes, offset, shape, strides, itemsize) -> bool:
    """Whether an array of ``shape``/``strides`` at ``offset`` stays within nbytes."""
    if len(shape) != len(strides) or len(shape) > 64 or offset < 0:
        return False
    if any(n == 0 for n in shape):
        return offset <= nbytes
    lo = hi = offset
    for n, st in zip(shape, strides):
        if n < 0:
            return False
        lo += min(0, (n - 1) * st)
        hi += max(0, (n - 1) * st)
    return lo >= 0 and hi + itemsize <= nbytes


def _loads_array(header, frames):
    if KEY not in header:
        return _state.np_loads(header, frames)
    meta = header.get("array")
    try:
        dtype = np.dtype(meta["dtype"])
        shape = [int(n) for n in meta["shape"]]
        strides = [int(n) for n in meta["strides"]]
        offset = int(meta["offset"])
        ok = _plain_dtype(dtype)
    except Exception:
        ok = False
    buf = _take(header)
    if not ok or not _extent_ok(len(buf), offset, shape, strides, dtype.itemsize):
        buf.close()
        raise shmalloc.HandoffRefusedError(f"malformed shmalloc array frame: {meta!r}")
    arr = _buf.array_from_buffer(buf, offset, shape, strides, dtype)
    del buf                                      # the array holds it
    if not meta.get("writeable"):
        arr.flags.writeable = False
    return arr


def _dumps_buffer(buf, context=None):
    peer = _peer(context)
    if peer is not None and _in_our_arena(buf):
        try:
            h = buf.handoff()
        except shmalloc.ArenaFullError:
            _state.counts["arena_full"] += 1
        else:
            _remember(h, peer)
            return _frame(h), []
    _state.counts["sent_as_bytes"] += 1
    return {"nbytes": len(buf)}, [memoryview(buf)]


def _loads_buffer(header, frames):
    if KEY in header:
        return _take(header)
    arena = _state.arena or shmalloc.connect()
    data = frames[0] if len(frames) == 1 else b"".join(frames)
    return arena.from_bytes(data)


def _sizeof_buffer(buf) -> int:
    return 0 if buf.closed else len(buf)


# ============================================================================ sweep
def sweep(everything: bool = False) -> int:
    """Forget the references that were taken, withdraw those whose receiver died
    or that waited longer than the claim timeout (all of them with ``everything``).
    Returns how many were withdrawn."""
    s = _state
    with s.lock:
        items = list(s.ledger.items())
    if not items:
        return 0
    now, alive, withdrawn = time.monotonic(), {}, 0
    for key, p in items:
        done = not _buf.pending(p.handoff)
        if not done:
            gone = everything or now > p.deadline
            if not gone and p.pid:
                if (p.pid, p.start) not in alive:
                    alive[p.pid, p.start] = process_alive(p.pid, p.start)
                gone = not alive[p.pid, p.start]
            if gone:
                withdrawn += _buf.withdraw(p.handoff)
                done = True
        if done:
            with s.lock:
                s.ledger.pop(key, None)
    s.counts["withdrawn"] += withdrawn
    return withdrawn


def _withdraw_all() -> None:
    """Withdraw every reference still pending (teardown, and this process's exit:
    ``shmalloc.default`` runs it before it closes Buffers and arenas)."""
    if _state.arena is None or _state.arena._closed:
        return
    try:
        sweep(everything=True)
    except Exception:
        logger.warning("shmalloc: withdrawing pending references failed", exc_info=True)


def metrics(server=None) -> dict:
    """The arena and /dev/shm in bytes, the references pending, and this process's
    counters (``worker.metrics["shmalloc"]``: in the scheduler's worker info)."""
    s = _state
    out = {"pending": len(s.ledger), **s.counts}
    if s.arena is not None:
        out["arena_bytes"] = s.arena.size
        out["arena_free_bytes"] = s.arena.free_pages * PAGE_SIZE
    try:
        st = os.statvfs(SHM_DIR)
        out["dev_shm_bytes"] = st.f_blocks * st.f_frsize
        out["dev_shm_free_bytes"] = st.f_bavail * st.f_frsize
    except OSError:
        pass
    return out
