"""Pictures: the SVG is well-formed and shows every op; the text form shows the bubble."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from haillm.pipeline import (
    OpRecord,
    Timeline,
    draw_timeline,
    format_timeline,
    schedule_1f1b,
    schedule_interleaved_1f1b,
    simulate,
)

NS = "{http://www.w3.org/2000/svg}"


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3))
def test_svg_has_one_box_per_op(p, groups, v):
    m = p * groups
    tl = simulate([schedule_interleaved_1f1b(p, m, s, v) for s in range(p)])
    root = ET.fromstring(draw_timeline(tl))
    boxes = [r for r in root.iter(f"{NS}rect") if r.find(f"{NS}title") is not None]
    assert len(boxes) == len(tl.ops) == 2 * p * m * v
    titles = {r.find(f"{NS}title").text.split(" [")[0] for r in boxes}
    assert titles == {f"stage {o.stage} {o.action}" for o in tl.ops}


def test_text_form_shows_bubble_and_order(tmp_path):
    tl = simulate([schedule_1f1b(2, 3, s) for s in range(2)])
    text = format_timeline(tl)
    assert text.splitlines() == [
        "stage 0 |F0 F1 ......B0    F2 B1    ...B2    |",
        "stage 1 |...F0 B0    F1 B1    F2 B2    ......|",
    ]
    out = tmp_path / "t.svg"
    draw_timeline(tl, out, title="1F1B")
    assert "1F1B" in out.read_text()


def test_measured_timeline_with_gaps():
    """A timeline built from recorded timestamps (as `gather_timeline` returns)."""
    from haillm.pipeline import Action

    ops = [
        OpRecord(0, Action("F", 0), 10.0, 10.5), OpRecord(0, Action("B", 0), 12.0, 13.0),
        OpRecord(1, Action("F", 0), 10.6, 11.0), OpRecord(1, Action("B", 0), 11.0, 11.9),
    ]
    tl = Timeline(ops, 2)
    assert tl.makespan == 3.0
    assert abs(tl.bubble_fraction - (1 - (1.5 + 1.3) / 6.0)) < 1e-12
    assert tl.peak_inflight == [1, 1]
    ET.fromstring(draw_timeline(tl, time_unit="s"))
    assert format_timeline(tl).count("\n") == 1
