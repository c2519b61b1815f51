"""The memory bench's timeline picture (bench/timeline.py): states folded into
bars, OOM kills found, and a well-formed SVG whose names are escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bench.timeline import Sample, bars_from_compiles, bars_from_samples, kills_at, render

MiB = 2**20


def samples() -> list[Sample]:
    states = [{"a.o": "running", "<b>.o": "waiting"}, {"a.o": "running", "<b>.o": "running"},
              {"a.o": "running", "<b>.o": "paused"}, {"<b>.o": "running"}]
    return [Sample(0.1 * i, (100 + 50 * i) * MiB, 0 if i < 2 else 1, reserved=10 * MiB,
                   jobs=jobs) for i, jobs in enumerate(states)]


def test_states_fold_into_one_segment_per_run_of_a_state() -> None:
    bars = {b.name: b.segments for b in bars_from_samples(samples())}
    assert [s[2] for s in bars["a.o"]] == ["running"]
    assert [s[2] for s in bars["<b>.o"]] == ["waiting", "running", "paused", "running"]
    start, end, _ = bars["a.o"][0]
    assert start == 0.0 and abs(end - 0.3) < 1e-9


def test_kills_are_found_where_the_count_rises() -> None:
    assert kills_at(samples()) == [0.2]


def test_the_svg_is_well_formed_and_escapes_names() -> None:
    svg = render("a1: <distccd>", samples(), bars_from_samples(samples()), 300 * MiB)
    root = ET.fromstring(svg)
    texts = [e.text for e in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "a1: <distccd>" in texts and "OOM kill" in texts
    titles = [e.text or "" for e in root.iter("{http://www.w3.org/2000/svg}title")]
    assert any(t.startswith("<b>.o: paused") for t in titles)
    compiles = bars_from_compiles([(2_000_000_000, 3_000_000_000, 0),
                                   (2_500_000_000, 4_000_000_000, -9)], 1_000_000_000)
    assert [b.segments[0][:2] for b in compiles] == [(1.0, 2.0), (1.5, 3.0)]
    assert [b.killed_at for b in compiles] == [None, 3.0]
    ET.fromstring(render("a", [], compiles, 300 * MiB))  # no samples: still a picture
