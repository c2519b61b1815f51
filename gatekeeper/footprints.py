"""What jobs are expected to need: footprints learned from measured peaks.

One file needs 40 MB, the next 900 MB: a single static figure either wastes
the box or kills compilers. So every finished job's measured peak is kept
under its identity (for distcc: the command line, see `distcc_request`), and
a rebuild of the same tree knows each file's peak before admitting it. Jobs
never seen before get a high percentile of recent peaks, seeded by
``--job-mem-mb`` until enough have been seen.

The book is bounded (least recently used keys are dropped), adapts (an
estimate is the largest of a key's last few peaks, so a file that got lighter
is believed after a few builds), and survives restarts through an atomic JSON
file in ``--state-dir``. A missing or corrupt file is logged and ignored:
learning starts again, nothing fails.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import os
import stat
import tempfile
from collections import OrderedDict, deque
from pathlib import Path
from typing import NamedTuple

from gatekeeper.distcc.identity import Features
from gatekeeper.prediction import MAX_SIZE, SAFE_QUANTILE, TYPICAL_QUANTILE, PeakModel

log = logging.getLogger("gatekeeper")

# The last three peaks of a key: enough to ride out run-to-run jitter, few
# enough that a file that got lighter is believed after three builds.
PEAKS_PER_KEY = 3
# A key's margin on top of its largest recent peak comes from the spread of
# its own peaks (`margin`): (largest - smallest) / largest, within these bounds.
# MIN_MARGIN: g++ -O2 on one C++ file, five runs, each in its own memory cgroup,
# peaked within 0.35 % of each other (200.8-201.5 MiB); 2 % covers that and the
# meter's own error (sampled private memory was 1.1 % under the cgroup's peak).
# FIRST_MARGIN: one peak shows no spread yet: 5 %, twice the worst error seen
# (a sampled peak 2.6 % under its cgroup's, test_job_cgroups; cgroup peaks
# repeat within 0.35 %), until a second run says more. MAX_MARGIN: a key whose
# peaks differ by more than half is not one compile (a generated file, a -D
# that changed): half again covers it until its old peaks age out.
MIN_MARGIN = 0.02
FIRST_MARGIN = 0.05
MAX_MARGIN = 0.50
# The unknown-job estimate's margin over its percentile: not one compile's
# jitter but a guess about a file never seen, so the old 10 %.
MARGIN = 0.10
# 20,000 compile identities cover a large tree (LLVM has about 7,000 files)
# in well under 10 MB of memory and state file.
MAX_KEYS = 20_000
# The distribution for unknown jobs: the last 512 peaks, read at the 99th
# percentile; before 8 peaks have been seen the seed stands. Why so high: the
# jobs that hurt are the rare heavy ones. In the memory bench heavy files were
# 8 % of the jobs; at the 90th percentile a new heavy file was estimated as a
# light one, two started together and were OOM-killed (3 of 104 compiles, cold);
# the maximum gave no kills. The 99th keeps that safety while one freak peak in
# 100 does not make every new job look huge.
RECENT = 512
PERCENTILE = 0.99
MIN_SAMPLES = 8
# Where a wrong guess costs a pause, not a kill (pausing on, and a way to freeze
# each job: pauses.py), an unknown job is estimated as a typical one: the median
# of recent peaks. A heavier one is frozen when memory runs out and goes on
# when its neighbours end -- the worst case costs the time the 99th percentile
# would have made every unknown job wait (issue 18's mixed bench: the heavy
# files were 3 of 17, so the 99th percentile let one compile run at a time).
TYPICAL_PERCENTILE = 0.5
# ...and read from 3 peaks on, not 8: a median is a fair guess from three,
# where the 99th percentile needs many; a cold build whose first jobs were
# held on the seed (256 MiB each) runs one at a time until then.
MIN_TYPICAL_SAMPLES = 3

# A compile killed at X bytes needed more than X: how much more is unknown, so
# guess half again as much (a growing compiler is usually well past half its
# peak by the time it is killed). Too high only costs waiting; too low, a kill.
CUT_SHORT_GROWTH = 1.5

# A key's expected duration (for backfilling, backfill.py) is its longest recent
# run plus this: a duration guessed short lets a backfilled job delay the head,
# one guessed long only backfills less. Run-to-run spread of one compile on a
# shared 2-core box: a few percent, at times 30 % (issue 18's bench rounds).
DURATION_MARGIN = 0.25
# Durations in a state file above a day are not compile times.
MAX_SECONDS = 86_400.0

# A key's learned peaks are not trusted for a job whose request differs from
# the one they were learned with by more than this factor (same size unit):
# two projects' `main.cc` with the same flags share a portable key
# (identity.py), and a file edited beyond recognition is a new compile. Same
# file from two checkouts: the line markers' paths differ by a few bytes each
# (fmtlib's format.cc: 0.02 %); a real edit moves it by a few percent.
SIZE_DRIFT = 1.25

STATE_FILE = "footprints.json"
# 1: keys hashed whole command lines; 2: portable keys (identity.py), request
# sizes per key, the cold-estimate model's pairs. A format-1 file's keys are
# dropped (they cannot be turned into portable ones); its recent peaks are kept.
FORMAT = 2
# The state file is read whole, so it is capped: a full book (MAX_KEYS keys of
# 3 peaks near 100 GB each, their run times and request sizes, and a full
# cold-estimate model, every name and number at its longest) writes 4,363,511
# bytes (measured by tests/test_footprints.py, which builds one; 1,226,176
# before issue 19 added sizes and the model), so 8 MiB is room to spare, and a
# 100 MB file (1.33 GB of RSS and 10.8 s to parse before this cap) is refused unread.
MAX_STATE_BYTES = 8 * 2**20
# A key is the compile's blake2b digest (20 hex digits); anything far longer
# did not come from us.
MAX_KEY_LEN = 64


class Source(enum.Enum):
    """Where an estimate came from (the end line's `est_from=`)."""

    LEARNED = "learned"
    """The key's own measured peaks."""
    PREDICTED = "predicted"
    """The request's size and kind, through the cold-estimate model."""
    DEFAULT = "default"
    """The distribution of recent peaks, or --job-mem-mb before it."""


class Estimate(NamedTuple):
    bytes: int
    source: Source


class FootprintBook:
    def __init__(self, seed: int, *, max_keys: int = MAX_KEYS,
                 percentile: float = PERCENTILE, min_samples: int = MIN_SAMPLES) -> None:
        if not 0 < percentile <= 1:
            raise ValueError("percentile must be in (0, 1]")
        if min_samples < 1:
            raise ValueError("min_samples must be at least 1")
        self.min_samples = min_samples
        """Peaks seen before `percentile` replaces the seed."""
        self.seed = seed
        self.max_keys = max_keys
        self.percentile = percentile
        """Where unknown jobs are read in the recent peaks' distribution."""
        self._peaks: OrderedDict[str, list[int]] = OrderedDict()
        self._seconds: dict[str, list[float]] = {}
        """Each key's last few run times (keys of `_peaks` only)."""
        self._recent: deque[int] = deque(maxlen=RECENT)
        self._unknown_cache: dict[float, int] = {}
        self._sizes: dict[str, tuple[str, int]] = {}
        """Each key's last request size and its unit (keys of `_peaks` only)."""
        self.model = PeakModel()
        self.converted = 0
        """Keys of an older format dropped by the last load."""
        self.dirty = False

    def __len__(self) -> int:
        return len(self._peaks)

    def estimate(self, key: str | None) -> int:
        """Expected peak bytes of a job with this identity (None: unidentified)."""
        if key is not None:
            peaks = self._peaks.get(key)
            if peaks:
                self._peaks.move_to_end(key)
                return int(max(peaks) * (1 + margin(peaks)))
        return self.unknown_estimate()

    def judge(self, key: str | None, feats: Features | None = None) -> Estimate:
        """The estimate for a job and where it came from: the key's own peaks
        if known (and its request is about the size they were learned with),
        else the model's prediction from the head's features, else the
        distribution of recent peaks."""
        if key is not None and key in self._peaks and not self._drifted(key, feats):
            return Estimate(self.estimate(key), Source.LEARNED)
        if feats is not None:
            quantile = SAFE_QUANTILE if self.percentile >= PERCENTILE else TYPICAL_QUANTILE
            predicted = self.model.predict(feats, quantile, ceiling=self.ceiling())
            if predicted is not None:
                return Estimate(predicted, Source.PREDICTED)
        return Estimate(self.unknown_estimate(), Source.DEFAULT)

    def ceiling(self) -> int:
        """No prediction above what the box (or the job's kind: prediction.py)
        has seen a job need, plus MARGIN (the seed before anything was seen)."""
        return int(max(self._recent) * (1 + MARGIN)) if self._recent else self.seed

    def _drifted(self, key: str, feats: Features | None) -> bool:
        """The job's request is not about the size the key was learned with.
        Not judged in pump mode: its size is extrapolated from the files that
        came in the first look, which vary from run to run."""
        if feats is None or feats.size is None or feats.encoding == "pump":
            return False
        known = self._sizes.get(key)
        if known is None or known[0] != feats.encoding:
            return False
        return not known[1] / SIZE_DRIFT <= feats.size <= known[1] * SIZE_DRIFT

    def duration(self, key: str | None, feats: Features | None = None) -> float | None:
        """Expected run time of a job with this identity (None: never seen run
        to its end, or its request is not the one the key was learned with)."""
        if key is None or self._drifted(key, feats):
            return None
        runs = self._seconds.get(key)
        return max(runs) * (1 + DURATION_MARGIN) if runs else None

    def knows(self, key: str | None) -> bool:
        return key is not None and key in self._peaks

    def unknown_estimate(self) -> int:
        """A job never seen: the book's percentile of recent peaks plus MARGIN,
        or the seed until `min_samples` were seen."""
        return self._unknown_at(self.percentile, self.min_samples)

    def _unknown_at(self, at: float, min_samples: int) -> int:
        cached = self._unknown_cache.get(at)
        if cached is None:
            if len(self._recent) < min_samples:
                cached = self.seed
            else:
                ordered = sorted(self._recent)
                index = min(len(ordered) - 1, max(0, math.ceil(at * len(ordered)) - 1))
                cached = int(ordered[index] * (1 + MARGIN))
            self._unknown_cache[at] = cached
        return cached

    def worst_unknown(self) -> int:
        """What a job never seen may need, read conservatively (PERCENTILE),
        whatever the book's own percentile: what a job that outgrew a typical
        estimate may still grow to (pauses.py)."""
        return self._unknown_at(PERCENTILE, MIN_SAMPLES)

    def learn(self, key: str | None, peak: int, *, seconds: float | None = None,
              feats: Features | None = None) -> None:
        """Record a finished job's measured peak (and how long it ran, and what
        its head said)."""
        if peak <= 0:
            return
        self._recent.append(peak)
        self._unknown_cache.clear()
        self.dirty = True
        if feats is not None:
            self.model.learn(feats, peak)
        if key is not None:
            if key in self._peaks and self._drifted(key, feats):
                # Another compile under the same identity: start it afresh.
                del self._peaks[key]
                self._seconds.pop(key, None)
            self._remember(key, peak)
            if feats is not None and feats.size is not None and 0 < feats.size <= MAX_SIZE:
                self._sizes[key] = (feats.encoding, feats.size)
            if seconds is not None and 0 < seconds <= MAX_SECONDS:
                self._seconds[key] = [*self._seconds.get(key, [])[-(PEAKS_PER_KEY - 1):],
                                      seconds]

    def learn_from_peer(self, key: str, peak: int, unit: str | None = None,
                        size: int | None = None) -> None:
        """A peak a peer measured (farm/ledger.py), learned by the same rule as
        this box's own for the key: it informs the key's estimate only, never
        the unknown-job distribution (each box keeps its own) nor the model."""
        if peak <= 0:
            return
        self.dirty = True
        feats_size = size if unit is not None and size is not None and 0 < size <= MAX_SIZE \
            else None
        if key in self._peaks and unit is not None and feats_size is not None:
            known = self._sizes.get(key)
            if (known is not None and known[0] == unit and unit != "pump"
                    and not known[1] / SIZE_DRIFT <= feats_size <= known[1] * SIZE_DRIFT):
                del self._peaks[key]  # another compile under this identity
                self._seconds.pop(key, None)
        self._remember(key, peak)
        if unit is not None and feats_size is not None:
            self._sizes[key] = (unit, feats_size)

    def _remember(self, key: str, peak: int) -> None:
        """Append a peak to the key's last few, most recently used, within bounds."""
        peaks = self._peaks.pop(key, [])
        self._peaks[key] = [*peaks[-(PEAKS_PER_KEY - 1):], peak]
        while len(self._peaks) > self.max_keys:
            old, _ = self._peaks.popitem(last=False)
            self._seconds.pop(old, None)
            self._sizes.pop(old, None)

    def learn_cut_short(self, key: str | None, peak: int) -> None:
        """A job killed before its end (the OOM killer) reached `peak` and needed
        more. Its identity is remembered as needing `CUT_SHORT_GROWTH` times
        that, so the next run waits for room instead of meeting the same end;
        a run that completes replaces the guess within `PEAKS_PER_KEY` runs.
        The distribution of unknown jobs is left alone: a cut-short figure is
        not a measurement."""
        if key is None or peak <= 0:
            return
        self.dirty = True
        self._remember(key, max([int(peak * CUT_SHORT_GROWTH), *self._peaks.get(key, [])]))

    # -- persistence ---------------------------------------------------

    def to_json(self) -> dict[str, object]:
        return {"format": FORMAT, "keys": dict(self._peaks), "recent": list(self._recent),
                "seconds": {k: v for k, v in self._seconds.items() if k in self._peaks},
                "sizes": {k: list(v) for k, v in self._sizes.items() if k in self._peaks},
                "model": self.model.to_json()}

    def load_json(self, data: object, *, ceiling: int) -> int:
        """Replace the learned state with `data`; raises ValueError if it is not
        a footprint file at all. Peaks that cannot be measurements (not a
        whole number, not positive, above `ceiling`, the machine's memory) are
        dropped, with the keys left without one; returns how many were."""
        if not isinstance(data, dict) or type(data.get("format")) is not int \
                or data.get("format") not in (1, FORMAT):
            raise ValueError(f"not a gatekeeper footprint file of format 1 or {FORMAT}")
        keys, recent = data.get("keys"), data.get("recent")
        if not isinstance(keys, dict) or not isinstance(recent, list):
            raise ValueError("missing keys or recent")
        old_keys = 0
        if data["format"] == 1:
            # Keys of whole command lines: no way back to the command lines, so
            # no portable keys; the measured peaks stay good for unknown jobs.
            old_keys, keys = len(keys), {}

        def measured(values: list[object]) -> list[int]:
            return [v for v in values if type(v) is int and 0 < v <= ceiling]

        dropped = 0
        peaks: OrderedDict[str, list[int]] = OrderedDict()
        for key, values in list(keys.items())[-self.max_keys:]:
            kept = measured(values[-PEAKS_PER_KEY:]) if isinstance(values, list) else []
            if (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN or not kept):
                dropped += 1
                continue
            peaks[key] = kept
        kept_recent = measured(recent[-RECENT:])
        dropped += min(len(recent), RECENT) - len(kept_recent)
        # Run times (optional: files from before them have none).
        times = data.get("seconds")
        seconds: dict[str, list[float]] = {}
        if isinstance(times, dict):
            for key, values in list(times.items())[-self.max_keys:]:
                if key in peaks and isinstance(values, list):
                    kept_times = [float(v) for v in values[-PEAKS_PER_KEY:]
                                  if type(v) in (int, float) and 0 < v <= MAX_SECONDS]
                    if kept_times:
                        seconds[key] = kept_times
        sizes: dict[str, tuple[str, int]] = {}
        known_sizes = data.get("sizes")
        if isinstance(known_sizes, dict):
            for key, value in list(known_sizes.items())[-self.max_keys:]:
                if (key in peaks and isinstance(value, list) and len(value) == 2
                        and value[0] in ("plain", "lzo", "pump") and type(value[1]) is int
                        and 0 < value[1] <= MAX_SIZE):
                    sizes[key] = (value[0], value[1])
        model = PeakModel()
        if "model" in data:
            dropped += model.load_json(data["model"], ceiling=ceiling)
        self._seconds = seconds
        self._peaks = peaks
        self._sizes = sizes
        self.model = model
        self._recent = deque(kept_recent, maxlen=RECENT)
        self._unknown_cache.clear()
        self.converted = old_keys
        return dropped

    def load(self, state_dir: Path, *, ceiling: int) -> None:
        """Load learned footprints; a missing file is a fresh start, anything
        else wrong with it is one logged line and a fresh start too. The file
        is hostile input: opened without following a symlink and without
        blocking (a FIFO), regular files only, read up to MAX_STATE_BYTES."""
        path = state_dir / STATE_FILE
        try:
            raw = read_state_file(path)
            dropped = self.load_json(json.loads(raw), ceiling=ceiling)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, RecursionError, MemoryError) as e:
            # JSONDecodeError and int-digit limits are ValueErrors; "[" x 100,000
            # is a RecursionError.
            self._peaks, self._recent, self._seconds = OrderedDict(), deque(maxlen=RECENT), {}
            self._sizes, self.model = {}, PeakModel()
            log.warning("ignoring learned footprints in %s: %s", path,
                        str(e)[:200] or type(e).__name__)
            return
        if dropped:
            log.warning("dropped %d learned footprints from %s that are not measurements "
                        "(not whole, not positive, or above the machine's %d bytes)",
                        dropped, path, ceiling)
        if self.converted:
            log.warning("dropped %d learned footprints from %s: they are keyed by whole "
                        "command lines (format 1), and jobs are now known by a portable "
                        "identity; kept its %d recent peaks for unknown jobs",
                        self.converted, path, len(self._recent))
            self.dirty = True
        log.info("loaded %d learned job footprints from %s", len(self._peaks), path)

    def save(self, state_dir: Path) -> None:
        write_state_file(state_dir, STATE_FILE, self.to_json())
        self.dirty = False


def write_state_file(state_dir: Path, name: str, document: object) -> None:
    """`document` as JSON in `state_dir/name`, atomically: a crash leaves the
    old file or the new one, never half."""
    make_private_dirs(state_dir)
    payload = json.dumps(document, separators=(",", ":")).encode()
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise



def margin(peaks: list[int]) -> float:
    """How much above its largest recent peak a key is expected to go: the
    spread of those peaks, within MIN_MARGIN..MAX_MARGIN (FIRST_MARGIN with one).
    A cut-short guess (1.5x where it died) or a peak from an older way of
    measuring (RSS, in a state file from before) widens the spread, and so the
    margin, until it ages out of the last PEAKS_PER_KEY: erring high."""
    if len(peaks) < 2:
        return FIRST_MARGIN
    top = max(peaks)
    return min(MAX_MARGIN, max(MIN_MARGIN, (top - min(peaks)) / top))


def read_state_file(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_STATE_BYTES;
    OSError or ValueError otherwise. Never follows a final symlink (ELOOP) and
    never blocks on a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_STATE_BYTES:
            raise ValueError(f"{st.st_size} bytes, more than the {MAX_STATE_BYTES} a full "
                             "book needs")
        data = f.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"more than the {MAX_STATE_BYTES} bytes a full book needs")
    return data


def state_dir_problem(path: Path) -> str | None:
    """Why `path` cannot hold the state file (made if missing, 0700), or None."""
    try:
        make_private_dirs(path)
    except OSError as e:
        return f"cannot be made: {e.strerror or e}"
    if not path.is_dir():
        return "not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


def make_private_dirs(path: Path) -> None:
    """mkdir -p, each directory it creates 0700 (learned footprints name
    compiles: nobody else's business), whatever the umask."""
    missing = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o700)
            os.chmod(p, 0o700)  # the umask may have taken bits from mkdir's mode
