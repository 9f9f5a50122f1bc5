"""Producer -> workers -> consumer, handing Buffers over with arena.send / recv.

Every process is a CPU of the default arena.  The producer fills 64 KiB Buffers
and sends each to a worker; a worker stamps a CRC32 into the Buffer's header, in
place, and sends it on to the consumer, which checks it and closes it.  A send
moves the reference (one mbuf handle) to the receiving CPU: no bytes are copied.
A multiprocessing.Queue carries only control messages (CPU ids, counts).
"""

import argparse
import multiprocessing
import struct
import zlib

import shmalloc

HEADER = struct.Struct("<QI")        # sequence number, CRC32 of the payload
SIZE = 64 << 10


def worker(control, consumer_cpu, stop):
    arena = shmalloc.connect()
    control.put(("worker", arena.cpu_id))
    while not stop.is_set():
        for h in arena.recv(timeout=0.1):
            buf = shmalloc.Buffer.from_handle(arena, h)
            seq, _ = HEADER.unpack_from(buf)
            with memoryview(buf) as v:
                HEADER.pack_into(v, 0, seq, zlib.crc32(v[HEADER.size:]))
            arena.send(consumer_cpu.value, [buf.handle], timeout=10)
            buf.detach()                          # the reference is the consumer's now


def consumer(control, cpu, total, stop):
    arena = shmalloc.connect()
    cpu.value = arena.cpu_id
    control.put(("consumer", arena.cpu_id))
    seen = set()
    while len(seen) < total:
        for h in arena.recv(timeout=10):
            with shmalloc.Buffer.from_handle(arena, h) as buf:
                seq, crc = HEADER.unpack_from(buf)
                assert crc == zlib.crc32(memoryview(buf)[HEADER.size:]), seq
                seen.add(seq)
    stop.set()
    control.put(("done", len(seen)))


def main(start_method, n_workers=2, total=200):
    ctx = multiprocessing.get_context(start_method)
    arena = shmalloc.connect()
    control, stop, cpu = ctx.Queue(), ctx.Event(), ctx.Value("i", -1)
    procs = [ctx.Process(target=consumer, args=(control, cpu, total, stop))]
    procs[0].start()
    assert control.get(timeout=60)[0] == "consumer"
    procs += [ctx.Process(target=worker, args=(control, cpu, stop)) for _ in range(n_workers)]
    for p in procs[1:]:
        p.start()
    workers = [control.get(timeout=60)[1] for _ in range(n_workers)]
    for seq in range(total):
        buf = arena.alloc(SIZE)
        buf[HEADER.size:] = bytes([seq % 256]) * (SIZE - HEADER.size)
        HEADER.pack_into(memoryview(buf), 0, seq, 0)
        arena.send(workers[seq % n_workers], [buf.handle], timeout=10)
        buf.detach()
    kind, n = control.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert kind == "done" and n == total and all(p.exitcode == 0 for p in procs)
    print(f"{total} Buffers of {SIZE} bytes: producer -> {n_workers} workers -> consumer, "
          f"handed over by reference")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--start-method", default="spawn", choices=("spawn", "fork", "forkserver"))
    main(p.parse_args().start_method)
