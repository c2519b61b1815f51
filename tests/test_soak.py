"""Chaos soak: random arrivals, payload sizes, client and backend faults and memory
swings for a bounded time (GATEKEEPER_SOAK_SECONDS, default 20). Every completed job's
bytes are verified by checksum, the limits are checked at every change of the gate's
state, and at the end nothing may be held or leaked."""

from __future__ import annotations

import hashlib
import os
import random

import trio
import trio.testing
from fakes import backend, config, gatekeeper, held_fds, reset

SECONDS = float(os.environ.get("GATEKEEPER_SOAK_SECONDS", "20"))
MiB = 2**20
MIN_FREE = 100 * MiB


async def read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(min(65536, n - len(out)))
        if not data:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


async def chaotic_backend(stream: trio.SocketStream) -> None:
    """Mode byte + 8-byte length, then: E echo, S slow echo, R reset midway,
    K close without a reply."""
    header = await read_exactly(stream, 9)
    mode, length = header[:1], int.from_bytes(header[1:], "big")
    if mode == b"K":
        return
    if mode == b"S":
        await trio.sleep(random.random() * 0.2)
    done = 0
    while done < length:
        data = await stream.receive_some(min(65536, length - done))
        if not data:
            return
        if mode == b"R" and done + len(data) >= length // 2:
            reset(stream)
            return
        await stream.send_all(data)
        done += len(data)


async def test_chaos_soak() -> None:
    rng = random.Random(int(os.environ.get("GATEKEEPER_SOAK_SEED", "1")))
    stats = {"jobs": 0, "faults": 0, "verified_bytes": 0, "verified_jobs": 0, "violations": 0}
    async with backend(chaotic_backend) as be:
        cfg = config(be.address, max_jobs=3, max_queue=40, min_free_bytes=MIN_FREE,
                     queue_timeout=5.0)
        async with gatekeeper(cfg, available=10 * MIN_FREE) as gk:
            await gk.server.meter.quiescent()
            await trio.testing.wait_all_tasks_blocked()
            baseline = held_fds(gk)
            limits = gk.server.gate.admission.limits

            async def check_invariants() -> None:
                while True:
                    await gk.server.gate.wait_changed()
                    s = gk.server.gate.snapshot()
                    if s.running > limits.max_jobs or s.queued > limits.max_queue:
                        stats["violations"] += 1

            async def memory_swings() -> None:
                while True:
                    await trio.sleep(rng.random() * 0.5)
                    gk.memory.value = rng.choice([MIN_FREE // 2, 10 * MIN_FREE])
                    if gk.memory.value < MIN_FREE:
                        stats["faults"] += 1

            async def client(i: int) -> None:
                stats["jobs"] += 1
                size = rng.choice([0, 1, 1000, 65536, 300_000, 2 * MiB])
                payload = rng.randbytes(size)
                mode = rng.choices([b"E", b"S", b"R", b"K"], weights=[6, 2, 1, 1])[0]
                behaviour = rng.choices(["normal", "reset-early", "reset-late", "quit"],
                                        weights=[8, 1, 1, 1])[0]
                if mode != b"E" or behaviour != "normal":
                    stats["faults"] += 1
                try:
                    c = await gk.connect()
                except OSError:
                    return
                try:
                    await c.send_all(mode + size.to_bytes(8, "big"))
                    if behaviour == "quit":
                        await c.aclose()
                        return
                    if behaviour == "reset-early":
                        await trio.sleep(rng.random() * 0.05)
                        reset(c)
                        return
                    reply: bytes | None = None
                    async with trio.open_nursery() as nursery:
                        async def send() -> None:
                            view = memoryview(payload)
                            try:
                                for start in range(0, size, 65536):
                                    await c.send_all(view[start:start + 65536])
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass  # the reply side says what happened

                        nursery.start_soon(send)
                        if behaviour == "reset-late":
                            await trio.sleep(rng.random() * 0.1)
                            nursery.cancel_scope.cancel()
                            reset(c)
                            return
                        try:
                            reply = await read_exactly(c, size)
                        except (trio.BrokenResourceError, EOFError):
                            nursery.cancel_scope.cancel()
                    if reply is None:
                        await trio.aclose_forcefully(c)
                        return
                    if mode in (b"E", b"S"):
                        assert hashlib.sha256(reply).digest() == hashlib.sha256(payload).digest()
                        stats["verified_bytes"] += size
                        stats["verified_jobs"] += 1
                    await c.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
                    # faults, queue timeouts while memory was short: the client
                    # sees its job fail, never a corrupted reply
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(c)

            with trio.fail_after(SECONDS + 90):
                async with trio.open_nursery() as background:
                    background.start_soon(check_invariants)
                    background.start_soon(memory_swings)
                    async with trio.open_nursery() as clients:
                        deadline = trio.current_time() + SECONDS
                        i = 0
                        while trio.current_time() < deadline:
                            clients.start_soon(client, i)
                            i += 1
                            await trio.sleep(rng.expovariate(40))  # ~40 arrivals/s
                    gk.memory.value = 10 * MIN_FREE
                    await gk.wait_for(lambda s: s.gate.snapshot().running == 0
                                      and s.gate.snapshot().queued == 0
                                      and not s.connections.live)
                    background.cancel_scope.cancel()
            await gk.server.meter.quiescent()
            await trio.testing.wait_all_tasks_blocked()
            leaked = held_fds(gk) - baseline
            snap = gk.server.gate.snapshot()
    print(f"soak {SECONDS:g}s: {stats['jobs']} jobs, {stats['faults']} faults injected, "
          f"{stats['verified_jobs']} jobs / {stats['verified_bytes']} bytes verified, "
          f"leaks: {leaked} fds, {snap.running} running, {snap.queued} queued, "
          f"{stats['violations']} limit violations")
    assert stats["violations"] == 0
    assert leaked == 0
    assert snap.running == 0 and snap.queued == 0
    assert stats["verified_jobs"] > 0
