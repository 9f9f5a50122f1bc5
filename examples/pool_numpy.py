"""ProcessPoolExecutor over large numpy arrays, with no copies.

The arrays live in the default arena (shmalloc.connect() starts one if none runs).
A worker receives a reference -- a pickle of about a hundred bytes, not 8 MB --
centres the array in place, and returns its mean: the parent sees the writes.
"""

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import shmalloc


def centre(a):
    """Runs in a worker: ``a`` is the parent's array, mapped here."""
    mean = float(a.mean())
    a -= mean
    return mean


def main(start_method, n_arrays=6, shape=(1000, 1000)):
    arena = shmalloc.connect()
    arrays = [arena.ndarray(shape, np.float64) for _ in range(n_arrays)]
    rng = np.random.default_rng(0)
    for i, a in enumerate(arrays):
        a[:] = rng.random(shape) + i
    print(f"{n_arrays} arrays of {arrays[0].nbytes} bytes")
    ctx = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        means = list(pool.map(centre, arrays, timeout=120))
    for i, (a, mean) in enumerate(zip(arrays, means)):
        assert abs(mean - (i + 0.5)) < 0.01, mean
        assert abs(a.mean()) < 1e-9              # the workers wrote into our arrays
    print("means:", " ".join(f"{m:.3f}" for m in means), "-- centred in place by the workers")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--start-method", default="spawn", choices=("spawn", "fork", "forkserver"))
    main(p.parse_args().start_method)
