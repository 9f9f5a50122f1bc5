"""Two Dask workers on one host hand each other arrays by reference: the bytes stay
in the host's shmalloc arena, a few hundred bytes cross the comm (docs/scaling-out.md).

Without arguments it starts a LocalCluster of two worker processes set up with
``--preload shmalloc.integrations.dask``; with ``--scheduler-file`` it uses a
cluster started from the command line (``dask scheduler``, ``dask worker``).
"""
import argparse

import numpy as np
from distributed import Client, LocalCluster

import shmalloc


def make(seed, n):
    """On worker A: an array made in the host's arena (sent with no copy)."""
    a = shmalloc.connect().ndarray(n, np.float64)
    a[:] = np.random.default_rng(seed).random(n)
    return a


def make_plain(seed, n):
    """On worker A: an ordinary numpy array (copied once into the arena when sent)."""
    return np.random.default_rng(seed).random(n)


def total(a):
    """On worker B: reads the array in place."""
    return float(a.sum())


def sent(dask_worker):
    """Dask's own record of a worker's transfers: (bytes of values, bytes on the comm)."""
    return [(d["total"], d["compressed"]) for d in dask_worker.transfer_outgoing_log]


def main(scheduler_file=None, n=8 << 20):
    if scheduler_file:
        cluster, client = None, Client(scheduler_file=scheduler_file)
    else:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               preload=["shmalloc.integrations.dask"], dashboard_address=":0")
        client = Client(cluster)
    try:
        with client:
            a, b = sorted(client.scheduler_info()["workers"])[:2]
            for fn in (make, make_plain):
                x = client.submit(fn, 0, n, workers=[a])
                s = client.submit(total, x, workers=[b]).result(timeout=120)
                assert abs(s - float(np.random.default_rng(0).random(n).sum())) < 1e-6 * n
                values, wire = client.run(sent, workers=[a])[a][-1]
                assert wire < 4096 < values
                print(f"{fn.__name__}: worker B summed worker A's array of {values:,} bytes "
                      f"({s:.1f}); {wire} bytes crossed the comm")
                del x
    finally:
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scheduler-file", help="use this cluster instead of a LocalCluster")
    main(p.parse_args().scheduler_file)
