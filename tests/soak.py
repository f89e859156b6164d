"""Soak: many clients against real `pyuds serve` processes, one per framing, for a set time.

Clients pipeline requests of random sizes (0 to 1 MiB, log-uniform) and some vanish in the
middle of a frame, politely or with a reset. Every reply to a client that stayed is checked
to arrive exactly once and in order (for raw framing, whose boundaries are wherever reads
fall, the byte stream is checked). At the end each server must still serve, stop on SIGTERM
with status 0 and remove its socket file. Prints its counts; exits 1 on any error.

    python tests/soak.py --duration 20
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from pyuds._framing import Decoder, encode

FRAMINGS = ("u32", "line", "raw")
MAX_SIZE = 1 << 20


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []

    def add(self, **kw: int) -> None:
        with self.lock:
            self.c.update(kw)

    def error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)


def random_size(rng: random.Random, framing: str) -> int:
    size = int((MAX_SIZE + 1) ** rng.random()) - 1  # log-uniform over 0 .. 1 MiB
    return max(size, 1) if framing == "raw" else size


def session(path: str, framing: str, rng: random.Random, blob: bytes, counts: Counts, deadline: float) -> None:
    """One client connection: a few pipelined rounds, maybe vanishing mid-frame."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.setblocking(False)
    vanish = rng.random() < 0.15
    rounds = rng.randint(1, 6)
    decoder = Decoder(framing)
    expected: collections.deque[bytes] = collections.deque()
    raw_expected = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    try:
        for r in range(rounds):
            if time.monotonic() > deadline:
                break
            payloads = []
            for _ in range(rng.randint(1, 8)):
                n = random_size(rng, framing)
                at = rng.randrange(0, len(blob) - n + 1)
                payloads.append(blob[at:at + n])
            out = bytearray(b"".join(encode(framing, p) for p in payloads))
            if vanish and r == rounds - 1:
                # Send a cut of this round, stopping anywhere (mid-frame, most likely), reading
                # unchecked what comes back meanwhile (the complete frames before the cut are
                # answered; in raw framing every chunk is), then disappear.
                vanish_after(sock, sel, out[:rng.randrange(1, max(2, len(out)))])
                break
            expected.extend(payloads)
            if framing == "raw":
                raw_expected += b"".join(payloads)
            sent = 0
            end = time.monotonic() + 60
            sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while True:
                waiting = (len(raw_expected) if framing == "raw" else len(expected))
                if sent >= len(out) and waiting == 0:
                    break
                if time.monotonic() > end:
                    counts.error(f"{framing}: no progress for 60 s ({waiting} replies owed)")
                    return
                for key, mask in sel.select(timeout=1.0):
                    if mask & selectors.EVENT_WRITE and sent < len(out):
                        try:
                            sent += sock.send(out[sent:sent + 262144])
                        except BlockingIOError:
                            pass
                    if mask & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(1 << 20)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            counts.error(f"{framing}: server closed a connection that owed {waiting} replies")
                            return
                        if framing == "raw":
                            if raw_expected[:len(chunk)] != chunk:
                                counts.error("raw: reply bytes differ from what was sent")
                                return
                            del raw_expected[:len(chunk)]
                            counts.add(bytes=len(chunk))
                            continue
                        decoder.feed(chunk)
                        while (message := decoder.next()) is not None:
                            if not expected:
                                counts.error(f"{framing}: a reply nobody asked for")
                                return
                            if message != expected.popleft():
                                counts.error(f"{framing}: a reply out of order or corrupted")
                                return
                            counts.add(replies=1, bytes=len(message))
                if sent >= len(out):
                    sel.modify(sock, selectors.EVENT_READ)
                else:
                    sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            counts.add(requests=len(payloads))
        if vanish:
            if rng.random() < 0.5:  # a reset rather than an orderly close
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            counts.add(vanished=1)
        else:
            counts.add(completed=1)
    finally:
        sel.close()
        sock.close()


def vanish_after(sock: socket.socket, sel: selectors.BaseSelector, out: bytes) -> None:
    """Sends out (within half a second: the server may rightly stop reading a client that does
    not read), discarding whatever comes back."""
    sent, end = 0, time.monotonic() + 0.5
    sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    while sent < len(out) and time.monotonic() < end:
        for key, mask in sel.select(timeout=0.1):
            try:
                if mask & selectors.EVENT_WRITE:
                    sent += sock.send(out[sent:sent + 262144])
                if mask & selectors.EVENT_READ and not sock.recv(1 << 20):
                    return
            except (BlockingIOError, ConnectionError):
                pass


def client_loop(path: str, framing: str, seed: int, blob: bytes, counts: Counts, deadline: float) -> None:
    rng = random.Random(seed)
    line_blob = blob.replace(b"\n", b"_")
    while time.monotonic() < deadline and not counts.errors:
        try:
            session(path, framing, rng, line_blob if framing == "line" else blob, counts, deadline)
            counts.add(sessions=1)
        except OSError as exc:
            counts.error(f"{framing}: {exc!r}")


def start_server(path: str, framing: str, workdir: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyuds", "serve", path, "--framing", framing,
         "--max-message-size", str(2 * MAX_SIZE)],
        cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{framing} server did not start: {proc.stderr.read().decode(errors='replace')}")
        time.sleep(0.02)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds (default: 20)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients per framing (default: 8)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    blob = random.Random(seed).randbytes(2 * MAX_SIZE)
    counts = Counts()
    workdir = tempfile.mkdtemp(prefix="pyuds-soak-", dir="/tmp")
    servers: dict[str, subprocess.Popen] = {}
    try:
        for framing in FRAMINGS:
            servers[framing] = start_server(os.path.join(workdir, f"{framing}.sock"), framing, workdir)
        deadline = time.monotonic() + args.duration
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(os.path.join(workdir, f"{f}.sock"), f, seed * 1000 + i * 10 + k,
                                          blob, counts, deadline))
                   for k, f in enumerate(FRAMINGS) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + 120)
            if t.is_alive():
                counts.error("a client thread did not finish")
        for framing, proc in servers.items():
            path = os.path.join(workdir, f"{framing}.sock")
            if proc.poll() is not None:
                counts.error(f"{framing} server died with status {proc.returncode}")
                continue
            probe = socket.socket(socket.AF_UNIX)
            probe.settimeout(10)
            probe.connect(path)
            probe.sendall(encode(framing, b"still there?"))
            decoder = Decoder(framing)
            while (reply := decoder.next()) is None:
                decoder.feed(probe.recv(65536))
            probe.close()
            if reply != b"still there?":
                counts.error(f"{framing} server answered the final probe wrongly")
            proc.send_signal(signal.SIGTERM)
            if proc.wait(30) != 0:
                counts.error(f"{framing} server exited with {proc.returncode}: "
                             f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            if os.path.lexists(path):
                counts.error(f"{framing} server left its socket file")
    finally:
        for proc in servers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    c = counts.c
    print(f"soak: seed {seed}, {args.duration:g} s, {args.clients} clients per framing: "
          f"{c['sessions']} sessions ({c['completed']} completed, {c['vanished']} vanished mid-frame), "
          f"{c['requests']} requests, {c['replies']} framed replies verified, "
          f"{c['bytes'] / 1e6:.1f} MB echoed and checked, {len(counts.errors)} errors")
    for e in counts.errors[:20]:
        print("  error:", e)
    return 1 if counts.errors else 0


if __name__ == "__main__":
    sys.exit(main())
