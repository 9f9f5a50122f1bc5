"""The examples of examples/ (shown in the README): each runs as a script, with the
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


def test_the_readme_shows_every_example():
    readme = (ROOT / "README.md").read_text()
    for example in EXAMPLES:
        source = (ROOT / "examples" / f"{example}.py").read_text()
        body = source.split('"""', 2)[2].strip()        # the code after the docstring
        assert body in readme, f"README does not show examples/{example}.py as it is"
