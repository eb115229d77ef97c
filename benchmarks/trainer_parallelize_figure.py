"""Draw `parallelize`'s transform order: docs/tutorials/img/trainer-parallelize.svg.

    uv run python benchmarks/trainer_parallelize_figure.py

Plain SVG text (no plotting library): one box per transform, in the order
`haillm.trainer.parallelize` applies them, with the package that does the work and what the
model looks like after it.
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "img" / \
    "trainer-parallelize.svg"

STEPS = [  # (title, package, what the model is afterwards, colour)
    ("DeepSeekLM", "haillm.trainer.model", "meta device: structure, no memory", "#e8e8e8"),
    ("1 fused ops", "haillm.fusedops / flashattn", "RMSNorm, SwiGLU, attention, CE impls", "#cfe2f3"),
    ("2 TP / SP", "haillm.parallel.parallelize_module", "Column/Row/Vocab layers (shard plan)", "#d9ead3"),
    ("3 CP", "haillm.parallel (ring attention)", "zigzag shards, RoPE positions", "#d0e0e3"),
    ("4 recompute", "torch.utils.checkpoint", "full blocks, or norms + SwiGLU", "#f4cccc"),
    ("5 pipeline split", "DeepSeekLM.stage", "this rank's chunk(s), modules shared", "#fce5cd"),
    ("6 values", "shard plan: Shard.local", "own slices only, one tensor at a time", "#fff2cc"),
    ("7 ZeRO-1 / DDP", "haillm.zero.ZeroDataParallel", "params = views of fp32-grad buckets", "#ead1dc"),
]


def svg() -> str:
    w, h, gap, per_row = 250, 78, 32, 4
    width = per_row * w + (per_row - 1) * gap + 40
    height = 40 + 2 * h + 70 + 45
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" '
           'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" '
           'font-weight="bold">parallelize(model, dims, cfg): one order of transforms</text>']
    pos = []
    for i, (title, pkg, after, colour) in enumerate(STEPS):
        row, col = divmod(i, per_row)
        x = 20 + col * (w + gap)
        y = 40 + row * (h + 70)
        pos.append((x, y))
        dash = ' stroke-dasharray="5,4"' if "next" in after else ""
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{colour}" '
                   f'stroke="#555"{dash}/>')
        out.append(f'<text x="{x + w / 2}" y="{y + 24}" text-anchor="middle" font-size="14" '
                   f'font-weight="bold">{title}</text>')
        out.append(f'<text x="{x + w / 2}" y="{y + 45}" text-anchor="middle" font-size="11" '
                   f'font-family="monospace">{pkg}</text>')
        out.append(f'<text x="{x + w / 2}" y="{y + 64}" text-anchor="middle" font-size="11" '
                   f'fill="#333">{after}</text>')
    for (x0, y0), (x1, y1) in zip(pos, pos[1:]):
        if y0 == y1:  # same row: left to right
            out.append(f'<line x1="{x0 + w}" y1="{y0 + h / 2}" x2="{x1 - 2}" y2="{y1 + h / 2}" '
                       'stroke="#555" stroke-width="2" marker-end="url(#a)"/>')
        else:  # wrap to the next row
            out.append(f'<path d="M{x0 + w / 2},{y0 + h} V{y0 + h + 35} H{x1 + w / 2} '
                       f'V{y1 - 2}" fill="none" stroke="#555" stroke-width="2" '
                       'marker-end="url(#a)"/>')
    out.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="12" '
               'fill="#333">degree 1: every transform is the identity; no transform renames a '
               'parameter (checkpoints load into any layout)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(svg())
    print(f"wrote {OUT}")
