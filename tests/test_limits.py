"""What happens where users run the allocator hard (issue 11), on real POSIX arenas:
an M_WAITOK sleeper and a closing arena, sleepers at a small limit while the free
items sit in another CPU's cache (drain requests, and the keg manager for a CPU that
never calls in again), a full /dev/shm, and stale names left by a crash.

Every test is bounded (timeouts on every join and wait) and seeded where it draws
anything; rerun a failure with SHMALLOC_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX shm and semaphores")

WAIT = 60.0                  # seconds: the bound of every join, wait and subprocess
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float = WAIT, **kw) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a crash there cannot take pytest down)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kw)


# ============================================================================ close vs sleepers
def test_destroy_with_a_thread_asleep_in_m_waitok_wakes_it_with_arena_closed_error(arena_name):
    """Before: destroy() unmapped the thread's CPU under it (SIGSEGV)."""
    r = run_python(f"""
        import threading
        from shmalloc import Arena, ArenaClosedError, M_NOWAIT, M_WAITOK
        a = Arena.create({arena_name!r}, size=8 << 20)
        z = a.zcreate("waitok", 256, max_items=1)
        h = z.alloc(M_NOWAIT)
        out = []
        def sleeper():
            try:
                out.append(z.alloc(M_WAITOK))
            except ArenaClosedError as e:
                out.append(e)
        th = threading.Thread(target=sleeper, daemon=True)
        th.start()
        for _ in range(2000):
            if z.stats().sleepers:
                break
            threading.Event().wait(0.005)
        assert z.stats().sleepers == 1
        a.destroy()
        th.join(10)
        assert not th.is_alive(), "the sleeper still sleeps"
        assert isinstance(out[0], ArenaClosedError), out
        print("ok", out[0])
    """)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stdout, r.stderr)
    assert "closed while this M_WAITOK allocation slept" in r.stdout
