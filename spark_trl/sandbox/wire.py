"""Plain data: the only values that cross between a judge and a runner, and the frames that carry them.

Plain data is ``None``/``bool``/``int``/``float``/``complex``/``str``/``bytes``/``bytearray``/``list``/``tuple``/
``dict``/``set``/``frozenset``/``Ellipsis``/``range``, ``Decimal``/``Fraction``, the collections
``OrderedDict``/``Counter``/``defaultdict``/``deque`` and the views ``dict.keys()``/``values()``/``items()``, by
EXACT type (a ``str`` subclass with a rigged ``__eq__`` is not plain data), plus the builtin types themselves
(``int``, ``str``, ...). Namedtuples cross as tuples of their values. Anything else crosses as a *handle*: a
number (or a program global's name) that only the side holding the object can turn back into it.

Identity of the mutable containers of one request: the judge numbers each list/dict/set/bytearray/deque/...
of a request the first time encoding meets it (a second occurrence is a reference to that number, so aliases
and cycles survive), and the runner numbers the objects it decodes in the same order. A reply refers to those
numbers for what it returns of them (``f(a) is a`` holds in the judge), and sends the new contents of those
the call changed, which the judge copies into its own objects: in-place mutation crosses wherever the
container sat in the arguments (keyword, inside a tuple, nested).

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
KEYS, VALUES, ITEMS = b"K", b"V", b"I"  # dict views: count + items (ITEMS: key, value pairs)
REF = b"R"  # u32: the n-th mutable container of the request this frame answers

_SEQUENCES = {LIST: list, TUPLE: tuple, SET: set, FROZENSET: frozenset, DEQUE: collections.deque}
_SEQUENCE_TAGS = {list: LIST, tuple: TUPLE, set: SET, frozenset: FROZENSET, collections.deque: DEQUE}
_MAPPINGS = {DICT: dict, ORDERED_DICT: collections.OrderedDict, COUNTER: collections.Counter,
             DEFAULT_DICT: collections.defaultdict}
_MAPPING_TAGS = {cls: tag for tag, cls in _MAPPINGS.items()}
_VIEW_TAGS = {type({}.keys()): KEYS, type({}.values()): VALUES, type({}.items()): ITEMS,
              type(collections.OrderedDict().keys()): KEYS, type(collections.OrderedDict().values()): VALUES,
              type(collections.OrderedDict().items()): ITEMS}
MUTABLE = (list, dict, set, bytearray, collections.deque, collections.OrderedDict, collections.Counter,
           collections.defaultdict)
REF_INDEX = struct.Struct("!I")
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


def encode(obj, on_other, registry: list | None = None, known: dict | None = None,
           contents: bool = False) -> bytes:
    """Encode ``obj`` as plain data; ``on_other(obj)`` returns a handle id (int) or a program global's name
    (str) for anything else, or raises ``Unencodable``.

    ``registry`` (the judge encoding a request): each mutable container met is appended to it, and a second
    occurrence is encoded as a reference. ``known`` (the runner encoding a reply): ``{id(obj): n}`` of the
    request's containers, encoded as references ``n``; ``contents``: the top-level object by value even when
    it is known (the new contents of a container the call changed)."""
    encoder = _Encoder(on_other, registry, known)
    encoder.value(obj, 0, contents)
    return bytes(encoder.out)


def _int_bytes(value: int) -> bytes:
    return int.to_bytes(value, (value.bit_length() + 8) // 8, "big", signed=True)


class _Encoder:
    def __init__(self, on_other, registry: list | None, known: dict | None):
        self.out = bytearray()
        self.on_other, self.registry, self.known = on_other, registry, known
        self.index = {} if registry is not None else None  # id -> n of registered containers

    def blob(self, tag: bytes, data: bytes) -> None:
        self.out += tag
        self.out += LENGTH.pack(len(data))
        self.out += data

    def items(self, tag: bytes, items, depth: int) -> None:
        items = list(items)
        self.out += tag
        self.out += LENGTH.pack(len(items))
        for item in items:
            self.value(item, depth + 1)

    def pairs(self, tag: bytes, pairs, depth: int) -> None:
        pairs = list(pairs)
        self.out += tag + LENGTH.pack(len(pairs))
        for key, value in pairs:
            self.value(key, depth + 1)
            self.value(value, depth + 1)

    def reference(self, obj) -> bool:
        """Encode ``obj`` as a reference when it is a container of the request (or register it). True when done."""
        if self.known is not None:
            n = self.known.get(id(obj))
            if n is not None:
                self.out += REF + REF_INDEX.pack(n)
                return True
        if self.registry is not None:
            n = self.index.get(id(obj))
            if n is not None and self.registry[n] is obj:
                self.out += REF + REF_INDEX.pack(n)
                return True
            self.index[id(obj)] = len(self.registry)
            self.registry.append(obj)  # numbered before its items: the decoder numbers in the same order
        return False

    def value(self, obj, depth: int, contents: bool = False) -> None:
        if depth > MAX_DEPTH:
            raise Unencodable("nested too deep")
        t = type(obj)
        out = self.out
        if obj is None:
            out += NONE
        elif t is bool:
            out += TRUE if obj else FALSE
        elif t is int:
            self.blob(INT, _int_bytes(obj))
        elif t is float:
            out += FLOAT + DOUBLE.pack(obj)
        elif t is complex:
            out += COMPLEX + DOUBLE_PAIR.pack(obj.real, obj.imag)
        elif t is str:
            self.blob(STR, obj.encode("utf-8", "surrogatepass"))
        elif t is bytes:
            self.blob(BYTES, obj)
        elif t in MUTABLE and not contents and self.reference(obj):
            return
        elif t is bytearray:
            self.blob(BYTEARRAY, bytes(obj))
        elif t in _SEQUENCE_TAGS:
            self.items(_SEQUENCE_TAGS[t], obj, depth)
        elif t in _MAPPING_TAGS:
            self.pairs(_MAPPING_TAGS[t], dict.items(obj), depth)
        elif t in _VIEW_TAGS:
            tag = _VIEW_TAGS[t]
            self.pairs(tag, obj, depth) if tag == ITEMS else self.items(tag, obj, depth)
        elif obj is Ellipsis:
            out += ELLIPSIS
        elif t is range:
            out += RANGE
            for v in (obj.start, obj.stop, obj.step):
                out += LENGTH.pack(len(_int_bytes(v))) + _int_bytes(v)
        elif t is decimal.Decimal:
            self.blob(DECIMAL, str(obj).encode())
        elif t is fractions.Fraction:
            out += FRACTION
            for v in (obj.numerator, obj.denominator):
                out += LENGTH.pack(len(_int_bytes(v))) + _int_bytes(v)
        elif issubclass(t, tuple) and isinstance(getattr(t, "_fields", None), tuple):  # namedtuple -> its values
            self.items(TUPLE, tuple.__iter__(obj), depth)
        elif t is type and obj.__name__ in _BUILTIN_TYPES and _BUILTIN_TYPES[obj.__name__] is obj:
            self.blob(BUILTIN_TYPE, obj.__name__.encode())
        else:
            ref = self.on_other(obj)
            if type(ref) is str:
                self.blob(PROGRAM_NAME, ref.encode("utf-8", "surrogatepass"))
            else:
                out += HANDLE + HANDLE_ID.pack(ref)


# ------------------------------------------------------------------------------------------- decoding

DECODE_BUDGET = 128 * 1024 * 1024  # bytes of objects a judge builds from one reply of a runner
MAX_INT_BYTES = 1 << 20  # an int of 8 Mbit: int.from_bytes is linear, but arithmetic on it in a test is not
MAX_FRACTION_PART_BYTES = 1 << 13  # Fraction() runs gcd (quadratic, in C): 2^16 bits cost ~7 ms
# Estimated CPython sizes (bytes) of each decoded object, plus per-item costs of containers: what the budget
# counts, so that a frame repeating a cheap tag (an empty deque is 5 bytes on the wire, 624 in memory)
# cannot multiply its size into the judge's memory.
_COST = {NONE: 8, TRUE: 8, FALSE: 8, ELLIPSIS: 8, INT: 40, FLOAT: 32, COMPLEX: 40, STR: 80, BYTES: 48,
         BYTEARRAY: 64, DECIMAL: 120, BUILTIN_TYPE: 8, LIST: 64, TUPLE: 48, SET: 256, FROZENSET: 256, DEQUE: 640,
         DICT: 240, ORDERED_DICT: 400, COUNTER: 240, DEFAULT_DICT: 240, RANGE: 48, FRACTION: 136, HANDLE: 200,
         PROGRAM_NAME: 200, KEYS: 300, VALUES: 300, ITEMS: 300, REF: 8}
_ITEM_COST = {LIST: 8, TUPLE: 8, SET: 64, FROZENSET: 64, DEQUE: 8, DICT: 64, ORDERED_DICT: 128, COUNTER: 64,
              DEFAULT_DICT: 64, KEYS: 64, VALUES: 64, ITEMS: 120}


def decode(data: bytes, on_handle, budget: int | None = None, refs: list | None = None, number: bool = False):
    """Decode plain data into fresh objects of known classes; ``on_handle(id or name)`` turns a handle into an
    object. ``budget``: the most bytes of objects to build (estimated); beyond it, ``WireError``. ``refs``: the
    request's containers, for references (the judge: the objects it sent); with ``number`` (the runner decoding
    a request) the containers decoded are appended to it, in the order the judge numbered them.

    No single step runs long in C: ints and Fraction parts are capped, and sets and dicts are filled one item at
    a time, so that a deadline signal interrupts even a frame of colliding hashes between two items."""
    decoder = _Decoder(data, on_handle, budget, refs, number)
    try:
        value = decoder.value(0)
    except WireError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, KeyError, ZeroDivisionError, ArithmeticError,
            RecursionError, MemoryError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed frame: {type(exc).__name__}") from None
    if decoder.pos != len(data):
        raise WireError("trailing bytes in frame")
    return value


class _Decoder:
    def __init__(self, data: bytes, on_handle, budget: int | None, refs: list | None, number: bool):
        self.data, self.buf, self.pos, self.on_handle = bytes(data), memoryview(data), 0, on_handle
        self.left = float("inf") if budget is None else budget
        self.refs = refs
        self.numbering = number and refs is not None

    def fresh(self, obj):
        """A new container, numbered (before its items are decoded) when this decoder numbers them."""
        if self.numbering:
            self.refs.append(obj)
        return obj

    def spend(self, cost: int) -> None:
        self.left -= cost  # spend(), inlined: this runs once per decoded object
        if self.left < 0:
            raise WireError("the reply decodes to more objects than the judge's budget")

    def length(self) -> int:
        (n,) = LENGTH.unpack_from(self.buf, self.pos)
        self.pos += 4
        if n > len(self.buf) - self.pos:  # a blob's bytes, or a count of items of at least one byte each
            raise WireError("length beyond frame")
        return n

    def blob(self) -> bytes:
        n = self.length()  # checked against the frame's end
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def integer(self, max_bytes: int = MAX_INT_BYTES) -> int:
        raw = self.blob()
        if len(raw) > max_bytes:
            raise WireError(f"an int of {len(raw)} bytes exceeds the cap of {max_bytes}")
        self.spend(len(raw))
        return int.from_bytes(raw, "big", signed=True)

    def value(self, depth: int):
        if depth > MAX_DEPTH:
            raise WireError("nested too deep")
        tag = self.data[self.pos:self.pos + 1]  # a one-byte bytes: CPython's cached singletons
        self.pos += 1
        cost = _COST.get(tag)
        if cost is None:
            raise WireError(f"unknown tag {tag!r}")
        self.left -= cost
        if self.left < 0:
            raise WireError("the reply decodes to more objects than the judge's budget")
        if tag == NONE:
            return None
        if tag == TRUE:
            return True
        if tag == FALSE:
            return False
        if tag == ELLIPSIS:
            return Ellipsis
        if tag == INT:
            return self.integer()
        if tag == FLOAT:
            self.pos += 8
            return DOUBLE.unpack_from(self.buf, self.pos - 8)[0]
        if tag == COMPLEX:
            self.pos += 16
            real, imag = DOUBLE_PAIR.unpack_from(self.buf, self.pos - 16)
            return complex(real, imag)
        if tag in (STR, BYTES, BYTEARRAY, DECIMAL, BUILTIN_TYPE, PROGRAM_NAME):
            raw = self.blob()
            self.spend(4 * len(raw) if tag == STR else len(raw))  # a str may take 4 bytes per character
            if tag == STR:
                return raw.decode("utf-8", "surrogatepass")
            if tag == BYTES:
                return raw
            if tag == BYTEARRAY:
                return self.fresh(bytearray(raw))
            if tag == DECIMAL:
                return decimal.Decimal(raw.decode("ascii"))
            if tag == BUILTIN_TYPE:
                return _BUILTIN_TYPES[raw.decode("ascii")]
            return self.on_handle(raw.decode("utf-8", "surrogatepass"))
        if tag in _SEQUENCES:
            n = self.length()
            self.spend(n * _ITEM_COST[tag])
            if tag in (SET, FROZENSET):
                items = self.fresh(set()) if tag == SET else set()
                for _ in range(n):
                    items.add(self.value(depth + 1))
                return items if tag == SET else frozenset(items)
            if tag == TUPLE or not self.numbering:
                return _SEQUENCES[tag]([self.value(depth + 1) for _ in range(n)])
            sequence = self.fresh(_SEQUENCES[tag]())  # numbered before its items, as the encoder did
            for _ in range(n):
                sequence.append(self.value(depth + 1))
            return sequence
        if tag in _MAPPINGS:
            n = self.length()
            self.spend(n * _ITEM_COST[tag])
            mapping = self.fresh(_MAPPINGS[tag]())
            for _ in range(n):
                key = self.value(depth + 1)
                mapping[key] = self.value(depth + 1)  # a fresh object of a known stdlib class
            return mapping
        if tag in (KEYS, VALUES, ITEMS):  # views of a fresh dict: they compare as the program's did
            n = self.length()
            self.spend(n * _ITEM_COST[tag])
            backing: dict = {}
            for i in range(n):
                if tag == KEYS:
                    backing[self.value(depth + 1)] = None
                elif tag == VALUES:
                    backing[i] = self.value(depth + 1)
                else:
                    key = self.value(depth + 1)
                    backing[key] = self.value(depth + 1)
            return backing.keys() if tag == KEYS else backing.values() if tag == VALUES else backing.items()
        if tag == REF:
            self.pos += 4
            (n,) = REF_INDEX.unpack_from(self.buf, self.pos - 4)
            if self.refs is None or n >= len(self.refs):  # numbering: an alias of a container decoded before
                raise WireError("a reference to no container of the request")
            return self.refs[n]
        if tag == RANGE:
            return range(self.integer(), self.integer(), self.integer())
        if tag == FRACTION:
            return fractions.Fraction(self.integer(MAX_FRACTION_PART_BYTES), self.integer(MAX_FRACTION_PART_BYTES))
        # HANDLE
        self.pos += 8
        return self.on_handle(HANDLE_ID.unpack_from(self.buf, self.pos - 8)[0])


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

# A job message's "stop_after": when the judge stops running its tests (``Job.stop_after``). The caller validates
# it, the judge checks it again.
STOP_AFTER = ("never", "timeout", "failure")


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
