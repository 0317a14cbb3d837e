"""Plain data: the only values that cross between a judge and a runner, and the frames that carry them.

Plain data is ``None``/``bool``/``int``/``float``/``complex``/``str``/``bytes``/``bytearray``/``list``/``tuple``/
``dict``/``set``/``frozenset``/``Ellipsis``/``range``, ``Decimal``/``Fraction`` and the collections
``OrderedDict``/``Counter``/``defaultdict``/``deque``, by EXACT type (a ``str`` subclass with a rigged ``__eq__``
is not plain data), plus the builtin types themselves (``int``, ``str``, ...). Namedtuples cross as tuples of
their values. Anything else crosses as a *handle*: a number (or a program global's name) that only the side
holding the object can turn back into it.

The decoder builds fresh objects of known classes only: it is the security boundary of the judge.

A frame is a 4-byte big-endian length and that many bytes.
"""

from __future__ import annotations

import collections
import decimal
import fractions
import os
import select
import socket
import struct
import time

MAX_FRAME = 64 * 1024 * 1024
MAX_DEPTH = 200

LENGTH = struct.Struct("!I")
DOUBLE = struct.Struct("!d")
DOUBLE_PAIR = struct.Struct("!dd")
HANDLE_ID = struct.Struct("!Q")

# One byte per value, then its payload.
NONE, TRUE, FALSE, ELLIPSIS = b"N", b"T", b"F", b"E"
INT, FLOAT, COMPLEX = b"i", b"f", b"c"  # int: length + two's complement bytes; float: double; complex: 2 doubles
STR, BYTES, BYTEARRAY, DECIMAL, BUILTIN_TYPE = b"s", b"b", b"B", b"D", b"Y"  # length + bytes
LIST, TUPLE, SET, FROZENSET, DEQUE = b"l", b"t", b"S", b"Z", b"q"  # count + items
DICT, ORDERED_DICT, COUNTER, DEFAULT_DICT = b"d", b"O", b"C", b"y"  # count + key, value pairs
RANGE, FRACTION = b"r", b"Q"  # three ints / two ints
HANDLE, PROGRAM_NAME = b"h", b"n"  # handle id (u64) / a program global's name (length + utf-8)

_SEQUENCES = {LIST: list, TUPLE: tuple, SET: set, FROZENSET: frozenset, DEQUE: collections.deque}
_SEQUENCE_TAGS = {list: LIST, tuple: TUPLE, set: SET, frozenset: FROZENSET, collections.deque: DEQUE}
_MAPPINGS = {DICT: dict, ORDERED_DICT: collections.OrderedDict, COUNTER: collections.Counter,
             DEFAULT_DICT: collections.defaultdict}
_MAPPING_TAGS = {cls: tag for tag, cls in _MAPPINGS.items()}
_BUILTIN_TYPES = {t.__name__: t for t in (int, float, complex, str, bytes, bytearray, list, tuple, dict, set,
                                          frozenset, bool, type(None), range, object, type)}


class Unencodable(Exception):
    """A value that cannot be encoded (the caller's ``on_other`` refused it, or it is nested too deep)."""


class WireError(Exception):
    """The peer sent bytes that are not a valid frame of plain data."""


class Closed(Exception):
    """The peer closed its end."""


class DeadlineExpired(BaseException):
    """A deadline passed while waiting for bytes. A BaseException, like the other harness signals, so that a
    test's own ``except Exception`` cannot swallow it."""


# ------------------------------------------------------------------------------------------- encoding


def encode(obj, on_other) -> bytes:
    """Encode ``obj`` as plain data; ``on_other(obj)`` returns a handle id (int) or a program global's name
    (str) for anything else, or raises ``Unencodable``."""
    out = bytearray()
    _encode(obj, out, on_other, 0)
    return bytes(out)


def _encode_int(value: int, out: bytearray) -> None:
    n = (value.bit_length() + 8) // 8
    out += LENGTH.pack(n)
    out += int.to_bytes(value, n, "big", signed=True)


def _encode_items(tag: bytes, items, out, on_other, depth) -> None:
    items = list(items)
    out += tag
    out += LENGTH.pack(len(items))
    for item in items:
        _encode(item, out, on_other, depth + 1)


def _encode_blob(tag: bytes, data: bytes, out: bytearray) -> None:
    out += tag
    out += LENGTH.pack(len(data))
    out += data


def _encode(obj, out: bytearray, on_other, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Unencodable("nested too deep")
    t = type(obj)
    if obj is None:
        out += NONE
    elif t is bool:
        out += TRUE if obj else FALSE
    elif t is int:
        out += INT
        _encode_int(obj, out)
    elif t is float:
        out += FLOAT + DOUBLE.pack(obj)
    elif t is complex:
        out += COMPLEX + DOUBLE_PAIR.pack(obj.real, obj.imag)
    elif t is str:
        _encode_blob(STR, obj.encode("utf-8", "surrogatepass"), out)
    elif t is bytes:
        _encode_blob(BYTES, obj, out)
    elif t is bytearray:
        _encode_blob(BYTEARRAY, bytes(obj), out)
    elif t in _SEQUENCE_TAGS:
        _encode_items(_SEQUENCE_TAGS[t], obj, out, on_other, depth)
    elif t in _MAPPING_TAGS:
        items = list(dict.items(obj))
        out += _MAPPING_TAGS[t] + LENGTH.pack(len(items))
        for key, value in items:
            _encode(key, out, on_other, depth + 1)
            _encode(value, out, on_other, depth + 1)
    elif obj is Ellipsis:
        out += ELLIPSIS
    elif t is range:
        out += RANGE
        for v in (obj.start, obj.stop, obj.step):
            _encode_int(v, out)
    elif t is decimal.Decimal:
        _encode_blob(DECIMAL, str(obj).encode(), out)
    elif t is fractions.Fraction:
        out += FRACTION
        _encode_int(obj.numerator, out)
        _encode_int(obj.denominator, out)
    elif issubclass(t, tuple) and isinstance(getattr(t, "_fields", None), tuple):  # namedtuple -> its values
        _encode_items(TUPLE, tuple.__iter__(obj), out, on_other, depth)
    elif t is type and obj.__name__ in _BUILTIN_TYPES and _BUILTIN_TYPES[obj.__name__] is obj:
        _encode_blob(BUILTIN_TYPE, obj.__name__.encode(), out)
    else:
        ref = on_other(obj)
        if type(ref) is str:
            _encode_blob(PROGRAM_NAME, ref.encode("utf-8", "surrogatepass"), out)
        else:
            out += HANDLE + HANDLE_ID.pack(ref)


# ------------------------------------------------------------------------------------------- decoding


def decode(data: bytes, on_handle):
    """Decode plain data into fresh objects of known classes; ``on_handle(id or name)`` turns a handle into
    an object."""
    try:
        value, pos = _decode_at(memoryview(data), 0, on_handle, 0)
    except WireError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, KeyError, ZeroDivisionError, ArithmeticError,
            RecursionError, MemoryError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed frame: {type(exc).__name__}") from None
    if pos != len(data):
        raise WireError("trailing bytes in frame")
    return value


def _decode_length(buf, pos):
    (n,) = LENGTH.unpack_from(buf, pos)
    if pos + 4 + n > len(buf) and n > len(buf):
        raise WireError("length beyond frame")
    return n, pos + 4


def _decode_blob(buf, pos):
    n, pos = _decode_length(buf, pos)
    if pos + n > len(buf):
        raise WireError("truncated value")
    return bytes(buf[pos:pos + n]), pos + n


def _decode_int(buf, pos):
    raw, pos = _decode_blob(buf, pos)
    return int.from_bytes(raw, "big", signed=True), pos


def _decode_at(buf, pos, on_handle, depth):
    if depth > MAX_DEPTH:
        raise WireError("nested too deep")
    tag = bytes(buf[pos:pos + 1])
    pos += 1
    if tag == NONE:
        return None, pos
    if tag == TRUE:
        return True, pos
    if tag == FALSE:
        return False, pos
    if tag == ELLIPSIS:
        return Ellipsis, pos
    if tag == INT:
        return _decode_int(buf, pos)
    if tag == FLOAT:
        return DOUBLE.unpack_from(buf, pos)[0], pos + 8
    if tag == COMPLEX:
        real, imag = DOUBLE_PAIR.unpack_from(buf, pos)
        return complex(real, imag), pos + 16
    if tag == STR:
        raw, pos = _decode_blob(buf, pos)
        return raw.decode("utf-8", "surrogatepass"), pos
    if tag == BYTES:
        return _decode_blob(buf, pos)
    if tag == BYTEARRAY:
        raw, pos = _decode_blob(buf, pos)
        return bytearray(raw), pos
    if tag == DECIMAL:
        raw, pos = _decode_blob(buf, pos)
        return decimal.Decimal(raw.decode("ascii")), pos
    if tag == BUILTIN_TYPE:
        raw, pos = _decode_blob(buf, pos)
        return _BUILTIN_TYPES[raw.decode("ascii")], pos
    if tag in _SEQUENCES:
        n, pos = _decode_length(buf, pos)
        items = []
        for _ in range(n):
            item, pos = _decode_at(buf, pos, on_handle, depth + 1)
            items.append(item)
        return _SEQUENCES[tag](items), pos
    if tag in _MAPPINGS:
        n, pos = _decode_length(buf, pos)
        mapping = _MAPPINGS[tag]()
        for _ in range(n):
            key, pos = _decode_at(buf, pos, on_handle, depth + 1)
            value, pos = _decode_at(buf, pos, on_handle, depth + 1)
            mapping[key] = value  # a fresh object of a known stdlib class
        return mapping, pos
    if tag == RANGE:
        start, pos = _decode_int(buf, pos)
        stop, pos = _decode_int(buf, pos)
        step, pos = _decode_int(buf, pos)
        return range(start, stop, step), pos
    if tag == FRACTION:
        numerator, pos = _decode_int(buf, pos)
        denominator, pos = _decode_int(buf, pos)
        return fractions.Fraction(numerator, denominator), pos
    if tag == HANDLE:
        (hid,) = HANDLE_ID.unpack_from(buf, pos)
        return on_handle(hid), pos + 8
    if tag == PROGRAM_NAME:
        raw, pos = _decode_blob(buf, pos)
        return on_handle(raw.decode("utf-8", "surrogatepass")), pos
    raise WireError(f"unknown tag {tag!r}")


# --------------------------------------------------------------------------------------------- frames


def read_exactly(fd: int, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes from a pipe or socket, waiting at most until ``deadline`` (``time.monotonic()``; None:
    forever). Raises ``Closed`` at end of file, ``DeadlineExpired`` when the deadline passes."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise DeadlineExpired()
        try:
            chunk = os.read(fd, min(n - got, 1 << 20))
        except (ConnectionResetError, OSError):
            chunk = b""
        if not chunk:
            raise Closed()
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(LENGTH.pack(len(data)) + data)


def recv_frame(sock: socket.socket, deadline: float | None, cap: int = MAX_FRAME) -> bytes:
    (n,) = LENGTH.unpack(read_exactly(sock.fileno(), 4, deadline))
    if n > cap:
        raise WireError(f"frame of {n} bytes exceeds the cap of {cap}")
    return read_exactly(sock.fileno(), n, deadline)


# ------------------------------------------------------------------------- caller <-> judge messages
# Both ends are trusted (the judge never decodes what a runner sent with pickle): pickled, 8-byte length.


def write_message(fd: int, obj) -> None:
    import pickle

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(HANDLE_ID.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_message(fd: int, deadline: float | None = None):
    """The next message; ``Closed`` when the writer is gone, ``DeadlineExpired`` past ``deadline``."""
    import pickle

    (n,) = HANDLE_ID.unpack(read_exactly(fd, 8, deadline))
    return pickle.loads(read_exactly(fd, n, deadline))
