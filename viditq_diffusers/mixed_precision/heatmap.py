"""A PNG heatmap of a sensitivity table that a person can read: one row per group, one column per option
(precision, or precision per timestep window), the cell coloured by the degradation on the metric the group
dominates (white = none, dark red = the table's worst) and labelled with the value. Drawn with Pillow, which
diffusers already needs, so the core gains no plotting dependency."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw

from .sensitivity import dominant_metric

CELL_W, CELL_H, PAD, CHAR_W = 96, 18, 6, 7  # CELL_W: the narrowest cell; CHAR_W: Pillow's default font


def _colour(value: float, worst: float) -> tuple[int, int, int]:
    share = 0.0 if worst <= 0 else min(max(value / worst, 0.0), 1.0)
    return 255, int(255 * (1 - share)), int(255 * (1 - share))  # white -> red


def save_heatmap(table: dict[str, dict[str, dict]], path: str | os.PathLike, title: str = "") -> None:
    groups = list(table)
    options = list(next(iter(table.values())))
    value = {(g, o): table[g][o]["metrics"].get(dominant_metric(g), 0.0) for g in groups for o in options}
    worst = {}  # per metric, so squared errors and accuracy drops each use their own scale
    for g in groups:
        metric = dominant_metric(g)
        worst[metric] = max([worst.get(metric, 0.0)] + [value[(g, o)] for o in options])
    label_w = CHAR_W * max(len(f"{g} ({dominant_metric(g)})") for g in groups) + 2 * PAD
    cell_w = max(CELL_W, CHAR_W * max(len(o) for o in options) + 2 * PAD)  # wide enough for the option names
    top = 2 * CELL_H + PAD
    image = Image.new("RGB", (label_w + cell_w * len(options) + PAD, top + CELL_H * len(groups) + PAD), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD // 2), title or "degradation vs FP on each group's dominant metric (higher = worse)",
              fill="black")
    for j, option in enumerate(options):
        draw.text((label_w + j * cell_w + PAD, CELL_H), option, fill="black")
    for i, group in enumerate(groups):
        y = top + i * CELL_H
        draw.text((PAD, y + 3), f"{group} ({dominant_metric(group)})", fill="black")
        for j, option in enumerate(options):
            x = label_w + j * cell_w
            v = value[(group, option)]
            draw.rectangle([x, y, x + cell_w - 2, y + CELL_H - 2], fill=_colour(v, worst[dominant_metric(group)]))
            draw.text((x + PAD, y + 3), f"{v:.3g}", fill="black")
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, path)
