"""Framing: how a byte stream is cut into messages, and how messages are framed.

Four layers are checked:

* the decoders on their own: the C one (``pyuds._core.decode_all``, which runs
  ``uds_frame_next`` over a buffer exactly like the server loop does) and the pure-Python
  ``Decoder`` the client uses, for every framing, at every split of a stream, at the size
  limit, and against random inputs (hypothesis);
* the pure-Python ``encode()``;
* the C test program (``make test`` in csrc/), which decodes inputs that end right before a
  page the process cannot read;
* a real server on a real socket, fed one byte at a time, and sent frames that are too large.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from typing import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyuds
from pyuds import CloseReason, ConnectionClosedError, FramingError
from pyuds._core import decode_all
from pyuds._framing import Decoder, encode

from conftest import recv_exactly, wait_until

DEFAULT_MAX = 16 * 1024 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")

# What the other side of a closed connection may see: EOF (ConnectionClosedError from
# pyuds.Connection) or, if the kernel still held unread bytes at close, a reset.
CLOSED_ERRORS = (ConnectionClosedError, ConnectionResetError)


# ---------------------------------------------------------------------------------------------
# Helpers: the two decoders behind one interface
# ---------------------------------------------------------------------------------------------


class CStream:
    """The C decoder used as the server uses it: bytes accumulate in a buffer, complete frames
    are cut from its start, the leftover waits for more."""

    name = "C"

    def __init__(self, framing: str, max_size: int = DEFAULT_MAX) -> None:
        self.framing = framing
        self.max = max_size
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Appends data; returns the messages now complete (FramingError where the server would
        close the connection)."""
        self.buf += data
        messages, left = decode_all(self.framing, self.buf, self.max)
        self.buf = self.buf[len(self.buf) - left:]
        return messages

    @property
    def pending(self) -> int:
        return len(self.buf)


class PyStream:
    """The client's pure-Python Decoder behind the same interface as CStream."""

    name = "py"

    def __init__(self, framing: str, max_size: int = DEFAULT_MAX) -> None:
        self.decoder = Decoder(framing, max_size)

    def feed(self, data: bytes) -> list[bytes]:
        self.decoder.feed(data)
        messages = []
        while (message := self.decoder.next()) is not None:
            messages.append(message)
        return messages

    @property
    def pending(self) -> int:
        return self.decoder.pending


DECODERS = [CStream, PyStream]
decoders = pytest.mark.parametrize("make_stream", DECODERS, ids=lambda cls: cls.name)


def feed_pieces(stream, pieces: Iterable[bytes]) -> list[bytes]:
    """Feeds each piece in turn; returns every message that came out, in order."""
    out: list[bytes] = []
    for piece in pieces:
        out.extend(stream.feed(piece))
    return out


def cut(data: bytes, points: Iterable[int]) -> list[bytes]:
    """data split at the given offsets (sorted, duplicates allowed)."""
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def raw_messages(chunks: Iterable[bytes], max_size: int) -> list[bytes]:
    """What raw framing makes of chunks read one after the other: each non-empty chunk is a
    message, cut into pieces of at most max_size bytes."""
    out = []
    for chunk in chunks:
        out.extend(chunk[i:i + max_size] for i in range(0, len(chunk), max_size))
    return out


def u32(payload: bytes) -> bytes:
    """A u32 frame, built by hand (independent of encode())."""
    return len(payload).to_bytes(4, "big") + payload


# Streams of several frames, zero-length frames included, with their payloads.
U32_PAYLOADS = [b"hello", b"", b"\x00\x01\x02\xff", b"", b"x" * 70, b"\n\r\n", b"end"]
LINE_PAYLOADS = [b"hello", b"", b"crlf\r", b"\r", b"", b"x" * 70, b"\x00\xff\t end"]
U32_STREAM = b"".join(u32(p) for p in U32_PAYLOADS)
LINE_STREAM = b"".join(p + b"\n" for p in LINE_PAYLOADS)
STREAMS = {"u32": (U32_STREAM, U32_PAYLOADS), "line": (LINE_STREAM, LINE_PAYLOADS)}


# ---------------------------------------------------------------------------------------------
# 1. Decoders: every split, zero-length frames, the size limit
# ---------------------------------------------------------------------------------------------


@decoders
@pytest.mark.parametrize("framing", ["u32", "line"])
def test_every_split_yields_the_original_messages(make_stream, framing):
    """Whatever byte boundary the stream is split at, the messages come out complete, once
    each, in order, and nothing is left over."""
    stream, payloads = STREAMS[framing]
    for k in range(len(stream) + 1):
        dec = make_stream(framing)
        first = dec.feed(stream[:k])
        rest = dec.feed(stream[k:])
        assert first + rest == payloads, f"split at byte {k}"
        assert dec.pending == 0, f"split at byte {k}"


@decoders
@pytest.mark.parametrize("framing", ["u32", "line"])
def test_one_byte_at_a_time_yields_the_original_messages(make_stream, framing):
    """The extreme split: every byte arrives alone (the line decoder's scan hint must not skip
    a newline, the u32 decoder must wait for split headers)."""
    stream, payloads = STREAMS[framing]
    dec = make_stream(framing)
    got = feed_pieces(dec, (stream[i:i + 1] for i in range(len(stream))))
    assert got == payloads
    assert dec.pending == 0


@decoders
def test_raw_every_split_makes_one_message_per_chunk(make_stream):
    """Raw framing: each chunk read is one message, so splitting a stream at byte k gives the
    messages stream[:k] and stream[k:] (empty chunks give none), which together are the
    stream."""
    stream = b"raw bytes \x00\n\r\xff of any kind"
    for k in range(len(stream) + 1):
        dec = make_stream("raw")
        got = dec.feed(stream[:k]) + dec.feed(stream[k:])
        assert got == [c for c in (stream[:k], stream[k:]) if c], f"split at byte {k}"
        assert b"".join(got) == stream
        assert dec.pending == 0


@decoders
def test_zero_length_frames(make_stream):
    """An empty payload is a message: u32 with a zero header, line as a lone b"\\n"."""
    assert make_stream("u32").feed(b"\0\0\0\0") == [b""]
    assert make_stream("u32").feed(b"\0\0\0\0" * 3) == [b"", b"", b""]
    assert make_stream("line").feed(b"\n") == [b""]
    assert make_stream("line").feed(b"\n\n\n") == [b"", b"", b""]
    assert make_stream("raw").feed(b"") == []


@decoders
def test_line_keeps_trailing_carriage_return(make_stream):
    """In line framing only b"\\n" ends a message: a b"\\r" before it is payload."""
    assert make_stream("line").feed(b"GET\r\nPUT\r\r\n") == [b"GET\r", b"PUT\r\r"]


@decoders
@pytest.mark.parametrize("max_size", [1, 3, 100])
def test_u32_exactly_max_is_accepted(make_stream, max_size):
    """A u32 payload of exactly max bytes is a message."""
    payload = b"m" * max_size
    dec = make_stream("u32", max_size)
    assert dec.feed(u32(payload) + u32(b"")) == [payload, b""]


@decoders
@pytest.mark.parametrize("max_size", [1, 3, 100])
def test_u32_max_plus_one_is_refused_as_soon_as_the_header_is_in(make_stream, max_size):
    """A u32 header announcing max+1 bytes is refused before any of the payload arrives; three
    bytes of it are not yet enough to tell."""
    header = (max_size + 1).to_bytes(4, "big")
    dec = make_stream("u32", max_size)
    assert dec.feed(header[:3]) == []
    with pytest.raises(FramingError):
        dec.feed(header[3:])
    # The same with whole frames before it: they are not refused, the big one is.
    dec = make_stream("u32", max_size)
    assert dec.feed(u32(b"a")) == [b"a"]
    with pytest.raises(FramingError):
        dec.feed(header + b"b" * (max_size + 1))


@decoders
def test_u32_all_ones_header_is_refused_at_once(make_stream):
    """A 0xFFFFFFFF header (4 GiB) is refused as soon as its 4 bytes are in, with the default
    16 MiB limit: nothing waits for the payload."""
    dec = make_stream("u32", DEFAULT_MAX)
    with pytest.raises(FramingError):
        dec.feed(b"\xff\xff\xff\xff")


@decoders
@pytest.mark.parametrize("max_size", [1, 3, 100])
def test_line_exactly_max_is_accepted(make_stream, max_size):
    """A line payload of exactly max bytes is a message, also when its newline comes later."""
    payload = b"m" * max_size
    assert make_stream("line", max_size).feed(payload + b"\n") == [payload]
    dec = make_stream("line", max_size)
    assert dec.feed(payload) == []          # max bytes without newline: still waiting
    assert dec.feed(b"\n") == [payload]


@decoders
@pytest.mark.parametrize("max_size", [1, 3, 100])
def test_line_max_plus_one_without_newline_is_refused(make_stream, max_size):
    """A line is refused once max+1 bytes hold no newline, whether they arrive together, byte
    by byte, or with the newline right behind them."""
    too_long = b"L" * (max_size + 1)
    with pytest.raises(FramingError):
        make_stream("line", max_size).feed(too_long)
    with pytest.raises(FramingError):
        make_stream("line", max_size).feed(too_long + b"\n")
    dec = make_stream("line", max_size)
    for i in range(max_size):
        assert dec.feed(too_long[i:i + 1]) == []
    with pytest.raises(FramingError):
        dec.feed(too_long[-1:])


@decoders
@pytest.mark.parametrize("max_size", [1, 4, 7])
def test_raw_chunk_longer_than_max_is_cut(make_stream, max_size):
    """Raw framing: a chunk longer than max is not refused but cut into max-sized messages
    (the last one shorter)."""
    chunk = bytes(range(30))
    got = make_stream("raw", max_size).feed(chunk)
    assert all(len(m) == max_size for m in got[:-1])
    assert 1 <= len(got[-1]) <= max_size
    assert b"".join(got) == chunk
    assert got == [chunk[i:i + max_size] for i in range(0, 30, max_size)]


def test_c_raw_with_zero_max_refuses():
    """The C decoder with max 0 in raw framing refuses any data: no message fits."""
    with pytest.raises(FramingError):
        decode_all("raw", b"abc", 0)


@pytest.mark.parametrize("bad", [0, -1])
def test_py_decoder_refuses_a_max_below_one(bad):
    """A limit under 1 would let raw framing return empty messages forever (raw can never
    carry one): the Decoder, and so pyuds.connect, refuse it up front."""
    with pytest.raises(ValueError, match="at least 1"):
        Decoder("raw", bad)


# ---- hypothesis: random payloads, random split points ---------------------------------------

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

any_payloads = st.lists(st.binary(max_size=40), max_size=12)
line_payloads = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"\r")), max_size=12)
split_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


@PROPERTY_SETTINGS
@given(framing=st.sampled_from(["u32", "line"]), data=st.data())
def test_property_round_trip(framing, data):
    """Random payloads, encoded with encode() and fed to both decoders in random pieces, come
    out exactly as they went in."""
    payloads = data.draw(any_payloads if framing == "u32" else line_payloads, label="payloads")
    stream = b"".join(encode(framing, p) for p in payloads)
    points = [p % (len(stream) + 1) for p in data.draw(split_points, label="splits")]
    pieces = cut(stream, points)
    for make_stream in DECODERS:
        dec = make_stream(framing, 64)
        assert feed_pieces(dec, pieces) == payloads, make_stream.name
        assert dec.pending == 0


@PROPERTY_SETTINGS
@given(payloads=st.lists(st.binary(min_size=1, max_size=40), max_size=12),
       max_size=st.integers(min_value=1, max_value=50))
def test_property_raw_round_trip(payloads, max_size):
    """Raw framing: chunks read one after the other come out as themselves, each cut into
    max-sized pieces if longer; their concatenation is always the stream."""
    pieces = [encode("raw", p) for p in payloads]
    for make_stream in DECODERS:
        dec = make_stream("raw", max_size)
        got = feed_pieces(dec, pieces)
        assert got == raw_messages(payloads, max_size), make_stream.name
        assert b"".join(got) == b"".join(payloads)
        assert all(1 <= len(m) <= max_size for m in got)


@PROPERTY_SETTINGS
@given(framing=st.sampled_from(["u32", "line"]), data=st.data())
def test_property_size_limit(framing, data):
    """With a random limit, both decoders deliver the frames before the first oversized one and
    then refuse (FramingError), or, with no oversized frame, deliver everything."""
    payloads = data.draw(any_payloads if framing == "u32" else line_payloads, label="payloads")
    max_size = data.draw(st.integers(min_value=1, max_value=45), label="max")
    stream = b"".join(encode(framing, p) for p in payloads)
    points = [p % (len(stream) + 1) for p in data.draw(split_points, label="splits")]
    pieces = cut(stream, points)
    big = [i for i, p in enumerate(payloads) if len(p) > max_size]
    for make_stream in DECODERS:
        dec = make_stream(framing, max_size)
        got: list[bytes] = []
        if not big:
            assert feed_pieces(dec, pieces) == payloads
            continue
        with pytest.raises(FramingError):
            for piece in pieces:
                got.extend(dec.feed(piece))
        # decode_all drops the messages of the call that raised, so what came out is a prefix
        # of the frames before the oversized one (all of them for the Python decoder).
        allowed = payloads[:big[0]]
        assert got == allowed[:len(got)], make_stream.name


# ---------------------------------------------------------------------------------------------
# 2. encode()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 255, 256, 0x010203, 70_000])
def test_encode_u32_header_bytes(length):
    """u32: a 4-byte big-endian length, then the payload untouched."""
    payload = b"p" * length
    framed = encode("u32", payload)
    assert framed[:4] == bytes([(length >> 24) & 0xFF, (length >> 16) & 0xFF,
                                (length >> 8) & 0xFF, length & 0xFF])
    assert framed[4:] == payload


def test_encode_u32_examples():
    """Known encodings, byte for byte."""
    assert encode("u32", b"") == b"\x00\x00\x00\x00"
    assert encode("u32", b"hello") == b"\x00\x00\x00\x05hello"
    assert encode("u32", b"\n" * 258) == b"\x00\x00\x01\x02" + b"\n" * 258


def test_encode_line():
    """line: the payload then b"\\n"; a b"\\r" is kept; a payload holding b"\\n" is refused,
    since the peer would see two messages."""
    assert encode("line", b"hello") == b"hello\n"
    assert encode("line", b"") == b"\n"
    assert encode("line", b"crlf\r") == b"crlf\r\n"
    for bad in (b"\n", b"a\nb", b"trailing\n", b"\nleading"):
        with pytest.raises(FramingError):
            encode("line", bad)


def test_encode_raw():
    """raw: the payload as it is; an empty one cannot be sent (the peer would see nothing)."""
    assert encode("raw", b"a\nb\0") == b"a\nb\0"
    with pytest.raises(FramingError):
        encode("raw", b"")


def test_encode_unknown_framing():
    """An unknown framing name is a ValueError, not a silent default."""
    with pytest.raises(ValueError):
        encode("u16", b"x")


# ---------------------------------------------------------------------------------------------
# 3. The C guarded-page test program
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_c_guarded_page_tests(tmp_path):
    """`make test` in a copy of csrc/ builds the C core with -Werror and runs test_framing.c,
    whose decoders read inputs ending right before a PROT_NONE page: reading one byte too
    far would crash it."""
    missing = [tool for tool in ("make", "cc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} on PATH to build the C tests")
    build = tmp_path / "csrc"
    shutil.copytree(CSRC, build, ignore=shutil.ignore_patterns("*.o", "*.a", "test_framing"))
    proc = subprocess.run(
        ["make", "test", "CFLAGS=-O2 -Wall -Wextra -Werror"],
        cwd=build, capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "test_framing: all passed" in proc.stdout, output


# ---------------------------------------------------------------------------------------------
# 4. End to end: a real server on a real socket
# ---------------------------------------------------------------------------------------------


def raw_client(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def send_slowly(sock: socket.socket, data: bytes, delay: float = 0.001) -> None:
    """Sends data one byte at a time, pausing between bytes, so the server reads it in as many
    pieces as it can."""
    for i in range(len(data)):
        sock.sendall(data[i:i + 1])
        time.sleep(delay)


def recording_echo(seen: list[bytes]) -> Callable[[pyuds.ClientHandle, bytes], bytes]:
    def handler(client: pyuds.ClientHandle, message: bytes) -> bytes:
        seen.append(message)
        return message
    return handler


def logged_error(caplog, text: str) -> Callable[[], bool]:
    """A predicate: an ERROR record from the "pyuds" logger whose message contains text."""
    def found() -> bool:
        return any(r.name == "pyuds" and r.levelno == logging.ERROR and text in r.getMessage()
                   for r in list(caplog.records))
    return found


E2E_FRAMES = {
    "u32": [b"hello", b"", b"\x00\n\r\xff", b"y" * 60],
    "line": [b"hello", b"", b"keeps cr\r", b"y" * 60],
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("framing", ["u32", "line"])
def test_e2e_frames_sent_byte_by_byte(serve, sock_path, framing):
    """A client that sends its frames one byte at a time gets every reply, correct and in
    order, and the handler sees exactly the payloads (line framing: the b"\\r" included)."""
    seen: list[bytes] = []
    serve(recording_echo(seen), framing=framing)
    frames = E2E_FRAMES[framing]
    sock = raw_client(sock_path)
    with pyuds.Connection(sock, framing) as conn:
        send_slowly(sock, b"".join(encode(framing, f) for f in frames))
        assert [conn.recv() for _ in frames] == frames
    assert seen == frames


@pytest.mark.timeout(20)
def test_e2e_line_reply_wire_bytes(serve, sock_path):
    """Line framing on the wire: b"ab\\r\\n" reaches the handler as b"ab\\r" and the reply is
    the handler's bytes with b"\\n" appended."""
    seen: list[bytes] = []
    serve(recording_echo(seen), framing="line")
    with raw_client(sock_path) as sock:
        send_slowly(sock, b"ab\r\n")
        want = b"ab\r\n"
        got = b""
        while len(got) < len(want):
            chunk = sock.recv(100)
            assert chunk, "server closed the connection"
            got += chunk
    assert got == want
    assert seen == [b"ab\r"]


@pytest.mark.timeout(20)
def test_e2e_raw_sent_byte_by_byte(serve, sock_path):
    """Raw framing: every chunk read is a message, echoed as it is; bytes sent one at a time
    all come back, in order, and the handler saw them all, none empty."""
    seen: list[bytes] = []
    serve(recording_echo(seen), framing="raw")
    data = b"raw \x00\n\r\xff bytes, one at a time"
    with raw_client(sock_path) as sock:
        send_slowly(sock, data)
        got = recv_exactly(sock, len(data))
    assert got == data
    assert b"".join(seen) == data
    assert all(seen)


@pytest.mark.timeout(20)
def test_e2e_u32_size_limit(serve, sock_path, caplog):
    """max_message_size=1024, u32: 1024 bytes are echoed; 1025 close that connection only (an
    ERROR on the "pyuds" logger, close reason TOO_LARGE); a client connected before is still
    served, and so is one that connects after."""
    caplog.set_level(logging.ERROR, logger="pyuds")
    reasons: list[CloseReason] = []
    serve(max_message_size=1024, on_disconnect=lambda client, reason: reasons.append(reason))
    with pyuds.connect(sock_path, timeout=5) as before:
        assert before.request(b"before") == b"before"

        with pyuds.connect(sock_path, timeout=5) as exact:
            assert exact.request(b"e" * 1024) == b"e" * 1024
            assert exact.request(b"ok") == b"ok"

        with pyuds.connect(sock_path, timeout=5) as big:
            big.send(b"b" * 1025)  # the client itself sets no limit
            with pytest.raises(CLOSED_ERRORS):
                big.recv()

        wait_until(logged_error(caplog, "larger than max_message_size"))
        wait_until(lambda: CloseReason.TOO_LARGE in reasons)
        assert before.request(b"still here") == b"still here"
        with pyuds.connect(sock_path, timeout=5) as after:
            assert after.request(b"after") == b"after"


@pytest.mark.timeout(20)
def test_e2e_u32_all_ones_header_closes_at_once(serve, sock_path, caplog):
    """A 0xFFFFFFFF header alone (default 16 MiB limit) closes the connection without waiting
    for its 4 GiB; other clients are unaffected."""
    caplog.set_level(logging.ERROR, logger="pyuds")
    serve()
    with pyuds.connect(sock_path, timeout=5) as other:
        sock = raw_client(sock_path)
        with pyuds.Connection(sock, "u32") as conn:
            sock.sendall(b"\xff\xff\xff\xff")
            with pytest.raises(CLOSED_ERRORS):
                conn.recv()  # a TimeoutError here would mean the server waits for the payload
        wait_until(logged_error(caplog, "larger than max_message_size"))
        assert other.request(b"fine") == b"fine"


@pytest.mark.timeout(20)
def test_e2e_line_size_limit(serve, sock_path, caplog):
    """Line framing, max_message_size=1024: 1024 bytes with no newline yet keep the connection
    open (the newline then completes the message); 1025 bytes with no newline close it and
    log an ERROR; other clients are still served."""
    caplog.set_level(logging.ERROR, logger="pyuds")
    serve(framing="line", max_message_size=1024)
    with pyuds.connect(sock_path, "line", timeout=5) as before:
        assert before.request(b"before") == b"before"

        sock = raw_client(sock_path)
        with pyuds.Connection(sock, "line") as exact:
            sock.sendall(b"e" * 1024)
            time.sleep(0.05)
            sock.sendall(b"\n")
            assert exact.recv() == b"e" * 1024

        sock = raw_client(sock_path)
        with pyuds.Connection(sock, "line") as long:
            sock.sendall(b"L" * 1025)
            with pytest.raises(CLOSED_ERRORS):
                long.recv()

        wait_until(logged_error(caplog, "larger than max_message_size"))
        assert before.request(b"still here") == b"still here"
        with pyuds.connect(sock_path, "line", timeout=5) as after:
            assert after.request(b"after") == b"after"


@pytest.mark.timeout(20)
def test_e2e_line_reply_with_newline_closes_only_that_client(serve, sock_path, caplog):
    """Line framing: a handler reply containing b"\\n" cannot be framed; that client is closed
    (FramingError logged at ERROR), and the other clients, before and after, are served."""
    caplog.set_level(logging.ERROR, logger="pyuds")
    reasons: list[CloseReason] = []

    def handler(client: pyuds.ClientHandle, message: bytes) -> bytes:
        return b"two\nlines" if message == b"bad" else message

    serve(handler, framing="line", on_disconnect=lambda client, reason: reasons.append(reason))
    with pyuds.connect(sock_path, "line", timeout=5) as before:
        assert before.request(b"good") == b"good"
        with pyuds.connect(sock_path, "line", timeout=5) as victim:
            with pytest.raises(CLOSED_ERRORS):
                victim.request(b"bad")

        def framing_error_logged() -> bool:
            return any(r.name == "pyuds" and r.levelno == logging.ERROR and r.exc_info
                       and isinstance(r.exc_info[1], FramingError) for r in list(caplog.records))

        wait_until(framing_error_logged)
        wait_until(lambda: CloseReason.HANDLER_ERROR in reasons)
        assert before.request(b"still here") == b"still here"
        with pyuds.connect(sock_path, "line", timeout=5) as after:
            assert after.request(b"after") == b"after"


@pytest.mark.timeout(20)
def test_e2e_u32_replies_owed_before_an_oversized_frame_still_arrive(serve, sock_path, caplog):
    """Frames that precede an oversized one in the same write are still answered before the
    connection closes."""
    caplog.set_level(logging.ERROR, logger="pyuds")
    serve(max_message_size=1024)
    sock = raw_client(sock_path)
    with pyuds.Connection(sock, "u32") as conn:
        sock.sendall(u32(b"one") + u32(b"two") + (1025).to_bytes(4, "big"))
        assert conn.recv() == b"one"
        assert conn.recv() == b"two"
        with pytest.raises(CLOSED_ERRORS):
            conn.recv()
    wait_until(logged_error(caplog, "larger than max_message_size"))


@pytest.mark.timeout(20)
def test_e2e_raw_chunk_longer_than_max_is_cut(serve, sock_path):
    """Raw framing, max_message_size=4: a longer chunk reaches the handler as messages of at
    most 4 bytes and the connection stays open (nothing is refused)."""
    seen: list[bytes] = []
    serve(recording_echo(seen), framing="raw", max_message_size=4)
    data = b"0123456789abcdefghij"
    with raw_client(sock_path) as sock:
        sock.sendall(data)
        got = recv_exactly(sock, len(data))
    assert got == data
    assert b"".join(seen) == data
    assert all(1 <= len(m) <= 4 for m in seen)
