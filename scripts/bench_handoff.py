"""Producer -> consumer hand-off between two processes, for ``shmalloc bench`` (section
``handoff``): shmalloc against ``multiprocessing.Queue``, ``multiprocessing.Pipe``
(``send_bytes``/``recv_bytes``) and ``faster_fifo.Queue`` (if installed), in one run.

The approach of ``/work/shared/reference/peer_bench.py``: the parent is the producer,
a forked child the consumer; a warm-up of ``WARMUP`` messages, then the clock runs from
the producer's first timed message to the consumer's last (both ``perf_counter``,
CLOCK_MONOTONIC, one clock for the machine).  Every transport does the same work: the
producer copies the payload in once, the consumer checks the first and last byte of
what it got (and counts a mismatch).

    shmalloc    a zone of the payload size: xfree=XFREE ("local": a received item
                becomes the consumer's, its free is a fast-path free and whole
                buckets go back to the producer through the depot; measured faster
                than "message", where frees go home in batches by mail), a limit of
                INFLIGHT_BYTES of items, and a bucket of one batch (``batch_for(size)``:
                128 handles, at most a quarter of the limit; UMA's default bucket, 8 items at
                2 KiB and 1 above 4 KiB, measured 1.4x slower at 2 KiB and 2.6x at
                64 KiB with xfree="message").  The producer takes a batch with
                ``zone.alloc_bulk`` (BULK; else allocs one by one), writes
                ``zone.view(h)[:] = payload`` into each item and hands the batch over
                with ``arena.send``; the consumer ``recv``s, reads ``zone.view(h)``
                of each, and gives back what it received with ``zone.free_bulk``
                (else frees one by one)
    mp.Queue    put(payload) / get()
    mp.Pipe     send_bytes(payload) / recv_bytes()
    faster_fifo put(payload) / get(), and put / get_many(); a buffer of INFLIGHT_BYTES

``run(quick, repeat, name)`` returns one record per (transport, size), the best of
``repeat`` runs (items/s, MB/s with 1 MB = 10^6 bytes).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import time

from shmalloc import M_NOWAIT, Arena, MailboxFullError

SIZES = (2048, 65536, 1 << 20)
COUNTS = {2048: (100_000, 3_000), 65536: (20_000, 600), 1 << 20: (1_500, 60)}   # full, quick
WARMUP = (128, 32)
BATCH = 128                      # handles per message at most (measured: 64 costs 15 % more)
INFLIGHT_BYTES = 32 << 20        # shmalloc zone limit = faster_fifo buffer
ARENA_SIZE = 96 << 20
ZONE = "handoff"
XFREE = "local"                  # how the consumer's frees go back (measured: docs/benchmarks.md)
BULK = True                      # alloc_bulk a batch and free_bulk what came (else one by one)
DEADLINE = 120.0                 # a run that takes longer is abandoned (a stuck peer)
CTX = mp.get_context("fork")


class HandoffError(RuntimeError):
    """A transport run failed (child died, timed out, data mismatch)."""


def limit_for(size: int) -> int:
    """The hand-off zone's limit in items: INFLIGHT_BYTES of payload."""
    return max(2, INFLIGHT_BYTES // size)


def batch_for(size: int) -> int:
    """Handles per message and the zone's bucket size: BATCH, at most a quarter of the
    zone's limit.  A CPU's cache holds up to two buckets, so the consumer's can never
    keep so many freed items that the producer finds none (with xfree="local" they
    reach it through the depot when the consumer's cache spills)."""
    return max(1, min(BATCH, limit_for(size) // 4))


def transports() -> list[str]:
    """The transports measurable here (faster_fifo only when importable)."""
    kinds = ["shmalloc", "mp.Queue", "mp.Pipe"]
    if importlib.util.find_spec("faster_fifo") is None:
        return kinds
    return kinds + ["faster_fifo", "faster_fifo get_many"]


def faster_fifo_note() -> str | None:
    if importlib.util.find_spec("faster_fifo") is None:
        return "faster-fifo not installed (pip install faster-fifo): its rows are skipped"
    return None


def run(quick: bool = False, repeat: int = 3, name: str = "bench",
        profile: str | None = None) -> list[dict]:
    """Every transport at every size; best of ``repeat`` runs each.  With ``profile``
    (a directory), one more shmalloc run per size under cProfile, not timed, writes
    ``handoff_<size>_producer.prof`` and ``..._consumer.prof`` there."""
    out = []
    kinds = transports()
    for size in SIZES:
        n = COUNTS[size][1 if quick else 0]
        n_warm = WARMUP[1 if quick else 0]
        runs = {kind: [] for kind in kinds}
        for i in range(repeat):                 # rounds over every transport: drift in
            for kind in kinds:                  # the machine's load hits all alike
                runs[kind].append(_run_one(kind, size, n, n_warm,
                                           f"{name}.h{size >> 10}k{i}"))
        if profile:
            _run_shmalloc(os.urandom(size), n, n_warm, f"{name}.h{size >> 10}kp",
                          os.path.join(profile, f"handoff_{size >> 10}k"))
        for kind in kinds:
            best = min(runs[kind])
            rate = n / best
            out.append({"transport": kind, "size": size, "n": n, "seconds": best,
                        "runs": runs[kind], "items_per_s": rate, "mb_per_s": rate * size / 1e6,
                        "us_per_item": 1e6 / rate,
                        "batch": batch_for(size) if kind == "shmalloc" else None})
    return out


# ------------------------------------------------------------------ one timed run
def _run_one(kind, size, n, n_warm, arena_name):
    payload = os.urandom(size)
    check = (size, payload[0], payload[-1])
    if kind == "shmalloc":
        return _run_shmalloc(payload, n, n_warm, arena_name)
    if kind == "mp.Queue":
        q = CTX.Queue()
        try:
            return _timed(_producer(q.put, payload), _consume_queue,
                          (q, n_warm, n, check, False), n_warm, n)
        finally:
            q.close()
            q.join_thread()
    if kind == "mp.Pipe":
        r, w = CTX.Pipe(duplex=False)
        try:
            return _timed(_producer(w.send_bytes, payload), _consume_pipe,
                          (r, n_warm, n, check), n_warm, n)
        finally:
            r.close()
            w.close()
    if kind.startswith("faster_fifo"):
        import faster_fifo
        q = faster_fifo.Queue(max_size_bytes=max(INFLIGHT_BYTES, 8 * (size + 1024)))

        def put(item, _put=q.put):
            _put(item, timeout=DEADLINE)
        return _timed(_producer(put, payload), _consume_queue,
                      (q, n_warm, n, check, kind.endswith("get_many")), n_warm, n)
    raise ValueError(kind)


def _producer(put, payload):
    def produce(k):
        for _ in range(k):
            put(payload)
    return produce


def _timed(produce, consumer, args, n_warm, n, on_ready=None):
    """Start ``consumer(*args, ack)``, produce ``n_warm`` items, then ``n`` timed ones;
    the seconds from the producer's first timed item to the consumer's last.
    ``on_ready(first ack)`` runs before the warm-up (the consumer's CPU id)."""
    ack_r, ack_w = CTX.Pipe(duplex=False)
    p = CTX.Process(target=consumer, args=(*args, ack_w), daemon=True)
    p.start()
    ack_w.close()
    try:
        if on_ready is not None:
            on_ready(_ack(ack_r, p))
        produce(n_warm)
        _ack(ack_r, p)                          # the consumer has the warm-up
        t0 = time.perf_counter()
        produce(n)
        t_end, bad = _ack(ack_r, p)
        if bad:
            raise HandoffError(f"consumer saw {bad} payloads with wrong bytes")
        return t_end - t0
    finally:
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
        ack_r.close()


def _ack(conn, proc):
    if not conn.poll(DEADLINE):
        raise HandoffError(f"consumer silent for {DEADLINE:g} s (exit code {proc.exitcode})")
    try:
        return conn.recv()
    except EOFError:
        proc.join(5)
        raise HandoffError(f"consumer died (exit code {proc.exitcode})") from None


# ------------------------------------------------------------------ peers' consumers
# The same work on every transport: the length, the first and the last byte.
def _consume_queue(q, n_warm, n, check, many, ack):
    size, first, last = check
    end = size - 1
    bad = 0
    for phase in (n_warm, n):
        got = 0
        if many:
            while got < phase:
                ms = q.get_many(timeout=DEADLINE, max_messages_to_get=1000)
                for m in ms:
                    if len(m) != size or m[0] != first or m[end] != last:
                        bad += 1
                got += len(ms)
        else:
            get = q.get
            for _ in range(phase):
                m = get()
                if len(m) != size or m[0] != first or m[end] != last:
                    bad += 1
        ack.send((time.perf_counter(), bad))


def _consume_pipe(r, n_warm, n, check, ack):
    size, first, last = check
    end = size - 1
    bad = 0
    recv = r.recv_bytes
    for phase in (n_warm, n):
        for _ in range(phase):
            m = recv()
            if len(m) != size or m[0] != first or m[end] != last:
                bad += 1
        ack.send((time.perf_counter(), bad))


# ------------------------------------------------------------------ shmalloc
def _run_shmalloc(payload, n, n_warm, arena_name, profile=None, xfree=None):
    """One hand-off run on a new arena ``arena_name`` (destroyed before returning);
    ``profile``: a path prefix for the two sides' cProfile dumps of the timed phase."""
    size = len(payload)
    arena = Arena.create(arena_name, ARENA_SIZE)
    try:
        zone = arena.zcreate(ZONE, size, xfree=xfree or XFREE, max_items=limit_for(size),
                             bucket_size=batch_for(size))
        dest = []
        produce = _shmalloc_producer(arena, zone, payload, dest)
        if profile:
            produce = _profiled(produce, n, f"{profile}_producer.prof")
        dt = _timed(produce, _consume_shmalloc,
                    (arena_name, n_warm, n, (size, payload[0], payload[-1]), profile),
                    n_warm, n, on_ready=dest.append)
        arena.poll()
        arena.check()
        return dt
    finally:
        arena.destroy()


def _shmalloc_producer(arena, zone, payload, dest):
    alloc, alloc_bulk, view = zone.alloc, zone.alloc_bulk, zone.view
    send, poll = arena.send, arena.poll
    batch_max = batch_for(len(payload))

    def post(batch):
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                send(dest[0], batch)
                return
            except MailboxFullError:
                if time.monotonic() > deadline:
                    raise
                poll()                      # take our own mail meanwhile
                time.sleep(50e-6)

    def get_item(batch):
        """No item at hand (the limit, or all in flight): flush, take mail, wait."""
        if batch:
            post(batch)
            batch.clear()
        deadline = time.monotonic() + DEADLINE
        while True:
            poll()
            h = alloc(M_NOWAIT)
            if h is not None:
                return h
            if time.monotonic() > deadline:
                raise HandoffError("producer got no item back within the deadline")
            time.sleep(50e-6)

    def produce_items(k):
        batch = []
        for _ in range(k):
            h = alloc(M_NOWAIT)
            if h is None:
                h = get_item(batch)
            view(h)[:] = payload
            batch.append(h)
            if len(batch) == batch_max:
                post(batch)
                batch = []
        if batch:
            post(batch)

    def produce_batches(k):
        while k:
            n = min(k, batch_max)
            batch = alloc_bulk(n, M_NOWAIT)
            if batch is None:               # not n at hand: as many as there are
                batch = [get_item([])]
            for h in batch:
                view(h)[:] = payload
            post(batch)
            k -= len(batch)
    return produce_batches if BULK else produce_items


def _profiled(produce, n, path):
    """``produce`` with its timed call (``n`` items) run under cProfile, dumped to ``path``."""
    import cProfile

    def run(k):
        if k != n:
            return produce(k)
        prof = cProfile.Profile()
        try:
            return prof.runcall(produce, k)
        finally:
            prof.dump_stats(path)
    return run


def _consume_shmalloc(arena_name, n_warm, n, check, profile, ack):
    size, first, last = check
    end = size - 1
    bad = 0
    arena = Arena.attach(arena_name)
    try:
        zone = arena.zone(ZONE)
        ack.send(arena.cpu_id)
        view, free, free_bulk, recv = zone.view, zone.free, zone.free_bulk, arena.recv
        deadline = time.monotonic() + DEADLINE
        prof = None
        for i, phase in enumerate((n_warm, n)):
            if profile and i == 1:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            got = 0
            while got < phase:
                hs = recv(1.0)
                for h in hs:
                    m = view(h)
                    if len(m) != size or m[0] != first or m[end] != last:
                        bad += 1
                    if not BULK:
                        free(h)
                if BULK:
                    free_bulk(hs)
                got += len(hs)
                if not hs and time.monotonic() > deadline:
                    raise HandoffError("consumer: nothing received before the deadline")
            if prof is not None:
                prof.disable()
                prof.dump_stats(f"{profile}_consumer.prof")
            ack.send((time.perf_counter(), bad))
        arena.poll()                            # the last remote frees go home
    finally:
        arena.close()
