"""integrations: shmalloc under other engines -- an upper layer.

``shmalloc.integrations.dask``: the same-host layer of Dask distributed (worker to
worker transfers by reference), ``shmalloc.integrations.ray``: Buffers and
SharedArrays in Ray's object store.  Each imports its engine, and only the public
Buffer and arena API of shmalloc; nothing in shmalloc imports them, so
``import shmalloc`` never imports an engine.  Install the engine with the extra of
its name (``pip install 'shmalloc[dask]'``, ``'shmalloc[ray]'``).
"""
