"""The wire format of messages between CPUs: msgpack, data only.

msgpack carries ints, bytes, strings, lists and maps; it cannot name a class or a
function, so no message can run code in its receiver (pickle could).  Decoding is
bounded (array, map and byte lengths) and every failure is one exception,
``MessageError``, so a receiver can count garbage and drop it.
"""

import msgpack

from .errors import ShmallocError

MAX_ITEMS = 4096            # handles in one message
MAX_BYTES = 64 * 1024


class MessageError(ShmallocError, ValueError):
    """A message that is not well-formed msgpack of the expected shape."""


_packer = msgpack.Packer(use_bin_type=True)   # autoreset: each pack() is one whole message


def encode(msg) -> bytes:
    """``msg`` (lists, ints, bytes, str, maps of those) as msgpack bytes."""
    return _packer.pack(msg)


def decode(data) -> object:
    """Decode one message; MessageError for anything malformed or oversized."""
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True,
                               max_array_len=MAX_ITEMS, max_map_len=64, max_str_len=4096,
                               max_bin_len=MAX_BYTES, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise MessageError(f"undecodable message ({type(e).__name__}: {e})") from None
