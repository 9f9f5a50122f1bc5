"""The worker runtime: one process playing one CPU of an arena."""

import os
import time
import traceback

from shmalloc import Arena

from .workloads import churn


def worker_main(arena_name, zone_names, seed, seconds, result_queue, progress_value=None):
    """Attach to ``arena_name`` as a new CPU, churn ``zone_names`` for ``seconds``, close.

    Every item is freed before the CPU closes (close gives its cache back). Puts one dict
    on ``result_queue``: pid, seed, cpu, and either counts (from ``churn``) and stats (this
    CPU's ``CpuStats``, published) or error (a traceback). ``progress_value`` (a shared
    ``'q'`` value, or None) is set to the ops done so far, every ~1000 ops. Exits with
    status 1 after an error.
    """
    def progress(ops):
        progress_value.value = ops

    result = {"pid": os.getpid(), "seed": seed}
    try:
        with Arena.attach(arena_name) as arena:
            result["cpu"] = arena.cpu_id
            result["counts"] = churn(arena, zone_names, seed, time.monotonic() + seconds,
                                     progress if progress_value is not None else None)
            result["stats"] = next(s for s in arena.cpu_stats() if s.cpu == arena.cpu_id)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
    except Exception:  # noqa: BLE001 - reported to the launcher, which prints it
        result["error"] = traceback.format_exc()
    result_queue.put(result)
    if "error" in result:
        raise SystemExit(1)
