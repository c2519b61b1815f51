"""What this box measured, for its peers to fetch; what a peer's answer holds.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).

A director spreads a file's compiles over N boxes, so each box alone sees it
once every N builds (issue 20). So every box keeps a ledger of the peaks *it*
measured, each entry stamped with a generation number, and serves the
entries after a generation to its peers (`/footprints?since=G` on its
--metrics port). A peer asks for what is new since its last answer and
learns each entry as if it had measured it (`FootprintBook.learn_from_peer`).

- Only a box's own measurements are in its ledger: what it learned from a
  peer is never passed on, so nothing echoes round a farm and every entry
  travels from the box that measured it straight to each peer, once.
- An epoch (random, per start) tells a restarted peer from one that has
  moved on: a new epoch starts that peer's cursor again at 0.
- Bounded: the ledger keeps each key's latest entry only, MAX_ENTRIES keys
  (oldest dropped); an answer holds at most PAGE entries (`more` says there
  are more, and the peer asks again at once); parsing an answer refuses
  anything past MAX_ANSWER bytes or not exactly as written here.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

FORMAT: Final = 1
# Keys kept: as many as a book (footprints.MAX_KEYS).
MAX_ENTRIES: Final = 20_000
# Entries per answer: 2,048 entries of ~60 bytes, ~120 KB; a cold farm-wide
# build of a large tree (LLVM: ~7,000 files) reaches a new peer in 4 answers.
PAGE: Final = 2048
# An answer's largest size: PAGE entries at their longest (a 64-byte key, a
# 12-digit peak, the unit, a 16-digit size: ~110 bytes) is ~230 KB; 1 MiB is
# room to spare, and more is not a gatekeeper talking.
MAX_ANSWER: Final = 2**20
MAX_KEY_LEN: Final = 64
UNITS: Final = ("plain", "lzo", "pump")
MAX_SIZE: Final = 2**50
# A generation past this is not a ledger's (the /footprints route reads at most
# 18 digits).
MAX_GENERATION: Final = 10**18 - 1


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    peak: int
    unit: str | None = None
    """The request size's unit (identity.Features.encoding), if it was known."""
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    epoch: str
    generation: int
    """The last generation in `entries` (or the ledger's, if none)."""
    entries: tuple[Entry, ...]
    more: bool


class Ledger:
    """This box's own measurements, in the order it made them."""

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.generation = 0
        self._entries: OrderedDict[str, tuple[int, Entry]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, entry: Entry) -> None:
        self.generation += 1
        self._entries.pop(entry.key, None)
        self._entries[entry.key] = (self.generation, entry)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    def since(self, generation: int, *, page: int = PAGE) -> Answer:
        """The entries after `generation`, oldest first, at most `page`."""
        out: list[Entry] = []
        last = generation
        more = False
        # Entries are in generation order (a re-recorded key moves to the end).
        for gen, entry in reversed(self._entries.values()):
            if gen <= generation:
                break
            out.append(entry)
        out.reverse()
        if len(out) > page:
            out, more = out[:page], True
        if out:
            last = self._entries[out[-1].key][0]
        else:
            last = max(generation, 0) if generation <= self.generation else self.generation
        return Answer(self.epoch, last, tuple(out), more)


def encode(answer: Answer) -> bytes:
    return json.dumps({
        "format": FORMAT, "epoch": answer.epoch, "generation": answer.generation,
        "more": answer.more,
        "entries": [[e.key, e.peak, e.unit, e.size] for e in answer.entries],
    }, separators=(",", ":")).encode()


def decode(data: bytes, *, ceiling: int) -> Answer:
    """A peer's answer; ValueError (why) for anything not exactly as `encode`
    writes it, past the bounds, or with a peak above `ceiling` (this box's
    memory: not a measurement it could use)."""
    if len(data) > MAX_ANSWER:
        raise ValueError(f"answer of {len(data)} bytes, more than {MAX_ANSWER}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {str(e)[:80]}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT \
            or type(doc.get("format")) is not int:
        raise ValueError(f"not a footprint answer of format {FORMAT}")
    epoch, generation, more, raw = (doc.get("epoch"), doc.get("generation"),
                                    doc.get("more"), doc.get("entries"))
    if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        raise ValueError("bad epoch")
    if type(generation) is not int or not 0 <= generation <= MAX_GENERATION:
        raise ValueError("bad generation")
    if type(more) is not bool or not isinstance(raw, list) or len(raw) > PAGE:
        raise ValueError("bad entries")
    entries = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 4:
            raise ValueError("bad entry")
        key, peak, unit, size = item
        if type(peak) is not int or (size is not None and type(size) is not int):
            raise ValueError("bad entry")
        # Well formed but of no use here -- a peak above this box's memory (a
        # bigger peer measured it), a unit or key from a newer version --:
        # skipped, and the cursor still moves past it. (Rejecting the answer
        # would stop all learning from that peer at this entry, for good.)
        if (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN
                or not 0 < peak <= ceiling or (unit is not None and unit not in UNITS)
                or (size is not None and not 0 < size <= MAX_SIZE)):
            continue
        entries.append(Entry(key, peak, unit, size))
    return Answer(epoch, generation, tuple(entries), more)


class Cursor:
    """Where this box is in one peer's ledger. Saved beside the book
    (`farm.peers.Peers.save`): a box that restarts on its saved book must not
    learn its peers' ledgers again from the start (each key keeps only its
    last three peaks: repeats would push out real ones)."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.generation = 0

    def query(self) -> int:
        return self.generation

    def take(self, answer: Answer) -> tuple[Entry, ...]:
        """The entries to learn from `answer` (to a query made with `query`):
        all of them, unless the peer restarted since the query was made, then
        the cursor starts again and this answer (after an old generation in a
        new ledger) is dropped; the next query asks from 0."""
        if self.epoch is not None and answer.epoch != self.epoch:
            self.epoch, self.generation = answer.epoch, 0
            return ()
        self.epoch = answer.epoch
        if answer.generation < self.generation:
            # Not the same ledger moving forward (a peer must never go back): start again.
            self.generation = 0
            return ()
        self.generation = answer.generation
        return answer.entries
