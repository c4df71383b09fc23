"""Small charts drawn on the server as SVG: no JavaScript, no external assets, readable by screen readers
(each chart has a title and the same figures are in a table next to it)."""
from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

PALETTE = ("#1f5fa8", "#1e7a46", "#9a6200", "#b3261e", "#6b4fa0", "#2b7f8e", "#6b7280")


def bar_chart(items: Sequence[tuple[str, float]], *, title: str, unit: str = "", width: int = 520,
              colors: dict[str, str] | None = None) -> Markup:
    """Horizontal bars, one per (label, value), labelled with their value; `colors` by label, else the palette."""
    row, label_w, pad = 28, 200, 8
    height = max(1, len(items)) * row + pad * 2
    top = max((v for _, v in items), default=0) or 1
    bar_w = width - label_w - 70
    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for i, (label, value) in enumerate(items):
        y = pad + i * row
        w = max(2, int(bar_w * value / top)) if value else 0
        shown = f"{value:g}{unit}"
        parts.append(f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end">{escape(label)}</text>'
                     f'<rect x="{label_w}" y="{y + 5}" width="{w}" height="{row - 10}" rx="3" '
                     f'fill="{(colors or {}).get(label, PALETTE[i % len(PALETTE)])}"></rect>'
                     f'<text x="{label_w + w + 6}" y="{y + 18}">{escape(shown)}</text>')
    if not items:
        parts.append(f'<text x="{pad}" y="{pad + 18}">no data yet</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
