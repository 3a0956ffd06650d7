"""The charts of the run report, drawn with matplotlib's Agg backend and returned as PNG bytes.

Pure functions: numbers in, PNG bytes out. :mod:`fruitdask.report.page` decides what to plot and
embeds the bytes as ``data:`` URIs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

#: Labels drawn in their own colour on the PCA scatter; the rest are grey "other".
TOP_LABELS = 10
OTHER = "other"


def import_pyplot():
    """matplotlib's pyplot on the Agg backend (no display), imported once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Labels are data (folder names): drawn as typed, never parsed as mathtext (``a$\foo$b``
#: would raise inside savefig) or handed to LaTeX.
TEXT_AS_DATA = {"text.parse_math": False, "text.usetex": False}


@contextmanager
def text_as_data() -> Iterator[None]:
    """Draw every text literally while the block runs (figure creation *and* savefig: tick
    labels are made at draw time). Every chart of fruitdask is drawn inside one."""
    import matplotlib

    with matplotlib.rc_context(TEXT_AS_DATA):
        yield


def legend_text(text: str) -> str:
    """``text`` as a legend entry: matplotlib drops entries starting with ``_``."""
    return "\u200b" + text if text.startswith("_") else text


def _png(fig) -> bytes:
    plt = import_pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def labels_bar_png(per_label: Mapping[str, int]) -> bytes:
    """Horizontal bars of images per label, largest first; tall enough to read 50+ labels."""
    with text_as_data():
        return _labels_bar_png(per_label)


#: Labels drawn as bars; past this many, the smallest are summed into one "other" bar
#: (a chart of 3,000 bars would pass matplotlib's pixel limit).
MAX_LABEL_BARS = 200


def summarise_labels(per_label: Mapping[str, int], top: int = MAX_LABEL_BARS) -> list[tuple[str, int]]:
    """The ``top - 1`` largest labels, largest first, and one ``other (N labels)`` bar."""
    items = sorted(per_label.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(items) <= top:
        return items
    rest = items[top - 1 :]
    return [*items[: top - 1], (f"other ({len(rest):,} labels)", sum(v for _, v in rest))]


def _labels_bar_png(per_label: Mapping[str, int]) -> bytes:
    plt = import_pyplot()
    items = summarise_labels(per_label)
    names = [k for k, _ in items][::-1]
    counts = [v for _, v in items][::-1]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(names) + 1.2)))
    bars = ax.barh(names, counts, color="#4c72b0")
    ax.bar_label(bars, padding=3, fontsize=8)
    ax.set_xlabel("images")
    ax.set_title(f"Images per label ({len(per_label):,} labels)")
    ax.tick_params(axis="y", labelsize=8)
    ax.margins(x=0.1)
    fig.tight_layout()
    return _png(fig)


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


def pca_scatter_png(
    pcs: np.ndarray, labels: Sequence[str], *, shown_of: int, ratios: Sequence[float] = (), top: int = TOP_LABELS
) -> bytes:
    """The first two principal components, coloured by label (top labels, the rest "other").

    ``pcs`` is ``(n, 2)`` (or ``(n, 1)`` when K is 1: drawn against zero). ``shown_of`` is
    the number of rows in the output, for the title when ``pcs`` is a sample; ``ratios``, the
    explained-variance ratios, label the axes.
    """
    with text_as_data():
        return _pca_scatter_png(pcs, labels, shown_of=shown_of, ratios=ratios, top=top)


def _pca_scatter_png(pcs: np.ndarray, labels: Sequence[str], *, shown_of: int, ratios: Sequence[float], top: int) -> bytes:
    plt = import_pyplot()
    pcs = np.asarray(pcs, dtype=np.float64)
    y = pcs[:, 1] if pcs.shape[1] > 1 else np.zeros(len(pcs))
    grouped, legend = group_labels(labels, top)
    cmap = plt.get_cmap("tab10" if top <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, name in enumerate(legend):
        mask = grouped == name
        other = name == OTHER
        ax.scatter(
            pcs[mask, 0], y[mask], s=10 if other else 22, alpha=0.35 if other else 0.8,
            color="#b0b0b0" if other else cmap(i % cmap.N),
            label=f"{len(set(labels)) - len(legend) + 1} other labels ({int(mask.sum())})" if other else legend_text(f"{name} ({int(mask.sum())})"),
            zorder=1 if other else 2, linewidths=0,
        )
    share = [f" ({100 * r:.1f}% of variance)" for r in ratios] + ["", ""]
    ax.set_xlabel("PC 1" + share[0])
    ax.set_ylabel("PC 2" + share[1] if pcs.shape[1] > 1 else "(K = 1: no second component)")
    sample = f"{len(pcs):,} of {shown_of:,} images" if len(pcs) < shown_of else f"{len(pcs):,} images"
    ax.set_title(f"First two principal components, {sample}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=1.5, frameon=False)
    fig.tight_layout()
    return _png(fig)


def timings_bar_png(timings: Mapping[str, float]) -> bytes:
    """Seconds per stage, in the order the stages ran."""
    with text_as_data():
        return _timings_bar_png(timings)


def _timings_bar_png(timings: Mapping[str, float]) -> bytes:
    plt = import_pyplot()
    names = list(timings)[::-1]
    secs = [float(timings[n]) for n in names]
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.35 * len(names) + 1.0)))
    bars = ax.barh(names, secs, color="#dd8452")
    ax.bar_label(bars, labels=[f"{s:.2f} s" for s in secs], padding=3, fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("Time per stage")
    ax.margins(x=0.15)
    fig.tight_layout()
    return _png(fig)


def scree_png(ratios: Sequence[float], *, k: int, variance_target: float | None, title: str = "Scree plot") -> bytes:
    """Bars per component, the cumulative curve, the target and the chosen K, as PNG bytes.

    ``ratios`` are a reduction's explained-variance ratios (descending, possibly past K);
    at most ``max(2K, 30)`` components are drawn.
    """
    with text_as_data():
        return _scree_png(np.asarray(ratios, dtype=np.float64), k, variance_target, title)


def _scree_png(ratios: np.ndarray, k: int, variance_target: float | None, title: str) -> bytes:
    plt = import_pyplot()
    shown = min(len(ratios), max(2 * k, 30))
    x = np.arange(1, shown + 1)
    cumulative = np.cumsum(ratios)[:shown]
    reached = float(np.sum(ratios[:k]))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    ax.bar(x, ratios[:shown] * 100, color="#4c72b0", label="explained variance per component")
    ax.plot(x, cumulative * 100, color="#c44e52", marker="o", markersize=3, label="cumulative")
    if variance_target is not None:
        ax.axhline(variance_target * 100, color="grey", linestyle=":", label=f"target {variance_target:.0%}")
    ax.axvline(k, color="black", linestyle="--", label=f"K = {k} ({reached:.1%})")
    ax.set_xlabel("principal component (rank)")
    ax.set_ylabel("explained variance (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="center right")
    fig.tight_layout()
    return _png(fig)
