"""matplotlib for the PNG charts written as files (the scree plot, the classifier's confusion
matrix): the Agg backend, text drawn as data, PNG bytes out.

The run report's own charts are SVG (:mod:`fruitdask.report.svg`): the report needs no
matplotlib.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np


def import_pyplot():
    """matplotlib's pyplot on the Agg backend (no display), imported once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Labels are data (folder names): drawn as typed, never parsed as mathtext (``a$\foo$b``
#: would raise inside savefig) or handed to LaTeX.
TEXT_AS_DATA: dict[Any, Any] = {"text.parse_math": False, "text.usetex": False}


@contextmanager
def text_as_data() -> Iterator[None]:
    """Draw every text literally while the block runs (figure creation *and* savefig: tick
    labels are made at draw time). Every chart of fruitdask is drawn inside one."""
    import matplotlib

    with matplotlib.rc_context(TEXT_AS_DATA):
        yield


def png_bytes(fig) -> bytes:
    """``fig`` as PNG bytes at 100 dpi; the figure is closed."""
    plt = import_pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def scree_png(ratios: Sequence[float] | np.ndarray, *, k: int, variance_target: float | None, title: str = "Scree plot") -> bytes:
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
    return png_bytes(fig)
