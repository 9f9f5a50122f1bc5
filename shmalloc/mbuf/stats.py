"""stats: ``mbstat`` and ``netstat -m`` in FreeBSD's format, of one era: FreeBSD 7/8
(the seed's, the default) or 11-14 (``usr.bin/netstat/mbuf.c:mbpr``,
``reference/uma_mbuf.md`` §4.3).

The inputs are the zones' statistics as libmemstat derives them (``count`` = allocs -
frees, ``free`` = cached + depot (+ free in the keg's slabs for a primary zone),
``failures``, ``sleeps``, ``limit``), as published: another process's counters lag by
at most one bucket.  Clusters parked in cached packets count as cache, not use.
Reading makes no zone: an arena without mbuf zones prints zeros and the limits in
force.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import ClassVar

from .. import layers
from .. import layout as L
from ..layers import views
from ..arena import Arena
from .constants import (MCLBYTES, MHLEN, MINCLSIZE, MJUM9BYTES, MJUM16BYTES, MJUMPAGESIZE,
                        MLEN, MSIZE, MT_NTYPES)
from .errors import MbufError, SysctlError
from .tunables import current
from .zones import TAG_ZONE_NAMES

_MBS = L.MBS


_MBSTAT = struct.Struct("<10Qh6x3Q")        # struct mbstat of FreeBSD 7/8 on amd64: 112 bytes


@dataclass(frozen=True)
class MbStat:
    """The seed's ``struct mbstat`` (``kern.ipc.mbstat``).  m_mbufs and m_mclusts
    (left at 0 by the seed) are filled with the mbufs and clusters in use; m_mcfail
    counts failed copies (m_copym, m_dup ...), m_mpfail failed pullups, m_drain the
    calls to protocol drain routines that ran (in every process).  ``pack()`` gives
    the struct's 112 bytes as FreeBSD lays them out on amd64; the fields after
    sf_allocwait are shmalloc's own."""
    m_mbufs: int
    m_mclusts: int
    m_drain: int
    m_mcfail: int
    m_mpfail: int
    m_msize: int = MSIZE
    m_mclbytes: int = MCLBYTES
    m_minclsize: int = MINCLSIZE
    m_mlen: int = MLEN
    m_mhlen: int = MHLEN
    m_numtypes: int = MT_NTYPES
    sf_iocnt: int = 0
    sf_allocfail: int = 0
    sf_allocwait: int = 0
    lowmem: int = 0              # vm_lowmem events (not in FreeBSD's struct)
    # M_WAITOK requests that slept (FreeBSD 9+'s "requests for ... delayed"; not in the
    # struct): mbufs/clusters/mbuf+clusters, and 4k/9k/16k jumbo clusters
    mbufs_delayed: tuple = (0, 0, 0)
    jumbo_delayed: tuple = (0, 0, 0)
    SYSCTL_FORMAT: ClassVar[str] = "S,mbstat"    # its sysctl format, as sysctl -o shows it

    def pack(self) -> bytes:
        """The 112 bytes of FreeBSD 7/8's ``struct mbstat`` on amd64 (``"<10Qh6x3Q"``)."""
        return _MBSTAT.pack(self.m_mbufs, self.m_mclusts, self.m_drain, self.m_mcfail,
                            self.m_mpfail, self.m_msize, self.m_mclbytes, self.m_minclsize,
                            self.m_mlen, self.m_mhlen, self.m_numtypes, self.sf_iocnt,
                            self.sf_allocfail, self.sf_allocwait)


@dataclass(frozen=True)
class _Z:
    count: int = 0
    free: int = 0
    limit: int = 0
    failures: int = 0
    sleeps: int = 0


def _zone(arena, name: str, limit: int = 0) -> _Z:
    """A zone's libmemstat numbers; its limit rounded up to whole slabs of its keg,
    FreeBSD 7/8's ``uth_limit`` (the most items its slabs may hold under the limit:
    count + free never exceeds it, unless a limit was set below the items in use)."""
    if views(arena).zone_id(name) < 0:
        return _Z(limit=limit)
    s = arena.zone_stats(name)
    ipers = arena.zone(name).keg.ipers
    return _Z(s.used, s.free, -(-s.limit // ipers) * ipers, s.failures, s.sleeps)


def _inputs(arena) -> dict:
    arena._check_open()
    tun = current(views(arena))
    return dict(
        mbuf=_zone(arena, "mbuf", tun["kern.ipc.nmbufs"]),
        packet=_zone(arena, "mbuf_packet"),
        cluster=_zone(arena, "mbuf_cluster", tun["kern.ipc.nmbclusters"]),
        jumbop=_zone(arena, "mbuf_jumbo_page", tun["kern.ipc.nmbjumbop"]),
        jumbo9=_zone(arena, "mbuf_jumbo_9k", tun["kern.ipc.nmbjumbo9"]),
        jumbo16=_zone(arena, "mbuf_jumbo_16k", tun["kern.ipc.nmbjumbo16"]),
        tag_bytes=sum(_zone(arena, n).count * int(n.rsplit("_", 1)[1])
                      for n in TAG_ZONE_NAMES))


def _mbs(arena, field: str) -> int:
    return views(arena).w[L.MBS_WORD + _MBS[field]]


def mbstat(arena) -> MbStat:
    """``kern.ipc.mbstat``."""
    z = _inputs(arena)
    return MbStat(m_mbufs=z["mbuf"].count + z["packet"].count,
                  m_mclusts=z["cluster"].count - z["packet"].free,
                  m_drain=_mbs(arena, "DRAINS"), m_mcfail=_mbs(arena, "MCFAIL"),
                  m_mpfail=_mbs(arena, "MPFAIL"), lowmem=_mbs(arena, "LOWMEM"),
                  mbufs_delayed=(z["mbuf"].sleeps, z["cluster"].sleeps, z["packet"].sleeps),
                  jumbo_delayed=(z["jumbop"].sleeps, z["jumbo9"].sleeps,
                                 z["jumbo16"].sleeps))


NETSTAT_FORMATS = ("7", "13")
# FreeBSD 11-14's kern.ipc.sfstat lines (no sendfile here: all 0)
_SFSTAT_LINES = (
    "sendfile syscalls", "sendfile syscalls completed without I/O request",
    "requests for I/O initiated by sendfile", "pages read by sendfile as part of a request",
    "pages were valid at time of a sendfile request",
    "pages were valid and substituted to bogus page",
    "pages were requested for read ahead by applications",
    "pages were read ahead by sendfile", "times sendfile encountered an already busy page",
    "requests for sfbufs denied", "requests for sfbufs delayed")


def netstat_m(arena, format: str = "7") -> str:
    """``netstat -m`` of one era (``usr.bin/netstat/mbuf.c:mbpr``):

    - ``"7"`` (the default, the seed's era): FreeBSD 7/8's fourteen lines -- the mbuf
      and cluster lines, the denied lines, then the sfbuf and sendfile lines (all 0:
      no sendfile here; ``0/0/0 sfbufs`` as on amd64) and the calls to protocol drain
      routines (``m_drain``);
    - ``"13"``: FreeBSD 11-14's -- the same mbuf lines with the "delayed" lines (M_WAITOK
      requests that slept), then the ``kern.ipc.sfstat`` lines, no drain line.

    A maximum is the limit rounded up to whole slabs, as FreeBSD 7/8's ``uth_limit``
    is, so that current + cache never shows above it."""
    if format not in NETSTAT_FORMATS:
        raise MbufError(f"netstat -m: format {format!r} is not one of "
                        f"{', '.join(map(repr, NETSTAT_FORMATS))} (FreeBSD 7/8, 11-14)")
    z = _inputs(arena)
    mb, pk, cl = z["mbuf"], z["packet"], z["cluster"]
    jp, j9, j16 = z["jumbop"], z["jumbo9"], z["jumbo16"]
    bytes_inuse = (mb.count * MSIZE + pk.count * MSIZE + pk.count * MCLBYTES
                   + (cl.count - pk.count - pk.free) * MCLBYTES + z["tag_bytes"]
                   + jp.count * MJUMPAGESIZE + j9.count * MJUM9BYTES + j16.count * MJUM16BYTES)
    bytes_incache = (mb.free * MSIZE + pk.free * MSIZE + pk.free * MCLBYTES
                     + cl.free * MCLBYTES + jp.free * MJUMPAGESIZE + j9.free * MJUM9BYTES
                     + j16.free * MJUM16BYTES)
    pg = MJUMPAGESIZE // 1024
    lines = [
        f"{mb.count + pk.count}/{mb.free + pk.free}/{mb.count + pk.count + mb.free + pk.free} "
        f"mbufs in use (current/cache/total)",
        f"{cl.count - pk.free}/{cl.free + pk.free}/{cl.count + cl.free}/{cl.limit} "
        f"mbuf clusters in use (current/cache/total/max)",
        f"{pk.count}/{pk.free} mbuf+clusters out of packet secondary zone in use "
        f"(current/cache)",
        f"{jp.count}/{jp.free}/{jp.count + jp.free}/{jp.limit} {pg}k (page size) jumbo "
        f"clusters in use (current/cache/total/max)",
        f"{j9.count}/{j9.free}/{j9.count + j9.free}/{j9.limit} 9k jumbo clusters in use "
        f"(current/cache/total/max)",
        f"{j16.count}/{j16.free}/{j16.count + j16.free}/{j16.limit} 16k jumbo clusters in use "
        f"(current/cache/total/max)",
        f"{bytes_inuse // 1024}K/{bytes_incache // 1024}K/"
        f"{(bytes_inuse + bytes_incache) // 1024}K bytes allocated to network "
        f"(current/cache/total)",
        f"{mb.failures}/{cl.failures}/{pk.failures} requests for mbufs denied "
        f"(mbufs/clusters/mbuf+clusters)",
    ]
    if format == "7":
        st = mbstat(arena)
        lines += [
            f"{jp.failures}/{j9.failures}/{j16.failures} requests for jumbo clusters denied "
            f"({pg}k/9k/16k)",
            "0/0/0 sfbufs in use (current/peak/max)",
            f"{st.sf_allocfail} requests for sfbufs denied",
            f"{st.sf_allocwait} requests for sfbufs delayed",
            f"{st.sf_iocnt} requests for I/O initiated by sendfile",
            f"{st.m_drain} calls to protocol drain routines",
        ]
    else:
        lines += [
            f"{mb.sleeps}/{cl.sleeps}/{pk.sleeps} requests for mbufs delayed "
            f"(mbufs/clusters/mbuf+clusters)",
            f"{jp.sleeps}/{j9.sleeps}/{j16.sleeps} requests for jumbo clusters delayed "
            f"({pg}k/9k/16k)",
            f"{jp.failures}/{j9.failures}/{j16.failures} requests for jumbo clusters denied "
            f"({pg}k/9k/16k)",
        ]
        lines += [f"0 {what}" for what in _SFSTAT_LINES]
    return "\n".join(lines) + "\n"


def stat_m_text(name: str, format: str = "7") -> str:
    """``shmalloc stat -m --name NAME [--format 7|13]``: attach to the running arena,
    print its netstat -m, detach."""
    arena = Arena.attach(name)
    try:
        return netstat_m(arena, format)
    finally:
        arena.close()


def mbstat_sysctl(arena, name: str, value=None) -> MbStat:
    """``kern.ipc.mbstat``: read-only (the seed's ``SYSCTL_STRUCT(..., CTLFLAG_RD, ...)``);
    reads give the MbStat, a write is EPERM."""
    if value is not None:
        raise SysctlError(errno.EPERM, f"sysctl: oid {name!r} is read only")
    return mbstat(arena)


# the arena's facade: arena.netstat_m(), arena.mbstat(); arena.sysctl("kern.ipc.mbstat")
Arena.extend(netstat_m)
Arena.extend(mbstat)
layers.register_sysctl(["kern.ipc.mbstat"], mbstat_sysctl)
