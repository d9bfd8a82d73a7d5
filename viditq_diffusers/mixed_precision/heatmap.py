"""A PNG heatmap of a sensitivity table that a person can read: one row per group, one block of columns per
metric (fidelity, text alignment, temporal consistency) with one column per option (precision, or precision
per timestep window), each cell coloured by the degradation (white = none, dark red = that metric's worst)
and labelled with the value; the metric each group dominates is boxed. Drawn with Pillow, which
diffusers already needs, so the core gains no plotting dependency."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw

from ..atomic import atomic_path
from .sensitivity import FIDELITY, TEMPORAL, TEXT, dominant_metric

CELL_W, CELL_H, PAD, CHAR_W = 96, 18, 6, 7  # CELL_W: the narrowest cell; CHAR_W: Pillow's default font
METRIC_ORDER = (FIDELITY, TEXT, TEMPORAL)


def _colour(value: float, worst: float) -> tuple[int, int, int]:
    share = 0.0 if worst <= 0 else min(max(value / worst, 0.0), 1.0)
    return 255, int(255 * (1 - share)), int(255 * (1 - share))  # white -> red


class Layout:
    """Where everything goes: one row per group; one block of columns per metric, one column per option."""

    def __init__(self, table: dict[str, dict[str, dict]]):
        self.groups = list(table)
        self.options = list(next(iter(table.values())))
        present = {m for entries in table.values() for e in entries.values() for m in e["metrics"]}
        self.metrics = [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))
        self.label_w = CHAR_W * max(len(g) for g in self.groups) + 2 * PAD
        self.cell_w = max(CELL_W, CHAR_W * max(len(o) for o in self.options) + 2 * PAD)  # fits the option names
        self.top = 3 * CELL_H + PAD
        self.size = (self.label_w + self.cell_w * len(self.metrics) * len(self.options) + PAD * len(self.metrics),
                     self.top + CELL_H * len(self.groups) + PAD)

    def cell(self, group: str, metric: str, option: str) -> tuple[int, int]:
        """Top-left corner of a cell."""
        block = self.metrics.index(metric)
        x = self.label_w + block * (self.cell_w * len(self.options) + PAD) + self.options.index(option) * self.cell_w
        return x, self.top + self.groups.index(group) * CELL_H


def save_heatmap(table: dict[str, dict[str, dict]], path: str | os.PathLike, title: str = "") -> None:
    """Every metric of every group at every option; the cells of the metric a group dominates are boxed."""
    layout = Layout(table)
    value = {(g, m, o): table[g][o]["metrics"].get(m, 0.0) for g in layout.groups for m in layout.metrics
             for o in layout.options}
    worst = {m: max(value[(g, m, o)] for g in layout.groups for o in layout.options) for m in layout.metrics}
    image = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD // 2), (title + ": " if title else "") + "degradation vs FP (higher = worse; fidelity = "
              "relative squared error); boxed: the metric the group dominates", fill="black")
    for metric in layout.metrics:
        x, _ = layout.cell(layout.groups[0], metric, layout.options[0])
        draw.text((x + PAD, CELL_H + 2), metric, fill="black")
        for option in layout.options:
            draw.text((layout.cell(layout.groups[0], metric, option)[0] + PAD, 2 * CELL_H), option, fill="black")
    for group in layout.groups:
        draw.text((PAD, layout.cell(group, layout.metrics[0], layout.options[0])[1] + 3), group, fill="black")
        for metric in layout.metrics:
            for option in layout.options:
                x, y = layout.cell(group, metric, option)
                v = value[(group, metric, option)]
                boxed = "black" if metric == dominant_metric(group) else None
                draw.rectangle([x, y, x + layout.cell_w - 2, y + CELL_H - 2], fill=_colour(v, worst[metric]),
                               outline=boxed)
                draw.text((x + PAD, y + 3), f"{v:.3g}", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
