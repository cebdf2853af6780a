"""Small inline SVG charts for report.html and the dashboard: no JavaScript, no download, one
self-contained string each. Every series has its own dash pattern and marker shape as well as
its colour (Okabe-Ito, readable by most colour-blind people), so a grey-scale print still
tells the series apart; every chart carries a ``<title>`` and a ``<desc>`` in words."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
DASHES = ("", "6 3", "2 3", "8 3 2 3", "1 2", "10 4")
MARKERS = ("circle", "square", "triangle", "diamond", "cross")
W, H = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 170, 30, 44  # plot margins; the legend sits on the right


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    band: list[tuple[float, float, float]] = field(default_factory=list)  # x, low, high


@dataclass
class Line:
    """A horizontal reference line (a budget, a baseline)."""

    label: str
    value: float


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round-numbered ticks covering [low, high] (none for a range that is not finite)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    span = max(high - low, 1e-12)
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _int_ticks(low: int, high: int) -> list[int]:
    """Whole rounds only: no round 0.25."""
    step = max(1, math.ceil((high - low) / 10))
    return list(range(low, high + 1, step))


def _marker(kind: str, x: float, y: float, colour: str) -> str:
    if kind == "circle":
        return f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' fill='{colour}'/>"
    if kind == "square":
        return f"<rect x='{x - 3.5:.1f}' y='{y - 3.5:.1f}' width='7' height='7' fill='{colour}'/>"
    if kind == "triangle":
        pts = f"{x:.1f},{y - 4.5:.1f} {x - 4.5:.1f},{y + 3.5:.1f} {x + 4.5:.1f},{y + 3.5:.1f}"
        return f"<polygon points='{pts}' fill='{colour}'/>"
    if kind == "diamond":
        pts = f"{x:.1f},{y - 5:.1f} {x - 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} {x + 5:.1f},{y:.1f}"
        return f"<polygon points='{pts}' fill='{colour}'/>"
    return (
        f"<path d='M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}M{x - 4:.1f},{y + 4:.1f}"
        f"L{x + 4:.1f},{y - 4:.1f}' stroke='{colour}' stroke-width='2'/>"
    )


def _frame(title: str, desc: str, body: list[str]) -> str:
    return (
        f"<svg class='chart' role='img' viewBox='0 0 {W} {H}' width='{W}' height='{H}' "
        f"xmlns='http://www.w3.org/2000/svg' aria-label='{_e(title)}'>"
        f"<title>{_e(title)}</title><desc>{_e(desc)}</desc>"
        f"<style>text{{font:11px sans-serif}}</style>{''.join(body)}</svg>"
    )


def line_chart(
    title: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    lines: Sequence[Line] = (),
    y_range: tuple[float, float] | None = None,
    scatter: bool = False,
    x_max: int | None = None,
) -> str:
    """A chart of ``series`` over whole rounds up to ``x_max`` at least (the planned rounds,
    so a running run's progress shows), or over any x with ``scatter=True`` (points not
    joined), with reference ``lines``; the y-axis spans ``y_range``, so a small change does
    not look dramatic."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points] + [v.value for v in lines]
    ys += [v for s in series for _, lo, hi in s.band for v in (lo, hi)]
    if y_range is None:
        y_range = (min([0.0, *ys]), max([1e-9, *ys]) * 1.08)
    y0, y1 = y_range
    if scatter:
        x0, x1 = (min(xs, default=0.0), max(xs, default=1.0))
        pad = max((x1 - x0) * 0.08, 0.05)
        x0, x1 = max(0.0, x0 - pad), x1 + pad
        xticks: list[float] = _ticks(x0, x1)
    else:
        x0, x1 = int(min(xs, default=0)), int(max(xs, default=1))
        x1 = max(x1, x0 + 1, x_max or 0)
        xticks = list(_int_ticks(x0, x1))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + ph - (min(max(y, y0), y1) - y0) / (y1 - y0) * ph

    out = [f"<text x='{LEFT}' y='18' font-weight='bold'>{_e(title)}</text>"]
    for t in _ticks(y0, y1):
        out.append(
            f"<line x1='{LEFT}' x2='{LEFT + pw}' y1='{py(t):.1f}' y2='{py(t):.1f}' "
            f"stroke='#ddd'/><text x='{LEFT - 6}' y='{py(t) + 4:.1f}' "
            f"text-anchor='end'>{t:g}</text>"
        )
    for t in xticks:
        out.append(f"<text x='{px(t):.1f}' y='{TOP + ph + 16}' text-anchor='middle'>{t:g}</text>")
    out.append(
        f"<rect x='{LEFT}' y='{TOP}' width='{pw}' height='{ph}' fill='none' stroke='#666'/>"
        f"<text x='{LEFT + pw / 2}' y='{H - 8}' text-anchor='middle'>{_e(x_label)}</text>"
        f"<text transform='translate(14 {TOP + ph / 2}) rotate(-90)' "
        f"text-anchor='middle'>{_e(y_label)}</text>"
    )
    legend = []
    for i, ref in enumerate(lines):
        y = py(ref.value)
        out.append(
            f"<line x1='{LEFT}' x2='{LEFT + pw}' y1='{y:.1f}' y2='{y:.1f}' stroke='#444' "
            f"stroke-width='1.5' stroke-dasharray='{DASHES[(i + 1) % len(DASHES)] or '9 4'}'/>"
        )
        legend.append(
            f"<line x1='0' x2='22' y1='0' y2='0' stroke='#444' stroke-width='1.5' "
            f"stroke-dasharray='{DASHES[(i + 1) % len(DASHES)] or '9 4'}'/>"
            f"<text x='28' y='4'>{_e(ref.label)}</text>"
        )
    for i, s in enumerate(series):
        colour, dash, mark = (
            COLOURS[i % len(COLOURS)],
            DASHES[i % len(DASHES)],
            MARKERS[i % len(MARKERS)],
        )
        if s.band:
            upper = " ".join(f"{px(x):.1f},{py(hi):.1f}" for x, _, hi in s.band)
            lower = " ".join(f"{px(x):.1f},{py(lo):.1f}" for x, lo, _ in reversed(s.band))
            out.append(f"<polygon points='{upper} {lower}' fill='{colour}' opacity='0.15'/>")
        pts = [(px(x), py(y)) for x, y in s.points]
        if len(pts) > 1 and not scatter:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(
                f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='2' "
                f"stroke-dasharray='{dash}'/>"
            )
        out += [_marker(mark, x, y, colour) for x, y in pts]
        legend.append(
            f"<line x1='0' x2='22' y1='0' y2='0' stroke='{colour}' stroke-width='2' "
            f"stroke-dasharray='{'' if scatter else dash}'/>{_marker(mark, 11, 0, colour)}"
            f"<text x='28' y='4'>{_e(s.label)}</text>"
        )
    for i, item in enumerate(legend):
        out.append(f"<g transform='translate({LEFT + pw + 12} {TOP + 8 + i * 18})'>{item}</g>")
    desc = "; ".join(
        [
            f"{s.label}: "
            + ", ".join(f"{x:g} → {y:.3g}" for x, y in s.points[-12:])  # the last points, in words
            for s in series
        ]
        + [f"{ref.label}: {ref.value:.3g}" for ref in lines]
    )
    return _frame(title, desc or "no data yet", out)


def gauge(label: str, value: float | None, limit: float | None, note: str = "") -> str:
    """One institution's spend against its budget as a horizontal bar: the share in words
    beside it, and a hatched fill past 80% so that it reads without colour. Without a known
    budget (a deployment run: the ledgers are the institutions') only the words: an empty
    bar would read as nothing spent."""
    width, height = 360, 26
    share = (value or 0.0) / limit if limit else 0.0
    filled = min(max(share, 0.0), 1.0) * width
    hatch = "hatch-" + "".join(c if c.isalnum() else "-" for c in label)  # ids are unique
    fill = f"url(#{hatch})" if share >= 0.8 else "#0072B2"
    text = (
        f"{label}: epsilon {value:.2f} of {limit:.2f} ({share:.1%})"
        if value is not None and limit
        else f"{label}: epsilon {'-' if value is None else f'{value:.2f}'} (no budget known)"
    )
    bar = (
        f"<svg role='img' aria-label='{_e(text)}' width='{width + 2}' height='{height + 2}' "
        f"xmlns='http://www.w3.org/2000/svg'><title>{_e(text)}</title>"
        f"<defs><pattern id='{_e(hatch)}' width='6' height='6' patternUnits='userSpaceOnUse' "
        "patternTransform='rotate(45)'><rect width='6' height='6' fill='#D55E00'/>"
        "<line x1='0' y1='0' x2='0' y2='6' stroke='#000' stroke-width='2'/></pattern></defs>"
        f"<rect x='1' y='1' width='{width}' height='{height}' fill='#eee' stroke='#444'/>"
        f"<rect x='1' y='1' width='{filled:.1f}' height='{height}' fill='{fill}'/></svg>"
        if limit
        else ""
    )
    return (
        f"<figure class='gauge' data-institution='{_e(label)}'>{bar}"
        f"<figcaption>{_e(text)}{(' — ' + _e(note)) if note else ''}</figcaption></figure>"
    )
