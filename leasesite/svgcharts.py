"""Small server-rendered SVG charts for the console (no JavaScript, nothing from a CDN).

Each function returns a complete ``<svg>`` element, escaped throughout (labels are operator data),
with a ``<title>`` per mark so hovering (or a long press on a phone) shows the exact figure, and a
legend. The SVG scales to its container's width (``viewBox`` + ``width=100%``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe


@dataclass(frozen=True)
class Segment:
    key: str
    label: str
    color: str


def _svg(width: int, height: int, label: str, body: list[str]) -> SafeString:
    return mark_safe(  # noqa: S308 - every interpolated value below is escaped or a number
        f'<svg class="leasesite-chart" role="img" aria-label="{escape(label)}" viewBox="0 0 {width} {height}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="sans-serif" font-size="11">'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


def _legend(segments: Sequence[Segment], y: int) -> list[str]:
    parts, x = [], 0
    for segment in segments:
        parts.append(
            f'<rect x="{x}" y="{y}" width="10" height="10" fill="{escape(segment.color)}"/>'
            f'<text x="{x + 14}" y="{y + 9}">{escape(segment.label)}</text>'
        )
        x += 24 + 12 * len(segment.label)  # CJK glyphs are about as wide as the font size
    return parts


def _axis(*, left: int, top: int, bottom: int, width: int, peak: int) -> list[str]:
    """The baseline and the two value marks (0 and the peak) of a vertical chart."""
    return [
        f'<line x1="{left}" y1="{bottom}" x2="{width}" y2="{bottom}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end">0</text>',
    ]


def _ends(first: str, last: str | None, left: int, bottom: int, width: int) -> list[str]:
    """The first and last column labels under the baseline."""
    marks = [f'<text x="{left}" y="{bottom + 14}">{escape(first)}</text>']
    if last is not None:
        marks.append(f'<text x="{width}" y="{bottom + 14}" text-anchor="end">{escape(last)}</text>')
    return marks


def _empty(width: int, height: int, label: str, message: str) -> SafeString:
    return _svg(width, height, label, [f'<text x="4" y="{height // 2}" fill="#666">{escape(message)}</text>'])


def stacked_bars(
    columns: Sequence[tuple[str, dict[str, int]]],
    segments: Sequence[Segment],
    *,
    label: str,
    empty: str,
    width: int = 600,
    height: int = 180,
) -> SafeString:
    """One vertical bar per column (oldest left), stacked by segment."""
    if not columns:
        return _empty(width, 40, label, empty)
    plot_top, plot_bottom, left = 4, height - 40, 36
    plot_height = plot_bottom - plot_top
    peak = max(1, max(sum(values.get(s.key, 0) for s in segments) for _, values in columns))
    slot = (width - left) / len(columns)
    bar = max(2.0, slot * 0.7)
    body = _axis(left=left, top=plot_top, bottom=plot_bottom, width=width, peak=peak)
    for index, (column, values) in enumerate(columns):
        x = left + index * slot + (slot - bar) / 2
        y = float(plot_bottom)
        for segment in segments:
            value = values.get(segment.key, 0)
            if not value:
                continue
            h = plot_height * value / peak
            y -= h
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{escape(segment.color)}">'
                f"<title>{escape(column)}: {escape(segment.label)} {value}</title></rect>"
            )
    body.extend(_ends(columns[0][0], columns[-1][0] if len(columns) > 1 else None, left, plot_bottom, width))
    body.extend(_legend(segments, height - 14))
    return _svg(width, height, label, body)


def stacked_area(
    days: Sequence[str],
    series: dict[str, Sequence[int]],
    segments: Sequence[Segment],
    *,
    label: str,
    empty: str,
    width: int = 600,
    height: int = 200,
) -> SafeString:
    """Counts per day, stacked by segment (a band per segment), oldest day left."""
    totals = [sum(series.get(s.key, [0] * len(days))[i] for s in segments) for i in range(len(days))]
    if not days or not any(totals):
        return _empty(width, 40, label, empty)
    plot_top, plot_bottom, left = 4, height - 40, 36
    plot_height = plot_bottom - plot_top
    peak = max(1, max(totals))
    step = (width - left) / max(1, len(days) - 1)

    def point(i: int, value: float) -> str:
        return f"{left + i * step:.1f},{plot_bottom - plot_height * value / peak:.1f}"

    body = _axis(left=left, top=plot_top, bottom=plot_bottom, width=width, peak=peak)
    base = [0] * len(days)
    for segment in segments:
        values = list(series.get(segment.key, [0] * len(days)))
        if not any(values):
            continue
        top = [b + v for b, v in zip(base, values, strict=True)]
        outline = [point(i, top[i]) for i in range(len(days))] + [point(i, base[i]) for i in reversed(range(len(days)))]
        latest = values[-1]
        body.append(
            f'<polygon points="{" ".join(outline)}" fill="{escape(segment.color)}" fill-opacity="0.85">'
            f"<title>{escape(segment.label)}: {latest} ({escape(days[-1])})</title></polygon>"
        )
        base = top
    body.extend(_ends(days[0], days[-1], left, plot_bottom, width))
    body.extend(_legend([s for s in segments if any(series.get(s.key, []))], height - 14))
    return _svg(width, height, label, body)


def usage_bars(
    rows: Sequence[tuple[str, int, int]], *, label: str, empty: str, used_label: str, width: int = 600
) -> SafeString:
    """One horizontal bar per row: ``used`` of ``capacity`` (red when full, amber above 80 %)."""
    if not rows:
        return _empty(width, 40, label, empty)
    row_height, name_width = 20, 150
    bar_width = width - name_width - 70
    body = []
    for index, (name, used, capacity) in enumerate(rows):
        y = index * row_height
        share = min(1.0, used / capacity) if capacity else 1.0
        color = "#c0392b" if share >= 1 else "#e6a23c" if share >= 0.8 else "#3a7bd5"
        shown = name if len(name) <= 20 else name[:19] + "…"
        body.append(
            f'<text x="0" y="{y + 14}">{escape(shown)}</text>'
            f'<rect x="{name_width}" y="{y + 3}" width="{bar_width}" height="14" fill="#eee"/>'
            f'<rect x="{name_width}" y="{y + 3}" width="{bar_width * share:.1f}" height="14" fill="{color}">'
            f"<title>{escape(name)}: {escape(used_label)} {used} / {capacity}</title></rect>"
            f'<text x="{name_width + bar_width + 6}" y="{y + 14}">{used} / {capacity}</text>'
        )
    return _svg(width, row_height * len(rows) + 4, label, body)
