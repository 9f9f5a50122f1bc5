"""A mailbox in shared memory: a bounded ring of byte records.

Many producers, one consumer, all under one lock supplied by the caller (a
``SemLock``); a wake semaphore tells the consumer that mail arrived.  The ring
lives in a region the caller carves out of shared memory and passes in as a
memoryview of 64-bit words: ``RING_WORDS`` header words, then ``capacity``
bytes of records.

Record: a length word, then the payload padded to 8 bytes.  A record never
wraps; when it does not fit before the end, a ``WRAP`` length word sends the
reader back to the start.  Positions only grow; offset = position % capacity.
The tail is written last, so a producer that dies half-way leaves no record.
"""

RING_HEAD = 0           # consumer position (bytes)
RING_TAIL = 1           # producer position (bytes)
RING_CAP = 2            # capacity in bytes (multiple of 8)
RING_PUTS = 3           # records written
RING_FULL = 4           # puts refused for want of room
RING_GETS = 5           # records read
RING_WORDS = 8
WRAP = -1


def _pad(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    """One mailbox.  ``words`` covers ``RING_WORDS + capacity // 8`` words."""

    __slots__ = ("words", "data", "raw", "cap")

    def __init__(self, words: memoryview):
        if words.format != "q" or len(words) <= RING_WORDS:
            raise ValueError("a ring needs a memoryview cast to 'q' with room for records")
        self.words = words
        self.data = words[RING_WORDS:]
        self.raw = self.data.cast("B")
        self.cap = words[RING_CAP]
        if self.cap != len(self.data) * 8:
            raise ValueError(f"ring capacity {self.cap} does not match its region")

    @staticmethod
    def format(words: memoryview) -> None:
        """Initialise an empty ring over ``words``."""
        words[0:RING_WORDS] = memoryview(bytes(8 * RING_WORDS)).cast("q")
        words[RING_CAP] = (len(words) - RING_WORDS) * 8

    def max_payload(self) -> int:
        return self.cap - 16

    def put(self, payload: bytes) -> bool:
        """Append one record; False (and counted) when it does not fit now.
        Lock: the ring's lock held."""
        w, cap = self.words, self.cap
        n = len(payload)
        need = 8 + _pad(n)
        if need > self.max_payload() + 8:
            raise ValueError(f"a {n}-byte message exceeds the mailbox ({cap} bytes)")
        head, tail = w[RING_HEAD], w[RING_TAIL]
        off = tail % cap
        skip = cap - off if off + need > cap else 0
        if (tail - head) + skip + need > cap:
            w[RING_FULL] += 1
            return False
        if skip:
            self.data[off // 8] = WRAP
            tail += skip
            off = 0
        self.raw[off + 8:off + 8 + n] = payload
        self.data[off // 8] = n
        w[RING_TAIL] = tail + need                 # commit
        w[RING_PUTS] += 1
        return True

    def take_all(self) -> list[bytes]:
        """Remove and return every record.  Lock: the ring's lock held."""
        w, cap = self.words, self.cap
        head, tail = w[RING_HEAD], w[RING_TAIL]
        raw = self.raw
        out = []
        while head < tail:
            off = head % cap
            n = self.data[off // 8]
            if n == WRAP:
                head += cap - off
                continue
            if not 0 <= n <= cap - off - 8:        # corrupt length: drop the rest
                head = tail
                break
            out.append(bytes(raw[off + 8:off + 8 + n]))
            head += 8 + _pad(n)
        w[RING_HEAD] = head
        w[RING_GETS] += len(out)
        return out

    def pending(self) -> int:
        """Bytes of records not yet taken (a lock-free peek)."""
        return self.words[RING_TAIL] - self.words[RING_HEAD]
