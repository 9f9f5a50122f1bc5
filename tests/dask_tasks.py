"""Tasks and worker-side helpers for tests/test_dask.py (workers import them by name)."""

from __future__ import annotations

import os
import pathlib
import time
import zlib

import numpy as np

from shmalloc.integrations import dask as sd

WAIT = 60.0


def make(nbytes: int, seed: int):
    """A plain numpy array (not in the arena), seeded."""
    return np.random.default_rng(seed).random(nbytes // 8)


def make_shared(nbytes: int, seed: int, shape=None):
    """The same values in an arena array (a SharedArray)."""
    a = sd._state.arena.ndarray(shape or (nbytes // 8,), np.float64)
    a.reshape(-1)[:] = np.random.default_rng(seed).random(a.size)
    return a


def make_buffer(nbytes: int, seed: int):
    buf = sd._state.arena.alloc(nbytes)
    buf[:] = np.random.default_rng(seed).bytes(nbytes)
    return buf


def view(a, key):
    """A view of ``a`` (a task: its result is a view of the dependency)."""
    return a[key]


def crc(x) -> int:
    """CRC32 of the values (C order), whatever ``x`` is (array or Buffer)."""
    if isinstance(x, np.ndarray):
        return zlib.crc32(np.ascontiguousarray(x).tobytes())
    return zlib.crc32(memoryview(x))


def describe(x) -> dict:
    """What the receiving worker got: type, writeable, where in the arena."""
    buf = getattr(x, "buffer", None) if isinstance(x, np.ndarray) else x
    offset = None
    if buf is not None:
        from shmalloc import buffer as B
        ref = B.array_buffer(x) if isinstance(x, np.ndarray) else (buf, 0)
        offset = ref[0].offset + ref[1] if ref is not None else None
    return {"type": type(x).__name__, "crc": crc(x),
            "writeable": bool(x.flags.writeable) if isinstance(x, np.ndarray) else True,
            "offset": offset}


def counts() -> dict:
    return dict(sd._state.counts, pending=len(sd._state.ledger))


def outgoing(dask_worker) -> list:
    """Dask's own record of what this worker sent: (bytes of the values, bytes
    written on the comm) per transfer."""
    return [(d["total"], d["compressed"]) for d in dask_worker.transfer_outgoing_log]


def pause_before_take(marker_dir: str) -> None:
    """The next reference this worker takes waits: it writes ``reached`` (the frame
    arrived, nothing taken yet) and waits for ``release`` (bounded)."""
    d = pathlib.Path(marker_dir)

    def hook(header):
        sd._before_take.remove(hook)
        (d / "reached").write_text(str(os.getpid()))
        deadline = time.monotonic() + WAIT
        while not (d / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    sd._before_take.append(hook)
