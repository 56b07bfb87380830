"""Validation curves across hops as an inline SVG, drawn on the server (no script, no CDN)."""

from __future__ import annotations

import math
from html import escape

from coordinator.dashboard.schemas import HopView

__all__ = ["curve_metrics", "validation_svg"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
# Training-side bookkeeping, not validation quality.
_NOT_CURVES = ("train_", "examples", "steps")


def curve_metrics(hops: list[HopView]) -> list[str]:
    """The validation metrics some committed hop reported, in a stable order."""
    names = {
        name
        for hop in hops
        for name, value in hop.metrics.items()
        if math.isfinite(value) and not any(part in name for part in _NOT_CURVES)
    }
    return sorted(names)


def validation_svg(hops: list[HopView], metric: str, width: int = 560, height: int = 220) -> str:
    """One line per site: the metric each hop at that site reported, over the hop index."""
    series: dict[str, list[tuple[int, float]]] = {}
    for hop in hops:
        value = hop.metrics.get(metric)
        if value is not None and math.isfinite(value):
            series.setdefault(hop.site, []).append((hop.index, value))
    left, right, top, bottom = 48, 110, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="curve" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(metric)} per hop">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>',
    ]
    points = [p for values in series.values() for p in values]
    if not points:
        parts.append(f'<text x="{left + 8}" y="{top + 20}">no {escape(metric)} yet</text></svg>')
        return "".join(parts)
    max_x = max(max(i for i in (hop.index for hop in hops)), 1)
    low, high = min(v for _, v in points), max(v for _, v in points)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def x(index: int) -> float:
        return left + plot_w * index / max_x

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - low) / (high - low))

    parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{high:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{low:.3g}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">hop 0</text>')
    parts.append(f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end">hop {max_x}'
                 "</text>")  # fmt: skip
    for number, (site, values) in enumerate(sorted(series.items())):
        colour = _COLOURS[number % len(_COLOURS)]
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in values)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{path}" data-site="{escape(site)}"/>')  # fmt: skip
        for i, v in values:
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}">'
                         f"<title>{escape(site)} hop {i}: {v:.4g}</title></circle>")  # fmt: skip
        legend_y = top + 14 + 16 * number
        parts.append(f'<rect x="{left + plot_w + 10}" y="{legend_y - 9}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{left + plot_w + 24}" y="{legend_y}">'
                     f"{escape(site)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def series_svg(
    series: dict[str, list[tuple[int, float]]], *, label: str, width: int = 560, height: int = 220
) -> str:
    """A line per named series over an integer x axis (e.g. a study's best-so-far by trial)."""
    hops = [
        HopView.model_construct(index=x, site=name, metrics={"y": y})
        for name, points in series.items()
        for x, y in points
    ]
    return validation_svg(hops, "y", width, height).replace(">hop ", f">{escape(label)} ")
