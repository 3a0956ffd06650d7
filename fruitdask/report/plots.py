"""matplotlib for the PNG charts written as files (the scree plot, the classifier's confusion
matrix): the Agg backend, text drawn as data, PNG bytes out.

The run report's own charts are SVG (:mod:`fruitdask.report.svg`): the report needs no
matplotlib.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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

