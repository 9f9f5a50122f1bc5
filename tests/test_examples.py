"""The examples of examples/ (linked from the README and docs/buffers.md, which
tests/test_docs.py checks): each runs as a script, with the
spawn and the fork start method, on a default arena of its own (SHMALLOC_ARENA
set to a fresh name); every reference it made is given back, and the arena
removes itself once idle: nothing is left in /dev/shm.
"""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from shmalloc import Arena
from shmalloc.ipc import naming

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ["pool_numpy", "pipeline_send_recv", "pipeline_queue"]
REF_ZONES = ("mbuf", "mbuf_packet", "mbuf_jumbo_page", "mbuf_jumbo_9k", "mbuf_jumbo_16k",
             "mbuf_ext_refcnt")
IDLE_EXIT = 3.0


def wait_gone(name, timeout=30.0):
    deadline = time.monotonic() + timeout
    while naming.list_objects(name):
        assert time.monotonic() < deadline, f"arena {name} still has {naming.list_objects(name)}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs_and_leaves_nothing(example, method, arena_name):
    env = dict(os.environ, SHMALLOC_ARENA=arena_name, SHMALLOC_IDLE_EXIT=str(IDLE_EXIT))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / f"{example}.py"),
                        "--start-method", method], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout.strip() and not r.stderr.strip(), r.stderr
    # the arena waits IDLE_EXIT seconds for a newcomer: look inside before it goes
    try:
        arena = Arena.attach(arena_name)
    except FileNotFoundError:
        arena = None                     # already gone: it could only go with nothing held
    if arena is not None:
        try:
            used = {z: arena.zone_stats(z).used for z in arena.zones()
                    if z in REF_ZONES or z.startswith("buf_")}
            assert not any(used.values()), f"references left: {used}"
            arena.check()
        finally:
            arena.close()
    wait_gone(arena_name)


# ============================================================================ Dask
DASK_DOC = ROOT / "docs" / "scaling-out.md"
DASK_COMMANDS = [      # docs/scaling-out.md shows them as they are (test below)
    "dask scheduler --scheduler-file cluster.json --port 0",
    "dask worker --scheduler-file cluster.json --nworkers 2 --nthreads 1 "
    "--preload shmalloc.integrations.dask",
    "python examples/dask_cluster.py --scheduler-file cluster.json",
]


def _dask_env(arena_name):
    return dict(os.environ, SHMALLOC_ARENA=arena_name, SHMALLOC_IDLE_EXIT=str(IDLE_EXIT))


def _check_dask_output(r):
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("bytes crossed the comm" in x for x in lines), r.stdout


@pytest.mark.slow
def test_dask_example_runs_and_leaves_nothing(arena_name):
    pytest.importorskip("distributed", reason="Dask distributed is not installed")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "dask_cluster.py")],
                       env=_dask_env(arena_name), capture_output=True, text=True, timeout=180)
    _check_dask_output(r)
    wait_gone(arena_name)


@pytest.mark.slow
def test_dask_example_on_a_cluster_started_with_the_documented_commands(arena_name, tmp_path):
    pytest.importorskip("distributed", reason="Dask distributed is not installed")
    bindir = pathlib.Path(sys.executable).parent
    argv = [c.split() for c in DASK_COMMANDS]
    argv[0][0] = argv[1][0] = str(bindir / "dask")
    argv[2][0], argv[2][1] = sys.executable, str(ROOT / argv[2][1])
    env = _dask_env(arena_name)
    procs = []
    try:
        for cmd in argv[:2]:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 60
            while not (tmp_path / "cluster.json").exists():
                assert procs[0].poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        from distributed import Client          # wait for both workers
        with Client(scheduler_file=str(tmp_path / "cluster.json"), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        r = subprocess.run(argv[2], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=180)
        _check_dask_output(r)
    finally:
        for p in reversed(procs):              # workers first, then the scheduler
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=60)
    wait_gone(arena_name)


def test_the_scaling_out_page_shows_the_example_and_the_commands():
    doc = DASK_DOC.read_text()
    source = (ROOT / "examples" / "dask_cluster.py").read_text()
    assert source.split('"""', 2)[2].strip() in doc
    for cmd in DASK_COMMANDS:
        assert cmd in doc, cmd
