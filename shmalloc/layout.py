"""The byte layout of an arena: the one module that declares shared memory.

Every byte of the segment is declared here.  No other module computes an offset
into shared memory except through the names below.  Shared records are arrays of
little-endian signed 64-bit *words*, read and written through one
``memoryview.cast('q')`` of the whole segment, so nothing is ever packed by hand;
item tags and refcounts are 32-bit and go through one ``cast('I')`` view.

Segment::

    0          +-------------------------------------------+
               | header           HDR_WORDS words          |  magic, version, geometry
    LOCKS      +-------------------------------------------+
               | lock table       MAX_LOCKS x LOCK_WORDS   |  owner words, wait and hold counters,
               |                                           |  log2 wait and hold histograms
    CPUS       +-------------------------------------------+
               | CPU table        MAX_CPUS x CPU_WORDS     |  pid, start time, state, grant,
               |                  (+ MAX_ZONES x CS_WORDS  |  published per-zone counters
               |                     stats per CPU)        |
    ZONES      +-------------------------------------------+
               | zone table       MAX_ZONES x ZONE_WORDS   |  limits, depot, sleep queue, hooks
    KEGS       +-------------------------------------------+
               | keg table        MAX_KEGS x KEG_WORDS     |  geometry, slab lists
    PAGETAB    +-------------------------------------------+
               | page table       npages words             |  page -> keg id << 40 | slab base
    FREEMAP    +-------------------------------------------+
               | free map         npages bytes             |  1 = page free (searched with find)
    DATA       +-------------------------------------------+  page aligned
               | pages: slabs, depots                      |
    SIZE       +-------------------------------------------+

A slab is a run of ``ppera`` pages; its items come first, its header after them::

    slab base  +--------+--------+-----+--------+---------+-------------+-------------+
               | item 0 | item 1 | ... | item n | header  | tags u32[n] | refs u32[n] |
               +--------+--------+-----+--------+---------+-------------+-------------+
                 rsize each               ^ hdroff (8-aligned)           (REFCNT kegs)

A handle is the byte offset of an item from the start of the segment.  The page
table maps every page of a slab to ``keg_id << 40 | slab_base``, so
``page_table[h >> PAGE_SHIFT] ^ (keg_id << 40)`` is the slab base exactly when the
handle belongs to that keg (UMA's ``vtoslab``).

Item tag (u32): ``state | zidx << 4 | holder << 8 | home << 16``.  ``TAG_FREE`` is
0.  The tag is the ground truth that ``check`` and crash recovery rebuild every
other structure from.
"""

from __future__ import annotations

import functools

from .ipc import lock as _ipc_lock

MAGIC = 0x434F4C4C414D4853          # b"SHMALLOC" read as a little-endian word
LAYOUT_VERSION = 6                  # 3: hook names are module-qualified; 4: the mbuf
                                    # header of FreeBSD 10+ amd64 (m_dat at 32, pkthdr 56);
                                    # 5: lock records of 64 words (hold times, log2
                                    # histograms); 6: both

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
WORD = 8

MAX_CPUS = 64
MAX_ZONES = 64
MAX_KEGS = 64
MAX_LOCKS = 1 + MAX_KEGS + MAX_ZONES + MAX_CPUS  # vm, kegs, zones, CPU mailboxes
KEG_ID_SHIFT = 40                    # page-table entry: keg id << 40 | slab base
VM_INTERNAL_KEG = 0xFFF              # page-table keg id of pages the arena uses itself
NAME_BYTES = 32
HOOK_BYTES = 96


def _fields(*names: str) -> dict[str, int]:
    """Name -> word index for a record, in declaration order."""
    return {n: i for i, n in enumerate(names)}


# --- header ------------------------------------------------------------------
HDR = _fields(
    "MAGIC", "VERSION", "SIZE", "PAGE_SIZE", "NPAGES", "DATA_OFF", "LOCKS_OFF",
    "CPUS_OFF", "ZONES_OFF", "KEGS_OFF", "PAGETAB_OFF", "FREEMAP_OFF",
    "MAX_CPUS", "MAX_ZONES", "MAX_KEGS", "MAX_LOCKS",
    "NZONES", "NKEGS", "FREE_PAGES", "FREE_HINT", "CREATED_NS", "CREATOR_PID",
    "DEBUG", "MANAGER_PID", "MANAGER_START", "GENERATION",
    "RECLAIMS", "SLABS_RELEASED", "CPU_GEN", "MANAGER_CPU", "RECOVERIES", "LOCK_REPAIRS",
)
HDR_WORDS = 512                      # one page, the rest reserved
TUNABLES_WORD = 256                  # words 256..383: tunables of upper layers (mbuf)
TUNABLES_WORDS = 128

# --- lock record (field order shared with ipc.lock, checked below) ----------------
# One per lock, LOCK_WORDS words, written only by the lock's holder (ipc/lock.py):
#
#   word  0 OWNER_PID    1 OWNER_ID     2 ACQUISITIONS  3 CONTENDED
#         4 WAIT_NS      5 MAX_WAIT_NS  6 ACQUIRED_NS   7 HOLD_NS
#         8 MAX_HOLD_NS  9..15 reserved
#        16 WAIT_HIST    LOCK_HIST_BUCKETS words: contended waits, log2 buckets
#        40 HOLD_HIST    LOCK_HIST_BUCKETS words: holds (acquire to release), the same
#
# Bucket 0 counts [0, 2**10) ns, bucket k [2**(k+9), 2**(k+10)) ns, the last >= 2**32 ns.
LOCK = _fields("OWNER_PID", "OWNER_ID", "ACQUISITIONS", "CONTENDED", "WAIT_NS",
               "MAX_WAIT_NS", "ACQUIRED_NS", "HOLD_NS", "MAX_HOLD_NS")
LOCK_FIXED_WORDS = 16
LOCK_HIST_BUCKETS = 24
LOCK["WAIT_HIST"] = LOCK_FIXED_WORDS
LOCK["HOLD_HIST"] = LOCK_FIXED_WORDS + LOCK_HIST_BUCKETS
LOCK_WORDS = LOCK_FIXED_WORDS + 2 * LOCK_HIST_BUCKETS
VM_LOCK = 0


def keg_lock_index(keg_id: int) -> int:
    return keg_id                      # 1..MAX_KEGS


def zone_lock_index(zone_id: int) -> int:
    return 1 + MAX_KEGS + zone_id      # zone ids 0..MAX_ZONES-1


def mbox_lock_index(cpu: int) -> int:
    return 1 + MAX_KEGS + MAX_ZONES + cpu


# --- CPU slot ------------------------------------------------------------------
CPU = _fields(
    "STATE", "PID", "START", "GEN", "GRANT_ZONE", "GRANT_H", "GRANT_T",
    "WAIT_ZONE", "HEARTBEAT_NS", "ATTACHED_NS", "FLAGS", "WAKE",
    "MBOX_OFF", "MBOX_PAGES",
    "DRAIN_ASKED",      # zone bits (zone_bit): a drain request for the zone is in the mailbox
    "REVOKES",          # bumped when the keg manager takes this CPU's cached items (zone lock)
)
CPU_FIXED_WORDS = 16
CPU_FREE, CPU_LIVE, CPU_DEAD = 0, 1, 2


def zone_bit(zone_id: int) -> int:
    """Zone ``zone_id``'s bit in a 64-bit zone mask held in one signed word
    (bit 63 is the sign)."""
    return 1 << zone_id if zone_id < 63 else -(1 << 63)

# Per-zone counters a CPU publishes (summed on read); CS_WORDS each, MAX_ZONES of them.
CS = _fields("ALLOCS", "FREES", "FAILS", "SLEEPS", "CACHED", "DEPOT_GETS", "DEPOT_PUTS",
             "KEG_IMPORTS", "XFREES", "MSGS_SENT", "ITEMS_SENT", "FALLBACKS")
CS_WORDS = 12
CPU_WORDS = CPU_FIXED_WORDS + MAX_ZONES * CS_WORDS

# --- zone record -----------------------------------------------------------------
ZONE = _fields(
    "FLAGS", "KEG", "ZIDX", "SIZE", "LIMIT", "ITEMS", "SLEEPERS", "SLEEPS",
    "ALLOCS", "FREES", "FAILS", "DEPOT_OFF", "DEPOT_CAP", "DEPOT_N",
    "BUCKET_SIZE", "BUCKET_MIN", "BUCKET_MAX", "IMAX", "IMIN", "WSS",
    "SQ_HEAD", "SQ_TAIL", "XFREE", "GEN", "DEPOT_GETS", "DEPOT_PUTS", "CREATED_NS",
    "XFREES",
    "OVER",             # ITEMS when a limit below them was set (set_max(below_use=True)), else 0
)
ZONE_FIXED_WORDS = 32
ZONE_NAME_WORD = ZONE_FIXED_WORDS                          # NAME_BYTES
ZONE_HOOKS_WORD = ZONE_NAME_WORD + NAME_BYTES // WORD      # 4 x HOOK_BYTES: ctor dtor init fini
ZONE_SLEEPQ_WORD = ZONE_HOOKS_WORD + 4 * HOOK_BYTES // WORD  # ring of MAX_CPUS cpu ids
ZONE_WORDS = ZONE_SLEEPQ_WORD + MAX_CPUS
HOOK_NAMES = ("ctor", "dtor", "init", "fini")
ZF_LIVE, ZF_SECONDARY, ZF_REFCNT, ZF_FIXED_BUCKET = 1, 2, 4, 8

# --- keg record --------------------------------------------------------------------
KEG = _fields(
    "FLAGS", "SIZE", "RSIZE", "ALIGN", "IPERS", "PPERA", "HDROFF", "TAGOFF", "RCOFF",
    "PAGES", "FREE_ITEMS", "NSLABS", "HEAD_PARTIAL", "HEAD_FULL", "HEAD_FREE",
    "NZONES", "FIRST_ZONE", "SLABS_FREED",
)
KEG_WORDS = 24
KF_LIVE, KF_REFCNT, KF_NOFREE = 1, 2, 4

# --- slab header (at slab base + HDROFF) ---------------------------------------------
SLAB = _fields("KEG", "FREE", "LIST", "PREV", "NEXT", "HINT", "SPARE0", "SPARE1")
SLAB_HDR_WORDS = 8
SLAB_HDR_BYTES = SLAB_HDR_WORDS * WORD
LIST_PARTIAL, LIST_FULL, LIST_FREE = 0, 1, 2
LIST_HEAD = {LIST_PARTIAL: KEG["HEAD_PARTIAL"], LIST_FULL: KEG["HEAD_FULL"],
             LIST_FREE: KEG["HEAD_FREE"]}
NIL = -1                                # end of a slab list

# --- item tags ---------------------------------------------------------------------
# state: where the item is.  Transitions (who may write the tag):
#   FREE   -> IMPORT  keg lock held   (taken from a slab; zone init about to run)
#   IMPORT -> CACHED  holder          (init done)           FREE -> CACHED when no init
#   CACHED -> ALLOC   holder          (fast path alloc)     ALLOC -> CACHED (fast path free)
#   CACHED -> DEPOT   zone lock held  (bucket to depot)     DEPOT -> CACHED (bucket from depot)
#   DEPOT  -> ALLOC   zone lock held  (alloc_bulk into an empty stack: a bucket from the
#                                      depot goes straight to the caller)
#   ALLOC  -> DEPOT   zone lock held  (free_bulk of a batch that would overflow the
#                                      stack: it goes straight to the depot)
#   CACHED -> FINI    holder          (item on its way to the slab; zone fini, if any,
#                                      about to run)
#   FINI|CACHED|IMPORT -> FREE keg lock held
#   ALLOC  -> INFLIGHT sender, dest's mailbox lock held (hand-off; holder := dest)
#   INFLIGHT -> ALLOC  receiver, its mailbox lock held
#   CACHED -> XFREE    sender, home's mailbox lock held (cross-CPU free going home)
#   XFREE  -> CACHED   home, its mailbox lock held
# Whenever a CPU's mailbox lock is free, its INFLIGHT and XFREE items are exactly
# those listed by the messages in its mailbox.
TAG_FREE, TAG_IMPORT, TAG_CACHED, TAG_ALLOC, TAG_DEPOT, TAG_FINI, TAG_INFLIGHT, TAG_XFREE = range(8)
TAG_STATE_NAMES = ("free", "import", "cached", "alloc", "depot", "fini", "inflight", "xfree")
TAG_STATE_MASK = 0xF
NO_CPU = 0xFF


def tag(state: int, zidx: int = 0, holder: int = NO_CPU, home: int = NO_CPU) -> int:
    return state | zidx << 4 | holder << 8 | home << 16


def tag_state(t: int) -> int:
    return t & 0xF


def tag_zidx(t: int) -> int:
    return (t >> 4) & 0xF


def tag_holder(t: int) -> int:
    return (t >> 8) & 0xFF


def tag_home(t: int) -> int:
    return (t >> 16) & 0xFF


MAX_ZONES_PER_KEG = 16                  # zidx is 4 bits

# --- mailbox (pages from the arena, one run per CPU) ---------------------------------------
# An ipc.ring.Ring: RING_WORDS header words (head, tail, capacity, counters), then
# records of msgpack bytes.  Its lock is mbox_lock_index(cpu); the CPU's wake
# semaphore tells it that mail arrived.
MBOX_RING_WORDS = 8


def mbox_pages(data_pages: int) -> int:
    """Pages of one CPU's mailbox: 32 KiB, or 8 KiB in arenas under 8 MiB."""
    return 8 if data_pages >= 2048 else 2


# --- depot (pages from the arena, DEPOT_CAP entries) ------------------------------------
# handles int64[cap] followed by tag indexes int64[cap]
DEPOT_ENTRY_BYTES = 16

# --- arena geometry ------------------------------------------------------------------------
LOCKS_OFF = HDR_WORDS * WORD
CPUS_OFF = LOCKS_OFF + MAX_LOCKS * LOCK_WORDS * WORD
ZONES_OFF = CPUS_OFF + MAX_CPUS * CPU_WORDS * WORD
KEGS_OFF = ZONES_OFF + MAX_ZONES * ZONE_WORDS * WORD
PAGETAB_OFF = KEGS_OFF + MAX_KEGS * KEG_WORDS * WORD
MIN_DATA_PAGES = 16


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def next_gen(v: int) -> int:
    """The generation after ``v``: generation words count changes and wrap within a
    signed 64-bit word, so a word a corrupt or very old arena left at its maximum
    never overflows a store."""
    return v + 1 if v < (1 << 63) - 1 else -(1 << 63)


class Geometry:
    """Where each region of a segment of ``size`` bytes lies."""

    __slots__ = ("size", "npages", "pagetab_off", "freemap_off", "data_off", "data_pages")

    def __init__(self, size: int):
        if size % PAGE_SIZE:
            raise ValueError(f"arena size {size} is not a multiple of the page size {PAGE_SIZE}")
        self.size = size
        self.npages = size // PAGE_SIZE
        self.pagetab_off = PAGETAB_OFF
        self.freemap_off = self.pagetab_off + self.npages * WORD
        self.data_off = round_up(self.freemap_off + self.npages, PAGE_SIZE)
        self.data_pages = self.npages - self.data_off // PAGE_SIZE
        if self.data_pages < MIN_DATA_PAGES:
            raise ValueError(f"arena size {size} leaves {self.data_pages} data pages; "
                             f"at least {MIN_DATA_PAGES} are needed")


def min_arena_size() -> int:
    """Smallest size whose geometry leaves MIN_DATA_PAGES of data."""
    size = round_up(PAGETAB_OFF, PAGE_SIZE)
    while True:
        try:
            Geometry(size)
            return size
        except ValueError:
            size += PAGE_SIZE


def header_problems(w, size: int) -> list[str]:
    """What in the header words ``w`` of a ``size``-byte segment contradicts this
    layout (empty: the header is sound).  Checked before anything else is read."""
    if w[HDR["MAGIC"]] != MAGIC:
        return [f"not a shmalloc arena (magic {w[HDR['MAGIC']]:#x})"]
    if w[HDR["VERSION"]] != LAYOUT_VERSION:
        return [f"layout version {w[HDR['VERSION']]}; this shmalloc reads {LAYOUT_VERSION}"]
    if w[HDR["SIZE"]] != size or w[HDR["PAGE_SIZE"]] != PAGE_SIZE:
        return [f"the header says {w[HDR['SIZE']]} bytes (page size {w[HDR['PAGE_SIZE']]}), "
                f"the segment is {size}: truncated or corrupt"]
    try:
        g = Geometry(size)
    except ValueError as e:
        return [str(e)]
    want = {"NPAGES": g.npages, "DATA_OFF": g.data_off, "LOCKS_OFF": LOCKS_OFF,
            "CPUS_OFF": CPUS_OFF, "ZONES_OFF": ZONES_OFF, "KEGS_OFF": KEGS_OFF,
            "PAGETAB_OFF": g.pagetab_off, "FREEMAP_OFF": g.freemap_off, "MAX_CPUS": MAX_CPUS,
            "MAX_ZONES": MAX_ZONES, "MAX_KEGS": MAX_KEGS, "MAX_LOCKS": MAX_LOCKS}
    out = [f"header {k} is {w[HDR[k]]}, the layout says {v}"
           for k, v in want.items() if w[HDR[k]] != v]
    ranges = {"NZONES": MAX_ZONES, "NKEGS": MAX_KEGS, "FREE_PAGES": g.data_pages,
              "FREE_HINT": g.npages, "DEBUG": 3, "MANAGER_CPU": MAX_CPUS}
    out += [f"header {k} is {w[HDR[k]]}, outside 0..{hi}"
            for k, hi in ranges.items() if not 0 <= w[HDR[k]] <= hi]
    return out


# word index helpers ---------------------------------------------------------------------
def lock_word(idx: int) -> int:
    return LOCKS_OFF // WORD + idx * LOCK_WORDS


def cpu_word(cpu: int) -> int:
    return CPUS_OFF // WORD + cpu * CPU_WORDS


def cpu_stat_word(cpu: int, zone_id: int) -> int:
    return cpu_word(cpu) + CPU_FIXED_WORDS + zone_id * CS_WORDS


def zone_word(zone_id: int) -> int:
    return ZONES_OFF // WORD + zone_id * ZONE_WORDS


def keg_word(keg_id: int) -> int:
    return KEGS_OFF // WORD + (keg_id - 1) * KEG_WORDS


def slab_word(slab_base: int, hdroff: int) -> int:
    return (slab_base + hdroff) // WORD


# strings (names and hook names), the only non-word fields ---------------------------------
def write_str(mv: memoryview, off: int, nbytes: int, s: str) -> None:
    b = s.encode()
    if len(b) >= nbytes:
        raise ValueError(f"{s!r} is longer than {nbytes - 1} bytes")
    mv[off:off + nbytes] = b.ljust(nbytes, b"\0")


def read_str(mv: memoryview, off: int, nbytes: int) -> str:
    return bytes(mv[off:off + nbytes]).split(b"\0", 1)[0].decode(errors="replace")


def zone_name_off(zone_id: int) -> int:
    return (zone_word(zone_id) + ZONE_NAME_WORD) * WORD


def zone_hook_off(zone_id: int, which: int) -> int:
    return (zone_word(zone_id) + ZONE_HOOKS_WORD) * WORD + which * HOOK_BYTES


# --- slab geometry -----------------------------------------------------------------------
MAX_WASTE = 0.015         # pick the smallest slab wasting at most 1.5 % (tags, refcounts
                          # and depot come on top: the whole stays under 3 % per item)
MAX_SLAB_PAGES = 64       # unless one item alone needs more


def slab_header_bytes(ipers: int, refcnt: bool) -> int:
    return SLAB_HDR_BYTES + ipers * 4 * (2 if refcnt else 1)


@functools.lru_cache(maxsize=256)
def keg_layout(rsize: int, refcnt: bool, max_pages: int) -> tuple[int, int, int]:
    """Choose (ppera, ipers, hdroff) for items of ``rsize`` bytes.

    Items first, 8-aligned header after them.  The smallest slab whose waste is at
    most MAX_WASTE wins; failing that, the most efficient up to MAX_SLAB_PAGES (or
    the one-item slab a big item needs).
    """
    per_item = 4 * (2 if refcnt else 1)

    def fit(ppera: int) -> int:
        room = ppera * PAGE_SIZE
        # the most n with n items (rounded up to a word) + header + tags in ``room``:
        # start from the estimate ignoring the rounding, then step down
        n = min(room // rsize, max(0, (room - SLAB_HDR_BYTES) // (rsize + per_item) + 1))
        while n > 0 and round_up(n * rsize, WORD) + slab_header_bytes(n, refcnt) > room:
            n -= 1
        return n

    one = -(-(rsize + slab_header_bytes(1, refcnt)) // PAGE_SIZE)
    limit = max(one, min(MAX_SLAB_PAGES, max_pages))
    options = []
    for ppera in range(one, limit + 1):
        n = fit(ppera)
        if n:
            options.append((n * rsize / (ppera * PAGE_SIZE), ppera, n))
            if options[-1][0] >= 1 - MAX_WASTE:
                break
    best = max(o[0] for o in options)
    good_enough = 1 - MAX_WASTE if best >= 1 - MAX_WASTE else best - 0.01
    _, ppera, n = next(o for o in options if o[0] >= good_enough)
    return ppera, n, round_up(n * rsize, WORD)


# --- mbuf (shmalloc.mbuf) ---------------------------------------------------------------------
# An mbuf is one MSIZE-byte item of the "mbuf" keg, aligned to MSIZE, so the mbuf that
# holds any address is ``addr & ~(MSIZE - 1)`` (dtom).  Its sizes are FreeBSD 10+'s on
# amd64: m_dat starts at byte 32 and the packet header is 56 bytes, so MLEN is 224,
# MHLEN 168 (and MINCLSIZE 169).  Every field is a word but one: the fourth word of the
# header packs m_flags, m_type and m_len as FreeBSD 10's ``m_hdr`` does -- m_flags in
# its low 24 bits, m_type in the byte above (byte 27 of the mbuf), m_len in its high
# half (the u32 at byte 28, read through the 32-bit view, like the tags); and one word
# of the packet header holds tso_segsz (16 bits) and ether_vtag (16 bits).  Every
# pointer (m_next, m_data, ext_buf, ref_cnt, tags ...) is a handle and 0 is NULL.  As in
# FreeBSD, the packet header, the external-storage descriptor and the data share the
# space after the header (a union): m_ext always sits where m_pktdat begins.
#
#   byte 0          +--------------------------------------------+
#                   | m_hdr      MH words                        |  next nextpkt data
#                   |                                            |  flags:24 type:8 len:32
#   MH_BYTES  (32)  +--------------------------------------------+ <- m_dat    (MLEN bytes)
#                   | m_pkthdr   PH words            (M_PKTHDR)  |  rcvif header len csum_flags
#                   |                                            |  csum_data tso:16|vtag:16 tags
#   PKTDAT    (88)  +--------------------------------------------+ <- m_pktdat (MHLEN bytes)
#                   | m_ext      EXT words           (M_EXT)     |  buf size type ref_cnt arg1 arg2 owner
#   EXT_FREE (144)  |   ext_free EXT_FREE_BYTES                  |  name of the m_extadd free routine
#   MSIZE    (256)  +--------------------------------------------+
#
# ref_cnt is the handle of the u32 counting the storage's references: the refcount
# trailer of a cluster (REFCNT kegs) or an item of "mbuf_ext_refcnt" (or, for
# EXT_EXTREF storage, the caller's own u32).  owner is the mbuf that attached the
# storage first: a packet (mbuf_packet) goes back to its zone with its cluster only
# when the last reference to the cluster goes.
#
# An m_tag is an item of a "mbuf_tag_<size>" zone: MTAG words, then the payload.
#
#   +------+-------+--------+----+-----+--------------------------+
#   | next | owner | cookie | id | len | payload (len bytes)      |
#   +------+-------+--------+----+-----+--------------------------+
#   owner is the mbuf whose packet header lists the tag, 0 while unlinked.
MSIZE = 256
MH = _fields("NEXT", "NEXTPKT", "DATA", "FLAGS")
MH_FLAGS_MASK = 0xFFFFFF                         # m_flags: the FLAGS word's low 24 bits
MH_TYPE_BYTE = MH["FLAGS"] * WORD + 3            # m_type: the byte above them
MH_LEN_U32 = (MH["FLAGS"] * WORD + 4) // 4       # m_len: the word's high u32 (32-bit view)
PH = _fields("RCVIF", "HEADER", "LEN", "CSUM_FLAGS", "CSUM_DATA", "VTAG", "TAGS")
PH_VTAG_SHIFT = 16                               # VTAG word: tso_segsz | ether_vtag << 16
EXT = _fields("BUF", "SIZE", "TYPE", "REFCNT", "ARG1", "ARG2", "OWNER")
MH_WORDS, PH_WORDS, EXT_WORDS = len(MH), len(PH), len(EXT)
MH_BYTES = MH_WORDS * WORD                       # offset of m_dat
PH_WORD = MH_WORDS                               # first pkthdr word in the mbuf
PKTDAT = MH_BYTES + PH_WORDS * WORD              # offset of m_pktdat
EXT_WORD = PKTDAT // WORD                        # first m_ext word in the mbuf
EXT_FREE = PKTDAT + EXT_WORDS * WORD             # offset of the ext_free name
EXT_FREE_BYTES = MSIZE - EXT_FREE
MLEN = MSIZE - MH_BYTES
MHLEN = MSIZE - PKTDAT
MTAG = _fields("NEXT", "OWNER", "COOKIE", "ID", "LEN")
MTAG_HDR_BYTES = len(MTAG) * WORD

# The tunables region of the header: what Arena.create(tunables=) was given (TUN, a SET
# bit per name, in TUN order), then the mbuf layer's shared state (MBS): the values in
# force (sysctl), counters (mbstat, reclaim) and the init state.
TUN = _fields("SET", "NMBCLUSTERS", "NMBJUMBOP", "NMBJUMBO9", "NMBJUMBO16", "NMBUFS",
              "MAXMBUFMEM", "MAXUSERS", "V_FREE_MIN")
TUN_WORD = TUNABLES_WORD
TUN_WORDS = 16
MBS = _fields("STATE", "MAXUSERS", "NMBCLUSTERS", "NMBJUMBOP", "NMBJUMBO9", "NMBJUMBO16",
              "NMBUFS", "MAXMBUFMEM", "V_FREE_MIN", "DRAINS", "LOWMEM", "LOWMEM_NS", "MCFAIL",
              "MPFAIL", "SYSCTL_GEN", "MAX_LINKHDR", "MAX_PROTOHDR")
MBS_WORD = TUN_WORD + TUN_WORDS
MBS_WORDS = 32
MBS_UNTUNED, MBS_TUNED, MBS_READY = 0, 1, 2      # STATE: tunables computed, zones made


# --- checks at import -----------------------------------------------------------------------
assert len(HDR) <= TUNABLES_WORD
assert len(LOCK) - 2 <= LOCK_FIXED_WORDS and LOCK_WORDS == 64
assert LOCK["HOLD_HIST"] + LOCK_HIST_BUCKETS == LOCK_WORDS
assert (_ipc_lock.LOCK_WORDS, _ipc_lock.L_OWNER_PID, _ipc_lock.L_OWNER_ID,
        _ipc_lock.L_ACQUISITIONS, _ipc_lock.L_CONTENDED, _ipc_lock.L_WAIT_NS,
        _ipc_lock.L_MAX_WAIT_NS, _ipc_lock.L_ACQUIRED_NS, _ipc_lock.L_HOLD_NS,
        _ipc_lock.L_MAX_HOLD_NS, _ipc_lock.L_WAIT_HIST, _ipc_lock.L_HOLD_HIST,
        _ipc_lock.HIST_BUCKETS) == (
    LOCK_WORDS, LOCK["OWNER_PID"], LOCK["OWNER_ID"], LOCK["ACQUISITIONS"], LOCK["CONTENDED"],
    LOCK["WAIT_NS"], LOCK["MAX_WAIT_NS"], LOCK["ACQUIRED_NS"], LOCK["HOLD_NS"],
    LOCK["MAX_HOLD_NS"], LOCK["WAIT_HIST"], LOCK["HOLD_HIST"], LOCK_HIST_BUCKETS)
assert len(CPU) <= CPU_FIXED_WORDS
assert MAX_ZONES <= 64 and zone_bit(MAX_ZONES - 1) & zone_bit(0) == 0
assert len(CS) <= CS_WORDS
assert len(ZONE) <= ZONE_FIXED_WORDS
assert len(KEG) <= KEG_WORDS
assert len(SLAB) == SLAB_HDR_WORDS
assert ZONE_WORDS * WORD == ZONE_SLEEPQ_WORD * WORD + MAX_CPUS * WORD
assert PAGETAB_OFF % WORD == 0 and CPUS_OFF % WORD == 0 and ZONES_OFF % WORD == 0
assert MAX_CPUS < NO_CPU and MAX_LOCKS == mbox_lock_index(MAX_CPUS - 1) + 1
assert VM_INTERNAL_KEG > MAX_KEGS
assert MAGIC.to_bytes(8, "little") == b"SHMALLOC"
assert keg_layout(2048, True, 64)[1] * 2048 / (keg_layout(2048, True, 64)[0] * PAGE_SIZE) >= 0.97
assert MSIZE & (MSIZE - 1) == 0                  # dtom: ((MSIZE - 1) ^ MSIZE) + 1 >> 1 == MSIZE
assert (((MSIZE - 1) ^ MSIZE) + 1) >> 1 == MSIZE
assert MLEN == MSIZE - MH_BYTES and MHLEN == MLEN - PH_WORDS * WORD
assert (MH_BYTES, PH_WORDS * WORD, MLEN, MHLEN) == (32, 56, 224, 168)   # FreeBSD 10+ amd64
assert MH_TYPE_BYTE == MH_LEN_U32 * 4 - 1 and MH_FLAGS_MASK == (1 << 24) - 1
assert EXT_FREE + EXT_FREE_BYTES == MSIZE and EXT_FREE_BYTES >= 64
assert EXT_WORDS * WORD + EXT_FREE_BYTES == MHLEN   # m_ext fills the m_pktdat union exactly
assert MSIZE <= PAGE_SIZE and PAGE_SIZE % MSIZE == 0
assert len(TUN) <= TUN_WORDS and len(MBS) <= MBS_WORDS
assert MBS_WORD + MBS_WORDS <= TUNABLES_WORD + TUNABLES_WORDS <= HDR_WORDS
