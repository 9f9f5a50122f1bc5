"""Run as a script (its functions live in ``__main__``): m_extadd with a free routine
defined in ``__main__`` -- called when this process frees the last reference, refused
with a clear MbufError in a process that cannot import it (a fork child here).

    python tests/mbuf_main_free.py ARENA_NAME      prints "same ok" and "other ok"
"""

import os
import sys

from shmalloc import Arena
from shmalloc import mbuf as mb

CALLS = []


def main_free(m, arg1, arg2):
    """A free routine of ``__main__``."""
    CALLS.append((arg1, arg2))


def same_process():
    a = Arena.create_local(8 << 20)
    store = a.zcreate("store", 1000)
    buf = store.alloc(mb.M_NOWAIT)
    m = mb.m_get(mb.M_NOWAIT, mb.MT_DATA, arena=a)
    assert mb.m_extadd(m, buf, 1000, main_free, 1, 2, 0, mb.EXT_NET_DRV) == 0
    assert m.m_ext.ext_free == f"__main__@{os.getpid()}:main_free", m.m_ext.ext_free
    n = mb.m_copym(m, 0, mb.M_COPYALL, mb.M_NOWAIT)
    mb.m_freem(m)
    assert CALLS == []
    mb.m_freem(n)
    assert CALLS == [(1, 2)], CALLS
    store.free(buf)
    a.check()
    a.destroy()
    print("same ok")


def other_process(name):
    a = Arena.create(name, 8 << 20)
    try:
        store = a.zcreate("store", 1000)
        buf = store.alloc(mb.M_NOWAIT)
        m = mb.m_get(mb.M_NOWAIT, mb.MT_DATA, arena=a)
        assert mb.m_extadd(m, buf, 1000, "__main__:main_free", 3, 4) == 0
        pid = os.fork()
        if pid == 0:                                # the child: another process
            code = 1
            try:
                b = Arena.attach(name)
                try:
                    mb.m_freem(mb.Mbuf.from_handle(b, m.handle))
                except mb.MbufError as e:
                    code = 0 if "cannot call" in str(e) and str(os.getppid()) in str(e) else 2
                    print(e, file=sys.stderr)
                b.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert CALLS == [(1, 2)]                    # not called, here or there
        assert a.zone_stats("mbuf").used == 0 and a.zone_stats("mbuf_ext_refcnt").used == 0
        store.free(buf)                             # the storage is still the caller's
        a.check()
    finally:
        a.destroy()
    print("other ok")


if __name__ == "__main__":
    same_process()
    other_process(sys.argv[1])
