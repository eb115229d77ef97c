"""Draw the tutorial's timeline pictures (simulated schedules) into docs/tutorials/img/.

    uv run python benchmarks/pipeline_pictures.py
"""

from __future__ import annotations

from pathlib import Path

from haillm.pipeline import (
    draw_timeline,
    schedule_1f1b,
    schedule_gpipe,
    schedule_interleaved_1f1b,
    simulate,
)

IMG = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img"


def main() -> None:
    p, m = 4, 8
    cases = {
        "gpipe": ("GPipe", [schedule_gpipe(p, m, s) for s in range(p)]),
        "1f1b": ("1F1B", [schedule_1f1b(p, m, s) for s in range(p)]),
        "interleaved": (
            "interleaved 1F1B, v=2",
            [schedule_interleaved_1f1b(p, m, s, 2) for s in range(p)],
        ),
    }
    for name, (label, scheds) in cases.items():
        tl = simulate(scheds, forward_time=1.0, backward_time=2.0)
        title = (f"{label}: p={p}, m={m}, t_B = 2 t_F · bubble {tl.bubble_fraction:.1%} · "
                 f"peak in-flight {tl.peak_inflight}")
        draw_timeline(tl, IMG / f"pipeline-{name}.svg", title=title)
        print(f"wrote {IMG / f'pipeline-{name}.svg'}: {title}")


if __name__ == "__main__":
    main()
