"""Pictures of a `Timeline`: a hand-written SVG (no plotting library) and a terminal form.

Both work for simulated timelines (`simulate`) and measured ones
(`PipelineExecutor.gather_timeline`). Rows are stages, the x axis is time; forwards are blue,
backwards orange (later chunks of an interleaved schedule in darker shades), each box carries
its micro-batch number, and the grey background left uncovered is the pipeline bubble.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from .simulate import Timeline

__all__ = ["draw_timeline", "format_timeline"]

# Forward: blues, backward: oranges; one shade per chunk (darker = later chunk).
_FWD = ["#5b9bd5", "#2e75b6", "#1f4e79", "#0b2a45"]
_BWD = ["#f4b183", "#ed7d31", "#c55a11", "#843c0c"]


def _label(op, v: int) -> str:
    return f"{op.action.microbatch}" + (f".{op.action.chunk}" if v > 1 else "")


def _text_label(op) -> str:
    # Terminal form: chunk 0 upper case (F3, B3), chunk 1 lower case (f3, b3), alternating.
    kind = op.action.kind if op.action.chunk % 2 == 0 else op.action.kind.lower()
    return f"{kind}{op.action.microbatch}"


def draw_timeline(
    timeline: Timeline,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    width: int = 900,
    row_height: int = 26,
    time_unit: str = "",
) -> str:
    """Render ``timeline`` as an SVG document (stages x time).

    Args:
        timeline: from `simulate` or a real run.
        path: if given, the SVG is also written there.
        title: headline; by default the schedule's bubble fraction and peak in-flight counts.
        width: drawing width in pixels (the time axis is scaled to fit).
        row_height: pixels per stage.
        time_unit: appended to the axis ticks (e.g. ``"ms"``).

    Returns:
        the SVG text.
    """
    p, v = timeline.num_stages, timeline.num_chunks
    t0, span = timeline.start, timeline.makespan or 1.0
    left, right, top = 64, 12, 44
    plot_w = width - left - right
    height = top + p * row_height + 44
    sx = plot_w / span

    def x(t: float) -> float:
        return left + (t - t0) * sx

    if title is None:
        title = (
            f"bubble {timeline.bubble_fraction:.1%} · peak in-flight per stage "
            f"{timeline.peak_inflight}"
        )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="13" fill="#222">{escape(title)}</text>',
    ]
    for s in range(p):
        y = top + s * row_height
        # The row background shows through wherever the stage idles: that is the bubble.
        out.append(
            f'<rect x="{left}" y="{y + 2}" width="{plot_w:.1f}" height="{row_height - 4}" '
            'fill="#e7e6e6"/>'
        )
        out.append(
            f'<text x="{left - 8}" y="{y + row_height / 2 + 4}" font-size="12" '
            f'text-anchor="end">stage {s}</text>'
        )
        for op in timeline.stage_ops(s):
            colors = _FWD if op.action.kind == "F" else _BWD
            col = colors[min(op.action.chunk, len(colors) - 1)]
            x0, w = x(op.start), max((op.end - op.start) * sx, 0.5)
            out.append(
                f'<rect x="{x0:.2f}" y="{y + 2}" width="{w:.2f}" height="{row_height - 4}" '
                f'fill="{col}" stroke="white" stroke-width="0.8"><title>stage {s} {op.action} '
                f'[{op.start - t0:.4g}, {op.end - t0:.4g}]</title></rect>'
            )
            font = min(11, row_height - 12)
            label = _label(op, v)
            if w < 0.62 * font * len(label) + 2:
                label = str(op.action.microbatch)  # chunk left to the colour
            if w >= 0.62 * font * len(label) + 2:  # only where the number fits
                text_col = "white" if op.action.kind == "F" or op.action.chunk > 0 else "#222"
                out.append(
                    f'<text x="{x0 + w / 2:.2f}" y="{y + row_height / 2 + font / 3:.1f}" '
                    f'font-size="{font}" text-anchor="middle" fill="{text_col}">{label}</text>'
                )
    # Time axis with ~6 ticks.
    ya = top + p * row_height + 6
    out.append(f'<line x1="{left}" y1="{ya}" x2="{left + plot_w}" y2="{ya}" stroke="#444"/>')
    for k in range(7):
        t = span * k / 6
        out.append(f'<line x1="{x(t0 + t):.1f}" y1="{ya}" x2="{x(t0 + t):.1f}" y2="{ya + 4}" '
                   'stroke="#444"/>')
        anchor = "end" if k == 6 else "middle"  # keep the last label inside the picture
        out.append(f'<text x="{x(t0 + t):.1f}" y="{ya + 16}" font-size="11" '
                   f'text-anchor="{anchor}">{t:.3g}{escape(time_unit)}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{ya + 32}" font-size="11" text-anchor="middle" '
               'fill="#555">time (grey: idle = pipeline bubble)</text>')
    # Legend: forward / backward swatches, bottom left.
    for i, (name, col) in enumerate((("forward", _FWD[0]), ("backward", _BWD[0]))):
        out.append(f'<rect x="{left + 95 * i}" y="{ya + 23}" width="12" height="12" fill="{col}"/>')
        out.append(f'<text x="{left + 95 * i + 16}" y="{ya + 33}" font-size="12">{name}</text>')
    out.append("</svg>")
    svg = "\n".join(out) + "\n"
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(svg)
    return svg


def format_timeline(timeline: Timeline, *, max_width: int = 160) -> str:
    """A compact text picture: one line per stage, ``.`` where the stage idles.

    Each action is drawn as ``F3`` / ``B3`` (``f3`` / ``b3`` for odd chunks of an
    interleaved schedule) followed by spaces,
    proportionally to its duration, e.g. for 1F1B with p = 2, m = 3 (forward 1, backward 2)::

        stage 0 |F0 F1 ...B0    F2 B1    ...B2    |
        stage 1 |...F0 B0    F1 B1    F2 B2    ...|
    """
    p = timeline.num_stages
    ops = timeline.ops
    if not ops:
        return "\n".join(f"stage {s} ||" for s in range(p))
    shortest = min(o.end - o.start for o in ops if o.end > o.start) if any(
        o.end > o.start for o in ops) else 1.0
    label_w = max(len(_text_label(o)) for o in ops) + 1
    scale = label_w / shortest  # characters per time unit: the shortest op fits its label
    if timeline.makespan * scale > max_width:
        scale = max_width / timeline.makespan
    ncols = max(1, round(timeline.makespan * scale))
    t0 = timeline.start
    lines = []
    for s in range(p):
        row = ["."] * ncols
        for o in timeline.stage_ops(s):
            a = round((o.start - t0) * scale)
            b = max(a + 1, round((o.end - t0) * scale))
            text = _text_label(o).ljust(b - a)[: b - a]
            row[a:b] = list(text)
        lines.append(f"stage {s} |{''.join(row[:ncols])}|")
    return "\n".join(lines)
