"""Where things lie beside an output: its markers and the hidden siblings written next to
it. Pure string work on URLs and local paths (no fsspec). The names of the files inside a
run's output are the output contract's (:mod:`fruitdask.output.layout`)::

    <parent>/
      <name>/                               the output (fruitdask.output: its layout and names)
        _SUCCESS                            written last by a commit: the dataset is complete
      .<name>.fruitdask-tmp-<run_id>/       a run's staging prefix, published by its commit
      .<name>.fruitdask-lock                the output's lock (a lease, storage/lease.py)
      .<name>.fruitdask-old-<run_id>/       an old dataset copied aside during an S3 --overwrite
      .<name>.fruitdask-checkpoint/         featurized partitions kept for --resume
"""

from __future__ import annotations

#: Written last by a commit: a reader that waits for it never sees a half-written dataset.
SUCCESS_MARKER = "_SUCCESS"
RUN_JSON = "run.json"
BUNDLE_JSON = "bundle.json"
#: Top-level names that mark a folder as a fruitdask output (a run, or a model bundle).
OUTPUT_MARKERS = (SUCCESS_MARKER, RUN_JSON, BUNDLE_JSON)

# The suffixes of the hidden siblings ``.<name><suffix>`` of an output.
STAGING = ".fruitdask-tmp-"  # + run id
LOCK = ".fruitdask-lock"
BACKUP = ".fruitdask-old-"  # + run id
CHECKPOINTS = ".fruitdask-checkpoint"


def join(url: str, *parts: str) -> str:
    """Join URL parts with ``/`` whatever the protocol."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def split(url: str) -> tuple[str, str]:
    """``(parent, name)`` of ``url`` (parent ``.`` for a bare relative name)."""
    url = url.rstrip("/")
    if "/" not in url:
        return ".", url
    parent, name = url.rsplit("/", 1)
    return parent, name


def sibling_name(url: str, suffix: str) -> str:
    """The name ``.<name><suffix>`` of a hidden sibling of ``url`` (a prefix, for listings)."""
    return f".{split(url)[1]}{suffix}"


def sibling(url: str, suffix: str) -> str:
    """The hidden sibling ``.<name><suffix>`` of ``url`` (same parent prefix)."""
    return f"{split(url)[0]}/{sibling_name(url, suffix)}"


def staging_url(url: str, run_id: str) -> str:
    """Where run ``run_id`` writes before its commit publishes it at ``url``."""
    return sibling(url, f"{STAGING}{run_id}")


def lock_url(url: str) -> str:
    """The lock object beside the output (never inside: the output gets replaced)."""
    return sibling(url, LOCK)


def backup_url(url: str, run_id: str) -> str:
    """Where an old S3 dataset is copied aside while run ``run_id`` copies the new one in."""
    return sibling(url, f"{BACKUP}{run_id}")


def checkpoint_root(url: str) -> str:
    """The checkpoint prefix of an output (fruitdask.checkpoint)."""
    return sibling(url, CHECKPOINTS)
