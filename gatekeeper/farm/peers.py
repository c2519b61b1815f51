"""Fetching what the peers measured (the I/O shell of `ledger`).

Every EXCHANGE_INTERVAL each `--peer` is asked, all at once and each within
EXCHANGE_TIMEOUT, for the entries of its ledger after the last answer
(`GET /footprints?since=G` on its --metrics port); what comes back is learned
into this box's book. A peer that is down, slow or answers garbage is logged
once when it starts failing (and once when it answers again) and skipped:
nothing waits on a peer but its own exchange, and admission never does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gatekeeper.farm.ledger import MAX_ANSWER, MAX_GENERATION, Cursor, decode
from gatekeeper.farm.view import sanitize
from gatekeeper.footprints import FootprintBook, read_state_file, write_state_file
from gatekeeper.net.addresses import TcpAddress
from gatekeeper.observe.escape import printable

log = logging.getLogger("gatekeeper")

# How often each peer is asked: a compile measured anywhere is known
# everywhere within this (issue 20). An answer with nothing new is ~90 bytes;
# with a few hundred peers that is a few hundred small requests per interval.
EXCHANGE_INTERVAL = 10.0
# One exchange, connect to last byte: a peer on a farm's LAN answers in
# milliseconds; one that takes seconds is skipped this round.
EXCHANGE_TIMEOUT = 5.0
# Pages fetched from one peer in one round (ledger.PAGE entries each): a new
# box catches up on 8,192 entries per round, the rest the next rounds.
PAGES_PER_ROUND = 4
# An answer's HTTP head is small; past this plus MAX_ANSWER it is not ours.
MAX_HEAD = 4096
# A peer's /status for the farm view: the queue and job views are bounded at
# 200 entries each (observe/status.py), some 60 KiB; 1 MiB is room to spare.
MAX_STATUS = 2**20
# Where the cursors are kept beside the book (--state-dir).
STATE_FILE = "peers.json"


@dataclass(slots=True)
class Peer:
    address: TcpAddress
    cursor: Cursor = field(default_factory=Cursor)
    failing: str | None = None
    """Why the last exchange failed (None: it answered)."""
    learned: int = 0
    """Entries learned from it since start."""
    last_ok: float | None = None
    status: dict[str, object] | None = None
    """Its last /status, cut down to what the farm view shows (farm/view.py)."""


class Peers:
    def __init__(self, addresses: Sequence[TcpAddress], book: FootprintBook, *,
                 ceiling: int, interval: float = EXCHANGE_INTERVAL,
                 on_learned: Callable[[], None] = lambda: None,
                 own_epoch: str | None = None) -> None:
        self.peers = [Peer(a) for a in addresses]
        self.own_epoch = own_epoch
        """This box's ledger's epoch: a --peer that answers with it is this box
        itself (a farm-wide peer list), and is skipped."""
        self.dirty = False
        self.book = book
        self.ceiling = ceiling
        self.interval = interval
        self.on_learned = on_learned
        """Called after a round that learned something (queued jobs are
        estimated again)."""
        self._round = trio.Event()

    async def run(self) -> None:
        while True:
            await self.exchange_all()
            await trio.sleep(self.interval)

    async def exchange_all(self) -> None:
        learned_before = sum(p.learned for p in self.peers)
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                nursery.start_soon(self._exchange, peer)
        if sum(p.learned for p in self.peers) != learned_before:
            self.on_learned()
        self._round.set()
        self._round = trio.Event()

    async def next_round(self) -> None:
        """Until the next round of exchanges has ended (for tests and tools)."""
        await self._round.wait()

    async def _exchange(self, peer: Peer) -> None:
        why: str | None = f"no answer within {EXCHANGE_TIMEOUT:g}s"
        with trio.move_on_after(EXCHANGE_TIMEOUT):
            try:
                for _ in range(PAGES_PER_ROUND):
                    body = await fetch(peer.address, f"/footprints?since={peer.cursor.query()}")
                    answer = decode(body, ceiling=self.ceiling)
                    if self.own_epoch is not None and answer.epoch == self.own_epoch:
                        raise ValueError("that is this box itself; skipped")
                    self.dirty = True
                    for entry in peer.cursor.take(answer):
                        self.book.learn_from_peer(entry.key, entry.peak, entry.unit, entry.size)
                        peer.learned += 1
                    if not answer.more:
                        break
                status = json.loads(await fetch(peer.address, "/status", limit=MAX_STATUS),
                                    parse_constant=_no_constant)
                if not isinstance(status, dict):
                    raise ValueError("its /status is not a JSON object")
                peer.status = sanitize(status)
                why = None
            except (OSError, ValueError, RecursionError, trio.BrokenResourceError) as e:
                # (Our own words and numbers: what a peer sent is quoted only
                # escaped, in `fetch`.)
                why = (str(e) or type(e).__name__)[:200]
        if why is None:
            peer.last_ok = trio.current_time()
            if peer.failing is not None:
                log.info("peer %s answers again", peer.address)
        elif peer.failing is None:
            log.warning("peer %s: %s; skipped until it answers", peer.address, why)
        peer.failing = why


    # -- the cursors, beside the book ----------------------------------------

    def save(self, state_dir: Path) -> None:
        """Atomically, like the book."""
        write_state_file(state_dir, STATE_FILE, {"format": 1, "cursors": {
            str(p.address): [p.cursor.epoch, p.cursor.generation] for p in self.peers
            if p.cursor.epoch is not None}})
        self.dirty = False

    def load(self, state_dir: Path) -> None:
        """Where each peer's ledger was read up to, as saved with the book; a
        missing or bad file is a fresh start (peers read from their start)."""
        path = state_dir / STATE_FILE
        try:
            data = json.loads(read_state_file(path))
            cursors = data.get("cursors") if isinstance(data, dict) else None
            if not isinstance(cursors, dict) or data.get("format") != 1:
                raise ValueError("not a gatekeeper peers file of format 1")
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as e:
            log.warning("ignoring peer cursors in %s: %s", path, str(e)[:200])
            return
        for peer in self.peers:
            saved = cursors.get(str(peer.address))
            if (isinstance(saved, list) and len(saved) == 2 and isinstance(saved[0], str)
                    and 0 < len(saved[0]) <= 64 and type(saved[1]) is int
                    and 0 <= saved[1] <= MAX_GENERATION):
                peer.cursor.epoch, peer.cursor.generation = saved[0], saved[1]

    def view(self) -> list[dict[str, object]]:
        """The farm as this box last saw it (`/farm`): each peer, whether it
        answered, and its /status."""
        now = trio.current_time()
        return [{"address": str(p.address), "ok": p.failing is None, "error": p.failing,
                 "learned": p.learned,
                 "age_seconds": round(now - p.last_ok, 1) if p.last_ok is not None else None,
                 "status": p.status} for p in self.peers]


async def fetch(address: TcpAddress, path: str, *, limit: int = MAX_ANSWER) -> bytes:
    """GET `path` (HTTP/1.0) and the body of a 200 answer; OSError or
    ValueError for anything else. Reads at most MAX_HEAD + `limit` bytes."""
    assert address.host is not None
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        # No Host header (HTTP/1.0): the peer's /status refuses names it does
        # not know as its own, and a farm may name a peer by an alias.
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = bytearray()
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_HEAD + limit:
                raise ValueError("answer too long")
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("not an HTTP answer")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or not status[0].startswith(b"HTTP/"):
        raise ValueError("not an HTTP answer")
    if status[1] != b"200":
        raise ValueError(f"HTTP {printable(status[1][:3].decode('latin-1'))}")
    return body


def _no_constant(name: str) -> object:
    """json: NaN and Infinity are not JSON (a browser's JSON.parse refuses them)."""
    raise ValueError(f"{name} in a peer's /status")
