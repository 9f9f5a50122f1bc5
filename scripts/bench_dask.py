"""bench_dask: worker-to-worker transfers in Dask distributed, Dask's own frames
against shmalloc's references, in one run (``shmalloc bench --only dask``).

One ``LocalCluster`` of two worker processes (one thread each, nannies, the
defaults otherwise), set up with ``--preload shmalloc.integrations.dask``.  For
each size, in interleaved rounds (the order of the setups rotates from round to
round), a task on worker A makes an array (untimed), then a task on worker B that
depends on it reads one byte per 4 KiB page of it (every page is mapped in B, so a
reference pays its page faults like a copy does).  Setups:

    dask          Dask's default: the sender has shmalloc switched off
                  (``configure(enabled=False)``), so the bytes go through the comm,
                  exactly as without shmalloc
    shmalloc      a plain numpy array: copied once into the arena by the sender,
                  then handed over by reference
    shmalloc-arena  an array made in the arena (``arena.ndarray``): no copy at all

Figures per transfer, best of the rounds:

    transfer     Dask's own measure of B's fetch (``transfer_incoming_log``: the
                 request, the frames, their deserialization; at least 1 ms)
    touch        B's task reading one byte of every page (the pages of a reference
                 are mapped in B here, those of Dask's frames during the fetch)
    fetch_read   transfer + touch: the figure compared (the target: Dask's over
                 shmalloc's >= 5x at 64 MiB and above)
    e2e          the wall time from submitting B's task to its result: the above
                 plus the scheduling (~10 ms here, the same for every setup)
"""

from __future__ import annotations

import logging
import os
import time

import shmalloc
from shmalloc.ipc import naming

MiB = 1 << 20
SIZES = (1 * MiB, 64 * MiB, 512 * MiB)
QUICK_SIZES = (1 * MiB, 4 * MiB)
SETUPS = ("dask", "shmalloc", "shmalloc-arena")
PAGE = 4096
WAIT = 300.0


# ------------------------------------------------------------------ worker-side tasks
def _make(nbytes: int, setup: str, i: int):
    """An array of ``nbytes`` (float64, filled): plain, or in the arena."""
    import numpy as np              # optional (the dask extra): only where the section runs
    n = nbytes // 8
    if setup == "shmalloc-arena":
        from shmalloc.integrations import dask as sd
        a = sd._state.arena.ndarray(n, np.float64)
    else:
        a = np.empty(n, np.float64)
    a.fill(i + 0.5)
    return a


def _touch(a):
    """Read one byte per page (every page mapped here): (their sum, seconds taken)."""
    import numpy as np
    t0 = time.perf_counter()
    total = int(a.view(np.uint8)[::PAGE].sum())
    return total, time.perf_counter() - t0


def _enable(flag: bool) -> None:
    from shmalloc.integrations import dask as sd
    sd.configure(enabled=flag)


def _last_transfer(key, dask_worker=None) -> float:
    for d in reversed(dask_worker.transfer_incoming_log):
        if key in d["keys"]:
            return d["duration"]
    return float("nan")


def _wire(key, dask_worker=None) -> int:
    """Bytes A wrote on the comm for ``key`` (Dask's transfer_outgoing_log)."""
    for d in reversed(dask_worker.transfer_outgoing_log):
        if key in d["keys"]:
            return d["compressed"]
    return -1


# ------------------------------------------------------------------ the run
def run(quick: bool, repeat: int, base: str) -> dict:
    """Measure every setup at every size; a dict with one record per (setup,
    size): e2e and transfer (best, seconds), the bytes on the wire, runs."""
    import distributed

    sizes = QUICK_SIZES if quick else SIZES
    rounds = 1 if quick else max(repeat, 1)
    name = f"{base}.dask"
    arena_size = 64 * MiB if quick else 2048 * MiB
    env = {"SHMALLOC_ARENA": name, "SHMALLOC_SIZE": str(arena_size), "SHMALLOC_IDLE_EXIT": "2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    arena = shmalloc.connect(name)                       # starts the arena's keg manager
    runs: dict = {(s, n): {k: [] for k in ("e2e", "transfer", "touch", "fetch_read", "wire")}
                  for s in SETUPS for n in sizes}
    t_start = time.monotonic()
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0", silence_logs=logging.ERROR,
                                      preload=["shmalloc.integrations.dask"]) as cluster, \
                distributed.Client(cluster) as client:
            client.wait_for_workers(2, timeout=WAIT)
            a, b = sorted(client.scheduler_info()["workers"])
            startup = time.monotonic() - t_start
            check = {}
            for r in range(rounds + 1):                  # round 0: warm-up, not kept
                for size in sizes:
                    order = SETUPS[r % 3:] + SETUPS[:r % 3]
                    for setup in order:
                        client.run(_enable, setup != "dask", workers=[a])
                        x = client.submit(_make, size, setup, r, workers=[a], pure=False)
                        distributed.wait(x, timeout=WAIT)
                        t0 = time.perf_counter()
                        y = client.submit(_touch, x, workers=[b], pure=False)
                        got, touch = y.result(WAIT)
                        e2e = time.perf_counter() - t0
                        expect = check.setdefault((size, r), got)
                        assert got == expect, (setup, size, got, expect)
                        if r:
                            rec = runs[setup, size]
                            transfer = client.run(_last_transfer, x.key, workers=[b])[b]
                            rec["e2e"].append(e2e)
                            rec["transfer"].append(transfer)
                            rec["touch"].append(touch)
                            rec["fetch_read"].append(transfer + touch)
                            rec["wire"].append(client.run(_wire, x.key, workers=[a])[a])
                        del x, y
                        _wait_released(client)
            client.run(_enable, True)
    finally:
        arena.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _wait_gone(name)
    out = []
    for (setup, size), rec in runs.items():
        out.append({"setup": setup, "size": size, "e2e": min(rec["e2e"]),
                    "transfer": min(rec["transfer"]), "touch": min(rec["touch"]),
                    "fetch_read": min(rec["fetch_read"]), "wire": max(rec["wire"]),
                    "runs": {k: [round(v, 6) for v in vs] for k, vs in rec.items()}})
    return {"records": out, "startup_s": round(startup, 2), "rounds": rounds}


def _wait_released(client, timeout=WAIT) -> None:
    """Until the scheduler forgot every key (the arrays are gone from the workers)."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
        if time.monotonic() > deadline:
            raise TimeoutError("the scheduler still holds keys")
        time.sleep(0.01)


def _wait_gone(name: str, timeout: float = 60.0) -> None:
    """Until the benchmark's arena removed itself (its idle time is 2 s)."""
    deadline = time.monotonic() + timeout
    while naming.list_objects(name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"arena {name} still has {naming.list_objects(name)}")
        time.sleep(0.1)


def available() -> str | None:
    """None if Dask distributed is installed, else why the section cannot run."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return "Dask distributed is not installed (pip install 'shmalloc[dask]'): no dask rows"
    return None
