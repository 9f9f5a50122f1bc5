"""The same pipeline with multiprocessing.Queue passing Buffers.

Putting a Buffer on a Queue pickles a new reference to it (about a hundred bytes):
the handle travels, the bytes stay where they are.  The receiver owns that
reference.  Queue.put pickles later, in a feeder thread, so the sender does not
close a Buffer it has just put: it drops it (the loop rebinds ``buf``), and its
own reference closes once the queue has sent the object.
"""

import argparse
import multiprocessing
import struct
import zlib

import shmalloc

HEADER = struct.Struct("<QI")        # sequence number, CRC32 of the payload
SIZE = 64 << 10


def worker(inbox, outbox):
    while (buf := inbox.get(timeout=60)) is not None:
        seq, _ = HEADER.unpack_from(buf)
        with memoryview(buf) as v:
            HEADER.pack_into(v, 0, seq, zlib.crc32(v[HEADER.size:]))
        outbox.put(buf)                           # a new reference for the consumer
    outbox.put(None)


def consumer(inbox, n_workers, results):
    seen, stopped = set(), 0
    while stopped < n_workers:
        buf = inbox.get(timeout=60)
        if buf is None:
            stopped += 1
            continue
        with buf:
            seq, crc = HEADER.unpack_from(buf)
            assert crc == zlib.crc32(memoryview(buf)[HEADER.size:]), seq
            seen.add(seq)
    results.put(len(seen))


def main(start_method, n_workers=2, total=200):
    ctx = multiprocessing.get_context(start_method)
    arena = shmalloc.connect()
    work, done, results = ctx.Queue(maxsize=32), ctx.Queue(maxsize=32), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(work, done)) for _ in range(n_workers)]
    procs.append(ctx.Process(target=consumer, args=(done, n_workers, results)))
    for p in procs:
        p.start()
    for seq in range(total):
        buf = arena.alloc(SIZE)
        buf[HEADER.size:] = bytes([seq % 256]) * (SIZE - HEADER.size)
        HEADER.pack_into(memoryview(buf), 0, seq, 0)
        work.put(buf)                             # no close(): see the docstring
    del buf
    for _ in range(n_workers):
        work.put(None)
    n = results.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert n == total and all(p.exitcode == 0 for p in procs)
    print(f"{total} Buffers of {SIZE} bytes through multiprocessing.Queue: handles travel, "
          f"bytes don't")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--start-method", default="spawn", choices=("spawn", "fork", "forkserver"))
    main(p.parse_args().start_method)
