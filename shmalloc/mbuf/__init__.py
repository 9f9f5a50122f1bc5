"""The mbuf layer: FreeBSD's mbuf allocator ("mbuma", ``kern_mbuf.c``) on shmalloc's
UMA core, with FreeBSD's names, constants and argument order::

    from shmalloc import mbuf as mb
    m = mb.m_getcl(mb.M_NOWAIT, mb.MT_DATA, mb.M_PKTHDR, arena=arena)
    mb.m_append(m, 5, b"hello")
    n = mb.m_copym(m, 0, mb.M_COPYALL, mb.M_NOWAIT)     # shares the cluster
    mb.m_freem(n); mb.m_freem(m)

Modules, lowest first (each imports only those above it in this list)::

    constants  sizes from the layout, flags, types            sys/mbuf.h
    errors     MbufError, SysctlError
    limits     the limits in force: tunable_mbinit            kern_mbuf.c
    zones      mbuf_init, the word offsets of an mbuf, the per-CPU context ctx(arena)
                                                              kern_mbuf.c
    header     the Mbuf and MTag objects                      sys/mbuf.h
    tags       m_tag functions                                uipc_mbuf2.c
    refs       references to external storage: share, drop, set aside, the journal
                                                              mb_dupcl, mb_free_ext
    ctors      the zones' ctors, dtors, inits, finis; the label hook   kern_mbuf.c
    tunables   tunables, sysctl(), event handlers             kern_mbuf.c
    reclaim    vm_lowmem, protocol drains (mb_reclaim)        kern_mbuf.c
    alloc      m_get ... m_getm2, m_extadd, m_extaddref, m_free, m_freem   kern_mbuf.c
    chains     mtod, m_copym ... m_split, m_unshare, m_defrag, m_collapse, m_devget,
               m_uiotombuf ...: chains and their data          uipc_mbuf.c
    pulldown   m_pulldown                                     uipc_mbuf2.c
    stats      mbstat, netstat -m                             usr.bin/netstat/mbuf.c

The byte layout of an mbuf is declared in ``shmalloc.layout`` with the rest of the
segment.

An mbuf search order: ``m_getcl`` -> this CPU's packet cache (an mbuf with its cluster
attached) -> the packet zone's depot -> the mbuf keg, where the packet zone's init
attaches a cluster from the cluster zone (its own cache, depot, keg).
"""

from .alloc import (m_clget, m_cljget, m_cljset, m_extadd, m_extaddref, m_free, m_freem, m_get,
                    m_get2, m_getcl, m_gethdr, m_getjcl, m_getm, m_getm2, m_getzone, m_init)
from .chains import (M_ALIGN, M_LEADINGSPACE, M_MOVE_PKTHDR, M_PREPEND, M_SIZE, M_START,
                     M_TRAILINGSPACE, M_WRITABLE, MH_ALIGN, m_adj, m_align, m_append, m_apply,
                     m_cat, m_catpkt, m_collapse, m_copyback, m_copydata, m_copym,
                     m_copypacket, m_copyup, m_defrag, m_demote, m_devget, m_dup, m_dup_pkthdr,
                     m_fixhdr, m_getptr, m_last, m_length, m_move_pkthdr, m_prepend, m_print,
                     m_pullup, m_sanity, m_split, m_uiotombuf, m_unshare, mtod)
from .constants import *  # noqa: F401,F403  (FreeBSD's constants)
from .constants import __all__ as _constants_all
from .ctors import set_mbuf_label_hook
from .errors import MbufError, SysctlError
from .header import Ext, Mbuf, MTag, PktHdr
from .pulldown import m_pulldown
from .recovery import recover_mbufs  # noqa: F401  (registers its recovery pass)
from .reclaim import mb_reclaim, pr_drain_deregister, pr_drain_register, vm_lowmem
from .stats import NETSTAT_FORMATS, MbStat, mbstat, netstat_m, stat_m_text
from .tags import (m_tag_alloc, m_tag_copy, m_tag_copy_chain, m_tag_delete,
                   m_tag_delete_chain, m_tag_delete_nonpersistent, m_tag_find, m_tag_first,
                   m_tag_free, m_tag_get, m_tag_locate, m_tag_next, m_tag_prepend,
                   m_tag_unlink)
from .tunables import (EVENTHANDLER_PRI_ANY, EVENTHANDLER_PRI_FIRST, EVENTHANDLER_PRI_LAST,
                       SYSCTLS, eventhandler_deregister, eventhandler_invoke,
                       eventhandler_register, sysctl)
from .zones import ZONE_NAMES, mbuf_init


def dtom(handle: int) -> int:
    """The mbuf holding byte ``handle`` of its storage (an mbuf's own data, not a
    cluster's): MSIZE is a power of two and mbufs are MSIZE-aligned."""
    return handle & ~(MSIZE - 1)  # noqa: F405


__all__ = [
    # objects and errors
    "Mbuf", "PktHdr", "Ext", "MTag", "MbStat", "MbufError", "SysctlError",
    # allocation and free
    "m_get", "m_gethdr", "m_getcl", "m_getjcl", "m_get2", "m_clget", "m_cljget", "m_cljset",
    "m_getzone", "m_extadd", "m_extaddref", "m_init", "m_free", "m_freem", "m_getm2",
    "m_getm",
    # chains and data
    "m_copym", "m_copypacket", "m_dup", "m_copydata", "m_copyback", "m_append", "m_pullup",
    "m_prepend", "M_PREPEND", "m_adj", "m_cat", "m_split", "m_length", "m_last", "m_fixhdr",
    "m_move_pkthdr", "M_MOVE_PKTHDR", "m_dup_pkthdr", "m_demote", "mtod", "dtom",
    "M_WRITABLE", "M_LEADINGSPACE", "M_TRAILINGSPACE", "M_ALIGN", "MH_ALIGN", "m_unshare",
    "M_SIZE", "M_START", "m_align", "m_defrag", "m_collapse", "m_copyup", "m_pulldown",
    "m_apply", "m_getptr", "m_devget", "m_uiotombuf", "m_catpkt", "m_sanity", "m_print",
    # tags
    "m_tag_alloc", "m_tag_get", "m_tag_free", "m_tag_prepend", "m_tag_unlink", "m_tag_delete",
    "m_tag_delete_chain", "m_tag_delete_nonpersistent", "m_tag_first", "m_tag_next",
    "m_tag_locate", "m_tag_find", "m_tag_copy", "m_tag_copy_chain",
    # zones, tunables, statistics, reclaim
    "mbuf_init", "ZONE_NAMES", "set_mbuf_label_hook", "sysctl", "SYSCTLS",
    "eventhandler_register", "eventhandler_deregister", "eventhandler_invoke",
    "EVENTHANDLER_PRI_FIRST", "EVENTHANDLER_PRI_ANY", "EVENTHANDLER_PRI_LAST",
    "mbstat", "netstat_m", "NETSTAT_FORMATS", "stat_m_text", "vm_lowmem", "mb_reclaim", "pr_drain_register",
    "pr_drain_deregister",
]
__all__ += _constants_all
