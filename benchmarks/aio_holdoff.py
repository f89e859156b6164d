"""How long a pyuds server under load holds off another task of the same asyncio loop.

One process serves with Server.serve_async() and a coroutine handler that awaits
asyncio.sleep(0) for each message; beside it, in the same loop, a task asks to wake every
millisecond and records how late each wake-up comes. Another process (pinned to another CPU
when there are two) opens 100 connections, each pipelining 1,000 requests of 64 bytes (all sent
before any reply is read), and checks every reply. Printed: the longest and the 99th-percentile
hold-off of the ticking task while the load ran, the longest in a second before it (what the
machine's other work costs alone), and the load's rate.

--heap N gives the server N long-lived objects of its own first (an application's data: a
full collection of the cyclic garbage collector walks them all); with --gc-freeze, the server
calls gc.freeze() once it is set up, before the load, as the README's asyncio section advises.

Run: python benchmarks/aio_holdoff.py [--loop uvloop|asyncio] [--clients 100] [--requests 1000]
                                      [--heap N] [--gc-freeze]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time

import pyuds

TICK = 0.001


def load(path: str, clients: int, requests: int) -> None:
    """The load process: every client pipelines all its requests, then reads and checks all."""
    async def client(i: int) -> None:
        async with await pyuds.open_connection(path) as conn:
            sent = [b"%03d-%06d-" % (i, k) + b"x" * 53 for k in range(requests)]
            for message in sent:
                conn._writer.write(len(message).to_bytes(4, "big") + message)  # no drain: pipelined
            await conn._writer.drain()
            for message in sent:
                if await conn.recv() != message:
                    raise SystemExit(f"client {i}: a wrong reply")

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(clients)))

    asyncio.run(main())


async def serve(path: str, clients: int, requests: int, heap: int, freeze: bool) -> dict:
    async def handler(client, message):
        await asyncio.sleep(0)
        return message

    loop = asyncio.get_running_loop()
    server = pyuds.Server(path, handler)
    serving = asyncio.create_task(server.serve_async())
    late: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            before = loop.time()
            await asyncio.sleep(TICK)
            late.append(loop.time() - before - TICK)

    ticking = asyncio.create_task(ticker())
    data = [[i] for i in range(heap)]  # the application's own, alive until the end
    if freeze:
        gc.freeze()  # what is there now (modules, the server, data) is never collected again
    await asyncio.sleep(1.0)  # no load: how late the machine itself makes the wake-ups
    late.sort()
    idle_max = late[-1] * 1e3
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpus[1])] if len(cpus) > 1 else []
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *pin, sys.executable, __file__, "--load", path, "--clients", str(clients), "--requests", str(requests))
    late.clear()
    rc = await proc.wait()
    took = time.monotonic() - began
    running = False
    await ticking
    await server.shutdown_async()
    await serving
    del data
    late.sort()
    return {"rc": rc, "seconds": took, "idle_max_ms": idle_max, "max_ms": late[-1] * 1e3, "p99_ms": late[int(len(late) * 0.99)] * 1e3,
            "ticks": len(late), "msgs_per_s": clients * requests / took}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--heap", type=int, default=0, help="long-lived objects the server holds (default 0)")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() in the server before the load")
    ap.add_argument("--load", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        load(args.load, args.clients, args.requests)
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    with tempfile.TemporaryDirectory(prefix="pyuds-") as tmp:
        path = os.path.join(tmp, "h.sock")
        if args.loop == "uvloop":
            import uvloop
            result = uvloop.run(serve(path, args.clients, args.requests, args.heap, args.gc_freeze))
        else:
            result = asyncio.run(serve(path, args.clients, args.requests, args.heap, args.gc_freeze))
    extra = (f", {args.heap:,} objects held" if args.heap else "") + (", gc.freeze()" if args.gc_freeze else "")
    print(f"{args.loop}{extra}, Python {sys.version.split()[0]}: {args.clients} clients x {args.requests} pipelined "
          f"requests to a handler awaiting asyncio.sleep(0): {result['msgs_per_s']:,.0f} msgs/s; "
          f"another task's wake-ups ({result['ticks']} of them) late by at most {result['max_ms']:.1f} ms "
          f"(p99 {result['p99_ms']:.2f} ms; at most {result['idle_max_ms']:.1f} ms in a second without load); "
          f"load {'verified every reply' if result['rc'] == 0 else 'FAILED'}")
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
