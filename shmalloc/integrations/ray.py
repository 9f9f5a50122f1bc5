"""integrations.ray: shmalloc Buffers and SharedArrays in Ray.

Ray already has a same-host layer: one shared-memory object store per node, from
which every process of the node reads numpy arrays in place (read-only), and which
Ray copies between nodes itself.  What Ray lacks is a way to tell when one of its
objects is read, how many times, or when it is freed: an object may be read any
number of times, by any process, on any node, and lives as long as Ray decides.
A shmalloc reference is the opposite (one holder per reference, taken once, freed
by its holder), so it cannot live inside a Ray object: the pickle of a Buffer
would load once (a second ``ray.get`` fails), fail on another node, and leak its
storage if never loaded.

So Buffers and SharedArrays go into Ray **by value**, the way numpy arrays do:
``register()`` makes Ray serialize them (``ray.util.register_serializer``) as a
numpy view of their bytes, which Ray copies once into its object store (the
Buffer's own reference is untouched: its holder closes it as usual), and reads
back on the same node with no copy:

- a ``SharedArray`` comes back as a read-only ``numpy.ndarray`` in Ray's store
  (as any numpy array put into Ray);
- a ``Buffer`` comes back as a read-only ``memoryview`` of its bytes there.

To share *writable* memory between processes on one host, use shmalloc directly
(Buffers through a Pool, a Queue or ``arena.send``); Ray's values are immutable.

Register in the driver (``register()``) and in every worker, which serializes
task results: ``ray.init(runtime_env={"worker_process_setup_hook":
"shmalloc.integrations.ray.register"})``.
"""

from __future__ import annotations

import numpy as np
import ray

import shmalloc

__all__ = ["register"]


def register() -> None:
    """Serialize Buffers and SharedArrays by value in Ray, in this process."""
    ray.util.register_serializer(shmalloc.Buffer, serializer=_buffer_bytes,
                                 deserializer=_read_only_bytes)
    ray.util.register_serializer(shmalloc.SharedArray, serializer=_plain_array,
                                 deserializer=_same)


def _buffer_bytes(buf) -> np.ndarray:
    """A uint8 view of the Buffer: Ray copies it into its store (pickle protocol 5,
    out of band)."""
    return np.frombuffer(buf, np.uint8)


def _read_only_bytes(arr: np.ndarray) -> memoryview:
    return memoryview(arr).toreadonly()


def _plain_array(a) -> np.ndarray:
    """The SharedArray as a plain ndarray viewing the same memory (no copy here:
    Ray copies it into its store)."""
    return a.view(np.ndarray)


def _same(a: np.ndarray) -> np.ndarray:
    return a
