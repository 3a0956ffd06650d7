"""The report's charts as SVG, written as text: numbers in, an SVG document out.

No plotting library: a chart is a few hundred elements, built in milliseconds, so the daily run's
report costs nothing worth measuring and the client never imports matplotlib for it (it took
1.1 s of a 10 s daily run). Every text is data (label folder names): XML-escaped, never parsed.
:mod:`fruitdask.report.page` embeds each chart as a ``data:image/svg+xml`` image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

import numpy as np

#: Labels drawn in their own colour on the PCA scatter; the rest are grey "other".
TOP_LABELS = 10
OTHER = "other"
#: Labels drawn as bars; past this many, the smallest are summed into one "other" bar, so the
#: chart's size is bounded at any number of labels.
MAX_LABEL_BARS = 200
#: matplotlib's tab10, the scatter's label colours.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
GREY = "#b0b0b0"
FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'
CHAR_W = 6.4  # px per character at 11 px: room for a label column, measured on DejaVu Sans
MAX_NAME_CHARS = 40  # longer names are cut in the column, whole in the bar's tooltip


#: Characters XML 1.0 cannot carry, even escaped (a folder name may hold them): drawn as U+FFFD.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _t(text: object) -> str:
    return escape(_NOT_XML.sub("\ufffd", str(text)), {'"': "&quot;"})


def drawn_name(name: str) -> str:
    """A label as its bar's text: XML-safe, cut to :data:`MAX_NAME_CHARS` (whole in the tooltip)."""
    name = _NOT_XML.sub("\ufffd", name)
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "\u2026"


def summarise_labels(per_label: Mapping[str, int], top: int = MAX_LABEL_BARS) -> list[tuple[str, int]]:
    """The ``top - 1`` largest labels, largest first, and one ``other (N labels)`` bar."""
    items = sorted(per_label.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(items) <= top:
        return items
    rest = items[top - 1 :]
    return [*items[: top - 1], (f"other ({len(rest):,} labels)", sum(v for _, v in rest))]


def group_labels(labels: Sequence[str], top: int = TOP_LABELS) -> tuple[np.ndarray, list[str]]:
    """Keep the ``top`` most frequent labels, map the others to ``"other"``.

    Returns the grouped labels and the legend order (most frequent first, ``other`` last).
    Ties are broken by name so the colours do not change between rebuilds.
    """
    arr = np.asarray(labels, dtype=object)
    names, counts = np.unique(arr, return_counts=True)
    order = sorted(zip(names.tolist(), counts.tolist(), strict=True), key=lambda nc: (-nc[1], nc[0]))
    kept = [n for n, _ in order[:top]]
    grouped = np.where(np.isin(arr, kept), arr, OTHER)
    legend = kept + ([OTHER] if len(order) > top else [])
    return grouped, legend


def nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (1, 2 or 5 times a power of ten apart)."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(most - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def _svg(width: float, height: float, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" {FONT} font-size="11">'
            f'<title>{_t(title)}</title><rect width="100%" height="100%" fill="#fff"/>'
            f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="13">{_t(title)}</text>'
            + "".join(body) + "</svg>")


def hbars(items: Sequence[tuple[str, float]], *, title: str, xlabel: str, color: str,
          value_text=_fmt, width: int = 800) -> str:
    """Horizontal bars, first item on top, each with its value at its end."""
    names = [drawn_name(n) for n, _ in items]
    left = 12 + CHAR_W * max((len(n) for n in names), default=1)
    row, top = 20, 32
    plot_w = width - left - 70
    most = max((float(v) for _, v in items), default=0.0) or 1.0
    ticks = nice_ticks(0.0, most, 6)
    scale = plot_w / max(ticks[-1], most)
    height = top + row * len(items) + 44
    body = []
    for t in ticks:
        x = left + t * scale
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - 40}" stroke="#e0e0e0"/>'
                    f'<text x="{x:.1f}" y="{height - 26}" text-anchor="middle">{_t(_fmt(t))}</text>')
    for i, ((full, v), name) in enumerate(zip(items, names, strict=True)):
        y = top + i * row
        w = max(float(v), 0.0) * scale
        body.append(f'<g><title>{_t(full)}: {_t(value_text(v))}</title>'
                    f'<text x="{left - 6:.1f}" y="{y + 14}" text-anchor="end">{_t(name)}</text>'
                    f'<rect x="{left:.1f}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="{color}"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 14}" font-size="10">{_t(value_text(v))}</text></g>')
    body.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">{_t(xlabel)}</text>')
    return _svg(width, height, body, title)


def labels_bar_svg(per_label: Mapping[str, int]) -> str:
    """Images per label, largest first; at most :data:`MAX_LABEL_BARS` bars at any label count."""
    return hbars(summarise_labels(per_label), title=f"Images per label ({len(per_label):,} labels)",
                 xlabel="images", color="#4c72b0")


def timings_bar_svg(timings: Mapping[str, float]) -> str:
    """Seconds per stage, in the order the stages ran."""
    return hbars([(k, float(v)) for k, v in timings.items()], title="Time per stage", xlabel="seconds",
                 color="#dd8452", value_text=lambda s: f"{s:.2f} s")


def pca_scatter_svg(pcs: np.ndarray, labels: Sequence[str], *, shown_of: int, ratios: Sequence[float] = (),
                    top: int = TOP_LABELS) -> str:
    """The first two principal components, coloured by label (top labels, the rest grey "other").

    ``pcs`` is ``(n, 2)`` (or ``(n, 1)`` when K is 1: drawn against zero). ``shown_of`` is the
    number of rows in the table, for the title when ``pcs`` is a sample; ``ratios``, the
    explained-variance ratios, label the axes.
    """
    pcs = np.asarray(pcs, dtype=np.float64).reshape(len(pcs), -1)
    x = pcs[:, 0] if pcs.shape[1] else np.zeros(len(pcs))
    y = pcs[:, 1] if pcs.shape[1] > 1 else np.zeros(len(pcs))
    grouped, legend = group_labels(labels, top)
    width, height, left, right, top_px, bottom = 900, 560, 64, 230, 32, 52
    xt = nice_ticks(*_span(x))
    yt = nice_ticks(*_span(y))
    x0, x1 = min(xt[0], *_span(x)), max(xt[-1], *_span(x))
    y0, y1 = min(yt[0], *_span(y)), max(yt[-1], *_span(y))
    pw, ph = width - left - right, height - top_px - bottom

    def px(v: np.ndarray) -> np.ndarray:
        return left + (v - x0) / ((x1 - x0) or 1.0) * pw

    def py(v: np.ndarray) -> np.ndarray:
        return top_px + ph - (v - y0) / ((y1 - y0) or 1.0) * ph

    body = _axes(xt, yt, px, py, left, top_px, pw, ph)
    share = [f" ({100 * r:.1f}% of variance)" for r in ratios] + ["", ""]
    body.append(f'<text x="{left + pw / 2:.0f}" y="{height - 12}" text-anchor="middle">{_t("PC 1" + share[0])}</text>')
    ylab = "PC 2" + share[1] if pcs.shape[1] > 1 else "(K = 1: no second component)"
    body.append(f'<text transform="translate(16 {top_px + ph / 2:.0f}) rotate(-90)" text-anchor="middle">{_t(ylab)}</text>')
    n_labels = len(set(labels))
    order = ([OTHER] if OTHER in legend else []) + [n for n in legend if n != OTHER]
    for name in order:
        mask = grouped == name
        other = name == OTHER
        colour = GREY if other else PALETTE[legend.index(name) % len(PALETTE)]
        r, alpha = (2.0, 0.35) if other else (2.8, 0.8)
        dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{r}"/>' for a, b in zip(px(x[mask]), py(y[mask]), strict=True))
        body.append(f'<g fill="{colour}" fill-opacity="{alpha}">{dots}</g>')
    for i, name in enumerate(legend):
        count = int((grouped == name).sum())
        text = f"{n_labels - len(legend) + 1} other labels ({count})" if name == OTHER else f"{name} ({count})"
        colour = GREY if name == OTHER else PALETTE[i % len(PALETTE)]
        ly = top_px + 10 + 18 * i
        body.append(f'<circle cx="{left + pw + 16}" cy="{ly}" r="4" fill="{colour}"/>'
                    f'<text x="{left + pw + 26}" y="{ly + 4}">{_t(text)}</text>')
    sample = f"{len(pcs):,} of {shown_of:,} images" if len(pcs) < shown_of else f"{len(pcs):,} images"
    return _svg(width, height, body, f"First two principal components, {sample}")


def _span(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if not len(v):
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = 0.5 if hi == lo else 0.03 * (hi - lo)  # no dot on the frame
    return lo - pad, hi + pad


def _axes(xt: list[float], yt: list[float], px, py, left: float, top: float, pw: float, ph: float) -> list[str]:
    body = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for t, p in zip(xt, px(np.asarray(xt)), strict=True):
        body.append(f'<line x1="{p:.1f}" y1="{top + ph}" x2="{p:.1f}" y2="{top + ph + 4}" stroke="#888"/>'
                    f'<text x="{p:.1f}" y="{top + ph + 16}" text-anchor="middle">{_t(_fmt(t))}</text>')
    for t, p in zip(yt, py(np.asarray(yt)), strict=True):
        body.append(f'<line x1="{left - 4}" y1="{p:.1f}" x2="{left}" y2="{p:.1f}" stroke="#888"/>'
                    f'<text x="{left - 6}" y="{p + 4:.1f}" text-anchor="end">{_t(_fmt(t))}</text>')
    return body
